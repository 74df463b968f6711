"""Training data held on the compute device and augmented there, in batches.

On a GPU, a DataLoader with CPU workers decoding and augmenting one image at a time cannot
keep up with the model (measured on an H200: the card busy 20-42% of the training time).
The HDF5 caches are small (KMU-FED at 224 px: 55 MB; FER+ at 112 px: ~450 MB), so the
training split goes to the device once as uint8 and :class:`BatchAugment` applies the
``"seed"`` and ``"nir"`` recipes of :func:`helpers.augment.build_transform` to whole batches
with per-sample random parameters: the same transforms, probabilities and ranges
(equivalence in distribution is tested against the albumentations pipelines).

:class:`DeviceBatches` then serves shuffled, augmented batches where ``fit`` expects a
DataLoader; its randomness comes from torch's generator, which ``fit`` reseeds every
epoch, so runs are reproducible and resume exactly.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from .augment import IMAGENET_MEAN, IMAGENET_STD

RECIPES = ("seed", "nir", "eval")


def _uniform(n: int, low: float, high: float, device) -> torch.Tensor:
    return torch.rand(n, device=device) * (high - low) + low


def _chance(n: int, p: float, device) -> torch.Tensor:
    return torch.rand(n, device=device) < p


def _affine(x: torch.Tensor, on: torch.Tensor, degrees: float, translate: float = 0.0,
            scale: tuple[float, float] = (1.0, 1.0)) -> torch.Tensor:
    """Rotate by U(-degrees, degrees), scale by U(scale), shift by U(-translate, translate) of the side,
    about the centre, bilinear, black outside (albumentations ``Affine``/``Rotate``, constant border 0)."""
    n, dev = x.shape[0], x.device
    angle = torch.deg2rad(_uniform(n, -degrees, degrees, dev))
    s = _uniform(n, *scale, dev)
    t = _uniform(n * 2, -translate, translate, dev).view(n, 2) * 2  # normalised coordinates span 2
    cos, sin = torch.cos(angle), torch.sin(angle)
    # affine_grid maps output to input coordinates: the inverse of  out = s R in + t
    inv = torch.stack([torch.stack([cos, sin], -1), torch.stack([-sin, cos], -1)], -2) / s[:, None, None]
    theta = torch.cat([inv, -(inv @ t[..., None])], -1)
    identity = torch.eye(2, 3, device=dev).expand(n, 2, 3)
    theta = torch.where(on[:, None, None], theta, identity)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _gaussian_kernel(size: int, device) -> torch.Tensor:
    sigma = 0.3 * ((size - 1) * 0.5 - 1) + 0.8  # OpenCV's sigma for sigma=0, as albumentations uses
    r = torch.arange(size, device=device, dtype=torch.float32) - (size - 1) / 2
    k = torch.exp(-(r ** 2) / (2 * sigma ** 2))
    k = k / k.sum()
    return k[:, None] * k[None, :]


def _motion_kernels(size: int, device) -> torch.Tensor:
    """Line kernels through the centre: horizontal, vertical and the two diagonals."""
    ks = torch.zeros(4, size, size, device=device)
    c = size // 2
    ks[0, c, :] = 1
    ks[1, :, c] = 1
    ks[2] = torch.eye(size, device=device)
    ks[3] = torch.eye(size, device=device).flip(1)
    return ks / size


def _filter(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    size = kernel.shape[-1]
    c = x.shape[1]
    w = kernel.expand(c, 1, size, size)
    return F.conv2d(F.pad(x, [size // 2] * 4, mode="reflect"), w, groups=c)


def _blur(x: torch.Tensor, on: torch.Tensor, motion_share: float) -> torch.Tensor:
    """Gaussian (kernel 3 or 5) or, for a ``motion_share`` of the chosen samples, motion blur."""
    n, dev = x.shape[0], x.device
    size5 = _chance(n, 0.5, dev)
    motion = _chance(n, motion_share, dev)
    out = x
    for size, pick in ((3, ~size5), (5, size5)):
        gauss = _filter(x, _gaussian_kernel(size, dev))
        out = torch.where((on & pick & ~motion)[:, None, None, None], gauss, out)
        if motion_share > 0:
            direction = torch.randint(0, 4, (n,), device=dev)
            for d, kernel in enumerate(_motion_kernels(size, dev)):
                moved = _filter(x, kernel)
                out = torch.where((on & pick & motion & (direction == d))[:, None, None, None], moved, out)
    return out


def _erase(x: torch.Tensor, on: torch.Tensor, scale=(0.02, 0.33), ratio=(0.3, 3.3)) -> torch.Tensor:
    """A black rectangle of U(scale) of the area, aspect log-uniform in ``ratio``, anywhere (``A.Erasing``)."""
    n, _, h, w = x.shape
    dev = x.device
    area = _uniform(n, *scale, dev) * h * w
    aspect = torch.exp(_uniform(n, math.log(ratio[0]), math.log(ratio[1]), dev))
    eh = torch.sqrt(area * aspect).round().clamp(1, h)
    ew = torch.sqrt(area / aspect).round().clamp(1, w)
    top = (torch.rand(n, device=dev) * (h - eh + 1)).floor()
    left = (torch.rand(n, device=dev) * (w - ew + 1)).floor()
    ys = torch.arange(h, device=dev)[None, :, None]
    xs = torch.arange(w, device=dev)[None, None, :]
    box = ((ys >= top[:, None, None]) & (ys < (top + eh)[:, None, None]) &
           (xs >= left[:, None, None]) & (xs < (left + ew)[:, None, None]) & on[:, None, None])
    return x.masked_fill(box[:, None], 0.0)


class BatchAugment(torch.nn.Module):
    """A :func:`helpers.augment.build_transform` recipe on a batch of uint8 images, on their device.

    Args:
        kind: ``"seed"``, ``"nir"`` or ``"eval"`` (resize and normalise only).
        image_size: output side in pixels (input of another size is resized, bilinear).
        mean, std: per-channel normalisation; 1-channel images are repeated to 3 channels
            when ``mean`` has three entries (as ``A.ToRGB``).
        erasing: probability of random erasing (training recipes).

    Call with a (B, C, H, W) uint8 tensor; returns (B, 3 or C, S, S) float32, normalised.
    """

    def __init__(self, kind: str, image_size: int, mean: tuple = IMAGENET_MEAN, std: tuple = IMAGENET_STD,
                 erasing: float = 0.0):
        super().__init__()
        if kind not in RECIPES:
            raise ValueError(f"BatchAugment has the recipes {RECIPES}, not {kind!r} (the 'grefel' recipe moves "
                             "landmarks: it stays on the CPU path)")
        self.kind, self.size, self.erasing = kind, int(image_size), float(erasing)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float()
        n, dev = x.shape[0], x.device
        if x.shape[-2:] != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        if self.kind != "eval":
            flip = _chance(n, 0.5, dev)
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        if self.kind == "seed":  # flip, brightness/contrast 0.3 p .5, rotation 15 p .3, Gaussian blur p .2
            x = self._brightness_contrast(x, 0.5)
            x = _affine(x, _chance(n, 0.3, dev), degrees=15)
            x = _blur(x, _chance(n, 0.2, dev), motion_share=0.0)
        elif self.kind == "nir":  # flip; affine p .7; brightness/contrast p .7; gamma p .5; blur p .3; noise p .3
            x = _affine(x, _chance(n, 0.7, dev), degrees=10, translate=0.06, scale=(0.9, 1.1))
            x = self._brightness_contrast(x, 0.7)
            gamma = _uniform(n, 0.7, 1.5, dev)
            x = torch.where(_chance(n, 0.5, dev)[:, None, None, None],
                            (x / 255).clamp(0, 1).pow(gamma[:, None, None, None]) * 255, x)
            x = _blur(x, _chance(n, 0.3, dev), motion_share=0.5)
            sigma = _uniform(n, 0.02, 0.08, dev) * 255
            noise = torch.randn_like(x) * sigma[:, None, None, None]
            x = torch.where(_chance(n, 0.3, dev)[:, None, None, None], (x + noise).clamp(0, 255), x)
        if self.erasing and self.kind != "eval":
            x = _erase(x, _chance(n, self.erasing, dev))
        if x.shape[1] == 1 and self.mean.shape[1] == 3:
            x = x.expand(-1, 3, -1, -1)
        return (x / 255 - self.mean) / self.std

    @staticmethod
    def _brightness_contrast(x: torch.Tensor, p: float, limit: float = 0.3) -> torch.Tensor:
        """``x * alpha + beta * 255``, alpha = 1 + U(-limit, limit), beta = U(-limit, limit), clipped (albumentations)."""
        n, dev = x.shape[0], x.device
        alpha = 1 + _uniform(n, -limit, limit, dev)
        beta = _uniform(n, -limit, limit, dev) * 255
        adjusted = (x * alpha[:, None, None, None] + beta[:, None, None, None]).clamp(0, 255)
        return torch.where(_chance(n, p, dev)[:, None, None, None], adjusted, x)


def use_device_data(setting, device, dataset, recipe: str, memory_share: float = 0.25) -> tuple[bool, str]:
    """Whether to serve training batches from the device, and why (the reason is printed and recorded).

    ``setting``: True, False or ``"auto"`` (on for CUDA when the split's uint8 images take under
    ``memory_share`` of the free device memory, in one process, with a recipe :class:`BatchAugment`
    has). True where it cannot work stops with the reason.
    """
    from . import distributed

    device = torch.device(device)
    reasons = []
    if recipe not in RECIPES:
        reasons.append(f"the {recipe!r} augmentation has no batched version")
    if distributed.is_distributed():
        reasons.append("torchrun shards batches with a DistributedSampler (one process only for now)")
    if getattr(dataset, "_images", None) is None or dataset.soft_labels or dataset.landmarks:
        reasons.append("the dataset is not an in-memory image/label split")
    if setting is True and reasons:
        raise ValueError(f"data_on_device=True cannot work here: {'; '.join(reasons)}")
    if setting is True:
        return True, "data_on_device=True"
    if setting is False or setting is None:
        return False, "data_on_device=False"
    if setting != "auto":
        raise ValueError(f"data_on_device must be True, False or 'auto', not {setting!r}")
    if device.type != "cuda":
        return False, f"auto: {device.type} (the CPU path: DataLoader workers)"
    if reasons:
        return False, "auto: " + "; ".join(reasons)
    free, _ = torch.cuda.mem_get_info(device)
    size = dataset._images.nbytes
    if size > memory_share * free:
        return False, f"auto: the split's {size / 2**20:.0f} MiB exceed {memory_share:.0%} of the free GPU memory"
    return True, f"auto: CUDA, the split's {size / 2**20:.0f} MiB held on the GPU"


class DeviceBatches:
    """Shuffled, augmented batches of an in-memory :class:`helpers.cache.H5Dataset`, held on ``device``.

    A drop-in for the training DataLoader of :func:`helpers.train.fit` (``len``, iteration,
    ``dataset``): images go to the device once as uint8, each epoch draws a permutation and
    augmentation parameters from torch's generator there (``fit`` reseeds it every epoch).

    Args:
        dataset: an ``H5Dataset`` with ``in_memory=True`` (hard labels).
        augment: a :class:`BatchAugment`.
        batch_size, drop_last: as for a DataLoader.
        device: where the data and the augmentation live.
    """

    sampler = None

    def __init__(self, dataset, augment: BatchAugment, batch_size: int, drop_last: bool, device):
        if getattr(dataset, "_images", None) is None:
            raise ValueError("DeviceBatches needs an H5Dataset built with in_memory=True")
        if dataset.soft_labels or dataset.landmarks:
            raise ValueError("DeviceBatches serves images with hard labels (no landmarks, no soft labels)")
        self.dataset, self.batch_size, self.drop_last = dataset, int(batch_size), drop_last
        self.device = torch.device(device)
        self.images = torch.from_numpy(np.ascontiguousarray(dataset._images)).permute(0, 3, 1, 2).to(self.device)
        self.labels = torch.as_tensor(dataset.labels, dtype=torch.long).to(self.device)
        self.augment = augment.to(self.device)

    @property
    def nbytes(self) -> int:
        return self.images.numel() * self.images.element_size()

    def __len__(self) -> int:
        n = len(self.labels)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self):
        order = torch.randperm(len(self.labels), device=self.device)
        for k in range(len(self)):
            idx = order[k * self.batch_size:(k + 1) * self.batch_size]
            with torch.no_grad():
                x = self.augment(self.images[idx])
            yield x, self.labels[idx]  # outside no_grad: the caller's step runs with gradients

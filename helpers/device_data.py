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

from .augment import FLIP_PERMUTATION_68, IMAGENET_MEAN, IMAGENET_STD

RECIPES = ("seed", "nir", "grefel", "shift", "eval")
LANDMARK_RECIPES = ("grefel", "shift")  # GReFEL's recipes: they move the landmarks with the images


def _uniform(n: int, low: float, high: float, device) -> torch.Tensor:
    return torch.rand(n, device=device) * (high - low) + low


def _chance(n: int, p: float, device) -> torch.Tensor:
    return torch.rand(n, device=device) < p


def _warp(x: torch.Tensor, linear: torch.Tensor, offset: torch.Tensor, points: torch.Tensor | None = None):
    """Warp images by the per-sample map  out = linear @ in + offset  in grid coordinates ([-1, 1] from
    edge to edge, ``align_corners=False``), bilinear, black outside; ``points`` (B, L, 2) in the
    same coordinates follow the same map. Returns the images, or ``(images, points)``."""
    (a, b), (c, d) = linear[:, 0].unbind(-1), linear[:, 1].unbind(-1)   # 2x2 inverse by hand (any backend)
    inv = torch.stack([torch.stack([d, -b], -1), torch.stack([-c, a], -1)], -2) / (a * d - b * c)[:, None, None]
    theta = torch.cat([inv, -(inv @ offset[..., None])], -1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if points is None:
        return out
    return out, points @ linear.transpose(1, 2) + offset[:, None, :]


def _affine(x: torch.Tensor, on: torch.Tensor, degrees: float, translate: float = 0.0,
            scale: tuple[float, float] = (1.0, 1.0), points: torch.Tensor | None = None):
    """Rotate by U(-degrees, degrees), scale by U(scale), shift by U(-translate, translate) of the side,
    about the centre, bilinear, black outside (albumentations ``Affine``/``Rotate``, constant border 0);
    ``points`` in grid coordinates follow (see :func:`_warp`)."""
    n, dev = x.shape[0], x.device
    angle = torch.deg2rad(_uniform(n, -degrees, degrees, dev))
    s = _uniform(n, *scale, dev)
    t = _uniform(n * 2, -translate, translate, dev).view(n, 2) * 2  # normalised coordinates span 2
    cos, sin = torch.cos(angle), torch.sin(angle)
    linear = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2) * s[:, None, None]
    linear = torch.where(on[:, None, None], linear, torch.eye(2, device=dev).expand(n, 2, 2))
    return _warp(x, linear, torch.where(on[:, None], t, torch.zeros_like(t)), points)


def _to_grid(points: torch.Tensor, size: int) -> torch.Tensor:
    """Landmarks as the cache stores them (pixel / side, pixel centres at integers) -> grid coordinates."""
    return (2 * points * size + 1) / size - 1


def _from_grid(points: torch.Tensor, size: int) -> torch.Tensor:
    return ((points + 1) * size / 2 - 0.5) / size


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
        kind: ``"seed"``, ``"nir"``, ``"grefel"``, ``"shift"`` or ``"eval"`` (resize and normalise only).
        image_size: output side in pixels (input of another size is resized, bilinear).
        mean, std: per-channel normalisation; 1-channel images are repeated to 3 channels
            when ``mean`` has three entries (as ``A.ToRGB``).
        erasing: probability of random erasing (training recipes).

    Call with a (B, C, H, W) uint8 tensor; returns (B, 3 or C, S, S) float32, normalised. The
    ``"grefel"`` and ``"shift"`` recipes also take the (B, 68, 2) landmarks (as the cache stores them, in [0, 1])
    and returns ``(images, landmarks)``: the landmarks follow every geometric transform, and a
    flip also swaps their left/right indices, as :class:`helpers.augment.KeypointCompose` does.
    """

    def __init__(self, kind: str, image_size: int, mean: tuple = IMAGENET_MEAN, std: tuple = IMAGENET_STD,
                 erasing: float = 0.0):
        super().__init__()
        if kind not in RECIPES:
            raise ValueError(f"BatchAugment has the recipes {RECIPES}, not {kind!r}")
        self.kind, self.size, self.erasing = kind, int(image_size), float(erasing)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor, landmarks: torch.Tensor | None = None):
        x = images.float()
        n, dev = x.shape[0], x.device
        if x.shape[-2:] != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        if self.kind in LANDMARK_RECIPES:
            if landmarks is None:
                raise ValueError(f"the {self.kind!r} recipe moves landmarks: call it with (images, landmarks)")
            recipe = self._grefel if self.kind == "grefel" else self._shift
            x, points = recipe(x, _to_grid(landmarks.float(), self.size))
            return self._finish(x), _from_grid(points, self.size)
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
        return self._finish(x)

    def _finish(self, x: torch.Tensor) -> torch.Tensor:
        """Random erasing (training recipes), 1 -> 3 channels where the model takes 3, normalisation."""
        if self.erasing and self.kind != "eval":
            x = _erase(x, _chance(x.shape[0], self.erasing, x.device))
        if x.shape[1] == 1 and self.mean.shape[1] == 3:
            x = x.expand(-1, 3, -1, -1)
        return (x / 255 - self.mean) / self.std

    def _grefel(self, x: torch.Tensor, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The GReFEL seed README's recipe: resize to 256/224 of the side and a random crop back, flip
        p .5 (landmark indices mirrored), colour jitter p .8 (brightness and contrast 0.4 in random
        order; saturation and hue do nothing to grey faces), rotation U(-15, 15) p .5."""
        n, dev, size = x.shape[0], x.device, self.size
        k = round(size * 256 / 224) / size
        crop = torch.randint(0, round(size * k) - size + 1, (n, 2), device=dev).float()  # crop corner, px
        flip = _chance(n, 0.5, dev)
        sign = torch.where(flip, -1.0, 1.0)
        linear = torch.diag_embed(torch.stack([sign * k, torch.full_like(sign, k)], -1))
        offset = (k - 1 - 2 * crop / size) * torch.stack([sign, torch.ones_like(sign)], -1)
        x, points = _warp(x, linear, offset, points)
        points = torch.where(flip[:, None, None], points[:, torch.as_tensor(FLIP_PERMUTATION_68, device=dev)], points)
        jitter = _chance(n, 0.8, dev)
        brightness, contrast = _uniform(n, 0.6, 1.4, dev), _uniform(n, 0.6, 1.4, dev)
        first = _chance(n, 0.5, dev)  # brightness before contrast, or after

        def bright(t):
            return (t * brightness[:, None, None, None]).clamp(0, 255)

        def contr(t):
            mean = t.mean((1, 2, 3), keepdim=True)
            return (mean + contrast[:, None, None, None] * (t - mean)).clamp(0, 255)

        jittered = torch.where(first[:, None, None, None], contr(bright(x)), bright(contr(x)))
        x = torch.where(jitter[:, None, None, None], jittered, x)
        return _affine(x, _chance(n, 0.5, dev), degrees=15, points=points)

    @staticmethod
    def _flip(x: torch.Tensor, points: torch.Tensor, flip: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mirror the chosen samples and their landmarks (indices swapped left <-> right)."""
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        mirrored = points[:, torch.as_tensor(FLIP_PERMUTATION_68, device=x.device)] * torch.tensor([-1.0, 1.0],
                                                                                                  device=x.device)
        return x, torch.where(flip[:, None, None], mirrored, points)

    def _shift(self, x: torch.Tensor, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Flip p .5 (landmark indices mirrored), then shift U(-1/8, 1/8) of the side and rotate
        U(-10, 10) deg, always, about the centre; no zoom."""
        x, points = self._flip(x, points, _chance(x.shape[0], 0.5, x.device))
        return _affine(x, torch.ones(x.shape[0], dtype=torch.bool, device=x.device), degrees=10, translate=0.125,
                       points=points)

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
    if getattr(dataset, "_images", None) is None:
        reasons.append("the dataset is not held in memory")
    elif recipe in RECIPES and bool(dataset.landmarks) != (recipe in LANDMARK_RECIPES):
        reasons.append(f"landmarks go with the {LANDMARK_RECIPES} recipes only" if dataset.landmarks
                       else f"the {recipe!r} recipe needs the landmarks")
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
        dataset: an ``H5Dataset`` with ``in_memory=True``; with ``landmarks=True`` batches are
            ``(images, landmarks, y)`` (the ``"grefel"`` and ``"shift"`` recipes move them), with
            ``soft_labels=True`` ``y`` is the vote distribution, as the dataset gives them.
        augment: a :class:`BatchAugment`.
        batch_size, drop_last: as for a DataLoader.
        device: where the data and the augmentation live.
    """

    sampler = None

    def __init__(self, dataset, augment: BatchAugment, batch_size: int, drop_last: bool, device):
        if getattr(dataset, "_images", None) is None:
            raise ValueError("DeviceBatches needs an H5Dataset built with in_memory=True")
        if bool(dataset.landmarks) != (augment.kind in LANDMARK_RECIPES):
            raise ValueError(f"the {augment.kind!r} recipe with landmarks={dataset.landmarks}: landmarks go with "
                             f"the {LANDMARK_RECIPES} recipes, and they need them")
        self.dataset, self.batch_size, self.drop_last = dataset, int(batch_size), drop_last
        self.device = torch.device(device)
        self.images = torch.from_numpy(np.ascontiguousarray(dataset._images)).permute(0, 3, 1, 2).to(self.device)
        self.labels = torch.as_tensor(dataset.labels, dtype=torch.long).to(self.device)
        self.targets = self.labels
        if dataset.soft_labels:  # FER+'s eight emotions' votes, as H5Dataset gives them
            votes = torch.as_tensor(dataset._votes[:, :8], dtype=torch.float32)
            self.targets = (votes / votes.sum(1, keepdim=True).clamp_min(1.0)).to(self.device)
        self.landmarks = (torch.as_tensor(dataset._lm, dtype=torch.float32).to(self.device) if dataset.landmarks
                          else None)
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
                if self.landmarks is None:
                    out = (self.augment(self.images[idx]),)
                else:
                    out = self.augment(self.images[idx], self.landmarks[idx])
            yield *out, self.targets[idx]  # outside no_grad: the caller's step runs with gradients


def training_batches(dataset, recipe: str, image_size: int, norm: dict, erasing: float, batch_size: int,
                     data_on_device, device, num_workers: int = 0, sampler=None, seed: int = 0,
                     progress: bool = True):
    """The training batches of a notebook: on the device (:class:`DeviceBatches` with the batched
    ``recipe``) where :func:`use_device_data` says so, else a DataLoader (``dataset``'s own transform).

    An explicit ``sampler`` (e.g. class-balanced) is a DataLoader feature: with it ``"auto"`` keeps
    the DataLoader and ``True`` is refused. The choice and its reason are printed.

    Returns:
        ``(batches, {"on_device": bool, "why": str})``; incomplete last batches are dropped when
        the split is larger than one batch (no BatchNorm step on a lone sample).
    """
    from .train import make_loader

    if sampler is not None and data_on_device is True:
        raise ValueError("an explicit sampler (e.g. balanced_sampling) needs the DataLoader path: set "
                         "data_on_device=False, or drop the sampler")
    on_device, why = ((False, "a sampler is given: the DataLoader path") if sampler is not None
                      else use_device_data(data_on_device, device, dataset, recipe))
    drop_last = len(dataset) > batch_size
    if on_device:  # the split on the device as uint8, augmented there in batches: no CPU worker in between
        batches = DeviceBatches(dataset, BatchAugment(recipe, image_size, norm["mean"], norm["std"], erasing=erasing),
                                batch_size, drop_last=drop_last, device=device)
    else:
        batches = make_loader(dataset, batch_size, shuffle=True, num_workers=num_workers, device=device,
                              drop_last=drop_last, sampler=sampler, seed=seed)
    if progress:
        print(f"training data: {'on the device, augmented in batches' if on_device else 'DataLoader'} ({why})")
    return batches, {"on_device": on_device, "why": why}

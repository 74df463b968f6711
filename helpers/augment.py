"""Augmentation: albumentations 2.x pipelines for training and evaluation.

Four recipes, sizes as parameters: ``"seed"`` (the DFER-GCViT seed notebook's), ``"nir"``
(for near-infrared in-car frames: shifts, scale and small rotations, brightness, contrast and
gamma, blur, sensor noise), ``"grefel"`` (the GReFEL seed README's: resize to 8/7 of the size,
random crop, flip, colour jitter, rotation), ``"shift"`` (flips, shifts and small rotations at the
test scale, a plain CNN's recipe) and ``"eval"`` (resize and normalise). Landmarks, when given, follow every
geometric transform; on a horizontal flip their indices are also swapped left <-> right
(albumentations moves the points but cannot know that point 36, a left-eye corner, becomes
a right-eye corner).
"""

from __future__ import annotations

import albumentations as A
import cv2
import numpy as np
from albumentations.pytorch import ToTensorV2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _mirror_68() -> np.ndarray:
    """Index permutation that maps the iBUG 68-point scheme onto its mirror image."""
    pairs = [(i, 16 - i) for i in range(8)]                      # jaw
    pairs += [(17 + i, 26 - i) for i in range(5)]                # brows
    pairs += [(31, 35), (32, 34)]                                # nostrils
    pairs += [(36, 45), (37, 44), (38, 43), (39, 42), (40, 47), (41, 46)]  # eyes
    pairs += [(48, 54), (49, 53), (50, 52), (60, 64), (61, 63), (67, 65), (59, 55), (58, 56)]  # mouth
    perm = np.arange(68)
    for a, b in pairs:
        perm[a], perm[b] = b, a
    return perm


FLIP_PERMUTATION_68 = _mirror_68()


class KeypointCompose:
    """An ``A.Compose`` whose horizontal flips also permute keypoint indices.

    Args:
        transforms: albumentations transforms.
        flip_permutation: index permutation applied after a horizontal flip (default: the
            68-point iBUG mirror map).
    """

    def __init__(self, transforms: list, flip_permutation: np.ndarray = FLIP_PERMUTATION_68):
        self.compose = A.Compose(transforms, save_applied_params=True,
                                 keypoint_params=A.KeypointParams(format="xy", remove_invisible=False))
        self.flip_permutation = np.asarray(flip_permutation)

    def __call__(self, image: np.ndarray, keypoints: np.ndarray) -> dict:
        out = self.compose(image=image, keypoints=np.asarray(keypoints, np.float32))
        pts = np.asarray(out["keypoints"], np.float32)
        flips = sum(name == "HorizontalFlip" for name, _ in out.get("applied_transforms", []))
        if flips % 2 and len(pts) == len(self.flip_permutation):
            pts = pts[self.flip_permutation]
        return {"image": out["image"], "keypoints": pts}

    def __repr__(self) -> str:
        return f"KeypointCompose({self.compose!r})"


def seed_transform(transform, seed: int) -> None:
    """Reseed an albumentations pipeline (or a :class:`KeypointCompose` around one); others are left alone."""
    target = getattr(transform, "compose", transform)
    if hasattr(target, "set_random_seed"):
        target.set_random_seed(seed)


def build_transform(kind: str, image_size: int, mean: tuple = IMAGENET_MEAN, std: tuple = IMAGENET_STD,
                    channels: int = 3, keypoints: bool = False, erasing: float = 0.0):
    """An albumentations pipeline ending in normalisation and a C x H x W tensor.

    Args:
        kind: ``"seed"`` (flip 0.5, brightness/contrast 0.3, rotation +-15 deg p 0.3,
            Gaussian blur p 0.2), ``"nir"`` (flip 0.5; shift +-6%, scale 0.9-1.1, rotation
            +-10 deg p 0.7; brightness/contrast 0.3 p 0.7; gamma 0.7-1.5 p 0.5; Gaussian or
            motion blur p 0.3; Gaussian noise p 0.3), ``"grefel"`` (resize to 8/7 size, random crop, flip,
            colour jitter 0.4/0.4/0.4/0.1, rotation 15 deg), ``"shift"`` (flip 0.5; shift +-1/8 of the
            side and rotation +-10 deg, always; no zoom, so faces keep the size ``"eval"`` shows) or
            ``"eval"`` (resize only).
        image_size: output side in pixels.
        mean, std: per-channel normalisation (from the timm data config when a timm model
            is used); for 1-channel input the first entry is used.
        channels: channels of the cached images (1 or 3); 1-channel images are repeated to
            3 when ``mean`` has three entries, so ImageNet-style models accept them.
        keypoints: return a :class:`KeypointCompose` that also moves landmarks (pixels).
        erasing: probability of random erasing (``A.Erasing``: a black rectangle of 2-33% of the
            image, like an occluding hand) in the training recipes; landmarks are kept.

    Returns:
        A callable ``t(image=...)`` (and ``keypoints=...``) returning a dict.
    """
    size = image_size
    rotate = dict(border_mode=cv2.BORDER_CONSTANT, fill=0)
    if kind == "seed":
        geometric = [A.Resize(size, size), A.HorizontalFlip(p=0.5),
                     A.RandomBrightnessContrast(brightness_limit=0.3, contrast_limit=0.3, p=0.5),
                     A.Rotate(limit=15, p=0.3, **rotate), A.GaussianBlur(blur_limit=(3, 5), p=0.2)]
    elif kind == "nir":
        geometric = [A.Resize(size, size), A.HorizontalFlip(p=0.5),
                     A.Affine(translate_percent=(-0.06, 0.06), scale=(0.9, 1.1), rotate=(-10, 10), p=0.7, **rotate),
                     A.RandomBrightnessContrast(brightness_limit=0.3, contrast_limit=0.3, p=0.7),
                     A.RandomGamma(gamma_limit=(70, 150), p=0.5),
                     A.OneOf([A.GaussianBlur(blur_limit=(3, 5)), A.MotionBlur(blur_limit=(3, 5))], p=0.3),
                     A.GaussNoise(std_range=(0.02, 0.08), p=0.3)]
    elif kind == "grefel":
        big = int(round(size * 256 / 224))
        geometric = [A.Resize(big, big), A.RandomCrop(size, size), A.HorizontalFlip(p=0.5),
                     A.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1, p=0.8),
                     A.Rotate(limit=15, p=0.5, **rotate)]
    elif kind == "shift":
        geometric = [A.Resize(size, size), A.HorizontalFlip(p=0.5),
                     A.Affine(translate_percent=(-0.125, 0.125), rotate=(-10, 10), p=1.0, **rotate)]
    elif kind == "eval":
        geometric = [A.Resize(size, size)]
    else:
        raise ValueError(f"kind must be 'seed', 'nir', 'grefel', 'shift' or 'eval', not {kind!r}")
    if erasing and kind != "eval":
        geometric.append(A.Erasing(p=erasing))
    tail = []
    if channels == 1 and len(mean) == 3:
        tail.append(A.ToRGB(p=1.0))
    elif channels == 1:
        mean, std = mean[:1], std[:1]
    tail += [A.Normalize(mean=mean, std=std, max_pixel_value=255.0), ToTensorV2()]
    if keypoints:
        return KeypointCompose(geometric + tail)
    return A.Compose(geometric + tail)

"""Inference and export: predict one image with exactly the training preprocessing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .augment import build_transform
from .data import load_image
from .faces import FaceDetector, crop_face


class Predictor:
    """Image path -> emotion, confidence and all class probabilities.

    Applies the training pipeline: load, detect the face (when training cropped faces),
    :func:`crop_face` with the same margin and no-face policy, the evaluation transform.
    A face crop given as input simply yields a box covering (most of) the image, or the
    no-face policy, which for ``"full"`` keeps the whole crop.

    Args:
        model: a trained classifier returning logits (or a dict with ``final_probs``).
        class_names: label order of the model's outputs.
        preprocess: the cache's preprocessing parameters (``image_size``, ``channels``,
            ``face_crop``, ``margin``, ``square``, ``no_face``).
        mean, std: normalisation used in training.
        device: where the model runs.
    """

    def __init__(self, model: torch.nn.Module, class_names: list[str], preprocess: dict,
                 mean: tuple, std: tuple, device="cpu"):
        self.model = model.to(device).eval()
        self.class_names = list(class_names)
        self.pre = dict(preprocess)
        self.device = device
        self.transform = build_transform("eval", self.pre["image_size"], mean, std, channels=self.pre["channels"])
        self.detector = FaceDetector() if self.pre.get("face_crop") else None

    def crop(self, path: str | Path) -> tuple[np.ndarray, tuple | None]:
        """The preprocessed uint8 crop of an image and the face box used (None if none found)."""
        image = load_image(path, self.pre["channels"])
        found = self.detector.detect_file(path) if self.detector is not None else None
        box = found[0] if found else None
        no_face = self.pre.get("no_face", "full")
        crop = crop_face(image, box, self.pre["image_size"], margin=self.pre.get("margin", 0.25),
                         square=self.pre.get("square", True), no_face="full" if no_face == "drop" else no_face)
        return crop.reshape(crop.shape[0], crop.shape[1], -1), box

    @torch.no_grad()
    def __call__(self, path: str | Path) -> dict:
        """``{"emotion", "confidence", "probabilities": {class: p}, "face_box"}`` for one image."""
        crop, box = self.crop(path)
        x = self.transform(image=crop)["image"][None].to(self.device)
        out = self.model(x)
        probs = (out["final_probs"] if isinstance(out, dict) else out.float().softmax(-1))[0].cpu().numpy()
        k = int(probs.argmax())
        return {"emotion": self.class_names[k], "confidence": float(probs[k]),
                "probabilities": {c: float(p) for c, p in zip(self.class_names, probs)},
                "face_box": None if box is None else [float(v) for v in box]}

"""Data stage 2: face detection, box cache and the face crop shared by training and inference.

Detector: dlib's HOG frontal-face detector (``dlib-bin`` wheel; the model is built into
dlib, so it works offline). Measured on a 1-in-10 sample of the real KMU-FED frames
(1600x1200) on this machine's CPU: at 400 px wide it finds 107/111 faces in 17 ms a frame,
upsampling once finds 110/111 at 68 ms, so :class:`FaceDetector` runs the cheap pass first
and falls back to the slower ones only for frames where it found nothing.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageOps

from .setup import atomic_write, output_lock
from .data import DatasetError

BOX_COLUMNS = ["face_x", "face_y", "face_w", "face_h"]
NO_FACE_POLICIES = ("full", "center", "drop")


def dlib_model_path(name: str) -> Path:
    """Path of a model file shipped by the ``face_recognition_models`` wheel.

    Located by path: importing the package needs ``pkg_resources``, which setuptools 81+
    no longer ships.

    Args:
        name: e.g. ``"shape_predictor_68_face_landmarks.dat"``.
    """
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise DatasetError("face_recognition_models is not installed (pip install -r requirements.txt)")
    path = Path(list(spec.submodule_search_locations)[0]) / "models" / name
    if not path.exists():
        raise DatasetError(f"{path}: dlib model file missing from face_recognition_models")
    return path


class FaceDetector:
    """dlib HOG face detector with a cheap-first cascade of (width, upsample) passes.

    Args:
        passes: ``(width_px, upsample)`` tried in order on the frame resized to that width;
            the first pass that finds a face wins.
    """

    def __init__(self, passes: tuple[tuple[int, int], ...] = ((400, 0), (400, 1), (800, 0))):
        import dlib  # imported here so that modules not detecting faces need no dlib

        self.passes = tuple(tuple(p) for p in passes)
        self._detector = dlib.get_frontal_face_detector()

    @property
    def params(self) -> dict:
        """What the boxes depend on (part of every fingerprint)."""
        return {"detector": "dlib-hog-frontal", "passes": [list(p) for p in self.passes]}

    def detect(self, gray: np.ndarray) -> tuple[tuple[float, float, float, float], float] | None:
        """The largest face in a grayscale frame.

        Args:
            gray: uint8 H x W image at full resolution.

        Returns:
            ``((x, y, w, h), score)`` in the frame's pixel coordinates, or None.
        """
        h, w = gray.shape[:2]
        pil = Image.fromarray(gray)
        for width, upsample in self.passes:
            scale = min(1.0, width / w)
            small = np.asarray(pil.resize((round(w * scale), round(h * scale)), Image.BILINEAR)) \
                if scale < 1 else gray
            rects, scores, _ = self._detector.run(small, upsample, 0.0)
            if len(rects):
                i = max(range(len(rects)), key=lambda k: rects[k].area())
                r = rects[i]
                box = (r.left() / scale, r.top() / scale, r.width() / scale, r.height() / scale)
                return box, float(scores[i])
        return None

    def detect_file(self, path: str | Path) -> tuple[tuple[float, float, float, float], float] | None:
        """:meth:`detect` on an image file, decoded as the box cache does (training and inference agree).

        Returns:
            ``((x, y, w, h), score)`` in the full-resolution image's pixels, or None.
        """
        gray, scale = _load_for_detection(str(path), max(p[0] for p in self.passes))
        found = self.detect(gray)
        if found is None:
            return None
        (x, y, w, h), score = found
        return (x * scale, y * scale, w * scale, h * scale), score


def _load_for_detection(path: str, max_width: int) -> tuple[np.ndarray, float]:
    """Grayscale frame decoded at reduced size (JPEG draft mode) and its scale to full size."""
    with Image.open(path) as im:
        full_w = im.size[1] if im.getexif().get(0x0112, 1) in (5, 6, 7, 8) else im.size[0]
        im.draft("L", (max_width, max_width * im.size[1] // max(im.size[0], 1)))
        im = ImageOps.exif_transpose(im).convert("L")
        return np.asarray(im), full_w / im.size[0]


def detect_faces(index: pd.DataFrame, cache_path: str | Path, detector: FaceDetector | None = None,
                 save_every: int = 100, progress: bool = True) -> pd.DataFrame:
    """Face boxes for every image of an index, cached and resumable.

    Boxes are stored in ``cache_path`` (CSV) keyed by content hash and detector settings
    (boxes of other settings stay in the file, so switching settings back costs nothing);
    a rerun detects only images not in the cache, and the cache is saved atomically every
    ``save_every`` images so that an interrupted run resumes where it stopped.

    Args:
        index: from :func:`helpers.discover_dataset` (needs path, sha1).
        cache_path: CSV file of boxes.
        detector: defaults to :class:`FaceDetector()`.
        save_every: images between cache saves.
        progress: show a tqdm bar.

    Returns:
        A copy of ``index`` with face_x, face_y, face_w, face_h (NaN when no face),
        face_score and face_found.
    """
    from tqdm.auto import tqdm

    detector = detector or FaceDetector()
    cache_path = Path(cache_path)
    key = hashlib.sha1(json.dumps(detector.params, sort_keys=True).encode()).hexdigest()[:12]
    with output_lock(cache_path, "face boxes"):
        columns = ["sha1", "params", *BOX_COLUMNS, "face_score"]
        cached: dict[str, list] = {}
        others = pd.DataFrame(columns=columns)  # boxes of other detector settings: kept, not used
        if cache_path.exists():
            old = pd.read_csv(cache_path, dtype={"sha1": str, "params": str})
            mine = old["params"] == key
            others = old.loc[~mine, columns]
            cached = {r.sha1: [r.face_x, r.face_y, r.face_w, r.face_h, r.face_score] for r in old[mine].itertuples()}
        todo = [r for r in index.drop_duplicates("sha1").itertuples() if r.sha1 not in cached]

        def save():
            frame = pd.DataFrame([[s, key, *v] for s, v in cached.items()], columns=columns)
            frame = pd.concat([others, frame], ignore_index=True) if len(others) else frame
            atomic_write(cache_path, lambda tmp: frame.to_csv(tmp, index=False))

        unreadable = []
        for i, r in enumerate(tqdm(todo, desc="faces", disable=not progress or not todo)):
            try:
                found = detector.detect_file(r.path)
            except (OSError, ValueError, DatasetError) as e:
                # an image that cannot be decoded is not a frame without a face: not cached (tried again next
                # time), counted here and skipped by the cache build; any other error is a bug and stops the run
                unreadable.append((r.path, f"{type(e).__name__}: {e}"))
                continue
            cached[r.sha1] = [np.nan] * 5 if found is None else [*found[0], found[1]]
            if (i + 1) % save_every == 0:
                save()
        if todo or not cache_path.exists():
            save()
        if unreadable:
            warnings.warn(f"face detection: {len(unreadable)} images could not be read (e.g. {unreadable[:2]}); "
                          "they are left out of the box cache", stacklevel=2)
        out = index.copy()
        values = np.array([cached.get(s, [np.nan] * 5) for s in out["sha1"]], dtype=np.float64).reshape(len(out), 5)
        out[BOX_COLUMNS + ["face_score"]] = values
        out["face_found"] = ~np.isnan(values[:, 0])
        return out


def crop_face(image: np.ndarray, box: tuple[float, float, float, float] | None, out_size: int,
              margin: float = 0.25, square: bool = True, no_face: str = "full") -> np.ndarray | None:
    """Crop and resize a face exactly as training does (use the same call at inference).

    Args:
        image: H x W or H x W x C uint8 frame.
        box: ``(x, y, w, h)`` in pixels, or None/NaN when no face was found.
        out_size: side of the square output, in pixels.
        margin: fraction of the box size added on every side.
        square: grow the shorter side so the crop is square (no distortion).
        no_face: without a box, ``"full"`` pads the whole frame to a square, ``"center"``
            takes the central square, ``"drop"`` returns None.

    Returns:
        ``out_size x out_size`` (x C) uint8 image, or None when dropped.
    """
    import cv2

    if no_face not in NO_FACE_POLICIES:
        raise ValueError(f"no_face must be one of {NO_FACE_POLICIES}, not {no_face!r}")
    h, w = image.shape[:2]
    if box is None or not np.isfinite(box[0]):
        if no_face == "drop":
            return None
        side = max(h, w) if no_face == "full" else min(h, w)
        cx, cy = w / 2, h / 2
        x0, y0, x1, y1 = cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2
    else:
        x, y, bw, bh = box
        cx, cy = x + bw / 2, y + bh / 2
        bw, bh = bw * (1 + 2 * margin), bh * (1 + 2 * margin)
        if square:
            bw = bh = max(bw, bh)
        x0, y0, x1, y1 = cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2
    x0, y0, x1, y1 = (int(round(v)) for v in (x0, y0, x1, y1))
    # Pad with black where the crop leaves the frame, so the face stays centred and unscaled.
    pad = max(0, -x0, -y0, x1 - w, y1 - h)
    if pad:
        widths = ((pad, pad), (pad, pad)) + (((0, 0),) if image.ndim == 3 else ())
        image = np.pad(image, widths)
        x0, y0, x1, y1 = x0 + pad, y0 + pad, x1 + pad, y1 + pad
    crop = image[y0:y1, x0:x1]
    interp = cv2.INTER_AREA if crop.shape[0] > out_size else cv2.INTER_LINEAR
    return cv2.resize(crop, (out_size, out_size), interpolation=interp)


class LandmarkDetector:
    """dlib's 68-point shape predictor (iBUG 300-W scheme) on a face crop.

    The model (``shape_predictor_68_face_landmarks.dat`` from ``face_recognition_models``)
    is licensed for non-commercial use only, because it was trained on iBUG 300-W.
    It is run with a fixed box (the crop minus ``inset`` on every side): on face crops
    such as FER+'s it always returns 68 points, in 2-5 ms, without a confidence score.
    A crop is flagged as failed when the points collapse (spread under ``min_spread`` of
    the crop), which is what dlib returns on a frame with no face.

    Args:
        inset: fraction of the crop side between the crop edge and the fixed box.
        min_spread: minimum standard deviation of the points, as a fraction of the side.
    """

    def __init__(self, inset: float = 0.08, min_spread: float = 0.08):
        import dlib

        self.inset, self.min_spread = inset, min_spread
        self.settings = {"model": "dlib shape_predictor_68_face_landmarks", "inset": inset, "min_spread": min_spread}
        self._dlib = dlib
        self._predictor = None  # loaded on the first crop: a cache built elsewhere is reused without the model file

    @property
    def predictor(self):
        if self._predictor is None:
            self._predictor = self._dlib.shape_predictor(str(dlib_model_path("shape_predictor_68_face_landmarks.dat")))
        return self._predictor

    def __call__(self, crop: np.ndarray) -> tuple[np.ndarray, bool]:
        """``(points (68, 2) in crop pixels, ok)`` for a uint8 crop (H x W or H x W x C)."""
        gray = crop if crop.ndim == 2 else crop[..., 0] if crop.shape[-1] == 1 else crop.mean(-1).astype(np.uint8)
        gray = np.ascontiguousarray(gray)
        h, w = gray.shape
        d = int(round(self.inset * min(h, w)))
        shape = self.predictor(gray, self._dlib.rectangle(d, d, w - 1 - d, h - 1 - d))
        pts = np.array([(p.x, p.y) for p in shape.parts()], np.float32)
        ok = bool(pts.std(axis=0).mean() >= self.min_spread * min(h, w))
        return pts, ok

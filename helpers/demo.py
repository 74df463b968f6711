"""Procedural demo datasets for when no real archive is at hand.

Grayscale cartoon faces whose classes differ in mouth, brows, eyes and nose wrinkles, with
per-image jitter so the task is learnable but not trivial, drawn for several synthetic
subjects so subject-independent splits mean something. The writers produce ZIPs laid out
like the real KMU-FED and FERPlus archives, byte-identical for the same arguments.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import cv2
import numpy as np

__all__ = ["DEMO_CLASSES", "KMU_CODES", "FERPLUS_CLASSES", "FERPLUS_VOTE_COLUMNS",
           "make_subjects", "draw_face", "make_demo_kmufed", "make_demo_ferplus"]

DEMO_CLASSES = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
KMU_CODES = {"angry": "AN", "disgust": "DI", "fear": "FE", "happy": "HA", "sad": "SA",
             "surprise": "SU", "neutral": "NE"}
FERPLUS_CLASSES = ("neutral", "happiness", "surprise", "sadness", "anger", "disgust", "fear",
                   "contempt")
FERPLUS_VOTE_COLUMNS = FERPLUS_CLASSES + ("unknown", "NF")

_FEATURES = ("curve", "open", "stretch", "asym", "lip", "brow_angle", "brow_raise", "eye",
             "wrinkle")
# Offsets from a neutral face, in units the drawing code scales by face size. Every class
# differs from every other in at least two features, so no single cue has to carry it.
_EXPRESSIONS = {
    "neutral": {},
    "happy": {"curve": 1.0, "open": 0.35, "stretch": 0.2, "eye": -0.25, "brow_raise": 0.1},
    "sad": {"curve": -0.8, "brow_angle": 0.9, "brow_raise": 0.15, "eye": -0.15},
    "angry": {"curve": -0.45, "stretch": -0.15, "brow_angle": -1.0, "brow_raise": -0.5,
              "eye": -0.3},
    "surprise": {"open": 1.0, "stretch": -0.3, "brow_raise": 1.0, "brow_angle": 0.1, "eye": 0.5},
    "fear": {"open": 0.45, "curve": -0.3, "stretch": 0.3, "brow_angle": 0.8, "brow_raise": 0.6,
             "eye": 0.4},
    "disgust": {"lip": 1.0, "curve": -0.3, "wrinkle": 1.0, "brow_angle": -0.5,
                "brow_raise": -0.3, "eye": -0.35},
    "contempt": {"asym": 1.0, "curve": 0.1, "eye": -0.1},
}
_FERPLUS_TO_DRAW = {"neutral": "neutral", "happiness": "happy", "surprise": "surprise",
                    "sadness": "sad", "anger": "angry", "disgust": "disgust", "fear": "fear",
                    "contempt": "contempt"}
# Roughly FER+'s skew, but with the rare classes lifted so that even a 140-image split has some.
_FERPLUS_SHARE = {"neutral": 0.26, "happiness": 0.22, "surprise": 0.13, "sadness": 0.12,
                  "anger": 0.11, "fear": 0.07, "disgust": 0.045, "contempt": 0.045}
# The class that disagreeing annotators pick most often.
_FERPLUS_CONFUSION = {"neutral": "sadness", "happiness": "neutral", "surprise": "fear",
                      "sadness": "neutral", "anger": "disgust", "disgust": "anger",
                      "fear": "surprise", "contempt": "neutral"}
# Frame-to-frame pose wobble inside one KMU-FED sequence (same units as _random_pose).
_FRAME_JITTER = {"angle": 1.0, "scale": 0.01, "tx": 0.004, "ty": 0.004, "brightness": 0.01}
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)
_SHIFT = 4  # cv2 fixed-point bits: sub-pixel feature positions keep jitter smooth


def make_subjects(num_subjects: int, seed: int) -> list[dict]:
    """Draw per-subject appearance traits.

    Args:
        num_subjects: how many subjects (ids 1..num_subjects).
        seed: random seed; the same seed gives the same subjects.

    Returns:
        One dict per subject: ``id``, ``face_ratio`` (width/height), ``face_scale`` (face
        height / frame height), ``dx``/``dy`` (centre offset, fraction of frame), gray levels
        ``skin``, ``background``, ``hair``, ``shirt``, ``noise_std``, ``hair_volume``,
        ``eye_spacing`` and
        ``mouth_width`` (fractions of face width) and ``bias``, a small resting offset for
        every expression feature.
    """
    if num_subjects < 1:
        raise ValueError(f"num_subjects must be >= 1, got {num_subjects}")
    rng = np.random.default_rng([seed, 0x5B])  # own stream: subjects stay fixed across writers
    subjects = []
    for i in range(num_subjects):
        skin = rng.uniform(115, 200)
        # At least ~45 gray levels between face and background keep the outline visible.
        background = (skin + rng.uniform(45, 70) if skin < 170 and rng.random() < 0.25
                      else max(10.0, skin - rng.uniform(50, 100)))
        subjects.append({
            "id": i + 1, "face_ratio": rng.uniform(0.72, 0.86),
            "face_scale": rng.uniform(0.60, 0.70),
            "dx": rng.uniform(-0.06, 0.06), "dy": rng.uniform(-0.04, 0.04),
            "skin": skin, "background": background, "hair": rng.uniform(15, 75),
            "hair_volume": rng.uniform(0.9, 1.15), "shirt": rng.uniform(40, 200),
            "noise_std": rng.uniform(2.0, 7.0),
            "eye_spacing": rng.uniform(0.36, 0.46), "mouth_width": rng.uniform(0.32, 0.44),
            "bias": {f: float(rng.normal(0, 0.07)) for f in _FEATURES},
        })
    return subjects


def _random_pose(rng: np.random.Generator) -> dict:
    # Keys must match _FRAME_JITTER.
    return {"angle": rng.uniform(-8, 8), "scale": rng.uniform(0.92, 1.08),
            "tx": rng.uniform(-0.03, 0.03), "ty": rng.uniform(-0.03, 0.03),
            "brightness": rng.uniform(0.9, 1.1)}


def _pt(x: float, y: float) -> tuple[int, int]:
    return int(round(x * (1 << _SHIFT))), int(round(y * (1 << _SHIFT)))


def _ellipse(img, c, axes, color, thickness=-1, arc=(0, 360)):
    cv2.ellipse(img, _pt(*c), _pt(*axes), 0, arc[0], arc[1], float(color), thickness,
                cv2.LINE_AA, _SHIFT)


def _poly(img, pts, color, thickness, fill=False):
    pts = np.round(np.asarray(pts, dtype=float) * (1 << _SHIFT)).astype(np.int32)[None]
    if fill:
        cv2.fillPoly(img, pts, float(color), cv2.LINE_AA, _SHIFT)
    else:
        cv2.polylines(img, pts, False, float(color), thickness, cv2.LINE_AA, _SHIFT)


def _background(rng: np.random.Generator, level: float, w: int, h: int) -> np.ndarray:
    theta = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[-1:1:complex(0, h), -1:1:complex(0, w)]
    return (level + 18 * (xx * np.cos(theta) + yy * np.sin(theta))).astype(np.float32)


def _finish(img: np.ndarray, rng: np.random.Generator, width: int, height: int,
            brightness: float, noise_std: float) -> np.ndarray:
    img = cv2.resize(img, (width, height), interpolation=cv2.INTER_AREA) * brightness
    img = cv2.GaussianBlur(img, (0, 0), 0.5)
    img = img + rng.normal(0, noise_std, img.shape)
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def draw_face(label: str, subject: dict, rng: np.random.Generator, width: int, height: int,
              *, intensity: float | None = None, pose: dict | None = None,
              crop: bool = False) -> np.ndarray:
    """Render one grayscale cartoon face showing an expression.

    Args:
        label: a name in ``DEMO_CLASSES``, ``"contempt"``, or a FER+ name (``"happiness"``...).
        subject: one dict from ``make_subjects``.
        rng: source of the per-image jitter.
        width: output width in pixels.
        height: output height in pixels.
        intensity: expression strength (1 = typical); random in [0.6, 1.1] when None.
        pose: ``angle`` (deg), ``scale``, ``tx``/``ty`` (fraction of frame), ``brightness``;
            random (within +-8 deg, +-8 %, +-3 %, +-10 %) when None.
        crop: render a tight face crop (face fills the frame, subject offset damped) as
            FER-style datasets ship, instead of a head-and-shoulders frame.

    Returns:
        uint8 array of shape (height, width).
    """
    label = _FERPLUS_TO_DRAW.get(label, label)
    if label not in _EXPRESSIONS:
        raise ValueError(f"unknown expression {label!r}; known: {sorted(_EXPRESSIONS)}")
    intensity = rng.uniform(0.6, 1.1) if intensity is None else intensity
    pose = _random_pose(rng) if pose is None else pose
    ss = max(2, math.ceil(192 / max(width, height)))  # supersample so thin lines survive 48 px
    W, H = width * ss, height * ss
    e = {f: subject["bias"][f] + intensity * _EXPRESSIONS[label].get(f, 0.0)
         + rng.normal(0, 0.08) for f in _FEATURES}
    skin, hair, hv = subject["skin"], subject["hair"], subject["hair_volume"]
    ink, damp = skin * 0.3, 0.3 if crop else 1.0  # a face detector would have centred the crop
    fh = H * (0.95 * subject["face_scale"] / 0.65 if crop else subject["face_scale"])
    fw, lw = fh * subject["face_ratio"], max(1, round(0.022 * fh))
    cx = W / 2 + subject["dx"] * W * damp
    cy = H * (0.5 if crop else 0.46) + subject["dy"] * H * damp
    img = _background(rng, subject["background"], W, H)

    if not crop:  # neck and shoulders, so the full frame still reads as a portrait
        _ellipse(img, (cx, cy + 1.05 * fh), (1.1 * fw, 0.45 * fh), subject["shirt"])
        cv2.rectangle(img, _pt(cx - 0.22 * fw, cy + 0.3 * fh),
                      _pt(cx + 0.22 * fw, cy + 0.75 * fh), skin * 0.85, -1, cv2.LINE_AA, _SHIFT)
    _ellipse(img, (cx, cy - 0.08 * fh * hv), (0.55 * fw * hv, 0.56 * fh * hv), hair)
    for s in (-1, 1):
        _ellipse(img, (cx + s * 0.5 * fw, cy), (0.07 * fw, 0.12 * fh), skin * 0.9)
    _ellipse(img, (cx, cy), (fw / 2, fh / 2), skin)
    _ellipse(img, (cx, cy - 0.5 * fh), (0.5 * fw, 0.16 * fh), hair)  # fringe / hairline

    eye_y = cy - 0.06 * fh
    ew, eh = 0.1 * fw, 0.05 * fh * float(np.clip(1 + e["eye"], 0.2, 2.2))
    for s in (-1, 1):
        ex = cx + s * subject["eye_spacing"] * fw / 2
        _ellipse(img, (ex, eye_y), (ew, eh), min(255.0, skin + 45))
        _ellipse(img, (ex, eye_y), (0.04 * fh, min(0.04 * fh, eh)), ink * 0.5)
        _ellipse(img, (ex, eye_y), (ew, eh), ink, max(1, lw - 1))
        # Brows: inner end (toward the nose) rises with brow_angle > 0 (sad/fear).
        base = eye_y - 0.1 * fh - e["brow_raise"] * 0.05 * fh
        xin, xout = ex - s * ew, ex + s * 1.3 * ew
        yin, yout = base - e["brow_angle"] * 0.045 * fh, base + e["brow_angle"] * 0.01 * fh
        ymid = (yin + yout) / 2 - 0.012 * fh * (1 + max(e["brow_raise"], 0))
        _poly(img, [(xin, yin), ((xin + xout) / 2, ymid), (xout, yout)], ink, round(lw * 1.4))

    thin = max(1, lw // 2)
    _poly(img, [(cx, eye_y + 0.04 * fh), (cx + 0.015 * fw, cy + 0.1 * fh), (cx, cy + 0.13 * fh)],
          skin * 0.65, thin)
    _ellipse(img, (cx, cy + 0.12 * fh), (0.06 * fw, 0.025 * fh), ink * 1.5, thin, (10, 170))
    if e["wrinkle"] > 0.35:  # disgust: bridge wrinkles and deep nasolabial folds
        for k in range(3):
            _ellipse(img, (cx, eye_y + (0.04 + 0.025 * k) * fh), (0.06 * fw, 0.012 * fh),
                     ink * 1.4, thin, (200, 340))
        for s in (-1, 1):
            _poly(img, [(cx + s * 0.08 * fw, cy + 0.1 * fh), (cx + s * 0.2 * fw, cy + 0.26 * fh)],
                  ink * 1.3, max(1, lw - 1))

    # Mouth: smile lifts both corners, contempt only the right one, disgust raises the upper
    # lip off-centre. 'open' has a dead zone so jitter alone never parts the lips.
    t = np.linspace(-1, 1, 25)
    xs = cx + subject["mouth_width"] * fw / 2 * (1 + 0.3 * e["stretch"]) * t
    mid = cy + 0.3 * fh - e["curve"] * 0.055 * fh * t ** 2 \
        - e["asym"] * 0.09 * fh * np.clip(t, 0, None) ** 2
    oh, shape = max(e["open"] - 0.12, 0) * 0.22 * fh, (1 - t ** 2) ** 0.6
    up = mid - 0.35 * oh * shape - max(e["lip"], 0) * 0.05 * fh * np.exp(-((t - 0.35) / 0.35) ** 2)
    lo = mid + 0.65 * oh * shape
    if np.max(lo - up) > 0.02 * fh:
        _poly(img, np.concatenate([np.stack([xs, up], 1), np.stack([xs, lo], 1)[::-1]]),
              skin * 0.15, 0, fill=True)
        _poly(img, np.stack([xs, up], 1), ink, lw)
        _poly(img, np.stack([xs, lo], 1), ink, lw)
    else:
        _poly(img, np.stack([xs, mid], 1), ink, lw)

    m = cv2.getRotationMatrix2D((cx, cy), pose["angle"], pose["scale"])
    m[:, 2] += (pose["tx"] * W, pose["ty"] * H)
    img = cv2.warpAffine(img, m, (W, H), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT101)
    return _finish(img, rng, width, height, pose["brightness"], subject["noise_std"])


def _draw_nonface(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A face-free clutter image, standing in for FER2013's 'not a face' rows."""
    size = np.array([width, height]) * 4
    img = _background(rng, rng.uniform(40, 200), *size)
    for _ in range(rng.integers(2, 6)):
        _ellipse(img, tuple(rng.uniform(0, 1, 2) * size), tuple(rng.uniform(0.05, 0.5, 2) * size),
                 rng.uniform(0, 255))
    return _finish(img, rng, width, height, 1.0, rng.uniform(2, 8))


def _encode(ext: str, img: np.ndarray, params: list[int]) -> bytes:
    ok, buf = cv2.imencode(ext, img, params)
    if not ok:
        raise RuntimeError(f"cv2 could not encode a {ext} image")
    return buf.tobytes()


def _write_zip(path: str | Path, entries: Iterable[tuple[str, bytes]]) -> Path:
    """Write entries deterministically to a temp file beside ``path``, then swap it in."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh, zipfile.ZipFile(fh, "w") as zf:
            for name, data in entries:
                info = zipfile.ZipInfo(name, date_time=_ZIP_DATE)
                # Images are already compressed; deflating them only costs time.
                info.compress_type = (zipfile.ZIP_DEFLATED if name.endswith(".csv")
                                      else zipfile.ZIP_STORED)
                info.create_system, info.external_attr = 3, 0o644 << 16
                zf.writestr(info, data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def make_demo_kmufed(path: str | Path, num_subjects: int = 6, frames_per_class: int = 10,
                     classes: tuple = DEMO_CLASSES[:6], image_size: tuple[int, int] = (192, 144),
                     seed: int = 0) -> Path:
    """Write a KMU-FED-like ZIP: ``KMU-FED/<class>/<SS>_<CODE>_d<SS>_<NNN>.jpg``.

    Each subject x class is a short sequence: one base pose and intensity, small frame-to-frame
    jitter. Images are 3-channel JPEGs with R == G == B, like the near-infrared originals.

    Args:
        path: where the ZIP goes (parent folders are created).
        num_subjects: subjects, numbered 01, 02, ...
        frames_per_class: frames per subject and class (NNN runs 001.. within a sequence).
        classes: class names, each a key of ``KMU_CODES``.
        image_size: (width, height) of every frame.
        seed: random seed; equal arguments give a byte-identical ZIP.

    Returns:
        ``Path(path)``.
    """
    unknown = [c for c in classes if c not in KMU_CODES]
    if unknown:
        raise ValueError(f"no KMU-FED code for {unknown}; known: {list(KMU_CODES)}")
    width, height = image_size
    subjects = make_subjects(num_subjects, seed)

    def entries() -> Iterator[tuple[str, bytes]]:
        for label in classes:
            for subj in subjects:
                # Seeded per sequence so a sequence does not change when other classes are added.
                rng = np.random.default_rng([seed, subj["id"], DEMO_CLASSES.index(label)])
                base_pose, base_intensity = _random_pose(rng), rng.uniform(0.75, 1.1)
                for frame in range(1, frames_per_class + 1):
                    pose = {k: v + rng.normal(0, _FRAME_JITTER[k]) for k, v in base_pose.items()}
                    gray = draw_face(label, subj, rng, width, height,
                                     intensity=base_intensity + rng.normal(0, 0.03), pose=pose)
                    sid = f"{subj['id']:02d}"
                    yield (f"KMU-FED/{label}/{sid}_{KMU_CODES[label]}_d{sid}_{frame:03d}.jpg",
                           _encode(".jpg", cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR),
                                   [cv2.IMWRITE_JPEG_QUALITY, 92]))

    return _write_zip(path, entries())


def _allocate(n: int, shares: np.ndarray) -> np.ndarray:
    """Split n into integer counts by largest remainder, giving every class >= 1 when possible."""
    raw = n * shares / shares.sum()
    counts = np.floor(raw).astype(int)
    counts[np.argsort(-(raw - counts), kind="stable")[: n - counts.sum()]] += 1
    while n >= len(counts) and (counts == 0).any():
        counts[np.argmax(counts)] -= 1
        counts[np.argmin(counts)] += 1
    return counts


def _votes(true: str, kind: str, classes: tuple, rng: np.random.Generator) -> np.ndarray:
    """Ten annotator votes in ``FERPLUS_VOTE_COLUMNS`` order; kind is 'face', 'unknown' or 'NF'."""
    col = FERPLUS_VOTE_COLUMNS.index
    v = np.zeros(len(FERPLUS_VOTE_COLUMNS), dtype=int)
    conf = _FERPLUS_CONFUSION[true]
    others = [c for c in classes if c != true]
    if conf not in classes:
        conf = others[0] if others else "unknown"
    if kind == "NF":  # the rest of the votes go to 'unknown'
        v[col("NF")] = rng.integers(7, 11)
        v[col("unknown")] = 10 - v.sum()
    elif kind == "unknown":
        v[col("unknown")] = rng.integers(6, 9)
    else:
        v[col(true)] = rng.choice([6, 7, 8, 9, 10], p=[0.15, 0.25, 0.3, 0.2, 0.1])
    for _ in range(10 - v.sum()):
        r = rng.random()
        pick = true if kind == "unknown" and r < 0.5 else conf if r < 0.75 or not others \
            else others[rng.integers(len(others))] if r < 0.92 else "unknown"
        v[col(pick)] += 1
    return v


def make_demo_ferplus(path: str | Path, num_train: int = 560, num_val: int = 140,
                      num_test: int = 140, classes: tuple = FERPLUS_CLASSES,
                      num_subjects: int = 10, seed: int = 0) -> Path:
    """Write a FERPlus-like ZIP of 48x48 grayscale PNG face crops with 10-annotator votes.

    Layout: ``FERPlus/data/FER2013{Train,Valid,Test}/ferNNNNNNN.png`` (NNNNNNN numbered across
    train, val, test), a header-less ``label.csv`` per split (name, ``"(0, 0, 48, 48)"``, ten
    vote counts) and ``FERPlus/fer2013new.csv`` with a header and Usage column. About 3 % of
    rows have an 'unknown' majority and 1 % an 'NF' (not a face) majority, as in the real data.

    Args:
        path: where the ZIP goes (parent folders are created).
        num_train: images in FER2013Train (Usage ``Training``).
        num_val: images in FER2013Valid (``PublicTest``).
        num_test: images in FER2013Test (``PrivateTest``).
        classes: FER+ class names to draw, a subset of ``FERPLUS_CLASSES``.
        num_subjects: synthetic subjects the faces are drawn from.
        seed: random seed; equal arguments give a byte-identical ZIP.

    Returns:
        ``Path(path)``.
    """
    unknown = [c for c in classes if c not in FERPLUS_CLASSES]
    if unknown or not classes:
        raise ValueError(f"classes must be a non-empty subset of {FERPLUS_CLASSES}: {unknown}")
    classes = tuple(c for c in FERPLUS_CLASSES if c in classes)  # vote-column order
    subjects = make_subjects(num_subjects, seed)
    shares = np.array([_FERPLUS_SHARE[c] for c in classes])
    splits = [("FER2013Train", "Training", num_train), ("FER2013Valid", "PublicTest", num_val),
              ("FER2013Test", "PrivateTest", num_test)]

    def entries() -> Iterator[tuple[str, bytes]]:
        rng = np.random.default_rng([seed, 0xFE2])
        master, row = ["Usage,Image name," + ",".join(FERPLUS_VOTE_COLUMNS)], 0
        for folder, usage, n in splits:
            labels = np.repeat(np.array(classes), _allocate(n, shares)) if n else np.array([], str)
            rng.shuffle(labels)
            kinds = np.full(n, "face", dtype=object)
            # Only relabel images of well-stocked classes, so rare classes keep a real majority.
            ok = np.flatnonzero([np.sum(labels == lab) >= 5 for lab in labels])
            n_unk, n_nf = round(0.03 * n), round(0.01 * n)
            special = rng.permutation(ok)[: n_unk + n_nf]
            kinds[special[:n_unk]], kinds[special[n_unk:]] = "unknown", "NF"
            rows = []
            for label, kind in zip(labels, kinds):
                name = f"fer{row:07d}.png"
                if kind == "NF":
                    gray = _draw_nonface(rng, 48, 48)
                else:
                    subj = subjects[rng.integers(len(subjects))]
                    # 'unknown' faces are faint, hence ambiguous, expressions.
                    lo, hi = (0.2, 0.45) if kind == "unknown" else (0.55, 1.1)
                    gray = draw_face(label, subj, rng, 48, 48, intensity=rng.uniform(lo, hi),
                                     crop=True)
                yield (f"FERPlus/data/{folder}/{name}",
                       _encode(".png", gray, [cv2.IMWRITE_PNG_COMPRESSION, 6]))
                votes = ",".join(str(x) for x in _votes(str(label), kind, classes, rng))
                rows.append(f'{name},"(0, 0, 48, 48)",{votes}')
                master.append(f"{usage},{name},{votes}")
                row += 1
            if rows:  # an empty label.csv would only trip CSV readers; leave the split out
                yield f"FERPlus/data/{folder}/label.csv", "".join(r + "\n" for r in rows).encode()
        yield "FERPlus/fer2013new.csv", "".join(r + "\n" for r in master).encode()

    return _write_zip(path, entries())

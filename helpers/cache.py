"""Data stage 3: the HDF5 cache (streamed, fingerprinted, atomic) and a PyTorch Dataset over it.

One file per dataset and preprocessing: ``images`` (N x S x S x C uint8, chunked by sample),
``labels``, per-row metadata (split, subject, group, rel_path, sha1, duplicate_of, face box)
and optional ``votes`` / ``landmarks``; class names, preprocessing parameters, the build
report and the fingerprint live in the attributes.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import h5py
import numpy as np
import pandas as pd

from .augment import seed_transform
from .setup import atomic_write, output_lock
from .data import DatasetError, load_image
from .faces import BOX_COLUMNS, NO_FACE_POLICIES, crop_face

CACHE_VERSION = 1
META_COLUMNS = ["split", "subject", "group", "rel_path", "sha1", "duplicate_of"]


def cache_fingerprint(index: pd.DataFrame, params: dict, extra_columns: tuple[str, ...] = ()) -> str:
    """Hash of everything that gives a cached row its meaning: the source files (path, size,
    content hash), labels, splits, subjects, groups, duplicate flags, face boxes, the extra
    column groups stored with the images (e.g. FER+'s ``votes_*``) and the parameters
    (preprocessing, landmark model and settings).

    Content hashes rather than mtimes: re-extracting an unchanged archive resets mtimes but
    must not force a rebuild; a changed file changes its hash and does.
    """
    extras = [c for name in extra_columns for c in index.columns if c.startswith(name + "_")]
    cols = [c for c in ["rel_path", "size_bytes", "sha1", "label", "split", "subject", "group", "duplicate_of",
                        *BOX_COLUMNS, *extras] if c in index]
    rows = ["|".join(f"{v:.2f}" if isinstance(v, float) else str(v) for v in row)
            for row in index[cols].itertuples(index=False)]
    h = hashlib.sha256()
    h.update(json.dumps({"version": CACHE_VERSION, **params}, sort_keys=True, default=str).encode())
    h.update("\n".join(rows).encode())
    return h.hexdigest()


def build_hdf5_cache(index: pd.DataFrame, out_path: str | Path, class_names: list[str], image_size: int,
                     channels: int = 1, face_crop: bool = True, margin: float = 0.25, square: bool = True,
                     no_face: str = "full", extra_columns: tuple[str, ...] = (),
                     chunk_size: int = 128, num_threads: int = 2,
                     landmarker: Callable[[np.ndarray], tuple[np.ndarray, bool]] | None = None,
                     on_chunk: Callable[[int], None] | None = None, progress: bool = True) -> Path:
    """Crop, resize and store every image of an index in one HDF5 file, or reuse it.

    The build streams ``chunk_size`` images at a time (memory stays bounded whatever the
    dataset size) into ``<out_path>.partial-<pid>-<random>``, renamed to ``out_path`` only when complete
    (an inter-process lock on ``out_path`` lets one run build it while others wait, then reuse it).
    An existing file with the same fingerprint is reused. Unreadable images are skipped
    with a warning and listed in the build report (``attrs["report"]``).

    Args:
        index: rows to cache (from :func:`discover_dataset` / :func:`detect_faces`); labels
            must be in ``class_names``.
        out_path: the ``.h5`` file.
        class_names: label order; ``labels[i]`` indexes it.
        image_size: side of the stored square images, in pixels.
        channels: 1 (grayscale) or 3.
        face_crop: crop to the face box columns (face_x, ...) when present.
        margin, square, no_face: passed to :func:`crop_face`.
        extra_columns: names of numeric column groups to store: for a name such as
            ``"votes"``, every index column ``votes_*`` goes, in order, into one
            ``(N, k)`` float32 dataset ``votes``.
        chunk_size: images per write.
        num_threads: decoding threads (PIL and OpenCV release the GIL).
        landmarker: optional function crop -> ``(points (K, 2) in crop pixels, ok)``; the
            points are stored normalised to [0, 1] in ``landmarks`` with ``landmarks_ok``.
        on_chunk: called with the number of images written after each chunk (tests use it
            to kill a build midway).
        progress: show a tqdm bar.

    Returns:
        ``out_path``.
    """
    out_path = Path(out_path)
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, not {channels}")
    if no_face not in NO_FACE_POLICIES:
        raise ValueError(f"no_face must be one of {NO_FACE_POLICIES}, not {no_face!r}")
    unknown = sorted(set(index["label"]) - set(class_names))
    if unknown:
        raise DatasetError(f"labels {unknown} are not in class_names {class_names}")
    has_boxes = face_crop and all(c in index for c in BOX_COLUMNS)
    params = {"image_size": image_size, "channels": channels, "face_crop": has_boxes, "margin": margin,
              "square": square, "no_face": no_face, "class_names": list(class_names),
              "extra_columns": list(extra_columns),
              "landmarks": None if landmarker is None else getattr(landmarker, "settings", repr(landmarker))}
    with output_lock(out_path, "HDF5 cache"):
        fingerprint = cache_fingerprint(index, params, tuple(extra_columns))
        if out_path.exists():
            try:
                with h5py.File(out_path, "r") as f:
                    if f.attrs.get("fingerprint") == fingerprint:
                        if progress:
                            print(f"Reusing cache {out_path} ({f['labels'].shape[0]} images, fingerprint matches)")
                        return out_path
            except OSError:
                pass  # unreadable: rebuild
            if progress:
                print(f"Cache {out_path} is out of date: rebuilding")

        for stale in out_path.parent.glob(out_path.name + ".partial-*"):  # left by killed builds; we hold the lock
            stale.unlink()
        report = {}
        atomic_write(out_path, lambda tmp: report.update(_write_cache(
            tmp, index, params, fingerprint, landmarker, chunk_size, num_threads, on_chunk, progress)), tag="partial")
        if progress:
            print(f"Cached {report['num_cached']}/{report['num_source']} images to {out_path} "
                  f"({len(report['skipped'])} skipped, {report['no_face']} without a face)")
        return out_path


def _write_cache(tmp: Path, index: pd.DataFrame, params: dict, fingerprint: str, landmarker, chunk_size: int,
                 num_threads: int, on_chunk, progress: bool) -> dict:
    """Write the cache file ``tmp`` as ``params`` (from :func:`build_hdf5_cache`) say; returns the build report."""
    from tqdm.auto import tqdm

    n, s, c, class_names = len(index), params["image_size"], params["channels"], params["class_names"]
    has_boxes, margin, square, no_face = params["face_crop"], params["margin"], params["square"], params["no_face"]
    class_to_id = {label: i for i, label in enumerate(class_names)}
    rows = index.reset_index(drop=True)
    boxes = rows[BOX_COLUMNS].to_numpy(np.float64) if has_boxes else np.full((n, 4), np.nan)
    extras = {col: rows[[k for k in rows.columns if k.startswith(col + "_")]].to_numpy(np.float32)
              for col in params["extra_columns"]}
    skipped, kept, no_face_count = [], [], 0
    lm_points, lm_ok = [], []

    def prepare(i: int) -> np.ndarray | None | str:
        try:
            image = load_image(rows.at[i, "path"], c)
        except DatasetError as e:
            return str(e)
        # Without detection the whole image is fitted, as the "full" policy does.
        return crop_face(image, tuple(boxes[i]) if has_boxes else None, s, margin=margin, square=square,
                         no_face=no_face if has_boxes else "full")

    with h5py.File(tmp, "w") as f:
        images = f.create_dataset("images", shape=(n, s, s, c), maxshape=(None, s, s, c), dtype="uint8",
                                  chunks=(1, s, s, c))
        written = 0
        bar = tqdm(total=n, desc="HDF5 cache", disable=not progress)
        with ThreadPoolExecutor(max(1, num_threads)) as pool:
            for start in range(0, n, chunk_size):
                ids = range(start, min(n, start + chunk_size))
                batch = []
                for i, result in zip(ids, pool.map(prepare, ids)):
                    if isinstance(result, str):
                        warnings.warn(f"skipping unreadable image: {result}")
                        skipped.append((rows.at[i, "path"], result))
                        continue
                    if has_boxes and not np.isfinite(boxes[i, 0]):
                        no_face_count += 1
                        if result is None:
                            skipped.append((rows.at[i, "path"], "no face found (policy: drop)"))
                            continue
                    batch.append(result.reshape(s, s, c))
                    kept.append(i)
                    if landmarker is not None:
                        pts, ok = landmarker(result)
                        lm_points.append(np.asarray(pts, np.float32) / s)
                        lm_ok.append(bool(ok))
                if batch:
                    images[written:written + len(batch)] = np.stack(batch)
                    written += len(batch)
                bar.update(len(ids))
                if on_chunk is not None:
                    on_chunk(written)
        bar.close()
        images.resize(written, axis=0)
        kept_rows = rows.iloc[kept]
        f.create_dataset("labels", data=np.array([class_to_id[x] for x in kept_rows["label"]], np.int64))
        for col in META_COLUMNS:
            values = kept_rows[col].fillna("").astype(str).tolist() if col in kept_rows else [""] * written
            f.create_dataset(col, data=np.array(values, dtype=object), dtype=h5py.string_dtype())
        f.create_dataset("face_box", data=boxes[kept].astype(np.float32))
        for col, values in extras.items():
            f.create_dataset(col, data=values[kept])
        if landmarker is not None:
            f.create_dataset("landmarks", data=np.stack(lm_points) if lm_points else np.zeros((0, 68, 2), np.float32))
            f.create_dataset("landmarks_ok", data=np.array(lm_ok, bool))
        report = {"num_source": n, "num_cached": written, "skipped": skipped,
                  "no_face": no_face_count, "no_face_policy": no_face if has_boxes else "n/a (no detection)"}
        f.attrs.update({"fingerprint": fingerprint, "version": CACHE_VERSION, "class_names": json.dumps(class_names),
                        "preprocess": json.dumps(params), "report": json.dumps(report)})
    return report


def read_cache_meta(path: str | Path) -> tuple[pd.DataFrame, dict]:
    """Per-image metadata (label, split, subject, ...) and attributes of a cache file.

    Returns:
        ``(meta, attrs)``: meta has one row per cached image (label is the class index);
        attrs has class_names, preprocess and report decoded from JSON.
    """
    with h5py.File(path, "r") as f:
        meta = pd.DataFrame({"label": f["labels"][:]})
        for col in META_COLUMNS:
            meta[col] = f[col].asstr()[:]
        attrs = {k: json.loads(f.attrs[k]) for k in ("class_names", "preprocess", "report")}
        attrs["fingerprint"] = f.attrs["fingerprint"]
    return meta, attrs


def read_cache_votes(path: str | Path, indices: np.ndarray | None = None) -> np.ndarray | None:
    """The cached vote counts (FER+: ``(N, 10)``, the columns of :data:`helpers.data.VOTE_COLUMNS`) of the
    rows ``indices`` (default: all), or None where the cache holds no votes."""
    with h5py.File(path, "r") as f:
        if "votes" not in f:
            return None
        votes = f["votes"][:]
    return votes if indices is None else votes[np.asarray(indices, dtype=np.int64)]


def stored_fingerprint(path: str | Path) -> str:
    """The fingerprint a cache file was built with (its data and settings), without reading its images or metadata."""
    with h5py.File(path, "r") as f:
        return str(f.attrs["fingerprint"])


def _to_tensor(x: np.ndarray):
    """H x W x C uint8 -> C x H x W float tensor in [0, 1] (no transform given)."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(x)).permute(2, 0, 1).float() / 255


class H5Dataset:
    """PyTorch map-style dataset over a cache file.

    The HDF5 file is opened lazily in the process that reads it, so each DataLoader
    worker gets its own handle (h5py handles must not cross a fork).

    Args:
        path: the cache file.
        indices: rows to expose (default: all).
        transform: albumentations pipeline (called as ``transform(image=...)``) returning a
            tensor; None gives a float tensor in [0, 1], C x H x W.
        in_memory: load the selected images into RAM once (small datasets).
        landmarks: also return the normalised landmarks (and pass them to the transform
            as keypoints in pixels).
        soft_labels: return the vote distribution over FER+'s eight emotions (float32, sums to
            1; the unknown and not-a-face votes left out) instead of the class index.
    """

    def __init__(self, path: str | Path, indices: np.ndarray | None = None, transform=None,
                 in_memory: bool = False, landmarks: bool = False, soft_labels: bool = False):
        self.path = str(path)
        self.transform = transform
        self.landmarks = landmarks
        self.soft_labels = soft_labels
        with h5py.File(self.path, "r") as f:
            n = f["labels"].shape[0]
            self.indices = np.arange(n) if indices is None else np.asarray(indices, dtype=np.int64)
            self.labels = f["labels"][:][self.indices]
            self.class_names = json.loads(f.attrs["class_names"])
            self._images = f["images"][np.sort(self.indices)] if in_memory else None
            self._lm = f["landmarks"][:][self.indices] if landmarks else None
            self._votes = f["votes"][:][self.indices] if soft_labels else None
        if in_memory:  # rows were read in sorted order; put them back in index order
            order = np.argsort(np.argsort(self.indices))
            self._images = self._images[order]
        self._h5, self._pid = None, None
        import torch

        # the epoch's seed, in shared memory so that persistent DataLoader workers see each new one
        self._epoch_seed = torch.full((1,), -1, dtype=torch.int64).share_memory_()

    def set_epoch_seed(self, seed: int) -> None:
        """Seed the augmentation of every item from ``(seed, row)``: an item's augmentation then depends on
        the epoch and the item alone, not on which worker loads it, how many workers there are or whether
        they persist across epochs (``fit`` calls this every epoch; exact resume relies on it)."""
        self._epoch_seed[0] = int(seed)

    def __len__(self) -> int:
        return len(self.indices)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_h5"] = None  # never pickle an open handle into a worker
        return state

    def _file(self) -> h5py.File:
        if self._h5 is None or self._pid != os.getpid():
            self._h5, self._pid = h5py.File(self.path, "r"), os.getpid()
        return self._h5

    def image(self, i: int) -> np.ndarray:
        """The stored uint8 image of item ``i`` (H x W x C), before any transform."""
        return self._images[i] if self._images is not None else self._file()["images"][self.indices[i]]

    def __getitem__(self, i: int):
        import torch

        x = self.image(i)
        seed = int(self._epoch_seed[0])
        if seed >= 0:
            seed_transform(self.transform, (seed * 1_000_003 + int(self.indices[i])) % 2**32)
        if self.soft_labels:  # FER+'s eight emotions' votes (unknown / not-a-face left out), as float32
            emotions = self._votes[i][:8].astype(np.float32)
            y = emotions / max(float(emotions.sum()), 1.0)
        else:
            y = int(self.labels[i])
        if self.landmarks:
            size = x.shape[0]
            pts = self._lm[i] * size
            if self.transform is not None:
                out = self.transform(image=x, keypoints=pts)
                x, pts = out["image"], np.asarray(out["keypoints"], np.float32)
            else:
                x = _to_tensor(x)
            return x, torch.as_tensor(pts / size, dtype=torch.float32), y
        return (self.transform(image=x)["image"] if self.transform is not None else _to_tensor(x)), y

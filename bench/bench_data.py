"""Data-loading benchmark: HDF5 cache vs decoding the original JPEGs, and peak RSS of caching FER+.

Prints figures; asserts nothing. Usage (from the repo root, in the venv):
    python bench/bench_data.py [--shared ../shared/data] [--workers 2] [--batch 32] [--size 112]
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import helpers as H  # noqa: E402


class JpegFaceDataset(torch.utils.data.Dataset):
    """The uncached baseline: decode the JPEG, crop the face, resize, augment (what the cache saves)."""

    def __init__(self, index, class_names, size, transform):
        self.rows = index.reset_index(drop=True)
        self.class_to_id = {c: i for i, c in enumerate(class_names)}
        self.size, self.transform = size, transform

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        r = self.rows.iloc[i]
        img = H.crop_face(H.load_image(r["path"], 1), tuple(r[H.faces.BOX_COLUMNS]), self.size)
        return self.transform(image=img[..., None])["image"], self.class_to_id[r["label"]]


def samples_per_second(dataset, batch, workers, max_samples):
    """Throughput over one pass (after a warm-up batch), at most ``max_samples`` samples."""
    g = torch.Generator().manual_seed(0)
    sampler = torch.utils.data.RandomSampler(dataset, num_samples=min(max_samples, len(dataset)), generator=g)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, sampler=sampler, num_workers=workers,
                                         persistent_workers=False)
    it = iter(loader)
    next(it)  # worker start-up and first decode are not throughput
    n, t0 = 0, time.perf_counter()
    for x, _ in it:
        n += len(x)
    return n / (time.perf_counter() - t0)


def bench_kmu(shared, workers, batch, size, tmp):
    root = H.extract_archive(shared / "kmu-fed" / "archive.zip", tmp / "ex", verbose=False)
    index, report = H.discover_dataset(root, verbose=False)
    index = H.detect_faces(index, tmp / "boxes.csv", progress=False)
    classes = sorted(report["counts"])
    t0 = time.perf_counter()
    cache = H.build_hdf5_cache(index, tmp / "kmu.h5", classes, size, channels=1, progress=False)
    build_s = time.perf_counter() - t0
    transform = H.build_transform("seed", size, channels=1)
    jpeg = samples_per_second(JpegFaceDataset(index, classes, size, transform), batch, workers, 320)
    h5 = samples_per_second(H.H5Dataset(cache, transform=transform), batch, workers, len(index))
    print(f"KMU-FED ({len(index)} frames 1600x1200 -> {size}px face crops, batch {batch}, {workers} workers, "
          f"seed augmentation)")
    print(f"  JPEG decode + crop : {jpeg:8.1f} samples/s")
    print(f"  HDF5 cache         : {h5:8.1f} samples/s")
    print(f"  ratio              : {h5 / jpeg:8.1f}x   (one-off cache build: {build_s:.1f} s)")


def bench_ferplus_rss(shared, tmp, landmarks):
    script = textwrap.dedent(f"""
        import resource, sys, time
        sys.path.insert(0, {str(ROOT)!r})
        import helpers as H
        root = H.extract_archive({str(shared / 'ferplus' / 'FERPlus.zip')!r}, {str(tmp / 'ex')!r}, verbose=False)
        index, _ = H.read_ferplus(root, verbose=False)
        index = index[index["label"] != ""]
        t0 = time.perf_counter()
        H.build_hdf5_cache(index, {str(tmp / 'ferplus.h5')!r}, list(H.FERPLUS_CLASSES), 48, channels=1,
                           face_crop=False, extra_columns=("votes",),
                           landmarker=H.LandmarkDetector() if {landmarks!r} else None, progress=False)
        print(len(index), time.perf_counter() - t0)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    n, secs = out.stdout.split()
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(f"FER+ full cache ({n} labelled images, 48 px{', with landmarks' if landmarks else ''}): "
          f"extract + index + build, peak RSS {peak_mb:.0f} MB; build {float(secs):.0f} s")


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--size", type=int, default=112)
    ap.add_argument("--landmarks", action="store_true", help="include dlib landmarks in the FER+ build")
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        bench_ferplus_rss(args.shared, Path(tmp), args.landmarks)  # first: RUSAGE_CHILDREN is a high-water mark
        bench_kmu(args.shared, args.workers, args.batch, args.size, Path(tmp))


if __name__ == "__main__":
    main()

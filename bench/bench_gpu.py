"""Training speed of the DFER_GCViT model, side by side: DataLoader vs the data on the device, eager vs compiled.

For each path it trains ``--steps`` steps (after ``--warmup`` steps, which include any
compilation) and prints training images/s, step time, peak device memory, achieved TFLOP/s
(FLOPs of one training step counted by ``torch.utils.flop_counter``) and, on CUDA, the share
of the measured time the GPU was busy (kernel time from ``torch.profiler`` over the steps).

Paths: ``loader`` (H5Dataset + DataLoader with ``--workers`` workers, albumentations on the
CPU: the default path), ``device`` (:class:`helpers.DeviceBatches`: the split on the device,
:class:`helpers.BatchAugment` there), and each with ``--compile`` (``torch.compile``).

Usage (CPU here; the same on a GPU machine):
  .venv/bin/python bench/bench_gpu.py --model gcvit_xxtiny --size 64 --batch 32 --steps 20
  python bench/bench_gpu.py --model gcvit_small --size 224 --batch 128 --steps 50 --amp bf16 --compile --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import helpers as H  # noqa: E402


def make_cache(path: Path, n: int, size: int) -> Path:
    """A cache of ``n`` generated 1-channel faces at ``size`` px (the demo's, whole frames resized)."""
    root = H.extract_archive(H.make_demo_kmufed(path.parent / "demo.zip"), path.parent / "ex", verbose=False)
    index, report = H.discover_dataset(root, verbose=False)
    index = index.sample(n, replace=True, random_state=0).reset_index(drop=True) if n > len(index) else index.head(n)
    return H.build_hdf5_cache(index, path, sorted(report["counts"]), size, face_crop=False, progress=False)


def step_flops(model, x, y, loss_fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        loss_fn(model(x), y, 0.0).backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def measure(args, path: str, compiled: bool, nhwc: bool, amp: str, cache: Path, classes: list[str], device) -> dict:
    config = {"model_name": args.model, "image_size": args.size, "channels": 1, "weights": "none", "dropout": 0.1,
              "allow_random_init": False, "finetune": "full", "frozen_stages": 0, "augment": args.augment,
              "augment_erasing": 0.25}
    torch.manual_seed(0)
    model, _, _ = H.build_classifier(config, classes)
    model = model.to(device)
    with H.channels_last_layout(model, nhwc):  # as fit lays it out (a no-op when off)
        return _measure(args, path, compiled, nhwc, amp, config, model, cache, device)


def _measure(args, path: str, compiled: bool, nhwc: bool, amp: str, config: dict, model, cache: Path,
             device) -> dict:
    """One row of the table for a built model (see :func:`measure`)."""
    norm = model.data_config()
    ds = H.H5Dataset(cache, in_memory=True)
    if path == "device":
        loader = H.DeviceBatches(ds, H.BatchAugment(args.augment, args.size, norm["mean"], norm["std"], erasing=0.25),
                                 args.batch, drop_last=True, device=device)
    else:
        train_tf, _ = H.classifier_transforms(config, norm)
        ds.transform = train_tf
        loader = H.make_loader(ds, args.batch, shuffle=True, num_workers=args.workers, device=device, drop_last=True)
    loss_fn = H.cross_entropy_loss(0.1)
    optimizer = H.build_optimizer(model, 1e-4, 0.05)
    amp_dtype = H.resolve_amp(amp, device)
    dev_type = torch.device(device).type

    def batches():
        while True:
            yield from loader

    it = batches()
    model.train()
    # compiled as fit compiles it (H.compile_for_training: forward and backward on one batch, timed)
    run_model, compile_info = H.compile_for_training(model, compiled, [next(it)], loss_fn, device, amp_dtype,
                                                     progress=False)

    def step():
        inputs, y = next(it)
        x, y = inputs.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast(dev_type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            loss = loss_fn(run_model(x), y, 0.0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss

    sync = torch.cuda.synchronize if dev_type == "cuda" else (lambda: None)
    t0 = time.time()
    for _ in range(args.warmup):
        step()
    sync()
    warmup_s = time.time() - t0
    if dev_type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    busy = None
    t0 = time.time()
    if dev_type == "cuda":
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(args.steps):
                step()
            sync()
        wall = time.time() - t0
        kernel_us = sum(e.self_device_time_total for e in prof.key_averages())
        busy = kernel_us / 1e6 / wall
    else:
        for _ in range(args.steps):
            step()
        wall = time.time() - t0
    x, y = next(it)
    flops = step_flops(model, x.to(device), y.to(device), loss_fn)
    ips = args.steps * args.batch / wall
    return {"path": path, "amp": amp, "compiled": compile_info["used"], "channels_last": nhwc, "compile_s": compile_info["compile_s"],
            "images_per_s": round(ips, 1),
            "step_ms": round(1000 * wall / args.steps, 1), "warmup_s": round(warmup_s, 1),
            "gpu_busy": None if busy is None else round(busy, 3),
            "peak_mem_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if dev_type == "cuda" else None,
            "tflops": round(flops * args.steps / wall / 1e12, 3),
            "flop_util": round(flops * args.steps / wall / 1e12 / args.peak_tflops, 4) if args.peak_tflops else None}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gcvit_xxtiny")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--images", type=int, default=1024, help="size of the generated training split")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--augment", default="nir", choices=("seed", "nir"))
    ap.add_argument("--amp", nargs="+", default=["auto"], help="one row per setting, e.g. --amp off bf16")
    ap.add_argument("--paths", nargs="+", default=["loader", "device"], choices=("loader", "device"))
    ap.add_argument("--compile", action="store_true", help="also measure each path with torch.compile")
    ap.add_argument("--channels-last", action="store_true", help="also measure each path in channels-last order")
    ap.add_argument("--peak-tflops", type=float, default=None, help="the device's peak, for the utilisation")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    device = H.select_device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        cache = make_cache(Path(tmp) / "c.h5", args.images, args.size)
        classes = H.read_cache_meta(cache)[1]["class_names"]
        rows = []
        for p in args.paths:
            for c in ((False, True) if args.compile else (False,)):
                for nhwc in ((False, True) if args.channels_last else (False,)):
                    for amp in args.amp:
                        rows.append(measure(args, p, c, nhwc, amp, cache, classes, device))
                        print(json.dumps(rows[-1]), flush=True)  # each row as measured: a killed run keeps them
    print(f"{args.model} {args.size} px, batch {args.batch}, {args.augment} augmentation, amp {' / '.join(args.amp)}, "
          f"{device} ({torch.cuda.get_device_name(0) if device.type == 'cuda' else f'{torch.get_num_threads()} threads'})")
    keys = list(rows[0])
    print(" | ".join(keys))
    for r in rows:
        print(" | ".join(str(r[k]) for k in keys))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "device": str(device), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

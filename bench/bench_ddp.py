"""Distributed-training throughput: the same run spec with 1, 2, ... torchrun processes.

Prints figures; asserts nothing. Each process count trains the same fold from scratch in its
own folder (``python -m helpers train`` under ``torchrun --standalone``) and reports training
images per second (all ranks together, validation excluded) and the test accuracy, side by
side. On this 2-core machine expect no speed-up: the point is that the numbers agree.

Usage (from the repo root, in the venv):
    python bench/bench_ddp.py [--config run.json] [--procs 1 2] [--epochs 3]
Without --config, a spec is built from the real KMU-FED (../shared/data) or the generated
demo: whole frames at 64 px (the cpu profile's size; throughput does not depend on the crop),
gcvit_xxtiny from scratch, batch 32 per process, the first subject-independent fold.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import helpers as H  # noqa: E402

CPU_LIKE = dict(model_name="gcvit_xxtiny", weights="none", allow_random_init=False, image_size=64, channels=1,
                dropout=0.3, finetune="full", frozen_stages=0, batch_size=32, lr=1e-3, weight_decay=0.05,
                warmup_epochs=0, label_smoothing=0.1, class_weighted=False, clip_grad=1.0, amp="auto",
                early_stopping=None, num_workers=0, seed=42, profile="bench")


def build_spec(tmp: Path, shared: Path, epochs: int) -> Path:
    archive = shared / "kmu-fed" / "archive.zip"
    if not archive.exists():
        print(f"{archive} absent: using the generated demo")
        archive = H.make_demo_kmufed(tmp / "kmu-demo.zip")
    root = H.extract_archive(archive, tmp / "extracted", verbose=False)
    index, report = H.discover_dataset(root, verbose=False)
    classes = sorted(report["counts"])
    cache = H.build_hdf5_cache(index, tmp / "kmu_64.h5", classes, 64, face_crop=False, progress=False)
    meta, _ = H.read_cache_meta(cache)
    folds = H.make_folds(meta, "subject", num_folds=4, val_fraction=0.2, seed=42)[:1]
    print(f"{archive.name}: {len(meta)} images; fold 1: " + ", ".join(f"{p} {len(folds[0][p])}" for p in folds[0]))
    config = {**CPU_LIKE, "num_epochs": epochs}
    return H.write_run_spec(tmp / "run.json", config=config, cache_path=cache, class_names=classes, folds=folds,
                            run_dir=tmp / "run", run_key="bench")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", type=Path, help="a run spec (run.json) written by the notebook")
    ap.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--epochs", type=int, default=3, help="epochs, when the spec is built here")
    ap.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "data")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        spec = H.read_run_spec(args.config or build_spec(tmp, args.shared, args.epochs))
        rows = []
        for n in args.procs:
            run_dir = tmp / f"procs_{n}"
            path = H.write_run_spec(run_dir / "run.json", config=spec["config"], cache_path=spec["cache_path"],
                                    class_names=spec["class_names"], folds=spec["folds"][:1], run_dir=run_dir,
                                    run_key=spec["run_key"])
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
                   "-m", "helpers", "train", "--config", str(path), "--quiet"]
            print("$", " ".join(cmd[2:]))
            t0 = time.time()
            subprocess.run(cmd, cwd=ROOT, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
            wall = time.time() - t0
            res = json.loads((run_dir / "train_results.json").read_text())
            fold = res["folds"][0]
            rows.append((n, res["global_batch_size"], fold["train_images_per_s"], wall, fold["val"]["accuracy"],
                         fold["test"]["accuracy"]))
        c = spec["config"]
        print(f"\n{c['model_name']} {c['image_size']} px, {c['num_epochs']} epochs, batch {c['batch_size']} per process, "
              f"{os.cpu_count()} CPU cores, gloo")
        print(f"{'procs':>5} {'global batch':>12} {'train img/s':>11} {'vs 1 proc':>9} {'wall s':>7} "
              f"{'val acc':>7} {'test acc':>8}")
        base = rows[0][2]
        for n, gb, ips, wall, va, te in rows:
            print(f"{n:>5} {gb:>12} {ips:>11.1f} {ips / base:>8.2f}x {wall:>7.0f} {va:>7.3f} {te:>8.3f}")


if __name__ == "__main__":
    main()

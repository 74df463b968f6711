"""Training speed of the GReFEL notebook's model, side by side: memory layout, data path, dropout, compile.

The model is the notebook's (its cells tagged ``grefel-model``) at its resolved ``cpu`` profile
(``--components`` picks the ablation row), trained by ``H.fit`` as the Training cell trains it,
on a generated split of ``--images`` faces with landmarks at the profile's size (speed does not
depend on what the pixels show). Each row trains ``--epochs`` epochs and reports the last one
(the first warms up): seconds a step, images a second, and the speed-up over the first row.

Rows: ``nchw-loader`` (the layout and data path before the cpu profile took channels-last and
the batched augmentation), ``nhwc-loader`` (``channels_last=True``), ``nhwc-batched``
(``channels_last=True, data_on_device=True``: the split held in memory and augmented in batches
by ``H.BatchAugment`` in the training process, where the DataLoader's workers would share the
cores with it), ``nchw-batched``; over the profile's ``nhwc-batched``: ``nhwc-batched-dropout0``
(``dropout=0``: the fusion transformer's and the head's dropout off, a recipe change, so what it
does to accuracy is a training run's question, not this one's; the cpu profile's own since 2026-12-07, whose
previous 0.1 is ``nhwc-batched-dropout0.1``), ``nhwc-batched-compiled``
(``torch_compile=True``; its compile time is reported apart and not in the step time),
``nhwc-batched-dropout0-compiled`` (the two together) and
``nhwc-batched-48px`` (FER+'s native 48 px instead of 64, grids 12/6/3: what the smaller input saves) and
``nhwc-batched-48px-half`` (the same with a half-width ResNet, ``backbone_args=HALF_WIDTH``), and the half-width
ResNet on faces upsampled to 64 px (``nhwc-batched-half``, grids 16/8/4) and 96 px (``nhwc-batched-96px-half``, grids
24/12/6: its first stage at a quarter of the side instead of an eighth): what a finer first stage costs an epoch.

    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_grefel_speed.py
    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_grefel_speed.py --components backbone --images 2048 --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from grefel_pilot import HALF_WIDTH, PX48_GRIDS, H, build_training, cpu_profile  # noqa: E402

PX96_GRIDS = dict(image_size=96, patch_sizes=[24, 12, 6], window=6)  # the half-width ResNet's stages 1-3 at 96 px

# row -> (channels_last, batched augmentation, settings changed from the profile, torch.compile)
ROWS = {"nchw-loader": (False, False, {}, False), "nhwc-loader": (True, False, {}, False),
        "nhwc-batched": (True, True, {}, False), "nchw-batched": (False, True, {}, False),
        "nhwc-batched-dropout0": (True, True, {"dropout": 0.0}, False),
        "nhwc-batched-dropout0.1": (True, True, {"dropout": 0.1}, False),
        "nhwc-batched-compiled": (True, True, {}, True),
        "nhwc-batched-dropout0-compiled": (True, True, {"dropout": 0.0}, True),
        "nhwc-batched-48px": (True, True, PX48_GRIDS, False),
        "nhwc-batched-48px-half": (True, True, {**PX48_GRIDS, "backbone_args": HALF_WIDTH}, False),
        "nhwc-batched-half": (True, True, {"backbone_args": HALF_WIDTH}, False),
        "nhwc-batched-96px-half": (True, True, {**PX96_GRIDS, "backbone_args": HALF_WIDTH}, False)}


def make_cache(path: Path, n: int, size: int, classes: int = 8) -> Path:
    """``n`` generated grey faces with 68 landmarks, in the layout the notebook's cache has."""
    import h5py

    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as f:
        f["images"] = rng.integers(0, 256, (n, size, size, 1), dtype=np.uint8)
        f["labels"] = rng.integers(0, classes, n).astype(np.int64)
        f["landmarks"] = rng.uniform(0.15, 0.85, (n, 68, 2)).astype(np.float32)
        f["landmarks_ok"] = np.ones(n, bool)
        f["votes"] = np.eye(classes, dtype=np.float32)[f["labels"][:]] * 10
        f.attrs["class_names"] = json.dumps([f"c{i}" for i in range(classes)])
    return path


def measure(name: str, config: dict, n: int, epochs: int, work: Path) -> dict:
    nhwc, batched, changed, compiled = ROWS[name]
    config = {**config, **changed}
    cache = work / f"faces_{config['image_size']}px.h5"  # generated once per input size
    if not cache.exists():
        make_cache(cache, n, config["image_size"])
    device = torch.device("cpu")
    batches, data, val, model, loss_fn = build_training(config, cache, np.arange(n), np.arange(config["batch_size"]),
                                                        8, device, batched, config["num_workers"], progress=False)
    run = H.fit(model, batches, val, work / name, num_epochs=epochs, lr=config["lr"],
                weight_decay=config["weight_decay"], device=device, loss_fn=loss_fn, seed=config["seed"],
                warmup_epochs=0, clip_grad=config["clip_grad"], amp=config["amp"], config=config,
                torch_compile=compiled, channels_last=nhwc, progress=False)
    last = run["history"][-1]
    steps = len(batches)
    return {"row": name, "channels_last": run["channels_last"], "batched": data["on_device"],
            "training_data": data["why"], "changed": changed, "compile": run["compile"], "steps": steps,
            "image_size": config["image_size"], "parameters": sum(p.numel() for p in model.parameters()),
            "dropout_p": sorted({m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)}),
            "s_per_step": round(last["train_s"] / steps, 4), "images_per_s": round(last["train_samples"] / last["train_s"], 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--components", default="full", choices=("backbone", "pyramid", "geometry", "full"))
    ap.add_argument("--images", type=int, default=4096, help="size of the generated training split")
    ap.add_argument("--epochs", type=int, default=2, help="the last is measured")
    ap.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        config = {**cpu_profile(work / "nbwork"), "components": args.components}
        rows = [measure(r, config, args.images, args.epochs, work) for r in args.rows]
    base = rows[0]["s_per_step"]
    print(f"GReFEL `{args.components}`, cpu profile ({config['image_size']} px, batch {config['batch_size']}, "
          f"amp {config['amp']}, {torch.get_num_threads()} threads, {config['num_workers']} loader workers), "
          f"{args.images} generated faces, epoch {args.epochs} of {args.epochs}:")
    print(f"{'row':<22} {'s/step':>8} {'images/s':>9} {'speed-up':>9}  training data")
    for r in rows:
        r["speedup"] = round(base / r["s_per_step"], 2)
        compiled = f"; compiled in {r['compile']['compile_s']} s" if r["compile"]["used"] else ""
        print(f"{r['row']:<22} {r['s_per_step']:>8.3f} {r['images_per_s']:>9.1f} {r['speedup']:>8.2f}x  "
              f"{r['training_data']}{compiled}")
    if args.json:
        H.save_json({"components": args.components, "images": args.images, "torch": torch.__version__,
                     "threads": torch.get_num_threads(), "rows": rows}, args.json)


if __name__ == "__main__":
    main()

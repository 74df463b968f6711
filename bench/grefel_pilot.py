"""Pilot of GReFEL's training recipe on FER+: the full model (or an ablation row) as the notebook trains it,
several recipe variants side by side, one process each, chosen on FER2013Valid.

``bench/backbone_pilot.py`` chose the CNN; this one asks what the recipe knobs add to the whole model at the
cpu profile's budget (soft labels, a weight EMA, 48 px native input, ...). Each variant is the notebook's
resolved ``cpu`` profile (its Parameters and Configuration cells are executed with ``profile="cpu"``) with a
few settings changed, the model and loss are the notebook's cells tagged ``grefel-model``, and training is
``H.fit`` with the notebook's arguments (the profile's ``data_on_device`` and ``channels_last``: the training
split held in memory and augmented in batches in the training process; ``torch_compile`` off, so that no
variant spends its time compiling). Every epoch's history row is written as soon as it exists and gathered
every 10 s into one ``<out>/pilot.json`` (the device returns a few files a call), so a variant killed at a
deadline keeps what it measured; a second ``launch`` resumes unfinished variants from their ``last.pth``.
FER2013Test is not packed: a pilot chooses settings, and chooses them on validation. A finished variant also
records its selected checkpoint's FER2013Valid macro F1, classes predicted and recall per class (``best_val``):
what the rare-class variants (``class_weighted``, ``balanced``) are judged by.

It runs where the notebook's archive and cache cannot go (the GPU machine takes 64 MiB): ``pack`` turns the
notebook's FER+ landmark cache (labels, votes, dlib landmarks) and the archive's 48-px faces into one .npz
(faces as lossless WebP, landmarks quantised to 1/170 of the side: 0.4 px at 64 px), about 60 MB.

    python bench/grefel_pilot.py pack <workdir>/cache/ferplus_real_64px_lm.h5 ../shared/data/ferplus/FERPlus.zip .gpu/data/ferplus_trainval.npz
    python bench/grefel_pilot.py launch .gpu/data/ferplus_trainval.npz OUT base,soft,ema --deadline 490
    python bench/grefel_pilot.py launch data.npz /tmp/out base,px48 --epochs 1 --limit 400   # a dry run

A pilot on another device (bf16 on a GPU) ranks settings; the figures that count are the notebook's.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent)]
import helpers as H  # noqa: E402
from backbone_pilot import HALF as HALF_WIDTH  # noqa: E402  (a ResNet-18 at half width: ~1/4 of the FLOPs)

PX48_GRIDS = dict(image_size=48, patch_sizes=[12, 6, 3], window=3)  # FER+'s native size, the grids it gives
PX48 = dict(PX48_GRIDS, num_epochs=48)  # ~ the CPU time of 64 px x 36 epochs
# name: settings changed from the cpu profile (one thing per variant, then the promising pairs)
VARIANTS = {
    "base": {},                                     # the cpu profile on majority-vote targets (see cpu_profile)
    "soft": dict(soft_labels=True),                 # the FERPlus paper's probabilistic (vote-distribution) targets
    "ema": dict(model_ema=0.999),                   # validate and keep a moving average of the weights
    "px48": PX48,                                   # native 48 px, more epochs in the same CPU time
    "soft_ema": dict(soft_labels=True, model_ema=0.999),
    "px48_soft_ema": dict(PX48, soft_labels=True, model_ema=0.999),
    "backbone": dict(components="backbone"),        # the ablation's first row at the same recipe
    "erase50": dict(augment_erasing=0.5),
    "ls0": dict(label_smoothing=0.0),
    "mixup": dict(mixup=0.2),                       # mixup of image pairs and their targets (H.BatchMix)
    "cutmix": dict(cutmix=1.0),                     # a box of another face pasted
    "soft_mixup": dict(soft_labels=True, mixup=0.2),  # the vote distributions mixed
    # the rare classes (disgust, contempt: under 1% of FER2013Train each), chosen by the macro F1 the pilot reports
    "class_weighted": dict(class_weighted=True),    # inverse-frequency weights in the NLL
    "balanced": dict(balanced_sampling=True, data_on_device=False),  # each class drawn equally often (a sampler:
                                                                     # the DataLoader path)
    "backbone_class_weighted": dict(components="backbone", class_weighted=True),  # the same on the plain CNN,
    "backbone_soft": dict(components="backbone", soft_labels=True),               # which learns faster on a CPU
    "backbone_px48": dict(PX48, components="backbone"),  # native 48 px: what the input size costs and saves
    "backbone_sqrt_weighted": dict(components="backbone", class_weighted=0.5),  # milder: (1/frequency)^0.5
    "backbone_la": dict(components="backbone", logit_adjusted_loss=1.0),  # the logit-adjusted NLL (Menon et al.)
    # the two at 48 px, where a pilot takes half the CPU time (against backbone_px48)
    "backbone_px48_sqrt_weighted": dict(PX48, components="backbone", class_weighted=0.5),
    "backbone_px48_la": dict(PX48, components="backbone", logit_adjusted_loss=1.0),
    "backbone_px48_half": dict(PX48, components="backbone", backbone_args=HALF_WIDTH),  # more epochs per CPU hour
    # the longer budget: the plain CNN overfits at 120 epochs with the profile's recipe (training accuracy ~93%
    # under augmentation, FER2013Valid below its 48-epoch best), so each long variant is paired with a regularized one
    "backbone_120": dict(components="backbone", num_epochs=120),
    "backbone_120_mix": dict(components="backbone", num_epochs=120, mixup=0.2, cutmix=1.0),
    "pyramid_96_mix": dict(components="pyramid", num_epochs=96, mixup=0.2, cutmix=1.0),
}
LM_LOW, LM_SPAN = -0.25, 1.5  # landmarks (normalised to the side) may leave the crop a little; stored in this range


def pack(cache: str, archive: str, out: str) -> None:
    """The notebook's FER+ cache + its archive -> .npz of the training and validation faces (48 px, lossless),
    labels, vote counts and landmarks."""
    import cv2
    import h5py

    with h5py.File(cache, "r") as f:
        split = f["split"].asstr()[:]
        keep = np.flatnonzero(split != "test")
        rel = f["rel_path"].asstr()[:][keep]
        arrays = {"labels": f["labels"][:][keep].astype(np.int8), "votes": f["votes"][:][keep].astype(np.uint8),
                  "landmarks_ok": f["landmarks_ok"][:][keep], "is_val": split[keep] == "val",
                  "class_names": np.array(json.loads(f.attrs["class_names"]))}
        lm = f["landmarks"][:][keep]
    arrays["landmarks_q"] = np.round((np.clip(lm, LM_LOW, LM_LOW + LM_SPAN) - LM_LOW) / LM_SPAN * 255).astype(np.uint8)
    with zipfile.ZipFile(archive) as z:
        # the cache's rel_path is <split folder>/<file> under the archive's data folder
        members = {"/".join(name.split("/")[-2:]): name for name in z.namelist() if name.endswith(".png")}
        missing = [r for r in rel if r not in members]
        if missing:
            raise SystemExit(f"{archive}: {len(missing)} images of {cache} are not in it (first: {missing[0]}): "
                             "pack the cache built from this archive")
        parts = []
        for r in rel:
            face = cv2.imdecode(np.frombuffer(z.read(members[r]), np.uint8), cv2.IMREAD_GRAYSCALE)
            parts.append(cv2.imencode(".webp", face, [cv2.IMWRITE_WEBP_QUALITY, 101])[1].ravel())  # 101: lossless
    arrays["blob"], arrays["lengths"] = np.concatenate(parts), np.array([len(p) for p in parts], np.int32)
    np.savez_compressed(out, **arrays)
    print(f"wrote {out}: {len(keep)} faces ({int(arrays['is_val'].sum())} val), {Path(out).stat().st_size / 1e6:.1f} MB")


def cpu_profile(workdir: Path) -> dict:
    """The notebook's resolved cpu profile: its Parameters and Configuration cells run with profile="cpu"
    (``soft_labels="auto"`` pinned to majority-vote targets, what the variants are measured against)."""
    nb = json.loads((ROOT / "GReFEL.ipynb").read_text())
    cells = ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]
    start = next(i for i, c in enumerate(cells) if c.lstrip().startswith("# run") and "profile =" in c)
    ns = {"H": H, "json": json, "Path": Path}
    exec(cells[start], ns)
    ns.update(profile="cpu", workdir=str(workdir))
    exec(cells[start + 1].replace("print(json.dumps(config, indent=1))", ""), ns)
    config = ns["config"]
    # the variants were chosen against majority-vote targets: the profile's "auto" (the vote distributions on FER+,
    # since 2026-11-29) is pinned to them here, and the soft variants turn the votes on
    if config["soft_labels"] == "auto":
        config["soft_labels"] = False
    return config


def model_cells() -> dict:
    """The namespace of the notebook's cells tagged grefel-model (GReFELModel, build_grefel, grefel_loss, ...)."""
    import pandas as pd
    import torch

    nb = json.loads((ROOT / "GReFEL.ipynb").read_text())
    ns = {"torch": torch, "np": np, "pd": pd, "H": H}
    for c in nb["cells"]:
        if "grefel-model" in c.get("metadata", {}).get("tags", []):
            exec(compile("".join(c["source"]), "GReFEL.ipynb", "exec"), ns)
    return ns


def write_cache(npz: str, path: Path, size: int, limit: int) -> dict:  # -> train/val indices, num_classes
    """The packed faces at ``size`` px (as the notebook's cache resizes them) in an HDF5 file H5Dataset reads."""
    import cv2
    import h5py

    with np.load(npz) as packed:  # every access to a member of a compressed .npz inflates it again: once each
        d = {k: packed[k] for k in packed.files}
    ends = np.cumsum(d["lengths"])
    is_val = d["is_val"]
    pick = (np.r_[np.flatnonzero(~is_val)[:limit], np.flatnonzero(is_val)[:max(limit // 4, 1)]] if limit
            else np.arange(len(ends)))
    faces = []
    for i in pick:
        face = cv2.imdecode(d["blob"][ends[i] - d["lengths"][i]:ends[i]], cv2.IMREAD_GRAYSCALE)
        faces.append(face if size == face.shape[0] else cv2.resize(face, (size, size), interpolation=cv2.INTER_LINEAR))
    with h5py.File(path, "w") as f:
        f["images"] = np.stack(faces)[..., None]
        f["labels"] = d["labels"][pick].astype(np.int64)
        f["landmarks"] = d["landmarks_q"][pick].astype(np.float32) / 255 * LM_SPAN + LM_LOW
        f["landmarks_ok"] = d["landmarks_ok"][pick]
        f["votes"] = d["votes"][pick].astype(np.float32)
        f.attrs["class_names"] = json.dumps([str(c) for c in d["class_names"]])
    return {"train": np.flatnonzero(~is_val[pick]), "val": np.flatnonzero(is_val[pick]),
            "num_classes": len(d["class_names"]), "class_names": [str(c) for c in d["class_names"]]}


def build_training(config: dict, cache: Path, train_idx, val_idx, num_classes: int, device, data_on_device,
                   num_workers: int, progress: bool = True):
    """What the notebook's Training cell builds from a config and a landmark cache: the training batches (and
    how they are served), the validation loader, the model (seeded) and its loss."""
    import torch

    g = model_cells()
    norm = {"mean": (0.5,) * 3, "std": (0.5,) * 3}  # from scratch, as the notebook
    size = config["image_size"]
    train_tf = H.build_transform(config["augment"], size, norm["mean"], norm["std"], channels=1, keypoints=True,
                                 erasing=config["augment_erasing"])
    eval_tf = H.build_transform("eval", size, norm["mean"], norm["std"], channels=1, keypoints=True)
    train_ds = H.H5Dataset(cache, train_idx, train_tf, in_memory=True, landmarks=True,
                           soft_labels=config["soft_labels"])
    sampler = None
    if config["balanced_sampling"]:  # as the notebook's Training cell: each class drawn equally often
        w = 1.0 / np.bincount(train_ds.labels, minlength=num_classes)[train_ds.labels]
        sampler = torch.utils.data.WeightedRandomSampler(w, len(w),
                                                         generator=torch.Generator().manual_seed(config["seed"]))
    train_loader, training_data = H.training_batches(train_ds, config["augment"], size, norm,
                                                     config["augment_erasing"], config["batch_size"], data_on_device,
                                                     device, num_workers=num_workers, sampler=sampler,
                                                     seed=config["seed"], progress=progress)
    val_loader = H.make_loader(H.H5Dataset(cache, val_idx, eval_tf, in_memory=True, landmarks=True),
                               config["batch_size"], shuffle=False, device=device)
    H.seed_everything(config["seed"])
    model = g["build_grefel"](config, num_classes, weights=config["weights"])
    loss_fn = g["grefel_loss"](model, config["lambda_cls"], config["lambda_anchor"], config["lambda_center"],
                               config["anchor_margin"],
                               H.class_weights_for(config["class_weighted"], train_ds.labels, num_classes),
                               config["label_smoothing"], config["lambda_plain"],
                               H.logit_adjustment_shift(config["logit_adjusted_loss"], train_ds.labels, num_classes),
                               config["lambda_branch"])
    return train_loader, training_data, val_loader, model, loss_fn


def train(npz: str, out: Path, name: str, epochs: int, limit: int, work: Path) -> None:
    """One variant, as the notebook's Training cell trains it; history rows to ``out/<name>.json`` as they come
    (``launch`` gives its work folder as ``out`` and gathers them)."""
    import torch

    torch.set_num_threads(2)
    t0 = time.time()
    config = {**cpu_profile(work / "nbwork"), **VARIANTS[name]}
    config["num_epochs"] = epochs or config["num_epochs"]
    device = H.select_device()
    if device.type != "cpu":
        config["amp"] = "auto"  # bf16 autocast on CUDA, as the cpu profile's bf16 on this CPU
    cache = work / f"{name}.h5"
    idx = write_cache(npz, cache, config["image_size"], limit)
    train_loader, training_data, val_loader, model, loss_fn = build_training(
        config, cache, idx["train"], idx["val"], idx["num_classes"], device, config["data_on_device"], num_workers=0)
    record = {"variant": name, "changed": VARIANTS[name], "config": config, "device": str(device),
              "torch": torch.__version__, "training_data": training_data, "train": len(idx["train"]),
              "val": len(idx["val"]), "setup_s": round(time.time() - t0, 1), "history": []}

    def save(history):  # the epoch H.fit keeps: the best by the notebook's monitor
        best = H.best_index([row[config["monitor"]] for row in history], config["monitor"])
        record.update(history=history, best_val_acc=history[best]["val_acc"], best_epoch=best + 1,
                      monitor=config["monitor"], wall_s=round(time.time() - t0, 1))
        H.save_json(record, out / f"{name}.json")

    run_dir = work / f"run_{name}"
    run = H.fit(model, train_loader, val_loader, run_dir, num_epochs=config["num_epochs"],
                lr=H.fold_lr(config), weight_decay=config["weight_decay"], device=device, loss_fn=loss_fn,
                seed=config["seed"], warmup_epochs=config["warmup_epochs"], clip_grad=config["clip_grad"],
                amp=config["amp"], config=config, torch_compile=False, channels_last=config["channels_last"],
                model_ema=config["model_ema"], monitor=config["monitor"],
                mixup=config["mixup"], cutmix=config["cutmix"],
                # the run's whole history so far (H.fit has written it), resumed epochs included
                on_epoch_end=lambda row: save(json.loads((run_dir / "history.json").read_text())), progress=False)
    # the selected checkpoint on FER2013Valid, per class: what the rare-class variants are chosen by
    model.load_state_dict(H.load_checkpoint(run["best_path"])["model"])
    ev = H.evaluate(model, val_loader, device)
    m = H.compute_metrics(ev["y_true"], ev["y_pred"], idx["class_names"])
    record["best_val"] = {"accuracy": m["accuracy"], "f1_macro": m["f1_macro"],
                          "predicted_classes": m["predicted_classes"],
                          "recall": {c: r["recall"] for c, r in m["per_class"].items()}}
    record["done"] = True
    save(run["history"])


def launch(npz: str, out: Path, names: list[str], deadline: float, epochs: int, limit: int, work: Path) -> None:
    """Every variant in its own process at once (a small model leaves a GPU mostly idle: side by side they
    share it); at ``deadline`` seconds the unfinished ones are stopped, their rows kept."""
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    args = ["--epochs", str(epochs), "--limit", str(limit), "--work", str(work)]
    logs = {n: open(work / f"{n}.log", "w") for n in names}
    procs = {n: subprocess.Popen([sys.executable, __file__, "train", npz, str(work), n, *args], cwd=ROOT,
                                 stdout=logs[n], stderr=subprocess.STDOUT) for n in names}
    t0 = time.time()
    smi = shutil.which("nvidia-smi")
    gpu = []  # GPU busy share and memory every 10 s

    def gather():  # the variants' own files (each written atomically) -> one file
        found = {n: json.loads((work / f"{n}.json").read_text()) for n in names if (work / f"{n}.json").exists()}
        H.save_json({"variants": found, "gpu": gpu}, out / "pilot.json")
        return found

    while any(p.poll() is None for p in procs.values()) and time.time() - t0 < deadline:
        if smi:
            gpu.append(f"{time.time() - t0:.0f}s " + subprocess.run(
                [smi, "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader"],
                capture_output=True, text=True).stdout.strip())
        gather()
        time.sleep(10)
    for n, p in procs.items():
        if p.poll() is None:
            p.kill()
            p.wait()
        logs[n].close()
    found = gather()
    print(f"{'variant':16s} {'epochs':>9s} {'best FER2013Valid (epoch)':>27s} {'last':>7s} {'wall':>6s} "
          f"{'its macro F1':>12s} {'classes':>7s}")
    for n in names:
        if n not in found:
            print(f"{n:16s} no result (rc {procs[n].poll()}); its log ends:\n" + (work / f"{n}.log").read_text()[-800:])
            continue
        r = found[n]
        h = r["history"]
        bv = r.get("best_val")  # a variant stopped at the deadline has no final evaluation
        print(f"{n:16s} {len(h):4d}/{r['config']['num_epochs']:<4d} {r['best_val_acc']:19.2%} ({r['best_epoch']:3d}) "
              f"{h[-1]['val_acc']:7.2%} {r['wall_s']:5.0f}s "
              + (f"{bv['f1_macro']:12.2%} {bv['predicted_classes']:7d}" if bv else f"{'-':>12s} {'-':>7s}"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("pack")
    a.add_argument("cache"); a.add_argument("archive"); a.add_argument("out")
    for cmd in ("launch", "train"):
        a = sub.add_parser(cmd)
        a.add_argument("npz"); a.add_argument("out", type=Path); a.add_argument("names")
        a.add_argument("--epochs", type=int, default=0, help="0: the profile's")
        a.add_argument("--limit", type=int, default=0, help="first N training images (N/4 validation); 0: all")
        a.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "grefel_pilot",
                       help="caches, checkpoints (resumed by a second launch) and logs")
        a.add_argument("--deadline", type=float, default=490, help="launch: seconds before stopping the variants")
    args = p.parse_args()
    if args.cmd == "pack":
        pack(args.cache, args.archive, args.out)
    elif args.cmd == "launch":
        launch(args.npz, args.out, args.names.split(","), args.deadline, args.epochs, args.limit, args.work)
    else:
        train(args.npz, args.out, args.names, args.epochs, args.limit, args.work)


if __name__ == "__main__":
    main()

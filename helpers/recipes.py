"""The DFER_GCViT training recipe as a job: one fold, from a run spec a notebook writes.

The notebook's Train section and ``python -m helpers train --config run.json`` (under
torchrun or not) call the same :func:`train_fold`, with the same spec, into the same run
folder: a run trained on several GPUs is picked up by the notebook (finished folds are
loaded, not retrained) and the other way round.

A run spec (``run.json``) holds the notebook's ``config``, the HDF5 cache, the class names,
the folds (cache row indices of train/val/test) and the run folder. Paths are absolute; on
several machines they must point to a shared file system.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from . import distributed
from .augment import build_transform
from .cache import H5Dataset, build_hdf5_cache, read_cache_meta, stored_fingerprint
from .data import extract_archive, file_sha256, index_dataset
from .device_data import training_batches
from .metrics import compute_metrics, sequence_metrics
from .models import create_classifier, set_finetune_strategy
from .setup import config_fingerprint, environment_info, save_json
from .splits import make_folds
from .train import (BATCH_MIX_OFF, class_weights_for, scaled_lr, cross_entropy_loss, evaluate, fit, load_checkpoint, make_loader,
                    resolve_amp, seed_everything)

SPEC_KEYS = ("task", "config", "cache_path", "class_names", "folds", "run_dir", "run_key")
CONFIG_KEYS = ("model_name", "weights", "allow_random_init", "image_size", "channels", "dropout", "finetune",
               "frozen_stages", "num_epochs", "batch_size", "lr", "weight_decay", "warmup_epochs", "label_smoothing",
               "class_weighted", "clip_grad", "amp", "early_stopping", "num_workers", "seed")

# the folds' fine-tuning settings, which a pre-training from scratch never takes from the run (so changing them
# reuses it): every layer trained (freezing would freeze random weights) with one learning rate (layer decay is
# for fine-tuning), no weight average, no mixup or CutMix, validation and FER+ test in one view, one seed, AdamW (the
# pre-training's lr is AdamW's)
FINETUNING_ONLY = {"finetune": "full", "frozen_stages": 0, "layer_decay": None, "model_ema": None, "tta_flip": False,
                   "monitor": "val_acc", "train_seed": None, "train_seeds": None, "optimizer": "adamw", **BATCH_MIX_OFF}


def training_seed(config: dict) -> int:
    """The seed a fold trains with (initial weights, data order, augmentation): ``train_seed``, else ``seed`` (which
    also draws the folds, so a ``train_seed`` trains the same folds again)."""
    return config["seed"] if config.get("train_seed") is None else config["train_seed"]


def check_train_seeds(train_seeds, train_seed) -> None:
    """Refuse a ``train_seeds`` that is not a non-empty list of distinct integers, or one set beside ``train_seed``
    (which of the two would train the folds?)."""
    if train_seeds is None:
        return
    if (not isinstance(train_seeds, (list, tuple)) or not train_seeds
            or any(isinstance(s, bool) or not isinstance(s, int) for s in train_seeds)):
        raise ValueError(f"train_seeds must be a non-empty list of integers, e.g. [42, 1, 2], or None, not {train_seeds!r}")
    if len(set(train_seeds)) != len(train_seeds):
        raise ValueError(f"train_seeds {train_seeds} names a seed twice: its models would be the same")
    if train_seed is not None:
        raise ValueError(f"train_seed={train_seed} and train_seeds={train_seeds} are both set: set one (train_seeds "
                         "trains the folds once per seed, train_seed once)")


def member_configs(config: dict) -> list[dict]:
    """One config per model a fold trains: one per ``train_seeds`` seed (a seed ensemble), else the config itself.

    A member is exactly the run ``train_seed`` would train alone (``train_seeds`` None, ``train_seed`` None for the
    run's own ``seed``), so an ensemble reuses single-seed runs of the same settings, and the other way round.
    """
    seeds = config.get("train_seeds") or [training_seed(config)]
    return [{**config, "train_seed": None if s == config["seed"] else s, "train_seeds": None} for s in seeds]


def build_classifier(config: dict, class_names: list[str]):
    """The notebook's model: timm backbone + head for ``class_names``, weights and fine-tuning strategy from ``config``.

    Returns:
        ``(model, weights_info, parameter_counts)``.
    """
    model, weights_info = create_classifier(config["model_name"], len(class_names), config["image_size"],
                                            weights=config["weights"], dropout=config["dropout"],
                                            allow_random_init=config["allow_random_init"], class_names=class_names)
    counts = set_finetune_strategy(model, config["finetune"], config["frozen_stages"])
    return model, weights_info, counts


def write_run_spec(path: str | Path, *, config: dict, cache_path: str | Path, class_names: list[str],
                   folds: list[dict], run_dir: str | Path, run_key: str) -> Path:
    """Write ``run.json`` (atomically) for :func:`train_fold` and ``python -m helpers train``.

    Args:
        path: the spec file. config: the notebook's config dict.
        cache_path: the HDF5 cache. class_names: in label order.
        folds: ``[{"train": idx, "val": idx, "test": idx}, ...]`` of cache rows.
        run_dir: fold k trains into ``run_dir/fold_{k+1}``. run_key: identity of the training settings.
    """
    spec = {"task": "classifier", "config": config, "cache_path": str(Path(cache_path).resolve()),
            "cache_fingerprint": stored_fingerprint(cache_path), "class_names": list(class_names),
            "folds": [{part: [int(i) for i in f[part]] for part in ("train", "val", "test")} for f in folds],
            "run_dir": str(Path(run_dir).resolve()), "run_key": run_key}
    return save_json(spec, path)


def read_run_spec(path: str | Path) -> dict:
    """Read and check a run spec; errors name the file and what is wrong with it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"run spec {path} does not exist (the notebook's Train section writes it)")
    try:
        spec = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"run spec {path} is not valid JSON: {e}") from None
    missing = [k for k in SPEC_KEYS if k not in spec]
    missing += [f"config.{k}" for k in CONFIG_KEYS if k not in spec.get("config", {})]
    if missing:
        raise ValueError(f"run spec {path} lacks {', '.join(missing)}")
    if spec["task"] != "classifier":
        raise ValueError(f"run spec {path}: task {spec['task']!r} is not supported (only 'classifier')")
    if not Path(spec["cache_path"]).is_file():
        raise FileNotFoundError(f"run spec {path}: cache {spec['cache_path']} does not exist")
    check_spec_cache(spec)
    return spec


def check_spec_cache(spec: dict) -> None:
    """Stop when the spec's cache was rebuilt since the spec was written (other crop settings or other data, e.g. by
    another run in the same working directory): its rows would be other crops or other images than the folds'."""
    expected = spec.get("cache_fingerprint")  # specs written before 2026-12-06 lack it: not checked
    found = stored_fingerprint(spec["cache_path"])
    if expected is not None and found != expected:
        raise ValueError(f"cache {spec['cache_path']} was rebuilt since {Path(spec['run_dir']) / 'run.json'} was "
                         f"written (fingerprint {found[:12]}, the run's {expected[:12]}): other crop settings or data, "
                         "e.g. another run in this working directory; rerun the notebook from its Preprocess section "
                         "to build the cache for this run")


def _fold_dir(spec: dict, fold: int) -> Path:
    return Path(spec["run_dir"]) / f"fold_{fold + 1}"


def classifier_transforms(config: dict, norm: dict):
    """The recipe's ``(train, eval)`` albumentations pipelines for ``config`` and the backbone's ``norm``."""
    size, ch = config["image_size"], config["channels"]
    train_kind, erasing = config.get("augment", "seed"), config.get("augment_erasing", 0.0)
    return (build_transform(train_kind, size, norm["mean"], norm["std"], channels=ch, erasing=erasing),
            build_transform("eval", size, norm["mean"], norm["std"], channels=ch))


def fold_lr(config: dict) -> float:
    """The learning rate a fold trains with: ``lr`` scaled by ``lr_scaling`` from ``lr_reference_batch`` to the
    global batch (the per-process batch times the processes under torchrun), see :func:`scaled_lr`."""
    batch = config["batch_size"] * distributed.get_world_size()
    return scaled_lr(config["lr"], batch, config.get("lr_reference_batch") or config["batch_size"],
                     config.get("lr_scaling", "none"))


def train_fold(spec: dict, fold: int, device, progress: bool = True) -> dict:
    """Train fold ``fold`` (0-based) of a run spec into ``run_dir/fold_{fold+1}``.

    Works alone and under torchrun (see :func:`fit`); resumes or reuses a finished fold.

    Returns:
        :func:`fit`'s result plus ``weights`` (source info), ``parameters`` and ``norm``.
    """
    config, class_names, f = spec["config"], spec["class_names"], spec["folds"][fold]
    check_spec_cache(spec)  # a fold of a long run: the cache may have been rebuilt since the spec was read
    seed = training_seed(config)
    seed_everything(seed)  # every fold starts from the same initial weights
    model, weights_info, counts = build_classifier(config, class_names)
    norm = model.data_config()
    train_tf, eval_tf = classifier_transforms(config, norm)
    train_ds = H5Dataset(spec["cache_path"], f["train"], train_tf, in_memory=True)
    weights = class_weights_for(config["class_weighted"], train_ds.labels, len(class_names))
    loss_fn = cross_entropy_loss(config["label_smoothing"], weights)
    bs = config["batch_size"]
    train_loader, training_data = training_batches(
        train_ds, config.get("augment", "seed"), config["image_size"], norm, config.get("augment_erasing", 0.0), bs,
        config.get("data_on_device", "auto"), device, num_workers=config["num_workers"], seed=seed,
        progress=progress)
    val_loader = make_loader(H5Dataset(spec["cache_path"], f["val"], eval_tf, in_memory=True), bs, shuffle=False,
                             device=device)
    _, cache_attrs = read_cache_meta(spec["cache_path"])
    lr = fold_lr(config)
    run = fit(model, train_loader, val_loader, _fold_dir(spec, fold), num_epochs=config["num_epochs"], lr=lr,
              weight_decay=config["weight_decay"], device=device, loss_fn=loss_fn, seed=seed,
              warmup_epochs=config["warmup_epochs"], clip_grad=config["clip_grad"], amp=config["amp"],
              early_stopping=config["early_stopping"], monitor=config.get("monitor", "val_acc"), config=config,
              run_key=spec["run_key"], progress=progress,
              torch_compile=config.get("torch_compile", False), channels_last=config.get("channels_last", False),
              layer_decay=config.get("layer_decay"), model_ema=config.get("model_ema"),
              mixup=config.get("mixup", 0.0), cutmix=config.get("cutmix", 0.0),
              optimizer=config.get("optimizer", "adamw"),
              val_tta_flip=bool(config.get("tta_flip", False)),  # the epoch chosen by the test's rule
              extra_state={"class_names": class_names, "preprocess": cache_attrs["preprocess"], "norm": norm})
    return {**run, "weights": weights_info, "parameters": counts, "norm": norm,
            "training_data": training_data}


def _checkpoint_predictions(config: dict, class_names: list[str], checkpoint: str | Path, cache: str | Path,
                            rows, device, batch_size: int, amp_dtype=None) -> dict:
    """:func:`evaluate` of a checkpoint of the run's classifier on cache rows (None: all of them), with the run's
    evaluation transform and flip TTA."""
    model, _, _ = build_classifier({**config, "weights": "none"}, class_names)  # weights come from the checkpoint
    model.load_state_dict(load_checkpoint(checkpoint)["model"])
    _, eval_tf = classifier_transforms(config, model.data_config())
    loader = make_loader(H5Dataset(cache, rows, eval_tf), batch_size, shuffle=False, device=device)
    return evaluate(model.to(device), loader, device, amp_dtype=amp_dtype, tta_flip=config.get("tta_flip", False))


def fold_outputs(spec: dict, fold: int, checkpoint: str | Path, part: str, device) -> dict:
    """A checkpoint's predictions on one part (``"train"``, ``"val"`` or ``"test"``) of a fold, as the run evaluates
    (its transform, batch, precision and ``tta_flip``): :func:`evaluate`'s ``y_true``, ``y_pred``, ``probs`` (and
    ``acc_single`` with flip TTA), plus ``groups`` (the images' sequence ids) and ``sha1`` (their content hashes).

    Under torchrun every rank evaluates a share and all get the whole part's predictions.
    """
    config = spec["config"]
    check_spec_cache(spec)
    rows = spec["folds"][fold][part]
    out = _checkpoint_predictions(config, spec["class_names"], checkpoint, spec["cache_path"], rows, device,
                                  config["batch_size"], amp_dtype=resolve_amp(config["amp"], device))
    meta = read_cache_meta(spec["cache_path"])[0].iloc[rows]
    return {**out, "groups": meta["group"].to_numpy(), "sha1": meta["sha1"].to_numpy()}


def outputs_metrics(out: dict, class_names: list[str]) -> dict:
    """:func:`compute_metrics` of :func:`fold_outputs`' predictions, the one-view accuracy beside a flip-TTA
    headline, and the sequence-level figures (``"sequence"``: None without sequence ids)."""
    metrics = compute_metrics(out["y_true"], out["y_pred"], class_names, probs=out["probs"])
    if "acc_single" in out:  # tta_flip: the one-view figure beside the headline
        metrics["single_view_accuracy"] = out["acc_single"]
    metrics["sequence"] = sequence_metrics(out["probs"], out["y_true"], out["groups"])
    return metrics


def evaluate_fold(spec: dict, fold: int, checkpoint: str | Path, part: str, device) -> dict:
    """Metrics of a checkpoint on one part of a fold: :func:`outputs_metrics` of :func:`fold_outputs`."""
    return outputs_metrics(fold_outputs(spec, fold, checkpoint, part, device), spec["class_names"])


def members_outputs(specs: list[dict], fold: int, checkpoints: list[str | Path], part: str, device) -> list[dict]:
    """:func:`fold_outputs` of several models of one fold (a seed ensemble's members, or runs of other recipes on the
    same folds), checked to have predicted the same images in the same order."""
    outs = []
    for spec, checkpoint in zip(specs, checkpoints, strict=True):
        outs.append(fold_outputs(spec, fold, checkpoint, part, device))
        if not np.array_equal(outs[-1]["sha1"], outs[0]["sha1"]):
            raise ValueError(f"{spec['run_dir']}: fold {fold + 1}'s {part} images differ from {specs[0]['run_dir']}'s "
                             "(other folds, seed or data): they cannot be averaged")
    return outs


def mean_outputs(outs: list[dict]) -> dict:
    """The ensemble of :func:`members_outputs`: the mean probability, its argmax, the members' images and labels
    (one member: its outputs as they are; several: no one-view flip figure, which :func:`fold_outputs` keeps only as
    an accuracy)."""
    if len(outs) == 1:
        return outs[0]
    probs = np.mean([o["probs"] for o in outs], axis=0)
    mean = {**outs[0], "probs": probs, "y_pred": probs.argmax(1)}
    mean.pop("acc_single", None)
    return mean


def evaluate_members(specs: list[dict], fold: int, checkpoints: list[str | Path], part: str, device) -> dict:
    """Metrics of a fold's model, or of its seed ensemble (the mean of the members' probabilities), on one part:
    :func:`outputs_metrics`; with several members also ``"members"``, each one's ``accuracy`` and ``f1_macro``.
    One member gives exactly :func:`evaluate_fold`'s figures."""
    outs = members_outputs(specs, fold, checkpoints, part, device)
    metrics = outputs_metrics(mean_outputs(outs), specs[0]["class_names"])
    if len(outs) > 1:
        metrics["members"] = [{k: m[k] for k in ("accuracy", "f1_macro")}
                              for m in (outputs_metrics(o, specs[0]["class_names"]) for o in outs)]
    return metrics


def _cache_at_run_size(index, source: str | Path, prefix: str, workdir: Path, config: dict, class_names: list[str],
                       progress: bool) -> Path:
    """Cache another dataset's images as they are (no face detection) at the run's size and channels."""
    name = Path(str(source)).name.split(".")[0].lower()
    size, channels = config["image_size"], config["channels"]
    return build_hdf5_cache(index, workdir / "cache" / f"{prefix}_{name}_{size}px_{channels}ch.h5", class_names, size,
                            channels=channels, face_crop=False, progress=progress)


def pretrain_classifier(data_path: str | Path, workdir: str | Path, config: dict, device, num_epochs: int,
                        lr: float, progress: bool = True, augment: str | None = None,
                        batch_size: int | None = None) -> dict:
    """Train the run's classifier on another labelled dataset first (e.g. FER+), or reuse that training.

    The source is indexed as the notebook indexes data (FERPlus: its own splits and
    vote-majority labels, the crops as they are), cached at the run's ``image_size`` and
    ``channels``, split by the ``given`` protocol (the archive's validation split selects
    the epoch, its test split is reported) and trained with the run's recipe but
    ``num_epochs`` and ``lr``. The run folder is keyed by those settings and the data's
    fingerprint, so an unchanged pre-training is reused, not repeated.

    Args:
        data_path: archive or folder of the pre-training data.
        workdir: the notebook's working directory (extraction, cache, run folders).
        config: the main run's config (model, size, channels, batch, augmentation, seed).
        device: where to train. num_epochs, lr: the pre-training schedule.
        augment: the pre-training's augmentation recipe (None: the run's ``augment``); a run
            that changes only its own recipe then reuses the same pre-training.
        batch_size: the pre-training's batch (None: the run's). It is in the run key; ``lr`` is taken
            as given (scaled only by the run's ``lr_scaling``, from its ``lr_reference_batch``).

    Returns:
        ``{"data", "checkpoint", "sha256", "class_names", "epochs", "lr", "batch_size", "test": {accuracy,
        f1_macro, num_samples}, "val_acc", "wall_s" (this call), "epochs_s" (its epochs, whenever trained),
        "run_dir"}``; ``checkpoint`` is a
        ``best_model.pth`` to pass as the main run's ``weights`` (its head is then reset).
    """
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"pretrain_batch_size must be a positive integer or None (the run's batch), not {batch_size!r}")
    workdir = Path(workdir)
    index, report = index_dataset(extract_archive(data_path, workdir / "extracted", verbose=progress), verbose=False)
    classes = sorted(report["counts"])
    cache = _cache_at_run_size(index, data_path, "pretrain", workdir, config, classes, progress)
    meta, attrs = read_cache_meta(cache)
    folds = make_folds(meta, "given", val_fraction=config.get("val_fraction", 0.1), seed=config["seed"])
    pconfig = {**config, **FINETUNING_ONLY, "protocol": "given", "num_epochs": num_epochs, "lr": lr,
               "warmup_epochs": min(config["warmup_epochs"], 1), "pretrain_data_path": None,
               "augment": augment or config.get("augment", "seed"), "batch_size": batch_size or config["batch_size"]}
    recipe = {k: pconfig.get(k) for k in (*CONFIG_KEYS, "augment", "augment_erasing")}
    if pconfig.get("lr_scaling", "none") != "none":  # keyed only when used: unscaled pre-trainings keep their keys
        recipe.update(lr_scaling=pconfig["lr_scaling"], lr_reference_batch=pconfig.get("lr_reference_batch"))
    run_key = config_fingerprint(recipe, contents={"data": attrs["fingerprint"]})
    name = Path(str(data_path)).name.split(".")[0].lower()
    run_dir = workdir / "DFER_GCViT" / "pretrain" / f"{name}_{config['model_name']}_{config['image_size']}px_{run_key}"
    spec = read_run_spec(write_run_spec(run_dir / "run.json", config=pconfig, cache_path=cache, class_names=classes,
                                        folds=folds, run_dir=run_dir, run_key=run_key))
    run = train_fold(spec, 0, device, progress=progress)
    test = evaluate_fold(spec, 0, run["best_path"], "test", device)
    return {"data": str(data_path), "checkpoint": str(run["best_path"]), "sha256": file_sha256(run["best_path"]),
            "class_names": classes, "epochs": num_epochs, "lr": lr, "batch_size": pconfig["batch_size"],
            "val_acc": run["best"]["value"],
            "test": {k: test[k] for k in ("accuracy", "f1_macro", "num_samples")}, "wall_s": run["wall_s"],
            "epochs_s": run["epochs_s"],  # its training's time, also when this call reused it (wall_s near 0)
            "run_dir": str(run_dir), "sizes": {p: int(len(folds[0][p])) for p in ("train", "val", "test")}}


def cross_dataset(source: str | Path, workdir: str | Path, spec: dict, checkpoints: list,
                  device) -> dict:
    """Test a run's fold models, and their ensemble, on another dataset over the classes both share.

    The other dataset is indexed like the main one (any accepted layout), cached at the run's
    size and channels without face detection (e.g. CK+'s crops), and each fold's best model
    predicts among the shared classes only (the other outputs cannot be right there).

    Args:
        checkpoints: one per fold: a checkpoint, or a list of them (a seed ensemble: the fold's prediction is their
            mean probability).

    Returns:
        ``{"source", "classes" (shared), "not_shared", "num_samples", "folds": [metrics per
        fold model], "ensemble": metrics of the mean probability of all fold models}``.
    """
    config, class_names = spec["config"], spec["class_names"]
    index, _ = index_dataset(extract_archive(source, Path(workdir) / "extracted", verbose=False), verbose=False)
    theirs = set(index["label"])
    shared = [c for c in class_names if c in theirs]
    if not shared:
        raise ValueError(f"{source}: no class in common with the training classes {class_names} "
                         f"(it has {sorted(theirs)})")
    cache = _cache_at_run_size(index[index["label"].isin(shared)], source, "cross", Path(workdir), config,
                               class_names, progress=False)
    keep = [class_names.index(c) for c in shared]
    per_fold, probs = [], []
    for group in checkpoints:
        fold_probs = []  # (N, C) per member of the fold
        for ckpt in group if isinstance(group, (list, tuple)) else [group]:
            out = _checkpoint_predictions(config, class_names, ckpt, cache, None, device, 64)  # fp32
            fold_probs.append(out["probs"])
        probs.append(np.mean(fold_probs, axis=0))
        pred = np.array(keep)[probs[-1][:, keep].argmax(1)]
        per_fold.append(compute_metrics(out["y_true"], pred, class_names))
    mean = np.mean(probs, axis=0)
    ensemble = compute_metrics(out["y_true"], np.array(keep)[mean[:, keep].argmax(1)], class_names)
    return {"source": str(source), "classes": shared, "not_shared": sorted(theirs - set(shared)),
            "num_samples": int(len(out["y_true"])), "folds": per_fold, "ensemble": ensemble}


def launch_torchrun(spec_path: str | Path, nproc: int, extra_args: tuple[str, ...] = ()) -> None:
    """Run ``torchrun --standalone --nproc_per_node nproc -m helpers train --config spec_path``.

    For a notebook on a multi-GPU machine: its output is forwarded as it comes (progress bars
    included), and a failure raises with the exit code. Afterwards :func:`train_fold` finds
    the folds finished and loads them.
    """
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent  # so that `-m helpers` finds this package
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "helpers", "train", "--config", str(spec_path), *extra_args]
    print("$ torchrun " + " ".join(cmd[3:]), flush=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env) as proc:
        for chunk in iter(lambda: proc.stdout.read1(4096), b""):
            sys.stdout.write(chunk.decode(errors="replace"))
            sys.stdout.flush()
    if proc.returncode:
        raise RuntimeError(f"torchrun with {nproc} processes failed (exit code {proc.returncode}); its output "
                           f"above names the failing rank. Spec: {spec_path}")


def run_spec(path: str | Path, folds: list[int] | None = None, device: str = "auto", timeout_s: float = 600,
             progress: bool = True) -> dict | None:
    """Train (or reuse) and test the folds of a run spec: the body of ``python -m helpers train``.

    Joins the torchrun process group when there is one. Rank 0 writes
    ``run_dir/train_results.json``: per fold the best epoch, validation and test metrics of
    the best checkpoint, training throughput, and the batch semantics.

    Args:
        path: ``run.json``. folds: 1-based fold numbers (default: all).
        device: ``"auto"`` or a device type. timeout_s: process-group timeout.

    Returns:
        The results dict on rank 0, None on the other ranks.
    """
    spec = read_run_spec(path)
    chosen = folds or list(range(1, len(spec["folds"]) + 1))
    bad = [k for k in chosen if not 1 <= k <= len(spec["folds"])]
    if bad:
        raise ValueError(f"run spec {path} has {len(spec['folds'])} folds; no fold {bad}")
    dev = distributed.init_distributed(device, timeout_s)
    # No try/finally around the group: on an error this process exits at once (torchrun then
    # ends its peers); tearing the group down could block on a peer stuck in a collective.
    world, config = distributed.get_world_size(), spec["config"]
    main = distributed.is_main()
    if main and progress:
        print(f"{world} process(es) on {dev}: batch {config['batch_size']} per process = global batch "
              f"{config['batch_size'] * world}; lr {fold_lr(config):.3g} ({config['lr']} at batch "
              f"{config.get('lr_reference_batch') or config['batch_size']}, lr_scaling "
              f"{config.get('lr_scaling', 'none')!r})")
    per_fold = []
    for k in chosen:
        if main and progress:
            print(f"--- fold {k}/{len(spec['folds'])} ---")
        t0 = time.time()
        run = train_fold(spec, k - 1, dev, progress)
        trained = [r for r in run["history"] if r.get("world_size") == world]
        per_fold.append({
            "fold": k, "best": run["best"], "epochs_run": run["epochs_run"], "stopped_early": run["stopped_early"],
            "val": evaluate_fold(spec, k - 1, run["best_path"], "val", dev),
            "test": evaluate_fold(spec, k - 1, run["best_path"], "test", dev),
            "wall_s": time.time() - t0, "weights": run["weights"], "parameters": run["parameters"],
            # over the epochs trained with this many processes (none when a fold was reused as is)
            "train_images_per_s": (sum(r["train_samples"] for r in trained) / sum(r["train_s"] for r in trained)
                                   if trained else None)})
    results = {"spec": str(Path(path).resolve()), "folds": per_fold, "world_size": world,
               "batch_size_per_process": config["batch_size"], "global_batch_size": config["batch_size"] * world,
               "lr": fold_lr(config), "lr_scaling": config.get("lr_scaling", "none"), "backend": torch.distributed.get_backend()
               if distributed.is_distributed() else None, "device": str(dev), "environment": environment_info()}
    if main:
        save_json(results, Path(spec["run_dir"]) / "train_results.json")
        if progress:
            accs = [f["test"]["accuracy"] for f in per_fold]
            print(f"test accuracy {np.mean(accs):.4f} +- {np.std(accs):.4f} over {len(accs)} fold(s); wrote "
                  f"{Path(spec['run_dir']) / 'train_results.json'}")
    distributed.shutdown()
    return results if main else None

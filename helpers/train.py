"""The training engine both notebooks share.

``fit`` runs epochs of :func:`train_one_epoch` and :func:`evaluate` with AdamW, a per-step
cosine schedule (optional warm-up and warm restarts), gradient clipping, AMP, checkpoints
(``last.pth`` every epoch, ``best_model.pth`` on the monitored metric), ``history.json``,
early stopping and resume. The loss is pluggable: ``loss_fn(outputs, y, progress)`` where
``progress`` in [0, 1] is the share of training done (GReFEL ramps its trust with it), and
batches are ``(*inputs, y)`` so a model may take several inputs (images, landmarks). A model
with a ``set_progress(p)`` method is told the share of training done before every step.

Reproducibility: every epoch reseeds torch (shuffle order, dropout, DataLoader worker
seeds) and the augmentation from ``(seed, epoch)``, so a run resumed from ``last.pth``
replays exactly the epochs an uninterrupted run would have.

The same code runs under torchrun (see :mod:`.distributed`): ``fit`` wraps the model in
DistributedDataParallel, ``make_loader`` shards the data, ``train_one_epoch`` and
``evaluate`` reduce their figures over the ranks, and only rank 0 writes or prints.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import statistics
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import distributed
from .augment import seed_transform
from .metrics import class_log_prior, macro_f1
from .setup import atomic_write, config_fingerprint, output_lock, save_json


# ----------------------------------------------------------------------------- seeding & loaders

def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _reseed_transform(dataset, seed: int) -> None:
    seed_transform(getattr(dataset, "transform", None), seed)


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: seed NumPy, Python and the augmentation per worker.

    torch gives each worker ``base_seed + worker_id``, and ``base_seed`` is drawn from the
    generator reseeded every epoch, so augmentation is reproducible and differs per worker.
    """
    s = torch.initial_seed() % 2**32
    np.random.seed(s)
    random.seed(s)
    _reseed_transform(torch.utils.data.get_worker_info().dataset, s)


def make_loader(dataset, batch_size: int, shuffle: bool, num_workers: int = 0, device=None,
                drop_last: bool = False, sampler=None, seed: int = 0) -> torch.utils.data.DataLoader:
    """A DataLoader with per-worker seeding and pinned memory on CUDA; sharded under torchrun.

    In a process group of several ranks, a shuffled (training) loader gets a
    ``DistributedSampler`` (each rank a disjoint share of every epoch; ``fit`` calls its
    ``set_epoch``) and an unshuffled (evaluation) loader a :class:`ShardedBatchSampler`.

    Args:
        dataset: e.g. :class:`H5Dataset`.
        batch_size: samples per batch, per process.
        shuffle: reshuffle every epoch (ignored when ``sampler`` is given).
        num_workers: loading processes (0: in the main process).
        device: the training device; pinned memory is used when it is CUDA.
        drop_last: drop an incomplete last batch (avoids BatchNorm on a single sample).
        sampler: an explicit sampler (e.g. a class-balanced one; single process only).
        seed: the distributed sampler's shuffle seed (the same on every rank).
    """
    pin = device is not None and torch.device(device).type == "cuda"
    # workers persist across epochs (no restart cost each epoch); H5Dataset seeds each item's augmentation
    # from the epoch's seed, so results do not depend on the workers
    common = dict(num_workers=num_workers, pin_memory=pin, worker_init_fn=seed_worker,
                  persistent_workers=num_workers > 0)
    if distributed.is_distributed():
        if sampler is not None:
            raise ValueError("an explicit sampler cannot be sharded across processes: under torchrun use "
                             "shuffle=True (DistributedSampler) instead, e.g. turn balanced sampling off")
        if not shuffle:  # evaluation: whole batches per rank, nothing padded or dropped
            return torch.utils.data.DataLoader(
                dataset, batch_sampler=distributed.ShardedBatchSampler(len(dataset), batch_size), **common)
        # drop_last here trims the epoch to a multiple of the world size: shares stay disjoint
        sampler = torch.utils.data.DistributedSampler(dataset, shuffle=True, seed=seed, drop_last=True)
    if shuffle and sampler is None:  # its own generator, reseeded by fit every epoch: workers draw nothing from it
        sampler = torch.utils.data.RandomSampler(dataset, generator=torch.Generator().manual_seed(seed))
    # the workers' base seeds come from the loader's own generator, so the global RNG (dropout) is the same
    # with and without workers
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last,
                                       generator=torch.Generator().manual_seed(seed), **common)


# ----------------------------------------------------------------------------- optimiser & schedule

LR_SCALING = ("none", "sqrt", "linear")


def scaled_lr(lr: float, batch_size: int, reference_batch: int, rule: str = "none") -> float:
    """The learning rate for ``batch_size`` when ``lr`` was chosen at ``reference_batch``.

    ``rule``: ``"none"`` (``lr`` as it is), ``"sqrt"`` (``lr * sqrt(batch / reference)``, the
    rule for Adam-type optimisers such as AdamW, Malladi et al. 2022) or ``"linear"``
    (``lr * batch / reference``, Goyal et al. 2017, for SGD with a warm-up). Under torchrun
    ``batch_size`` is the global batch (per process x processes).
    """
    if rule not in LR_SCALING:
        raise ValueError(f"lr_scaling must be one of {LR_SCALING}, not {rule!r}")
    if batch_size <= 0 or reference_batch <= 0:
        raise ValueError(f"batch sizes must be positive, not {batch_size} and {reference_batch}")
    ratio = batch_size / reference_batch
    return lr * {"none": 1.0, "sqrt": math.sqrt(ratio), "linear": ratio}[rule]


OPTIMIZERS = ("adamw", "sgd")


def check_optimizer(optimizer: str) -> None:
    """Refuse an optimizer :func:`build_optimizer` does not build, naming those it does."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, not {optimizer!r}")


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, fused: bool | None = None,
                    layer_decay: float | None = None, optimizer: str = "adamw",
                    momentum: float = 0.9) -> torch.optim.Optimizer:
    """AdamW (or SGD) over trainable parameters; biases and norm weights get no weight decay.

    ``optimizer``: ``"adamw"`` (``weight_decay`` is decoupled, e.g. 0.05) or ``"sgd"`` (Nesterov momentum
    ``momentum``; ``weight_decay`` is the L2 term added to the gradient, e.g. 5e-4, and the lr is SGD's, e.g. 0.1
    at batch 128: the classic ResNet recipe).

    ``fused``: one fused kernel for the whole update (``None``: on when every parameter is on
    CUDA, where it saves a launch per parameter tensor; the CPU keeps the default loop).
    ``layer_decay``: layer-wise learning-rate decay for fine-tuning a pre-trained backbone (BEiT's rule, by
    timm's ``param_groups_layer_decay``): the backbone's top layer trains at ``lr``, each layer below it at
    ``layer_decay`` times the one above, so the stem moves least; parameters outside ``model.backbone`` (the
    head) train at ``lr``. ``None`` or 1: one learning rate for all. Each group keeps its ``lr_scale``, and the
    schedule scales every group alike.

    Raises:
        ValueError: ``layer_decay`` outside (0, 1], or a model without a timm ``backbone`` whose layers timm
            can name (``group_matcher``).
    """
    check_optimizer(optimizer)
    if layer_decay is not None and not 0 < layer_decay <= 1:
        raise ValueError(f"layer_decay must be in (0, 1] (e.g. 0.75), or None for one learning rate; not {layer_decay}")
    backbone = getattr(model, "backbone", None)
    layered = layer_decay is not None and layer_decay < 1
    if layered and not hasattr(backbone, "group_matcher"):
        raise ValueError(f"layer_decay needs a model whose .backbone is a timm model with named layers "
                         f"(group_matcher); {type(model).__name__} has none: leave layer_decay=None")
    groups = []
    if layered:
        from timm.optim import param_groups_layer_decay

        groups = param_groups_layer_decay(backbone, weight_decay, layer_decay=layer_decay)
    inside = {id(p) for g in groups for p in g["params"]}
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) not in inside:
            (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    groups += [{"params": decay, "weight_decay": weight_decay, "lr_scale": 1.0},
               {"params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0}]
    groups = [{**g, "lr": lr * g["lr_scale"]} for g in groups if g["params"]]
    if fused is None:
        fused = all(p.is_cuda for g in groups for p in g["params"]) and bool(groups)
    if optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=True, fused=fused or None)
    return torch.optim.AdamW(groups, lr=lr, fused=fused or None)


class CosineFactor:
    """The lr factor of :func:`build_scheduler` at each step: linear warm-up, then cosine decay (or SGDR).

    An object, not a closure, so that its horizon can move: :meth:`plan`. :func:`fit` sets it to the epochs
    planned (on resume from its checkpoint's plan; under a time budget again after each epoch), and the
    cosine then ends with the last of them.
    """

    def __init__(self, num_epochs: int, steps_per_epoch: int, warmup_epochs: float = 0.0,
                 restart_epochs: int | None = None, min_lr_ratio: float = 0.0):
        self.steps_per_epoch, self.min_lr_ratio = steps_per_epoch, min_lr_ratio
        self.warm = int(warmup_epochs * steps_per_epoch)
        self.restart = restart_epochs * steps_per_epoch if restart_epochs else None
        self.plan(num_epochs)

    def plan(self, num_epochs: int) -> None:
        """End the decay after ``num_epochs`` epochs (from the start of training)."""
        self.total = max(1, num_epochs * self.steps_per_epoch)

    def __call__(self, step: int) -> float:
        if step < self.warm:
            return (step + 1) / self.warm
        if self.restart:
            t = ((step - self.warm) % self.restart) / self.restart
        else:
            t = min(1.0, (step - self.warm) / max(1, self.total - self.warm))
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))


def build_scheduler(optimizer, num_epochs: int, steps_per_epoch: int, warmup_epochs: float = 0.0,
                    restart_epochs: int | None = None, min_lr_ratio: float = 0.0):
    """Per-step cosine decay with linear warm-up and optional warm restarts (a ``LambdaLR`` of :class:`CosineFactor`).

    Args:
        optimizer: its initial lr is the peak.
        num_epochs: length of the run (the seed's ``T_max``).
        steps_per_epoch: optimiser steps per epoch.
        warmup_epochs: linear warm-up from 0, in epochs.
        restart_epochs: restart the cosine every this many epochs (SGDR); None = one cycle.
        min_lr_ratio: floor of the cosine as a fraction of the peak.
    """
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, CosineFactor(num_epochs, steps_per_epoch, warmup_epochs, restart_epochs, min_lr_ratio))


def plan_epochs(epoch_s: list[float], budget_s: float, cap: int, recent: int = 5) -> int:
    """How many epochs in all fit a time budget, after the ``len(epoch_s)`` epochs that took those seconds.

    The epochs left are costed at the larger of the last epoch's time and the mean of the last ``recent``
    (an epoch time that drifts upward, as on a shared machine, is followed, not averaged away). At least
    the epochs done, at most ``cap``.
    """
    done = len(epoch_s)
    per_epoch = max(epoch_s[-1], statistics.fmean(epoch_s[-recent:]))
    left = max(0, math.floor((budget_s - sum(epoch_s)) / per_epoch))
    return max(done, min(cap, done + left))


# ----------------------------------------------------------------------------- losses & outputs

def cross_entropy_loss(label_smoothing: float = 0.0, class_weights: torch.Tensor | None = None) -> Callable:
    """The default pluggable loss: cross-entropy on ``logits`` (soft targets allowed).

    Returns:
        ``loss_fn(outputs, y, progress) -> scalar tensor``.
    """
    def loss_fn(outputs, y, progress):
        logits = output_logits(outputs)
        w = class_weights.to(logits.device) if class_weights is not None else None
        return F.cross_entropy(logits.float(), y, weight=w, label_smoothing=label_smoothing)

    return loss_fn


def class_weights_from_labels(labels: np.ndarray, num_classes: int, power: float = 1.0) -> torch.Tensor:
    """Inverse-frequency class weights to the power ``power`` (1: inverse frequency, 0.5: its square root),
    normalised to mean 1 over the classes present (absent classes get 0)."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    w = np.where(counts > 0, (counts.sum() / np.maximum(counts, 1) / num_classes) ** power, 0.0)
    return torch.tensor(w / w[counts > 0].mean(), dtype=torch.float32)


def class_weight_power(class_weighted) -> float | None:
    """The power of the inverse class frequency a ``class_weighted`` setting asks for: ``None`` (no weights) for
    ``None``/``False``/0, 1.0 for ``True``, the number itself for a number > 0 (0.5: square-root weights, milder
    than inverse frequency). Anything else stops with what is accepted (notebooks call it before their data work)."""
    if class_weighted is None or class_weighted == 0:  # False == 0 too
        return None
    if class_weighted is True:
        return 1.0
    if isinstance(class_weighted, (int, float)) and 0 < class_weighted <= 2:
        return float(class_weighted)
    raise ValueError(f"class_weighted must be True (inverse-frequency weights), a power of the inverse frequency "
                     f"in (0, 2] (0.5: square root), or False/None, not {class_weighted!r}")


def class_weights_for(class_weighted, labels: np.ndarray, num_classes: int) -> torch.Tensor | None:
    """The loss's class weights for a ``class_weighted`` setting (:func:`class_weight_power`) and the training
    labels, or ``None`` when it asks for none."""
    power = class_weight_power(class_weighted)
    return None if power is None else class_weights_from_labels(labels, num_classes, power)


def check_logit_adjusted_loss(tau) -> None:
    """Refuse a logit-adjustment strength that is not a number >= 0 (or None: off), before the data work."""
    if tau is not None and not (isinstance(tau, (int, float)) and not isinstance(tau, bool) and tau >= 0):
        raise ValueError(f"logit_adjusted_loss must be a number >= 0 (tau; 1.0 as Menon et al.) or None, not {tau!r}")


def logit_adjustment_shift(tau: float | None, train_labels, num_classes: int) -> torch.Tensor | None:
    """(C,) ``tau`` x the training split's log class prior (add-one smoothed, :func:`class_log_prior`): what
    the logit-adjusted loss adds to the log-probabilities in training; None when ``tau`` is None or 0."""
    check_logit_adjusted_loss(tau)
    if not tau:
        return None
    return torch.tensor(tau * class_log_prior(train_labels, num_classes), dtype=torch.float32)


def output_logits(outputs) -> torch.Tensor:
    """A model's logits: ``logits`` of a dict, else the output itself."""
    return outputs["logits"] if isinstance(outputs, dict) else outputs


def output_probs(outputs) -> torch.Tensor:
    """Class probabilities from a model's outputs: ``final_probs`` of a dict, else softmax of logits."""
    if isinstance(outputs, dict):
        return outputs["final_probs"] if "final_probs" in outputs else outputs["logits"].float().softmax(-1)
    return outputs.float().softmax(-1)


def cpu_amp() -> str:
    """The ``amp`` setting for training on this CPU: ``"bf16"`` where it computes bfloat16 natively
    (AVX512-BF16 or AMX: measured here, an AMD EPYC with AVX512-BF16, 1.6-1.7x the fp32 training
    throughput of ResNet-18 and GCViT-xxtiny at 64 px), else ``"off"`` (emulated bf16 is slower
    than fp32). The ``cpu`` profiles use it, so the precision is a concrete value in the config and
    in the run key: a run never changes precision when resumed on another machine.
    """
    cpu = torch.cpu
    native = any(getattr(cpu, name, lambda: False)() for name in ("_is_avx512_bf16_supported",
                                                                    "_is_amx_tile_supported"))
    return "bf16" if native else "off"


def resolve_amp(amp: str, device) -> torch.dtype | None:
    """The autocast dtype for ``amp`` on ``device``, or None for full precision.

    Args:
        amp: ``"auto"`` (bf16 on CUDA when supported, else fp16; fp16 on Apple MPS where this
            torch has autocast for it, said otherwise; off on CPU), ``"fp16"``, ``"bf16"`` or ``"off"``.
        device: the training device.
    """
    kind = torch.device(device).type
    if amp == "auto" and kind == "mps":
        if torch.amp.autocast_mode.is_autocast_available("mps"):
            return torch.float16
        print(f"AMP: torch {torch.__version__} has no autocast on MPS; training in float32")
        return None
    if amp == "off" or (amp == "auto" and kind != "cuda"):
        return None
    if amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if amp in ("fp16", "bf16"):
        return torch.float16 if amp == "fp16" else torch.bfloat16
    raise ValueError(f"amp must be 'auto', 'fp16', 'bf16' or 'off', not {amp!r}")


# ----------------------------------------------------------------------------- epochs

SYNC_EVERY = 50  # training steps between host reads of the running loss (progress bar, NaN check)


def _to_device(batch, device):
    *inputs, y = batch
    nb = torch.device(device).type == "cuda"
    return [x.to(device, non_blocking=nb) for x in inputs], y.to(device, non_blocking=nb)


def train_one_epoch(model: nn.Module, loader, optimizer, scheduler, loss_fn: Callable, device, epoch: int,
                    num_epochs: int, scaler=None, amp_dtype=None, clip_grad: float | None = 1.0,
                    progress: bool = True, after_step: Callable[[int], None] | None = None,
                    mix: BatchMix | None = None) -> dict:
    """One pass over ``loader``; stops with FloatingPointError on a NaN/inf loss.

    ``after_step(global_step)`` runs after each optimiser step (1-based over the whole run, for
    ``steps`` steps an epoch), e.g. to update a moving average of the weights. ``mix`` mixes every
    batch (:class:`BatchMix`); the loss then gets (B, C) targets and the accuracy counts the class
    each mixed target weighs most (the sample's own).

    Returns:
        ``{"loss": mean loss, "acc": accuracy, "samples": count}`` over the epoch (over all
        ranks under torchrun).
    """
    from tqdm.auto import tqdm

    model.train()
    # Running sums stay on the device: the host reads them (a sync) only every SYNC_EVERY steps.
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    bad_step = torch.full((), -1, device=device, dtype=torch.long)  # first step with a NaN/inf loss
    bad_loss = torch.zeros((), device=device)
    total, steps = 0, len(loader)
    # iter() once: tqdm.auto would call it twice, and every call restarts the workers' prefetch (and, with
    # workers, draws a second shuffle)
    bar = tqdm(iter(loader), total=steps, desc=f"epoch {epoch + 1}/{num_epochs} train", leave=False,
               disable=not progress)
    for step, batch in enumerate(bar):
        inputs, y = _to_device(batch, device)
        frac = (epoch + step / max(1, steps)) / max(1, num_epochs)  # share of training done
        core = getattr(model, "module", model)  # under DistributedDataParallel
        if hasattr(core, "set_progress"):
            core.set_progress(frac)
        with torch.autocast(torch.device(device).type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            if mix is not None:
                inputs, lam = mix(inputs)
            outputs = model(*inputs)
            if mix is not None:
                y = mix.targets(y, lam, output_logits(outputs).shape[-1])  # the class count, no softmax
            loss = loss_fn(outputs, y, frac)
        first_bad = (bad_step < 0) & ~torch.isfinite(loss.detach())
        bad_step = torch.where(first_bad, step, bad_step)
        bad_loss = torch.where(first_bad, loss.detach().float(), bad_loss)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        if clip_grad:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        scheduler.step()
        if after_step is not None:
            after_step(epoch * steps + step + 1)
        hard = y if y.ndim == 1 else y.argmax(-1)  # soft targets: compare with their argmax
        total += len(hard)
        loss_sum += loss.detach().float() * len(hard)
        correct += (output_probs(outputs).argmax(-1) == hard).sum()
        if (step + 1) % SYNC_EVERY == 0 or step + 1 == steps:
            if bad_step.item() >= 0:  # weights may be NaN since then; no checkpoint of them is written
                raise FloatingPointError(
                    f"loss is {bad_loss.item()} at epoch {epoch + 1}, step {bad_step.item() + 1}: training stopped. "
                    "The last good checkpoint is kept; lower the learning rate, enable gradient clipping or turn "
                    "AMP off.")
            bar.set_postfix(loss=f"{loss_sum.item() / total:.4f}", acc=f"{correct.item() / total:.3f}")
    sums = distributed.all_reduce_sum([loss_sum.item(), correct.item(), total], device)
    loss_sum, correct, total = sums
    return {"loss": loss_sum / max(1, total), "acc": correct / max(1, total), "samples": int(total)}


def check_tta_shift(shift, image_size: int) -> None:
    """Refuse a test-time shift that is not a whole number of pixels from 0 to a quarter of the side."""
    if isinstance(shift, bool) or not isinstance(shift, int) or not 0 <= shift <= image_size // 4:
        raise ValueError(f"tta_shift must be a whole number of pixels from 0 to {image_size // 4} (a quarter of the "
                         f"{image_size}-px side), not {shift!r}")


def shifted_views(x: torch.Tensor, shift: int, fill) -> list[tuple[torch.Tensor, int, int]]:
    """Test-time views of a batch: the batch itself and, for ``shift`` > 0, copies of it moved ``shift``
    pixels right, left, down and up, the uncovered border filled as the training's shifts fill it.

    Args:
        x: (B, C, H, W) normalised images.
        shift: pixels (0: the batch alone).
        fill: the border's value, a number or one per channel (black after normalisation:
            ``-mean / std``).

    Returns:
        ``[(view, dx, dy), ...]``: each view's content moved ``dx`` px right and ``dy`` px down
        (landmarks in [0, 1] of the side follow by ``dx / W``, ``dy / H``).
    """
    h, w = x.shape[-2:]
    check_tta_shift(shift, min(h, w))
    views = [(x, 0, 0)]
    fill = torch.as_tensor(fill, dtype=x.dtype, device=x.device).reshape(1, -1, 1, 1)
    for dx, dy in ((shift, 0), (-shift, 0), (0, shift), (0, -shift)) if shift else ():
        view = fill.expand_as(x).clone()  # (B, C, H, W) of the border value
        view[..., max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
            x[..., max(-dy, 0):h - max(dy, 0), max(-dx, 0):w - max(dx, 0)]
        views.append((view, dx, dy))
    return views


@torch.no_grad()
def evaluate(model: nn.Module, loader, device, loss_fn: Callable | None = None, amp_dtype=None,
             progress: bool = False, tta_flip: bool = False) -> dict:
    """Predictions and loss over ``loader`` in eval mode.

    ``tta_flip``: average each image's probabilities with its mirror image's (models with one
    input; the loss stays that of the single view, and ``probs_single`` and ``acc_single`` keep the single
    view's probabilities and accuracy so both can be reported).

    Under torchrun, with a loader from :func:`make_loader` (shuffle=False), each rank
    evaluates its batches and every rank returns the whole dataset's predictions in order.

    Returns:
        loss (when ``loss_fn`` is given, at progress 1), acc, and arrays ``y_true``,
        ``y_pred``, ``probs`` (N x C) for the metrics.
    """
    from tqdm.auto import tqdm

    model.eval()
    ys, probs, single, loss_sum = [], [], [], 0.0
    for batch in tqdm(iter(loader), total=len(loader), desc="eval", leave=False, disable=not progress):
        inputs, y = _to_device(batch, device)
        with torch.autocast(torch.device(device).type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            outputs = model(*inputs)
            if loss_fn is not None:
                loss_sum += loss_fn(outputs, y, 1.0).item() * len(y)
            p_batch = output_probs(outputs).float()
            if tta_flip:
                if len(inputs) != 1:
                    raise ValueError("tta_flip averages over mirrored images: only for models with one input")
                single.append(p_batch.cpu())
                p_batch = (p_batch + output_probs(model(inputs[0].flip(-1))).float()) / 2
        ys.append((y if y.ndim == 1 else y.argmax(-1)).cpu())
        probs.append(p_batch.cpu())
    y_true = torch.cat(ys).numpy() if ys else np.zeros(0, int)
    p = torch.cat(probs).numpy() if probs else np.zeros((0, 0))
    p_single = (torch.cat(single).numpy() if single else np.zeros((0, 0))) if tta_flip else None
    if isinstance(loader.batch_sampler, distributed.ShardedBatchSampler):
        indices = loader.batch_sampler.indices()
        if p_single is not None:
            _, p_single, _ = distributed.gather_predictions(indices, y_true, p_single, 0.0, len(loader.dataset))
        y_true, p, loss_sum = distributed.gather_predictions(indices, y_true, p, loss_sum, len(loader.dataset))
    y_pred = p.argmax(-1) if len(p) else np.zeros(0, int)
    out = {"acc": float((y_pred == y_true).mean()) if len(y_true) else float("nan"),
           "y_true": y_true, "y_pred": y_pred, "probs": p}
    if p_single is not None:
        out["probs_single"] = p_single
        out["acc_single"] = float((p_single.argmax(-1) == y_true).mean()) if len(y_true) else float("nan")
    if loss_fn is not None:
        out["loss"] = loss_sum / max(1, len(y_true))
    return out


# ----------------------------------------------------------------------------- checkpoints

def save_checkpoint(path: str | Path, **state) -> Path:
    """``torch.save`` atomically (temporary file, then rename)."""
    return atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """Load a checkpoint with ``weights_only=True`` (no arbitrary code from pickles)."""
    return torch.load(path, map_location=map_location, weights_only=True)


def _plain(obj):
    """Config values as JSON-safe plain types (what ``weights_only`` loading accepts)."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    return str(obj)


# ----------------------------------------------------------------------------- compile

@contextlib.contextmanager
def channels_last_layout(model: nn.Module, channels_last: bool):
    """Within the block, ``model``'s 4-D weights are in channels-last (NHWC) memory order and its 4-D
    float inputs are converted on the way in (a forward pre-hook, removed on exit; the weights keep
    their layout, their values load anywhere). On CUDA with AMP, convolutions then run NHWC
    tensor-core kernels without a transpose around each. A memory layout, not a transform: the
    values computed are the same. Yields whether it is on.
    """
    if channels_last not in (True, False):
        raise ValueError(f"channels_last must be True or False, not {channels_last!r}")
    if not channels_last:
        yield False
        return

    def to_nhwc(_module, args):
        return tuple(a.contiguous(memory_format=torch.channels_last)
                     if torch.is_tensor(a) and a.ndim == 4 and a.is_floating_point() else a for a in args)

    model.to(memory_format=torch.channels_last)
    hook = model.register_forward_pre_hook(to_nhwc)
    try:
        yield True
    finally:
        hook.remove()


def compile_for_training(model: nn.Module, torch_compile: bool | str, loader, loss_fn: Callable, device, amp_dtype=None,
                         progress: bool = True) -> tuple[nn.Module, dict]:
    """``torch.compile(model)``, compiled now on one training batch, or ``model`` with the reason.

    Args:
        model: what training steps call (the module, or its DistributedDataParallel wrapper).
        torch_compile: ``"auto"`` (on CUDA only: there it pays back its compile time within an epoch
            or two; on a CPU or MPS it often does not), ``True`` or ``False``.
        loader: the training batches ``(*inputs, y)``: a forward and backward pass on the first compiles
            both graphs before the first epoch, so a failure shows here and the compile time is
            measured apart from training. Gradients are cleared and buffers (BatchNorm
            statistics) restored afterwards: the warm-up step leaves no trace in the weights.
        loss_fn: ``loss_fn(outputs, y, progress)``.
        amp_dtype: the autocast dtype of training, or None.

    Returns:
        ``(module to train, info)``; ``info`` is ``{"requested", "used", "compile_s", "why"}``.
        A compile that fails falls back to eager training, said loudly and recorded in ``why``.
    """
    kind = torch.device(device).type
    if torch_compile not in ("auto", True, False):
        raise ValueError(f"torch_compile must be 'auto', True or False, not {torch_compile!r}")
    info = {"requested": torch_compile, "used": False, "compile_s": None, "why": None}
    if torch_compile is False or (torch_compile == "auto" and kind != "cuda"):
        info["why"] = "off" if torch_compile is False else f"auto: off on {kind} (on CUDA only)"
        return model, info
    core = getattr(model, "module", model)
    saved = {name: b.detach().clone() for name, b in core.named_buffers()}
    t0 = time.time()
    try:
        compiled = torch.compile(model)
        inputs, y = _to_device(next(iter(loader)), device)
        with torch.autocast(kind, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            loss = loss_fn(compiled(*inputs), y, 0.0)
        loss.backward()
    except Exception as e:  # noqa: BLE001 - any compiler failure: train eagerly, say so and record it
        info["why"] = f"torch.compile failed, training eagerly: {type(e).__name__}: {str(e).splitlines()[0][:300]}"
        print(f"WARNING: {info['why']}")
        return model, info
    finally:
        core.zero_grad(set_to_none=True)
        with torch.no_grad():
            for name, b in core.named_buffers():
                b.copy_(saved[name])
    info.update(used=True, compile_s=round(time.time() - t0, 1), why="compiled (torch.compile, default mode)")
    if progress:
        print(f"torch.compile: forward and backward compiled in {info['compile_s']} s")
    return compiled, info


# ----------------------------------------------------------------------------- mixup / cutmix

BATCH_MIX_OFF = {"mixup": 0.0, "cutmix": 0.0}  # the settings off; runs and checkpoints from before them ran so
# the training settings both notebooks gained after runs had been keyed, each with the value that means "as before it
# existed" (what those runs did)
SETTINGS_ADDED_LATER = {**BATCH_MIX_OFF, "monitor": "val_acc", "optimizer": "adamw"}


def unchanged_later_settings(config: dict, also: dict | None = None) -> tuple[str, ...]:
    """The :data:`SETTINGS_ADDED_LATER` (and a notebook's own, ``also``: name -> old value) that ``config`` leaves at
    their old value: a run key leaves them out (:func:`helpers.setup.config_fingerprint`'s ``exclude``), so the run
    folders of before them keep their names."""
    return tuple(k for k, old in {**SETTINGS_ADDED_LATER, **(also or {})}.items() if config.get(k, old) == old)


class BatchMix:
    """Mixup (Zhang et al., 2018) or CutMix (Yun et al., 2019) of each training batch with itself reversed.

    As timm's ``Mixup`` in its default per-batch mode: sample ``i`` is mixed with sample ``B - 1 - i``
    (``flip(0)``), with one ``lam`` for the batch drawn from ``Beta(alpha, alpha)``; with both ``mixup`` and
    ``cutmix`` on, a coin picks one per batch. Mixup blends the images, ``lam * x + (1 - lam) * partner``;
    CutMix pastes a box of the partner, its ``lam`` corrected to the share of the image left. The targets
    mix by the same ``lam``, so they may already be distributions (FER+'s votes; timm's ``Mixup`` takes
    class indices only). Unlike timm, ``lam`` is folded to ``max(lam, 1 - lam)`` (for mixup this changes
    nothing, the batch holds both orders of every pair; a CutMix box covers at most half the image):
    every sample is dominated by its own image, so inputs that cannot be blended (landmarks: the first
    input is the images, the others stay each sample's own) still belong to what the sample mostly shows.
    Label smoothing is left to the loss. The draws use torch's generator, which :func:`fit` reseeds every
    epoch, so a resumed run replays the same mixes.
    """

    def __init__(self, mixup: float = 0.0, cutmix: float = 0.0):
        check_batch_mix(mixup, cutmix)
        self.mixup, self.cutmix = float(mixup), float(cutmix)

    def __call__(self, inputs: list[torch.Tensor]) -> tuple[list[torch.Tensor], float]:
        """The batch's inputs with the images (the first) mixed, and the ``lam`` for :meth:`targets`."""
        x = inputs[0]
        use_cutmix = self.cutmix > 0 and (self.mixup == 0 or bool(torch.rand(()) < 0.5))
        alpha = self.cutmix if use_cutmix else self.mixup
        lam = float(torch.distributions.Beta(alpha, alpha).sample())
        lam = max(lam, 1.0 - lam)
        partner = x.flip(0)
        if use_cutmix:
            h, w = x.shape[-2:]
            cut = math.sqrt(1.0 - lam)  # the box's side, as a share of the image's
            bh, bw = int(h * cut), int(w * cut)
            cy, cx = (int(torch.randint(0, n, ())) for n in (h, w))  # its centre anywhere; clipped at the edges
            top, bottom = max(cy - bh // 2, 0), min(cy + bh // 2, h)
            left, right = max(cx - bw // 2, 0), min(cx + bw // 2, w)
            x = x.clone()
            x[..., top:bottom, left:right] = partner[..., top:bottom, left:right]
            lam = 1.0 - (bottom - top) * (right - left) / (h * w)
        else:
            x = lam * x + (1.0 - lam) * partner
        return [x, *inputs[1:]], lam

    @staticmethod
    def targets(y: torch.Tensor, lam: float, num_classes: int) -> torch.Tensor:
        """(B,) class indices or (B, C) distributions -> the (B, C) targets of the mixed batch."""
        target = F.one_hot(y, num_classes).float() if y.ndim == 1 else y.float()
        return lam * target + (1.0 - lam) * target.flip(0)


def check_batch_mix(mixup: float, cutmix: float) -> None:
    """Refuse a negative (or non-numeric) mixup / cutmix ``alpha`` (0 is off); notebooks call it before their data work."""
    for name, alpha in (("mixup", mixup), ("cutmix", cutmix)):
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha >= 0:
            raise ValueError(f"{name} must be a Beta(alpha, alpha) parameter >= 0 (0: off; e.g. 0.2 for mixup, 1.0 "
                             f"for cutmix), not {alpha!r}")


# ----------------------------------------------------------------------------- fit

MONITORS = ("val_acc", "val_f1_macro", "val_loss")  # what fit may select the best epoch by


def best_index(values, monitor: str) -> int:
    """Index of the first best of ``values`` of ``monitor`` (the lowest for ``val_loss``, else the highest): the
    epoch :func:`fit` keeps, or the fold a protocol keeps."""
    return int(np.argmin(values) if monitor == "val_loss" else np.argmax(values))


def best_fold(bests: list[dict]) -> int:
    """Index of the fold whose kept epoch scored best on its validation split.

    Args:
        bests: each fold's ``fit(...)["best"]``, ``{"epoch", "metric", "value"}``, all by one metric
            (lower is better for ``val_loss``, higher for the others).
    """
    metrics = {b["metric"] for b in bests}
    if len(metrics) != 1:
        raise ValueError(f"the folds were selected by different metrics ({', '.join(sorted(metrics))}): not comparable")
    return best_index([b["value"] for b in bests], metrics.pop())


def check_monitor(monitor: str) -> None:
    """Refuse a ``monitor`` that :func:`fit` cannot select by, naming the ones it can."""
    if monitor not in MONITORS:
        raise ValueError(f"monitor must be one of {', '.join(map(repr, MONITORS))}, not {monitor!r}")


def check_model_ema(model_ema: float | None) -> None:
    """Refuse a weight-average decay outside (0, 1) (notebooks call it before their data work, :func:`fit` again)."""
    if model_ema is not None and not (isinstance(model_ema, (int, float)) and 0.0 < model_ema < 1.0):
        raise ValueError(f"model_ema must be in (0, 1) (the moving average's decay, e.g. 0.99) or None, not {model_ema!r}")


def check_time_budget(budget, name: str = "time_budget_s", unit: str = "seconds") -> None:
    """Refuse a time budget that is not a positive number (notebooks call it, in their unit, before their data work)."""
    if budget is not None and not (isinstance(budget, (int, float)) and not isinstance(budget, bool) and budget > 0):
        raise ValueError(f"{name} must be a positive number of {unit} or None, not {budget!r}")


def time_left(epoch_s: list[float], epochs_left: int) -> str:
    """``"~1 h 05 min left"``: the median of the epoch times so far x the epochs left ("" when none are), so a
    researcher knows after the first epoch what a run costs on this machine."""
    if epochs_left <= 0 or not epoch_s:
        return ""
    minutes = round(statistics.median(epoch_s) * epochs_left / 60)
    return f"~{minutes // 60} h {minutes % 60:02d} min left" if minutes >= 60 else f"~{max(minutes, 1)} min left"


def fit(model: nn.Module, train_loader, val_loader, out_dir: str | Path, *, num_epochs: int, lr: float,
        weight_decay: float, device, loss_fn: Callable | None = None, seed: int = 42,
        warmup_epochs: float = 0.0, restart_epochs: int | None = None, min_lr_ratio: float = 0.0,
        clip_grad: float | None = 1.0, amp: str = "auto", monitor: str = "val_acc",
        early_stopping: int | None = None, resume: bool = True, config: dict | None = None,
        extra_state: dict | None = None, on_epoch_end: Callable[[dict], None] | None = None,
        run_key: str | None = None, progress: bool = True, find_unused_parameters: bool = False,
        torch_compile: bool | str = False, channels_last: bool = False,
        layer_decay: float | None = None, model_ema: float | None = None, val_tta_flip: bool = False,
        mixup: float = 0.0, cutmix: float = 0.0, optimizer: str = "adamw", time_budget_s: float | None = None) -> dict:
    """Train with checkpoints, history, early stopping and resume.

    Args:
        model: any module; batches are ``(*inputs, y)`` and it is called as ``model(*inputs)``.
        train_loader, val_loader: from :func:`make_loader`.
        out_dir: where ``last.pth``, ``best_model.pth`` and ``history.json`` go.
        num_epochs: epochs (also the cosine period).
        lr: peak learning rate. weight_decay: AdamW decoupled weight decay (SGD: its L2 term).
        device: training device.
        loss_fn: ``loss_fn(outputs, y, progress)``; default :func:`cross_entropy_loss`.
        seed: seeds every epoch (see module docstring).
        warmup_epochs, restart_epochs, min_lr_ratio: schedule (see :func:`build_scheduler`).
        clip_grad: max gradient norm, None to disable.
        amp: see :func:`resolve_amp`; fp16 uses a GradScaler.
        monitor: what chooses ``best_model.pth`` and counts for early stopping: ``"val_acc"``,
            ``"val_f1_macro"`` (macro F1 over all classes: the rare ones weigh as much as the common ones;
            higher is better for both) or ``"val_loss"`` (lower is better). Every epoch's history row holds
            all three.
        early_stopping: stop after this many epochs without improvement (None: never).
        resume: continue from ``out_dir/last.pth`` when it exists and is not finished.
        config: saved in every checkpoint (the notebook's ``config`` dict).
        extra_state: more plain values to store in ``best_model.pth`` (class names, ...).
        on_epoch_end: called with each epoch's history row after the checkpoint is written.
        run_key: identity of the training settings, stored in ``last.pth``; resuming a
            checkpoint with another key is refused (default: a hash of ``config``; pass
            :func:`config_fingerprint` of the training-relevant keys to allow other changes).
        progress: tqdm bars and a line per epoch (rank 0 only under torchrun).
        find_unused_parameters: passed to DistributedDataParallel (a model with branches
            that some steps skip needs it).
        torch_compile: ``torch.compile`` the training step: ``"auto"`` (CUDA only), ``True`` or ``False``
            (see :func:`compile_for_training`; evaluation stays eager; checkpoints hold the plain
            module's weights either way).
        channels_last: train and validate in channels-last memory order (see
            :func:`channels_last_layout`), recorded.
        layer_decay: layer-wise learning-rate decay of the backbone (see :func:`build_optimizer`); None: off.
        model_ema: decay ``d`` of an exponential moving average of the weights (timm's ``ModelEmaV3``): a
            copy after the first step, then ``ema = d * ema + (1 - d) * weights`` after every step (it averages
            about the last ``1 / (1 - d)`` steps), e.g. 0.99; validation, ``best_model.pth`` and early
            stopping then use the averaged weights (``last.pth`` keeps both). None: off.
        val_tta_flip: validate each epoch with flip test-time augmentation (see :func:`evaluate`), so that the
            epoch is chosen by the rule the test predictions use; the history keeps the one-view accuracy
            beside it (``val_acc_single``). Models with one input only.
        mixup, cutmix: ``alpha`` of mixup / CutMix of every training batch (:class:`BatchMix`; both on: one or
            the other per batch); 0: off. The loss must take (B, C) targets (both notebooks' losses do).
        optimizer: ``"adamw"`` or ``"sgd"`` (Nesterov momentum 0.9; see :func:`build_optimizer`), recorded.
        time_budget_s: seconds the epochs may take in all (training and validation, summed over every call of a
            resumed run; model set-up and compile are not counted). After each epoch the run re-plans its
            length (:func:`plan_epochs`, at most ``num_epochs``): the cosine schedule and the model's
            ``set_progress`` share then end with the last epoch that fits, so a slower machine trains fewer
            epochs and still anneals. The plan is in every history row (``planned_epochs``), recorded; the
            number of epochs then depends on the machine's speed. None: ``num_epochs`` epochs. Not with
            ``restart_epochs``.

    Under torchrun the model is wrapped in DistributedDataParallel here, every rank runs the
    same epochs on its share of the data, validation figures are those of the whole
    validation set, and only rank 0 writes checkpoints (of the unwrapped model, so they load
    in one process) and history. ``batch_size`` stays per process, lr is not rescaled.

    Returns:
        ``{"history": [...], "best": {...}, "best_path", "last_path", "epochs_run", "stopped_early",
        "wall_s" (this call), "epochs_s" (the epochs' own time, whenever they trained), "world_size", "compile",
        "channels_last", "model_ema", "val_tta_flip", "mixup", "cutmix", "optimizer", "time_budget_s",
        "planned_epochs"}``.
    """
    check_model_ema(model_ema)
    check_time_budget(time_budget_s)
    if time_budget_s is not None and restart_epochs:
        raise ValueError("time_budget_s re-plans one cosine cycle; it does not combine with restart_epochs")
    check_monitor(monitor)
    check_optimizer(optimizer)
    mix = BatchMix(mixup, cutmix) if (mixup or cutmix) else None  # checks both
    out_dir = Path(out_dir)
    device = torch.device(device)
    loss_fn = loss_fn or cross_entropy_loss()
    # one process trains a run folder at a time: a second run with the same settings waits, then resumes
    # (finds it finished); under torchrun the ranks of one job share it
    lock = output_lock(out_dir, "training") if not distributed.is_distributed() else contextlib.nullcontext()
    with lock, channels_last_layout(model, channels_last) as nhwc:
        rank, world = distributed.get_rank(), distributed.get_world_size()
        main = rank == 0
        progress = progress and main
        model.to(device)
        optimizer_kind, optimizer = optimizer, build_optimizer(model, lr, weight_decay, layer_decay=layer_decay,
                                                              optimizer=optimizer)
        scheduler = build_scheduler(optimizer, num_epochs, len(train_loader), warmup_epochs, restart_epochs, min_lr_ratio)
        amp_dtype = resolve_amp(amp, device)
        scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
        higher = monitor != "val_loss"
        history, best, start, waited, trained_by = [], None, 0, 0, world
        horizon = num_epochs  # the epochs planned: num_epochs, or what the time budget holds
        last_path, best_path = out_dir / "last.pth", out_dir / "best_model.pth"
        config = _plain(config or {})
        run_key = run_key or config_fingerprint(config)
        if resume and last_path.exists():
            ckpt = load_checkpoint(last_path)
            # fit's own settings (not in config) count too; checkpoints from before val_tta_flip validated one
            # view, those from before mixup / cutmix mixed nothing, those from before monitor chose by val_acc,
            # those from before optimizer_kind trained with AdamW
            own = [k for k, value, absent in (("model_ema", model_ema, None), ("val_tta_flip", val_tta_flip, False),
                                              ("monitor", monitor, "val_acc"), ("optimizer_kind", optimizer_kind, "adamw"),
                                              ("time_budget_s", time_budget_s, None),
                                              *((k, v, BATCH_MIX_OFF[k]) for k, v in (("mixup", mixup), ("cutmix", cutmix))))
                   if ckpt.get(k, absent) != value]
            if ckpt.get("run_key") != run_key or own:
                changed = sorted(k for k in set(config) | set(ckpt["config"]) if config.get(k) != ckpt["config"].get(k))
                changed += [k for k in own if k not in changed]
                raise ValueError(f"{last_path} was written with other settings ({', '.join(changed) or 'run_key'}); "
                                 "resuming would mix two runs. Use another out_dir, delete it, or pass resume=False.")
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
            if scaler is not None and ckpt.get("scaler"):
                scaler.load_state_dict(ckpt["scaler"])
            history, best, start, waited = ckpt["history"], ckpt["best"], ckpt["epoch"], ckpt["waited"]
            trained_by = ckpt.get("world_size", 1)
            if time_budget_s is not None:  # the budget's plan goes on; without one, num_epochs (it may extend a run)
                horizon = ckpt.get("planned_epochs", num_epochs)
            scheduler.lr_lambdas[0].plan(horizon)
            if progress:
                print(f"Resuming from {last_path} after epoch {start}")
        stopped = bool(history) and history[-1].get("stopped_early", False)
        # the schedule's length and the data order depend on the number of processes
        if start < horizon and not stopped and trained_by != world:
            raise ValueError(f"{last_path} was trained by {trained_by} process(es) and this run has {world}: the "
                             f"schedule and data order would change mid-run. Resume it with {trained_by} "
                             "process(es), or start afresh (resume=False).")
        core = model  # what checkpoints hold: never the DDP wrapper, so they load in one process
        ema = None
        if model_ema is not None:  # the live weights train; validation and best_model.pth use their average
            from timm.utils import ModelEmaV3

            ema = ModelEmaV3(core, decay=model_ema)  # given the step: a copy at step 1
            if start:
                ema.module.load_state_dict(ckpt["ema"])
        rated = core if ema is None else ema.module  # the weights validated and kept as best
        if distributed.is_distributed():
            model = nn.parallel.DistributedDataParallel(core, device_ids=[device.index] if device.type == "cuda" else None,
                                                        find_unused_parameters=find_unused_parameters)
        compile_info = {"requested": torch_compile, "used": False, "compile_s": None, "why": "nothing left to train"}
        if start < horizon and not stopped:
            model.train()
            model, compile_info = compile_for_training(model, torch_compile, train_loader, loss_fn, device, amp_dtype,
                                                       progress)
        t0, timed = time.time(), []  # timed: this call's epoch times (a resumed run's earlier ones may be another machine's)
        for epoch in range(start, num_epochs):
            if stopped or epoch >= horizon:
                break
            # Everything random in this epoch derives from (seed, epoch, rank): resume replays it exactly.
            epoch_seed = (seed * 1000 + epoch) * world + rank  # one process: seed * 1000 + epoch, as before DDP
            torch.manual_seed(epoch_seed)
            if hasattr(train_loader.dataset, "set_epoch_seed"):  # per item: workers can persist across epochs
                train_loader.dataset.set_epoch_seed(epoch_seed)
            else:
                _reseed_transform(train_loader.dataset, epoch_seed)
            if hasattr(train_loader.sampler, "set_epoch"):
                train_loader.sampler.set_epoch(epoch)
            for gen in (getattr(train_loader, "generator", None), getattr(train_loader.sampler, "generator", None)):
                if isinstance(gen, torch.Generator):  # the shuffle (or weighted draw) of this epoch, resumable
                    gen.manual_seed(epoch_seed)
            te = time.time()
            tr = train_one_epoch(model, train_loader, optimizer, scheduler, loss_fn, device, epoch, horizon,
                                 scaler, amp_dtype, clip_grad, progress,
                                 after_step=None if ema is None else lambda step: ema.update(core, step=step), mix=mix)
            train_s = time.time() - te
            # the unwrapped model with rank 0's buffers: what best_model.pth will hold; the same figures on every rank
            distributed.broadcast_buffers(core)
            if ema is not None:
                distributed.broadcast_buffers(ema.module)
            va = evaluate(rated, val_loader, device, loss_fn, amp_dtype, tta_flip=val_tta_flip)
            row = {"epoch": epoch + 1, "train_loss": tr["loss"], "train_acc": tr["acc"], "val_loss": va["loss"],
                   "val_acc": va["acc"], "val_f1_macro": macro_f1(va["y_true"], va["y_pred"], va["probs"].shape[1]),
                   "lr": optimizer.param_groups[0]["lr"], "epoch_s": time.time() - te,
                   "train_s": train_s, "train_samples": tr["samples"], "world_size": world}
            if val_tta_flip:  # the one-view figure beside the one that selects
                row["val_acc_single"] = va["acc_single"]
            if time_budget_s is not None:  # rank 0's plan on every rank: their clocks differ
                horizon = distributed.broadcast_int(
                    plan_epochs([r["epoch_s"] for r in history] + [row["epoch_s"]], time_budget_s, num_epochs), device)
                scheduler.lr_lambdas[0].plan(horizon)
            row["planned_epochs"] = horizon
            value = row[monitor]
            improved = best is None or (value > best["value"] if higher else value < best["value"])
            if improved:
                best, waited = {"epoch": epoch + 1, "metric": monitor, "value": value}, 0
                if main:
                    save_checkpoint(best_path, model=rated.state_dict(), epoch=epoch + 1, best=best, config=config,
                                    world_size=world, **_plain(extra_state or {}))
            else:
                waited += 1
            stopped = early_stopping is not None and waited >= early_stopping
            row["stopped_early"] = stopped
            history.append(row)
            if main:
                save_checkpoint(last_path, model=core.state_dict(), optimizer=optimizer.state_dict(),
                                scheduler=scheduler.state_dict(), scaler=scaler.state_dict() if scaler else None,
                                epoch=epoch + 1, history=history, best=best, waited=waited, config=config,
                                run_key=run_key, world_size=world, model_ema=model_ema, val_tta_flip=val_tta_flip,
                                mixup=mixup, cutmix=cutmix, monitor=monitor, optimizer_kind=optimizer_kind,
                                time_budget_s=time_budget_s, planned_epochs=horizon,
                                ema=None if ema is None else ema.module.state_dict())
                save_json(history, out_dir / "history.json")
            if progress:
                timed.append(row["epoch_s"])
                left = "" if stopped else time_left(timed, horizon - epoch - 1)
                print(f"epoch {epoch + 1:3d}/{horizon}  train loss {tr['loss']:.4f} acc {tr['acc']:.3f}  "
                      f"val loss {va['loss']:.4f} acc {va['acc']:.3f}  {row['epoch_s']:.0f}s" + ("  *" if improved else "")
                      + (f"  ({left})" if left else ""))
            if on_epoch_end is not None:
                on_epoch_end(row)
        if stopped and progress:
            print(f"Early stopping: no {monitor} improvement for {early_stopping} epochs")
        distributed.barrier()  # the other ranks may read best_model.pth next
        return {"history": history, "best": best, "best_path": best_path, "last_path": last_path,
                "epochs_run": len(history), "stopped_early": stopped, "wall_s": time.time() - t0,
                # what the epochs took when they trained, in this call or before (a reused run: its training, not 0)
                "epochs_s": sum(r.get("epoch_s", 0.0) for r in history), "world_size": world,
                "compile": compile_info, "channels_last": nhwc, "model_ema": model_ema, "val_tta_flip": val_tta_flip,
                "mixup": mixup, "cutmix": cutmix, "optimizer": optimizer_kind, "time_budget_s": time_budget_s,
                "planned_epochs": horizon}

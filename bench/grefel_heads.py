"""Which classes each output head of a trained GReFEL checkpoint has learned, side by side across checkpoints.

For every head the model has (``probs``: the plain classifier p; ``final_probs``: the balanced output; with
reliability balancing also ``anchor_probs`` and ``attention_probs``, each correction branch alone) and every class:
how many images of the split it predicts as that class, the mean probability it gives the true class on the images
of that class, and the mean rank of the true class there (0: its top choice; (C - 1) / 2 is what an uninformed
head scores). One view, the notebook's batch for the split (the balancing attends over the batch). Tells a rare
class a head ranks second (a threshold question: logit adjustment) from one it never learned (rank near chance).

    OMP_NUM_THREADS=2 .venv/bin/python bench/grefel_heads.py <run>/best_model.pth [<run2>/best_model.pth ...] \\
        --cache <workdir>/cache/ferplus_real_64px_lm.h5 --part val --json out.json
"""

from __future__ import annotations

import argparse

import numpy as np

from grefel_tta import split_loader  # also puts the repository on sys.path

import helpers as H  # noqa: E402

HEADS = ("probs", "final_probs", "anchor_probs", "attention_probs")


def head_stats(probs: np.ndarray, y: np.ndarray, class_names: list[str]) -> dict:
    """(N, C) probabilities and (N,) labels -> accuracy and, per class: ``predicted`` (images predicted as it),
    ``support``, ``mean_p_true`` and ``mean_rank_true`` (over the images of that class; None without any)."""
    pred = probs.argmax(1)
    p_true = probs[np.arange(len(y)), y]
    rank = (probs > p_true[:, None]).sum(1)  # classes scored above the true one
    per_class = {}
    for c, name in enumerate(class_names):
        mine = y == c
        per_class[name] = {"predicted": int((pred == c).sum()), "support": int(mine.sum()),
                           "mean_p_true": float(p_true[mine].mean()) if mine.any() else None,
                           "mean_rank_true": float(rank[mine].mean()) if mine.any() else None}
    return {"accuracy": float((pred == y).mean()), "per_class": per_class}


def heads(checkpoint: str, cache: str, part: str = "val", device="cpu", batch_size: int | None = None) -> dict:
    """``{"checkpoint", "part", "images", "components", "heads": {head: head_stats}}`` for one checkpoint."""
    ev, loader, idx, batch_size = split_loader(checkpoint, cache, part, device, batch_size)
    o = ev.outputs(loader)
    return {"checkpoint": str(checkpoint), "part": part, "images": int(len(idx)), "batch_size": batch_size,
            "components": ev.config.get("components"), "class_names": list(ev.class_names),
            "heads": {h: head_stats(o[h], o["y"], list(ev.class_names)) for h in HEADS if h in o}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoints", nargs="+", help="best_model.pth files the GReFEL notebook wrote")
    ap.add_argument("--cache", required=True, help="the notebook's landmark cache at the checkpoints' size")
    ap.add_argument("--part", default="val", help="the split to read (val: FER2013Valid)")
    ap.add_argument("--batch-size", type=int, help="default: the notebook's for the split")
    ap.add_argument("--device", default="auto", help="auto (H.select_device), cpu, cuda, mps")
    ap.add_argument("--json", help="also write the figures here")
    a = ap.parse_args()
    out = [heads(c, a.cache, a.part, H.select_device(a.device), a.batch_size) for c in a.checkpoints]
    for run in out:
        print(f"{run['checkpoint']} ({run['components']}): {run['part']}, {run['images']} images, batch {run['batch_size']}")
        names = run["class_names"]
        print(f"  {'head':16s} {'accuracy':>8s}  " + "  ".join(f"{n[:9]:>17s}" for n in names))
        print(f"  {'':16s} {'':>8s}  " + "  ".join(f"{'pred / p / rank':>17s}" for _ in names))
        for h, s in run["heads"].items():
            cells = []
            for n in names:
                c = s["per_class"][n]
                cells.append(f"{c['predicted']:5d} / " + (f"{c['mean_p_true']:.2f} / {c['mean_rank_true']:.1f}"
                                                          if c["support"] else "   -   "))
            print(f"  {h:16s} {s['accuracy']:8.4f}  " + "  ".join(f"{c:>17s}" for c in cells))
    if a.json:
        H.save_json({"runs": out}, a.json)


if __name__ == "__main__":
    main()

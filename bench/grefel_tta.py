"""Test-time views of a trained GReFEL checkpoint, side by side on FER2013Valid: which ``tta_shift`` to use.

The notebook's evaluator (its cells tagged ``grefel-model``) scores the checkpoint over one split of the
notebook's landmark cache with one view, the mirror pair (``tta_flip``), and the mirror pair plus the
views moved ``s`` pixels right, left, down and up (``tta_shift=s``, 10 views) for each ``--shifts`` value:
accuracy, macro F1 and classes predicted of the final output, each row against the mirror pair.
Choose on ``--part val`` (FER2013Valid); the test split is the notebook's to read, once, with the
chosen setting (``-p tta_shift s``: an evaluation setting, so a finished run is evaluated again, not
retrained).

    OMP_NUM_THREADS=2 .venv/bin/python bench/grefel_tta.py <run folder>/best_model.pth <workdir>/cache/ferplus_real_48px_lm.h5 --json out.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent)]
import helpers as H  # noqa: E402
from grefel_pilot import model_cells  # noqa: E402


def score(o: dict, class_names: list[str], votes: np.ndarray | None = None) -> dict:
    """Accuracy, macro F1 and classes predicted of the final output; with FER+'s ``votes`` of the images also the
    accuracy under the FERPlus paper's test protocol (``paper_accuracy``: its clear majorities only)."""
    pred = o["final_probs"].argmax(1)
    m = H.compute_metrics(o["y"], pred, class_names)
    paper = {} if votes is None else {"paper_accuracy": H.ferplus_paper_accuracy(votes, pred, o["y"])["accuracy"]}
    return {k: m[k] for k in ("accuracy", "f1_macro", "predicted_classes")} | paper


def view_name(row: dict) -> str:
    """A row's view set in words: "one view", "mirror pair" or "mirror pair + shifts of s px"."""
    shifts = f" + shifts of {row['tta_shift']} px" if row["tta_shift"] else ""
    return ("mirror pair" if row["tta_flip"] else "one view") + shifts


def split_loader(checkpoint: str, cache: str, part: str, device="cpu", batch_size: int | None = None):
    """The notebook's evaluator for a checkpoint and a loader over one split of its landmark cache ->
    ``(evaluator, loader, indices, batch_size)``. ``batch_size`` None: the notebook's for that split (the run's
    ``batch_size`` for validation, 128 for test), since reliability balancing attends over the batch."""
    ev = model_cells()["GReFELEvaluator"](checkpoint, device)
    meta, _ = H.read_cache_meta(cache)
    idx = np.flatnonzero(meta["split"].to_numpy() == part)
    if not len(idx):
        raise SystemExit(f"{cache} has no {part!r} split (it has: {', '.join(sorted(set(meta['split'])))})")
    batch_size = batch_size or (ev.config["batch_size"] if part == "val" else 128)
    loader = H.make_loader(H.H5Dataset(cache, idx, ev.transform, in_memory=True, landmarks=True), batch_size,
                           shuffle=False)
    return ev, loader, idx, batch_size


def compare(checkpoint: str, cache: str, part: str, shifts: list[int], device="cpu", batch_size: int | None = None,
            keep_outputs: bool = False) -> dict:
    """One row a view set: ``{"views", "tta_flip", "tta_shift", "accuracy", "f1_macro", "predicted_classes", "s"}``
    (and its ``final_probs`` with ``keep_outputs``, then the split's labels in ``y``). ``batch_size`` None: the
    notebook's for that split (the run's ``batch_size`` for validation, 128 for test), since reliability
    balancing attends over the batch."""
    ev, loader, idx, batch_size = split_loader(checkpoint, cache, part, device, batch_size)
    votes = H.read_cache_votes(cache, idx)  # FER+: the paper's protocol beside (None for data without votes)
    rows = []
    for flip, shift in [(False, 0), (True, 0), *((True, s) for s in shifts if s)]:
        t0 = time.time()
        o = ev.outputs(loader, tta_flip=flip, tta_shift=shift)
        rows.append({"views": (5 if shift else 1) * (2 if flip else 1), "tta_flip": flip, "tta_shift": shift,
                     **score(o, ev.class_names, votes), "s": round(time.time() - t0, 1),
                     **({"final_probs": o["final_probs"]} if keep_outputs else {})})
    return {"checkpoint": str(checkpoint), "cache": str(cache), "part": part, "images": int(len(idx)),
            "batch_size": batch_size, "device": str(device),
            "config": {k: ev.config.get(k) for k in ("components", "image_size", "backbone", "backbone_args",
                                                     "num_epochs")},
            "class_names": list(ev.class_names), "rows": rows,
            "paper_protocol": None if votes is None else {"images": int(H.ferplus_paper_subset(votes).sum()),
                                                          "rule": H.FERPLUS_PAPER_RULE},
            **({"y": o["y"], "votes": votes} if keep_outputs else {})}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="a best_model.pth the GReFEL notebook wrote")
    ap.add_argument("cache", help="the notebook's landmark cache at the checkpoint's size (<workdir>/cache/*_lm.h5)")
    ap.add_argument("--part", default="val", help="the split to score (val: FER2013Valid; choose there)")
    ap.add_argument("--shifts", type=int, nargs="+", default=[1, 2, 3, 4], help="tta_shift values, px")
    ap.add_argument("--batch-size", type=int, help="default: the notebook's for the split (reliability balancing "
                    "attends over the batch)")
    ap.add_argument("--device", default="auto", help="auto (H.select_device), cpu, cuda, mps")
    ap.add_argument("--json", help="also write the rows here")
    a = ap.parse_args()
    out = compare(a.checkpoint, a.cache, a.part, a.shifts, H.select_device(a.device), a.batch_size)
    base = next(r for r in out["rows"] if r["tta_flip"] and not r["tta_shift"])
    print(f"{out['part']}: {out['images']} images, batch {out['batch_size']}, {out['device']}; {out['config']}")
    for r in out["rows"]:
        print(f"{view_name(r):28s} {r['views']:2d} views  accuracy {r['accuracy']:.4f} ({r['accuracy'] - base['accuracy']:+.4f})  "
              f"macro F1 {r['f1_macro']:.4f}  {r['predicted_classes']} classes  {r['s']:.0f} s"
              + (f"  paper protocol {r['paper_accuracy']:.4f}" if "paper_accuracy" in r else ""))
    if a.json:
        H.save_json(out, a.json)


if __name__ == "__main__":
    main()

"""Several trained GReFEL checkpoints averaged: what an ensemble of runs scores, beside each of its members.

Each checkpoint is scored by the notebook's evaluator over one split of the notebook's landmark cache, with the
same view sets as ``bench/grefel_tta.py`` (one view, the mirror pair, the mirror pair plus ``--shifts``); the
ensemble averages the members' final probabilities of each view set. It answers "what would N runs (N times the
training budget, or N seeds on a GPU) give?"; it is not a notebook setting, and the notebook's own figure is one
run's. Choose on ``--part val`` (FER2013Valid); read ``--part test`` once for what validation chose.

    OMP_NUM_THREADS=2 .venv/bin/python bench/grefel_ensemble.py <run A>/best_model.pth <run B>/best_model.pth --cache <workdir>/cache/ferplus_real_64px_lm.h5 --shifts 3
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent)]
import helpers as H  # noqa: E402
from grefel_tta import compare, score, view_name  # noqa: E402


def ensemble(checkpoints: list[str], cache: str, part: str, shifts: list[int], device="cpu",
             keep_outputs: bool = False) -> dict:
    """One row a view set: the members' ``accuracy`` and ``f1_macro`` and the ensemble's (mean of the members'
    final probabilities, kept in ``final_probs`` with ``keep_outputs``). The members must have been trained on the
    same classes; one cache, so one image order."""
    if len(checkpoints) < 2:
        raise SystemExit(f"an ensemble needs at least two checkpoints, got {len(checkpoints)}")
    members = [compare(c, cache, part, shifts, device, keep_outputs=True) for c in checkpoints]
    first = members[0]
    for c, m in zip(checkpoints[1:], members[1:]):
        if m["class_names"] != first["class_names"]:
            raise SystemExit(f"{c}: classes {m['class_names']} differ from {checkpoints[0]}'s {first['class_names']}")
    rows = []
    for i, row in enumerate(first["rows"]):
        probs = np.mean([m["rows"][i]["final_probs"] for m in members], axis=0)  # (N, C)
        rows.append({k: row[k] for k in ("views", "tta_flip", "tta_shift")}
                    | score({"final_probs": probs, "y": first["y"]}, first["class_names"], first["votes"])
                    | {"members": [{k: m["rows"][i][k] for k in ("accuracy", "f1_macro", "predicted_classes")}
                                   for m in members]}
                    | ({"final_probs": probs} if keep_outputs else {}))
    return {"checkpoints": [str(c) for c in checkpoints], "cache": str(cache), "part": part,
            "images": first["images"], "device": str(device), "configs": [m["config"] for m in members], "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoints", nargs="+", help="best_model.pth files the GReFEL notebook wrote (two or more)")
    ap.add_argument("--cache", required=True, help="the notebook's landmark cache at the checkpoints' size")
    ap.add_argument("--part", default="val", help="the split to score (val: FER2013Valid; choose there)")
    ap.add_argument("--shifts", type=int, nargs="*", default=[3], help="tta_shift values, px (the cpu profile's: 3)")
    ap.add_argument("--device", default="auto", help="auto (H.select_device), cpu, cuda, mps")
    ap.add_argument("--json", help="also write the rows here")
    a = ap.parse_args()
    out = ensemble(a.checkpoints, a.cache, a.part, a.shifts, H.select_device(a.device))
    print(f"{out['part']}: {out['images']} images, {len(out['checkpoints'])} members, {out['device']}")
    for r in out["rows"]:
        members = " / ".join(f"{m['accuracy']:.4f}" for m in r["members"])
        print(f"{view_name(r):28s} {r['views']:2d} views  members {members}  ensemble {r['accuracy']:.4f} "
              f"({r['accuracy'] - max(m['accuracy'] for m in r['members']):+.4f} over the best member)  "
              f"macro F1 {r['f1_macro']:.4f}  {r['predicted_classes']} classes"
              + (f"  paper protocol {r['paper_accuracy']:.4f}" if "paper_accuracy" in r else ""))
    if a.json:
        H.save_json(out, a.json)


if __name__ == "__main__":
    main()

"""Several DFER_GCViT runs on the same folds averaged: what an ensemble of runs scores, fold by fold, beside its members.

Each run folder (``<workdir>/DFER_GCViT/runs/<key>``, with its ``run.json`` and ``fold_k/best_model.pth``) is scored
by the recipe's own evaluation (``H.fold_outputs``: the run's transform, batch, precision and flip TTA); fold k's
ensemble averages the members' fold-k probabilities. The runs must hold the same folds (the same protocol, folds and
seed: the same images, by content hash, in the same order); their recipes may differ (mixup, CutMix, epochs, crops).
It answers "what would N runs (N times the folds' training) give?" for any runs; the notebook's ``train_seeds``
trains and evaluates an ensemble of seeds itself (the same scoring, ``H.evaluate_members``). A member's validation
figure is its best epoch's (the epoch was chosen on it), so on ``--part val`` the ensemble is not comparable with its
members: the test part is where they compare.

    OMP_NUM_THREADS=2 .venv/bin/python bench/dfer_ensemble.py <workdir>/DFER_GCViT/runs/<run A> <run B> --part test
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import helpers as H  # noqa: E402

FIGURES = ("accuracy", "f1_macro")  # what H.evaluate_members keeps of each member


def ensemble(runs: list[str], part: str = "test", device="cpu") -> dict:
    """Fold by fold, each member's ``accuracy`` and ``f1_macro`` and the ensemble's metrics (``H.outputs_metrics``
    of the mean probabilities, sequence level included); over the folds, ``H.fold_summary`` of both (as the
    notebook's tables: mean, population std, 95% interval)."""
    if len(runs) < 2:
        raise SystemExit(f"an ensemble needs at least two run folders, got {len(runs)}")
    specs = [H.read_run_spec(Path(r) / "run.json") for r in runs]
    first = specs[0]
    for r, s in zip(runs[1:], specs[1:]):
        if s["class_names"] != first["class_names"] or len(s["folds"]) != len(first["folds"]):
            raise SystemExit(f"{r}: classes {s['class_names']} and {len(s['folds'])} folds differ from {runs[0]}'s "
                             f"{first['class_names']} and {len(first['folds'])} folds")
    folds = []
    for k in range(len(first["folds"])):
        checkpoints = [Path(r) / f"fold_{k + 1}" / "best_model.pth" for r in runs]
        for r, checkpoint in zip(runs, checkpoints):
            if not checkpoint.is_file():
                raise SystemExit(f"{checkpoint} does not exist: run {r} has not finished fold {k + 1}")
        try:
            metrics = H.evaluate_members(specs, k, checkpoints, part, device)  # members' FIGURES beside the mean's
        except ValueError as e:  # other folds or seed: their images differ
            raise SystemExit(str(e)) from None
        members = metrics.pop("members")
        folds.append({"fold": k + 1, "images": metrics["num_samples"], "members": members, "ensemble": metrics})
    seq = [f["ensemble"]["sequence"] for f in folds]
    return {"runs": [str(r) for r in runs], "part": part, "device": str(device), "folds": folds,
            "members_mean": [{f: H.fold_summary([fo["members"][i][f] for fo in folds]) for f in FIGURES}
                             for i in range(len(runs))],
            "ensemble_mean": {f: H.fold_summary([fo["ensemble"][f] for fo in folds]) for f in FIGURES}
            | ({"sequence_majority_vote": H.fold_summary([q["accuracy_majority_vote"] for q in seq])}
               if all(seq) else {})}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="run folders the DFER_GCViT notebook wrote (two or more, the same folds)")
    ap.add_argument("--part", default="test", help="the fold part to score: test, or val (not comparable, see above)")
    ap.add_argument("--device", default="auto", help="auto (H.select_device), cpu, cuda, mps")
    ap.add_argument("--json", help="also write the result here")
    a = ap.parse_args()
    out = ensemble(a.runs, a.part, H.select_device(a.device))
    print(f"{out['part']}: {len(out['runs'])} members, {len(out['folds'])} folds, {out['device']}")
    for f in out["folds"]:
        members = " / ".join(f"{100 * m['accuracy']:.1f}" for m in f["members"])
        print(f"fold {f['fold']} ({f['images']} images): members {members}%, ensemble {100 * f['ensemble']['accuracy']:.1f}%")
    for i, (run, m) in enumerate(zip(out["runs"], out["members_mean"])):
        print(f"member {i + 1} {Path(run).name}: accuracy {100 * m['accuracy']['mean']:.1f}% +- "
              f"{100 * m['accuracy']['std']:.1f}%, macro F1 {100 * m['f1_macro']['mean']:.1f}%")
    e = out["ensemble_mean"]
    seq = e.get("sequence_majority_vote")
    print(f"ensemble: accuracy {100 * e['accuracy']['mean']:.1f}% +- {100 * e['accuracy']['std']:.1f}%, macro F1 "
          f"{100 * e['f1_macro']['mean']:.1f}%" + (f", sequence level {100 * seq['mean']:.1f}%" if seq else ""))
    if a.json:
        H.save_json(out, a.json)
        print(f"wrote {a.json}")


if __name__ == "__main__":
    main()

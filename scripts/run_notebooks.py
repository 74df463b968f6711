"""Execute both notebooks headless with papermill; executed copies land in data-exploration/runs/,
one file per execution (<notebook>-<date>-<time>-<pid>.ipynb), so runs started side by side keep theirs.

Usage: python scripts/run_notebooks.py [--profile smoke] [--workdir data-exploration]
       [--only DFER_GCViT] [-p name value ...]
"""

from __future__ import annotations

import argparse
import ast
import os
import sys
import time
from pathlib import Path

import papermill as pm

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ("DFER_GCViT", "GReFEL")


def run_notebook(name: str, out_dir: Path, parameters: dict) -> Path:
    """Execute ``<name>.ipynb`` from the repo root with papermill and return the executed copy
    (``<name>-<YYYYmmdd-HHMMSS>-<pid>.ipynb``: never shared with another execution)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.ipynb"
    print(f"{name}: executing -> {out}", flush=True)
    pm.execute_notebook(ROOT / f"{name}.ipynb", out, parameters=parameters, cwd=str(ROOT),
                        kernel_name="python3", progress_bar=False, log_output=False)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="smoke", choices=("smoke", "cpu", "gpu", "paper"))
    ap.add_argument("--workdir", default="data-exploration")
    ap.add_argument("--only", choices=NOTEBOOKS, action="append")
    ap.add_argument("-p", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                    help="extra notebook parameter (Python literal or string)")
    args = ap.parse_args(argv)
    params = {"profile": args.profile, "workdir": args.workdir}
    for k, v in args.p:
        try:
            params[k] = ast.literal_eval(v)
        except (ValueError, SyntaxError):
            params[k] = v
    sys.path.insert(0, str(ROOT))
    from helpers import output_folder

    try:  # a read-only or full working directory: say so before any notebook starts
        runs = output_folder(args.workdir, "runs")
    except OSError as e:
        print(f"run_notebooks: {e.strerror}", file=sys.stderr)
        return 2
    failed = []
    for name in args.only or NOTEBOOKS:
        t0 = time.time()
        try:
            out = run_notebook(name, runs, params)
            print(f"{name}: done in {time.time() - t0:.0f} s -> {out}")
        except pm.PapermillExecutionError as e:
            print(f"{name}: FAILED in cell {e.exec_count}: {e.ename}: {e.evalue}\n"
                  f"  the executed copy above holds the traceback", file=sys.stderr)
            failed.append(name)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

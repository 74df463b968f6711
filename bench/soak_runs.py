"""Soak: N notebook runs at once in one working directory, then the checks of the fault matrix, with figures.

Half the runs differ in ``lr`` and half repeat a setting already running, as a sweep
started twice by accident would. Every run must succeed; the archive must be extracted and
the cache built exactly once; every results file must parse and name its own settings and
run folder; runs with equal settings must share one run folder trained once; no temporary
file may be left. Prints the wall time, each run's time and the counts.

Usage: .venv/bin/python bench/soak_runs.py [--runs 8] [--workdir /tmp/soak] [--notebook DFER_GCViT]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]


def _outputs(executed: Path) -> str:
    nb = nbformat.read(executed, as_version=4)
    return "\n".join(str(o.get("text", "")) for c in nb.cells if c.cell_type == "code" for o in c.outputs)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=8)
    ap.add_argument("--workdir", default="/tmp/fer-soak")
    ap.add_argument("--notebook", default="DFER_GCViT", choices=("DFER_GCViT", "GReFEL"))
    args = ap.parse_args(argv)
    workdir = Path(args.workdir)
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    lrs = [f"{1e-3 / (1 + i // 2):.6g}" for i in range(args.runs)]  # pairs: each setting twice
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    t0 = time.time()
    procs = []
    for lr in lrs:
        cmd = [sys.executable, str(ROOT / "scripts" / "run_notebooks.py"), "--only", args.notebook, "--workdir",
               str(workdir), "-p", "lr", lr, "-p", "export", "False"]
        procs.append((lr, time.time(), subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                                       stderr=subprocess.STDOUT, text=True)))
    done = []
    for lr, start, p in procs:
        log = p.communicate()[0]
        done.append({"lr": lr, "rc": p.returncode, "s": round(time.time() - start, 1), "log": log})
    wall = time.time() - t0
    failures = []
    for d in done:
        if d["rc"]:
            failures.append(f"run lr={d['lr']} exited {d['rc']}: {d['log'][-1500:]}")
    texts = [_outputs(p) for p in sorted((workdir / "runs").glob(f"{args.notebook}-*.ipynb"))]
    results = [json.loads(p.read_text()) for p in (workdir / args.notebook / "runs").glob("*/final_results.json")]
    built, reused = sum("Cached " in t for t in texts), sum("Reusing cache" in t for t in texts)
    extracted = sum("Extracted " in t for t in texts)
    lr_by_folder = {r["run_dir"]: r["config"]["lr"] for r in results}
    temps = [str(p) for p in workdir.rglob("*") if any(f".{t}-" in p.name for t in ("tmp", "partial", "stale"))]
    if len(texts) != args.runs:
        failures.append(f"{len(texts)} executed notebooks for {args.runs} runs")
    if extracted > 1 or built > 1:
        failures.append(f"archive extracted {extracted} times, cache built {built} times (must be at most once)")
    if sorted(set(lr_by_folder.values())) != sorted({float(x) for x in lrs}):
        failures.append(f"run folders' lr {sorted(lr_by_folder.values())} != the settings {sorted(set(lrs))}")
    if temps:
        failures.append(f"temporary files left: {temps[:5]}")
    print(f"{args.runs} runs of {args.notebook} (smoke profile, export off) at once in {workdir}, "
          f"{os.cpu_count()} CPUs, 1 torch thread each:")
    print(f"  wall {wall:.0f} s; per run {min(d['s'] for d in done):.0f}-{max(d['s'] for d in done):.0f} s; "
          f"all succeeded: {all(d['rc'] == 0 for d in done)}")
    print(f"  archive extracted {extracted}x, cache built {built}x and reused {reused}x; "
          f"{len(lr_by_folder)} run folders for {len(set(lrs))} distinct settings; temporaries left {len(temps)}")
    for f in failures:
        print(f"FAILED: {f}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

"""Fault matrix, part 1: several runs in one working directory, killed lock holders, full disks.

| fault | how it is injected | what must happen |
| --- | --- | --- |
| 3 runs at once, other settings | 3 `run_notebooks.py` processes, one workdir, lr differs | all succeed; archive extracted and cache built once; each results file names its own lr and run folder; executed notebooks kept apart |
| 2 runs at once, same settings | 2 processes, identical parameters | both succeed with the same figures; one run folder, its fold trained once |
| lock holder killed | SIGKILL of a process holding an output lock | the next process takes the lock at once |
| disk full during the cache build | `OSError(ENOSPC)` from the HDF5 writer midway | the error reaches the caller; the earlier cache is intact; no temporary file left |
| disk full during a checkpoint write | `OSError(ENOSPC)` from `torch.save` | the error reaches the caller; the earlier checkpoint is intact; no temporary file left |

Other rows live beside the code they test: unsafe, corrupt and truncated archives
(test_extract), corrupt, zero-byte and unreadable images (test_images, test_discover), a
build killed midway (test_cache), a kill mid-training and resume, NaN loss, weights-only
checkpoints (test_train), a failing rank under torchrun (test_distributed).
"""

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import nbformat
import pytest
import torch

import helpers as H
from conftest import ROOT


def _launch(workdir: Path, *params: str) -> subprocess.Popen:
    args = [sys.executable, str(ROOT / "scripts" / "run_notebooks.py"), "--only", "DFER_GCViT", "--workdir",
            str(workdir)]
    for p in params:
        args += ["-p", *p.split("=", 1)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    return subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)


def _outputs(executed: Path) -> str:
    nb = nbformat.read(executed, as_version=4)
    return "\n".join(str(o.get("text", "")) for c in nb.cells if c.cell_type == "code" for o in c.outputs)


def _finish(procs) -> list[str]:
    logs = [p.communicate(timeout=900)[0] for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]
    return logs


def test_three_runs_at_once_with_other_settings_all_succeed_and_share_one_cache(tmp_path):
    lrs = ("1e-3", "5e-4", "2e-4")
    procs = [_launch(tmp_path, f"lr={lr}", "export=False") for lr in lrs]
    _finish(procs)
    executed = sorted((tmp_path / "runs").glob("DFER_GCViT-*.ipynb"))
    assert len(executed) == 3
    texts = [_outputs(p) for p in executed]
    assert sum("Cached " in t for t in texts) == 1 and sum("Reusing cache" in t for t in texts) == 2
    assert sum("Extracted " in t for t in texts) == 1
    runs = sorted((tmp_path / "DFER_GCViT" / "runs").glob("*/final_results.json"))
    results = [json.loads(p.read_text()) for p in runs]
    assert sorted(r["config"]["lr"] for r in results) == sorted(float(lr) for lr in lrs)
    assert len({r["run_key"] for r in results}) == 3 and len({r["cache"]["fingerprint"] for r in results}) == 1
    for path, r in zip(runs, results):
        assert Path(r["run_dir"]) == path.parent
        assert torch.load(path.parent / "final_model.pth", weights_only=True)["run_key"] == r["run_key"]
    latest = json.loads((tmp_path / "DFER_GCViT" / "final_results.json").read_text())
    assert latest in results  # a copy of one finished run, whole
    assert not list(tmp_path.rglob("*.tmp-*")) and not list(tmp_path.rglob("*.partial-*"))


def test_two_runs_at_once_with_the_same_settings_train_once(tmp_path):
    procs = [_launch(tmp_path, "export=False") for _ in range(2)]
    _finish(procs)
    (run,) = (tmp_path / "DFER_GCViT" / "runs").glob("*/final_results.json")
    texts = [_outputs(p) for p in sorted((tmp_path / "runs").glob("DFER_GCViT-*.ipynb"))]
    assert sum("Resuming from" in t for t in texts) == 1  # the second found the first's finished fold
    history = json.loads((run.parent / "fold_1" / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2]


def test_a_killed_lock_holder_never_blocks_the_next_run(tmp_path):
    target = tmp_path / "cache.h5"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; sys.path.insert(0, %r); import helpers as H\n"
        "with H.output_lock(%r):\n    print('held', flush=True); time.sleep(600)") % (str(ROOT), str(target))],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    t0 = time.monotonic()
    with H.output_lock(target):
        assert time.monotonic() - t0 < 30  # taken once the OS released the dead holder's lock


def test_disk_full_during_a_cache_build_keeps_the_earlier_cache(demo_kmu_zip, tmp_path):
    root = H.extract_archive(demo_kmu_zip, tmp_path / "ex", verbose=False)
    index, report = H.discover_dataset(root, verbose=False)
    classes = sorted(report["counts"])
    target = H.build_hdf5_cache(index, tmp_path / "c.h5", classes, 32, progress=False)  # an earlier, finished cache
    before = target.read_bytes()

    def full(written):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="No space left"):  # other settings: a rebuild that fails midway
        H.build_hdf5_cache(index, target, classes, 40, chunk_size=4, on_chunk=full, progress=False)
    assert target.read_bytes() == before
    with h5py.File(target) as f:
        assert f["images"].shape == (len(index), 32, 32, 1)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("c.h5")] == ["c.h5"]


def test_disk_full_during_a_checkpoint_write_keeps_the_earlier_checkpoint(tmp_path, monkeypatch):
    path = H.save_checkpoint(tmp_path / "last.pth", epoch=1)

    def full(obj, f, *a, **k):
        Path(f).write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(OSError, match="No space left"):
        H.save_checkpoint(path, epoch=2)
    monkeypatch.undo()
    assert H.load_checkpoint(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pth"]

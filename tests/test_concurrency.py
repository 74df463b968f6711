"""Fault matrix, part 1: several runs in one working directory, kills midway, full and read-only disks.

| fault | how it is injected | what must happen |
| --- | --- | --- |
| 3 runs at once, other settings | 3 `run_notebooks.py` processes, one workdir, lr differs | all succeed; archive extracted and cache built once; each results file names its own lr and run folder; executed notebooks kept apart |
| 2 runs at once, same settings | 2 processes, identical parameters | both succeed with the same figures; one run folder, its fold trained once |
| lock holder killed | SIGKILL of a process holding an output lock | the next process takes the lock at once |
| disk full during the cache build | `OSError(ENOSPC)` from the HDF5 writer midway | the error reaches the caller; the earlier cache is intact; no temporary file left |
| disk full during a checkpoint write | `OSError(ENOSPC)` from `torch.save` | the error reaches the caller; the earlier checkpoint is intact; no temporary file left |
| killed during extraction | SIGKILL of a process extracting a 2,000-file zip | the finished name never holds a half extraction; the rerun extracts all files and removes the dead run's partial folder |
| killed mid-write | SIGKILL of a process inside `atomic_write` | readers see the old file; the next writer in the folder removes the dead one's temporary |
| killed during export | SIGKILL of a smoke run once its export folder has a file | the rerun reuses training, redoes the export: the ONNX checks, TorchScript loads, the report lists every file |
| a real full disk | a 4 MB tmpfs (root + mount; skipped otherwise) | an archive larger than the free space is refused before writing, naming the GiB needed; a write past the end fails with ENOSPC, its temporary removed, earlier files intact |
| read-only working directory | the same tmpfs remounted read-only | `run_notebooks.py` and the notebook's Configuration cell stop with "cannot be written (Read-only file system): set `workdir`" |
| decompression bomb | a 20 KB zip (and tar.gz) holding 20 MB of zeros (`test_extract`) | refused before anything is written: past the stated 100x expansion limit |

Other rows live beside the code they test: unsafe, corrupt and truncated archives
(test_extract), corrupt, zero-byte and unreadable images (test_images, test_discover), a
build killed midway (test_cache), a kill mid-training and resume, NaN loss, weights-only
checkpoints (test_train), a failing rank under torchrun (test_distributed), classes whose
files are all unreadable (test_discover), truncated and malformed CSVs (test_ferplus_formats).
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


def _killed_midway(code: str, ready) -> None:
    """Run ``code`` in a child Python and SIGKILL it once ``ready()`` is true (it must not finish first)."""
    child = subprocess.Popen([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(ROOT)!r})\n{code}"])
    try:
        for _ in range(6000):
            if ready():
                break
            assert child.poll() is None, "the child finished before it could be killed"
            time.sleep(0.01)
        else:
            pytest.fail("the child never reached the point to kill it at")
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()


def test_a_run_killed_during_extraction_leaves_nothing_half_done_and_the_rerun_extracts(tmp_path):
    import zipfile

    z = tmp_path / "faces.zip"
    with zipfile.ZipFile(z, "w") as zf:  # stored, 2,000 files: long enough to be caught midway
        for i in range(2000):
            zf.writestr(f"faces/angry/{i:04d}.png", os.urandom(20_000))
    out = tmp_path / "ex"
    _killed_midway(f"import helpers as H; H.extract_archive({str(z)!r}, {str(out)!r})",
                   lambda: any(len(list(p.rglob("*.png"))) > 50 for p in out.glob("faces.partial-*")))
    assert not (out / "faces").exists()  # the finished name never held a half extraction
    assert list(out.glob("faces.partial-*"))  # the dead run's leftovers ...
    root = H.extract_archive(z, out, verbose=False)
    assert len(list(root.rglob("*.png"))) == 2000
    assert [p.name for p in out.iterdir()] == ["faces"]  # ... are removed by the next run


def test_a_writer_killed_mid_write_keeps_the_old_file_and_the_next_writer_removes_its_temporary(tmp_path):
    target = tmp_path / "final_results.json"
    H.atomic_write(target, lambda tmp: tmp.write_text('{"run": 1}'))
    _killed_midway(  # writes slowly into its temporary file, and is killed while at it
        f"import time, helpers as H\n"
        f"def slow(tmp):\n    f = open(tmp, 'w'); f.write('{{\"run\": 2, '); f.flush(); time.sleep(600)\n"
        f"H.atomic_write({str(target)!r}, slow)", lambda: bool(list(tmp_path.glob("final_results.json.tmp-*"))))
    assert json.loads(target.read_text()) == {"run": 1}  # readers never saw the half-written file
    H.atomic_write(target, lambda tmp: tmp.write_text('{"run": 3}'))
    assert json.loads(target.read_text()) == {"run": 3}
    assert [p.name for p in tmp_path.iterdir()] == ["final_results.json"]


def test_a_run_killed_during_export_reruns_to_complete_exports(tmp_path):
    proc = _launch(tmp_path, "num_epochs=1")
    export_dirs = lambda: list((tmp_path / "DFER_GCViT" / "runs").glob("*/export"))  # noqa: E731
    for _ in range(60000):
        if export_dirs() and any(export_dirs()[0].iterdir()):
            break
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    _finish([_launch(tmp_path, "num_epochs=1")])  # the rerun: training reused, export redone
    (export,) = export_dirs()
    import onnx

    onnx.checker.check_model(str(export / "model.onnx"))
    assert isinstance(torch.jit.load(str(export / "model.torchscript.pt")), torch.jit.ScriptModule)
    report = json.loads((export / "export_report.json").read_text())
    assert set(report["files"]) == {"onnx", "torchscript", "onnx_int8"}
    json.loads((export.parent / "final_results.json").read_text())
    assert not list(tmp_path.rglob("*.tmp-*"))


@pytest.fixture
def small_filesystem(tmp_path):
    """A real 4 MB tmpfs (root and mount permission needed; skipped otherwise), unmounted after."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)],
                                           capture_output=True).returncode:
        pytest.skip("cannot mount a small filesystem here (needs root and mount permission)")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=True)


def test_a_real_full_disk_stops_with_a_clear_error_and_keeps_what_was_there(small_filesystem, demo_kmu_zip):
    workdir = small_filesystem
    H.save_json({"run": 1}, workdir / "final_results.json")
    # The demo archive (larger than the disk once extracted) is refused before writing ...
    big = workdir.parent / "big.zip"
    import zipfile

    with zipfile.ZipFile(big, "w") as zf:
        for i in range(10):
            zf.writestr(f"faces/angry/{i}.png", os.urandom(500_000))
    with pytest.raises(H.DatasetError, match=r"big\.zip: extracting needs .* GiB free under"):
        H.extract_archive(big, workdir / "extracted", verbose=False)
    # ... and a write that runs out of space midway fails with the system's error, its temporary removed.
    with pytest.raises(OSError, match="No space left"):
        H.atomic_write(workdir / "weights.bin", lambda tmp: tmp.write_bytes(os.urandom(8_000_000)))
    assert json.loads((workdir / "final_results.json").read_text()) == {"run": 1}
    assert sorted(p.name for p in workdir.iterdir()) == ["extracted", "final_results.json"]


def test_a_read_only_working_directory_stops_in_configuration_with_what_to_do(small_filesystem):
    subprocess.run(["mount", "-o", "remount,ro", str(small_filesystem)], check=True)
    with pytest.raises(OSError, match=r"working directory .*small cannot be written \(Read-only file system\): "
                                      r"set `workdir`"):
        H.output_folder(small_filesystem, "DFER_GCViT")
    proc = _launch(small_filesystem)  # the notebook says the same in its Configuration cell
    log = proc.communicate(timeout=600)[0]
    assert proc.returncode != 0 and "cannot be written (Read-only file system)" in log

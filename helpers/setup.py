"""Setup shared by both notebooks: profiles -> config, device, environment, atomic writes and
inter-process locks (several runs may share one working directory)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import re
import shutil
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Callable, Iterator

from filelock import FileLock, Timeout

LOCK_DIR = Path(tempfile.gettempdir()) / "fer-pipeline-locks"


def resolve_config(profile: str, profiles: dict[str, dict], overrides: dict) -> dict:
    """Merge a profile's defaults with explicit parameters (explicit wins).

    Args:
        profile: key of ``profiles`` (``"smoke"``, ``"cpu"``, ``"gpu"``, ``"paper"``).
        profiles: defaults per profile.
        overrides: the notebook's parameters; None means "use the profile's" for knobs
            the profile sets, and stays None for the others.

    Returns:
        One flat dict with ``profile`` included.
    """
    if profile not in profiles:
        raise ValueError(f"profile must be one of {sorted(profiles)}, not {profile!r}")
    config = {"profile": profile, **profiles[profile]}
    config.update({k: v for k, v in overrides.items() if v is not None or k not in config})
    return config


def config_fingerprint(config: dict, exclude: tuple[str, ...] = (), contents: dict | None = None) -> str:
    """Short hash of the settings that shape a result (e.g. to name a run folder).

    Args:
        config: the notebook's config dict.
        exclude: keys that do not change the result (export options, plotting, ...).
        contents: what some settings only point at, hashed too, so that a new file at the same
            path starts a new run instead of resuming (or reusing) the old one: e.g. the data
            cache's fingerprint and a weights file's SHA-256.
    """
    import hashlib

    kept = {k: v for k, v in sorted(config.items()) if k not in exclude}
    if contents:
        kept["contents"] = contents
    return hashlib.sha1(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:8]


def select_device(preference: str = "auto"):
    """The torch device to train on: CUDA, then Apple MPS, then CPU.

    Args:
        preference: ``"auto"`` or an explicit device string such as ``"cuda:1"`` or ``"cpu"``.
    """
    import torch

    if preference != "auto":
        return torch.device(preference)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


@contextlib.contextmanager
def mps_dtype_guard(what: str = "this step") -> Iterator[None]:
    """Fail on any float64 tensor an operation takes or makes, as Apple's MPS backend would.

    MPS has no float64: a float64 tensor on the way (a NumPy array turned into a tensor, a
    Python float promoted, a ``.double()``) stops an MPS run. This guard, a
    ``TorchDispatchMode`` that sees every operation (backward included), makes the same
    mistake fail on any machine, naming the operation. Used by the tests to keep the MPS path
    honest where no Mac is at hand.
    """
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    def check(func, side: str, values) -> None:
        if any(isinstance(t, torch.Tensor) and t.dtype == torch.float64 for t in tree_leaves(values)):
            raise TypeError(f"{func} {side} a float64 tensor in {what}: Apple MPS has no float64; "
                            "use float32 (e.g. torch.as_tensor(x, dtype=torch.float32))")

    class _Guard(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            check(func, "takes", (args, kwargs))
            out = func(*args, **kwargs)
            check(func, "makes", out)
            return out

    with _Guard():
        yield


def environment_info() -> dict:
    """Versions and hardware, saved with every result."""
    import importlib.metadata as md

    info = {"python": sys.version.split()[0], "platform": platform.platform(), "cpu_count": os.cpu_count()}
    for pkg in ("torch", "torchvision", "timm", "albumentations", "h5py", "numpy", "scikit-learn", "dlib-bin"):
        try:
            info[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            info[pkg] = None
    try:
        import torch

        info["cuda"] = torch.version.cuda if torch.cuda.is_available() else None
        info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
        info["torch_threads"] = torch.get_num_threads()
    except ImportError:
        pass
    return info


def temp_path(path: str | Path, tag: str = "tmp") -> Path:
    """A sibling of ``path`` whose name no other process or call uses (pid and a random suffix)."""
    path = Path(path)
    return path.with_name(f"{path.name}.{tag}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


_TEMP_NAME = re.compile(r"\.(?:tmp|partial|stale)-(\d+)(?:-[0-9a-f]{8})?$")


def remove_stale_temps(folder: str | Path) -> list[Path]:
    """Remove temporary files and folders (``<name>.tmp|partial|stale-<pid>[-<random>]``) of dead processes.

    A process killed mid-write (SIGKILL, power loss) cannot clean up after itself; the next
    writer in the same folder does. Temporaries of live processes, this one included, are
    kept. Returns what was removed.
    """
    import psutil

    folder, removed = Path(folder), []
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        m = _TEMP_NAME.search(entry.name)
        if m and int(m.group(1)) != os.getpid() and not psutil.pid_exists(int(m.group(1))):
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def output_folder(workdir: str | Path, name: str) -> Path:
    """``workdir/name``, created, once the working directory is known to take files.

    A read-only or full working directory stops here, in the Configuration cell, with what
    to do, instead of deep inside the first step that writes.
    """
    out = Path(workdir) / name
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = temp_path(out / ".write-test")
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise OSError(e.errno, f"the working directory {Path(workdir).resolve()} cannot be written ({e.strerror}): "
                      "set `workdir` to a folder you can write; the data can stay where it is (`data_path`)") from e
    return out


def atomic_write(path: str | Path, write: Callable[[Path], object], tag: str = "tmp") -> Path:
    """``write(tmp)`` to a unique temporary sibling, then rename it to ``path``.

    Readers see the old file or the new one, never a partial one; concurrent writers never
    share a temporary file; a failed write (a full disk, say) removes its temporary file and
    leaves the old ``path`` intact; temporaries left in the folder by killed processes are
    removed first. ``tag`` names the temporary file (``<name>.<tag>-<pid>-<random>``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path.parent)
    tmp = temp_path(path, tag)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


@contextlib.contextmanager
def output_lock(path: str | Path, what: str = "") -> Iterator[None]:
    """Hold an inter-process lock keyed by an output path (filelock's OS-level lock).

    A second run that needs the same output waits, saying on what, and then finds it built.
    The operating system releases the lock when its holder dies, so a killed run never
    blocks the next one. The lock files live in the system's temporary folder, named by a
    hash of the resolved path, so working and data folders get no ``.lock`` files (processes
    on one machine are coordinated; on a shared file system, build shared caches first).
    """
    key = hashlib.sha1(str(Path(path).resolve()).encode()).hexdigest()[:20]
    LOCK_DIR.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(LOCK_DIR / f"{Path(path).name[:40]}-{key}.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        print(f"Waiting for another process that is building {path}{f' ({what})' if what else ''} ...", flush=True)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def publish_run(run_dir: str | Path, out_dir: str | Path, names: dict[str, str]) -> list[Path]:
    """Copy a finished run's files to the notebook's output folder (the seed-compatible "latest" files).

    The run folder stays the record; each copy is atomic, so a reader of ``out_dir`` sees one
    run's file or another's, never a mix within a file.

    Args:
        run_dir: the run's own folder.
        out_dir: where the latest copies go.
        names: ``{name in run_dir: name in out_dir}``; files missing from the run are skipped.
    """
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    return [atomic_write(out_dir / dst, lambda tmp, src=run_dir / src: shutil.copyfile(src, tmp))
            for src, dst in names.items() if (run_dir / src).exists()]


def require(namespace: dict, **sections: str) -> None:
    """Stop a notebook cell that runs before its inputs exist, naming the sections that make them.

    Args:
        namespace: the notebook's ``globals()``.
        sections: ``variable="section that defines it"``.

    Raises:
        RuntimeError: ``run the section(s) [...] first`` instead of a NameError deep inside.
    """
    missing: dict[str, list[str]] = {}
    for name, section in sections.items():
        if name not in namespace:
            missing.setdefault(section, []).append(name)
    if missing:
        names = [n for group in missing.values() for n in group]
        raise RuntimeError(f"run the section(s) {list(missing)} first: they define {names} (Jupyter: Run > "
                           "Run All Above, or run those sections and then this one again)")


def save_json(obj, path: str | Path) -> Path:
    """Write JSON atomically (unique temporary file, then rename)."""
    text = json.dumps(obj, indent=2, default=str)
    return atomic_write(path, lambda tmp: tmp.write_text(text))

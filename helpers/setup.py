"""Setup shared by both notebooks: profiles -> config, device, environment, atomic JSON."""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path


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


def save_json(obj, path: str | Path) -> Path:
    """Write JSON atomically (temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)
    return path

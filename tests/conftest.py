"""Shared fixtures: real datasets from ../shared/data (skipped when absent) and small generated ones."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SHARED = Path(__import__("os").environ.get("FER_SHARED_DATA", ROOT.parent / "shared" / "data"))

import helpers as H  # noqa: E402


# a run spec's config for a gcvit_xxtiny at 32 px: the engine's and the benches' tests train or score it in seconds
TINY_RUN_CONFIG = dict(model_name="gcvit_xxtiny", weights="none", allow_random_init=False, image_size=32, channels=1,
                       dropout=0.3, finetune="full", frozen_stages=0, num_epochs=2, batch_size=8, lr=1e-3,
                       weight_decay=0.05, warmup_epochs=0, label_smoothing=0.0, class_weighted=False, clip_grad=1.0,
                       amp="auto", early_stopping=None, num_workers=0, seed=3)


def load_bench(name: str):
    """A script of bench/ as a module (bench/ is not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _real(rel: str) -> Path:
    path = SHARED / rel
    if not path.exists():
        pytest.skip(f"real dataset {path} is absent (see ../shared/data/README.md)")
    return path


@pytest.fixture(scope="session")
def kmu_zip() -> Path:
    return _real("kmu-fed/archive.zip")


@pytest.fixture(scope="session")
def ferplus_zip() -> Path:
    return _real("ferplus/FERPlus.zip")


@pytest.fixture(scope="session")
def ckplus_zip() -> Path:
    return _real("ck-plus/CK+48.zip")


@pytest.fixture(scope="session")
def kmu_root(kmu_zip, tmp_path_factory) -> Path:
    return H.extract_archive(kmu_zip, tmp_path_factory.mktemp("kmu"), verbose=False)


@pytest.fixture(scope="session")
def kmu_index(kmu_root):
    return H.discover_dataset(kmu_root, verbose=False)


@pytest.fixture(scope="session")
def kmu_faces(kmu_index, tmp_path_factory):
    """Face boxes for all 1,106 real frames (about 30 s), shared by every test that needs them."""
    index, _ = kmu_index
    return H.detect_faces(index, tmp_path_factory.mktemp("faces") / "boxes.csv", progress=False)


@pytest.fixture(scope="session")
def ferplus_root(ferplus_zip, tmp_path_factory) -> Path:
    return H.extract_archive(ferplus_zip, tmp_path_factory.mktemp("ferplus"), verbose=False)


@pytest.fixture(scope="session")
def demo_kmu_zip(tmp_path_factory) -> Path:
    return H.make_demo_kmufed(tmp_path_factory.mktemp("demo") / "kmu-demo.zip", num_subjects=4, frames_per_class=5)


@pytest.fixture(scope="session")
def demo_cache(demo_kmu_zip, tmp_path_factory):
    """The generated KMU-FED demo as a 32-px HDF5 cache (whole frames): ``(path, class_names)``."""
    tmp = tmp_path_factory.mktemp("engine")
    root = H.extract_archive(demo_kmu_zip, tmp / "ex", verbose=False)
    index, report = H.discover_dataset(root, verbose=False)
    classes = sorted(report["counts"])
    return H.build_hdf5_cache(index, tmp / "c.h5", classes, 32, progress=False), classes


def write_image(path: Path, size=(32, 24), mode="L", value=128) -> Path:
    """A small solid image of the given PIL mode."""
    path.parent.mkdir(parents=True, exist_ok=True)
    color = value if mode in ("L", "P", "I;16") else (value,) * len(mode)
    img = Image.new(mode, size, color)
    img.save(path)
    return path


def random_face_like(rng: np.random.Generator, size=(40, 30)) -> Image.Image:
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0]), dtype=np.uint8))

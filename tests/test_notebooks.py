"""Both notebooks, executed headless with the smoke profile, on generated and on real data."""

import json
from pathlib import Path

import h5py
import nbformat
import pytest

from conftest import ROOT, SHARED

import sys
sys.path.insert(0, str(ROOT / "scripts"))
from run_notebooks import run_notebook  # noqa: E402


def _run(name, workdir, **params):
    run_notebook(name, workdir / "runs", {"profile": "smoke", "workdir": str(workdir), **params})
    return json.loads((workdir / name / "final_results.json").read_text())


def test_committed_notebooks_have_no_outputs_and_one_parameters_cell():
    for name in ("DFER_GCViT", "GReFEL"):
        nb = nbformat.read(ROOT / f"{name}.ipynb", as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert all(not c.outputs and c.execution_count is None for c in code), name
        assert sum("parameters" in c.metadata.get("tags", []) for c in code) == 1, name


def test_paired_scripts_match_the_notebooks():
    import jupytext

    for name in ("DFER_GCViT", "GReFEL"):
        nb = nbformat.read(ROOT / f"{name}.ipynb", as_version=4)
        py = jupytext.read(ROOT / f"{name}.py")
        assert [c.source for c in nb.cells] == [c.source for c in py.cells], f"{name}.py and .ipynb differ: jupytext --sync"


def test_dfer_notebook_on_generated_demo(tmp_path):
    r = _run("DFER_GCViT", tmp_path)
    assert r["data"] == "generated demo" and r["config"]["profile"] == "smoke"
    assert r["face_detection"]["frames"] == r["cache"]["report"]["num_source"] > 0
    for f in ("class_distribution.png", "samples.png", "face_crops.png", "annotations.csv"):
        assert (tmp_path / "DFER_GCViT" / f).stat().st_size > 0
    with h5py.File(r["cache"]["path"]) as f:
        assert f["images"].shape[1:] == (64, 64, 1)
    # Rerun: the extraction, boxes and cache are reused, the results are the same.
    again = _run("DFER_GCViT", tmp_path)
    assert again["cache"]["fingerprint"] == r["cache"]["fingerprint"]


def test_grefel_notebook_on_generated_demo(tmp_path):
    r = _run("GReFEL", tmp_path)
    assert r["data"] == "generated demo"
    assert r["landmarks"]["ok"] + r["landmarks"]["failed"] == r["cache"]["report"]["num_cached"]
    with h5py.File(r["cache"]["path"]) as f:
        assert f["landmarks"].shape == (f["images"].shape[0], 68, 2)
        assert f["votes"].shape == (f["images"].shape[0], 10)


def test_dfer_notebook_on_real_kmu_fed(kmu_zip, tmp_path):
    r = _run("DFER_GCViT", tmp_path, data_path=str(kmu_zip))
    assert r["data"] == "real" and r["dataset"]["num_images"] == 1106
    assert r["face_detection"]["rate"] >= 0.9
    assert r["cache"]["report"]["num_cached"] == r["face_detection"]["frames"]


def test_grefel_notebook_on_real_ferplus_subset(ferplus_zip, tmp_path):
    r = _run("GReFEL", tmp_path, data_path=str(ferplus_zip), max_per_split=100)
    assert r["data"] == "real" and r["dataset"]["splits"] == {"train": 28558, "val": 3579, "test": 3573}
    assert r["cache"]["report"]["num_cached"] == 300

"""HDF5 cache: content, reuse, rebuild on change, killed builds, bad images, Dataset."""

import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

import helpers as H
from conftest import ROOT


@pytest.fixture()
def demo_index(demo_kmu_zip, tmp_path):
    root = H.extract_archive(demo_kmu_zip, tmp_path / "ex", verbose=False)
    index, report = H.discover_dataset(root, verbose=False)
    return index, sorted(report["counts"])


def test_cache_contents_and_reuse(demo_index, tmp_path):
    index, classes = demo_index
    path = H.build_hdf5_cache(index, tmp_path / "c.h5", classes, 32, channels=1, progress=False)
    with h5py.File(path) as f:
        assert f["images"].shape == (len(index), 32, 32, 1) and f["images"].dtype == np.uint8
        labels = f["labels"][:]
        assert [classes[i] for i in labels] == list(index["label"])
        assert list(f["subject"].asstr()[:]) == list(index["subject"])
        fp = f.attrs["fingerprint"]
    mtime = path.stat().st_mtime_ns
    H.build_hdf5_cache(index, path, classes, 32, channels=1, progress=False)
    assert path.stat().st_mtime_ns == mtime  # reused, not rewritten
    H.build_hdf5_cache(index, path, classes, 40, channels=1, progress=False)  # new parameters: rebuilt
    with h5py.File(path) as f:
        assert f["images"].shape[1] == 40 and f.attrs["fingerprint"] != fp


def test_changed_source_file_triggers_rebuild(demo_index, tmp_path):
    index, classes = demo_index
    path = H.build_hdf5_cache(index, tmp_path / "c.h5", classes, 32, progress=False)
    before = H.read_cache_meta(path)[1]["fingerprint"]
    target = index.loc[0, "path"]
    Image.fromarray(255 - H.load_image(target, 3)).save(target, format="JPEG")  # edit one source image
    changed = H.discover_dataset(Path(target).parents[2], verbose=False)[0]
    H.build_hdf5_cache(changed, path, classes, 32, progress=False)
    meta, attrs = H.read_cache_meta(path)
    assert attrs["fingerprint"] != before
    assert meta.loc[0, "sha1"] == changed.loc[0, "sha1"] != index.loc[0, "sha1"]


def test_unreadable_image_is_skipped_and_reported(demo_index, tmp_path):
    index, classes = demo_index
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really")
    index = index.copy()
    index.loc[3, "path"] = str(bad)
    with pytest.warns(UserWarning, match="bad.jpg"):
        path = H.build_hdf5_cache(index, tmp_path / "c.h5", classes, 32, progress=False)
    meta, attrs = H.read_cache_meta(path)
    assert len(meta) == len(index) - 1
    assert attrs["report"]["num_cached"] == len(index) - 1
    assert len(attrs["report"]["skipped"]) == 1 and "bad.jpg" in attrs["report"]["skipped"][0][0]


def test_build_killed_midway_leaves_no_finished_file_and_rerun_completes(demo_index, tmp_path):
    index, classes = demo_index
    index.to_pickle(tmp_path / "index.pkl")
    out = tmp_path / "c.h5"
    script = textwrap.dedent(f"""
        import os, signal, sys, pandas as pd
        sys.path.insert(0, {str(ROOT)!r})
        import helpers as H
        def die(written):
            if written >= 20:
                os.kill(os.getpid(), signal.SIGKILL)
        index = pd.read_pickle({str(tmp_path / 'index.pkl')!r})
        H.build_hdf5_cache(index, {str(out)!r}, {classes!r}, 32, chunk_size=10, on_chunk=die, progress=False)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert proc.returncode == -9, proc.stderr.decode()
    assert not out.exists()
    assert len(list(tmp_path.glob("c.h5.partial-*"))) == 1
    H.build_hdf5_cache(index, out, classes, 32, chunk_size=10, progress=False)
    reference = H.build_hdf5_cache(index, tmp_path / "ref.h5", classes, 32, chunk_size=1000, progress=False)
    with h5py.File(out) as a, h5py.File(reference) as b:
        assert a["images"].shape[0] == len(index)
        np.testing.assert_array_equal(a["images"][:], b["images"][:])
        np.testing.assert_array_equal(a["labels"][:], b["labels"][:])
    assert not list(tmp_path.glob("c.h5.partial-*"))


def test_dataset_lazy_equals_in_memory_and_works_with_worker_processes(demo_index, tmp_path):
    index, classes = demo_index
    path = H.build_hdf5_cache(index, tmp_path / "c.h5", classes, 32, channels=1, progress=False)
    subset = np.array([5, 1, 9, 3])
    lazy = H.H5Dataset(path, indices=subset)
    ram = H.H5Dataset(path, indices=subset, in_memory=True)
    for i in range(len(subset)):
        np.testing.assert_array_equal(lazy.image(i), ram.image(i))
        assert lazy[i][1] == ram[i][1] == classes.index(index.loc[subset[i], "label"])
    tf = H.build_transform("seed", 32, channels=1)
    loader = torch.utils.data.DataLoader(H.H5Dataset(path, transform=tf), batch_size=8, num_workers=2)
    lazy[0]  # an open handle in the parent must not break the forked workers
    xs, ys = zip(*loader)
    assert torch.cat(xs).shape == (len(index), 3, 32, 32) and torch.cat(ys).shape == (len(index),)
    assert torch.isfinite(torch.cat(xs)).all()


def test_labels_outside_class_names_are_refused(demo_index, tmp_path):
    index, classes = demo_index
    with pytest.raises(H.DatasetError, match="not in class_names"):
        H.build_hdf5_cache(index, tmp_path / "c.h5", classes[:2], 32, progress=False)


@pytest.mark.parametrize("column", ["subject", "group", "split", "label", "duplicate_of", "votes_neutral"])
def test_fingerprint_covers_every_column_that_gives_a_row_its_meaning(demo_index, column):
    """A changed subject id (the subject-disjoint folds), group, split, label, duplicate flag or vote
    (the soft labels) must give another fingerprint, so a stale cache is never reused."""
    index, _ = demo_index
    index = index.assign(votes_neutral=np.arange(len(index), dtype=float), votes_happiness=0.0)
    params = {"image_size": 32}
    base = H.cache_fingerprint(index, params, ("votes",))
    changed = index.copy()
    values = changed[column].tolist()
    changed[column] = [values[1]] + values[1:] if values[0] != values[1] else [f"{values[0]}x"] + values[1:]
    if column == "votes_neutral":
        changed[column] = index[column] + (np.arange(len(index)) == 0)
    assert H.cache_fingerprint(changed, params, ("votes",)) != base
    assert H.cache_fingerprint(index, params, ("votes",)) == base  # and it is deterministic


def test_fingerprint_covers_the_landmark_model_settings(demo_index, tmp_path):
    index, classes = demo_index
    index = index.iloc[:6]
    path = H.build_hdf5_cache(index, tmp_path / "c.h5", classes, 32, landmarker=H.LandmarkDetector(), progress=False)
    fp = H.read_cache_meta(path)[1]["fingerprint"]
    H.build_hdf5_cache(index, path, classes, 32, landmarker=H.LandmarkDetector(inset=0.12), progress=False)
    assert H.read_cache_meta(path)[1]["fingerprint"] != fp

"""bench/backbone_pilot.py: the FER+ pack is lossless and keeps the test split out; a pilot run records its rows."""

import json

import numpy as np
import pytest

import helpers as H
from conftest import load_bench


@pytest.fixture(scope="module")
def pilot():
    return load_bench("backbone_pilot")


def test_pack_is_lossless_and_leaves_the_test_split_out(pilot, tmp_path):
    archive = H.make_demo_ferplus(tmp_path / "FERPlus.zip", num_train=40, num_val=20, num_test=20)
    out = tmp_path / "ferplus48.npz"
    pilot.main(["pack", str(archive), str(out)])
    packed = np.load(out)
    assert not any("test" in k for k in packed.files)
    index, _ = H.read_ferplus(H.prepare_ferplus(archive, tmp_path / "ex", verbose=False), verbose=False)
    for split in ("train", "val"):
        rows = index[(index["split"] == split) & (index["label"] != "")]
        faces = pilot._decode(packed[f"blob_{split}"], packed[f"offsets_{split}"])
        expected = np.stack([H.load_image(p, channels=1).reshape(48, 48) for p in rows["path"]])
        np.testing.assert_array_equal(faces, expected)  # pixel for pixel
        assert [H.FERPLUS_CLASSES[i] for i in packed[f"y_{split}"]] == list(rows["label"])


def test_a_pilot_run_writes_each_candidate_and_a_failed_one_does_not_stop_the_others(pilot, tmp_path, monkeypatch):
    archive = H.make_demo_ferplus(tmp_path / "FERPlus.zip", num_train=40, num_val=20, num_test=20)
    pilot.main(["pack", str(archive), str(tmp_path / "d.npz")])
    monkeypatch.setitem(pilot.CANDIDATES, "bad", (64, [5, 3, 1], None))  # grids a ResNet-18 cannot give at 64 px
    out = tmp_path / "pilot.json"
    pilot.main(["train", str(tmp_path / "d.npz"), "--only", "bad", "r18_64", "--epochs", "2", "--batch", "8",
                "--device", "cpu", "--amp", "off", "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert rows[0]["name"] == "bad" and "grid sizes [5, 3, 1]" in rows[0]["error"]
    good = rows[1]
    assert good["name"] == "r18_64" and len(good["history"]) == 2
    best = max(good["history"], key=lambda r: r["val_acc"])
    assert good["val_acc"] == best["val_acc"] and 0.0 <= good["val_acc"] <= 1.0
    assert good["gflops_forward"] > 0 and good["params"] == pytest.approx(2.81e6, rel=0.01)

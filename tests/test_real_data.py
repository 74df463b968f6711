"""The real datasets in ../shared/data (skipped when absent): counts, subjects, duplicates, faces, votes."""

import csv
import io
import zipfile

import numpy as np
import pytest

import helpers as H

KMU_COUNTS = {"angry": 196, "disgust": 120, "fear": 200, "happy": 210, "sad": 180, "surprise": 200}


def test_kmu_fed_index(kmu_index):
    index, report = kmu_index
    assert len(index) == 1106
    assert report["counts"] == KMU_COUNTS
    assert report["num_subjects"] == 12
    assert sorted(index["subject"].unique(), key=int) == [str(i) for i in range(1, 13)]
    assert index.groupby("label")["subject"].nunique()["disgust"] == 7
    pairs = sorted(report["duplicates"])
    assert pairs == [(f"KMU-FED/angry/1_AN_mr_00{i}.jpg", f"KMU-FED/angry/01_AN_mr_00{i}.jpg") for i in range(1, 7)]
    assert (index["width"] == 1600).all() and (index["height"] == 1200).all()


@pytest.mark.parametrize("protocol", ["kfold", "subject"])
def test_kmu_fed_duplicate_pair_never_straddles_a_split(kmu_index, protocol):
    """The six 1_AN_mr / 01_AN_mr copies: README promises that no duplicate sits on both sides."""
    index, _ = kmu_index
    meta = index.assign(sha1=index["sha1"])
    copies = index.groupby("sha1").filter(lambda g: len(g) > 1)
    assert len(copies) == 12
    for f in H.make_folds(meta, protocol, num_folds=4 if protocol == "subject" else 10):
        side = {i: p for p in ("train", "val", "test") for i in f[p]}
        for _, pair in copies.groupby("sha1"):
            assert len({side[i] for i in pair.index}) == 1, pair["rel_path"].tolist()


def test_kmu_fed_faces_found_in_at_least_95_percent(kmu_faces):
    rate = kmu_faces["face_found"].mean()
    assert rate >= 0.95, f"face detection rate {rate:.1%}"
    found = kmu_faces[kmu_faces["face_found"]]
    # Drivers sit close to the camera: plausible boxes are a fifth to a half of the frame width.
    assert found["face_w"].between(1600 / 5, 1600 / 2).mean() > 0.95


def _label_csv_rows(zip_path, split):
    with zipfile.ZipFile(zip_path) as z:
        text = z.read(f"FERPlus/data/FER2013{split}/label.csv").decode()
    return [row for row in csv.reader(io.StringIO(text)) if row]


def test_ferplus_counts_votes_and_majority_labels(ferplus_zip, ferplus_root):
    index, report = H.read_ferplus(ferplus_root, verbose=False)
    assert report["splits"] == {"train": 28558, "val": 3579, "test": 3573}
    for split, folder in (("train", "Train"), ("val", "Valid"), ("test", "Test")):
        rows = _label_csv_rows(ferplus_zip, folder)
        part = index[index["split"] == split].set_index("image")
        assert len(rows) == len(part)
        votes = np.array([[int(v) for v in r[2:12]] for r in rows])
        np.testing.assert_array_equal(part.loc[[r[0] for r in rows], H.VOTE_COLUMNS].to_numpy(), votes)
        # Independent majority: argmax over the ten columns, unknown/NF majority -> excluded.
        expected = [H.FERPLUS_COLUMNS[i] if i < 8 else "" for i in votes.argmax(1)]
        assert list(part.loc[[r[0] for r in rows], "label"]) == expected
    assert 0 < report["excluded_unknown_or_nf"] < 0.05 * len(index)


def test_ckplus_index(ckplus_zip, tmp_path):
    root = H.extract_archive(ckplus_zip, tmp_path, verbose=False)
    index, report = H.discover_dataset(root, verbose=False)
    assert len(index) == 981
    assert report["counts"] == {"angry": 135, "contempt": 54, "disgust": 177, "fear": 75, "happy": 207,
                                "sad": 84, "surprise": 249}
    assert report["class_mapping"]["sad"] == ["sadness"]
    assert report["num_subjects"] == 118
    assert index["group"].nunique() == 327

"""Layout discovery, class aliases, subjects, duplicates, skipped files, annotation CSVs."""

import shutil
import warnings

import pandas as pd
import pytest

import helpers as H
from conftest import write_image


def test_split_and_class_folders_at_any_depth(tmp_path):
    root = tmp_path / "archive"
    for split in ("train", "validation"):
        for cls in ("anger", "happiness", "Surprised"):
            for i in range(2):
                write_image(root / "KMU-FED" / split / cls / f"{i}.png", value=10 * i + len(cls) + len(split))
    index, report = H.discover_dataset(root, verbose=False)
    assert len(index) == 12
    assert set(index["split"]) == {"train", "val"}
    assert set(index["label"]) == {"angry", "happy", "surprise"}
    assert report["class_mapping"]["angry"] == ["anger"]
    assert report["layout"].startswith("split folders")


def test_class_folders_only_and_printed_mapping(tmp_path, capsys):
    for cls, n in (("fearful", 2), ("sad", 3), ("neutral", 1)):
        for i in range(n):
            write_image(tmp_path / cls / f"{cls}{i}.jpg", value=i * 20 + n)
    index, report = H.discover_dataset(tmp_path)
    assert report["counts"] == {"fear": 2, "neutral": 1, "sad": 3}
    assert (index["split"] == "").all()
    out = capsys.readouterr().out
    assert "fear" in out and "fearful" in out


def test_flat_kmu_file_names_give_class_subject_and_group(tmp_path):
    names = ["01_AN_mr_001.jpg", "1_AN_mr_002.jpg", "03_HA_s02_010.jpg", "12_NE_gu_001.jpg", "05_DI_uj_041.jpg"]
    for i, n in enumerate(names):
        write_image(tmp_path / "KMU-FED" / n, value=i * 30)
    index, report = H.discover_dataset(tmp_path, verbose=False)
    by = index.set_index("rel_path")
    assert by.loc["KMU-FED/01_AN_mr_001.jpg", "label"] == "angry"
    assert by.loc["KMU-FED/12_NE_gu_001.jpg", "label"] == "neutral"
    # "1_AN_mr" and "01_AN_mr" are one subject and one sequence
    assert by.loc["KMU-FED/1_AN_mr_002.jpg", "subject"] == by.loc["KMU-FED/01_AN_mr_001.jpg", "subject"] == "1"
    assert by.loc["KMU-FED/1_AN_mr_002.jpg", "group"] == "1_AN"
    assert report["num_subjects"] == 4
    assert "file names" in report["layout"]


def test_ckplus_names_give_subject_and_sequence(tmp_path):
    write_image(tmp_path / "CK+48" / "happy" / "S132_006_00000023.png")
    index, _ = H.discover_dataset(tmp_path, verbose=False)
    assert (index.loc[0, "subject"], index.loc[0, "group"]) == ("S132", "S132_006")


def test_unknown_class_name_lists_names_or_is_accepted(tmp_path):
    write_image(tmp_path / "happy" / "a.png")
    write_image(tmp_path / "bored" / "b.png", value=1)
    write_image(tmp_path / "sleepy" / "c.png", value=2)
    with pytest.raises(H.DatasetError, match=r"unknown class names.*bored.*sleepy"):
        H.discover_dataset(tmp_path, verbose=False)
    index, report = H.discover_dataset(tmp_path, accept_unknown_classes=True, verbose=False)
    assert sorted(index["label"]) == ["bored", "happy", "sleepy"]


def test_empty_class_reported_and_corrupt_file_skipped_with_warning(tmp_path):
    for i in range(3):
        write_image(tmp_path / "happy" / f"{i}.jpg", value=i * 40)
    (tmp_path / "sad").mkdir()
    (tmp_path / "happy" / "broken.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    (tmp_path / "happy" / "notes.txt").write_text("ignored: not an image extension")
    with pytest.warns(UserWarning, match="broken.jpg"):
        index, report = H.discover_dataset(tmp_path, verbose=False)
    assert len(index) == 3
    assert report["empty_classes"] == ["sad"]
    assert [p.endswith("broken.jpg") for p, _ in report["skipped"]] == [True]


def test_a_class_whose_files_are_all_unreadable_is_said_so_and_all_unreadable_is_an_error(tmp_path, capsys):
    for i in range(3):
        write_image(tmp_path / "d" / "happy" / f"{i}.png", value=i * 40)
    for i in range(2):
        (tmp_path / "d" / "sad" / f"{i}.jpg").parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "d" / "sad" / f"{i}.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    with pytest.warns(UserWarning, match="not a readable image"):
        index, report = H.discover_dataset(tmp_path / "d")
    assert report["unreadable_classes"] == {"sad": 2} and report["empty_classes"] == []
    assert "class 'sad': 2 image files found, none could be read" in capsys.readouterr().out
    shutil.rmtree(tmp_path / "d" / "happy")
    with pytest.warns(UserWarning), pytest.raises(H.DatasetError, match=r"2 image files found, but none could be read"):
        H.discover_dataset(tmp_path / "d", verbose=False)


def test_exact_duplicates_are_flagged(tmp_path):
    write_image(tmp_path / "happy" / "01_HA_mr_001.png", value=77)
    shutil.copy(tmp_path / "happy" / "01_HA_mr_001.png", tmp_path / "happy" / "1_HA_mr_001.png")
    write_image(tmp_path / "happy" / "01_HA_mr_002.png", value=78)
    index, report = H.discover_dataset(tmp_path, verbose=False)
    assert report["duplicates"] == [("happy/1_HA_mr_001.png", "happy/01_HA_mr_001.png")]
    assert (index["duplicate_of"] != "").sum() == 1


def test_no_images_is_an_error(tmp_path):
    (tmp_path / "happy").mkdir()
    with pytest.raises(H.DatasetError, match="no images"):
        H.discover_dataset(tmp_path, verbose=False)


def test_write_annotations_per_split(tmp_path):
    for split in ("train", "val"):
        write_image(tmp_path / "d" / split / "happy" / "a.png", value=len(split))
    index, _ = H.discover_dataset(tmp_path / "d", verbose=False)
    files = H.write_annotations(index, tmp_path / "out")
    assert sorted(f.name for f in files) == ["annotations.csv", "train_annotations.csv", "val_annotations.csv"]
    train = pd.read_csv(tmp_path / "out" / "train_annotations.csv")
    assert list(train["split"]) == ["train"] and {"subject", "sha1", "width"} <= set(train.columns)


def test_index_dataset_reads_ferplus_as_a_classification_set(tmp_path):
    root = H.extract_archive(H.make_demo_ferplus(tmp_path / "fp.zip"), tmp_path / "x", verbose=False)
    raw, _ = H.read_ferplus(root, verbose=False)
    index, report = H.index_dataset(root, verbose=False)
    assert report["pre_cropped"] and report["layout"].startswith("FERPlus")
    # Unknown/not-a-face majorities are left out; the vote winners get the canonical names.
    assert len(index) == (raw["label"] != "").sum() == report["num_images"]
    assert report["excluded_unknown_or_nf"] == (raw["label"] == "").sum() > 0
    kept = raw[raw["label"] != ""]
    assert list(index["label"]) == [H.normalise_class(c) for c in kept["label"]]
    assert set(index["label"]) <= set(H.CLASS_ALIASES.values()) and "happiness" not in report["counts"]
    assert report["class_mapping"]["happy"] == ["happiness"]
    assert report["splits"] == {s: int(n) for s, n in kept["split"].value_counts().items()}
    assert sum(report["counts"].values()) == len(index)


def test_index_dataset_is_discover_dataset_for_other_layouts(tmp_path):
    root = H.extract_archive(H.make_demo_kmufed(tmp_path / "k.zip", num_subjects=2, frames_per_class=2),
                             tmp_path / "x", verbose=False)
    index, report = H.index_dataset(root, verbose=False)
    expected, expected_report = H.discover_dataset(root, verbose=False)
    pd.testing.assert_frame_equal(index, expected)
    assert report == {**expected_report, "pre_cropped": False}


JAFFE_CODES = ("AN", "DI", "FE", "HA", "NE", "SA", "SU")
JAFFE_PATTERN = r"^(?P<subject>[A-Z]{2})\.(?P<label>[A-Z]{2})\d+\.\d+$"


def _jaffe_like(root, subjects=("KA", "KL", "KM", "KR"), extra=()):
    """A flat folder of grayscale TIFFs named subject.CODEn.number.tiff, as JAFFE names them."""
    k = 0
    for s in subjects:
        for code in JAFFE_CODES:
            for n in (1, 2):
                k += 1
                write_image(root / f"{s}.{code}{n}.{k}.tiff", value=k % 250)
    for name in extra:
        write_image(root / name, value=7)
    return root


def test_label_pattern_reads_labels_and_subjects_from_any_naming(tmp_path):
    root = _jaffe_like(tmp_path / "jaffe", extra=("README.png",))
    known, _ = H.discover_dataset(root, verbose=False)  # JAFFE is a known scheme: no parameter needed
    assert len(known) == 56 and known.set_index("rel_path").loc["KA.AN1.1.tiff", "subject"] == "KA"
    with pytest.warns(UserWarning, match=r"1 files do not match label_pattern.*README.png"):
        index, report = H.discover_dataset(root, verbose=False, label_pattern=JAFFE_PATTERN)
    assert len(index) == 4 * 7 * 2 and report["num_subjects"] == 4
    assert set(index["label"]) == {"angry", "disgust", "fear", "happy", "neutral", "sad", "surprise"}
    row = index[index["rel_path"] == "KA.AN1.1.tiff"].iloc[0]
    assert (row["label"], row["subject"], row["group"]) == ("angry", "KA", "KA_AN")
    assert ("README.png" in p for p, _ in report["skipped"]) and "label_pattern" in report["layout"]
    folds = H.make_folds(index.assign(label=pd.factorize(index["label"])[0]), "subject", num_folds=4)
    for f in folds:  # the subject protocol works on it
        assert not set(index["subject"].to_numpy()[f["train"]]) & set(index["subject"].to_numpy()[f["test"]])


def test_label_pattern_errors_say_what_is_wrong(tmp_path):
    root = _jaffe_like(tmp_path / "jaffe")
    with pytest.raises(H.DatasetError, match=r"named group \(\?P<label>"):
        H.discover_dataset(root, verbose=False, label_pattern=r"^(?P<subject>[A-Z]{2})\.")
    with pytest.raises(H.DatasetError, match="not a regular expression"):
        H.discover_dataset(root, verbose=False, label_pattern=r"(?P<label>[A-Z")
    with pytest.raises(H.DatasetError, match=r"does not match 56 of the 56 image files.*KA\.AN1\.1\.tiff"):
        H.discover_dataset(root, verbose=False, label_pattern=r"^(?P<label>[a-z]+)_\d+$")
    with pytest.raises(H.DatasetError, match=r"unknown class names \{'XX'"):
        write_image(root / "KA.XX1.99.tiff")
        H.discover_dataset(root, verbose=False, label_pattern=JAFFE_PATTERN)


def test_annotation_csv_round_trip_and_paths_relative_to_the_csv(tmp_path):
    root = _jaffe_like(tmp_path / "jaffe")
    index, _ = H.discover_dataset(root, verbose=False, label_pattern=JAFFE_PATTERN)
    index["split"] = ["test" if i % 5 == 0 else "train" for i in range(len(index))]
    (csv_path,) = [p for p in H.write_annotations(index, root) if p.name == "annotations.csv"]
    again, report = H.read_annotations_csv(csv_path, verbose=False)
    cols = ["rel_path", "label", "split", "subject", "group", "sha1"]
    pd.testing.assert_frame_equal(again[cols].reset_index(drop=True), index[cols].reset_index(drop=True))
    assert report["num_subjects"] == 4 and report["layout"] == "annotation CSV annotations.csv"
    # a minimal CSV beside the images, paths relative to it, 'sequence' for group, aliases for labels
    (root / "mine.csv").write_text("path,label,subject,sequence\nKA.AN1.1.tiff,anger,KA,s1\nKL.HA1.21.tiff,Happy,KL,s2\n")
    mine, _ = H.read_annotations_csv(root / "mine.csv", verbose=False)
    assert list(mine["label"]) == ["angry", "happy"] and list(mine["group"]) == ["s1", "s2"]
    # the notebooks' entry point: a CSV whose paths are relative to another folder (an extracted archive)
    (tmp_path / "labels.csv").write_text("path,label\njaffe/KA.SU1.13.tiff,surprise\n")
    via, report = H.index_dataset(tmp_path, verbose=False, labels_csv=tmp_path / "labels.csv")
    assert list(via["rel_path"]) == ["jaffe/KA.SU1.13.tiff"] and not report["pre_cropped"]


@pytest.mark.parametrize("body, message", [
    ("path,label\nKA.AN1.1.tiff,angry\nnope.png,happy\n", r"rows \[3\] name files that do not exist.*nope.png"),
    ("path,label\nKA.AN1.1.tiff,angry\nKA.AN2.2.tiff,grumpy\n", r"rows \[3\] have unknown labels \['grumpy'\]"),
    ("path,label\nKA.AN1.1.tiff,angry\nKA.AN1.1.tiff,angry\n", r"duplicate rows \[2, 3\]"),
    ("path,label\nKA.AN1.1.tiff,angry\nKA.AN1.1.tiff,happy\n", r"rows \[2, 3\] give one file different labels"),
    ("file,emotion\nKA.AN1.1.tiff,angry\n", r"no \['path', 'label'\] column"),
])
def test_annotation_csv_errors_name_the_rows(tmp_path, body, message):
    root = _jaffe_like(tmp_path / "jaffe", subjects=("KA",))
    (root / "bad.csv").write_text(body)
    with pytest.raises(H.DatasetError, match=message):
        H.read_annotations_csv(root / "bad.csv", verbose=False)


@pytest.mark.parametrize("scheme, names, expected", [
    ("JAFFE", ["KA.AN1.39.tiff", "KA.HA2.41.tiff", "YM.SU3.60.tiff", "YM.NE1.50.tiff"],
     [("angry", "KA"), ("happy", "KA"), ("surprise", "YM"), ("neutral", "YM")]),
    ("KDEF", ["AF01ANS.JPG", "BF01AFHL.JPG", "AM12HAFR.JPG", "BM12SUS.JPG"],
     [("angry", "F01"), ("fear", "F01"), ("happy", "M12"), ("surprise", "M12")]),
    ("RaFD", ["Rafd090_01_Caucasian_female_angry_frontal.jpg", "Rafd045_01_Caucasian_female_contemptuous_left.jpg",
              "Rafd090_33_Moroccan_male_fearful_right.jpg", "Rafd135_33_Moroccan_male_surprised_frontal.jpg"],
     [("angry", "01"), ("contempt", "01"), ("fear", "33"), ("surprise", "33")]),
])
def test_known_file_name_schemes_give_class_and_subject(tmp_path, scheme, names, expected):
    """Flat folders named exactly as each public dataset names its files: no parameter needed."""
    for k, name in enumerate(names):
        write_image(tmp_path / scheme / name, value=20 + k)
    index, report = H.discover_dataset(tmp_path / scheme, verbose=False)
    got = index.set_index("rel_path").loc[names, ["label", "subject"]]
    assert [tuple(r) for r in got.to_numpy()] == expected
    assert report["num_subjects"] == 2 and report["layout"].endswith("class codes in file names")


def test_naming_inferred_from_class_words_and_a_recurring_subject_token(tmp_path):
    k = 0
    for subject in ("anna", "bert", "cleo"):
        for word in ("happy", "sadness", "Surprised"):
            for _ in range(3):
                k += 1
                write_image(tmp_path / "mine" / f"{subject}-{word}-{k:04d}.png", value=k)
    index, report = H.discover_dataset(tmp_path / "mine", verbose=False)
    assert len(index) == 27 and set(index["label"]) == {"happy", "sad", "surprise"}
    row = index.set_index("rel_path").loc["bert-sadness-0013.png"]
    assert (row["label"], row["subject"], row["group"]) == ("sad", "bert", "bert_sad")
    rule = report["inferred_naming"]["rule"]
    assert "class = the token naming an emotion" in rule and "subject = token 0" in rule and report["num_subjects"] == 3


def test_naming_inferred_from_two_letter_codes(tmp_path):
    k = 0
    for subject in ("12", "31", "47", "58"):
        for code in ("AN", "FE", "NE"):
            k += 1
            write_image(tmp_path / "codes" / f"S{subject}_{code}_{k:05d}.bmp", value=k)
    index, report = H.discover_dataset(tmp_path / "codes", verbose=False)
    assert sorted(index["label"].unique()) == ["angry", "fear", "neutral"]
    assert sorted(index["subject"].unique()) == ["12", "31", "47", "58"]  # "S12" -> tokens "S", "12"


@pytest.mark.parametrize("names, message", [
    (["img_0001.png", "img_0002.png", "img_0003.png"], r"3 names have no class token"),
    (["happy_to_sad_01.png", "angry_02.png", "fear_03.png"], r"1 have several.*'happy', 'sad'"),
])
def test_naming_that_cannot_be_inferred_stops_with_the_candidates(tmp_path, names, message):
    for k, name in enumerate(names):
        write_image(tmp_path / "flat" / name, value=k)
    with pytest.raises(H.DatasetError, match=message):
        H.discover_dataset(tmp_path / "flat", verbose=False)

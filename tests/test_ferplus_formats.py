"""FERPlus input forms (b) fer2013.csv + fer2013new.csv and (c) custom CSVs, built from the real PNGs."""

import csv
import io
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import helpers as H


@pytest.fixture(scope="module")
def real_rows(ferplus_zip):
    """fer2013new.csv rows and a reader of the real PNGs."""
    z = zipfile.ZipFile(ferplus_zip)
    rows = list(csv.reader(io.StringIO(z.read("FERPlus/fer2013new.csv").decode())))
    folders = {"Training": "FER2013Train", "PublicTest": "FER2013Valid", "PrivateTest": "FER2013Test"}

    def png(usage, name):
        return np.asarray(Image.open(io.BytesIO(z.read(f"FERPlus/data/{folders[usage]}/{name}"))))

    return rows[0], rows[1:], png


def _pick(rows):
    """Rows from every Usage, including ones with an empty name (dropped by FERPlus)."""
    by_usage = {}
    for i, r in enumerate(rows):
        by_usage.setdefault(r[0], []).append(i)
    empty = [i for i, r in enumerate(rows) if not r[1]][:3]
    return sorted(set(sum((v[:15] for v in by_usage.values()), []) + empty))


def test_fer2013_csv_with_ferplus_votes(real_rows, tmp_path):
    header, rows, png = real_rows
    picked = _pick(rows)
    with open(tmp_path / "fer2013.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["emotion", "pixels", "Usage"])
        for i in picked:
            r = rows[i]
            pixels = png(r[0], r[1]) if r[1] else np.zeros((48, 48), np.uint8)
            w.writerow([0, " ".join(map(str, pixels.flatten())), r[0]])
    with open(tmp_path / "fer2013new.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows[i] for i in picked)
    root = H.prepare_ferplus(tmp_path / "fer2013.csv", tmp_path / "out", verbose=False)
    index, report = H.read_ferplus(root, verbose=False)
    named = [rows[i] for i in picked if rows[i][1]]
    assert len(index) == len(named) and len(named) < len(picked)  # empty-name rows dropped
    by_name = index.set_index("image")
    for r in named:
        votes = np.array(r[2:12], dtype=int)
        np.testing.assert_array_equal(by_name.loc[r[1], H.VOTE_COLUMNS].to_numpy(int), votes)
        expected = H.FERPLUS_COLUMNS[votes.argmax()] if votes.argmax() < 8 else ""
        assert by_name.loc[r[1], "label"] == expected
        np.testing.assert_array_equal(H.load_image(by_name.loc[r[1], "path"], 1), png(r[0], r[1]))
    assert set(index["split"]) == {"train", "val", "test"}
    # Rendered once: a second call reuses it.
    mtime = (root / ".rendered.json").stat().st_mtime_ns
    assert H.prepare_ferplus(tmp_path / "fer2013.csv", tmp_path / "out", verbose=False) == root
    assert (root / ".rendered.json").stat().st_mtime_ns == mtime


@pytest.mark.parametrize("form", ["pixels", "image"])
def test_custom_csv_forms(real_rows, tmp_path, form):
    header, rows, png = real_rows
    named = [i for i in _pick(rows) if rows[i][1]]
    picked = sum(([i for i in named if rows[i][0] == u][:6] for u in ("Training", "PublicTest", "PrivateTest")), [])
    codes = {"Training": 3, "PublicTest": 6, "PrivateTest": 0}  # happy, neutral, angry
    table = []
    for i in picked:
        r = rows[i]
        if form == "pixels":
            value = " ".join(map(str, png(r[0], r[1]).flatten()))
        else:
            Image.fromarray(png(r[0], r[1])).save(tmp_path / r[1])
            value = r[1]
        table.append({"emotion": codes[r[0]], form: value, "Usage": r[0]})
    pd.DataFrame(table).to_csv(tmp_path / "custom.csv", index=False)
    index, _ = H.read_ferplus(H.prepare_ferplus(tmp_path / "custom.csv", tmp_path / "out", verbose=False),
                              verbose=False)
    assert len(index) == len(picked)
    assert dict(index.groupby("split")["label"].first()) == {"train": "happiness", "val": "neutral", "test": "anger"}
    assert (index[H.VOTE_COLUMNS].sum(axis=1) == 10).all()


def test_bad_csvs_are_named(tmp_path):
    (tmp_path / "x.csv").write_text("a,b\n1,2\n")
    with pytest.raises(H.DatasetError, match="x.csv: needs columns"):
        H.render_fer2013_csv(tmp_path / "x.csv", tmp_path / "out")
    (tmp_path / "y.csv").write_text("emotion,pixels,Usage\n3,1 2 3,Training\n")
    with pytest.raises(H.DatasetError, match="y.csv: row 2: 3 pixels"):
        H.render_fer2013_csv(tmp_path / "y.csv", tmp_path / "out")
    assert not (tmp_path / "out" / "y-rendered").exists()
    (tmp_path / "z.csv").write_text("emotion,pixels,Usage\nbored,1 2 3 4,Training\n")
    with pytest.raises(H.DatasetError, match="z.csv: row 2: unknown emotion"):
        H.render_fer2013_csv(tmp_path / "z.csv", tmp_path / "out")


def test_rows_whose_png_is_missing_are_counted_and_said(tmp_path):
    root = H.prepare_ferplus(H.make_demo_ferplus(tmp_path / "ferplus-demo.zip"), tmp_path / "ex", verbose=False)
    full, _ = H.read_ferplus(root, verbose=False)
    gone = full["path"].iloc[3]
    Path(gone).unlink()
    with pytest.warns(UserWarning, match=r"1 images listed in label.csv are missing"):
        index, report = H.read_ferplus(root, verbose=False)
    assert len(index) == len(full) - 1 and report["skipped"] == [(gone, "listed in label.csv but missing")]

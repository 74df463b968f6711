"""Robust image loading: every mode and format the datasets come in, and clear errors."""

import numpy as np
import pytest
from PIL import Image

import helpers as H


def test_16bit_png_is_rescaled_to_8bit(tmp_path):
    arr = np.array([[0, 65535], [32768, 1000]], dtype=np.uint16)
    Image.fromarray(arr).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    out = H.load_image(tmp_path / "deep.png", channels=1)
    assert out.dtype == np.uint8 and out[0, 0] == 0 and out[0, 1] == 255 and out[1, 0] == 128


def test_rgba_is_composited_and_gray_repeats_for_rgb(tmp_path):
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[..., 3] = 255
    rgba[0, 0, 3] = 0  # transparent pixel -> black background
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    out = H.load_image(tmp_path / "a.png", channels=3)
    assert out.shape == (4, 4, 3) and tuple(out[1, 1]) == (200, 0, 0) and tuple(out[0, 0]) == (0, 0, 0)
    Image.fromarray(np.full((3, 5), 90, np.uint8)).save(tmp_path / "g.bmp")
    rgb = H.load_image(tmp_path / "g.bmp", channels=3)
    assert rgb.shape == (3, 5, 3) and (rgb == 90).all()


def test_palette_tiff(tmp_path):
    im = Image.fromarray(np.array([[0, 1], [1, 0]], np.uint8), "P")
    im.putpalette([0, 0, 0, 255, 255, 255] + [0] * 762)
    im.save(tmp_path / "p.tif")
    out = H.load_image(tmp_path / "p.tif", channels=1)
    assert out.tolist() == [[0, 255], [255, 0]]


def test_exif_orientation_is_applied(tmp_path):
    arr = np.zeros((10, 20, 3), np.uint8)
    arr[:, :5] = 255  # white band on the left of a landscape image
    im = Image.fromarray(arr)
    exif = im.getexif()
    exif[0x0112] = 6  # stored rotated: viewers turn it 90 deg clockwise
    im.save(tmp_path / "r.jpg", exif=exif, quality=95)
    out = H.load_image(tmp_path / "r.jpg", channels=1)
    assert out.shape == (20, 10)          # portrait once oriented
    assert out[:5].mean() > 200 and out[-5:].mean() < 50  # the band is now at the top


def test_corrupt_and_missing_files_raise_dataset_error_naming_them(tmp_path):
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 garbage")
    with pytest.raises(H.DatasetError, match="bad.jpg"):
        H.load_image(tmp_path / "bad.jpg")
    good = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(good).save(tmp_path / "t.jpg")
    (tmp_path / "trunc.jpg").write_bytes((tmp_path / "t.jpg").read_bytes()[:300])
    with pytest.raises(H.DatasetError, match="trunc.jpg"):
        H.load_image(tmp_path / "trunc.jpg")
    with pytest.raises(H.DatasetError, match="missing.png: no such"):
        H.load_image(tmp_path / "missing.png")

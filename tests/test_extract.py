"""Finding and extracting archives: safety, atomicity, reuse, clear errors."""

import io
import os
import tarfile
import zipfile

import pytest

import helpers as H


def make_zip(path, entries):
    with zipfile.ZipFile(path, "w") as z:
        for name, data in entries.items():
            z.writestr(name, data)
    return path


def test_find_archive_prefers_patterns_then_single_archive(tmp_path):
    assert H.find_archive(tmp_path) is None
    (tmp_path / "other.zip").write_bytes(b"")
    assert H.find_archive(tmp_path).name == "other.zip"
    (tmp_path / "archive.zip").write_bytes(b"")
    assert H.find_archive(tmp_path).name == "archive.zip"
    (tmp_path / "FERPlus.zip").write_bytes(b"")
    assert H.find_archive(tmp_path, patterns=("*ferplus*",)).name == "FERPlus.zip"
    assert H.find_archive(tmp_path, patterns=("*kmu*",), any_archive=False) is None
    with pytest.raises(H.DatasetError, match="several archives"):
        H.find_archive(tmp_path, patterns=("*kmu*",))


def test_extract_zip_then_reuse_then_reextract_on_change(tmp_path):
    z = make_zip(tmp_path / "data.zip", {"a/angry/x.txt": "1"})
    out = H.extract_archive(z, tmp_path / "ex", verbose=False)
    assert (out / "a" / "angry" / "x.txt").read_text() == "1"
    marker = (out / ".extracted.json").stat().st_mtime_ns
    (out / "a" / "angry" / "x.txt").write_text("local edit")
    H.extract_archive(z, tmp_path / "ex", verbose=False)  # unchanged archive: skipped
    assert (out / "a" / "angry" / "x.txt").read_text() == "local edit"
    assert (out / ".extracted.json").stat().st_mtime_ns == marker
    os.utime(z, ns=(1, 1))  # touched but identical content: still reused (hash matches)
    H.extract_archive(z, tmp_path / "ex", verbose=False)
    assert (out / "a" / "angry" / "x.txt").read_text() == "local edit"
    make_zip(z, {"a/angry/x.txt": "2", "a/angry/y.txt": "3"})
    H.extract_archive(z, tmp_path / "ex", verbose=False)
    assert (out / "a" / "angry" / "x.txt").read_text() == "2"
    assert not [p for p in (tmp_path / "ex").iterdir() if p.name != "data"]  # no partial/stale left


@pytest.mark.parametrize("bad", ["../evil.txt", "a/../../evil.txt", "/tmp/evil_abs.txt"])
def test_zip_with_unsafe_entry_is_refused_and_writes_nothing(tmp_path, bad):
    z = tmp_path / "bad.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("ok/good.txt", "fine")
        zf.writestr(zipfile.ZipInfo(bad), "evil")
    with pytest.raises(H.DatasetError, match="bad.zip.*refusing"):
        H.extract_archive(z, tmp_path / "ex", verbose=False)
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path.parent / "evil.txt").exists()
    assert not os.path.exists("/tmp/evil_abs.txt")
    assert not (tmp_path / "ex").exists() or not any((tmp_path / "ex").iterdir())


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink"])
def test_tar_with_unsafe_entry_is_refused(tmp_path, kind):
    t = tmp_path / "bad.tar.gz"
    with tarfile.open(t, "w:gz") as tf:
        info = tarfile.TarInfo("ok/good.txt")
        info.size = 4
        tf.addfile(info, io.BytesIO(b"fine"))
        if kind == "symlink":
            link = tarfile.TarInfo("ok/link")
            link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tf.addfile(link)
        else:
            info = tarfile.TarInfo("../evil.txt" if kind == "dotdot" else "/tmp/evil_abs_tar.txt")
            info.size = 4
            tf.addfile(info, io.BytesIO(b"evil"))
    with pytest.raises(H.DatasetError, match="bad.tar.gz"):
        H.extract_archive(t, tmp_path / "ex", verbose=False)
    assert not (tmp_path / "evil.txt").exists() and not os.path.exists("/tmp/evil_abs_tar.txt")
    assert not (tmp_path / "ex" / "bad").exists()


def test_tar_gz_extracts(tmp_path):
    t = tmp_path / "set.tgz"
    with tarfile.open(t, "w:gz") as tf:
        info = tarfile.TarInfo("set/happy/a.txt")
        info.size = 2
        tf.addfile(info, io.BytesIO(b"hi"))
    out = H.extract_archive(t, tmp_path / "ex", verbose=False)
    assert (out / "set" / "happy" / "a.txt").read_bytes() == b"hi"


def test_truncated_zip_names_the_file_and_keeps_the_old_extraction(tmp_path):
    z = make_zip(tmp_path / "data.zip", {"a/angry/x.txt": "old"})
    out = H.extract_archive(z, tmp_path / "ex", verbose=False)
    payload = make_zip(tmp_path / "new.zip", {f"a/angry/{i}.bin": os.urandom(5000) for i in range(5)}).read_bytes()
    z.write_bytes(payload[: len(payload) // 2])
    with pytest.raises(H.DatasetError, match=r"data\.zip.*(corrupt|truncated)"):
        H.extract_archive(z, tmp_path / "ex", verbose=False)
    assert (out / "a" / "angry" / "x.txt").read_text() == "old"
    assert sorted(p.name for p in (tmp_path / "ex").iterdir()) == ["data"]


def test_zip_with_corrupt_member_data_is_an_error(tmp_path):
    z = make_zip(tmp_path / "crc.zip", {"a/x.bin": b"A" * 10000})
    raw = bytearray(z.read_bytes())
    pos = raw.find(b"a/x.bin") + len("a/x.bin") + 10  # inside the (stored? deflated) payload
    raw[pos] ^= 0xFF
    z.write_bytes(bytes(raw))
    with pytest.raises(H.DatasetError, match="crc.zip"):
        H.extract_archive(z, tmp_path / "ex", verbose=False)


def test_missing_archive_is_a_clear_error(tmp_path):
    with pytest.raises(H.DatasetError, match="nope.zip: no such archive"):
        H.extract_archive(tmp_path / "nope.zip", tmp_path / "ex")


def test_a_zip_bomb_is_refused_before_anything_is_written(tmp_path):
    z = tmp_path / "bomb.zip"  # ~20 KB on disk, 20 MB of zeros inside (1000x): past the stated 100x limit
    with zipfile.ZipFile(z, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("faces/angry/a.png", b"\0" * 20_000_000)
    assert z.stat().st_size < 100_000
    with pytest.raises(H.DatasetError, match=r"bomb\.zip: refusing to extract.*expand to 20,000,000 bytes.*100x"):
        H.extract_archive(z, tmp_path / "ex", verbose=False)
    assert not (tmp_path / "ex").exists() or not any((tmp_path / "ex").iterdir())


def test_a_tar_gz_bomb_is_refused_too(tmp_path):
    t = tmp_path / "bomb.tar.gz"
    with tarfile.open(t, "w:gz") as tf:
        info = tarfile.TarInfo("faces/angry/a.png")
        info.size = 20_000_000
        tf.addfile(info, io.BytesIO(b"\0" * info.size))
    with pytest.raises(H.DatasetError, match=r"bomb\.tar\.gz: refusing to extract.*decompression bomb"):
        H.extract_archive(t, tmp_path / "ex", verbose=False)
    assert not (tmp_path / "ex").exists() or not any((tmp_path / "ex").iterdir())

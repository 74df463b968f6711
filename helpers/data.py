"""Data stage 1: find an archive, extract it safely, discover its layout, load images.

The output of this stage is an *index*: a pandas DataFrame with one row per usable image
(path, label, split, subject, group, size, content hash, duplicate flag) plus a report dict
of what was found, mapped, skipped or empty. Everything downstream (faces, cache) reads
the index, never the folder tree.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import stat
import tarfile
import warnings
import zipfile
import zlib
from collections import Counter
from pathlib import Path, PurePosixPath
from typing import Callable

import numpy as np
import pandas as pd
from PIL import Image, ImageOps

from .setup import atomic_write, output_lock, remove_stale_temps

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp", ".pgm"}
ARCHIVE_SUFFIXES = (".zip", ".tar.gz", ".tgz", ".tar")

# Canonical class names (KMU-FED's folder names, plus FER+'s neutral and contempt).
CLASS_ALIASES = {
    "angry": "angry", "anger": "angry", "an": "angry",
    "disgust": "disgust", "disgusted": "disgust", "di": "disgust",
    "fear": "fear", "fearful": "fear", "scared": "fear", "fe": "fear",
    "happy": "happy", "happiness": "happy", "joy": "happy", "ha": "happy",
    "sad": "sad", "sadness": "sad", "sa": "sad",
    "surprise": "surprise", "surprised": "surprise", "su": "surprise",
    "neutral": "neutral", "ne": "neutral",
    "contempt": "contempt", "co": "contempt",
}
SPLIT_ALIASES = {
    "train": "train", "training": "train", "fer2013train": "train",
    "val": "val", "valid": "val", "validation": "val", "fer2013valid": "val", "publictest": "val",
    "test": "test", "testing": "test", "fer2013test": "test", "privatetest": "test",
}
# File-name schemes of public datasets that carry class, subject and sequence (README: Data).
KMU_NAME = re.compile(r"^(?P<subject>\d+)_(?P<code>[A-Za-z]{2})_(?P<initials>[A-Za-z0-9]+)_(?P<frame>\d+)$")
CKPLUS_NAME = re.compile(r"^(?P<subject>S\d+)_(?P<seq>\d+)_(?P<frame>\d+)$")
# JAFFE: KA.AN1.39 (subject initials, expression code + take, image number)
JAFFE_NAME = re.compile(r"^(?P<subject>[A-Z]{2})\.(?P<code>AN|DI|FE|HA|NE|SA|SU)(?P<take>\d+)\.\d+$")
# KDEF: AF01ANS (session A/B, female/male, id, expression, pose FL HL S HR FR); AF = afraid
KDEF_NAME = re.compile(r"^(?P<session>[AB])(?P<sex>[FM])(?P<id>\d{2})(?P<code>AF|AN|DI|HA|NE|SA|SU)"
                       r"(?P<pose>FL|HL|S|HR|FR)$", re.IGNORECASE)
# RaFD: Rafd090_01_Caucasian_female_angry_frontal (pose angle, id, ethnicity, sex, expression, gaze)
RAFD_NAME = re.compile(r"^Rafd(?P<pose>\d{3})_(?P<id>\d{2})_(?P<ethnicity>[A-Za-z]+)_(?P<sex>female|male)_"
                       r"(?P<word>[a-z]+)_(?P<gaze>frontal|left|right)$", re.IGNORECASE)
SCHEME_WORDS = {"af": "fear", "contemptuous": "contempt"}  # the schemes' own words the alias table lacks


class DatasetError(RuntimeError):
    """Bad input: the message names the file and what is wrong with it."""


# ----------------------------------------------------------------------------- find

def find_archive(workdir: str | Path, patterns: tuple[str, ...] = ("archive.zip",),
                 any_archive: bool = True, file_suffixes: tuple[str, ...] = ARCHIVE_SUFFIXES) -> Path | None:
    """Find a dataset archive (or an already extracted folder) in the working directory.

    Args:
        workdir: folder to search (not recursive).
        patterns: case-insensitive glob patterns tried in order (e.g. ``"*kmu*"``); the first
            archive or folder that matches wins.
        any_archive: if no pattern matches, fall back to the only archive in ``workdir``
            (``.zip``/``.tar.gz``/``.tgz``/``.tar``); several candidates raise an error.
        file_suffixes: files a pattern may match (besides folders); e.g. add ``".csv"``.

    Returns:
        The path, or None when nothing is there (the caller then uses the demo dataset).
    """
    workdir = Path(workdir)
    if not workdir.is_dir():
        return None
    entries = sorted(p for p in workdir.iterdir() if not p.name.startswith("."))
    for pattern in patterns:
        pat = pattern.lower()
        for p in entries:
            if Path(p.name.lower()).match(pat) and (p.is_dir() or p.name.lower().endswith(tuple(file_suffixes))):
                return p
    if not any_archive:
        return None
    archives = [p for p in entries if p.is_file() and p.name.lower().endswith(ARCHIVE_SUFFIXES)]
    if len(archives) > 1:
        raise DatasetError(f"{workdir}: several archives ({', '.join(a.name for a in archives)}); "
                           "set data_path to the one to use")
    return archives[0] if archives else None


def locate_dataset(workdir: str | Path, data_path: str | Path | None, patterns: tuple[str, ...], name: str,
                   make_demo: Callable[..., Path], demo_file: str, seed: int = 0,
                   also_files: tuple[str, ...] = ()) -> tuple[Path, str]:
    """The dataset to use: ``data_path``, else a match in ``workdir``, else a generated demo (loudly).

    Args:
        workdir: the working directory searched with :func:`find_archive`.
        data_path: explicit archive, folder or file; wins when set.
        patterns: name patterns for :func:`find_archive`.
        name: dataset name for the notice (e.g. ``"KMU-FED"``).
        make_demo: demo writer, called as ``make_demo(path, seed=seed)``.
        demo_file: file name of the demo archive under ``workdir/demo``.
        seed: demo seed.
        also_files: file suffixes accepted besides archives (e.g. ``(".csv",)``).

    Returns:
        ``(source, data_kind)`` where data_kind is ``"real"`` or ``"generated demo"``.
    """
    workdir = Path(workdir)
    if data_path:
        return Path(data_path), "real"
    source = find_archive(workdir, patterns=patterns, any_archive=False,
                          file_suffixes=ARCHIVE_SUFFIXES + tuple(also_files))
    if source is not None:
        return source, "real"
    with output_lock(workdir / "demo" / demo_file, "the demo dataset"):  # runs side by side write it in turn
        source = make_demo(workdir / "demo" / demo_file, seed=seed)
    print("=" * 72 + f"\nNO {name} ARCHIVE FOUND in {workdir.resolve()}\n"
          "Using the GENERATED DEMO dataset: the numbers below say nothing about real faces.\n"
          f"Put the {name} archive in {workdir}/ (or set data_path) for real results.\n" + "=" * 72)
    return source, "generated demo"


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _archive_stem(path: Path) -> str:
    name = path.name
    for suffix in ARCHIVE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _check_member_name(archive: Path, name: str) -> None:
    """Refuse names that would land outside the extraction folder."""
    p = PurePosixPath(name.replace("\\", "/"))
    if p.is_absolute() or re.match(r"^[A-Za-z]:", name) or name.startswith(("/", "\\")):
        raise DatasetError(f"{archive}: refusing entry with an absolute path: {name!r}")
    if ".." in p.parts:
        raise DatasetError(f"{archive}: refusing entry that climbs out of the target with '..': {name!r}")


# A dataset's images barely compress (JPEG/PNG: ~1x; a CSV of pixels: ~3x); an archive that
# says it expands more than this is refused as a decompression bomb before anything is written.
MAX_EXPANSION = 100


def _check_expanded_size(archive: Path, total: int, dest: Path) -> None:
    """Refuse an archive whose members add up to more than ``MAX_EXPANSION`` x its size or than the free disk."""
    size = archive.stat().st_size
    if total > MAX_EXPANSION * max(size, 1):
        raise DatasetError(f"{archive}: refusing to extract: its {size:,} bytes expand to {total:,} bytes "
                           f"({total / max(size, 1):,.0f}x, the limit is {MAX_EXPANSION}x): a decompression bomb "
                           "or not a dataset of images")
    free = shutil.disk_usage(dest).free
    if total > free:
        raise DatasetError(f"{archive}: extracting needs {total / 2**30:.2f} GiB, only {free / 2**30:.2f} GiB "
                           f"free under {dest}: free some space or set workdir to a larger disk")


def _extract_zip(archive: Path, dest: Path) -> None:
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as e:
        raise DatasetError(f"{archive}: not a readable zip archive (corrupt or truncated): {e}") from e
    with zf:
        members = zf.infolist()
        for info in members:  # validate everything before writing anything
            _check_member_name(archive, info.filename)
            if stat.S_ISLNK(info.external_attr >> 16):
                raise DatasetError(f"{archive}: refusing symbolic link entry {info.filename!r}")
        # zipfile never writes more than a member's declared size, so the declared sizes bound the output.
        _check_expanded_size(archive, sum(info.file_size for info in members), dest)
        try:
            for info in members:
                zf.extract(info, dest)
        except (zipfile.BadZipFile, EOFError, OSError, zlib.error) as e:
            raise DatasetError(f"{archive}: corrupt or truncated entry while extracting: {e}") from e


def _extract_tar(archive: Path, dest: Path) -> None:
    try:
        with tarfile.open(archive) as tf:
            members = tf.getmembers()
            for m in members:
                _check_member_name(archive, m.name)
            _check_expanded_size(archive, sum(m.size for m in members if m.isfile()), dest)
            # The "data" filter also refuses links pointing outside dest and device files.
            tf.extractall(dest, filter="data")
    except tarfile.FilterError as e:
        raise DatasetError(f"{archive}: refusing unsafe entry: {e}") from e
    except (tarfile.TarError, EOFError, OSError) as e:
        raise DatasetError(f"{archive}: corrupt or truncated tar archive: {e}") from e


def extract_archive(archive: str | Path, out_dir: str | Path, verbose: bool = True) -> Path:
    """Extract an archive safely and atomically, reusing an up-to-date extraction.

    The archive is unpacked into ``out_dir/<stem>.partial-<pid>`` and renamed to
    ``out_dir/<stem>`` only when complete; a fingerprint (size, mtime, SHA-256) saved
    inside makes a rerun skip the work. A corrupt archive raises :class:`DatasetError`
    and leaves any earlier extraction untouched. A folder is returned as it is.

    Args:
        archive: ``.zip``, ``.tar.gz``, ``.tgz`` or ``.tar`` file, or an extracted folder.
        out_dir: where extracted folders live.
        verbose: print what was done.

    Returns:
        The extracted folder.
    """
    archive = Path(archive)
    if archive.is_dir():
        return archive
    if not archive.is_file():
        raise DatasetError(f"{archive}: no such archive")
    out_dir = Path(out_dir)
    target = out_dir / _archive_stem(archive)
    with output_lock(target, f"extracting {archive.name}"):
        marker = target / ".extracted.json"
        st = archive.stat()
        fingerprint = {"archive": archive.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
        if marker.exists():
            old = json.loads(marker.read_text())
            same_stat = all(old.get(k) == v for k, v in fingerprint.items())
            # Size and mtime usually settle it; a touched but identical archive is caught by the hash.
            if same_stat or (old.get("size") == st.st_size and old.get("sha256") == file_sha256(archive)):
                if verbose:
                    print(f"Reusing extraction {target} (archive unchanged)")
                return target
        fingerprint["sha256"] = file_sha256(archive)
        out_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(out_dir)  # half-extracted folders of killed runs
        tmp = out_dir / f"{target.name}.partial-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            if archive.name.lower().endswith(".zip"):
                _extract_zip(archive, tmp)
            elif archive.name.lower().endswith((".tar.gz", ".tgz", ".tar")):
                _extract_tar(archive, tmp)
            else:
                raise DatasetError(f"{archive}: unsupported archive type (use .zip, .tar.gz, .tgz or .tar)")
            (tmp / ".extracted.json").write_text(json.dumps(fingerprint, indent=1))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if target.exists():  # replace a stale extraction only now that the new one is complete
            stale = out_dir / f"{target.name}.stale-{os.getpid()}"
            target.rename(stale)
            tmp.rename(target)
            shutil.rmtree(stale, ignore_errors=True)
        else:
            tmp.rename(target)
        if verbose:
            print(f"Extracted {archive.name} -> {target}")
        return target


# ----------------------------------------------------------------------------- images

def load_image(path: str | Path, channels: int = 3) -> np.ndarray:
    """Decode an image to uint8, whatever its mode, honouring EXIF orientation.

    Handles grayscale, RGB, RGBA/LA (composited on black), palette, 16- and 32-bit
    integer images (rescaled to 8 bits) and JPEG/PNG/TIFF/BMP.

    Args:
        path: image file.
        channels: 1 (H x W) or 3 (H x W x 3).

    Returns:
        uint8 array.

    Raises:
        DatasetError: the file is missing, not an image, or corrupt.
    """
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            im.load()
            if im.mode == "P":
                im = im.convert("RGBA" if "transparency" in im.info else "RGB")
            if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
                arr = np.asarray(im, dtype=np.float64)
                top = 65535.0 if im.mode.startswith("I;16") or arr.max() <= 65535 else arr.max()
                im = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8))
            if im.mode in ("RGBA", "LA", "PA"):
                background = Image.new("RGBA", im.size, (0, 0, 0, 255))
                im = Image.alpha_composite(background, im.convert("RGBA"))
            im = im.convert("L" if channels == 1 else "RGB")
            return np.asarray(im, dtype=np.uint8)
    except FileNotFoundError as e:
        raise DatasetError(f"{path}: no such image file") from e
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DatasetError(f"{path}: not a readable image ({e})") from e


def _probe_image(path: Path) -> tuple[int, int] | None:
    """Image size from the header only, or None for a non-image."""
    try:
        with Image.open(path) as im:
            return im.size
    except Exception:  # noqa: BLE001 - any failure means "not an image we can read"
        return None


# ----------------------------------------------------------------------------- layouts

def normalise_class(name: str) -> str | None:
    """Canonical class name for a folder name or file-name code, or None if unknown."""
    key = re.sub(r"[^a-z]", "", name.lower())
    return CLASS_ALIASES.get(key)


def _split_of(parts: tuple[str, ...]) -> str:
    for part in reversed(parts):
        split = SPLIT_ALIASES.get(part.lower().replace("_", "").replace("-", ""))
        if split:
            return split
    return ""


def _scheme_label(word: str) -> str | None:
    return SCHEME_WORDS.get(word.lower()) or normalise_class(word)


def _subject_and_group(stem: str) -> tuple[str, str, str | None]:
    """(subject, group, class code or word) from a file name of a known scheme: KMU-FED, CK+, JAFFE,
    KDEF or RaFD (the class is None where the scheme names none, as CK+'s)."""
    m = KMU_NAME.match(stem)
    if m:
        subject = str(int(m["subject"]))  # "1_AN_mr" and "01_AN_mr" are one subject
        return subject, f"{subject}_{m['code'].upper()}", m["code"]
    m = CKPLUS_NAME.match(stem)
    if m:
        return m["subject"], f"{m['subject']}_{m['seq']}", None
    m = JAFFE_NAME.match(stem)
    if m:
        return m["subject"], f"{m['subject']}_{m['code']}{m['take']}", m["code"]
    m = KDEF_NAME.match(stem)
    if m:  # sessions A and B are the same person; one sequence per session and expression (5 poses)
        subject = f"{m['sex'].upper()}{m['id']}"
        return subject, f"{subject}_{m['session'].upper()}_{m['code'].upper()}", m["code"]
    m = RAFD_NAME.match(stem)
    if m:  # one sequence per person and expression (poses x gazes)
        return m["id"], f"{m['id']}_{m['word'].lower()}", m["word"]
    return "", "", None


def _compile_label_pattern(label_pattern: str | None) -> re.Pattern | None:
    if label_pattern is None:
        return None
    try:
        pattern = re.compile(label_pattern)
    except re.error as e:
        raise DatasetError(f"label_pattern {label_pattern!r} is not a regular expression: {e}") from e
    if "label" not in pattern.groupindex:
        raise DatasetError(f"label_pattern {label_pattern!r} needs a named group (?P<label>...); optional groups: "
                           "(?P<subject>...), (?P<group>...)")
    return pattern


def _add_image(rows: list, skipped: list, p: Path, root: Path, label: str, split: str, subject: str,
               group: str) -> bool:
    """Append the index row of a readable image file; an unreadable one is warned about and listed."""
    size = _probe_image(p)
    if size is None:
        warnings.warn(f"{p}: not a readable image; skipped")
        skipped.append((str(p), "not a readable image"))
        return False
    st = p.stat()
    rows.append({"path": str(p), "rel_path": p.relative_to(root).as_posix() if p.is_relative_to(root) else str(p),
                 "label": label, "split": split, "subject": subject, "group": group, "width": size[0],
                 "height": size[1], "size_bytes": st.st_size, "mtime_ns": st.st_mtime_ns, "sha1": _sha1(p)})
    return True


def _index_report(index: pd.DataFrame, root: Path, layout: str, mapping: dict[str, set], skipped: list,
                  **extra) -> dict:
    """The report of an index: layout, class mapping and counts, splits, subjects, duplicates, skipped files."""
    return {"root": str(root), "layout": layout, "num_images": len(index),
            "class_mapping": {c: sorted(v) for c, v in sorted(mapping.items())},
            "counts": {c: int(n) for c, n in sorted(Counter(index["label"]).items())},
            "splits": {s or "(none)": int(n) for s, n in Counter(index["split"]).items()},
            "num_subjects": int(index.loc[index["subject"] != "", "subject"].nunique()),
            "duplicates": [(r.rel_path, r.duplicate_of) for r in index.itertuples() if r.duplicate_of],
            "skipped": skipped, **extra}


def discover_dataset(root: str | Path, accept_unknown_classes: bool = False,
                     verbose: bool = True, label_pattern: str | None = None) -> tuple[pd.DataFrame, dict]:
    r"""Index every image under ``root`` with its class, split, subject and content hash.

    Accepted layouts, at any depth below ``root``:
    (a) split folders (train/training, val/valid/validation, test) holding class folders;
    (b) class folders only; (c) flat files named by a known scheme (KMU-FED, JAFFE, KDEF,
    RaFD; CK+ names give subject and sequence only), e.g. a KMU-FED class code
    (``01_AN_mr_001.jpg``: AN DI FE HA SA SU NE). Class names go through an alias table
    (anger -> angry, happiness -> happy, ...) and the mapping is printed.

    Args:
        root: extracted dataset folder.
        accept_unknown_classes: keep class-folder names the alias table does not know,
            as they are, instead of raising.
        verbose: print the class mapping and what was skipped.
        label_pattern: a regular expression with a named group ``label`` and optional
            ``subject`` and ``group``, searched in each file name, then in its path relative to
            ``root``; it takes precedence over folders and known names. E.g.
            ``r"^(?P<subject>[A-Z]{2})\.(?P<label>[A-Z]{2})\d\.\d+$"`` for ``KA.AN1.39.tiff``-style
            names. Files it does not match are listed in the report; when most do not, it stops.

    Returns:
        ``(index, report)``: ``index`` has columns path (absolute), rel_path, label, split,
        subject, group, width, height, size_bytes, mtime_ns, sha1, duplicate_of; ``report``
        holds layout, class_mapping, counts, skipped files, empty classes and duplicates.

    Raises:
        DatasetError: no images, or class names that are not recognised.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: not a folder")
    pattern = _compile_label_pattern(label_pattern)
    unmatched: list[str] = []
    unnamed: list[tuple[Path, tuple]] = []
    rows, skipped, unknown = [], [], Counter()
    mapping: dict[str, set] = {}
    class_dirs: dict[Path, str] = {}
    image_dirs: set[Path] = set()  # folders holding image files, readable or not
    kinds = Counter()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith((".", "__MACOSX")))
        d = Path(dirpath)
        canon = normalise_class(d.name) if d != root else None
        if canon:
            class_dirs[d] = canon
        for fn in sorted(filenames):
            p = d / fn
            if fn.startswith(".") or p.suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            rel = p.relative_to(root)
            parents = rel.parts[:-1]
            subject, group, code = _subject_and_group(p.stem)
            image_dirs.add(d)
            m = pattern and (pattern.search(p.stem) or pattern.search(p.name) or pattern.search(rel.as_posix()))
            if pattern is not None and not m:
                unmatched.append(rel.as_posix())
                skipped.append((str(p), "does not match label_pattern"))
                continue
            if m:
                raw = m["label"]
                label, kind = normalise_class(raw), "pattern"
                if label is None and not accept_unknown_classes:
                    unknown[raw] += 1
                    continue
                label = label or raw
                groups = m.groupdict()
                subject = groups.get("subject") or subject
                group = groups.get("group") or (f"{subject}_{raw}" if groups.get("subject") else group)
            elif canon:
                label, raw, kind = canon, d.name, "folder"
            elif code and _scheme_label(code):
                label, raw, kind = _scheme_label(code), code, "filename"
            elif parents and not _split_of(parents[-1:]):
                raw = d.name
                if not accept_unknown_classes:
                    unknown[raw] += 1
                    continue
                label, kind = raw, "folder"
                class_dirs[d] = raw
            else:
                unnamed.append((p, parents))  # maybe a naming to infer (below), else skipped
                continue
            kinds[kind] += 1
            if _add_image(rows, skipped, p, root, label, _split_of(parents), subject, group):
                mapping.setdefault(label, set()).add(raw)
    inferred = None
    if unnamed and len(unnamed) > len(rows):  # mostly a flat naming no rule knows: infer it, loudly, or stop
        inferred = infer_naming([p.stem for p, _ in unnamed])
        for (p, parents), (label, subject) in zip(unnamed, inferred.pop("labels")):
            kinds["filename"] += 1
            if _add_image(rows, skipped, p, root, label, _split_of(parents), subject,
                          f"{subject}_{label}" if subject else ""):
                mapping.setdefault(label, set()).add(inferred["tokens"][label])
        if verbose:
            print(f"Inferred from the file names: {inferred['rule']}")
    else:
        skipped += [(str(p), "no class folder and no class code in the file name") for p, _ in unnamed]
    if pattern is not None and unmatched and len(unmatched) * 2 > len(unmatched) + len(rows) + sum(unknown.values()):
        total = len(unmatched) + len(rows) + sum(unknown.values())
        raise DatasetError(f"{root}: label_pattern {label_pattern!r} does not match {len(unmatched)} of the {total} "
                           f"image files, e.g. {unmatched[:5]}; check it against these names")
    if unmatched:
        warnings.warn(f"{len(unmatched)} files do not match label_pattern and were left out, e.g. {unmatched[:5]}")
    if unknown:
        raise DatasetError(
            f"{root}: unknown class names {dict(unknown)}; known names are "
            f"{sorted(set(CLASS_ALIASES.values()))} and their aliases. Rename the folders, or pass "
            "accept_unknown_classes=True to use the names as they are.")
    unreadable = [path for path, why in skipped if why == "not a readable image"]
    if not rows and unreadable:
        raise DatasetError(f"{root}: {len(unreadable)} image files found, but none could be read (corrupt, "
                           f"truncated or not images), e.g. {unreadable[:3]}")
    if not rows:
        raise DatasetError(f"{root}: no images found in any accepted layout "
                           "(split/class folders, class folders, or KMU-FED file names)")
    index = pd.DataFrame(rows)
    _flag_duplicates(index)
    empty = sorted({name for d, name in class_dirs.items()
                    if not any(d == i or d in i.parents for i in image_dirs)})
    # Class folders whose files all failed to read: not "empty", and said as such.
    unreadable_classes = {name: sum(Path(u).is_relative_to(d) for u in unreadable)
                          for d, name in class_dirs.items() if name not in empty and name not in set(index["label"])}
    layout = ("split folders" if index["split"].ne("").any() else "no split") + " + " + (
        f"label_pattern {label_pattern!r}" if pattern is not None
        else "class folders" if kinds["folder"] >= kinds["filename"] else "class codes in file names")
    report = _index_report(index, root, layout, mapping, skipped, empty_classes=empty, inferred_naming=inferred,
                           unreadable_classes=unreadable_classes)
    if verbose:
        print_report(report)
    return index, report


def infer_naming(stems: list[str]) -> dict:
    """Infer class and subject from file names that no folder, known scheme or pattern explains.

    Each name is split into tokens (on ``_ . -`` and letter/digit boundaries). The class is
    the one token of each name that names a class (a class word, an alias or a two-letter
    code); the subject is the token position whose values recur across several classes (as a
    subject's id does), when exactly one position does.

    Returns:
        ``{"labels": [(label, subject), ...], "rule": str, "class_examples": [...],
        "subject_position": int | None, "subject_candidates": [...], "tokens": {label: token}}``.

    Raises:
        DatasetError: names with no class token or with several (the candidates are listed):
            never a silent guess; ``label_pattern`` states the rule instead.
    """
    tokens = [re.findall(r"[A-Za-z]+|\d+", s) for s in stems]
    found, bad = [], []
    for stem, toks in zip(stems, tokens):
        hits = [(i, _scheme_label(t)) for i, t in enumerate(toks) if _scheme_label(t)]
        if len(hits) == 1:
            found.append(hits[0])
        else:
            bad.append((stem, [toks[i] for i, _ in hits]))
    if bad:
        none = [s for s, h in bad if not h]
        several = [(s, h) for s, h in bad if h]
        raise DatasetError(
            f"cannot tell the class from the file names: {len(none)} names have no class token (e.g. {none[:3]}), "
            f"{len(several)} have several (e.g. {several[:3]}); set label_pattern, e.g. "
            r"r'^(?P<subject>[A-Z]{2})\.(?P<label>[A-Z]{2})\d+\.\d+$'")
    labels = [label for _, label in found]
    class_tokens = {label: tokens[k][i] for k, (i, label) in enumerate(found)}
    # subject: a position (not the class token's) present in every name, whose values each recur with at
    # least two classes, with between 2 and a third as many distinct values as there are names
    candidates = []
    for pos in range(min(len(t) for t in tokens)):
        if any(pos == i for i, _ in found):
            continue
        classes_of: dict[str, set] = {}
        for t, label in zip(tokens, labels):
            classes_of.setdefault(t[pos], set()).add(label)
        if 2 <= len(classes_of) <= max(2, len(tokens) // 3) and all(len(c) >= 2 for c in classes_of.values()):
            candidates.append(pos)
    position = candidates[0] if len(candidates) == 1 else None
    subjects = [t[position] if position is not None else "" for t in tokens]
    rule = f"class = the token naming an emotion (e.g. {class_tokens[labels[0]]!r} in {stems[0]!r} -> {labels[0]})"
    if position is not None:
        rule += f"; subject = token {position} (e.g. {subjects[0]!r}), {len(set(subjects))} subjects"
    else:
        rule += f"; no subject token ({'candidates at positions ' + str(candidates) if candidates else 'none recurs'})"
    return {"labels": list(zip(labels, subjects)), "rule": rule, "subject_position": position,
            "subject_candidates": candidates, "class_examples": stems[:3], "tokens": class_tokens}

def read_annotations_csv(csv_path: str | Path, root: str | Path | None = None,
                         accept_unknown_classes: bool = False, verbose: bool = True) -> tuple[pd.DataFrame, dict]:
    """Index the images an annotation CSV lists: ``path,label`` and optional ``subject``,
    ``group`` (or ``sequence``) and ``split`` columns (the ``annotations.csv`` this pipeline
    writes reads back as it was).

    Args:
        csv_path: the CSV.
        root: folder the paths are relative to (e.g. an extracted archive); default: the CSV's
            folder. Absolute paths are used as they are.
        accept_unknown_classes: keep labels the alias table does not know, as they are.
        verbose: print the class mapping.

    Returns:
        ``(index, report)`` as from :func:`discover_dataset`.

    Raises:
        DatasetError: a missing column, file or label, duplicate rows or conflicting labels for
            one file, each naming the CSV rows (numbered as in a spreadsheet: header = row 1).
    """
    csv_path = Path(csv_path)
    root = Path(root) if root is not None else csv_path.parent
    try:
        df = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as e:
        raise DatasetError(f"{csv_path}: cannot parse ({e})") from e
    df.columns = [c.strip().lower() for c in df.columns]
    missing = [c for c in ("path", "label") if c not in df]
    if missing:
        raise DatasetError(f"{csv_path}: no {missing} column(s); found {list(df.columns)} (need path,label and "
                           "optionally subject, group or sequence, split)")
    if "group" not in df and "sequence" in df:
        df["group"] = df["sequence"]
    line = pd.Series(np.arange(len(df)) + 2, index=df.index)  # spreadsheet row numbers
    paths = [Path(p) if Path(p).is_absolute() else root / p for p in df["path"]]
    df["abs"] = [str(p) for p in paths]

    def rows_of(mask) -> list[int]:
        return line[mask].tolist()[:10]

    dup = df.duplicated(["abs", "label"], keep=False)
    if dup.any():
        raise DatasetError(f"{csv_path}: duplicate rows {rows_of(dup)} (the same file and label listed twice)")
    conflict = df.groupby("abs")["label"].transform("nunique") > 1
    if conflict.any():
        raise DatasetError(f"{csv_path}: rows {rows_of(conflict)} give one file different labels")
    gone = ~pd.Series([p.is_file() for p in paths], index=df.index)
    if gone.any():
        raise DatasetError(f"{csv_path}: rows {rows_of(gone)} name files that do not exist under {root}, "
                           f"e.g. {df.loc[gone, 'path'].tolist()[:3]}")
    canon = df["label"].map(lambda x: normalise_class(x) or (x if accept_unknown_classes else None))
    if canon.isna().any():
        bad = df.loc[canon.isna(), "label"]
        raise DatasetError(f"{csv_path}: rows {rows_of(canon.isna())} have unknown labels {sorted(set(bad))[:10]}; "
                           f"known names are {sorted(set(CLASS_ALIASES.values()))} and their aliases")
    rows, skipped = [], []
    for r, label, p in zip(df.itertuples(), canon, paths):
        _add_image(rows, skipped, p, root, label, _split_of((getattr(r, "split", ""),)), str(getattr(r, "subject", "")),
                   str(getattr(r, "group", "")))
    if not rows:
        raise DatasetError(f"{csv_path}: none of the {len(df)} listed files is a readable image")
    index = pd.DataFrame(rows)
    _flag_duplicates(index)
    mapping: dict[str, set] = {}
    for raw, label in zip(df["label"], canon):
        mapping.setdefault(label, set()).add(raw)
    report = _index_report(index, root, f"annotation CSV {csv_path.name}", mapping, skipped, empty_classes=[])
    if verbose:
        print_report(report)
    return index, report


def _flag_duplicates(index: pd.DataFrame) -> None:
    """Exact duplicates: every copy after the first (in index order) points at the first, in place."""
    first = index.groupby("sha1")["rel_path"].transform("first")
    index["duplicate_of"] = np.where(first != index["rel_path"], first, "")


def _sha1(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


def print_report(report: dict) -> None:
    """Print a discovery report: layout, class mapping with counts, problems."""
    print(f"Layout: {report['layout']} under {report['root']}")
    for label, raws in report["class_mapping"].items():
        print(f"  {label:<10} <- {', '.join(raws):<24} {report['counts'][label]:>6} images")
    print(f"  {report['num_images']} images, splits {report['splits']}, {report['num_subjects']} subjects")
    if report["duplicates"]:
        print(f"  {len(report['duplicates'])} exact duplicates flagged (kept on one side of every split):")
        for dup, orig in report["duplicates"][:10]:
            print(f"    {dup} == {orig}")
    for name in report["empty_classes"]:
        print(f"  WARNING: class folder '{name}' holds no images")
    for name, n in report.get("unreadable_classes", {}).items():
        print(f"  WARNING: class '{name}': {n} image files found, none could be read (listed below)")
    for path, why in report["skipped"][:20]:
        print(f"  skipped {path}: {why}")
    if len(report["skipped"]) > 20:
        print(f"  ... and {len(report['skipped']) - 20} more skipped")


def write_annotations(index: pd.DataFrame, out_dir: str | Path) -> list[Path]:
    """Write the index as annotation CSVs: ``annotations.csv`` (all rows, with a split
    column) and, per split present, the seed's ``<split>_annotations.csv``.

    Args:
        index: output of :func:`discover_dataset` (or of a FER+ reader).
        out_dir: destination folder.

    Returns:
        The files written.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    frames = [("annotations.csv", index)] + [
        (f"{s}_annotations.csv", index[index["split"] == s]) for s in ("train", "val", "test")
        if (index["split"] == s).any()]
    for name, frame in frames:
        written.append(atomic_write(out_dir / name, lambda tmp, frame=frame: frame.to_csv(tmp, index=False)))
    return written


# ----------------------------------------------------------------------------- FER+

FERPLUS_COLUMNS = ["neutral", "happiness", "surprise", "sadness", "anger", "disgust", "fear",
                   "contempt", "unknown", "NF"]
FERPLUS_CLASSES = FERPLUS_COLUMNS[:8]
VOTE_COLUMNS = [f"votes_{c}" for c in FERPLUS_COLUMNS]  # index columns; cached as "votes"


def find_ferplus_root(root: str | Path) -> Path | None:
    """The folder holding ``FER2013Train``/``FER2013Valid``/``FER2013Test``, if any."""
    root = Path(root)
    for label_csv in sorted(root.rglob("label.csv")):
        if label_csv.parent.name.lower().startswith("fer2013"):
            return label_csv.parent.parent
    return None


def read_ferplus(root: str | Path, verbose: bool = True) -> tuple[pd.DataFrame, dict]:
    """Index a rendered FERPlus tree: ``FER2013{Train,Valid,Test}/ferNNNNNNN.png`` + ``label.csv``.

    Every PNG listed in a ``label.csv`` becomes a row with its ten vote counts; the label is
    the majority vote over the eight emotions, and rows whose majority is unknown or
    not-a-face get an empty label (the standard protocol excludes them).

    Args:
        root: folder containing the ``FER2013*`` split folders (or any parent of it).
        verbose: print counts per split and class.

    Returns:
        ``(index, report)`` with columns path, rel_path, split, label, the ten vote columns
        (``votes_neutral`` .. ``votes_NF``),
        and sha1/duplicate_of as in :func:`discover_dataset`.
    """
    base = find_ferplus_root(root)
    if base is None:
        raise DatasetError(f"{root}: no FER2013Train/Valid/Test folder with a label.csv")
    frames, skipped = [], []
    for split_dir in sorted(base.iterdir()):
        split = SPLIT_ALIASES.get(split_dir.name.lower())
        label_csv = split_dir / "label.csv"
        if not split or not label_csv.exists():
            continue
        try:
            df = pd.read_csv(label_csv, header=None, names=["image", "box"] + VOTE_COLUMNS)
        except (pd.errors.ParserError, ValueError) as e:
            raise DatasetError(f"{label_csv}: cannot parse ({e})") from e
        if df[VOTE_COLUMNS].isna().any().any():
            raise DatasetError(f"{label_csv}: rows with missing vote counts")
        df["split"] = split
        df["path"] = [str(split_dir / name) for name in df["image"]]
        present = np.array([os.path.exists(p) for p in df["path"]])
        skipped += [(p, "listed in label.csv but missing") for p in df.loc[~present, "path"]]
        frames.append(df[present])
    index = pd.concat(frames, ignore_index=True)
    index["rel_path"] = [Path(p).relative_to(base).as_posix() for p in index["path"]]
    votes = index[VOTE_COLUMNS].to_numpy()
    # Majority over all ten columns; unknown/NF majorities are excluded (label "").
    top = votes.argmax(axis=1)
    index["label"] = [FERPLUS_COLUMNS[t] if t < 8 else "" for t in top]
    index["subject"] = ""
    index["group"] = ""
    index["sha1"] = [_sha1(Path(p)) for p in index["path"]]
    _flag_duplicates(index)
    counts = index[index["label"] != ""].groupby(["split", "label"]).size().unstack(fill_value=0)
    report = {
        "root": str(base), "layout": "FERPlus rendered folders + label.csv",
        "num_images": len(index), "splits": {s: int(n) for s, n in Counter(index["split"]).items()},
        "excluded_unknown_or_nf": int((index["label"] == "").sum()),
        "counts": {s: {c: int(v) for c, v in row.items()} for s, row in counts.iterrows()},
        "skipped": skipped,
    }
    if skipped:  # counted in the report and said, never dropped silently
        warnings.warn(f"FERPlus: {len(skipped)} images listed in label.csv are missing and were skipped "
                      f"(e.g. {[p for p, _ in skipped[:3]]}); see report['skipped']", stacklevel=2)
    if verbose:
        print(f"FERPlus under {base}: {report['splits']}; "
              f"{report['excluded_unknown_or_nf']} unknown/NF-majority images excluded")
        print(counts.reindex(columns=[c for c in FERPLUS_CLASSES if c in counts.columns]).to_string())
    return index, report


def index_dataset(root: str | Path, verbose: bool = True, label_pattern: str | None = None,
                  labels_csv: str | Path | None = None) -> tuple[pd.DataFrame, dict]:
    """Index a classification dataset of any accepted layout, FERPlus included.

    With ``labels_csv``, the images it lists (:func:`read_annotations_csv`, paths relative
    to ``root``); with ``label_pattern``, :func:`discover_dataset` with that pattern. A FERPlus
    tree (``FER2013{Train,Valid,Test}`` + ``label.csv``) is read with
    :func:`read_ferplus`: images whose majority vote is unknown or not-a-face are left out,
    the vote winners become the canonical class names (happiness -> happy, ...), and the
    archive's splits are kept (``protocol="given"`` uses them). Anything else goes through
    :func:`discover_dataset`.

    Returns:
        ``(index, report)`` as from :func:`discover_dataset`; the report also says
        ``pre_cropped``: True when the images are face crops already (FERPlus), so face
        detection has nothing to do.
    """
    if labels_csv is not None:
        index, report = read_annotations_csv(labels_csv, root, verbose=verbose)
        return index, {**report, "pre_cropped": False}
    if label_pattern is not None or find_ferplus_root(root) is None:
        index, report = discover_dataset(root, verbose=verbose, label_pattern=label_pattern)
        return index, {**report, "pre_cropped": False}
    index, fer = read_ferplus(root, verbose=verbose)
    index = index[index["label"] != ""].reset_index(drop=True)
    index["label"] = index["label"].map(normalise_class)
    counts = {c: int(n) for c, n in sorted(Counter(index["label"]).items())}
    report = {
        "root": fer["root"], "layout": fer["layout"], "num_images": len(index),
        "class_mapping": {normalise_class(c): [c] for c in FERPLUS_CLASSES if normalise_class(c) in counts},
        "counts": counts, "splits": {s: int(n) for s, n in Counter(index["split"]).items()},
        "num_subjects": 0, "excluded_unknown_or_nf": fer["excluded_unknown_or_nf"],
        "duplicates": [(r.rel_path, r.duplicate_of) for r in index.itertuples() if r.duplicate_of],
        "empty_classes": [], "skipped": fer["skipped"], "pre_cropped": True,
    }
    if verbose:
        print(f"FERPlus as a classification set: {len(index)} images with an emotion majority, "
              f"classes {report['class_mapping']}")
    return index, report


# FER2013's emotion codes (fer2013.csv) and their FER+ names.
FER2013_EMOTIONS = ["anger", "disgust", "fear", "happiness", "sadness", "surprise", "neutral"]
USAGE_TO_FOLDER = {"training": "FER2013Train", "publictest": "FER2013Valid", "privatetest": "FER2013Test"}


def _fer_name(value) -> str:
    """A FER2013 emotion code (0-6) or name (any alias) as its FER+ column name."""
    text = str(value).strip()
    if text.isdigit() and int(text) < len(FER2013_EMOTIONS):
        return FER2013_EMOTIONS[int(text)]
    canon = normalise_class(text)
    fer = {"angry": "anger", "happy": "happiness", "sad": "sadness"}.get(canon, canon)
    if fer not in FERPLUS_CLASSES:
        raise ValueError(f"unknown emotion {value!r}")
    return fer


def render_fer2013_csv(csv_path: str | Path, out_dir: str | Path, votes_csv: str | Path | None = None,
                       verbose: bool = True) -> Path:
    """Render FER2013-style CSVs into the FERPlus folder layout that :func:`read_ferplus` reads.

    Accepted inputs:
    (b) the original ``fer2013.csv`` (``emotion,pixels,Usage``) with ``votes_csv`` =
        ``fer2013new.csv`` (``Usage,Image name,<10 vote columns>``, row-aligned with
        fer2013.csv; rows with an empty image name are dropped, as FERPlus does);
    (c) a custom ``emotion,pixels,Usage`` or ``emotion,image,Usage`` CSV (``image``: a path
        relative to the CSV); without votes, each image gets all ten votes on its label,
        so soft labels equal the hard ones.
    Usage maps Training/PublicTest/PrivateTest to FER2013Train/Valid/Test. The tree is built
    in a temporary folder, renamed when complete, and reused while the CSVs are unchanged.

    Args:
        csv_path: fer2013.csv or a custom CSV.
        out_dir: where the rendered tree goes (``out_dir/<csv stem>``).
        votes_csv: fer2013new.csv for (b).
        verbose: print what was done.

    Returns:
        The rendered folder (pass it to :func:`read_ferplus`).
    """
    csv_path = Path(csv_path)
    sources = [csv_path] + ([Path(votes_csv)] if votes_csv else [])
    fingerprint = {str(p.name): [p.stat().st_size, p.stat().st_mtime_ns] for p in sources}
    target = Path(out_dir) / f"{csv_path.stem}-rendered"
    with output_lock(target, f"rendering {csv_path.name}"):
        marker = target / ".rendered.json"
        if marker.exists() and json.loads(marker.read_text()) == fingerprint:
            if verbose:
                print(f"Reusing rendered {target}")
            return target
        try:
            table = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
        except (pd.errors.ParserError, ValueError, UnicodeDecodeError) as e:
            raise DatasetError(f"{csv_path}: cannot parse as CSV ({e})") from e
        table.columns = [c.strip().lower() for c in table.columns]
        missing = {"emotion", "usage"} - set(table.columns)
        if missing or not ({"pixels", "image"} & set(table.columns)):
            raise DatasetError(f"{csv_path}: needs columns emotion, pixels (or image), Usage; found {list(table.columns)}")
        if votes_csv:
            votes = pd.read_csv(votes_csv, dtype=str, keep_default_na=False)
            if len(votes) != len(table):
                raise DatasetError(f"{votes_csv}: {len(votes)} rows but {csv_path.name} has {len(table)}; "
                                   "fer2013new.csv must be row-aligned with fer2013.csv")
            names = votes["Image name"].str.strip()
            vote_values = votes[FERPLUS_COLUMNS].astype(int).to_numpy()
        else:
            names = pd.Series([f"fer{i:07d}.png" for i in range(len(table))])
            vote_values = None
        tmp = target.with_name(target.name + f".partial-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        rows_by_folder: dict[str, list] = {f: [] for f in USAGE_TO_FOLDER.values()}
        try:
            for i, row in enumerate(table.itertuples(index=False)):
                name = names.iat[i]
                if not name:  # FERPlus dropped this row
                    continue
                folder = USAGE_TO_FOLDER.get(row.usage.strip().lower())
                if folder is None:
                    raise DatasetError(f"{csv_path}: row {i + 2}: unknown Usage {row.usage!r}")
                if "pixels" in table.columns and row.pixels.strip():
                    px = np.array(row.pixels.split(), dtype=np.uint8)
                    side = int(round(math.sqrt(px.size)))
                    if side * side != px.size:
                        raise DatasetError(f"{csv_path}: row {i + 2}: {px.size} pixels is not a square image")
                    image = px.reshape(side, side)
                else:
                    image = load_image(csv_path.parent / row.image, channels=1)
                if vote_values is not None:
                    v = vote_values[i]
                else:
                    try:
                        v = np.eye(10, dtype=int)[FERPLUS_COLUMNS.index(_fer_name(row.emotion))] * 10
                    except ValueError as e:
                        raise DatasetError(f"{csv_path}: row {i + 2}: {e}") from e
                (tmp / folder).mkdir(parents=True, exist_ok=True)
                Image.fromarray(image).save(tmp / folder / name)
                h, w = image.shape
                rows_by_folder[folder].append([name, f"(0, 0, {w}, {h})", *map(int, v)])
            for folder, rows in rows_by_folder.items():
                if rows:
                    pd.DataFrame(rows).to_csv(tmp / folder / "label.csv", header=False, index=False)
            (tmp / ".rendered.json").write_text(json.dumps(fingerprint))
            if target.exists():
                shutil.rmtree(target)
            tmp.rename(target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if verbose:
            print(f"Rendered {csv_path.name} -> {target}: " +
                  ", ".join(f"{f} {len(r)}" for f, r in rows_by_folder.items()))
        return target


def _is_fer2013_csv(path: Path) -> bool:
    """A CSV whose header has a ``pixels`` or ``image`` column of rendered faces (FER2013 forms (b), (c))."""
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        header = [c.strip().lower() for c in f.readline().split(",")]
    return "emotion" in header and ("pixels" in header or "image" in header)


def read_labelled_faces(source: str | Path, out_dir: str | Path, label_pattern: str | None = None,
                        labels_csv: str | Path | None = None, verbose: bool = True) -> tuple[pd.DataFrame, dict]:
    """FERPlus in any of its forms, with its votes, or any other labelled dataset the data layer reads.

    FERPlus (the rendered tree, ``fer2013.csv`` + ``fer2013new.csv``, or a custom FER2013-style
    CSV; see :func:`prepare_ferplus`) keeps FER+'s eight classes in FER+'s order, its
    splits and the vote columns (soft labels), and leaves out unknown / not-a-face majorities.
    Anything else (class folders, known file-name schemes, ``label_pattern``, an annotation CSV
    as ``source`` or ``labels_csv``) goes through :func:`index_dataset`: canonical class
    names, the archive's splits if any, subject ids where they can be had, no votes.

    Returns:
        ``(index, report)``; ``report["ferplus"]`` says which, ``report["pre_cropped"]``
        whether the images are face crops already.
    """
    source = Path(source)
    generic = label_pattern is not None or labels_csv is not None
    if source.suffix.lower() == ".csv" and not generic and not _is_fer2013_csv(source):
        source, labels_csv, generic = source.parent, source, True  # an annotation CSV: paths relative to it
    root = source if source.suffix.lower() == ".csv" else extract_archive(source, out_dir, verbose=verbose)
    if not generic and (root.is_file() or find_ferplus_root(root) is not None
                        or any(map(_is_fer2013_csv, root.rglob("*.csv")))):
        index, report = read_ferplus(prepare_ferplus(source, out_dir, verbose=verbose), verbose=verbose)
        return (index[index["label"] != ""].reset_index(drop=True),
                {**report, "ferplus": True, "pre_cropped": True, "num_subjects": 0})
    index, report = index_dataset(root, verbose=verbose, label_pattern=label_pattern, labels_csv=labels_csv)
    return index, {**report, "ferplus": False}


def prepare_ferplus(source: str | Path, out_dir: str | Path, verbose: bool = True) -> Path:
    """Any FERPlus form -> a folder :func:`read_ferplus` reads.

    ``source`` may be an archive or folder with the rendered layout (a), or holding
    ``fer2013.csv`` + ``fer2013new.csv`` (b) or a custom CSV (c), or such a CSV itself.

    Args:
        source: archive, folder or CSV.
        out_dir: where archives are extracted and CSVs rendered.
        verbose: print what was done.
    """
    source = Path(source)
    root = source if source.suffix.lower() == ".csv" else extract_archive(source, out_dir, verbose=verbose)
    if root.is_dir() and find_ferplus_root(root) is not None:
        return root
    csvs = [root] if root.is_file() else sorted(p for p in root.rglob("*.csv") if p.name != "fer2013new.csv")
    if not csvs:
        raise DatasetError(f"{source}: no FER2013Train/Valid/Test folders and no fer2013-style CSV")
    csv_path = next((p for p in csvs if p.name == "fer2013.csv"), csvs[0])
    votes = csv_path.with_name("fer2013new.csv")
    return render_fer2013_csv(csv_path, out_dir, votes if votes.exists() else None, verbose=verbose)

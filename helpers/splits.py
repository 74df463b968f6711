"""Evaluation protocols: which cached images train, select the model and test, per fold.

- ``given``: the archive's own splits (its val folder becomes the test set when there is no
  test folder), else a stratified random split.
- ``kfold``: image-level stratified k-fold (the DFER-GCViT paper's protocol).
- ``subject``: subject-independent grouped k-fold: no subject, and no byte-identical image,
  on both sides (subjects linked by a shared image move together).

In ``kfold`` and ``subject`` exact duplicates move together; under ``given`` the archive's
splits are kept, and images present in several of them are counted and, by the
``cross_split_duplicates`` policy, reported, refused or dropped from the evaluation side.
The validation split used for model selection is carved from the training side, never from
the test fold.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from sklearn.model_selection import StratifiedGroupKFold

PROTOCOLS = ("given", "kfold", "subject")
DUPLICATE_POLICIES = ("warn", "error", "drop")


def _linked_groups(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Group ids of the connected components of images linked by an equal ``a`` or an equal ``b``
    (e.g. subject and content hash: a duplicate filed under two subjects joins them)."""
    ia = pd.factorize(a)[0]
    ib = pd.factorize(b)[0] + ia.max() + 1
    n = int(ib.max()) + 1
    graph = coo_matrix((np.ones(len(ia)), (ia, ib)), shape=(n, n))
    # numbered by first appearance: without any link, the same ids (hence folds) as the subjects alone
    return pd.factorize(connected_components(graph, directed=False)[1][ia])[0]


def _given_split_duplicates(meta: pd.DataFrame, folds: dict, policy: str) -> dict:
    """Find images of the evaluation side (val, test) that are byte-identical to a training image."""
    if policy not in DUPLICATE_POLICIES:
        raise ValueError(f"cross_split_duplicates must be one of {DUPLICATE_POLICIES}, not {policy!r}")
    sha = meta["sha1"].to_numpy()
    train_sha = set(sha[folds["train"]])
    found = {k: folds[k][np.isin(sha[folds[k]], list(train_sha))] for k in ("val", "test")}
    count = sum(len(v) for v in found.values())
    if count:
        paths = list(meta["rel_path"].to_numpy()[np.concatenate(list(found.values()))][:5]) if "rel_path" in meta else []
        msg = (f"{count} images of the given val/test splits are byte-identical to training images "
               f"(e.g. {paths}); their scores measure memory, not generalisation")
        if policy == "error":
            raise ValueError(msg + " (cross_split_duplicates='drop' removes them from val/test)")
        if policy == "drop":
            for k in ("val", "test"):
                folds[k] = np.setdiff1d(folds[k], found[k])
            msg += ": dropped from val/test"
        warnings.warn(msg, stacklevel=3)
    folds["cross_split_duplicates"] = {k: int(len(v)) for k, v in found.items()}
    return folds


def _duplicate_groups(meta: pd.DataFrame) -> np.ndarray:
    """One id per cluster of byte-identical images (so duplicates never straddle a split)."""
    return pd.factorize(meta["sha1"])[0]


def _carve_val(meta: pd.DataFrame, train: np.ndarray, val_fraction: float, groups: np.ndarray, seed: int):
    """Split ``train`` into (train, val), stratified by class, with whole groups on one side."""
    g = groups[train]
    n_splits = max(2, min(int(round(1 / val_fraction)), len(np.unique(g))))
    folds = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    tr, va = next(folds.split(train, meta["label"].to_numpy()[train], g))
    return np.sort(train[tr]), np.sort(train[va])


def make_folds(meta: pd.DataFrame, protocol: str, num_folds: int = 10, val_fraction: float = 0.1,
               test_fraction: float = 0.2, seed: int = 42, cross_split_duplicates: str = "warn") -> list[dict]:
    """Index arrays (into the cache) for every fold of a protocol.

    Args:
        meta: from :func:`read_cache_meta` (label, split, subject, sha1).
        protocol: ``"given"``, ``"kfold"`` or ``"subject"``.
        num_folds: folds for kfold/subject (subject: at most the number of subjects).
        val_fraction: share of the training side (images, or subjects under ``subject``)
            held out for model selection.
        test_fraction: test share of the random split when ``given`` finds no splits.
        seed: shuffling seed.
        cross_split_duplicates: under ``given`` with the archive's splits, what to do with val/test
            images byte-identical to a training image: ``"warn"`` (count them in the fold's
            ``cross_split_duplicates`` and warn), ``"error"`` or ``"drop"`` (from val/test).

    Returns:
        One dict per fold with ``train``, ``val`` and ``test`` index arrays.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, not {protocol!r}")
    idx = np.arange(len(meta))
    y = meta["label"].to_numpy()
    dup = _duplicate_groups(meta)
    if protocol == "given":
        split = meta["split"].to_numpy()
        if (split == "train").any() and ((split == "val") | (split == "test")).any():
            test = idx[split == "test"] if (split == "test").any() else idx[split == "val"]
            train = idx[split == "train"]
            given_val = idx[split == "val"] if (split == "test").any() else None
            if given_val is not None:
                return [_given_split_duplicates(meta, {"train": train, "val": given_val, "test": test},
                                                cross_split_duplicates)]
        else:
            folds = StratifiedGroupKFold(n_splits=max(2, int(round(1 / test_fraction))), shuffle=True,
                                         random_state=seed)
            train, test = next(folds.split(idx, y, dup))
        train, val = _carve_val(meta, train, val_fraction, dup, seed)
        return [{"train": train, "val": val, "test": np.sort(test)}]
    if protocol == "kfold":
        groups = dup
    else:
        if (meta["subject"] == "").any():
            missing = int((meta["subject"] == "").sum())
            raise ValueError(f"protocol 'subject' needs a subject id for every image; {missing} of {len(meta)} have "
                             "none. Give them with label_pattern (a (?P<subject>...) group), an annotation CSV's "
                             "subject column (labels_csv), or a known naming scheme; or use 'kfold' or 'given'")
        groups = _linked_groups(meta["subject"].to_numpy(), meta["sha1"].to_numpy())
        num_folds = min(num_folds, len(np.unique(groups)))
    out = []
    for train, test in StratifiedGroupKFold(n_splits=num_folds, shuffle=True, random_state=seed).split(idx, y, groups):
        train, val = _carve_val(meta, train, val_fraction, groups, seed)
        out.append({"train": train, "val": val, "test": np.sort(test)})
    return out

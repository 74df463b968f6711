"""Evaluation protocols: which cached images train, select the model and test, per fold.

- ``given``: the archive's own splits (its val folder becomes the test set when there is no
  test folder), else a stratified random split.
- ``kfold``: image-level stratified k-fold (the DFER-GCViT paper's protocol).
- ``subject``: subject-independent grouped k-fold: no subject on both sides.

In every protocol exact duplicates move together, and the validation split used for model
selection is carved from the training side, never from the test fold.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

PROTOCOLS = ("given", "kfold", "subject")


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
               test_fraction: float = 0.2, seed: int = 42) -> list[dict]:
    """Index arrays (into the cache) for every fold of a protocol.

    Args:
        meta: from :func:`read_cache_meta` (label, split, subject, sha1).
        protocol: ``"given"``, ``"kfold"`` or ``"subject"``.
        num_folds: folds for kfold/subject (subject: at most the number of subjects).
        val_fraction: share of the training side (images, or subjects under ``subject``)
            held out for model selection.
        test_fraction: test share of the random split when ``given`` finds no splits.
        seed: shuffling seed.

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
                return [{"train": train, "val": given_val, "test": test}]
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
            raise ValueError("protocol 'subject' needs a subject id for every image; this dataset's file names "
                             "carry none (use 'kfold' or 'given')")
        groups = pd.factorize(meta["subject"])[0]
        num_folds = min(num_folds, len(np.unique(groups)))
    out = []
    for train, test in StratifiedGroupKFold(n_splits=num_folds, shuffle=True, random_state=seed).split(idx, y, groups):
        train, val = _carve_val(meta, train, val_fraction, groups, seed)
        out.append({"train": train, "val": val, "test": np.sort(test)})
    return out

"""Metrics on scikit-learn: accuracy, precision/recall/F1, confusion matrix, calibration."""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.metrics import accuracy_score, classification_report, confusion_matrix, precision_recall_fscore_support

from .data import FERPLUS_CLASSES, FERPLUS_COLUMNS


def compute_metrics(y_true: np.ndarray, y_pred: np.ndarray, class_names: list[str],
                    probs: np.ndarray | None = None) -> dict:
    """Classification metrics as plain Python numbers (JSON-ready).

    Args:
        y_true: true class indices, shape (N,).
        y_pred: predicted class indices, shape (N,).
        class_names: names for indices 0..C-1 (classes absent from the data still get a
            row and column in the confusion matrix).
        probs: optional (N, C) probabilities; adds ``ece`` and ``nll``.

    Returns:
        accuracy, macro/weighted precision, recall and F1, per-class report, confusion
        matrix (rows = true, columns = predicted), the number of samples, the number of
        distinct classes predicted and ``never_predicted`` (:func:`never_predicted`). Warns
        when a model predicts a single class for data that holds several (a collapsed model:
        its accuracy is that class's share, nothing more).
    """
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    labels = list(range(len(class_names)))
    out = {"num_samples": int(len(y_true)), "accuracy": float(accuracy_score(y_true, y_pred))}
    for avg in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, labels=labels, average=avg, zero_division=0)
        out.update({f"precision_{avg}": float(p), f"recall_{avg}": float(r), f"f1_{avg}": float(f)})
    report = classification_report(y_true, y_pred, labels=labels, target_names=list(class_names),
                                   output_dict=True, zero_division=0)
    out["per_class"] = {c: {k: float(v) for k, v in report[c].items()} for c in class_names}
    out["confusion_matrix"] = confusion_matrix(y_true, y_pred, labels=labels).tolist()
    out["predicted_classes"] = int(np.unique(y_pred).size)
    out["never_predicted"] = never_predicted(out["confusion_matrix"], class_names)
    if out["predicted_classes"] == 1 and np.unique(y_true).size > 1:
        warnings.warn(f"the model predicts {class_names[int(y_pred[0])]!r} for all {len(y_pred)} samples: it has "
                      f"collapsed to one class, so its accuracy ({out['accuracy']:.4f}) is that class's share. "
                      "Train longer or with a lower learning rate.", stacklevel=2)
    if probs is not None:
        probs = np.asarray(probs, dtype=np.float64)
        out["ece"] = expected_calibration_error(probs, y_true)
        out["nll"] = float(-np.mean(np.log(np.clip(probs[np.arange(len(y_true)), y_true], 1e-12, None))))
    return out


def never_predicted(confusion: list | np.ndarray, class_names: list[str]) -> list[str]:
    """The classes the data holds that a model never predicts (rows = true, columns = predicted): each one's
    recall and F1 are 0, whatever threshold it sits under."""
    cm = np.asarray(confusion)
    return [name for name, held, chosen in zip(class_names, cm.sum(1), cm.sum(0)) if held and not chosen]


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> float:
    """Macro F1 over classes ``0..num_classes-1``, as :func:`compute_metrics` reports it (``f1_macro``): a class
    absent from both ``y_true`` and ``y_pred`` counts 0, so a model that never predicts a class pays for it."""
    if not len(y_true):
        return float("nan")
    return float(precision_recall_fscore_support(y_true, y_pred, labels=list(range(num_classes)), average="macro",
                                                 zero_division=0)[2])


def fold_summary(values) -> dict:
    """Mean, standard deviation and 95% confidence interval of one figure over folds.

    The interval is Student's t over the folds (``mean +- t_{0.975, n-1} * s / sqrt(n)``,
    ``s`` the sample standard deviation): with 4-10 folds it is wide, as it should be. ``std``
    is the population standard deviation (numpy's default, as the tables report it). One
    fold gives no interval (``None``).
    """
    from scipy import stats

    v = np.asarray(values, dtype=float)
    out = {"mean": float(v.mean()), "std": float(v.std()), "n": int(v.size), "ci95": None}
    if v.size > 1:
        half = float(stats.t.ppf(0.975, v.size - 1) * v.std(ddof=1) / np.sqrt(v.size))
        out["ci95"] = [out["mean"] - half, out["mean"] + half]
    return out


def sequence_metrics(probs: np.ndarray, y_true: np.ndarray, groups: np.ndarray) -> dict | None:
    """Accuracy of one decision per sequence (driver monitoring decides over a few frames).

    Two votes over the frames of each group (e.g. KMU-FED's subject + expression sequence):
    the majority of the frame predictions (ties go to the class with the larger summed
    probability) and the argmax of the mean probability. A sequence's true class is its
    frames' (they agree in these datasets; the majority is taken otherwise).

    Args:
        probs: (N, C) frame probabilities.
        y_true: (N,) true classes.
        groups: (N,) sequence ids; frames with an empty id are left out.

    Returns:
        ``{"num_sequences", "frames_per_sequence", "accuracy_majority_vote",
        "accuracy_mean_probability"}``, or None when no frame has a sequence id.
    """
    probs, y_true, groups = np.asarray(probs, np.float64), np.asarray(y_true), np.asarray(groups).astype(str)
    keep = groups != ""
    if not keep.any():
        return None
    probs, y_true, groups = probs[keep], y_true[keep], groups[keep]
    ids, inverse = np.unique(groups, return_inverse=True)
    c = probs.shape[1]
    votes = np.zeros((len(ids), c))
    np.add.at(votes, (inverse, probs.argmax(1)), 1.0)
    summed = np.zeros((len(ids), c))
    np.add.at(summed, inverse, probs)
    truth = np.zeros((len(ids), c))
    np.add.at(truth, (inverse, y_true), 1.0)
    # most votes; among tied classes the larger summed probability (lexsort: last key is primary)
    majority = np.array([np.lexsort((summed[i], votes[i]))[-1] for i in range(len(ids))])
    y_seq = truth.argmax(1)
    return {"num_sequences": int(len(ids)), "frames_per_sequence": float(len(groups) / len(ids)),
            "accuracy_majority_vote": float((majority == y_seq).mean()),
            "accuracy_mean_probability": float((summed.argmax(1) == y_seq).mean())}


def expected_calibration_error(probs: np.ndarray, y_true: np.ndarray, num_bins: int = 15) -> float:
    """Expected calibration error of the top-1 prediction (equal-width confidence bins).

    Args:
        probs: (N, C) probabilities.
        y_true: (N,) true class indices.
        num_bins: number of bins over [0, 1].

    Returns:
        sum over bins of (bin share) * |accuracy - mean confidence|, in [0, 1].
    """
    probs, y_true = np.asarray(probs, dtype=np.float64), np.asarray(y_true)
    conf, pred = probs.max(axis=1), probs.argmax(axis=1)
    correct = (pred == y_true).astype(np.float64)
    # Bin i holds confidences in (i/B, (i+1)/B]; a confidence of exactly 0 goes to bin 0.
    bins = np.clip(np.ceil(conf * num_bins).astype(int) - 1, 0, num_bins - 1)
    ece = 0.0
    for b in range(num_bins):
        m = bins == b
        if m.any():
            ece += m.mean() * abs(correct[m].mean() - conf[m].mean())
    return float(ece)


def fit_temperature(log_probs: np.ndarray, y_true: np.ndarray, max_iter: int = 200) -> float:
    """Temperature scaling: the T > 0 minimising the NLL of ``softmax(log_probs / T)``.

    Fitted on a validation split (Guo et al., 2017); it changes confidence, never the
    argmax. ``log_probs`` may be logits or log-probabilities.

    Args:
        log_probs: (N, C) logits or log-probabilities.
        y_true: (N,) class indices.
        max_iter: LBFGS iterations.

    Returns:
        The temperature.
    """
    import torch

    z = torch.as_tensor(np.asarray(log_probs), dtype=torch.float64)
    y = torch.as_tensor(np.asarray(y_true), dtype=torch.long)
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)  # T = exp(log_t) stays positive
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(z / log_t.exp(), y)
        loss.backward()
        return loss

    opt.step(closure)
    return float(log_t.detach().exp())


def class_log_prior(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Log class frequencies of training labels, add-one smoothed: ``log((n_c + 1) / (N + C))``
    (a class absent from training gets a finite prior instead of ``-inf``)."""
    counts = np.bincount(np.asarray(labels, dtype=int), minlength=num_classes).astype(np.float64)
    return np.log((counts + 1) / (counts.sum() + num_classes))


def adjust_logits(log_probs: np.ndarray, log_prior: np.ndarray, tau: float) -> np.ndarray:
    """Post-hoc logit adjustment (Menon et al., 2021): ``log_softmax(log_probs - tau * log_prior)``.

    Subtracting the scaled log prior moves decisions towards rare classes; ``tau = 1`` is the
    Bayes-optimal rule for balanced error when ``log_probs`` estimate ``log p(y | x)`` under
    the training prior, ``tau = 0`` changes nothing. Returns log-probabilities.
    """
    from scipy.special import log_softmax

    return log_softmax(np.asarray(log_probs, dtype=np.float64) - tau * np.asarray(log_prior, dtype=np.float64), axis=1)


def fit_logit_adjustment(log_probs: np.ndarray, y_true: np.ndarray, log_prior: np.ndarray,
                         taus=tuple(np.round(np.arange(0, 2.001, 0.05), 2))) -> dict:
    """Choose the logit-adjustment strength on a validation split: the ``tau`` of ``taus`` with
    the highest macro F1 (ties: the smallest ``tau``, the least change).

    Args:
        log_probs: (N, C) validation logits or log-probabilities.
        y_true: (N,) validation classes.
        log_prior: (C,) log class prior of the training labels (:func:`class_log_prior`).
        taus: candidate strengths.

    Returns:
        ``{"tau", "val_f1_macro", "val_accuracy", "grid": [{"tau", "f1_macro", "accuracy"}, ...]}``.
    """
    y_true = np.asarray(y_true)
    grid = []
    for tau in taus:
        pred = adjust_logits(log_probs, log_prior, float(tau)).argmax(1)
        f1 = macro_f1(y_true, pred, np.asarray(log_probs).shape[1])
        grid.append({"tau": float(tau), "f1_macro": f1, "accuracy": float((pred == y_true).mean())})
    best = max(grid, key=lambda g: (g["f1_macro"], -g["tau"]))
    return {"tau": best["tau"], "val_f1_macro": best["f1_macro"], "val_accuracy": best["accuracy"], "grid": grid}


FERPLUS_PAPER_RULE = ("the FERPlus paper's 'majority' protocol (Barsoum et al. 2016, microsoft/FERPlus src/ferplus.py): "
                      "single votes dropped as outliers, then the top emotion must hold more than half of the votes "
                      "left, unknown and not-a-face included")


def ferplus_paper_subset(votes: np.ndarray) -> np.ndarray:
    """Which images the FERPlus paper's test protocol keeps (:data:`FERPLUS_PAPER_RULE`).

    ``votes``: ``(N, 10)`` counts in FER+'s column order (eight emotions, unknown, not-a-face). The pipeline's
    own protocol keeps every image whose plurality is an emotion (FER2013Test: 3,545 of 3,573); this one keeps
    the clear majorities only (3,137), so its accuracy is the one to set beside the paper's (VGG13: 84.99%).
    On the kept images the label is the pipeline's (a strict majority is the plurality).
    """
    votes = np.asarray(votes, dtype=np.float64)
    if votes.ndim != 2 or votes.shape[1] != len(FERPLUS_COLUMNS):
        raise ValueError(f"FER+ votes are (N, {len(FERPLUS_COLUMNS)}) counts (eight emotions, unknown, not-a-face), "
                         f"not {votes.shape}")
    kept = np.where(votes > 1, votes, 0.0)  # a single vote is an outlier
    return (kept.max(1) > 0.5 * kept.sum(1)) & (kept.argmax(1) < len(FERPLUS_CLASSES))


def ferplus_paper_accuracy(votes: np.ndarray, y_pred: np.ndarray, y_true: np.ndarray) -> dict:
    """Accuracy on the images :func:`ferplus_paper_subset` keeps: ``{"accuracy", "images", "of", "rule"}``.

    ``y_pred``, ``y_true``: class indices in FER+'s column order (``H.FERPLUS_CLASSES``, the GReFEL notebook's
    class names on FER+), one per vote row.

    Raises:
        ValueError: a kept image whose label is not its votes' majority (votes and labels of other rows).
    """
    keep = ferplus_paper_subset(votes)
    y_pred, y_true = np.asarray(y_pred), np.asarray(y_true)
    if len(y_pred) != len(votes) or len(y_true) != len(votes):
        raise ValueError(f"{len(votes)} vote rows for {len(y_true)} labels and {len(y_pred)} predictions")
    if (np.asarray(votes)[keep].argmax(1) != y_true[keep]).any():
        raise ValueError("labels that are not their votes' majority: the votes belong to other images")
    return {"accuracy": float((y_pred[keep] == y_true[keep]).mean()) if keep.any() else None,
            "images": int(keep.sum()), "of": int(len(keep)), "rule": FERPLUS_PAPER_RULE}

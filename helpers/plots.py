"""Plots: class distribution, sample grid, confusion matrix, training curves.

Every function draws a matplotlib figure, saves it when ``save_path`` is given and returns
it, so notebooks show it inline and scripts just write the PNG.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from .setup import atomic_write


def _save(fig, save_path: str | Path | None):
    if save_path is not None:  # atomically: two runs drawing the same plot never leave a broken PNG
        atomic_write(save_path, lambda tmp: fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png"))
    return fig


def plot_class_distribution(counts: dict, title: str = "Class distribution",
                            save_path: str | Path | None = None):
    """Bar chart of images per class; ``counts`` is ``{class: n}`` or ``{split: {class: n}}``.

    Args:
        counts: per-class counts, optionally nested by split (stacked bars).
        title: figure title.
        save_path: PNG to write.
    """
    nested = counts and isinstance(next(iter(counts.values())), dict)
    groups = counts if nested else {"all": counts}
    classes = sorted({c for g in groups.values() for c in g})
    fig, ax = plt.subplots(figsize=(max(5, 0.9 * len(classes)), 3.5))
    bottom = np.zeros(len(classes))
    for name, g in groups.items():
        values = np.array([g.get(c, 0) for c in classes])
        bars = ax.bar(classes, values, bottom=bottom, label=name)
        bottom += values
    ax.bar_label(bars, labels=[str(int(v)) for v in bottom])
    ax.set_ylabel("images")
    ax.set_title(title)
    if nested:
        ax.legend()
    fig.tight_layout()
    return _save(fig, save_path)


def plot_sample_grid(images: list[np.ndarray], labels: list[str], per_class: int = 6,
                     save_path: str | Path | None = None):
    """A grid with up to ``per_class`` images in each class row.

    Args:
        images: uint8 H x W (x C) images.
        labels: class name of each image.
        per_class: columns.
        save_path: PNG to write.
    """
    classes = sorted(set(labels))
    fig, axes = plt.subplots(len(classes), per_class, figsize=(1.4 * per_class, 1.5 * len(classes)), squeeze=False)
    for row, c in enumerate(classes):
        picks = [im for im, lab in zip(images, labels) if lab == c][:per_class]
        for col in range(per_class):
            ax = axes[row, col]
            ax.axis("off")
            if col < len(picks):
                im = picks[col]
                ax.imshow(im.squeeze(), cmap="gray" if im.ndim == 2 or im.shape[-1] == 1 else None, vmin=0, vmax=255)
        axes[row, 0].set_title(c, fontsize=9, loc="left")
    fig.tight_layout()
    return _save(fig, save_path)


def plot_confusion_matrix(cm: np.ndarray | list, class_names: list[str], title: str = "Confusion matrix",
                          save_path: str | Path | None = None):
    """Counts and row-normalised (recall) confusion matrices side by side.

    Args:
        cm: C x C counts, rows = true class.
        class_names: axis labels.
        title: figure title.
        save_path: PNG to write.
    """
    cm = np.asarray(cm)
    norm = cm / np.clip(cm.sum(axis=1, keepdims=True), 1, None)
    fig, axes = plt.subplots(1, 2, figsize=(2 * (2 + 0.7 * len(class_names)), 1.5 + 0.6 * len(class_names)))
    for ax, m, fmt, sub in ((axes[0], cm, "d", "counts"), (axes[1], norm, ".2f", "row-normalised")):
        ax.imshow(m, cmap="Blues", vmin=0)
        for i in range(m.shape[0]):
            for j in range(m.shape[1]):
                ax.text(j, i, format(m[i, j], fmt), ha="center", va="center", fontsize=8,
                        color="white" if m[i, j] > m.max() / 2 else "black")
        ax.set_xticks(range(len(class_names)), class_names, rotation=45, ha="right")
        ax.set_yticks(range(len(class_names)), class_names)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"{title} ({sub})")
    fig.tight_layout()
    return _save(fig, save_path)


def plot_training_curves(history: list[dict], save_path: str | Path | None = None):
    """Loss and accuracy per epoch from a training history.

    Args:
        history: one dict per epoch with ``epoch`` and any of train_loss, val_loss,
            train_acc, val_acc.
        save_path: PNG to write.
    """
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    epochs = [h["epoch"] for h in history]
    for ax, metric in zip(axes, ("loss", "acc")):
        for split in ("train", "val"):
            key = f"{split}_{metric}"
            if any(key in h for h in history):
                ax.plot(epochs, [h.get(key, np.nan) for h in history], marker="o", ms=3, label=split)
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, save_path)


def plot_metric_summary(per_fold: list[dict], keys: tuple[str, ...] = ("accuracy", "precision_macro", "recall_macro",
                                                                      "f1_macro"),
                        title: str = "Test metrics per fold", save_path: str | Path | None = None):
    """Bars of each metric per fold with the mean +- std across folds.

    Args:
        per_fold: one metrics dict (from :func:`compute_metrics`) per fold.
        keys: metrics to show.
        title: figure title.
        save_path: PNG to write.
    """
    values = np.array([[m[k] for k in keys] for m in per_fold])  # folds x metrics
    fig, ax = plt.subplots(figsize=(2 + 1.6 * len(keys), 3.5))
    width = 0.8 / max(1, len(per_fold))
    for i, row in enumerate(values):
        ax.bar(np.arange(len(keys)) + (i - (len(per_fold) - 1) / 2) * width, row, width, alpha=0.5,
               label=f"fold {i + 1}" if len(per_fold) <= 10 else None)
    ax.errorbar(np.arange(len(keys)), values.mean(0), yerr=values.std(0), fmt="ko", capsize=4, label="mean +- std")
    for j, (m, s) in enumerate(zip(values.mean(0), values.std(0))):
        ax.annotate(f"{m:.3f}", (j, min(1.0, m + s)), textcoords="offset points", xytext=(0, 6), ha="center")
    ax.set_xticks(range(len(keys)), keys)
    ax.set_ylim(0, 1.1)
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return _save(fig, save_path)


def plot_reliability_diagram(probs_by_name: dict[str, np.ndarray], y_true: np.ndarray, num_bins: int = 15,
                             save_path: str | Path | None = None):
    """Accuracy against confidence per bin, one line per set of probabilities (e.g. before/after scaling).

    Args:
        probs_by_name: ``{label: (N, C) probabilities}``.
        y_true: (N,) class indices.
        num_bins: equal-width confidence bins.
        save_path: PNG to write.
    """
    from .metrics import expected_calibration_error

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    edges = np.linspace(0, 1, num_bins + 1)
    for name, probs in probs_by_name.items():
        conf, correct = probs.max(1), probs.argmax(1) == y_true
        bins = np.clip(np.ceil(conf * num_bins).astype(int) - 1, 0, num_bins - 1)
        xs = [conf[bins == b].mean() for b in range(num_bins) if (bins == b).any()]
        ys = [correct[bins == b].mean() for b in range(num_bins) if (bins == b).any()]
        ece = expected_calibration_error(probs, y_true, num_bins)
        ax.plot(xs, ys, marker="o", ms=4, label=f"{name} (ECE {ece:.3f})")
    ax.set_xticks(edges[::3])
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title("Reliability diagram")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, save_path)


def plot_confidence_histograms(confidence: np.ndarray, correct: np.ndarray, title: str = "Confidence",
                               save_path: str | Path | None = None):
    """Histograms of confidence for correct and wrong predictions.

    Args:
        confidence: (N,) confidences in [0, 1].
        correct: (N,) booleans.
        title: figure title.
        save_path: PNG to write.
    """
    fig, ax = plt.subplots(figsize=(5, 3.5))
    bins = np.linspace(0, 1, 21)
    ax.hist(confidence[correct], bins, alpha=0.6, label=f"correct ({int(correct.sum())})", density=True)
    ax.hist(confidence[~correct], bins, alpha=0.6, label=f"wrong ({int((~correct).sum())})", density=True)
    ax.set_xlabel("confidence")
    ax.set_ylabel("density")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    return _save(fig, save_path)

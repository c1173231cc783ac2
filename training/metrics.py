"""Classification metrics from labels and predictions, and the confusion-matrix figure."""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support


def classification_report(targets: np.ndarray, predictions: np.ndarray, labels: list[str]) -> dict[str, Any]:
    """Accuracy, per-class and macro precision/recall/F1 (0 where undefined), and the confusion matrix."""
    classes = list(range(len(labels)))
    matrix = confusion_matrix(targets, predictions, labels=classes)
    precision, recall, f1, _ = precision_recall_fscore_support(
        targets, predictions, labels=classes, average=None, zero_division=0
    )
    report: dict[str, Any] = {
        "accuracy": float(np.trace(matrix) / max(matrix.sum(), 1)),
        "precision": float(precision.mean()),
        "recall": float(recall.mean()),
        "f1": float(f1.mean()),
        "count": int(matrix.sum()),
        "confusion_matrix": matrix.tolist(),
        "labels": list(labels),
    }
    for index, label in enumerate(labels):
        report[f"precision_{label}"] = float(precision[index])
        report[f"recall_{label}"] = float(recall[index])
        report[f"f1_{label}"] = float(f1[index])
    return report


def plot_confusion_matrix(matrix: np.ndarray, labels: list[str], title: str) -> Any:
    """A matplotlib figure of the confusion matrix with counts in each cell."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(4, 4))
    axes.imshow(matrix, cmap="Blues")
    axes.set_xticks(range(len(labels)), labels)
    axes.set_yticks(range(len(labels)), labels)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    axes.set_title(title)
    for (row, column), value in np.ndenumerate(matrix):
        colour = "white" if value > matrix.max() / 2 else "black"
        axes.text(column, row, str(value), ha="center", va="center", color=colour)
    figure.tight_layout()
    return figure

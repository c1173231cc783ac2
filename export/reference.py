"""Reference distributions for drift monitoring, computed at export on the validation split, carried in the model.

For every signal the served model gives without labels (its confidence, its predicted label and, when the model has
one, its pet score) a histogram on held-out photos; `server.drift` compares the live window against it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from export.evaluate import load_split, make_session, outputs
from training.presets import PreprocessSpec

# Dense near 1: a good model's confidence is mostly above 0.99, and a drop shows first in the top bins.
CONFIDENCE_EDGES = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 0.999, 1.0)
PET_SCORE_EDGES = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)

# signal name -> (the model output it reads, one value per image from that output, bin edges). A signal whose
# output the model lacks is left out. server.drift.SIGNALS computes the same values from a served prediction.
SIGNALS: dict[str, tuple[str, Callable[[np.ndarray], np.ndarray], tuple[float, ...]]] = {
    "confidence": ("probabilities", lambda rows: rows.max(axis=1), CONFIDENCE_EDGES),
    "pet_score": ("pet_score", lambda rows: rows.reshape(len(rows), -1)[:, 0], PET_SCORE_EDGES),
}


def histogram(values: np.ndarray, edges: tuple[float, ...]) -> dict[str, Any]:
    counts, _ = np.histogram(np.clip(values, edges[0], edges[-1]), bins=np.asarray(edges))
    return {"edges": list(edges), "counts": counts.astype(int).tolist()}


def reference_distributions(
    outputs: dict[str, np.ndarray], targets: np.ndarray, labels: list[str], source: str
) -> dict[str, Any]:
    """Histograms of every signal, the predicted-label shares and the true class balance of the images."""
    predicted = outputs["probabilities"].argmax(axis=1)
    signals = {
        name: histogram(value(outputs[output]), edges)
        for name, (output, value, edges) in SIGNALS.items()
        if output in outputs
    }
    signals["label"] = {"categories": labels, "counts": np.bincount(predicted, minlength=len(labels)).tolist()}
    balance = np.bincount(targets, minlength=len(labels)) / max(1, len(targets))
    return {
        "source": source,
        "images": len(targets),
        "class_balance": {label: round(float(share), 4) for label, share in zip(labels, balance, strict=True)},
        "signals": signals,
    }


def model_outputs(path: Path, inputs: np.ndarray) -> dict[str, np.ndarray]:
    """Every named output of an exported model for a stack of inputs, as the service computes them."""
    return outputs(make_session(path), inputs)


def reference_for(path: Path, inputs: np.ndarray, targets: np.ndarray, labels: list[str], source: str) -> dict:
    return reference_distributions(model_outputs(path, inputs), targets, labels, source)


def reference_for_split(path: Path, data_dir: Path, spec: PreprocessSpec, split: str = "val") -> dict[str, Any]:
    """The reference of an exported model on a prepared split (the validation split: not trained on, not the test)."""
    inputs, targets = load_split(data_dir, split, spec)
    return reference_for(path, inputs, targets, list(spec.labels), f"{split} split")

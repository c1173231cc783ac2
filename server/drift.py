"""Drift without labels: the recent predictions' signals against the reference distributions the model carries.

`export.reference` writes, into the model's metadata, a histogram per signal on the validation split. Here each
signal keeps its last `window` values and the population stability index (PSI) against that reference is exported
as a gauge. A signal the model has no reference for is not monitored, so an older model simply has no drift gauges.
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np

# signal name -> its value for one prediction (None: this prediction has no such value). The reference side is
# export.reference.SIGNALS: a signal is monitored when both sides name it.
SIGNALS: dict[str, Callable[[Any], float | str | None]] = {
    "confidence": lambda prediction: prediction.confidence,
    "label": lambda prediction: prediction.label,
    "pet_score": lambda prediction: prediction.pet_score,  # None for a model without the not-a-pet output
}


def smoothed(counts: np.ndarray) -> np.ndarray:
    """Fractions with half a count added to every bin, so an empty bin does not make the PSI infinite."""
    return (counts + 0.5) / (counts.sum() + 0.5 * len(counts))


def psi(expected: np.ndarray, actual: np.ndarray) -> float:
    """Population stability index: sum over bins of (actual - expected) * ln(actual / expected)."""
    return float(np.sum((actual - expected) * np.log(actual / expected)))


class Window:
    """The last `size` values of one signal, binned like its reference histogram."""

    def __init__(self, reference: dict[str, Any], size: int) -> None:
        # a list, searched with bisect: numpy's searchsorted on one value costs more than the whole search
        self.edges = [float(edge) for edge in reference["edges"]] if "edges" in reference else None
        self.categories: list[str] = list(reference.get("categories", []))
        self.expected = smoothed(np.asarray(reference["counts"], dtype=np.float64))
        self.counts = [0] * len(self.expected)  # plain ints: a numpy element update costs ten times more
        self.bins: deque[int] = deque(maxlen=size)

    def bin(self, value: float | str) -> int | None:
        if self.edges is None:
            return self.categories.index(value) if value in self.categories else None
        index = bisect.bisect_right(self.edges, float(value)) - 1
        return min(max(index, 0), len(self.edges) - 2)

    def add(self, value: float | str) -> None:
        index = self.bin(value)
        if index is None:
            return
        if len(self.bins) == self.bins.maxlen:
            self.counts[self.bins[0]] -= 1
        self.bins.append(index)
        self.counts[index] += 1

    def psi(self) -> float:
        return psi(self.expected, smoothed(np.asarray(self.counts, dtype=np.float64))) if self.bins else float("nan")

    def __len__(self) -> int:
        return len(self.bins)


class DriftMonitor:
    """One window per signal the model's reference describes; PSI and window fill exported as gauges."""

    def __init__(self, reference: dict[str, Any] | None, size: int, psi_gauge: Any, count_gauge: Any) -> None:
        signals = (reference or {}).get("signals", {})
        self.windows = {name: Window(signals[name], size) for name in SIGNALS if name in signals}
        for name, window in self.windows.items():
            psi_gauge.labels(name).set_function(window.psi)
            count_gauge.labels(name).set_function(window.__len__)

    def observe(self, prediction: Any) -> None:
        for name, window in self.windows.items():
            value = SIGNALS[name](prediction)
            if value is not None:
                window.add(value)

"""The mirror view: flip averaging only for the photos whose first view is unsure.

Averaging a photo's outputs with its mirror image's (horizontal flip) makes the answer better only where one view
is unsure; for the rest it doubles the work. A model exported with flip averaging carries, in its metadata, the
gate chosen on development data (export/mirror.py): a photo gets the second view when its first view's top class
probability is below `confidence`, or its pet score lies in [pet_low, pet_high) around the pet threshold. This is
the one implementation: the service, `make classify`, the export's evaluations and the parity tests all run it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

Run = Callable[[np.ndarray], list[np.ndarray]]  # a batch of CHW images -> the model's outputs (probabilities first)


@dataclass(frozen=True)
class MirrorGate:
    confidence: float
    pet_low: float = 1.0
    pet_high: float = 0.0  # an empty band unless set

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any]) -> MirrorGate | None:
        """The model's gate; None for a model that averages inside its graph, or not at all."""
        mirror = metadata.get("mirror")
        return cls(**mirror["gate"]) if mirror else None

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    def needs(self, probabilities: np.ndarray, pet_scores: np.ndarray | None) -> np.ndarray:
        """Which photos of a batch get the second view, from their first view's outputs."""
        unsure = probabilities.max(axis=1) < self.confidence
        if pet_scores is not None:
            unsure |= (pet_scores >= self.pet_low) & (pet_scores < self.pet_high)
        return unsure


ALWAYS = MirrorGate(confidence=2.0)  # every photo gets both views: flip averaging as it was, for comparisons


def with_mirror(run: Run, batch: np.ndarray, gate: MirrorGate | None) -> tuple[list[np.ndarray], np.ndarray]:
    """The outputs for a batch of CHW images, each photo's averaged with its mirror image's where the gate says so
    (one more run, on those photos only, so a photo's answer does not depend on its batch); and which photos took
    the second view."""
    outputs = run(batch)
    if gate is None:
        return outputs, np.zeros(len(batch), dtype=bool)
    need = gate.needs(outputs[0], outputs[1] if len(outputs) > 1 else None)
    if need.any():
        mirrored = run(np.ascontiguousarray(batch[need][..., ::-1]))
        outputs = [output.copy() for output in outputs]
        for output, second in zip(outputs, mirrored, strict=True):
            output[need] = (output[need] + second) / 2
    return outputs, need

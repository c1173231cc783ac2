"""The mirror view's gate (server.mirror), chosen on development data and checked by cross-validation.

For every development image (the train+val photos and the development not-pets) both views are scored. The gate
is the smallest one under which the gated answers equal always-averaged answers on every development image: a
photo gets the second view when its first view's top probability is below the highest first-view confidence of
any photo whose label averaging changed, or when its first-view pet score lies between the lowest and highest of
any image whose is_pet averaging changed (the pet threshold inside that band). Stratified 5-fold cross-validation
(choose on four folds, apply to the fifth) estimates how often the gated answer differs from the averaged one on
images the gate was not chosen on. The held-out sets (test photos, held-out not-pets) are read only to report.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.model_selection import StratifiedKFold

from export.evaluate import make_session, runner
from server.mirror import MirrorGate
from training.stats import paired, proportion

FOLDS = 5


@dataclass(frozen=True)
class Views:
    """Both views' outputs of the same images: class probabilities and (for a model with one) pet scores."""

    first: np.ndarray
    second: np.ndarray
    first_pet: np.ndarray
    second_pet: np.ndarray

    def subset(self, index: np.ndarray) -> Views:
        return Views(self.first[index], self.second[index], self.first_pet[index], self.second_pet[index])

    def __add__(self, other: Views) -> Views:
        return Views(*(np.concatenate([getattr(self, f), getattr(other, f)]) for f in self.__dataclass_fields__))

    def __len__(self) -> int:
        return len(self.first)


def score_views(path: Path, inputs: np.ndarray, batch_size: int = 32) -> Views:
    """Each image and its mirror image through the exported single-view model."""
    run, names, _ = runner(make_session(path))
    if not len(inputs):
        return Views(np.empty((0, 2)), np.empty((0, 2)), np.empty(0), np.empty(0))
    first, second = [], []
    for start in range(0, len(inputs), batch_size):
        batch = inputs[start : start + batch_size]
        first.append(run(batch))
        second.append(run(np.ascontiguousarray(batch[..., ::-1])))
    outputs = [np.concatenate([chunk[k] for chunk in first]) for k in range(len(names))]
    mirrored = [np.concatenate([chunk[k] for chunk in second]) for k in range(len(names))]
    no_pet = np.full(len(inputs), np.nan)
    return Views(outputs[0], mirrored[0], *(outputs[1], mirrored[1]) if len(names) > 1 else (no_pet, no_pet))


def answers(views: Views, gate: MirrorGate, threshold: float | None) -> dict[str, np.ndarray]:
    """Labels and is_pet under the gate, and under always averaging, and which images took the second view."""
    pet = None if threshold is None else views.first_pet
    need = gate.needs(views.first, pet)
    averaged = (views.first + views.second) / 2
    averaged_pet = (views.first_pet + views.second_pet) / 2
    gated = np.where(need[:, None], averaged, views.first)
    gated_pet = np.where(need, averaged_pet, views.first_pet)
    limit = np.inf if threshold is None else threshold
    return {"need": need, "label": gated.argmax(1), "label_averaged": averaged.argmax(1),
            "is_pet": gated_pet >= limit, "is_pet_averaged": averaged_pet >= limit}  # fmt: skip


def choose(views: Views, threshold: float | None) -> MirrorGate:
    """The smallest gate under which every image's label and is_pet equal the averaged ones."""
    confidence = views.first.max(1)
    flipped = views.first.argmax(1) != ((views.first + views.second) / 2).argmax(1)
    gate_confidence = float(np.nextafter(confidence[flipped].max(), 2)) if flipped.any() else 0.0
    if threshold is None:
        return MirrorGate(gate_confidence)
    averaged_pet = (views.first_pet + views.second_pet) / 2
    changed = (views.first_pet >= threshold) != (averaged_pet >= threshold)
    band = np.append(views.first_pet[changed], threshold)  # the threshold itself is always in the band
    return MirrorGate(gate_confidence, float(band.min()), float(np.nextafter(band.max(), 2)))


def cross_validate(views: Views, groups: np.ndarray, threshold: float | None, seed: int) -> dict[str, Any]:
    """Choose on four folds, apply to the fifth: second-view share and answers that differ from averaging."""
    need = label_differs = pet_differs = 0
    splitter = StratifiedKFold(FOLDS, shuffle=True, random_state=seed)
    for chosen_on, held in splitter.split(np.zeros((len(groups), 1)), groups):
        result = answers(views.subset(held), choose(views.subset(chosen_on), threshold), threshold)
        need += int(result["need"].sum())
        label_differs += int((result["label"] != result["label_averaged"]).sum())
        pet_differs += int((result["is_pet"] != result["is_pet_averaged"]).sum())
    n = len(groups)
    return {"folds": FOLDS, "images": n, "second_view": proportion(need, n),
            "label_differs_from_averaging": proportion(label_differs, n),
            "is_pet_differs_from_averaging": proportion(pet_differs, n)}  # fmt: skip


def held_out_report(
    gate: MirrorGate, threshold: float | None, photos: Views, targets: np.ndarray, not_pets: Views
) -> dict[str, Any]:
    """On the held-out sets: the second-view share, and accuracy and not-a-pet rates gated vs always averaged,
    paired on the same images."""
    on_photos = answers(photos, gate, threshold)
    report: dict[str, Any] = {
        "second_view_test_photos": proportion(int(on_photos["need"].sum()), len(photos)),
        "accuracy_gated_vs_averaged": paired(on_photos["label_averaged"] == targets, on_photos["label"] == targets),
    }
    if threshold is not None:
        report["pets_kept_gated_vs_averaged"] = paired(on_photos["is_pet_averaged"], on_photos["is_pet"])
        if len(not_pets):
            on_others = answers(not_pets, gate, threshold)
            report["second_view_not_pets"] = proportion(int(on_others["need"].sum()), len(not_pets))
            report["not_pets_flagged_gated_vs_averaged"] = paired(~on_others["is_pet_averaged"], ~on_others["is_pet"])
    return report


def study(
    path: Path, dev: tuple[np.ndarray, np.ndarray], held_out: tuple[np.ndarray, np.ndarray], dev_not_pets: np.ndarray,
    held_out_not_pets: np.ndarray, threshold: float | None, seed: int,
) -> tuple[MirrorGate, dict[str, Any]]:  # fmt: skip
    """The gate for the single-view model at `path` (pet threshold already chosen), and the report."""
    views = score_views(path, dev[0]) + score_views(path, dev_not_pets)
    groups = np.concatenate([dev[1], np.full(len(dev_not_pets), dev[1].max() + 1)])
    gate = choose(views, threshold)
    report = {
        "rule": "the smallest gate under which every development image's label and is_pet equal always averaging",
        "gate": gate.to_dict(),
        "development_images": len(views),
        "cross_validated": cross_validate(views, groups, threshold, seed),
        "held_out": held_out_report(
            gate, threshold, score_views(path, held_out[0]), held_out[1], score_views(path, held_out_not_pets)
        ),
    }
    return gate, report

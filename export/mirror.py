"""The mirror view's gate (server.mirror), chosen on development data and checked by cross-validation.

For every development image (the train+val photos and the development not-pets) both views are scored. The gate
is the smallest one under which the gated answers equal always-averaged answers on every development image: a
photo gets the second view when its first view's top probability is below the highest first-view confidence of
any photo whose label averaging changed, or when its first-view pet score lies between the lowest and highest of
any image whose is_pet averaging changed (the pet threshold inside that band). It is served only when training.gates
shows it not worse than always averaging, on answers it was not chosen on: stratified 5-fold cross-validation
(choose on four folds, apply to the fifth) for the development images, the gate chosen on all of them for the
held-out sets (test photos, held-out and generated non-pets).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.model_selection import StratifiedKFold

from export.evaluate import make_session, runner
from server.mirror import ALWAYS, MirrorGate
from training import gates
from training.stats import proportion

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
    """Choose on four folds, apply to the fifth: every image's gated answer from a gate not chosen on it."""
    n = len(groups)
    need, label, is_pet = np.zeros(n, bool), np.zeros(n, int), np.zeros(n, bool)
    splitter = StratifiedKFold(FOLDS, shuffle=True, random_state=seed)
    for chosen_on, held in splitter.split(np.zeros((n, 1)), groups):
        result = answers(views.subset(held), choose(views.subset(chosen_on), threshold), threshold)
        need[held], label[held], is_pet[held] = result["need"], result["label"], result["is_pet"]
    averaged = answers(views, MirrorGate(0.0), threshold)  # the averaged answers do not depend on the gate
    return {"need": need, "label": label, "is_pet": is_pet,
            "label_averaged": averaged["label_averaged"], "is_pet_averaged": averaged["is_pet_averaged"]}  # fmt: skip


def study(
    path: Path, dev: tuple[np.ndarray, np.ndarray], held_out: tuple[np.ndarray, np.ndarray], dev_not_pets: np.ndarray,
    held_out_not_pets: np.ndarray, threshold: float | None, seed: int, rule: gates.Rule,
) -> tuple[MirrorGate, dict[str, Any]]:  # fmt: skip
    """The gate for the single-view model at `path` (pet threshold already chosen), and the report.

    The gate is kept only when its answers are not worse than always averaging by training.gates' rule, on every
    image: the development images with the gate chosen on the other folds (out of fold), the held-out ones with the
    gate chosen on all development images. Refused, every image gets both views (server.mirror.ALWAYS).
    """
    dev_views = score_views(path, dev[0]) + score_views(path, dev_not_pets)
    photos = len(dev[0])
    groups = np.concatenate([dev[1], np.full(len(dev_not_pets), dev[1].max() + 1)])
    gate = choose(dev_views, threshold)
    oof = cross_validate(dev_views, groups, threshold, seed)
    test = answers(score_views(path, held_out[0]), gate, threshold)
    others = answers(score_views(path, held_out_not_pets), gate, threshold)
    targets = np.concatenate([dev[1], held_out[1]])
    gated = {k: np.concatenate([oof[k][:photos], test[k]]) for k in ("label", "label_averaged", "is_pet",
                                                                     "is_pet_averaged", "need")}  # fmt: skip
    comparisons: dict[str, tuple[str, np.ndarray, np.ndarray]] = {
        "accuracy: every prepared photo": ("accuracy", gated["label_averaged"] == targets, gated["label"] == targets)
    }
    if threshold is not None:
        comparisons["pets kept: every prepared photo"] = ("pets_kept", gated["is_pet_averaged"], gated["is_pet"])
        flagged = np.concatenate([~oof["is_pet_averaged"][photos:], ~others["is_pet_averaged"]])
        flagged_gated = np.concatenate([~oof["is_pet"][photos:], ~others["is_pet"]])
        comparisons["non-pets flagged: pooled non-pets"] = ("not_pets_flagged", flagged, flagged_gated)
    verdict = gates.judge(comparisons, rule)
    images = len(oof["need"]) + len(test["need"]) + len(others["need"])
    second = int(oof["need"].sum() + test["need"].sum() + others["need"].sum())
    report = {
        "choice": "the smallest gate under which every development image's label and is_pet equal always averaging",
        "chosen_gate": gate.to_dict(),
        "development_images": len(dev_views),
        "second_view": proportion(second, images),
        "gate": verdict,
        "served": "gated" if verdict["accepted"] else "both views always (the gate was refused)",
    }
    return (gate if verdict["accepted"] else ALWAYS), report

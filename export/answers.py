"""What the service answers, image by image, for the gates (training.gates): each cat/dog photo right or wrong and
kept as a pet or not, each non-pet flagged or not. Every image goes through server.model.Model (its decoding,
preprocessing, mirror view and pet threshold), so a gate judges a model exactly as it is served.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from export import synthetic
from imaging import DEFAULT_MAX_PIXELS, ImageError
from server.model import Model
from training.config import PetParams
from training.gates import Comparisons
from training.pet import not_pet_files


def gate_not_pets(settings: PetParams | None) -> list[bytes]:
    """The one pool of non-pets every gate judges on: every ImageNet non-pet in pet.not_pets_dir (those that show a
    pet after all, pet.shows_pet, set apart) and the generated non-ImageNet images (pet.synthetic_per_kind of each
    kind). Pooled, never judged set by set: a set of about 200 cannot show a 1% margin (docs/gates.md)."""
    if settings is None:
        return []
    files: list[Path] = []
    if Path(settings.not_pets_dir).is_dir():
        split = not_pet_files(Path(settings.not_pets_dir), settings.shows_pet)
        files = sorted(split["dev"] + split["held_out"])
    generated = [data for _, _, data in synthetic.generate(settings.synthetic_per_kind)]
    return [file.read_bytes() for file in files] + generated


@dataclass(frozen=True)
class Answers:
    right: np.ndarray  # each photo given its true label
    kept: np.ndarray | None  # each photo answered is_pet true (None: the model has no pet output)
    flagged: np.ndarray | None  # each non-pet answered is_pet false


def served_answers(
    model_path: Path, photos: Sequence[tuple[bytes, int]], not_pets: Sequence[bytes], labels: Sequence[str] = ()
) -> Answers:
    """The model's answers as served: photos are (encoded bytes, index of the true label in `labels`, which must be
    the model's own; empty: the model's labels are taken as the data's)."""
    model = Model(model_path, threads=0, max_pixels=DEFAULT_MAX_PIXELS)
    if labels and tuple(model.labels) != tuple(labels):
        raise ValueError(f"{model_path} predicts {model.labels}, the data has {list(labels)}")
    results = classify(model, [data for data, _ in photos])
    right = np.array([r.label == model.labels[i] for r, (_, i) in zip(results, photos, strict=True)], dtype=bool)
    if model.pet_threshold is None:
        return Answers(right, None, None)
    others = classify(model, list(not_pets))
    return Answers(right, np.array([bool(r.is_pet) for r in results]), np.array([not r.is_pet for r in others]))


def classify(model: Model, images: list[bytes], batch_size: int = 32) -> list:
    answers = []
    for start in range(0, len(images), batch_size):
        results, _ = model.classify_all(images[start : start + batch_size])
        failed = [r for r in results if isinstance(r, ImageError)]
        if failed:
            raise ValueError(f"{len(failed)} gate images could not be classified: {failed[0]}")
        answers.extend(results)
    return answers


def comparisons(reference: Answers, candidate: Answers, photos: str = "photos") -> Comparisons:
    """The three protected measures, reference against candidate on the same images (the pet measures whenever the
    reference has the pet output: a candidate that lost it is refused on them)."""
    pairs: dict[str, tuple[str, np.ndarray, np.ndarray]] = {
        f"accuracy: {photos}": ("accuracy", reference.right, candidate.right)
    }
    if reference.kept is not None:  # a candidate without the pet output has no images to show it: refused
        none = np.zeros(0, bool)
        pairs[f"pets kept: {photos}"] = ("pets_kept", *both(reference.kept, candidate.kept, none))
        pairs["non-pets flagged: pooled non-pets"] = ("not_pets_flagged", *both(reference.flagged, candidate.flagged,
                                                                                none))  # fmt: skip
    return pairs


def both(reference: np.ndarray | None, candidate: np.ndarray | None, none: np.ndarray) -> tuple[np.ndarray, ...]:
    """The pair to compare, or two empty arrays (a refusal: no images) when the candidate lacks the answer."""
    return (reference, candidate) if reference is not None and candidate is not None else (none, none)

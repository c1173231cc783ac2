"""The not-a-pet method study: real photos through the real ImageNet backbone, scored out of fold."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import WEIGHTS, photos
from tests.test_not_a_pet import NOT_PETS
from training.config import load_params
from training.model import imagenet_head_state
from training.pet_methods import SHIPPED, Head, compare, flagged_at_keep, methods, out_of_fold, views_features
from training.presets import PreprocessSpec

PETS = [*photos("cat", 8), *photos("dog", 8)]
OTHERS = sorted(NOT_PETS.glob("imagenet_[3-9]*.jpg"))[::25][:12]


@pytest.fixture(scope="module")
def study() -> tuple[np.ndarray, np.ndarray, Head]:
    spec = PreprocessSpec.from_dict(load_params().preprocess)
    features = views_features(PETS + OTHERS, spec, str(WEIGHTS), batch_size=8)
    targets = np.r_[np.ones(len(PETS), dtype=int), np.zeros(len(OTHERS), dtype=int)]
    return features, targets, Head(imagenet_head_state(str(WEIGHTS)))


def test_features_hold_the_photo_and_its_mirror_image(study):
    features, _, head = study
    assert features.shape == (len(PETS) + len(OTHERS), 2, 1280)
    assert not np.allclose(features[:, 0], features[:, 1])  # two different views
    mass = head.pet_mass(features).mean(1)
    assert np.allclose(head.shipped(features), mass, atol=1e-5)  # the study's mass is the shipped PetHead's
    assert mass[: len(PETS)].mean() > 0.5 > mass[len(PETS) :].mean()  # ImageNet's head tells these apart


def test_the_operating_point_is_the_exports_threshold_rule():
    pets, others = np.array([0.9, 0.2, 0.8, 0.6]), np.array([0.1, 0.3, 0.7])
    threshold, flagged = flagged_at_keep(pets, others, keep=1.0)
    assert threshold == 0.2 and flagged.tolist() == [True, False, False]
    threshold, flagged = flagged_at_keep(pets, others, keep=0.75)  # one pet may be lost
    assert threshold == 0.6 and flagged.tolist() == [True, True, False]


def test_trained_methods_score_only_images_they_did_not_fit(study):
    features, targets, head = study
    seen: list[int] = []

    def record(train, train_targets, score):
        seen.append(len(score))
        assert not any(np.array_equal(row, other) for row in score for other in train)  # never fitted on itself
        return np.zeros(len(score))

    out_of_fold(record, features, targets, folds=4, seed=0)
    assert sum(seen) == len(targets) and len(seen) == 4
    scores = out_of_fold(methods(head)["oe_logistic_logit_stats"][1], features, targets, folds=4, seed=0)
    assert scores[targets == 1].mean() > scores[targets == 0].mean()


def test_every_method_is_compared_with_the_shipped_one_on_the_same_images(study):
    features, targets, head = study
    results = compare(features, targets, head, keeps=(1.0,), repeats=2, folds=4, seed=0)
    assert set(results) == set(methods(head))
    shipped = results[SHIPPED]["keep_1.0"]
    expected = int(
        (head.pet_mass(features[targets == 0]).mean(1) < head.pet_mass(features[targets == 1]).mean(1).min()).sum()
    )
    assert shipped["flagged_not_pets"]["count"] == expected and shipped["flagged_not_pets"]["n"] == len(OTHERS)
    pairs = [(v["only_reference_right"], v["only_candidate_right"]) for v in shipped["vs_shipped_per_repeat"]]
    assert pairs == [(0, 0), (0, 0)]
    for entry in results.values():  # each repeat's discordant counts add up to that repeat's own flagged count
        at = entry["keep_1.0"]
        assert len(at["vs_shipped_per_repeat"]) == len(at["flagged_per_repeat"]) == 2
        for repeat, count in zip(at["vs_shipped_per_repeat"], at["flagged_per_repeat"], strict=True):
            assert count == expected - repeat["only_reference_right"] + repeat["only_candidate_right"]

"""training.gates: the one rule of every gate. Not worse on each measure by the paired interval within a margin
written down before the run; too few images is a refusal. (A registry that cannot be read is an error, never "no
production model": tests/test_champion.py.)"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import binomtest

from tests.conftest import ROOT
from training import gates
from training.stats import paired, paired_difference

RULE = gates.Rule.from_params(ROOT / "params.yaml")


def outcomes(both: int, only_reference: int, only_candidate: int, neither: int) -> tuple[np.ndarray, np.ndarray]:
    """(reference right, candidate right) image by image for a paired 2x2 table."""
    reference = [True] * both + [True] * only_reference + [False] * only_candidate + [False] * neither
    candidate = [True] * both + [False] * only_reference + [True] * only_candidate + [False] * neither
    return np.array(reference, bool), np.array(candidate, bool)


def test_the_paired_interval_covers_the_true_difference_95_times_in_100():
    """Newcombe's interval against simulation: two correlated classifiers near 98% accuracy on 200 photos. With so
    few photos on which they disagree it is conservative (about 0.99, as the literature finds), never below 0.95."""
    rng = np.random.default_rng(0)
    cells = [0.970, 0.008, 0.012, 0.010]  # both right, only the reference, only the candidate, neither
    truth, trials = cells[2] - cells[1], 1000
    tables = rng.multinomial(200, cells, size=trials)
    covered = sum(
        low <= truth <= high
        for low, high in (paired_difference(*outcomes(*table))["difference_ci95"] for table in tables)
    )
    assert 0.94 <= covered / trials <= 0.997, covered / trials


def test_the_paired_interval_is_honest_where_the_bootstrap_is_not():
    reference, candidate = outcomes(5, 0, 0, 0)  # five photos both get right: nothing is known to a few points
    assert paired(reference, candidate)["difference_ci95"] == [0.0, 0.0]
    low, high = paired_difference(reference, candidate)["difference_ci95"]
    assert low < -0.3 and high > 0.3
    large = paired_difference(*outcomes(3000, 20, 20, 60))  # many photos: close to the bootstrap's
    assert abs(large["difference_ci95"][0] - paired(*outcomes(3000, 20, 20, 60))["difference_ci95"][0]) < 0.003
    assert large["difference"] == 0 and large["difference_ci95"][0] == pytest.approx(-large["difference_ci95"][1])
    swapped = paired_difference(*outcomes(300, 2, 9, 4)[::-1])
    direct = paired_difference(*outcomes(300, 2, 9, 4))
    assert swapped["difference_ci95"] == pytest.approx([-direct["difference_ci95"][1], -direct["difference_ci95"][0]])


def test_the_images_a_one_percent_margin_needs_are_what_the_interval_says():
    for rate in (0.97, 0.98, 0.998):
        needed = gates.images_needed(rate, 0.01)
        assert 400 <= needed <= 460, (rate, needed)  # with full agreement
        if rate < 0.99:  # 1% of the images split both ways (at 99.8% the reference is wrong too rarely for that)
            with_disagreement = gates.images_needed(rate, 0.01, disagreement=0.01)
            assert 600 <= with_disagreement <= 720, (rate, with_disagreement)
        for n, passes in ((needed, True), (needed - 1, False)):
            right = round(rate * n)
            result = gates.not_worse("accuracy", *outcomes(right, 0, 0, n - right), RULE)
            assert result["not_worse"] is passes, (rate, n, result["lower95"], result["margin"])
    assert gates.images_needed(0.98, 0.0) is None  # no margin: nothing can show it


def test_a_loss_the_old_pet_rule_could_not_see_is_refused():
    """The served int8 model's gate: 4 of ~200 held-out non-pets lost, none gained. McNemar's p for 4 vs 0 is
    0.125, so the old "worse beyond the noise" rule passed it, on any such set; the margin rule refuses it."""
    reference, candidate = outcomes(190, 4, 0, 6)
    assert binomtest(0, 4).pvalue > 0.05
    result = gates.not_worse("not_pets_flagged", reference, candidate, RULE)
    assert not result["not_worse"] and result["lower95"] < -result["margin"]
    # the unseen photos: 452 vs 435 of 464 non-pets flagged (17 more lost): refused by a wide mark
    hidden = gates.not_worse("not_pets_flagged", *outcomes(435, 17, 0, 12), RULE)
    assert not hidden["not_worse"] and hidden["difference_ci95"][1] < 0


def test_judge_refuses_what_it_cannot_show_and_never_passes_by_default():
    with pytest.raises(ValueError, match="never passes by default"):
        gates.judge({}, RULE)
    empty = np.zeros(0, bool)
    verdict = gates.judge({"accuracy: photos": ("accuracy", *outcomes(1000, 0, 0, 20)),
                           "non-pets flagged: pool": ("not_pets_flagged", empty, empty)}, RULE)  # fmt: skip
    assert not verdict["accepted"] and "non-pets flagged: pool (no images)" in verdict["reason"]
    few = gates.judge({"accuracy: photos": ("accuracy", *outcomes(371, 0, 0, 5))}, RULE)  # 376 photos, all agree
    assert not few["accepted"] and "would be needed even with full agreement" in few["reason"]
    enough = gates.judge({"accuracy: photos": ("accuracy", *outcomes(1700, 3, 2, 45)),
                          "pets kept: photos": ("pets_kept", *outcomes(1745, 2, 1, 2)),
                          "non-pets flagged: pool": ("not_pets_flagged", *outcomes(820, 1, 2, 20))}, RULE)  # fmt: skip
    assert enough["accepted"], enough["reason"]
    # a champion must also be better: not worse alone keeps the champion
    same = gates.judge({"accuracy: val+test": ("accuracy", *outcomes(1700, 3, 2, 45))}, RULE,
                       better_on=("accuracy: val+test",))  # fmt: skip
    assert not same["accepted"] and "not better" in same["reason"]
    better = gates.judge({"accuracy: val+test": ("accuracy", *outcomes(1700, 2, 30, 45))}, RULE,
                         better_on=("accuracy: val+test",))  # fmt: skip
    assert better["accepted"] and better["comparisons"]["accuracy: val+test"]["better"]
    with pytest.raises(ValueError, match="not paired"):
        gates.not_worse("accuracy", np.ones(3, bool), np.ones(4, bool), RULE)


def test_the_rule_is_read_whole_from_params_or_not_at_all():
    assert set(RULE.max_relative_loss) == set(gates.MEASURES) and RULE.max_relative_loss["accuracy"] == 0.01
    with pytest.raises(ValueError, match="no `gates` section"):
        gates.Rule.from_dict(None)
    with pytest.raises(ValueError, match="one margin for each"):
        gates.Rule.from_dict({"max_relative_loss": {"accuracy": 0.01}, "alpha": 0.05})
    with pytest.raises(ValueError, match="margins in"):
        gates.Rule.from_dict({"max_relative_loss": dict.fromkeys(gates.MEASURES, 1.5), "alpha": 0.05})

"""The floor: one accuracy judged against an absolute minimum, with its Wilson 95% interval, never a point estimate.

A floor is a sanity check that catches a broken build or a broken deployment (a model at ~98% that answers at 60%);
it is not a comparison (training.gates judges a candidate against a reference, paired, on the same images). It passes
only when the **lower** end of the interval reaches the minimum: the accuracy is shown to be at least the floor, and
too few photos to show it is a refusal, as in every gate here. Hence a floor sits well below the accuracy expected of
a sound model, by what the photos it is judged on can show (docs/gates.md).

Standard library only: deploy.evaluate applies it in the serve-only environment, which has neither SciPy nor a YAML
parser. In server/ because both sides that apply it already import the server (export.convert's gate, deploy's
evaluation) and deploy/ imports nothing above it. Its interval equals training.stats.interval's Wilson interval
(tests/test_floor.py checks the two agree).
"""

from __future__ import annotations

import math
from statistics import NormalDist
from typing import Any

Z95 = NormalDist().inv_cdf(0.975)


def wilson(successes: int, n: int) -> tuple[float, float]:
    """The Wilson score 95% interval of successes out of n ((0, 1) for no trials)."""
    if n == 0:
        return 0.0, 1.0
    rate, z2 = successes / n, Z95 * Z95
    centre = (rate + z2 / (2 * n)) / (1 + z2 / n)
    half = Z95 / (1 + z2 / n) * math.sqrt(rate * (1 - rate) / n + z2 / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def photos_needed(minimum: float, limit: int = 100_000) -> int | None:
    """The fewest photos, every one answered right, whose interval's lower end reaches the minimum."""
    return next((n for n in range(1, limit + 1) if wilson(n, n)[0] >= minimum), None)


def floor(correct: int, n: int, minimum: float, setting: str) -> dict[str, Any]:
    """correct of n against `minimum` (named by its `setting`, for the reason): accepted when the Wilson 95%
    interval's lower end is at least the minimum. Returns the verdict, its reason and the numbers."""
    if not 0 <= minimum < 1:
        raise ValueError(f"{setting}: a floor in [0, 1), not {minimum}")
    if not 0 <= correct <= n:
        raise ValueError(f"{correct} right out of {n}: not a count of photos")
    low, high = wilson(correct, n)
    accepted = low >= minimum
    said = f"{correct} of {n} right ({correct / n:.4f}), 95% interval {low:.4f}-{high:.4f}" if n else "no photos"
    if accepted:
        reason = f"{said}: shown at least {setting} {minimum:.4f}"
    elif high < minimum:
        reason = f"{said}: shown below {setting} {minimum:.4f} (the whole interval is under it)"
    else:
        needed = photos_needed(minimum)
        short = f" ({needed} photos would be needed even with every one right)" if needed and needed > n else ""
        reason = f"{said}: its lower bound is below {setting} {minimum:.4f}, not shown at least the floor{short}"
    return {
        "rate": correct / n if n else float("nan"),
        "count": correct,
        "n": n,
        "ci95": [low, high],
        "minimum": minimum,
        "rule": "the lower end of the Wilson 95% interval at least the minimum (server.floor)",
        "accepted": accepted,
        "reason": reason,
    }

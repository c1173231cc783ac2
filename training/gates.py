"""The one rule every gate applies before it lets a model or a variant through: not worse, paired, on enough images.

The gates: the int8 copy against its float32 model (export/quantize.py), the mirror view's gate against both views
always (export/mirror.py), and the champion rule (loop/champion.py: `make export`'s and `make retrain`'s candidate,
against what production runs).

Each protected measure is a rate over the same images for the reference and the candidate:

- `accuracy`: cat/dog photos given their true label;
- `pets_kept`: cat/dog photos answered `is_pet` true;
- `not_pets_flagged`: images that are neither answered `is_pet` false.

The candidate is **not worse** on a measure when the lower end of the 95% interval of its paired difference
(candidate minus reference, Newcombe's hybrid score interval for paired proportions: training.stats) is at least
-margin, where margin = max_relative_loss x the reference's rate, written in params.yaml `gates` before any run:
MLPerf Inference's quality target, 99% of the reference's value of the benchmark's own metric, held for every measure
(docs/gates.md says why and how many images it needs). A measure with no images, or too few for the interval to fit
inside the margin, is not shown to be not worse, and the candidate is refused: nothing passes by default.

A champion must also be **better**: on at least one of its sets it gets more photos right that the reference gets
wrong than the reverse, McNemar's exact p < alpha / the number of sets (Bonferroni).

The other kind of check, a **floor** (export.convert's `export.min_accuracy`, deploy.evaluate's `--min-accuracy`),
judges one accuracy against an absolute minimum, not against a reference: server.floor, by the same principle
(shown at least the floor by its interval's lower end, never by a point estimate). It lives in server/, standard library
only, because deploy.evaluate runs it in the serve-only environment (no SciPy, no YAML) and deploy/ imports nothing
above the server; export.convert imports the server already.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from training.config import DEFAULT_PARAMS
from training.stats import paired_difference

MEASURES = ("accuracy", "pets_kept", "not_pets_flagged")
WHAT = {
    "accuracy": "cat/dog photos given their true label",
    "pets_kept": "cat/dog photos answered is_pet true",
    "not_pets_flagged": "images that are neither answered is_pet false",
}


@dataclass(frozen=True)
class Rule:
    """params.yaml `gates`: the largest loss each measure may show, relative to the reference, and alpha for
    "better"."""

    max_relative_loss: Mapping[str, float]
    alpha: float

    @classmethod
    def from_params(cls, path: Path = DEFAULT_PARAMS) -> Rule:
        return cls.from_dict(yaml.safe_load(Path(path).read_text())["gates"])

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any] | None) -> Rule:
        if not raw:
            raise ValueError("params.yaml has no `gates` section: no gate passes without its rule")
        losses = {str(k): float(v) for k, v in dict(raw["max_relative_loss"]).items()}
        if set(losses) != set(MEASURES):
            raise ValueError(f"params.yaml gates.max_relative_loss: one margin for each of {MEASURES}, not {losses}")
        if not all(0 <= v < 1 for v in losses.values()) or not 0 < float(raw["alpha"]) < 1:
            raise ValueError(f"params.yaml gates: margins in [0, 1) and alpha in (0, 1): {dict(raw)}")
        return cls(losses, float(raw["alpha"]))

    def text(self) -> str:
        margins = ", ".join(f"{m} {self.max_relative_loss[m]:g}" for m in MEASURES)
        return (
            "not worse on every measure: the lower end of the 95% interval of the paired difference (Newcombe 1998) "
            f"at least -max_relative_loss x the reference's rate ({margins}; MLPerf Inference's 99% of the "
            f"reference); better, where asked: more right only by the candidate, McNemar's exact p < {self.alpha:g} "
            "/ the sets compared"
        )


def images_needed(rate: float, relative_loss: float, disagreement: float = 0.0, limit: int = 100_000) -> int | None:
    """The fewest images on which a candidate that agrees with a reference of this rate, but for `disagreement` of
    the images split evenly both ways, is shown not worse within relative_loss x rate (None: more than limit)."""
    margin = relative_loss * rate
    if margin <= 0:
        return None
    low, n = 1, 16
    while not _passes(n, rate, disagreement, margin):  # double until it passes...
        if n >= limit:
            return None
        low, n = n, min(n * 2, limit)
    # ...then the first that passes above the last that failed (rounding the counts makes the bound step unevenly)
    return next(m for m in range(low + 1, n + 1) if _passes(m, rate, disagreement, margin))


def _passes(n: int, rate: float, disagreement: float, margin: float) -> bool:
    each = round(disagreement * n / 2)
    right = round(rate * n)
    both = right - each
    if both < 0 or n - both - 2 * each < 0:
        return False
    reference = np.r_[np.ones(both + each), np.zeros(n - both - each)].astype(bool)
    candidate = np.r_[np.ones(both), np.zeros(each), np.ones(each), np.zeros(n - both - 2 * each)].astype(bool)
    return paired_difference(reference, candidate)["difference_ci95"][0] >= -margin


def not_worse(measure: str, reference: np.ndarray, candidate: np.ndarray, rule: Rule) -> dict[str, Any]:
    """One measure on one set: the paired comparison, its margin, and whether the candidate is shown not worse."""
    reference, candidate = np.asarray(reference, bool), np.asarray(candidate, bool)
    if reference.shape != candidate.shape:
        raise ValueError(f"{measure}: {reference.shape} reference and {candidate.shape} candidate answers: not paired")
    relative = rule.max_relative_loss[measure]
    if not len(reference):
        return {"measure": measure, "n": 0, "not_worse": False, "better": False, "why": "no images"}
    comparison = paired_difference(reference, candidate)
    margin = relative * comparison["accuracy_reference"]
    lower = comparison["difference_ci95"][0]
    better = comparison["only_candidate_right"] > comparison["only_reference_right"]
    return {
        "measure": measure,
        "what": WHAT[measure],
        **comparison,
        "max_relative_loss": relative,
        "margin": margin,
        "lower95": lower,
        "not_worse": bool(lower >= -margin),
        "better_p": comparison["mcnemar_p"] if better else 1.0,
        "images_needed_if_all_agree": images_needed(comparison["accuracy_reference"], relative),
    }


Comparisons = Mapping[str, tuple[str, np.ndarray, np.ndarray]]  # set name -> (measure, reference, candidate)


def judge(comparisons: Comparisons, rule: Rule, *, better_on: tuple[str, ...] = ()) -> dict[str, Any]:
    """Every comparison must be shown not worse; with better_on, the candidate must also be better on at least one
    of those sets (McNemar's exact p < alpha / len(better_on)). Returns the verdict, its reason and every number."""
    if not comparisons:
        raise ValueError("a gate with nothing to compare never passes by default: no comparisons given")
    results = {name: not_worse(measure, ref, cand, rule) for name, (measure, ref, cand) in comparisons.items()}
    worse = [name for name, result in results.items() if not result["not_worse"]]
    threshold = rule.alpha / len(better_on) if better_on else None
    better = [name for name in better_on if threshold is not None and results[name].get("better_p", 1.0) < threshold]
    for name in better_on:
        results[name]["better"] = name in better
    if worse:
        reason = "not shown to be not worse on " + "; ".join(_shortfall(name, results[name]) for name in worse)
    elif better_on and not better:
        reason = f"not worse, but not better beyond the noise on {', '.join(better_on)} (McNemar p < {threshold:.3g})"
    else:
        reason = "not worse on " + ", ".join(results) + (f"; better on {', '.join(better)}" if better else "")
    return {"accepted": not worse and (not better_on or bool(better)), "reason": reason, "rule": rule.text(),
            "comparisons": results}  # fmt: skip


def _shortfall(name: str, result: dict[str, Any]) -> str:
    if not result["n"]:
        return f"{name} (no images)"
    needed = result["images_needed_if_all_agree"]
    return (
        f"{name} ({result['only_reference_right']} lost, {result['only_candidate_right']} gained on {result['n']}: "
        f"lower 95% bound {result['lower95']:+.4f} < -{result['margin']:.4f}"
        + (f"; {needed} images would be needed even with full agreement" if needed and needed > result["n"] else "")
        + ")"
    )

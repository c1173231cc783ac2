"""Confidence intervals for decisions made from counts: accuracies, rates and paired comparisons."""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.stats import binomtest

CONFIDENCE = 0.95


def interval(successes: int, n: int, method: str = "wilson") -> tuple[float, float]:
    """Two-sided 95% interval for a proportion: 'wilson' (score) or 'exact' (Clopper-Pearson)."""
    if n == 0:
        return 0.0, 1.0
    ci = binomtest(int(successes), int(n)).proportion_ci(confidence_level=CONFIDENCE, method=method)
    return float(ci.low), float(ci.high)


def proportion(successes: int, n: int) -> dict[str, Any]:
    """A rate with its count and Wilson 95% interval, as the reports state it."""
    low, high = interval(successes, n)
    return {"rate": successes / n if n else float("nan"), "count": int(successes), "n": int(n), "ci95": [low, high]}


def paired(reference: np.ndarray, candidate: np.ndarray, seed: int = 0, resamples: int = 4000) -> dict[str, Any]:
    """Candidate vs reference, right/wrong on the same photos: the accuracy difference with a paired bootstrap 95%
    interval, the discordant counts, McNemar's exact p-value, and an exact upper bound on the candidate's loss."""
    reference, candidate = np.asarray(reference, bool), np.asarray(candidate, bool)
    n = len(reference)
    only_reference = int((reference & ~candidate).sum())
    only_candidate = int((candidate & ~reference).sum())
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n, (resamples, n))
    differences = candidate[draws].mean(1) - reference[draws].mean(1)
    discordant = only_reference + only_candidate
    return {
        "n": n,
        "accuracy_reference": float(reference.mean()),
        "accuracy_candidate": float(candidate.mean()),
        "difference": float(candidate.mean() - reference.mean()),
        "difference_ci95": [float(np.quantile(differences, 0.025)), float(np.quantile(differences, 0.975))],
        "only_reference_right": only_reference,
        "only_candidate_right": only_candidate,
        "mcnemar_p": float(binomtest(only_candidate, discordant).pvalue) if discordant else 1.0,
        # the candidate loses at most the photos only the reference gets right: an exact 95% bound on that rate
        "max_loss_upper95": interval(only_reference, n, "exact")[1],
    }


def paired_difference(reference: np.ndarray, candidate: np.ndarray) -> dict[str, Any]:
    """Candidate minus reference accuracy on the same photos, with Newcombe's hybrid score 95% interval for paired
    proportions (Newcombe 1998, Statistics in Medicine 17:2635, method 10, with his continuity-corrected phi): it
    stays honest where a bootstrap is not, e.g. a handful of photos with no disagreement, which a bootstrap calls
    [0, 0]. Also the discordant counts and McNemar's exact p-value."""
    reference, candidate = np.asarray(reference, bool), np.asarray(candidate, bool)
    n = len(reference)
    both = int((reference & candidate).sum())
    only_candidate = int((candidate & ~reference).sum())
    only_reference = int((reference & ~candidate).sum())
    neither = n - both - only_candidate - only_reference
    p1, p2 = (both + only_candidate) / n, (both + only_reference) / n
    l1, u1 = interval(both + only_candidate, n)
    l2, u2 = interval(both + only_reference, n)
    margins = (
        (both + only_candidate) * (only_reference + neither) * (both + only_reference) * (only_candidate + neither)
    )
    cross = both * neither - only_candidate * only_reference
    corrected = cross - n / 2 if cross > n / 2 else min(cross, 0)
    phi = corrected / np.sqrt(margins) if margins else 0.0
    low = p1 - p2 - np.sqrt(max((p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2, 0.0))
    high = p1 - p2 + np.sqrt(max((p2 - l2) ** 2 - 2 * phi * (p2 - l2) * (u1 - p1) + (u1 - p1) ** 2, 0.0))
    discordant = only_candidate + only_reference
    return {
        "n": n,
        "accuracy_reference": p2,
        "accuracy_candidate": p1,
        "difference": p1 - p2,
        "difference_ci95": [float(max(low, -1.0)), float(min(high, 1.0))],
        "only_reference_right": only_reference,
        "only_candidate_right": only_candidate,
        "mcnemar_p": float(binomtest(only_candidate, discordant).pvalue) if discordant else 1.0,
    }

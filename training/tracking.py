"""MLflow: where runs go, what every run records, and the champion alias in the Model Registry."""

from __future__ import annotations

import os
from typing import Any

import mlflow
import numpy as np
from mlflow.tracking import MlflowClient

from training.stats import paired

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


def configure(experiment: str) -> None:
    """Tracking URI from MLFLOW_TRACKING_URI, else a local SQLite store that needs no server."""
    mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_TRACKING_URI))
    mlflow.set_experiment(experiment)


def flatten(params: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}, the shape mlflow.log_params wants."""
    flat: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


DECISION_SET = "decision_set.json"  # per-photo right/wrong on val+test, the champion is decided on
MAX_P_VALUE = 0.05


def promote_if_better(
    model_name: str, version: str, correct: dict[str, bool], data_version: str, alias: str
) -> dict[str, Any]:
    """Give `version` the alias only when it beats the current holder beyond the noise, on the same photos.

    `correct` maps each val+test photo to whether the candidate got it right (also logged as the run's
    decision_set.json). The champion must have been trained and scored on the same data version; then the two are
    compared photo by photo (McNemar's exact test on the photos only one of them gets right), and the candidate is
    promoted only when it gets more right with p < 0.05. Returns the decision with its numbers.
    """
    client = MlflowClient()
    try:
        current = client.get_model_version_by_alias(model_name, alias)
    except mlflow.exceptions.MlflowException:
        current = None
    decision: dict[str, Any] = {"photos": len(correct), "data_version": data_version}
    if current is None:
        decision.update(promoted=True, reason="no champion yet")
    else:
        champion_run = client.get_run(current.run_id)
        decision["champion_version"] = current.version
        champion_data = champion_run.data.tags.get("data_version")
        if champion_data != data_version:
            decision.update(
                promoted=False,
                reason=f"the champion was trained on data version {champion_data}: not comparable; promote by hand "
                f"(MlflowClient().set_registered_model_alias('{model_name}', '{alias}', '{version}'))",
            )
        else:
            try:
                reference = mlflow.artifacts.load_dict(f"runs:/{current.run_id}/{DECISION_SET}")["correct"]
            except Exception:
                reference = {}
            common = sorted(set(reference) & set(correct))
            if not common:
                decision.update(promoted=False, reason="the champion has no per-photo results to compare with")
            else:
                comparison = paired(np.array([reference[k] for k in common]), np.array([correct[k] for k in common]))
                better = comparison["only_candidate_right"] > comparison["only_reference_right"]
                promoted = better and comparison["mcnemar_p"] < MAX_P_VALUE
                decision.update(
                    promoted=promoted,
                    comparison=comparison,
                    reason="better beyond the noise (McNemar p < 0.05)"
                    if promoted
                    else "not better beyond the noise (needs more photos right with McNemar p < 0.05)",
                )
    if decision["promoted"]:
        client.set_registered_model_alias(model_name, alias, version)
    return decision

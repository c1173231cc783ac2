"""MLflow: where runs go, what every run records, and the champion alias in the Model Registry."""

from __future__ import annotations

import os
from typing import Any

import mlflow
from mlflow.tracking import MlflowClient

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


def promote_if_better(model_name: str, version: str, accuracy: float, alias: str) -> bool:
    """Give `version` the alias when its test accuracy beats the current holder's (or there is none)."""
    client = MlflowClient()
    try:
        current = client.get_model_version_by_alias(model_name, alias)
    except mlflow.exceptions.MlflowException:
        current = None
    if current is not None:
        best = client.get_run(current.run_id).data.metrics.get("test_accuracy", float("-inf"))
        if accuracy <= best:
            return False
    client.set_registered_model_alias(model_name, alias, version)
    return True

"""MLflow: where runs go, what every run records, and the champion alias in the Model Registry (what production
runs; the champion decision itself is loop/champion.py's)."""

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


# the prepared data a registered model trained on (its split and sha256 per photo), logged by training.train: the
# champion decision leaves out the evaluation photos the production model trained on (loop/champion.py);
# "retrain/manifest.csv" is where make retrain logged it before
MANIFESTS = ("data/manifest.csv", "retrain/manifest.csv")


def champion_version(client: MlflowClient, registered: str, alias: str) -> str | None:
    """The version holding the alias, or None when the registry says there is none yet; any other MLflow error is
    raised: a registry that cannot be read must never look like "no production model"."""
    try:
        model = client.get_registered_model(registered)
    except mlflow.exceptions.MlflowException as error:
        if error.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    version = model.aliases.get(alias)
    return str(version) if version is not None else None

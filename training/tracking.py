"""MLflow: where runs go, what every run records, and the champion alias in the Model Registry."""

from __future__ import annotations

import os
from typing import Any

import mlflow
import numpy as np
from mlflow.tracking import MlflowClient

from training import gates

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


def champion_version(client: MlflowClient, registered: str, alias: str) -> str | None:
    """The version holding the alias, or None when the registry says there is none yet; any other MLflow error is
    raised: a registry that cannot be read must never look like "no champion", which would promote untested."""
    try:
        model = client.get_registered_model(registered)
    except mlflow.exceptions.MlflowException as error:
        if error.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    version = model.aliases.get(alias)
    return str(version) if version is not None else None


def decision_set(client: MlflowClient, run_id: str) -> dict[str, bool] | None:
    """A run's per-photo results (DECISION_SET), or None when the run logged none; a registry or artifact store that
    cannot be read raises."""
    if DECISION_SET not in {artifact.path for artifact in client.list_artifacts(run_id)}:
        return None
    return dict(mlflow.artifacts.load_dict(f"runs:/{run_id}/{DECISION_SET}")["correct"])


def promote_if_better(
    model_name: str, version: str, correct: dict[str, bool], data_version: str, alias: str, rule: gates.Rule
) -> dict[str, Any]:
    """Give `version` the alias only when training.gates' rule says so against the current holder, on the same photos.

    `correct` maps each val+test photo to whether the candidate got it right (also logged as the run's
    decision_set.json). The champion must have been trained and scored on the same data version; then the two are
    compared photo by photo: the candidate must be shown not worse (the paired interval within the margin) and
    better (McNemar's exact test on the photos only one of them gets right). The pet rates are judged where the
    pet threshold exists, at export (the int8 and mirror gates) and in make retrain. Returns the decision.
    """
    client = MlflowClient()
    current = champion_version(client, model_name, alias)
    decision: dict[str, Any] = {"photos": len(correct), "data_version": data_version}
    if current is None:
        decision.update(promoted=True, reason="no champion yet (the registry has no alias " + repr(alias) + ")")
    else:
        champion_run = client.get_run(client.get_model_version(model_name, current).run_id)
        decision["champion_version"] = current
        champion_data = champion_run.data.tags.get("data_version")
        reference = decision_set(client, champion_run.info.run_id)
        common = sorted(set(reference or {}) & set(correct))
        if champion_data != data_version:
            decision.update(
                promoted=False,
                reason=f"the champion was trained on data version {champion_data}: not comparable; promote by hand "
                f"(MlflowClient().set_registered_model_alias('{model_name}', '{alias}', '{version}'))",
            )
        elif not common:
            decision.update(promoted=False, reason="the champion has no per-photo results to compare with")
        else:
            name = "accuracy: val+test"
            verdict = gates.judge(
                {name: ("accuracy", np.array([reference[k] for k in common]), np.array([correct[k] for k in common]))},
                rule,
                better_on=(name,),
            )
            decision.update(promoted=verdict["accepted"], reason=verdict["reason"], gate=verdict)
    if decision["promoted"]:
        client.set_registered_model_alias(model_name, alias, version)
    return decision

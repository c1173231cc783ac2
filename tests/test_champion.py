"""The one champion rule as `make export` runs it (python -m loop.champion): the served file in models/ decided
against what production runs on every protected measure, the `candidate` alias or a refusal, never `champion`."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import mlflow
import pytest
import yaml
from mlflow.tracking import MlflowClient

from export.convert import write_metadata
from loop import champion
from server.model_file import read_metadata
from tests.conftest import ROOT, SHARED, photos
from training import tracking

NAME = yaml.safe_load((ROOT / "params.yaml").read_text())["mlflow"]["registered_model"]


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    """params.yaml with a small non-pet pool, val/ and test/ photos, a fresh MLflow store; the working directory."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)
    not_pets = tmp_path / "not-pets"
    not_pets.mkdir()
    for path in sorted((SHARED / "datasets" / "not-pets-dev").glob("*.jpg"))[:6]:
        shutil.copyfile(path, not_pets / path.name)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["pet"].update(not_pets_dir=str(not_pets), synthetic_per_kind=1)
    params["data"]["processed_dir"] = str(tmp_path / "data")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    for split, start in (("val", 1), ("test", 3)):
        for label in ("cat", "dog"):
            (tmp_path / "data" / split / label).mkdir(parents=True)
            for photo in photos(label, 2, start):
                shutil.copyfile(photo, tmp_path / "data" / split / label / photo.name)
    tracking.configure("champion-test")
    yield tmp_path
    mlflow.end_run()


def exported(onnx_model: Path, models: Path) -> str:
    """models/model.onnx as make train + make export leave it: the next registered version, its run holding the file
    under onnx/ (the served_model tag absent: float32); the version."""
    client = MlflowClient()
    if not client.search_registered_models(f"name='{NAME}'"):
        client.create_registered_model(NAME)
    version = str(len(client.search_model_versions(f"name='{NAME}'")) + 1)
    models.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(onnx_model, models / "model.onnx")
    write_metadata(models / "model.onnx", {**read_metadata(onnx_model), "model_version": f"{NAME}-v{version}"})
    with mlflow.start_run() as run:
        mlflow.log_artifact(str(models / "model.onnx"), artifact_path="onnx")
    client.create_model_version(NAME, f"runs:/{run.info.run_id}/onnx", run_id=run.info.run_id)
    return version


def decide(*args: str) -> dict:
    return champion.main(["--params", "params.yaml", "--work", "work", *args])


def aliases() -> dict[str, str]:
    return {alias: str(version) for alias, version in MlflowClient().get_registered_model(NAME).aliases.items()}


def test_the_first_model_is_refused_without_a_bootstrap_and_never_made_champion(project, onnx_model, capsys):
    """A fresh registry (make train export on a new clone): no production model, so no silent pass."""
    version = exported(onnx_model, project / "models")
    record = decide()
    assert record["candidate"] is None and record["decided_against"] == "none" and not aliases()
    assert "no production model to compare with: refused" in capsys.readouterr().out
    bootstrapped = decide("--bootstrap")
    assert bootstrapped["candidate"] == version and aliases() == {"candidate": version}
    assert MlflowClient().get_model_version(NAME, version).tags["decided_against"] == "none"


def test_the_served_file_is_decided_against_production_on_every_measure(project, onnx_model, tmp_path):
    """make export's decision: the served ONNX answers of both models, accuracy, pets kept and non-pets flagged, against
    the version production runs (the champion alias, or --production); the alias `champion` never moves."""
    running = exported(onnx_model, tmp_path / "deployed")
    MlflowClient().set_registered_model_alias(NAME, "champion", running)
    challenger = exported(onnx_model, project / "models")
    record = decide()
    decision = record["decision"]
    assert record["decided_against"] == record["production"]["version"] == running
    assert {e["measure"] for e in decision["evaluations"].values()} == {"accuracy", "pets_kept", "not_pets_flagged"}
    assert decision["evaluated"] == {"val+test": 8}
    assert decision["evaluations"]["non-pets flagged: pooled non-pets"]["n"] > 6  # the pool and generated images
    assert not decision["promoted"] and record["candidate"] is None  # the same answers: not better, and too few
    assert aliases() == {"champion": running}
    assert MlflowClient().get_model_version(NAME, challenger).tags["decision"] == "refused"
    with pytest.raises(SystemExit, match=f"production runs v{running}: --bootstrap is only for the first model"):
        decide("--bootstrap")
    assert decide("--production", "none")["decided_against"] == "none"  # told production runs nothing: refused
    assert aliases() == {"champion": running}
    decide("--production", "none", "--bootstrap")  # (say production's record was lost): a candidate, against none
    assert aliases() == {"champion": running, "candidate": challenger}
    decide()  # decided again against what runs: refused, and the candidate alias it held goes
    assert aliases() == {"champion": running}
    assert MlflowClient().get_model_version(NAME, challenger).tags["decided_against"] == running


def test_a_registry_that_cannot_be_read_is_an_error_not_no_production_model(monkeypatch, tmp_path):
    """An MLflow server that does not answer must stop the decision: taken for "no production model" it would refuse
    where it should compare, and with --bootstrap it would make an untested candidate."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    mlflow.set_tracking_uri("http://127.0.0.1:9")  # the discard port: nothing listens
    try:
        with pytest.raises(Exception, match=r"(?i)connect|refused|max retries"):
            champion.production_version(MlflowClient(), NAME, None, "champion", bootstrap=True)
    finally:
        mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")


def test_the_decision_records_the_file_it_judged_and_cd_ships_only_that_file(project, onnx_model, tmp_path):
    """The decision's tags name the sha256 of the served file it judged, written before the candidate alias; an export
    of the same checkpoint again (its onnx/* logged to the same run) changes the served file, and CD, told the sha256
    of the file it ships, refuses it until the version is decided again."""
    from deploy.model_release import check_decided_against, release

    version = exported(onnx_model, project / "models")
    decide("--bootstrap")
    judged = hashlib.sha256((project / "models" / "model.onnx").read_bytes()).hexdigest()
    assert MlflowClient().get_model_version(NAME, version).tags["decided_sha256"] == judged
    shipped = release(NAME, tmp_path / "release", version=version)["sha256"]
    assert "made a candidate against no model" in check_decided_against(NAME, version, "none", shipped)
    changed = project / "again" / "model.onnx"  # the same checkpoint exported again, logged to the same run
    changed.parent.mkdir()
    shutil.copyfile(project / "models" / "model.onnx", changed)
    write_metadata(changed, {**read_metadata(changed), "exported": "again"})
    MlflowClient().log_artifact(MlflowClient().get_model_version(NAME, version).run_id, str(changed), "onnx")
    shipped = release(NAME, tmp_path / "release", version=version)["sha256"]
    with pytest.raises(SystemExit, match=f"decided on the served file {judged} but the file to ship is {shipped}"):
        check_decided_against(NAME, version, "none", shipped)
    shutil.copyfile(changed, project / "models" / "model.onnx")  # what make export leaves in models/ now
    decide("--bootstrap")  # decided again: on the file CD ships
    assert MlflowClient().get_model_version(NAME, version).tags["decided_sha256"] == shipped
    assert "made a candidate against no model" in check_decided_against(NAME, version, "none", shipped)


def test_a_decision_cut_short_leaves_no_candidate_beside_its_new_record(project, onnx_model, tmp_path, monkeypatch):
    """v2 was made the candidate against no model; decided again against v1, the process dies before it records the
    verdict: the tags must not say candidate against v1 (the old verdict beside the new decided_against), which CD,
    with production on v1, would deploy."""
    from deploy.model_release import check_decided_against, release

    running = exported(onnx_model, tmp_path / "deployed")
    challenger = exported(onnx_model, project / "models")
    decide("--production", "none", "--bootstrap")
    MlflowClient().set_registered_model_alias(NAME, "champion", running)
    tag = MlflowClient.set_model_version_tag

    def killed_before_the_verdict(self, name, version, key, value):
        if key == "decision" and value in ("candidate", "refused"):
            raise KeyboardInterrupt("killed")
        return tag(self, name, version, key, value)

    monkeypatch.setattr(MlflowClient, "set_model_version_tag", killed_before_the_verdict)
    with pytest.raises(KeyboardInterrupt):
        decide()
    monkeypatch.setattr(MlflowClient, "set_model_version_tag", tag)
    tags = MlflowClient().get_model_version(NAME, challenger).tags
    assert not (tags["decision"] == "candidate" and tags["decided_against"] == running), tags
    shipped = release(NAME, tmp_path / "release", version=challenger)["sha256"]
    with pytest.raises(SystemExit, match=f"v{challenger} is no candidate"):
        check_decided_against(NAME, challenger, running, shipped)

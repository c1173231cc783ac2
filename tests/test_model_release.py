"""The deployed model is chosen explicitly from a real MLflow registry (SQLite store, local artifacts)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from deploy import model_release


@pytest.fixture
def registry(onnx_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Two registered versions of catsdogs-mobilenetv2, each run holding onnx/model.onnx and no served_model tag (as
    before int8 was served); version 1 is champion."""
    import mlflow
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = mlflow.create_experiment("catsdogs", artifact_location=(tmp_path / "artifacts").as_uri())
    client, name = MlflowClient(), model_release.registry_defaults()[0]
    client.create_registered_model(name)
    runs = {}
    for version, payload in (("1", onnx_model.read_bytes()), ("2", b"a later, different file")):
        with mlflow.start_run(experiment_id=experiment) as run:
            staged = tmp_path / version / "model.onnx"
            staged.parent.mkdir()
            staged.write_bytes(payload)
            mlflow.log_artifact(str(staged), artifact_path="onnx")
        client.create_model_version(name, source=f"{run.info.artifact_uri}/onnx", run_id=run.info.run_id)
        runs[version] = run.info.run_id
    client.set_registered_model_alias(name, "champion", "1")
    return runs


def test_the_champion_is_downloaded_and_pinned_by_sha256(registry, onnx_model, tmp_path):
    env = tmp_path / "model.env"
    model_release.main(["--out", str(tmp_path / "release"), "--env-out", str(env),
                        "--url-template", "https://models.example.com/{run_id}/model.onnx"])  # fmt: skip
    sha256 = hashlib.sha256(onnx_model.read_bytes()).hexdigest()
    record = json.loads((tmp_path / "release" / "release.json").read_text())
    assert record["version"] == "1" and record["alias"] == "champion" and record["run_id"] == registry["1"]
    assert record["sha256"] == sha256
    assert (tmp_path / "release" / "model.onnx").read_bytes() == onnx_model.read_bytes()
    lines = dict(line.split("=", 1) for line in env.read_text().splitlines() if not line.startswith("#"))
    assert lines == {"MODEL_VERSION": "catsdogs-mobilenetv2-v1", "MODEL_SHA256": sha256,
                     "MODEL_URL": f"https://models.example.com/{registry['1']}/model.onnx"}  # fmt: skip


def test_a_pinned_version_overrides_the_champion(registry, tmp_path):
    model_release.main(["--version", "2", "--out", str(tmp_path)])
    record = json.loads((tmp_path / "release.json").read_text())
    assert record["version"] == "2" and record["alias"] is None and record["run_id"] == registry["2"]
    assert record["sha256"] == hashlib.sha256(b"a later, different file").hexdigest()


def register_int8_run(onnx_model: Path, int8_model: Path, tmp_path: Path, served: str) -> str:
    """Version 3: a run as `make export` leaves it, with both files under onnx/ and the served_model tag."""
    import mlflow
    from mlflow.tracking import MlflowClient

    with mlflow.start_run(experiment_id=mlflow.get_experiment_by_name("catsdogs").experiment_id) as run:
        mlflow.log_artifact(str(onnx_model), artifact_path="onnx")
        mlflow.log_artifact(str(int8_model), artifact_path="onnx")
        mlflow.set_tag("served_model", served)
    client, name = MlflowClient(), model_release.registry_defaults()[0]
    client.create_model_version(name, source=f"{run.info.artifact_uri}/onnx", run_id=run.info.run_id)
    return run.info.run_id


def test_the_file_the_run_serves_is_released_as_model_onnx(registry, onnx_model, int8_model, tmp_path):
    run_id = register_int8_run(onnx_model, int8_model, tmp_path, "model.int8.onnx")
    env = tmp_path / "model.env"
    model_release.main(["--version", "3", "--out", str(tmp_path / "release"), "--env-out", str(env),
                        "--url-template", "https://mlflow.example.com/{run_id}/artifacts/{artifact}"])  # fmt: skip
    record = json.loads((tmp_path / "release" / "release.json").read_text())
    assert record["artifact"] == "onnx/model.int8.onnx" and record["precision"] == "int8"
    assert record["run_id"] == run_id and record["sha256"] == hashlib.sha256(int8_model.read_bytes()).hexdigest()
    assert (tmp_path / "release" / "model.onnx").read_bytes() == int8_model.read_bytes()
    assert f"MODEL_URL=https://mlflow.example.com/{run_id}/artifacts/onnx/model.int8.onnx" in env.read_text()
    # a template that names the float32 file would pin int8's sha256 to another file's URL
    with pytest.raises(SystemExit, match=r"write \{artifact\}"):
        model_release.main(["--version", "3", "--out", str(tmp_path / "again"), "--env-out", str(env),
                            "--url-template", "https://m.example.com/{run_id}/onnx/model.onnx"])  # fmt: skip
    with pytest.raises(SystemExit, match=r"names model\.onnx"):  # however the template spells the path
        model_release.main(["--version", "3", "--out", str(tmp_path / "again"), "--env-out", str(env),
                            "--url-template", "https://s.example.com/{version}/model.onnx?x=1"])  # fmt: skip
    with pytest.raises(SystemExit, match=r"names model\.onnx"):  # MLflow's get-artifact names it in the query
        model_release.main(["--version", "3", "--out", str(tmp_path / "again"), "--env-out", str(env),
                            "--url-template", "{mlflow}/get-artifact?path=onnx/model.onnx&r={run_id}"])  # fmt: skip


def test_a_run_that_serves_float32_releases_it_beside_an_int8_file(registry, onnx_model, int8_model, tmp_path):
    register_int8_run(onnx_model, int8_model, tmp_path, "model.onnx")  # the int8 gate refused a later export
    model_release.main(["--version", "3", "--out", str(tmp_path)])
    record = json.loads((tmp_path / "release.json").read_text())
    assert record["artifact"] == "onnx/model.onnx" and record["precision"] == "float32"
    assert record["sha256"] == hashlib.sha256(onnx_model.read_bytes()).hexdigest()


def test_a_run_without_the_tag_releases_float32(registry, tmp_path):
    model_release.main(["--out", str(tmp_path)])
    record = json.loads((tmp_path / "release.json").read_text())
    assert record["artifact"] == "onnx/model.onnx" and record["precision"] == "float32"


def test_an_unknown_served_model_tag_is_refused_by_name(registry, onnx_model, int8_model, tmp_path):
    register_int8_run(onnx_model, int8_model, tmp_path, "model.fp16.onnx")
    with pytest.raises(SystemExit, match=r"Invalid served_model='model\.fp16\.onnx'.*Only model\.onnx, model\.int8"):
        model_release.main(["--version", "3", "--out", str(tmp_path)])


def test_the_registry_follows_production_through_a_deploy_a_failed_one_and_a_rollback(registry, capsys):
    """The alias before and after: retrain's winner is only a candidate; a failed CD moves nothing; a deploy that
    passed its checks makes it champion; a rollback (CD, after bluegreen.sh rollback) moves champion back."""
    from mlflow.tracking import MlflowClient

    client, name = MlflowClient(), model_release.registry_defaults()[0]

    def aliases() -> dict[str, str | None]:
        return {alias: model_release.alias_version(client, name, alias) for alias in ("champion", "candidate")}

    client.set_registered_model_alias(name, "candidate", "2")  # make retrain: v2 won against champion v1
    assert aliases() == {"champion": "1", "candidate": "2"}  # a CD that fails its checks never calls --follow
    model_release.main(["--follow", "2"])  # CD: v2 deployed, smoke test, evaluation and public switch passed
    assert json.loads(capsys.readouterr().out) == {"registered_model": name, "alias": "champion", "before": "1",
                                                   "after": "2", "candidate_cleared": True}  # fmt: skip
    assert aliases() == {"champion": "2", "candidate": None}
    model_release.main(["--follow", f"{name}-v1"])  # a rollback: production runs v1 again (its release record)
    assert aliases() == {"champion": "1", "candidate": None}
    with pytest.raises(Exception, match=r"not found|does not exist|RESOURCE_DOES_NOT_EXIST"):
        model_release.main(["--follow", "9"])  # no such version: an error, the alias stays
    assert aliases()["champion"] == "1"


def test_a_candidate_set_while_follow_clears_the_deployed_one_is_kept(registry, monkeypatch):
    """follow reads `candidate`, then deletes it: a decision that makes v3 the candidate in between (its decision tag
    first, then the alias) must not lose it to the deploy of v2."""
    import mlflow
    from mlflow.tracking import MlflowClient

    client, name = MlflowClient(), model_release.registry_defaults()[0]
    # the fixture's experiment by name: an earlier test's mlflow.set_experiment (tests/test_champion.py) stays active
    with mlflow.start_run(experiment_id=mlflow.get_experiment_by_name("catsdogs").experiment_id) as run:
        pass
    client.create_model_version(name, source=f"{run.info.artifact_uri}/onnx", run_id=run.info.run_id)  # v3
    client.set_registered_model_alias(name, "candidate", "2")
    read = model_release.alias_version

    def read_then_decide(client_, registered, alias):  # the other process's decision lands right after the read
        found = read(client_, registered, alias)
        if alias == "candidate" and found == "2":
            client.set_model_version_tag(name, "3", model_release.DECISION, "candidate")
            client.set_registered_model_alias(name, "candidate", "3")
        return found

    monkeypatch.setattr(model_release, "alias_version", read_then_decide)
    model_release.follow(name, "2", "champion", "candidate")
    monkeypatch.setattr(model_release, "alias_version", read)
    assert read(client, name, "champion") == "2" and read(client, name, "candidate") == "3"


SHA256 = {"1": None, "2": hashlib.sha256(b"a later, different file").hexdigest()}  # v1's: the onnx_model fixture's


def decided(version: str, against: str | None, decision: str | None, sha256: str | None = None) -> None:
    """The champion decision's record on a registered version (loop/champion.py writes it), with the sha256 of the
    served file it judged."""
    from mlflow.tracking import MlflowClient

    client, name = MlflowClient(), model_release.registry_defaults()[0]
    tags = ((model_release.DECIDED_AGAINST, against), (model_release.DECISION, decision),
            ("decided_sha256", sha256))  # fmt: skip
    for key, value in tags:
        if value is not None:
            client.set_model_version_tag(name, version, key, value)


def test_cd_deploys_only_a_candidate_decided_against_what_production_runs(registry, onnx_model, capsys):
    """The check CD runs before it deploys: v2 was made the candidate against v1; production runs v1 (deploy), v3
    (the alias lagged: refused), nothing (refused: a first deploy needs a bootstrapped candidate)."""
    check = ["--version", "2", "--sha256", SHA256["2"], "--check-decided-against"]
    decided("2", "1", "candidate", SHA256["2"])
    model_release.main([*check, "1"])
    assert "v2 was made a candidate against v1" in capsys.readouterr().out
    model_release.main([*check, "catsdogs-mobilenetv2-v1"])  # as current.json's release records it
    with pytest.raises(
        SystemExit,
        match=r"v2 was decided against v1 but production runs v3: refused; decide it "
        r"against what production runs \(python -m loop\.champion --version 2 --production 3",
    ):
        model_release.main([*check, "3"])
    with pytest.raises(SystemExit, match=r"production runs no model \(a first deploy\).*--bootstrap"):
        model_release.main([*check, "none"])
    model_release.main(["--version", "1", "--check-decided-against", "1"])  # a redeploy of what runs: no decision
    v1 = ["--version", "1", "--sha256", hashlib.sha256(onnx_model.read_bytes()).hexdigest()]
    with pytest.raises(SystemExit, match=r"v1 is no candidate \(its decision: none recorded\)"):
        model_release.main([*v1, "--check-decided-against", "2"])
    decided("1", "none", "refused", v1[-1])
    with pytest.raises(SystemExit, match=r"v1 is no candidate \(its decision: refused, against none\)"):
        model_release.main([*v1, "--check-decided-against", "none"])
    decided("1", "none", "candidate", v1[-1])  # bootstrapped: the first deploy
    model_release.main([*v1, "--check-decided-against", "none"])
    assert "v1 was made a candidate against no model" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="needs --version"):
        model_release.main(["--check-decided-against", "1"])


def test_cd_deploys_only_the_file_the_decision_judged(registry, tmp_path, capsys):
    """The decision judged one served file (decided_sha256); the run's served file can change after it (an export of
    the same checkpoint again logs onnx/* to the same run): CD refuses to ship a file the rule never compared, a
    decision that recorded no file, and a check not told which file it ships; a redeploy of what runs is not
    checked."""
    from mlflow.tracking import MlflowClient

    decided("2", "1", "candidate", SHA256["2"])
    shipped = model_release.release(model_release.registry_defaults()[0], tmp_path / "before", version="2")["sha256"]
    model_release.main(["--version", "2", "--sha256", shipped, "--check-decided-against", "1"])
    assert "v2 was made a candidate against v1" in capsys.readouterr().out
    again = tmp_path / "again" / "model.onnx"  # exported again after the decision: another served file
    again.parent.mkdir()
    again.write_bytes(b"the same checkpoint, exported again")
    MlflowClient().log_artifact(registry["2"], str(again), "onnx")
    shipped = model_release.release(model_release.registry_defaults()[0], tmp_path / "after", version="2")["sha256"]
    assert shipped != SHA256["2"]
    with pytest.raises(SystemExit, match=rf"v2 was decided on the served file {SHA256['2']} but the file to ship is "
                       rf"{shipped}: .*: refused; decide it again against what production runs "
                       r"\(python -m loop\.champion --version 2 --production 1"):  # fmt: skip
        model_release.main(["--version", "2", "--sha256", shipped, "--check-decided-against", "1"])
    with pytest.raises(SystemExit, match=r"needs --sha256"):  # told nothing of the file: refused
        model_release.main(["--version", "2", "--check-decided-against", "1"])
    decided("2", "1", "candidate")
    MlflowClient().delete_model_version_tag(model_release.registry_defaults()[0], "2", "decided_sha256")
    with pytest.raises(SystemExit, match=r"v2's decision records no decided_sha256.*refused; decide it again"):
        model_release.main(["--version", "2", "--sha256", shipped, "--check-decided-against", "1"])
    model_release.main(["--version", "2", "--check-decided-against", "2"])  # a redeploy of what runs: unchecked
    assert "a redeploy, no decision needed" in capsys.readouterr().out

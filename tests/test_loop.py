"""The whole feedback loop on a small budget: a first model trained, exported, bootstrapped and deployed (the
champion), a real service keeping photos and feedback, photos replayed and corrected through the real API, harvest,
a short retrain, a challenger registered and decided against what production runs by params.yaml's rule."""

from __future__ import annotations

import csv
import json

import mlflow
import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient

from loop import demo
from loop.retrain import RECENT, Rule, is_recent
from tests.conftest import ROOT, photos
from training import gates


def table(evaluation: dict) -> tuple[np.ndarray, np.ndarray]:
    """(champion right, challenger right) photo by photo, rebuilt from a recorded evaluation's counts."""
    only_champion, only_challenger = evaluation["only_reference_right"], evaluation["only_candidate_right"]
    both = round(evaluation["accuracy_reference"] * evaluation["n"]) - only_champion
    neither = evaluation["n"] - both - only_champion - only_challenger
    champion = [True] * (both + only_champion) + [False] * (only_challenger + neither)
    challenger = [True] * both + [False] * only_champion + [True] * only_challenger + [False] * neither
    return np.array(champion), np.array(challenger)


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """A project of its own: params for a short run, its MLflow store, the working directory its artifacts use."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["train"].update(batch_size=8, num_workers=0)
    params["train"]["baseline"].update(epochs=2, patience=1)
    params["train"]["final"].update(epochs=1)
    params["export"].update(min_accuracy=0.5)  # a dozen evaluation photos: the 95% gate needs hundreds
    params["pet"].update(not_pets_dir=str((ROOT / params["pet"]["not_pets_dir"]).resolve()), synthetic_per_kind=2)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    yield tmp_path
    mlflow.end_run()


@pytest.mark.slow
def test_feedback_through_the_service_becomes_a_challenger_and_a_recorded_decision(workspace, weights):
    params = workspace / "params.yaml"
    original = [(p, p.parent.name[:-1]) for p in photos("cat", 30) + photos("dog", 30)]
    # production: new photos, and one the original data already has
    traffic = [(p, p.parent.name[:-1]) for p in photos("cat", 20, 100) + photos("dog", 20, 100) + photos("cat", 1)]
    summary = demo.run(workspace, original, traffic, params, str(weights), mislabel_share=0.1, storage_cap=400_000)

    client, registered = MlflowClient(), yaml.safe_load(params.read_text())["mlflow"]["registered_model"]
    sent = summary["replay"]
    assert sent["photos"] == sent["predicted"] == sent["feedback 200"] == 41, sent
    assert 0 < summary["feedback_images"]["peak_bytes"] <= summary["feedback_images"]["cap_bytes"]
    capped = summary["feedback_images"]["small_cap"]  # the same 41 photos (1.5 MB) into a 400 kB folder
    assert 0 < capped["peak_bytes"] <= capped["cap_bytes"] == 400_000 and capped["photos_kept"] < 41, capped
    harvested = summary["harvest"]["this_run"]
    assert harvested["used"] + sum(harvested["held_for_review"].values()) + sum(harvested["left_out"].values()) == 41
    assert harvested["used"] >= 30, harvested

    report = summary["retrain"]
    assert report == json.loads((workspace / "reports" / "retrain.json").read_text())
    assert report["data_versions"]["feedback_dvc_md5"].endswith(".dir")  # the harvest is a DVC data version
    feedback = workspace / "data" / "feedback"
    counts = report["counts"]
    assert counts["harvested"]["train"] + counts["harvested"].get(RECENT, 0) + len(report["left_out_photos"]) == len(
        list(feedback.glob("*/*"))
    )
    assert counts["evaluated"] == {"original": counts["original"].get("val", 0) + counts["original"].get("test", 0),
                                   "recent": counts["harvested"].get(RECENT, 0)}  # fmt: skip
    rule = Rule.from_params(params)
    with (workspace / "build" / "retrain" / "data" / "manifest.csv").open() as handle:
        assembled = list(csv.DictReader(handle))
    for row in assembled:  # every harvested photo on the side its hash puts it, never in an evaluation split
        if row["source"].startswith("feedback/"):
            assert row["split"] == (
                RECENT if is_recent(row["sha256"], rule.recent_share, rule.recent_salt) else "train"
            )

    challenger = client.get_model_version_by_alias(registered, "challenger")
    assert str(challenger.version) == report["challenger"]["version"] == "2"
    run = client.get_run(challenger.run_id)
    assert run.data.tags["retrain"] == "true" and run.data.tags["data_version"] == report["data_versions"]["assembled"]
    assert "onnx/model.onnx" in {a.path for a in client.list_artifacts(run.info.run_id, "onnx")}  # what CD ships

    decision = report["decision"]
    assert report["production"]["version"] == report["decided_against"] == "1"  # the bootstrapped, deployed v1
    for name in ("original", "recent"):
        assert decision["evaluations"][f"accuracy: {name}"]["n"] == counts["evaluated"][name]
    assert decision["evaluations"]["non-pets flagged: pooled non-pets"]["n"] > 0  # the pet rates are judged too
    recomputed = gates.judge(
        {name: (e["measure"], *table(e)) for name, e in decision["evaluations"].items()},
        rule.gates,
        better_on=("accuracy: original", "accuracy: recent"),
    )  # from the counts
    assert recomputed["accepted"] == decision["promoted"] and recomputed["reason"] == decision["reason"]
    champion = str(client.get_model_version_by_alias(registered, "champion").version)
    assert champion == report["champion_after"] == "1"  # champion is what production runs: CD moves it, not retrain
    assert report["candidate"] == ("2" if decision["promoted"] else None)

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from training import cv, tracking, train
from training.config import load_params
from training.data import prepare
from training.model import build_model, freeze_backbone, set_train_mode

ROOT = Path(__file__).resolve().parents[1]


def small_params(tmp_path: Path, **final: object) -> Path:
    """params.yaml with one short epoch per stage, so a real run takes seconds."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["train"].update(batch_size=8, num_workers=0)
    raw["train"]["baseline"].update(epochs=2, patience=1)
    raw["train"]["final"].update(epochs=1, unfreeze_blocks=2, **final)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)  # artifacts land under tmp_path/mlruns
    yield uri
    mlflow.end_run()


@pytest.mark.slow
def test_short_real_training_run_logs_both_runs_and_writes_checkpoints(make_raw, tmp_path, weights, mlflow_store):
    params_path = small_params(tmp_path)
    params = load_params(params_path)
    processed = tmp_path / "processed"
    prepare(make_raw(per_class=30), processed, tmp_path / "reports", labels=("cat", "dog"),
            fractions=params.data.split, salt=params.data.split_salt, preprocess=params.preprocess)  # fmt: skip
    out, reports = tmp_path / "models", tmp_path / "reports"
    train.main(["--params", str(params_path), "--data", str(processed), "--pretrained", str(weights),
                "--out-dir", str(out), "--reports-dir", str(reports)])  # fmt: skip

    for stage in ("baseline", "final"):
        checkpoint = torch.load(out / f"{stage}.pt", weights_only=False)
        assert checkpoint["preprocess"]["labels"] == ["cat", "dog"]
        assert checkpoint["preprocess"]["input_size"] == 224
        assert len(checkpoint["data_version"]) == 64 and checkpoint["git_commit"]
        model = build_model(2, str(weights))
        model.load_state_dict(checkpoint["state_dict"])
        report = json.loads((reports / f"{stage}.json").read_text())
        assert 0.5 < report["accuracy"] <= 1.0  # ImageNet features separate cats from dogs even in 2 epochs
        assert report["run_id"] == checkpoint["run_id"]
        assert report["hflip_average"] is checkpoint["hflip_average"] is params.train.hflip_average
        assert 0.5 < report["single_view_accuracy"] <= 1.0

    client = MlflowClient(mlflow_store)
    experiment = client.get_experiment_by_name(params.mlflow.experiment)
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {"baseline", "final"}
    for name, run in runs.items():
        metrics = run.data.metrics
        for key in ("train_loss", "val_accuracy", "test_accuracy", "test_precision", "test_recall", "test_f1"):
            assert key in metrics, (name, key)
        assert run.data.tags["data_version"] and run.data.tags["git_commit"]
        assert run.data.params["stage.lr"]
        history = client.get_metric_history(run.info.run_id, "val_accuracy")
        assert [m.step for m in history] == list(range(1, len(history) + 1))
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert "confusion_matrix.png" in artifacts
    final = client.get_model_version(params.mlflow.registered_model, "1")
    assert final.run_id == runs["final"].info.run_id  # registered, and no alias: the decision comes after export
    assert not client.get_registered_model(params.mlflow.registered_model).aliases
    assert "pet_head" in torch.load(out / "final.pt", weights_only=False)


def test_make_train_registers_the_final_model_and_moves_no_alias(make_raw, tmp_path, weights, mlflow_store,
                                                                 monkeypatch):  # fmt: skip
    """make train decides nothing: the champion rule judges the exported, served file (loop/champion.py), and
    `champion` is what production runs. The final model is registered with the manifest of what it trained on."""
    params = load_params(small_params(tmp_path))
    processed = tmp_path / "processed"
    prepare(make_raw(per_class=30), processed, tmp_path / "reports", labels=("cat", "dog"),
            fractions=params.data.split, salt=params.data.split_salt, preprocess=params.preprocess)  # fmt: skip
    monkeypatch.setattr(train, "fit", lambda *args, **kwargs: [])  # what is registered is under test, not learning
    tracking.configure(params.mlflow.experiment)  # as train.main does: this test's store, whatever ran before
    report = train.train_stage("final", params, processed, str(weights), tmp_path / "models")
    client = MlflowClient(mlflow_store)
    assert report["registered_version"] == 1 and report["model_version"] == f"{params.mlflow.registered_model}-v1"
    assert not {"champion", "champion_decision"} & set(report)
    assert not client.get_registered_model(params.mlflow.registered_model).aliases
    assert [a.path for a in client.list_artifacts(report["run_id"], "data")] == ["data/manifest.csv"]


def test_the_committed_final_report_is_what_a_fresh_run_writes():
    """README's quick start on a fresh clone registers v1 and decides nothing in make train."""
    report = json.loads((ROOT / "reports" / "final.json").read_text())
    assert report["registered_version"] == 1 and report["model_version"] == "catsdogs-mobilenetv2-v1"
    assert not {"champion", "champion_decision"} & set(report)


def test_missing_or_unreadable_weights_are_errors_not_random_init(tmp_path):
    with pytest.raises(FileNotFoundError, match="pretrained weights not found"):
        build_model(2, str(tmp_path / "missing.pt"))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read pretrained weights"):
        build_model(2, str(junk))


def test_freezing_keeps_only_head_and_last_blocks_trainable_with_batchnorm_frozen(weights):
    model = build_model(2, str(weights))
    freeze_backbone(model, 2)
    trainable = {
        name.split(".")[0] + "." + name.split(".")[1] for name, p in model.named_parameters() if p.requires_grad
    }
    assert trainable == {"features.17", "features.18", "classifier.1"}
    freeze_backbone(model, 0)
    assert all(not p.requires_grad for p in model.features.parameters())
    with pytest.raises(ValueError, match="Only 0 to 19"):
        freeze_backbone(model, 20)
    set_train_mode(model)
    batchnorms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert model.training and batchnorms and not any(m.training for m in batchnorms)  # statistics stay ImageNet's
    assert model.classifier.training  # dropout still active


def test_cross_validation_folds_are_stratified_deterministic_and_disjoint():
    targets = np.array([0] * 50 + [1] * 23)
    folds = cv.stratified_folds(targets, 5, seed=42)
    assert (folds == cv.stratified_folds(targets, 5, seed=42)).all()
    assert not (folds == cv.stratified_folds(targets, 5, seed=7)).all()
    for fold in range(5):
        held = targets[folds == fold]
        assert (held == 0).sum() == 10 and (held == 1).sum() in (4, 5)  # each class dealt evenly


def test_cross_validation_overrides_keep_types():
    stage = load_params(ROOT / "params.yaml").train.final
    changed = cv.apply_overrides(stage, ["final.lr=5e-5", "final.unfreeze_blocks=5", "final.augment.hflip=0"])
    assert changed.lr == 5e-5 and isinstance(changed.lr, float)  # YAML 1.1 reads 5e-5 as a string
    assert changed.unfreeze_blocks == 5 and changed.augment.hflip == 0.0
    assert changed.epochs == stage.epochs


@pytest.mark.slow
def test_short_real_cross_validation_scores_every_train_val_photo_once(make_raw, tmp_path, weights):
    params_path = small_params(tmp_path)
    params = load_params(params_path)
    processed = tmp_path / "processed"
    prepare(make_raw(per_class=30), processed, tmp_path / "reports", labels=("cat", "dog"),
            fractions=params.data.split, salt=params.data.split_salt, preprocess=params.preprocess)  # fmt: skip
    out = tmp_path / "cv.json"
    cv.main(["--params", str(params_path), "--data", str(processed), "--pretrained", str(weights),
             "--folds", "2", "--epochs", "1", "--out", str(out)])  # fmt: skip
    result = json.loads(out.read_text())
    photos = sum(1 for split in ("train", "val") for _ in (processed / split).rglob("*.*"))
    assert result["samples"] == photos
    assert 0 <= result["baseline"]["plain"]["errors"] < photos / 2  # ImageNet features already separate them
    assert len(result["final_by_epoch"]) == 1 and set(result["final_by_epoch"][0]) == {"plain", "flip"}

"""Export stage: ONNX with metadata and sidecar, the accuracy gate, and the int8 variant's gate."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import mlflow
import onnx
import pytest
import torch
import yaml

from export import convert, quantize, served
from export.evaluate import read_metadata
from server.model import Model
from tests.conftest import WEIGHTS, photos
from tests.seeded_model import seeded_checkpoint
from training.config import load_params
from training.data import prepare

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, make_raw_module):
    root = tmp_path_factory.mktemp("export")
    params = load_params(ROOT / "params.yaml")
    prepare(make_raw_module(per_class=30), root / "processed", root / "reports", labels=("cat", "dog"),
            fractions=params.data.split, salt=params.data.split_salt, preprocess=params.preprocess)  # fmt: skip
    torch.save(seeded_checkpoint(WEIGHTS), root / "final.pt")
    return root


@pytest.fixture(scope="module")
def make_raw_module(tmp_path_factory):
    from tests.conftest import photos

    def build(per_class: int) -> Path:
        raw = tmp_path_factory.mktemp("raw")
        for label in ("cat", "dog"):
            (raw / label).mkdir()
            for photo in photos(label, per_class):
                (raw / label / photo.name).write_bytes(photo.read_bytes())
        return raw

    return build


def write_params(root: Path, margin: float | None = None, **export: object) -> Path:
    """params.yaml with `export` settings changed, and every gate margin set to `margin` when given."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["export"].update(export)
    if margin is not None:
        raw["gates"]["max_relative_loss"] = dict.fromkeys(raw["gates"]["max_relative_loss"], margin)
    path = root / f"params-{len(list(root.glob('params-*')))}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def run_convert(root: Path, params: Path, out: Path) -> dict:
    report = root / f"{out.stem}-report.json"
    convert.main(["--checkpoint", str(root / "final.pt"), "--out", str(out), "--params", str(params),
                  "--data", str(root / "processed"), "--report", str(report)])  # fmt: skip
    return json.loads(report.read_text())


@pytest.mark.slow
def test_export_writes_checked_onnx_with_metadata_and_sidecar(workspace, monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    out = workspace / "models" / "model.onnx"
    report = run_convert(workspace, write_params(workspace, min_accuracy=0.5), out)

    onnx.checker.check_model(onnx.load(str(out)), full_check=True)
    metadata = read_metadata(out)
    assert metadata["labels"] == ["cat", "dog"] and metadata["preprocess"]["resize_size"] == 256
    assert metadata["model_version"] == "seeded-imagenet-head" and metadata["precision"] == "float32"
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    assert {k: v for k, v in sidecar.items() if k not in ("file", "sha256")} == metadata
    reference = metadata["reference"]  # drift monitoring's baseline, on the validation split
    val_images = sum(1 for _ in (workspace / "processed" / "val").rglob("*.*"))
    assert reference["source"] == "val split" and reference["images"] == val_images > 0
    signals = reference["signals"]
    assert sum(signals["confidence"]["counts"]) == sum(signals["label"]["counts"]) == val_images
    graph = onnx.load(str(out)).graph
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param  # a named, dynamic batch axis
    assert report["float32"]["accuracy"] == report["torch_accuracy"]  # to the image
    assert report["max_abs_probability_diff_vs_torch"] < 1e-5
    assert report["float32"]["latency_p50_ms"] > 0 and "precision_cat" in report["float32"]


@pytest.mark.slow
def test_export_refuses_a_model_below_the_accuracy_threshold(workspace, tmp_path):
    out = tmp_path / "refused.onnx"
    stale_int8 = tmp_path / "refused.int8.onnx"  # quantized from the model this export would replace
    stale_int8.write_bytes(b"old int8")
    stale_int8.with_suffix(".json").write_text("{}")
    with pytest.raises(SystemExit, match=r"below export\.min_accuracy"):
        run_convert(workspace, write_params(workspace, min_accuracy=0.999), out)  # not shown on so few photos
    assert not out.exists() and not out.with_suffix(".json").exists()
    assert not stale_int8.exists() and not stale_int8.with_suffix(".json").exists()  # not left alone to be served
    assert list(tmp_path.iterdir()) == []  # nor the staging folder it was written and gated in


def with_run(fp32: Path, tracking_uri: str) -> str:
    """Give the exported model a run in params.yaml's experiment, as a trained checkpoint has; returns its id."""
    client = mlflow.MlflowClient(tracking_uri)
    name = load_params(ROOT / "params.yaml").mlflow.experiment
    experiment = client.get_experiment_by_name(name)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(
        name, artifact_location=(fp32.parent / "artifacts").as_uri())  # fmt: skip
    run_id = client.create_run(experiment_id).info.run_id
    convert.write_metadata(fp32, {**read_metadata(fp32), "run_id": run_id})
    return run_id


def served_tag(run_id: str, tracking_uri: str) -> str | None:
    return mlflow.MlflowClient(tracking_uri).get_run(run_id).data.tags.get("served_model")


@pytest.mark.slow
def test_int8_model_is_kept_only_within_the_accuracy_drop(workspace, monkeypatch, tmp_path):
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    fp32 = tmp_path / "model.onnx"
    run_convert(workspace, write_params(workspace, min_accuracy=0.5), fp32)
    run_id = with_run(fp32, tracking_uri)
    int8 = tmp_path / "model.int8.onnx"
    # a loose margin: this checks the mechanics of acceptance; 44 photos cannot show a 1% margin (test_gates.py)
    accepting = write_params(workspace, margin=0.3, calibration_images=16)
    quantize.main(["--model", str(fp32), "--params", str(accepting), "--data", str(workspace / "processed"),
                   "--report", str(tmp_path / "q.json")])  # fmt: skip
    report = json.loads((tmp_path / "q.json").read_text())
    assert int8.is_file() and read_metadata(int8)["precision"] == "int8"
    assert report["served"] == "int8" and "accepted" in report["reason"]
    quantized_ops = {node.op_type for node in onnx.load(str(int8)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= quantized_ops
    gate = report["gate"]  # both as served, on the same photos and the pooled non-pets (export.answers)
    assert gate["accepted"] and gate["photos"] == 44 and gate["not_pets"] == 645 and report["reduce_range"] is True
    comparisons = gate["comparisons"]
    assert set(comparisons) == {"accuracy: prepared photos but calibration", "non-pets flagged: pooled non-pets",
                                "pets kept: prepared photos but calibration"}  # fmt: skip
    assert all(c["not_worse"] and c["lower95"] >= -c["margin"] for c in comparisons.values())
    assert comparisons["non-pets flagged: pooled non-pets"]["n"] == 645
    pet = read_metadata(int8)["pet"]  # the threshold is re-chosen on the int8 model's own pet scores
    assert pet["threshold"] == report["pet"]["threshold_int8"] and 0 < pet["threshold"] <= 1
    assert report["pet"]["threshold_float32"] == read_metadata(fp32)["pet"]["threshold"]
    pin = read_metadata(int8)["quantized_from"]  # what the service checks before serving int8 from the folder
    assert pin == {"file": "model.onnx", "sha256": hashlib.sha256(fp32.read_bytes()).hexdigest()}
    assert Model(tmp_path, threads=1, max_pixels=50_000_000).path == int8
    assert served_tag(run_id, tracking_uri) == "model.int8.onnx"
    artifacts = [a.path for a in mlflow.MlflowClient(tracking_uri).list_artifacts(run_id, "onnx")]
    assert "onnx/model.int8.onnx" in artifacts  # what deploy.model_release downloads for this tag
    run_convert(workspace, write_params(workspace, min_accuracy=0.5), fp32)  # a new float32 model...
    assert not int8.exists() and not int8.with_suffix(".json").exists()  # ...drops the int8 made from the old one
    run_id = with_run(fp32, tracking_uri)

    refusing = write_params(workspace, margin=0.0, calibration_images=16)  # no loss allowed: nothing can show it
    with pytest.raises(SystemExit, match="int8 model refused"):  # --strict: the old failing export
        quantize.main(["--model", str(fp32), "--params", str(refusing), "--data", str(workspace / "processed"),
                       "--report", str(tmp_path / "q2.json"), "--strict"])  # fmt: skip
    assert not int8.exists()
    # without --strict a refusal is not a failed export: float32 is what is served
    quantize.main(["--model", str(fp32), "--params", str(refusing), "--data", str(workspace / "processed"),
                   "--report", str(tmp_path / "q3.json")])  # fmt: skip
    refused = json.loads((tmp_path / "q3.json").read_text())
    assert refused["served"] == "float32" and refused["reason"].startswith("int8 model refused")
    assert not refused["gate"]["accepted"]
    assert not int8.exists() and not int8.with_suffix(".json").exists()
    assert Model(tmp_path, threads=1, max_pixels=50_000_000).path == fp32
    assert served_tag(run_id, tracking_uri) == "model.onnx"


def test_export_served_tags_the_run_with_the_file_the_folder_serves(onnx_model, int8_model, monkeypatch, tmp_path):
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    models = tmp_path / "models"
    models.mkdir()
    shutil.copyfile(onnx_model, models / "model.onnx")
    shutil.copyfile(int8_model, models / "model.int8.onnx")
    run_id = with_run(models / "model.onnx", tracking_uri)  # the float32 file changes: int8's pin no longer matches
    served.main(["--models", str(models)])
    assert served_tag(run_id, tracking_uri) == "model.onnx"
    float32 = models / "model.onnx"  # quantized from this float32 file, as export.quantize pins it
    convert.write_metadata(models / "model.int8.onnx", quantize.quantized_metadata(read_metadata(float32), float32))
    served.main(["--models", str(models)])
    assert served_tag(run_id, tracking_uri) == "model.int8.onnx"


def test_int8_keeps_the_heads_in_float32_so_probabilities_sum_to_one(onnx_model, int8_model):
    graph = onnx.load(str(int8_model)).graph
    dequantized = {node.output[0] for node in graph.node if node.op_type == "DequantizeLinear"}
    convs = [node for node in graph.node if node.op_type == "Conv"]
    assert convs and all(conv.input[0] in dequantized for conv in convs)  # every convolution reads int8...
    quantized = {node.input[0] for node in graph.node if node.op_type == "QuantizeLinear"}
    heads = [node for node in graph.node if node.op_type in ("Gemm", "Softmax", "ReduceSum")]
    assert heads and not any(output in quantized for node in heads for output in node.output)  # ...the heads not
    model = Model(int8_model, threads=1, max_pixels=50_000_000)
    results, _ = model.classify_all([p.read_bytes() for p in [*photos("cat", 3), *photos("dog", 3)]])
    for result in results:
        assert abs(sum(result.probabilities.values()) - 1) < 1e-5, result.probabilities  # 8-bit steps gave 0.996

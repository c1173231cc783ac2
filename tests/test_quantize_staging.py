"""An exported model appears under the name it is served by only once its gate accepted it (export.staging): an int8
gate that fails or is interrupted half-way leaves no model.int8.onnx, and the folder serves float32."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from export import not_a_pet, quantize
from export.evaluate import read_metadata
from export.staging import aside, publish, staging_folder
from server.model_file import choose_model_file
from tests.conftest import ROOT, photos
from training.config import load_params
from training.data import prepare


@pytest.fixture(scope="module")
def processed(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("staging")
    raw = root / "raw"
    for label in ("cat", "dog"):
        (raw / label).mkdir(parents=True)
        for photo in photos(label, 30):
            shutil.copyfile(photo, raw / label / photo.name)
    params = load_params(ROOT / "params.yaml")
    prepare(raw, root / "processed", root / "reports", labels=("cat", "dog"), fractions=params.data.split,
            salt=params.data.split_salt, preprocess=params.preprocess)  # fmt: skip
    return root / "processed"


@pytest.mark.slow
@pytest.mark.parametrize("failure", [ValueError("the not-a-pet calibration failed"), KeyboardInterrupt()])
def test_an_int8_gate_stopped_half_way_leaves_no_int8_model_to_serve(
    onnx_model, int8_model, processed, monkeypatch, tmp_path, failure
):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    models = tmp_path / "models"
    models.mkdir()
    shutil.copyfile(onnx_model, models / "model.onnx")
    shutil.copyfile(onnx_model.with_suffix(".json"), models / "model.json")
    # an earlier run's accepted int8 model, pinned to this very float32 file: the folder serves it until this run
    shutil.copyfile(int8_model, models / "model.int8.onnx")
    shutil.copyfile(int8_model.with_suffix(".json"), models / "model.int8.json")
    assert choose_model_file(models).path == models / "model.int8.onnx"
    written: list[Path] = []

    def calibrate_then_fail(path: Path, *args: object) -> None:
        # a step between the int8 model's pinned write and its verdict
        assert read_metadata(path)["quantized_from"]["file"] == "model.onnx"
        written.append(path)
        raise failure

    monkeypatch.setattr(not_a_pet, "calibrate", calibrate_then_fail)
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["export"]["calibration_images"] = 8
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw))
    with pytest.raises(type(failure)):
        quantize.main(["--model", str(models / "model.onnx"), "--params", str(params), "--data", str(processed),
                       "--report", str(tmp_path / "quantize.json")])  # fmt: skip
    assert written and written[0].name == "model.int8.onnx"  # the candidate was written and pinned...
    assert not (models / "model.int8.onnx").exists() and not (models / "model.int8.json").exists()  # ...aside
    assert sorted(p.name for p in models.iterdir()) == ["model.json", "model.onnx"]  # nor its staging folder
    chosen = choose_model_file(models)
    assert chosen.path == models / "model.onnx" and chosen.reason.startswith("no model.int8.onnx")


def test_a_staged_model_is_served_only_once_published(tmp_path):
    path = tmp_path / "model.int8.onnx"
    leftover = staging_folder(path) / "model.int8.onnx"  # what a killed run (SIGKILL runs no cleanup) left
    leftover.parent.mkdir()
    leftover.write_bytes(b"never accepted")
    with pytest.raises(RuntimeError), aside(path) as candidate:
        assert candidate.name == path.name and list(candidate.parent.iterdir()) == []
        candidate.write_bytes(b"int8")
        candidate.with_suffix(".json").write_text("{}")
        raise RuntimeError("the gate failed")
    assert list(tmp_path.iterdir()) == []
    path.write_bytes(b"old")  # an earlier accepted model and its sidecar: replaced, never mixed with the new ones
    path.with_suffix(".json").write_text('{"sha256": "old"}')
    with aside(path) as candidate:
        candidate.write_bytes(b"new")
        candidate.with_suffix(".json").write_text('{"sha256": "new"}')
        publish(candidate, path)
    assert path.read_bytes() == b"new" and path.with_suffix(".json").read_text() == '{"sha256": "new"}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.int8.json", "model.int8.onnx"]

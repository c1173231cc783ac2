"""Which file MODEL_PATH serves: a folder serves its int8 model only when quantized from the float32 model beside it."""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx2 as httpx
import pytest
import yaml
from starlette.testclient import TestClient

from export.convert import write_metadata
from export.evaluate import read_metadata
from export.staging import staging_folder
from server.app import create_app
from server.config import Settings
from server.model import Model, ModelError
from tests.conftest import ROOT
from tests.images import photo_bytes
from tests.service import Service
from tests.test_app import CAT, DOG, settings_for


def folder(root: Path, float32: Path | None = None, int8: Path | None = None) -> Path:
    """A models/ folder as `make export` leaves it, from the given files."""
    root.mkdir(parents=True, exist_ok=True)
    for source, name in ((float32, "model.onnx"), (int8, "model.int8.onnx")):
        if source is not None:
            shutil.copyfile(source, root / name)
    return root


def another_float32(onnx_model: Path, target: Path) -> Path:
    """The same real model exported again with other lineage: other bytes, so another sha256."""
    shutil.copyfile(onnx_model, target)
    write_metadata(target, {**read_metadata(onnx_model), "model_version": "a-later-export"})
    return target


def test_a_folder_serves_the_int8_model_quantized_from_the_float32_beside_it(onnx_model, int8_model, tmp_path):
    models = folder(tmp_path / "models", onnx_model, int8_model)
    with TestClient(create_app(settings_for(models))) as client:
        described = client.get("/model").json()
        assert described["file"] == "model.int8.onnx" and described["precision"] == "int8"
        assert "quantized from the model.onnx beside it" in described["file_choice"]
        assert client.get("/ready").json()["precision"] == "int8"
        for photo, label in ((CAT, "cat"), (DOG, "dog")):
            response = client.post("/predict", files={"file": ("p.jpg", photo_bytes(photo), "image/jpeg")})
            assert response.status_code == 200 and response.json()["label"] == label


def test_an_int8_model_from_another_float32_is_not_served_and_the_log_says_why(onnx_model, int8_model, tmp_path):
    models = folder(tmp_path / "models", another_float32(onnx_model, tmp_path / "later.onnx"), int8_model)
    service = Service(models)
    try:
        service.wait_ready()
        described = httpx.get(f"{service.url}/model", timeout=10).json()
    finally:
        service.stop()
    assert described["file"] == "model.onnx" and described["precision"] == "float32"
    assert described["model_version"] == "a-later-export"
    records = service.records()
    [warning] = [r for r in records if r["message"] == "model file"]
    assert warning["level"] == "warning" and "quantized from another model.onnx" in warning["model_choice"]
    [startup] = [r for r in records if r["message"] == "startup"]
    assert startup["model_path"] == str(models / "model.onnx") and startup["precision"] == "float32"
    assert startup["model_choice"] == warning["model_choice"]


def test_a_folder_with_only_the_float32_model_serves_it(onnx_model, tmp_path):
    model = Model(folder(tmp_path / "models", float32=onnx_model), threads=1, max_pixels=50_000_000)
    assert model.path.name == "model.onnx" and model.precision == "float32"
    assert model.choice.startswith(f"no model.int8.onnx in {tmp_path / 'models'}")
    assert "reports/quantize.json" in model.choice  # where an operator reads why the int8 model is not there


def test_a_folder_with_only_the_int8_model_serves_it(int8_model, tmp_path):
    model = Model(folder(tmp_path / "models", int8=int8_model), threads=1, max_pixels=50_000_000)
    assert model.path.name == "model.int8.onnx" and model.precision == "int8"
    assert model.classify(photo_bytes(CAT)).label == "cat"


def test_an_int8_model_without_its_source_recorded_is_not_served(onnx_model, int8_model, tmp_path):
    unpinned = tmp_path / "unpinned.onnx"  # quantized before the pin existed
    shutil.copyfile(int8_model, unpinned)
    write_metadata(unpinned, {k: v for k, v in read_metadata(int8_model).items() if k != "quantized_from"})
    model = Model(folder(tmp_path / "models", onnx_model, unpinned), threads=1, max_pixels=50_000_000)
    assert model.path.name == "model.onnx" and "does not record the model.onnx" in model.choice


def test_an_int8_model_still_in_its_staging_folder_is_not_served(onnx_model, int8_model, tmp_path):
    models = folder(tmp_path / "models", float32=onnx_model)
    folder(staging_folder(models / "model.int8.onnx"), int8=int8_model)  # pinned to this model.onnx, gate not done
    model = Model(models, threads=1, max_pixels=50_000_000)
    assert model.path == models / "model.onnx" and model.choice.startswith("no model.int8.onnx")


def test_naming_the_float32_file_serves_it_beside_a_matching_int8(onnx_model, int8_model, tmp_path):
    models = folder(tmp_path / "models", onnx_model, int8_model)
    model = Model(models / "model.onnx", threads=1, max_pixels=50_000_000)
    assert model.precision == "float32" and model.choice == "MODEL_PATH names this file"


def test_an_empty_folder_is_health_only_with_the_reason(tmp_path):
    with pytest.raises(ModelError, match=r"model file not found: .*model\.onnx"):
        Model(folder(tmp_path / "models"), threads=1, max_pixels=50_000_000)
    with TestClient(create_app(settings_for(tmp_path / "models"))) as client:
        assert client.get("/health").json() == {"status": "ok", "model_loaded": False}
        assert client.get("/ready").status_code == 503


@pytest.mark.parametrize(("model_file", "served"), [("", "model.int8.onnx"), ("model.onnx", "model.onnx")])
def test_compose_serves_the_folder_unless_model_file_names_one(onnx_model, int8_model, tmp_path, monkeypatch,
                                                               model_file, served):  # fmt: skip
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["serve"]["environment"]
    models = folder(tmp_path / "models", onnx_model, int8_model)
    # compose's interpolation of ${MODEL_FILE:-}, with the mount point /models replaced by the folder
    monkeypatch.setenv("MODEL_PATH", compose["MODEL_PATH"].replace("/models", str(models), 1).replace(
        "${MODEL_FILE:-}", model_file))  # fmt: skip
    model = Model(Settings.from_env().model_path, threads=1, max_pixels=50_000_000)
    assert model.path == models / served


def test_the_default_model_path_is_the_models_folder(monkeypatch):
    monkeypatch.delenv("MODEL_PATH", raising=False)
    assert Settings.from_env().model_path == Path("models")
    monkeypatch.setenv("MODEL_PATH", "")
    assert Settings.from_env().model_path == Path("models")

"""Drift: reference distributions carried by the real model, PSI windows, and the gauges moving with real photos."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from starlette.testclient import TestClient

from export.reference import reference_distributions
from server.app import create_app
from server.config import Settings
from server.drift import DriftMonitor, Window, psi, smoothed
from server.metrics import Metrics
from server.model import Prediction
from tests.conftest import DATASET, SHARED

NOT_PETS = sorted((SHARED / "datasets" / "not-pets-dev").glob("*.jpg"))
PSI_LINE = re.compile(r'^catsdogs_drift_psi\{signal="([^"]+)"\} (\S+)$', re.MULTILINE)
COUNT_LINE = re.compile(r'^catsdogs_drift_window_predictions\{signal="([^"]+)"\} (\S+)$', re.MULTILINE)


def gauges(client: TestClient, pattern: re.Pattern[str] = PSI_LINE) -> dict[str, float]:
    client.app.state.observer.wait_idle()  # predictions reach the drift windows off the event loop
    return {name: float(value) for name, value in pattern.findall(client.get("/metrics").text)}


def send(client: TestClient, photo: Path) -> None:
    response = client.post("/predict", files={"file": (photo.name, photo.read_bytes(), "image/jpeg")})
    assert response.status_code == 200, response.text


def test_psi_by_hand():
    expected, actual = np.array([0.5, 0.5]), np.array([0.9, 0.1])
    assert psi(expected, actual) == pytest.approx(0.4 * math.log(1.8) + (-0.4) * math.log(0.2))
    assert psi(expected, expected) == 0.0
    assert smoothed(np.array([0.0, 3.0])).tolist() == [0.125, 0.875]


def test_window_bins_like_numpy_histogram_and_forgets_the_oldest():
    edges = [0.5, 0.9, 0.99, 1.0]
    window = Window({"edges": edges, "counts": [10, 10, 10]}, size=4)
    values = [0.5, 0.89, 0.9, 0.995, 1.0, 0.2]  # 0.2 is clipped into the first bin, 1.0 into the last
    assert [window.bin(v) for v in values] == [0, 0, 1, 2, 2, 0]
    assert np.histogram(np.clip(values, 0.5, 1.0), bins=edges)[0].tolist() == [3, 1, 2]
    assert math.isnan(window.psi())
    for value in (0.6, 0.6, 0.6, 0.6, 0.95, 0.95):
        window.add(value)
    assert window.counts == [2, 2, 0] and len(window) == 4
    labels = Window({"categories": ["cat", "dog"], "counts": [5, 5]}, size=10)
    labels.add("dog")
    labels.add("horse")  # not a category: ignored
    assert labels.counts == [0, 1]


def test_the_model_carries_reference_distributions(onnx_model):
    metadata = json.loads(onnx.load(str(onnx_model)).metadata_props[0].value)
    reference = metadata["reference"]
    assert reference["images"] == 200 and reference["class_balance"] == {"cat": 0.5, "dog": 0.5}
    confidence = reference["signals"]["confidence"]
    assert sum(confidence["counts"]) == 200 and len(confidence["edges"]) == len(confidence["counts"]) + 1
    assert reference["signals"]["label"]["categories"] == ["cat", "dog"]
    assert sum(reference["signals"]["label"]["counts"]) == 200


def test_a_pet_score_output_is_one_more_signal_on_both_sides():
    outputs = {
        "probabilities": np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]]),
        "pet_score": np.array([0.95, 0.9, 0.05]),
    }
    reference = reference_distributions(outputs, np.array([0, 1, 1]), ["cat", "dog"], "three rows")
    assert reference["signals"]["pet_score"]["counts"] == [1, 0, 0, 0, 0, 0, 0, 0, 0, 2]
    assert reference["signals"]["label"]["counts"] == [2, 1]
    assert (
        "pet_score"
        not in reference_distributions(
            {"probabilities": outputs["probabilities"]}, np.array([0, 1, 1]), ["cat", "dog"], "no pet output"
        )["signals"]
    )

    @dataclasses.dataclass(frozen=True)
    class WithPetScore(Prediction):
        pet_score: float = 0.0

    metrics = Metrics()
    monitor = DriftMonitor(reference, 10, metrics.drift_psi, metrics.drift_window)
    assert set(monitor.windows) == {"confidence", "label", "pet_score"}
    monitor.observe(WithPetScore("cat", {"cat": 0.9, "dog": 0.1}, pet_score=0.02))
    monitor.observe(Prediction("dog", {"cat": 0.3, "dog": 0.7}))  # no pet score: only that signal skips it
    assert {name: len(window) for name, window in monitor.windows.items()} == {"confidence": 2, "label": 2,
                                                                               "pet_score": 1}  # fmt: skip
    assert 'catsdogs_drift_psi{signal="pet_score"}' in metrics.render().decode()


def test_drift_gauges_move_when_the_input_changes(onnx_model):
    settings = dataclasses.replace(Settings.from_env(), model_path=onnx_model, ort_threads=1, drift_window=40)
    cats = [DATASET / "cats" / f"cat.{i}.jpg" for i in range(101, 121)]
    dogs = [DATASET / "dogs" / f"dog.{i}.jpg" for i in range(101, 161)]
    with TestClient(create_app(settings)) as client:
        assert gauges(client, COUNT_LINE) == {"confidence": 0.0, "label": 0.0, "pet_score": 0.0}
        for cat, dog in zip(cats, dogs, strict=False):
            send(client, cat)
            send(client, dog)
        like_reference = gauges(client)
        for dog in dogs[20:]:
            send(client, dog)
        dogs_only = gauges(client)
        for photo in NOT_PETS[:40]:
            send(client, photo)
        not_pets = gauges(client)
        assert gauges(client, COUNT_LINE) == {"confidence": 40.0, "label": 40.0, "pet_score": 40.0}
    # measured: like the reference 0.52 / 0.02, dogs only 1.35 / 1.22, not pets 3.24 / 0.00 (confidence / label);
    # 40 photos is a small window, so "like the reference" is well above 0 (see docs/page-and-feedback.md)
    assert like_reference["label"] < 0.1 and like_reference["confidence"] < 1.0, like_reference
    assert dogs_only["label"] > 1.0, dogs_only
    assert not_pets["confidence"] > 2.5 and not_pets["confidence"] > 4 * like_reference["confidence"], not_pets
    # measured pet score PSI: like the reference 0.29, dogs only 0.51, not pets 7.18
    assert not_pets["pet_score"] > 2.5 and not_pets["pet_score"] > 4 * like_reference["pet_score"], not_pets


def test_a_model_without_reference_serves_without_drift_gauges(onnx_model, tmp_path):
    proto = onnx.load(str(onnx_model))
    metadata = json.loads(proto.metadata_props[0].value)
    del metadata["reference"]
    onnx.helper.set_model_props(proto, {"catsdogs": json.dumps(metadata)})
    old = tmp_path / "old.onnx"
    onnx.save(proto, str(old))
    settings = dataclasses.replace(Settings.from_env(), model_path=old, ort_threads=1)
    with TestClient(create_app(settings)) as client:
        send(client, DATASET / "cats" / "cat.1.jpg")
        assert gauges(client) == {}

"""Smoke test and post-deployment evaluation against the real service over HTTP."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from deploy import evaluate
from deploy.smoke import smoke
from tests.conftest import DATASET, photos
from tests.service import Service


@pytest.fixture(scope="module")
def service(onnx_model: Path):
    running = Service(onnx_model)
    running.wait_ready()
    yield running
    running.stop()


def test_smoke_passes_on_a_healthy_service(service):
    assert smoke(service.url, [*photos("cat", 2), *photos("dog", 2)], timeout=10) == []


def test_smoke_checks_the_released_model_sha256(service, onnx_model):
    released = hashlib.sha256(onnx_model.read_bytes()).hexdigest()
    assert smoke(service.url, photos("cat", 1), timeout=10, expect_sha256=released) == []
    [failure] = smoke(service.url, photos("cat", 1), timeout=10, expect_sha256="0" * 64)
    assert failure.startswith(f"/ready: model_sha256 {released} is not the released")


def test_smoke_fails_on_a_service_without_a_model(tmp_path):
    bare = Service(tmp_path / "absent.onnx")
    try:
        with pytest.raises(TimeoutError, match="ready"):
            smoke(bare.url, photos("cat", 1), timeout=5)
    finally:
        bare.stop()


def test_evaluation_counts_failed_requests_as_wrong(service, tmp_path):
    data = tmp_path / "eval"
    for label in ("cat", "dog"):
        (data / label).mkdir(parents=True)
        for photo in photos(label, 10, start=101):
            shutil.copyfile(photo, data / label / photo.name)
    shutil.copyfile(DATASET / "dogs" / "dog.90002.jpg", data / "dog" / "truncated.jpg")  # the service answers 400
    out = tmp_path / "report.json"
    with pytest.raises(SystemExit, match="below --min-accuracy"):
        evaluate.main(["--url", service.url, "--data", str(data), "--out", str(out), "--min-accuracy", "0.99"])
    report = json.loads(out.read_text())
    assert report["images"] == 21 and report["errors"] == 1
    counts = report["confusion_matrix"]["counts"]
    assert sum(map(sum, counts)) == 21 and counts[1][2] == 1  # the failed dog sits in the "failed" column
    correct = counts[0][0] + counts[1][1]
    assert report["accuracy"] == pytest.approx(correct / 21)
    assert correct <= 20 and report["accuracy"] < 1
    assert set(report["precision"]) == set(report["recall"]) == {"cat", "dog"}
    assert report["latency_ms"]["p95"] >= report["latency_ms"]["p50"] > 0

"""PREDICTION_LOG: one JSON line per prediction and feedback, joinable offline; image bytes only as opted samples."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

from starlette.testclient import TestClient

from server.app import create_app
from server.config import Settings
from tests.images import photo_bytes, reencoded

CAT, DOG = "cats/cat.1.jpg", "dogs/dog.1.jpg"


def run(model: Path, log: Path, sample_every: int) -> tuple[list[bytes], list[str]]:
    """Four predictions (multipart, raw PNG body, a batch of two with a bad file) and two feedbacks; the photos sent
    and the prediction ids the service gave them."""
    settings = dataclasses.replace(Settings.from_env(), model_path=model, ort_threads=1, prediction_log=log,
                                   prediction_log_sample_every=sample_every)  # fmt: skip
    sent = [photo_bytes(CAT), reencoded(DOG, "PNG"), photo_bytes(DOG), photo_bytes(CAT)]
    with TestClient(create_app(settings)) as client:
        first = client.post("/predict", files={"file": ("cat.jpg", sent[0], "image/jpeg")}).json()["prediction_id"]
        raw = client.post("/predict", content=sent[1], headers={"content-type": "image/png", "x-request-id": "raw-1"})
        files = [("files", ("dog.jpg", sent[2], "image/jpeg")), ("files", ("bad.jpg", b"x", "image/jpeg")),
                 ("files", ("cat.jpeg", sent[3], "image/jpeg"))]  # fmt: skip
        batch = client.post("/predict/batch", files=files, headers={"x-request-id": "b-1"}).json()["results"]
        ids = [first, raw.json()["prediction_id"], batch[0]["prediction_id"], batch[2]["prediction_id"]]
        assert client.post("/feedback", json={"prediction_id": first, "label": "cat"}).status_code == 200
        assert client.post("/feedback", json={"prediction_id": ids[3], "label": "dog"}).status_code == 200
    return sent, ids


def test_the_log_joins_predictions_and_feedback_and_holds_no_image(onnx_model, tmp_path):
    log = tmp_path / "logs" / "predictions.jsonl"
    sent, ids = run(onnx_model, log, sample_every=0)
    events = [json.loads(line) for line in log.read_text().splitlines()]
    predictions = {e["prediction_id"]: e for e in events if e["event"] == "prediction"}
    feedback = {e["prediction_id"]: e for e in events if e["event"] == "feedback"}
    assert list(predictions) == ids and len(feedback) == 2
    assert [e["request_id"] for e in predictions.values()][1:] == ["raw-1", "b-1", "b-1"]  # tracing, beside the id
    raw = predictions[ids[1]]
    assert raw["label"] == "dog" and raw["model_version"] == "seeded-imagenet-head"
    assert raw["bytes"] == len(sent[1]) and raw["content_type"] == "image/png"
    assert predictions[ids[3]]["content_type"] == "image/jpeg" and predictions[ids[3]]["bytes"] == len(sent[3])
    assert set(raw) == {"event", "time", "prediction_id", "request_id", "model_version", "label", "probabilities",
                        "is_pet", "pet_score", "bytes", "content_type"}  # fmt: skip
    joined = [(predictions[i]["label"], f["label"]) for i, f in feedback.items()]  # what offline tooling does
    assert joined == [("cat", "cat"), ("cat", "dog")]
    assert log.stat().st_size < 2400  # a few hundred bytes a line: no image in it
    assert not (tmp_path / "logs" / "predictions.jsonl.samples").exists()


def test_samples_are_written_only_when_asked(onnx_model, tmp_path):
    log = tmp_path / "predictions.jsonl"
    sent, ids = run(onnx_model, log, sample_every=2)
    events = [json.loads(line) for line in log.read_text().splitlines() if '"prediction"' in line]
    sampled = [e for e in events if "sample" in e]
    assert [e["prediction_id"] for e in sampled] == [ids[0], ids[2]]
    samples = tmp_path / "predictions.jsonl.samples"
    assert (samples / sampled[0]["sample"]).read_bytes() == sent[0]
    assert sampled[1]["sample"] == hashlib.sha256(sent[2]).hexdigest() + ".jpg"  # named by content, not by client id
    assert (samples / sampled[1]["sample"]).read_bytes() == sent[2]

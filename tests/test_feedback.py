"""POST /feedback and the prediction store, in-process against the real seeded model."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from server.app import create_app
from server.config import Settings
from server.store import MemoryStore, PredictionRecord, SqliteStore
from tests.images import photo_bytes

CAT, DOG = "cats/cat.1.jpg", "dogs/dog.1.jpg"


def make_client(model: Path, **overrides: object) -> TestClient:
    settings = dataclasses.replace(Settings.from_env(), model_path=model, ort_threads=1, **overrides)
    return TestClient(create_app(settings))


@pytest.fixture(scope="module")
def client(onnx_model: Path):
    with make_client(onnx_model) as test_client:
        yield test_client


def predict(client: TestClient, name: str) -> str:
    response = client.post("/predict", files={"file": (Path(name).name, photo_bytes(name), "image/jpeg")})
    assert response.status_code == 200, response.text
    return response.headers["x-request-id"]


def send(client: TestClient, request_id: str, label: str):
    return client.post("/feedback", json={"request_id": request_id, "label": label})


def counter(client: TestClient, label: str, correct: str) -> float:
    prefix = f'catsdogs_feedback_total{{correct="{correct}",label="{label}"}} '
    lines = [line for line in client.get("/metrics").text.splitlines() if line.startswith(prefix)]
    return float(lines[0].split()[-1]) if lines else 0.0


def test_feedback_round_trip_counts_right_and_wrong(client):
    wrong_before, right_before = counter(client, "dog", "false"), counter(client, "dog", "true")
    cat_photo = predict(client, CAT)
    response = send(client, cat_photo, "dog")
    assert response.status_code == 200, response.text
    assert response.json() == {"request_id": cat_photo, "label": "dog", "predicted": "cat", "correct": False,
                               "model_version": "seeded-imagenet-head"}  # fmt: skip
    assert send(client, predict(client, DOG), "dog").json()["correct"] is True
    assert counter(client, "dog", "false") == wrong_before + 1
    assert counter(client, "dog", "true") == right_before + 1


def test_the_same_feedback_twice_counts_once_and_a_different_one_conflicts(client):
    request_id = predict(client, CAT)
    before = counter(client, "cat", "true")
    assert send(client, request_id, "cat").status_code == 200
    assert send(client, request_id, "cat").status_code == 200
    assert counter(client, "cat", "true") == before + 1
    response = send(client, request_id, "dog")
    assert response.status_code == 409 and response.json()["error"]["code"] == "feedback_conflict"


def test_batch_items_get_their_own_request_ids(client):
    files = [("files", ("cat.jpg", photo_bytes(CAT), "image/jpeg")), ("files", ("x.jpg", b"nope", "image/jpeg")),
             ("files", ("dog.jpg", photo_bytes(DOG), "image/jpeg"))]  # fmt: skip
    response = client.post("/predict/batch", files=files, headers={"x-request-id": "batch-42"})
    items = response.json()["results"]
    assert [item.get("request_id") for item in items] == ["batch-42/0", None, "batch-42/2"]
    answer = send(client, "batch-42/2", "cat").json()
    assert answer["request_id"] == "batch-42/2" and answer["predicted"] == "dog" and answer["correct"] is False
    assert send(client, "batch-42/1", "cat").status_code == 404  # the failed file made no prediction


@pytest.mark.parametrize(
    ("body", "content_type", "status", "code"),
    [
        ({"request_id": "never-seen", "label": "cat"}, "application/json", 404, "unknown_request_id"),
        ({"request_id": "x", "label": "horse"}, "application/json", 422, "unknown_label"),
        ({"request_id": "x", "label": "Cat"}, "application/json", 422, "unknown_label"),
        ({"request_id": "x"}, "application/json", 400, "invalid_feedback"),
        ({"request_id": 7, "label": "cat"}, "application/json", 400, "invalid_feedback"),
        (["x", "cat"], "application/json", 400, "invalid_feedback"),
        (b'{"request_id": ', "application/json", 400, "invalid_feedback"),
        (b"\xff\xfe", "application/json", 400, "invalid_feedback"),
        (b"request_id=x&label=cat", "application/x-www-form-urlencoded", 415, "unsupported_media_type"),
        (b"x" * 5000, "application/json", 413, "payload_too_large"),
    ],
)
def test_bad_feedback_gets_a_clear_error(client, body, content_type, status, code):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = client.post("/feedback", content=content, headers={"content-type": content_type})
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code and response.json()["error"]["message"]


def test_the_memory_store_keeps_only_the_most_recent_predictions(onnx_model):
    with make_client(onnx_model, feedback_store_size=2) as small:
        first, second, third = (predict(small, name) for name in (CAT, DOG, CAT))
        assert send(small, first, "cat").status_code == 404
        assert send(small, second, "dog").status_code == 200 and send(small, third, "cat").status_code == 200


def test_feedback_without_a_model_is_503(tmp_path):
    with make_client(tmp_path / "missing.onnx") as empty:
        response = send(empty, "x", "cat")
        assert response.status_code == 503 and response.json()["error"]["code"] == "model_not_loaded"


def test_the_sqlite_store_survives_a_restart(onnx_model, tmp_path):
    db = tmp_path / "feedback.db"
    with make_client(onnx_model, feedback_db=db) as before_restart:
        request_id = predict(before_restart, DOG)
    with make_client(onnx_model, feedback_db=db) as after_restart:
        assert send(after_restart, request_id, "cat").json()["correct"] is False
        assert send(after_restart, request_id, "dog").status_code == 409  # the feedback was stored too


@pytest.mark.parametrize("store_type", ["memory", "sqlite"])
def test_stores_evict_the_oldest(tmp_path, store_type):
    store = MemoryStore(3) if store_type == "memory" else SqliteStore(tmp_path / "s.db", 3)
    for i in range(5):
        store.add(PredictionRecord(f"r{i}", time.time(), "v1", "cat", {"cat": 0.9, "dog": 0.1}, pet_score=0.5))
    assert [store.get(f"r{i}") is not None for i in range(5)] == [False, False, True, True, True]
    store.set_feedback("r4", "dog")
    record = store.get("r4")
    assert record is not None and record.feedback == "dog" and record.pet_score == 0.5
    assert record.probabilities == {"cat": 0.9, "dog": 0.1}
    store.close()

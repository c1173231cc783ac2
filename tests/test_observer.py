"""What a prediction feeds (store, drift, prediction log) never breaks or delays the prediction."""

from __future__ import annotations

import dataclasses
import sqlite3
import threading
import time
from pathlib import Path

from starlette.testclient import TestClient

from server import observer as observer_module
from server.app import create_app
from server.config import Settings
from tests.images import photo_bytes
from tests.test_app import CAT, DOG, metric


def client_for(model: Path, **overrides: object) -> TestClient:
    settings = dataclasses.replace(Settings.from_env(), model_path=model, ort_threads=1, **overrides)
    return TestClient(create_app(settings))


def predict(client: TestClient, data: bytes) -> float:
    started = time.perf_counter()
    response = client.post("/predict", content=data, headers={"content-type": "image/jpeg"})
    assert response.status_code == 200, response.text
    return time.perf_counter() - started


def lost(client: TestClient, reason: str) -> float:
    return metric(client.get("/metrics").text, "catsdogs_observations_lost_total", reason=reason)


def test_a_locked_database_neither_delays_nor_fails_a_prediction(onnx_model, tmp_path, caplog):
    db = tmp_path / "feedback.db"
    with client_for(onnx_model, feedback_db=str(db)) as client:
        predict(client, photo_bytes(CAT))  # the table exists
        client.app.state.observer.wait_idle()
        locker = sqlite3.connect(db, timeout=0, check_same_thread=False)
        locker.execute("BEGIN EXCLUSIVE")  # another process writing: inserts wait 5 s, then fail
        try:
            seconds = [predict(client, photo_bytes(name)) for name in (CAT, DOG)]
        finally:
            threading.Timer(6.5, locker.rollback).start()
        assert max(seconds) < 2.5, seconds  # answered while the store waits for its lock
        assert client.app.state.observer.wait_idle(timeout=15)
        assert lost(client, "write_failed") >= 1
        warnings = [r for r in caplog.records if "recording a prediction failed" in r.getMessage()]
        assert len(warnings) == 1  # logged once, however many are lost
        predict(client, photo_bytes(CAT))  # the lock is gone: recorded again
        assert client.app.state.observer.wait_idle()


def test_a_full_queue_drops_the_record_not_the_prediction(onnx_model, caplog):
    with client_for(onnx_model) as client:
        observer = client.app.state.observer
        release = threading.Event()
        original = observer.store.add_many
        observer.store.add_many = lambda records: (release.wait(10), original(records))  # a store that hangs
        observer.queue.maxsize = 2
        try:
            for _ in range(5):
                predict(client, photo_bytes(CAT))
        finally:
            release.set()
        assert lost(client, "queue_full") >= 2
        assert len([r for r in caplog.records if "queue is full" in r.getMessage()]) == 1
        assert observer.wait_idle()


def test_a_full_disk_under_the_prediction_log_is_counted_not_raised(onnx_model):
    with client_for(onnx_model, prediction_log=Path("/dev/full")) as client:  # every write: ENOSPC
        for _ in range(3):
            predict(client, photo_bytes(CAT))
        assert client.app.state.observer.wait_idle()
        assert lost(client, "write_failed") == 3


def test_the_prediction_log_and_samples_stay_within_their_limits(onnx_model, tmp_path):
    log = tmp_path / "predictions.jsonl"
    photos = [photo_bytes(f"cats/cat.{i}.jpg") for i in range(1, 16)]
    limits = {"prediction_log_max_bytes": 1500, "prediction_log_backups": 2, "prediction_samples_max_bytes": 120_000}
    with client_for(onnx_model, prediction_log=log, prediction_log_sample_every=1, **limits) as client:
        for data in photos:
            predict(client, data)
        assert client.app.state.observer.wait_idle()
    logs = sorted(p.name for p in tmp_path.iterdir() if p.is_file())
    assert logs == ["predictions.jsonl", "predictions.jsonl.1", "predictions.jsonl.2"]  # rotated, 2 kept
    assert all((tmp_path / name).stat().st_size <= 1500 + 600 for name in logs)
    samples = [p for p in (tmp_path / "predictions.jsonl.samples").iterdir()]
    assert 0 < sum(p.stat().st_size for p in samples) <= 120_000 and len(samples) < 16


def test_predictions_are_recorded_in_batches_and_none_is_lost(onnx_model, monkeypatch):
    """Under load the observer wakes once per batch, not once per prediction (a wake-up is a system call), and
    records every prediction. (A long gathering pause here, so that a slow machine still makes batches.)"""
    monkeypatch.setattr(observer_module, "GATHER_S", 1.0)
    with client_for(onnx_model) as client:
        observer = client.app.state.observer
        calls: list[int] = []
        original = observer.store.add_many
        observer.store.add_many = lambda records: (calls.append(len(records)), original(records))
        ids = []
        for _ in range(12):
            response = client.post("/predict", content=photo_bytes(CAT), headers={"content-type": "image/jpeg"})
            ids.append(response.json()["prediction_id"])
        assert observer.wait_idle()
        assert sum(calls) == 12 and len(calls) < 12, calls  # 12 predictions in fewer transactions
        assert all(observer.store.get(prediction_id) is not None for prediction_id in ids)


def test_the_in_process_path_counts_its_own_cpu(onnx_model):
    """catsdogs_inference_cpu_seconds_total: what the worker threads spent on decode, preprocess and session.run,
    so that a benchmark can tell the service's own cost from the model's (bench.common.CpuMeter)."""
    with client_for(onnx_model) as client:
        before = metric(client.get("/metrics").text, "catsdogs_inference_cpu_seconds_total")
        started = time.thread_time(), time.perf_counter()
        for _ in range(3):
            predict(client, photo_bytes(DOG))
        after = metric(client.get("/metrics").text, "catsdogs_inference_cpu_seconds_total")
        assert 0.001 < after - before < time.perf_counter() - started[1] + 0.5  # three inferences of real work


def test_a_store_error_while_expiring_photos_loses_nothing_and_stops_nothing(onnx_model, tmp_path):
    """Expiring kept photos reads the store: a database that is locked or down there must not stop the observer's
    thread (every later prediction would stay unrecorded) nor cost the batch its records."""
    with client_for(onnx_model, feedback_images=tmp_path / "photos") as client:
        observer = client.app.state.observer

        def broken() -> None:
            raise sqlite3.OperationalError("database is locked")

        observer.images.expire = broken
        observer.expired_at = 0.0  # due now
        first = client.post("/predict", content=photo_bytes(CAT), headers={"content-type": "image/jpeg"})
        assert observer.wait_idle() and observer.worker.is_alive()
        second = client.post("/predict", content=photo_bytes(DOG), headers={"content-type": "image/jpeg"})
        assert observer.wait_idle() and observer.worker.is_alive()
        for response in (first, second):
            assert observer.store.get(response.json()["prediction_id"]) is not None

"""Feedback: the recent predictions kept by request id, and POST /feedback, which records the true label of one."""

from __future__ import annotations

import dataclasses
import json
import sqlite3
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from starlette.requests import Request
from starlette.responses import JSONResponse

MAX_FEEDBACK_BYTES = 4096


@dataclass(frozen=True)
class PredictionRecord:
    """What a later feedback needs to be joined to its prediction."""

    request_id: str
    time: float
    model_version: str
    label: str
    probabilities: dict[str, float]
    pet_score: float | None = None
    feedback: str | None = None


class PredictionStore(Protocol):
    def add(self, record: PredictionRecord) -> None: ...
    def get(self, request_id: str) -> PredictionRecord | None: ...
    def set_feedback(self, request_id: str, label: str) -> None: ...
    def close(self) -> None: ...


class MemoryStore:
    """The `size` most recent predictions of this process, oldest evicted first; lost on restart."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.records: OrderedDict[str, PredictionRecord] = OrderedDict()
        self.lock = threading.Lock()

    def add(self, record: PredictionRecord) -> None:
        with self.lock:
            self.records[record.request_id] = record
            self.records.move_to_end(record.request_id)
            while len(self.records) > self.size:
                self.records.popitem(last=False)

    def get(self, request_id: str) -> PredictionRecord | None:
        with self.lock:
            return self.records.get(request_id)

    def set_feedback(self, request_id: str, label: str) -> None:
        with self.lock:
            if request_id in self.records:
                self.records[request_id] = dataclasses.replace(self.records[request_id], feedback=label)

    def close(self) -> None:
        pass


class SqliteStore:
    """The `size` most recent predictions in a SQLite file: survives restarts; one host (processes share it)."""

    SCHEMA = """CREATE TABLE IF NOT EXISTS predictions (
        seq INTEGER PRIMARY KEY AUTOINCREMENT, request_id TEXT UNIQUE NOT NULL, time REAL NOT NULL,
        model_version TEXT NOT NULL, label TEXT NOT NULL, probabilities TEXT NOT NULL, pet_score REAL,
        feedback TEXT, feedback_time REAL)"""

    def __init__(self, path: Path, size: int) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.size = size
        self.lock = threading.Lock()
        self.db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=5)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")  # WAL: a crash loses at most the last commits, never the file
        self.db.execute(self.SCHEMA)

    def add(self, record: PredictionRecord) -> None:
        with self.lock:
            cursor = self.db.execute(
                "INSERT OR REPLACE INTO predictions (request_id, time, model_version, label, probabilities, pet_score)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (record.request_id, record.time, record.model_version, record.label,
                 json.dumps(record.probabilities), record.pet_score),
            )  # fmt: skip
            self.db.execute("DELETE FROM predictions WHERE seq <= ?", ((cursor.lastrowid or 0) - self.size,))

    def get(self, request_id: str) -> PredictionRecord | None:
        with self.lock:
            row = self.db.execute(
                "SELECT request_id, time, model_version, label, probabilities, pet_score, feedback"
                " FROM predictions WHERE request_id = ?",
                (request_id,),
            ).fetchone()
        if row is None:
            return None
        return PredictionRecord(row[0], row[1], row[2], row[3], json.loads(row[4]), row[5], row[6])

    def set_feedback(self, request_id: str, label: str) -> None:
        with self.lock:
            self.db.execute(
                "UPDATE predictions SET feedback = ?, feedback_time = ? WHERE request_id = ?",
                (label, time.time(), request_id),
            )

    def close(self) -> None:
        with self.lock:
            self.db.close()


def open_store(size: int, db: Path | None) -> PredictionStore:
    """SQLite when FEEDBACK_DB names a file, else in memory."""
    return SqliteStore(db, size) if db else MemoryStore(size)


def parse_feedback(body: bytes) -> tuple[str, str]:
    """(request_id, label) from a JSON body, or ValueError saying what is wrong."""
    try:
        payload: Any = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise ValueError("the body is not valid JSON") from None
    if not isinstance(payload, dict):
        raise ValueError('send a JSON object: {"request_id": "...", "label": "..."}')
    request_id, label = payload.get("request_id"), payload.get("label")
    if not isinstance(request_id, str) or not request_id:
        raise ValueError("'request_id' must be a non-empty string (the X-Request-ID of the prediction)")
    if not isinstance(label, str):
        raise ValueError("'label' must be a string")
    return request_id, label


async def feedback(request: Request) -> JSONResponse:
    """POST /feedback {"request_id", "label"}: the true label of a recent prediction."""
    from server.app import ClientError, limited_stream, require_model  # server.app imports this module

    model = require_model(request)
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/json":
        raise ClientError(415, "unsupported_media_type", 'send application/json: {"request_id": "...", "label": "..."}')
    body = b"".join([chunk async for chunk in limited_stream(request, MAX_FEEDBACK_BYTES)])
    try:
        request_id, label = parse_feedback(body)
    except ValueError as error:
        raise ClientError(400, "invalid_feedback", str(error)) from None
    if label not in model.labels:
        raise ClientError(422, "unknown_label", f"{label!r} is not a label of the model: {', '.join(model.labels)}")
    observer = request.app.state.observer
    record = observer.store.get(request_id)
    if record is None:
        raise ClientError(404, "unknown_request_id", f"no recent prediction has request id {request_id!r}")
    if record.feedback not in (None, label):
        raise ClientError(409, "feedback_conflict", f"this prediction already has the feedback {record.feedback!r}")
    correct = label == record.label
    if record.feedback is None:  # a repeat of the same answer is accepted and counted once
        observer.store.set_feedback(request_id, label)
        observer.metrics.feedback.labels(label, str(correct).lower()).inc()
        observer.log_feedback(record, label, correct)
    request.scope["state"]["log"] = {"feedback": label, "correct": correct}
    return JSONResponse(
        {"request_id": request_id, "label": label, "predicted": record.label, "correct": correct,
         "model_version": record.model_version},
    )  # fmt: skip

"""The prediction store: the recent predictions kept by id, so that a later POST /feedback can be joined to one."""

from __future__ import annotations

import dataclasses
import json
import sqlite3
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol


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

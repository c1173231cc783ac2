"""The prediction store: recent predictions kept by the id the server issued, so that a later POST /feedback can be
joined to one. Predictions that got a feedback are kept apart from the others: the `size` most recent of each.

One schema and one code path for SQLite (a file: survives restarts, shared by one host's processes; or memory, the
default) and PostgreSQL (`FEEDBACK_DB=postgresql://...`: shared by several processes and replicas). Recording a
feedback is one atomic statement, `UPDATE ... WHERE prediction_id = ? AND feedback IS NULL`, whose row count decides:
two processes racing to give one prediction different labels cannot both win.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from enum import Enum
from typing import Any

import psycopg

from server.config import POSTGRES_SCHEMES

SCHEMA_VERSION = 1
STATEMENT_TIMEOUT_MS = 5000  # a PostgreSQL statement past it fails (503), never holds the store's thread for long
SCHEMA = (
    "CREATE TABLE IF NOT EXISTS store_schema (version INTEGER NOT NULL)",
    """CREATE TABLE IF NOT EXISTS predictions (
        prediction_id TEXT PRIMARY KEY, request_id TEXT NOT NULL, time DOUBLE PRECISION NOT NULL,
        model_version TEXT NOT NULL, label TEXT NOT NULL, probabilities TEXT NOT NULL, pet_score DOUBLE PRECISION,
        image TEXT, feedback TEXT, feedback_time DOUBLE PRECISION)""",
    "CREATE INDEX IF NOT EXISTS predictions_by_time ON predictions (time)",
    "CREATE INDEX IF NOT EXISTS predictions_by_image ON predictions (image)",
)
COLUMNS = "prediction_id, request_id, time, model_version, label, probabilities, pet_score, image, feedback"
STORE_ERRORS = (OSError, sqlite3.Error, psycopg.Error)  # a store that fails: 503 to a feedback, never a 500


@dataclass(frozen=True)
class PredictionRecord:
    """What a later feedback needs to be joined to its prediction."""

    prediction_id: str  # issued by the server: 128 random bits
    request_id: str  # the request's X-Request-ID, for tracing only
    time: float
    model_version: str
    label: str
    probabilities: dict[str, float]
    pet_score: float | None = None
    image: str | None = None  # the kept photo's name in FEEDBACK_IMAGES (its sha256), when photos are kept
    feedback: str | None = None


class Feedback(Enum):
    RECORDED = "recorded"  # the first label given for this prediction
    REPEATED = "repeated"  # the same label again: accepted, counted once
    CONFLICT = "conflict"  # a different label was recorded first
    UNKNOWN = "unknown"  # never issued, or no longer kept


class StoreError(Exception):
    """A database this service cannot use (another schema version)."""


class PredictionStore:
    """The `size` most recent predictions (oldest evicted) in SQLite or PostgreSQL. A PostgreSQL store connects on
    first use (a server that is down does not stop the service: feedback answers 503 until it is back) and opens a
    new connection once when the old one broke (a server restart)."""

    def __init__(self, target: str | None, size: int) -> None:
        self.target = str(target) if target else None  # a path given as a Path
        self.postgres = bool(self.target and self.target.startswith(POSTGRES_SCHEMES))
        self.placeholder = "%s" if self.postgres else "?"
        self.size = size
        self.lock = threading.RLock()  # one connection per process, used by one thread at a time
        self.added = 0
        self.db: Any = None
        if not self.postgres:
            with self.lock:
                self.connect()

    @property
    def shared(self) -> bool:
        """Whether other processes write this store too (a SQLite file, PostgreSQL), not this process's memory."""
        return self.target is not None

    def connect(self) -> None:
        if self.postgres:
            timeout = f"-c statement_timeout={STATEMENT_TIMEOUT_MS}"
            self.db = psycopg.connect(self.target, autocommit=True, connect_timeout=3, keepalives=1,
                                      keepalives_idle=30, options=timeout)  # fmt: skip
        else:
            self.db = sqlite3.connect(self.target or ":memory:", check_same_thread=False, isolation_level=None,
                                      timeout=5)  # fmt: skip
            if self.target:
                self.db.execute("PRAGMA journal_mode=WAL")
                self.db.execute("PRAGMA synchronous=NORMAL")  # WAL: a crash loses at most the last commits
        self.migrate()

    def run(self, sql: str, params: tuple = ()) -> Any:
        """One statement (the lock held); `?` placeholders in both dialects."""
        if self.db is None:
            self.connect()
        try:
            return self.db.execute(sql.replace("?", self.placeholder), params)
        except psycopg.OperationalError:
            if not (self.db.closed or self.db.broken):
                raise  # a statement that failed, on a good connection
            self.db = None  # the server went away: one new connection, one more try
            self.connect()
            return self.db.execute(sql.replace("?", self.placeholder), params)

    def migrate(self) -> None:
        """Create the schema, or check it is this service's version. A predictions table of the layout before
        schema versions (keyed by the client's request id) is kept as predictions_v0. Serialised between processes
        (PostgreSQL's advisory lock; SQLite's write lock), as several may start at once."""
        with self.lock:
            db = self.db
            db.execute("SELECT pg_advisory_lock(7230613)" if self.postgres else "BEGIN IMMEDIATE")
            try:
                if not self.has_table("store_schema") and self.has_table("predictions"):
                    self.run("ALTER TABLE predictions RENAME TO predictions_v0")
                for statement in SCHEMA:
                    self.run(statement)
                self.run("INSERT INTO store_schema (version) SELECT ? WHERE NOT EXISTS "
                         "(SELECT 1 FROM store_schema)", (SCHEMA_VERSION,))  # fmt: skip
                [version] = self.run("SELECT version FROM store_schema").fetchone()
            finally:
                db.execute("SELECT pg_advisory_unlock(7230613)" if self.postgres else "COMMIT")
        if version != SCHEMA_VERSION:
            raise StoreError(f"the feedback store has schema version {version}; this service reads {SCHEMA_VERSION}")

    def has_table(self, name: str) -> bool:
        if self.postgres:
            row = self.run("SELECT to_regclass(?)", (name,)).fetchone()
            return row[0] is not None
        return self.run("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)).fetchone() is not None

    def add(self, record: PredictionRecord) -> None:
        self.add_many([record])

    def add_many(self, records: list[PredictionRecord]) -> None:
        """Insert predictions: on SQLite in one transaction (one commit, not one per prediction); on PostgreSQL one
        statement at a time, the lock taken for each, so a feedback never waits behind a whole batch."""
        if not records:
            return
        rows = [(r.prediction_id, r.request_id, r.time, r.model_version, r.label, json.dumps(r.probabilities),
                 r.pet_score, r.image, None) for r in records]  # fmt: skip
        insert = f"INSERT INTO predictions ({COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
        if self.postgres:
            for row in rows:
                with self.lock:
                    self.run(insert, row)
        else:
            with self.lock:
                self.run("BEGIN")
                try:
                    for row in rows:
                        self.run(insert, row)
                    self.run("COMMIT")
                except BaseException:
                    if self.db.in_transaction:  # a failed COMMIT (busy, full disk) leaves it open too
                        self.db.rollback()
                    raise
        with self.lock:
            step = max(1, self.size // 100)
            crossed = (self.added + len(records)) // step > self.added // step
            self.added += len(records)
            if crossed:  # evict in steps of 1% of the size
                # the `size` most recent predictions without feedback, and the `size` most recent with one: feedback
                # is what a retrained model learns from, and no client can grow the store past 2 x size
                self.run("DELETE FROM predictions WHERE feedback IS NULL AND time < (SELECT time FROM predictions "
                         "WHERE feedback IS NULL ORDER BY time DESC LIMIT 1 OFFSET ?)", (self.size - 1,))  # fmt: skip
                self.run("DELETE FROM predictions WHERE feedback IS NOT NULL AND feedback_time < (SELECT "
                         "feedback_time FROM predictions WHERE feedback IS NOT NULL ORDER BY feedback_time DESC "
                         "LIMIT 1 OFFSET ?)", (self.size - 1,))  # fmt: skip

    def get(self, prediction_id: str) -> PredictionRecord | None:
        with self.lock:
            row = self.run(f"SELECT {COLUMNS} FROM predictions WHERE prediction_id = ?", (prediction_id,)).fetchone()
        return None if row is None else self.record(row)

    def feedback_rows(self) -> list[PredictionRecord]:
        """Every kept prediction that got a feedback and whose photo was kept (what `make harvest` reads)."""
        with self.lock:
            rows = self.run(f"SELECT {COLUMNS} FROM predictions WHERE feedback IS NOT NULL AND image IS NOT NULL "
                            "ORDER BY time").fetchall()  # fmt: skip
        return [self.record(row) for row in rows]

    @staticmethod
    def record(row: tuple) -> PredictionRecord:
        return PredictionRecord(row[0], row[1], row[2], row[3], row[4], json.loads(row[5]), row[6], row[7], row[8])

    def labelled(self, image: str) -> bool:
        """Whether any prediction of this kept photo got a feedback (it is then kept for `make harvest`)."""
        with self.lock:
            row = self.run("SELECT 1 FROM predictions WHERE image = ? AND feedback IS NOT NULL LIMIT 1", (image,))
            return row.fetchone() is not None

    def give_feedback(self, prediction_id: str, label: str) -> tuple[Feedback, PredictionRecord | None]:
        """Record `label` for a prediction, first come first served; what happened, and the prediction."""
        with self.lock:
            changed = self.run(
                "UPDATE predictions SET feedback = ?, feedback_time = ? WHERE prediction_id = ? AND feedback IS NULL",
                (label, time.time(), prediction_id),
            ).rowcount
        record = self.get(prediction_id)
        if record is None:
            return Feedback.UNKNOWN, None
        if changed == 1:
            return Feedback.RECORDED, record
        return (Feedback.REPEATED if record.feedback == label else Feedback.CONFLICT), record

    def close(self) -> None:
        with self.lock:
            if self.db is not None:  # a PostgreSQL store that never connected
                self.db.close()

"""The prediction store: recent predictions kept by the id the server issued, so that a later POST /feedback can be
joined to one. Predictions that got a feedback are kept apart from the others: the `size` most recent of each.

One schema and one code path for SQLite (a file: survives restarts, shared by one host's processes; or memory, the
default) and PostgreSQL (`FEEDBACK_DB=postgresql://...`: shared by several processes and replicas). Recording a
feedback is one atomic statement, `UPDATE ... WHERE prediction_id = ? AND feedback IS NULL`, whose row count decides:
two processes racing to give one prediction different labels cannot both win.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import psycopg

from server.config import POSTGRES_SCHEMES

# Two numbers, as SQLite's own file format keeps a read and a write version apart: a reader checks `version` and
# refuses any other (bumped only by a change older code cannot read or write safely); `revision` counts the additive
# steps (columns older code never names), so the previous release still runs on an upgraded store (a blue/green
# rollback). Revision 2: each label's source (a key's name or "anonymous") and is_pet. Revision 3: when harvest took
# a label (harvested_time): a label with a photo is evicted only once harvested. MIGRATIONS lead here.
SCHEMA_VERSION = 1
SCHEMA_REVISION = 3
READ_REVISION = 2  # the oldest revision a read-only store (harvest) reads: feedback_rows needs its columns
HARVESTED_REVISION = 3  # the oldest that mark_harvested can write
MARK_CHUNK = 200  # labels marked harvested per statement, 4 parameters each (SQLite before 3.32 takes 999)
STATEMENT_TIMEOUT_MS = 5000  # a PostgreSQL statement past it fails (503), never holds the store's thread for long
# The server's statement_timeout needs a server that answers. A database that stops answering on an open connection
# (a partition, a failover, a frozen VM) is bounded here, at the client: connecting (libpq's connect_timeout); data
# sent and never acknowledged (tcp_user_timeout); a silent peer (TCP keepalives after 5 s idle, every 2 s, 3 lost:
# 11 s); and whatever still hangs, a peer whose kernel acknowledges but whose server never answers (a stopped process
# or proxy), by a watchdog that cuts the connection of a statement past STATEMENT_DEADLINE_S. Each thread has its own
# connection, so no lock is held while one waits on the network.
CONNECT_TIMEOUT_S = 3
STATEMENT_DEADLINE_S = STATEMENT_TIMEOUT_MS / 1000 + 2  # the server's own timeout answers first when it can
# tcp_user_timeout past the watchdog's deadline: on Linux it also ends a connection whose keepalives go unanswered,
# and the watchdog must come first where both would (a statement it cut is never tried again; one the kernel ended
# may be, on a new connection)
KEEPALIVES = {"keepalives": 1, "keepalives_idle": 5, "keepalives_interval": 2, "keepalives_count": 3,
              "tcp_user_timeout": int((STATEMENT_DEADLINE_S + 3) * 1000)}  # fmt: skip
SCHEMA = (
    "CREATE TABLE IF NOT EXISTS store_schema (version INTEGER NOT NULL, revision INTEGER)",
    """CREATE TABLE IF NOT EXISTS predictions (
        prediction_id TEXT PRIMARY KEY, request_id TEXT NOT NULL, time DOUBLE PRECISION NOT NULL,
        model_version TEXT NOT NULL, label TEXT NOT NULL, probabilities TEXT NOT NULL, pet_score DOUBLE PRECISION,
        image TEXT, feedback TEXT, feedback_time DOUBLE PRECISION, feedback_source TEXT, is_pet INTEGER,
        harvested_time DOUBLE PRECISION)""",
    "CREATE INDEX IF NOT EXISTS predictions_by_time ON predictions (time)",
    "CREATE INDEX IF NOT EXISTS predictions_by_image ON predictions (image)",
)
# A label waits for harvest while harvest has not taken it and its photo was kept: one without a photo (FEEDBACK_DB
# without FEEDBACK_IMAGES) is nothing harvest can read or mark, so it never counts against the bound and is evicted
# like a taken one. WAITING is what POST /feedback counts against the store's bound, by source; its index with it.
WAITING = "harvested_time IS NULL AND image IS NOT NULL"
EVICTABLE = "(harvested_time IS NOT NULL OR image IS NULL)"
UNHARVESTED_INDEX = ("CREATE INDEX IF NOT EXISTS predictions_unharvested ON predictions (feedback_source) "
                     f"WHERE feedback IS NOT NULL AND {WAITING}")  # fmt: skip
COLUMNS = (
    "prediction_id, request_id, time, model_version, label, probabilities, pet_score, image, feedback, "
    "feedback_source, is_pet"
)
READ_COLUMNS = f"{COLUMNS}, feedback_time"  # what a record is read with
ANONYMOUS = "anonymous"  # server.keys.ANONYMOUS: the source of a label given without a key
ANONYMOUS_LABEL = f"feedback IS NOT NULL AND (feedback_source IS NULL OR feedback_source = '{ANONYMOUS}')"
TRUSTED_LABEL = f"feedback IS NOT NULL AND feedback_source IS NOT NULL AND feedback_source <> '{ANONYMOUS}'"
# Version 1 shipped in two layouts: the first feedback commit's (no image column) and the one the photo column was
# added to under the same number. Every step is idempotent (a column is added only when missing), so both upgrade.
# The labels recorded before sources existed came from clients without keys: they are "anonymous".
MIGRATIONS: dict[int, tuple[tuple[str, str, str], ...]] = {  # revision -> its steps to the next one
    1: (
        ("store_schema", "revision", "ALTER TABLE store_schema ADD COLUMN revision INTEGER"),
        ("predictions", "image", "ALTER TABLE predictions ADD COLUMN image TEXT"),
        ("predictions", "feedback_source", "ALTER TABLE predictions ADD COLUMN feedback_source TEXT"),
        ("predictions", "is_pet", "ALTER TABLE predictions ADD COLUMN is_pet INTEGER"),
        ("", "", f"UPDATE predictions SET feedback_source = '{ANONYMOUS}' WHERE feedback IS NOT NULL "
                 "AND feedback_source IS NULL"),
        ("", "", "CREATE INDEX IF NOT EXISTS predictions_by_image ON predictions (image)"),
    ),
    2: (
        ("predictions", "harvested_time", "ALTER TABLE predictions ADD COLUMN harvested_time DOUBLE PRECISION"),
        ("", "", UNHARVESTED_INDEX),
    ),
}  # fmt: skip


class StoreError(Exception):
    """A database this service cannot use (a newer schema version, or one that is not there read-only), or one that
    did not answer in time."""


class StoreTimeout(StoreError):
    """A statement cut by the Watchdog: the database did not answer in time (retried later, never `error`)."""


@dataclass(eq=False)
class Watch:
    """One statement the Watchdog watches (its identity, not its thread's, is what a cut names)."""

    deadline: float
    db: Any
    cut: bool = False  # its connection was shut down: the statement failed, or finished just as it was cut


class Watchdog:
    """Cuts the connection of a PostgreSQL statement that runs past its deadline: the socket is shut down, so the
    thread blocked on it gets an error at once (the connection is then dropped, and a new one made on next use).

    The cut happens under the lock a statement takes to end its watch, so it reaches that statement's connection and
    no other: a statement that finishes just as it is cut waits for the cut, keeps its answer and leaves its dead
    connection to be dropped (PredictionStore.run), never to the thread's next statement; and the connection (its
    file descriptor) is still open while it is cut."""

    def __init__(self, deadline_s: float) -> None:
        self.deadline_s = deadline_s
        self.lock = threading.Lock()
        self.running: set[Watch] = set()
        self.thread: threading.Thread | None = None

    @contextlib.contextmanager
    def watch(self, db: Any) -> Iterator[Watch]:
        statement = Watch(time.monotonic() + self.deadline_s, db)
        with self.lock:
            self.running.add(statement)
            if self.thread is None:
                self.thread = threading.Thread(target=self.patrol, name="store-watchdog", daemon=True)
                self.thread.start()
        try:
            yield statement
        except Exception:
            with self.lock:
                self.running.discard(statement)
            if statement.cut:
                raise StoreTimeout(f"the database did not answer within {self.deadline_s:g} s") from None
            raise
        finally:
            with self.lock:
                self.running.discard(statement)

    def patrol(self) -> None:
        while True:
            time.sleep(min(0.25, self.deadline_s / 4))
            now = time.monotonic()
            with self.lock:
                for statement in [s for s in self.running if s.deadline < now]:
                    statement.cut = True
                    self.running.discard(statement)
                    with contextlib.suppress(OSError, psycopg.Error):
                        cut = socket.socket(fileno=os.dup(statement.db.fileno()))
                        with cut:
                            cut.shutdown(socket.SHUT_RDWR)


STORE_ERRORS = (OSError, sqlite3.Error, psycopg.Error, StoreError)  # a store that fails: 503 to a feedback, never 500


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
    feedback_source: str | None = None  # who gave the feedback: a key's name, or "anonymous"
    is_pet: bool | None = None  # what the service answered (None: no pet output, or recorded before schema 2)
    harvested: bool = False  # harvest took its label (read by give_feedback only: a revision 3 column)
    feedback_time: float | None = None  # when its label was given (with label and source: the label harvest read)


class Feedback(Enum):
    RECORDED = "recorded"  # the first label given for this prediction
    REPEATED = "repeated"  # the same label again: accepted, counted once
    REPLACED = "replaced"  # a key's label in place of an anonymous one: accepted, live accuracy keeps the first
    CONFLICT = "conflict"  # a different label was recorded first
    FULL = "full"  # refused: the store holds `size` labels of its source's kind waiting for harvest
    UNKNOWN = "unknown"  # never issued, or no longer kept


class PredictionStore:
    """The `size` most recent predictions (oldest evicted) in SQLite or PostgreSQL. A PostgreSQL store connects on
    first use (a server that is down does not stop the service: feedback answers 503 until it is back) and opens a
    new connection once when the old one broke (a server restart)."""

    def __init__(self, target: str | None, size: int, read_only: bool = False) -> None:
        self.target = str(target) if target else None  # a path given as a Path
        # `make harvest`: never creates a database (a mistyped path is an error) nor migrates one, and writes nothing
        # but mark_harvested's UPDATE of rows that are there
        self.read_only = read_only
        self.postgres = bool(self.target and self.target.startswith(POSTGRES_SCHEMES))
        self.placeholder = "%s" if self.postgres else "?"
        self.size = size
        # SQLite: one connection per process, used by one thread at a time (a local file: no network wait under the
        # lock). PostgreSQL: one connection per thread, nothing held while a statement waits on the network.
        self.lock: contextlib.AbstractContextManager[Any] = (
            contextlib.nullcontext() if self.postgres else threading.RLock()
        )
        self.local = threading.local()
        self.shared_db: Any = None
        self.connections: list[Any] = []  # every PostgreSQL connection made, to close them all
        self.connections_lock = threading.Lock()
        self.watchdog = Watchdog(STATEMENT_DEADLINE_S) if self.postgres else None
        self.added = 0
        self.revision_seen = 0  # the store's revision, as the last connection's check found it
        self.error: str | None = None  # why this store cannot be used (its schema): /ready fails, feedback is 503
        if not self.postgres or read_only:
            with self.lock:
                try:
                    self.connect()
                except StoreError:
                    if read_only:
                        raise  # harvest says so; the service's /ready does (self.error)

    def probe(self) -> None:
        """Connect now (the service's start-up), so that a store it cannot use shows in /ready at once; a server
        that is down is left for the first use, as before."""
        with self.lock, contextlib.suppress(*STORE_ERRORS):
            if self.db is None:
                self.connect()

    @property
    def db(self) -> Any:
        return getattr(self.local, "db", None) if self.postgres else self.shared_db

    @db.setter
    def db(self, value: Any) -> None:
        if self.postgres:
            self.local.db = value
        else:
            self.shared_db = value

    @property
    def shared(self) -> bool:
        """Whether other processes write this store too (a SQLite file, PostgreSQL), not this process's memory."""
        return self.target is not None

    def connect(self) -> None:
        if self.postgres:
            options = f"-c statement_timeout={STATEMENT_TIMEOUT_MS}"
            if self.read_only:  # mark_harvested alone opens a read-write transaction
                options += " -c default_transaction_read_only=on"
            self.db = psycopg.connect(self.target, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S,
                                      options=options, **KEEPALIVES)  # fmt: skip
            with self.connections_lock:
                self.connections = [db for db in self.connections if not db.closed] + [self.db]
        elif self.read_only:
            if not self.target or not Path(self.target).is_file():
                raise StoreError(f"no feedback store at {self.target!r}: give the FEEDBACK_DB the service wrote")
            # mode=rw never creates a file; mark_harvested writes (a write-protected file is opened read-only)
            self.db = sqlite3.connect(f"{Path(self.target).resolve().as_uri()}?mode=rw", uri=True,
                                      check_same_thread=False, isolation_level=None, timeout=5)  # fmt: skip
        else:
            self.db = sqlite3.connect(self.target or ":memory:", check_same_thread=False, isolation_level=None,
                                      timeout=5)  # fmt: skip
            if self.target:
                self.db.execute("PRAGMA journal_mode=WAL")
                self.db.execute("PRAGMA synchronous=NORMAL")  # WAL: a crash loses at most the last commits
        try:
            self.migrate()
        except BaseException as error:  # not upgraded: never left half-connected on the old layout
            if isinstance(error, StoreError) and not isinstance(error, StoreTimeout):
                self.error = str(error)
            if self.db is not None:  # dropped already when a statement was cut
                with contextlib.suppress(psycopg.Error, sqlite3.Error, OSError):
                    self.db.close()
            self.db = None
            raise

    def run(self, sql: str, params: tuple = (), retry: bool = True) -> Any:
        """One statement (the lock held); `?` placeholders in both dialects. On PostgreSQL a connection found broken
        is replaced and the statement tried once more, unless `retry` is False (a statement inside a transaction:
        the new connection is not in it)."""
        if self.error:
            raise StoreError(self.error)
        if self.db is None:
            self.connect()
        if not self.postgres:
            return self.db.execute(sql.replace("?", self.placeholder), params)
        assert self.watchdog is not None
        try:
            with self.watchdog.watch(self.db) as statement:
                result = self.db.execute(sql.replace("?", self.placeholder), params)
            if statement.cut:  # it finished as it was cut: its answer stands, its connection is dead
                self.drop()
            return result
        except StoreTimeout:  # cut by the watchdog: never tried again, the statement may have run
            self.drop()
            raise
        except psycopg.OperationalError:
            if not (self.db.closed or self.db.broken):
                raise  # a statement that failed, on a good connection
            if not retry:
                self.drop()
                raise
            self.drop()  # the server went away: one new connection, one more try
            self.local.retried = True  # the first try may have committed before the connection broke
            self.connect()
            with self.watchdog.watch(self.db) as statement:
                result = self.db.execute(sql.replace("?", self.placeholder), params)
            if statement.cut:
                self.drop()
            return result

    def drop(self) -> None:
        """Forget this thread's broken connection (the next statement makes a new one)."""
        with contextlib.suppress(psycopg.Error, OSError):
            self.db.close()
        self.db = None

    def migrate(self) -> None:
        """Create the schema, or upgrade an older revision step by step (MIGRATIONS), in one transaction with the
        revision bump on both databases; another `version` is a StoreError (a newer revision is not: its columns are
        additive). A predictions table of the layout before schema versions (keyed by the client's request id) is
        kept as predictions_v0. Serialised between processes (PostgreSQL's advisory lock in a transaction; SQLite's
        write lock), as several may start at once. A read-only store (harvest) is checked, never created or changed."""
        with self.lock:
            db = self.db
            if self.read_only:
                version, revision = self.version(), self.revision()
                if version != SCHEMA_VERSION or revision < READ_REVISION:
                    raise StoreError(f"the feedback store at {self.where()} has schema version {version} revision "
                                     f"{revision}; this reads {SCHEMA_VERSION} revision {READ_REVISION} or later "
                                     "(start the service on it once to upgrade it)")  # fmt: skip
                self.revision_seen = revision
                return
            step = self.watchdog.watch if self.watchdog else lambda _: contextlib.nullcontext()
            with step(db):  # a server that stops answering here is cut too (the connection is then dropped)
                db.execute("BEGIN" if self.postgres else "BEGIN IMMEDIATE")
            try:
                if self.postgres:
                    with step(db):
                        db.execute("SELECT pg_advisory_xact_lock(7230613)")
                if not self.has_table("store_schema") and self.has_table("predictions"):
                    self.run("ALTER TABLE predictions RENAME TO predictions_v0")
                version = self.version()
                if version is None:
                    for statement in (*SCHEMA, UNHARVESTED_INDEX):
                        self.run(statement)
                    self.run("INSERT INTO store_schema (version, revision) VALUES (?, ?)",
                             (SCHEMA_VERSION, SCHEMA_REVISION))  # fmt: skip
                    version = SCHEMA_VERSION
                if version == 2 and not self.has_column("store_schema", "revision"):
                    # written by this work's first cut, which counted the additive step as version 2: the same layout
                    self.run("ALTER TABLE store_schema ADD COLUMN revision INTEGER")
                    self.run("UPDATE store_schema SET version = ?, revision = ?", (SCHEMA_VERSION, 2))
                    version = SCHEMA_VERSION
                revision = self.revision()
                while version == SCHEMA_VERSION and revision in MIGRATIONS:
                    for table, column, statement in MIGRATIONS[revision]:
                        if not column or not self.has_column(table, column):
                            self.run(statement)
                    revision += 1
                    self.run("UPDATE store_schema SET revision = ?", (revision,))
                self.revision_seen = revision
                with step(db):
                    db.execute("COMMIT")
            except BaseException:
                if (not db.closed and db.broken is False) if self.postgres else db.in_transaction:
                    with step(db):
                        db.execute("ROLLBACK")
                raise
        if version != SCHEMA_VERSION:
            raise StoreError(f"the feedback store has schema version {version}; this service reads {SCHEMA_VERSION}")

    def version(self) -> int | None:
        if not self.has_table("store_schema"):
            return None
        row = self.run("SELECT version FROM store_schema").fetchone()
        return None if row is None else int(row[0])

    def revision(self) -> int:
        """The store's layout revision: 1 for a store from before revisions were counted."""
        if not self.has_column("store_schema", "revision"):
            return 1
        row = self.run("SELECT revision FROM store_schema").fetchone()
        return 1 if row is None or row[0] is None else int(row[0])

    def has_column(self, table: str, column: str) -> bool:
        if self.postgres:
            row = self.run("SELECT 1 FROM information_schema.columns WHERE table_name = ? AND column_name = ? "
                           "AND table_schema = current_schema()", (table, column)).fetchone()  # fmt: skip
            return row is not None
        return any(info[1] == column for info in self.run(f"PRAGMA table_info({table})").fetchall())

    def where(self) -> str:
        """The store's kind and place for messages and the start-up log: memory, a SQLite file's path, or a
        PostgreSQL URL's host, port and database (never its user or password)."""
        if self.target is None:
            return "memory (this process only; lost at restart)"
        if not self.postgres:
            return f"sqlite {self.target}"
        info = psycopg.conninfo.conninfo_to_dict(self.target)
        return f"postgresql://{info.get('host', '')}:{info.get('port', 5432)}/{info.get('dbname', '')}"

    def has_table(self, name: str) -> bool:
        if self.postgres:
            row = self.run("SELECT to_regclass(?)", (name,)).fetchone()
            return row[0] is not None
        return self.run("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)).fetchone() is not None

    def add(self, record: PredictionRecord) -> None:
        self.add_many([record])

    def add_many(self, records: list[PredictionRecord]) -> None:
        """Insert predictions: on SQLite in one transaction (one commit, not one per prediction); on PostgreSQL one
        statement at a time, the lock taken for each, so a feedback never waits behind a whole batch. Idempotent: a
        prediction the store holds already is left as it is (an insert that committed before its connection broke,
        tried again)."""
        if not records:
            return
        rows = [(r.prediction_id, r.request_id, r.time, r.model_version, r.label, json.dumps(r.probabilities),
                 r.pet_score, r.image, None, None, None if r.is_pet is None else int(r.is_pet))
                for r in records]  # fmt: skip
        insert = (f"INSERT INTO predictions ({COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                  "ON CONFLICT (prediction_id) DO NOTHING")  # fmt: skip
        if self.postgres:
            for row in rows:
                with self.lock:
                    self.run(insert, row)
        else:
            with self.lock:
                self.run("BEGIN")
                try:
                    self.db.executemany(insert, rows)  # SQLite's placeholder is `?`: run()'s translation not needed
                    self.run("COMMIT")
                except BaseException:
                    if self.db.in_transaction:  # a failed COMMIT (busy, full disk) leaves it open too
                        self.db.rollback()
                    raise
        with self.lock:
            # Evict in steps of a tenth of the size: each eviction walks the whole table (about 6 ms at 10,000 rows),
            # so a step of 1% cost every prediction 60 us of the observer's CPU; a table holds at most 10% more.
            step = max(1, self.size // 10)
            crossed = (self.added + len(records)) // step > self.added // step
            self.added += len(records)
            if crossed:
                # the `size` most recent predictions without feedback, and of the labels harvest took (or that have
                # no photo) the most recent of each source's kind, `size` minus those waiting (a repeated label
                # still finds its prediction). A label waiting for harvest is never evicted: give_feedback refuses
                # new ones past `size` of each kind instead, so a flood of anonymous labels never keeps a key's out,
                # and no client grows the store past about 5 x size.
                self.run("DELETE FROM predictions WHERE feedback IS NULL AND time < (SELECT time FROM predictions "
                         "WHERE feedback IS NULL ORDER BY time DESC LIMIT 1 OFFSET ?)", (self.size - 1,))  # fmt: skip
                for kind in (ANONYMOUS_LABEL, TRUSTED_LABEL):
                    # down to `size` labels of the kind in all, those waiting included: the previous release (the
                    # other colour, or after a rollback) keeps the `size` newest, harvested or not, and so finds
                    # nothing to evict, never a label waiting for harvest
                    waiting = self.run(f"SELECT COUNT(*) FROM predictions WHERE {kind} AND {WAITING}").fetchone()[0]
                    taken = f"{kind} AND {EVICTABLE}"
                    if waiting >= self.size:
                        self.run(f"DELETE FROM predictions WHERE {taken}")
                        continue
                    self.run(f"DELETE FROM predictions WHERE {taken} AND feedback_time < (SELECT feedback_time FROM "
                             f"predictions WHERE {taken} ORDER BY feedback_time DESC LIMIT 1 OFFSET ?)",
                             (self.size - waiting - 1,))  # fmt: skip

    def get(self, prediction_id: str) -> PredictionRecord | None:
        with self.lock:
            row = self.run(
                f"SELECT {READ_COLUMNS} FROM predictions WHERE prediction_id = ?", (prediction_id,)
            ).fetchone()
        return None if row is None else self.record(row)

    def feedback_rows(self) -> list[PredictionRecord]:
        """Every kept prediction that got a feedback and whose photo was kept (what `make harvest` reads)."""
        with self.lock:
            rows = self.run(f"SELECT {READ_COLUMNS} FROM predictions WHERE feedback IS NOT NULL AND image IS NOT NULL "
                            "ORDER BY time").fetchall()  # fmt: skip
        return [self.record(row) for row in rows]

    def mark_harvested(self, labels: list[PredictionRecord]) -> int:
        """Mark these labels, as feedback_rows read them, taken by harvest (or dropped by a person): from now on they
        may be evicted, and no longer count against the bound POST /feedback refuses labels at. Only the label read
        is marked (its prediction, label, source and time): one that replaced it since waits for the next harvest.
        How many of them the store holds, marked now or before (a harvest run again reports the same). Works
        read-only (harvest's store: it only updates rows that are there); a StoreError on a store older than
        revision 3 (start the service on it once to upgrade it)."""
        keys = list(dict.fromkeys((r.prediction_id, r.feedback, r.feedback_source, r.feedback_time) for r in labels))
        keys = [key for key in keys if None not in key]  # no label, or one read without its source or time
        now = time.time()
        marked = 0
        with self.lock:
            if self.db is None:
                self.connect()
            if self.revision_seen < HARVESTED_REVISION:
                raise StoreError(f"the feedback store at {self.where()} has schema revision {self.revision_seen}; "
                                 f"marking labels harvested needs revision {HARVESTED_REVISION} or later (start the "
                                 "service on it once to upgrade it)")  # fmt: skip
            label = "(prediction_id = ? AND feedback = ? AND feedback_source = ? AND feedback_time = ?)"
            for start in range(0, len(keys), MARK_CHUNK):
                chunk = keys[start : start + MARK_CHUNK]
                mark = (f"UPDATE predictions SET harvested_time = COALESCE(harvested_time, ?) WHERE "
                        f"{' OR '.join([label] * len(chunk))}")  # fmt: skip
                params = (now, *(value for key in chunk for value in key))
                if self.postgres and self.read_only:  # its connections' transactions are read-only by default
                    marked += self.in_transaction("BEGIN READ WRITE", mark, params).rowcount
                else:  # one statement, idempotent: safe to retry
                    marked += self.run(mark, params).rowcount
        return marked

    def in_transaction(self, begin: str, sql: str, params: tuple) -> Any:
        """One statement in its own transaction on this thread's connection, never retried on another."""
        self.run(begin)
        try:
            cursor = self.run(sql, params, retry=False)
            self.run("COMMIT", retry=False)
        except BaseException:
            if self.db is not None and not self.db.closed and not self.db.broken:
                with contextlib.suppress(*STORE_ERRORS):
                    self.run("ROLLBACK", retry=False)
            raise
        return cursor

    @staticmethod
    def record(row: tuple) -> PredictionRecord:
        return PredictionRecord(row[0], row[1], row[2], row[3], row[4], json.loads(row[5]), row[6], row[7], row[8],
                                row[9], None if row[10] is None else bool(row[10]),
                                len(row) > 12 and row[12] is not None, row[11])  # fmt: skip

    def give_feedback(
        self, prediction_id: str, label: str, source: str = ANONYMOUS
    ) -> tuple[Feedback, PredictionRecord | None]:
        """Record `label` from `source` (a key's name, or anonymous) for a prediction, first come first served,
        except that a key's label replaces an anonymous one (so an anonymous client who labels first cannot keep a
        trusted label out of training); what happened, and the prediction (`harvested` read too).

        A label is refused (FULL) while the store holds `size` labels of its source's kind (a key's, or anonymous)
        waiting for harvest (not taken yet, their photo kept): they are never evicted, and a label acknowledged is
        kept until harvest took it. The count is in the same statement; processes racing at the bound may pass it by
        the few labels in flight."""
        trusted = source != ANONYMOUS
        before = self.get(prediction_id) if trusted else None
        open_to = "feedback IS NULL"
        if trusted:
            open_to = "(feedback IS NULL OR feedback_source IS NULL OR feedback_source = ?)"
        kind = TRUSTED_LABEL if trusted else ANONYMOUS_LABEL
        waiting = f"(SELECT COUNT(*) FROM predictions WHERE {kind} AND {WAITING})"
        self.local.retried = False
        with self.lock:  # the record comes back with the change itself: nothing is read after the commit
            changed = self.run(
                f"UPDATE predictions SET feedback = ?, feedback_time = ?, feedback_source = ?, harvested_time = NULL "
                f"WHERE prediction_id = ? AND {open_to} AND {waiting} < ? RETURNING {READ_COLUMNS}",
                (label, time.time(), source, prediction_id, *((ANONYMOUS,) if trusted else ()), self.size),
            ).fetchone()
        first = Feedback.REPLACED if before and before.feedback else Feedback.RECORDED
        if changed is not None:
            return first, self.record(changed)
        retried = self.local.retried
        with self.lock:
            row = self.run(f"SELECT {READ_COLUMNS}, harvested_time FROM predictions WHERE prediction_id = ?",
                           (prediction_id,)).fetchone()  # fmt: skip
        if row is None:
            return Feedback.UNKNOWN, None
        record = self.record(row)
        if record.feedback is None or (trusted and record.feedback_source in (None, ANONYMOUS)):
            return Feedback.FULL, record  # it was open to this label: the bound refused it
        if retried and (record.feedback, record.feedback_source) == (label, source):
            return first, record  # the try before the broken connection committed: this is its answer
        return (Feedback.REPEATED if record.feedback == label else Feedback.CONFLICT), record

    def close(self) -> None:
        with self.lock:
            if not self.postgres and self.db is not None:
                self.db.close()
        with self.connections_lock:  # every thread's PostgreSQL connection
            for db in self.connections:
                with contextlib.suppress(psycopg.Error, OSError):
                    db.close()
            self.connections = []

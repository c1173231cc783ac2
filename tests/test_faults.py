"""The fault suite: every dependency of the service fails, hangs or is cut off, with real parts (a real PostgreSQL
behind a proxy these tests freeze and cut, a SQLite file another process locks, a full tmpfs, SIGKILL), while a
client sends what users send. After each fault: every prediction answered; every feedback answered, 503 being fine,
within STORE_TIMEOUT and two seconds of this machine's noise; the cheap routes answered within a second (normal is
a few ms; a route that waits behind the fault takes many seconds); memory within its bound; no acknowledged label
lost; and everything works again once the fault ends, without a restart."""

from __future__ import annotations

import os
import signal
import sqlite3
import threading
import time
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx2 as httpx
import psycopg
import pytest

from server import store as store_module
from server.config import MIB, Settings
from server.store import CONNECT_TIMEOUT_S, STATEMENT_DEADLINE_S, PredictionStore, StoreTimeout, Watchdog
from tests.faults import FaultProxy, Watch, fill, rss_mb, small_disk, sqlite_locked, timed
from tests.images import phone_photo, photo_bytes
from tests.postgres import fresh_database
from tests.service import Service
from tests.test_app import CAT, DOG

DEFAULTS = Settings.from_env({})
FEEDBACK_DEADLINE_S = DEFAULTS.store_timeout + 2
CHEAP_ROUTE_S = 1.0
OBSERVER_MB = 16  # a small bound for these tests, so that the uploads sent are many times it


def predict(client: httpx.Client, data: bytes) -> httpx.Response:
    return client.post("/predict", files={"file": ("photo.jpg", data, "image/jpeg")})


def prediction_id(client: httpx.Client, data: bytes) -> str:
    response = predict(client, data)
    assert response.status_code == 200, response.text
    return response.json()["prediction_id"]


def give(client: httpx.Client, prediction: str, label: str) -> tuple[int, float]:
    return timed(lambda: client.post("/feedback", json={"prediction_id": prediction, "label": label}))


def metric(client: httpx.Client, name: str) -> float:
    """The sum of a metric's samples whose line starts with `name` (labels included in `name` when given)."""
    lines = client.get("/metrics").text.splitlines()
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith(name))


def start(model: Path, **env: str) -> Service:
    service = Service(model, FEEDBACK_RATE="0", OBSERVER_MAX_BYTES=str(OBSERVER_MB * MIB), **env)
    service.wait_ready()
    return service


def under_fault(service: Service, client: httpx.Client, photos: int | list[bytes], labels: list[str]) -> dict:
    """While a fault lasts: `photos` phone-sized uploads (or these photos) from 8 clients and a feedback for each of
    `labels`' ids at once, the cheap routes and memory watched; what each saw."""
    sent = [phone_photo()] * photos if isinstance(photos, int) else photos
    with Watch(service.url, service.process.pid).running() as watch, ThreadPoolExecutor(8) as pool:
        uploads = pool.map(lambda data: predict(client, data).status_code, sent)
        feedbacks = list(pool.map(lambda id_: give(client, id_, "cat"), labels))
        predicted = list(uploads)
    seen = {
        "predictions": {status: predicted.count(status) for status in set(predicted)},
        "feedback": [status for status, _ in feedbacks],
        "feedback_worst_s": max(seconds for _, seconds in feedbacks),
        "cheap_worst_ms": {route: round(watch.worst_ms(route)) for route in watch.routes},
        "cheap_statuses": {route: set(statuses) for route, statuses in watch.statuses.items()},
        "rss_max_mb": max(watch.rss),
    }
    print(seen)
    return seen


def check(seen: dict, rss_before: float) -> None:
    print(f"memory: {rss_before:.0f} MB before the fault, at most {seen['rss_max_mb']:.0f} MB during it")
    assert set(seen["predictions"]) == {200}, seen
    assert set(seen["feedback"]) <= {200, 503} and seen["feedback_worst_s"] < FEEDBACK_DEADLINE_S, seen
    assert all(statuses == {200} for statuses in seen["cheap_statuses"].values()), seen
    assert all(ms < CHEAP_ROUTE_S * 1000 for ms in seen["cheap_worst_ms"].values()), seen
    # what is held: the observer's bound and the bodies admitted at once (MAX_ADMITTED_BYTES), nothing per upload
    bound = OBSERVER_MB + DEFAULTS.max_admitted_bytes / MIB
    assert seen["rss_max_mb"] - rss_before < bound, (seen, rss_before, bound)


def wait_working(client: httpx.Client, timeout: float = 30) -> float:
    """Seconds until a new prediction takes a feedback again."""
    started = time.perf_counter()
    while True:
        status, _ = give(client, prediction_id(client, photo_bytes(DOG)), "dog")
        if status == 200:
            return time.perf_counter() - started
        assert time.perf_counter() - started < timeout, status
        time.sleep(0.5)


def warm(client: httpx.Client) -> list[str]:
    """Phone photos from as many clients as under_fault's (the decoders' buffers grown before memory is measured)
    and three labels acknowledged."""
    phone = phone_photo()
    with ThreadPoolExecutor(8) as pool:
        assert set(pool.map(lambda _: predict(client, phone).status_code, range(16))) == {200}
    ids = [prediction_id(client, photo_bytes(CAT)) for _ in range(3)]
    assert [give(client, id_, "cat")[0] for id_ in ids] == [200] * 3
    return ids


@pytest.fixture
def proxied_postgres(postgres: str):
    """A fresh database reached through a FaultProxy; (the proxied URL, the direct URL, the proxy)."""
    direct = fresh_database(postgres)
    info = psycopg.conninfo.conninfo_to_dict(direct)
    proxy = FaultProxy((str(info["host"]), int(info["port"])))
    yield direct.replace(f":{info['port']}/", f":{proxy.port}/"), direct, proxy
    proxy.close()


def labels_in(direct: str, ids: list[str]) -> dict[str, str | None]:
    with psycopg.connect(direct) as db:
        rows = db.execute("SELECT prediction_id, feedback FROM predictions WHERE prediction_id = ANY(%s)", (ids,))
        return dict(rows.fetchall())


def test_a_hung_postgresql_costs_feedback_a_timely_503_and_nothing_else(onnx_model, proxied_postgres, tmp_path):
    proxied, direct, proxy = proxied_postgres
    service = start(onnx_model, FEEDBACK_DB=proxied, FEEDBACK_IMAGES=str(tmp_path / "images"))
    try:
        with httpx.Client(base_url=service.url, timeout=60) as client:
            acknowledged = warm(client)
            waiting = [prediction_id(client, photo_bytes(CAT)) for _ in range(12)]
            rss_before = rss_mb(service.process.pid)
            proxy.freeze()  # mid-session: every connection the service holds stops answering
            seen = under_fault(service, client, 120, waiting)
            check(seen, rss_before)
            proxy.thaw()
            print(f"feedback works again {wait_working(client):.1f} s after the database answers again")
            acknowledged += [id_ for id_, status in zip(waiting, seen["feedback"], strict=True) if status == 200]
            assert metric(client, 'catsdogs_observations_lost_total{reason="queue_full"}') > 0  # bounded, counted
        assert set(labels_in(direct, acknowledged).values()) == {"cat"}, labels_in(direct, acknowledged)
        assert len(labels_in(direct, acknowledged)) == len(acknowledged)
    finally:
        proxy.thaw()
        service.stop()


def test_a_postgresql_that_dies_and_comes_back(onnx_model, proxied_postgres, tmp_path):
    proxied, direct, proxy = proxied_postgres
    service = start(onnx_model, FEEDBACK_DB=proxied)
    try:
        with httpx.Client(base_url=service.url, timeout=60) as client:
            acknowledged = warm(client)
            waiting = [prediction_id(client, photo_bytes(CAT)) for _ in range(8)]
            rss_before = rss_mb(service.process.pid)
            proxy.cut()  # every connection reset, every new one refused
            seen = under_fault(service, client, 40, waiting)
            check(seen, rss_before)
            assert set(seen["feedback"]) == {503}
            proxy.restore()
            print(f"feedback works again {wait_working(client):.1f} s after the database is back")
        assert set(labels_in(direct, acknowledged).values()) == {"cat"}
    finally:
        service.stop()


def test_a_sqlite_file_locked_by_another_process(onnx_model, tmp_path):
    db = tmp_path / "feedback.db"
    service = start(onnx_model, FEEDBACK_DB=str(db))
    try:
        with httpx.Client(base_url=service.url, timeout=60) as client:
            acknowledged = warm(client)
            waiting = [prediction_id(client, photo_bytes(CAT)) for _ in range(8)]
            rss_before = rss_mb(service.process.pid)
            with sqlite_locked(db):
                seen = under_fault(service, client, 40, waiting)
            check(seen, rss_before)
            print(f"feedback works again {wait_working(client):.1f} s after the lock is let go")
        with sqlite3.connect(db) as store:
            found = dict(store.execute(f"SELECT prediction_id, feedback FROM predictions WHERE prediction_id IN "
                                       f"({','.join('?' * len(acknowledged))})", acknowledged).fetchall())  # fmt: skip
        assert found == dict.fromkeys(acknowledged, "cat")
    finally:
        service.stop()


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root (CI's machine runs the suite as root)")
def test_a_full_disk_for_photos_and_the_prediction_log(onnx_model, tmp_path):
    with small_disk(tmp_path / "disk") as disk:
        images, log = disk / "images", disk / "log" / "predictions.jsonl"
        log.parent.mkdir()
        service = start(onnx_model, FEEDBACK_DB=str(tmp_path / "feedback.db"), FEEDBACK_IMAGES=str(images),
                        PREDICTION_LOG=str(log), PREDICTION_LOG_SAMPLE_EVERY="1")  # fmt: skip
        try:
            with httpx.Client(base_url=service.url, timeout=60) as client:
                acknowledged = warm(client)
                filler = fill(disk)
                rss_before = rss_mb(service.process.pid)
                photos = [photo_bytes(f"cats/cat.{n}.jpg") for n in range(10, 50)]  # new photos: each is written
                waiting = [prediction_id(client, photo) for photo in photos[:8]]
                seen = under_fault(service, client, photos[8:], waiting)
                deadline = time.perf_counter() + 5
                while not metric(client, 'catsdogs_observations_lost_total{reason="image_failed"}'):
                    assert time.perf_counter() < deadline, "a photo that could not be kept is counted"
                    time.sleep(0.1)
                check(seen, rss_before)
                assert set(seen["feedback"]) == {200}  # the store is elsewhere: a label is taken, its photo not kept
                filler.unlink()  # the disk has room again
                wait_working(client)
                kept = prediction_id(client, photo_bytes(DOG))
                assert give(client, kept, "dog")[0] == 200
                time.sleep(0.5)
                assert list((images / "labelled-anonymous").glob("*.jpg")), "a photo is kept again, no restart"
                assert kept in log.read_text()  # and the log written again
        finally:
            service.stop()
        with sqlite3.connect(tmp_path / "feedback.db") as store:
            labelled = {row[0] for row in store.execute("SELECT prediction_id FROM predictions WHERE feedback = 'cat'")}
        assert set(acknowledged) <= labelled


def test_a_service_killed_during_writes_loses_no_acknowledged_label(onnx_model, tmp_path):
    db, images = tmp_path / "feedback.db", tmp_path / "images"
    env = {"FEEDBACK_DB": str(db), "FEEDBACK_IMAGES": str(images)}
    service = start(onnx_model, **env)
    acknowledged: list[str] = []
    photo = photo_bytes(CAT)

    def label_until_killed(_: int) -> None:
        with httpx.Client(base_url=service.url, timeout=10) as client:
            for _ in range(1000):
                try:
                    id_ = prediction_id(client, photo)
                    if give(client, id_, "cat")[0] == 200:
                        acknowledged.append(id_)
                except (httpx.TransportError, AssertionError):
                    return

    with ThreadPoolExecutor(4) as pool:
        running = pool.map(label_until_killed, range(4))
        time.sleep(4)
        service.process.send_signal(signal.SIGKILL)
        list(running)
    service.process.wait(timeout=10)
    assert len(acknowledged) > 10, acknowledged
    service = start(onnx_model, **env)
    try:
        with httpx.Client(base_url=service.url, timeout=60) as client:
            wait_working(client, timeout=10)
        with sqlite3.connect(db) as store:
            assert store.execute("PRAGMA integrity_check").fetchone() == ("ok",)
            rows = store.execute(f"SELECT prediction_id, feedback, image FROM predictions WHERE prediction_id IN "
                                 f"({','.join('?' * len(acknowledged))})", acknowledged).fetchall()  # fmt: skip
        assert {row[0]: row[1] for row in rows} == dict.fromkeys(acknowledged, "cat")
        assert all((images / "labelled-anonymous" / row[2]).is_file() for row in rows)  # kept for harvest
        print(f"{len(acknowledged)} labels acknowledged before SIGKILL, all there after the restart")
    finally:
        service.stop()


def test_the_store_bounds_each_postgresql_call_at_the_client(proxied_postgres):
    """A statement on a connection whose server stopped answering is cut by the store's watchdog, a new connection to
    it gives up at connect_timeout, neither marks the store unusable, and both work again once it answers."""
    proxied, _, proxy = proxied_postgres
    store, fresh = PredictionStore(proxied, 10), PredictionStore(proxied, 10)
    try:
        assert store.get("nothing") is None  # connected, schema made
        proxy.freeze()
        started = time.perf_counter()
        with pytest.raises(StoreTimeout):
            store.get("nothing")
        cut_after = time.perf_counter() - started
        started = time.perf_counter()
        with pytest.raises(psycopg.OperationalError):
            fresh.get("nothing")  # connecting
        gave_up_after = time.perf_counter() - started
        print(f"a statement cut after {cut_after:.1f} s; a connection given up after {gave_up_after:.1f} s")
        assert STATEMENT_DEADLINE_S <= cut_after < STATEMENT_DEADLINE_S + 1.5
        assert gave_up_after < CONNECT_TIMEOUT_S + 1.5
        proxy.thaw()
        assert store.get("nothing") is None and fresh.get("nothing") is None
        assert store.error is None and fresh.error is None
    finally:
        proxy.thaw()
        store.close()
        fresh.close()


def test_the_watchdog_cuts_the_late_statement_never_the_next_one(postgres, monkeypatch):
    """A statement that finishes just past its deadline, as the watchdog cuts it (held here between choosing it and
    shutting its socket down), keeps its answer and never hands the cut to its thread's next statement: an INSERT cut
    and tried again on a new connection would hit its own unique key (and the observer lose its batch)."""
    store = PredictionStore(fresh_database(postgres), 10)
    store.watchdog = Watchdog(1.0)
    store.run("CREATE TABLE once (id INTEGER PRIMARY KEY)")
    go, real_dup = threading.Event(), os.dup

    def late_dup(fd: int) -> int:  # the watchdog thread descheduled between choosing and cutting
        go.wait(3)
        return real_dup(fd)

    monkeypatch.setattr(store_module, "os", types.SimpleNamespace(dup=late_dup))
    try:
        assert store.run("SELECT 7 FROM pg_sleep(1.6)").fetchone() == (7,)  # past its 1 s deadline: answered
        threading.Timer(0.3, go.set).start()  # the cut lands now, if it still can
        store.run("INSERT INTO once SELECT 1 FROM pg_sleep(0.6)")  # well within its own deadline
        assert store.run("SELECT COUNT(*) FROM once").fetchone() == (1,)
    finally:
        go.set()
        store.close()

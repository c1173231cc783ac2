"""POST /feedback and the prediction store, in-process against the real seeded model."""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx2 as httpx
import pytest
from starlette.testclient import TestClient

from deploy.client import free_port
from server.app import create_app
from server.config import Settings
from server.images import ImageFolder
from server.observer import issued_at, new_prediction_id
from server.store import Feedback, PredictionRecord, PredictionStore, StoreError
from tests.conftest import ROOT, running_service
from tests.images import photo_bytes
from tests.postgres import fresh_database, postgres_server, restart

CAT, DOG = "cats/cat.1.jpg", "dogs/dog.1.jpg"


def make_client(model: Path, **overrides: object) -> TestClient:
    settings = dataclasses.replace(Settings.from_env(), model_path=model, ort_threads=1, **overrides)
    return TestClient(create_app(settings))


@pytest.fixture(scope="module")
def client(onnx_model: Path):
    with make_client(onnx_model) as test_client:
        yield test_client


def predict(client: TestClient, name: str, request_id: str | None = None) -> str:
    headers = {"x-request-id": request_id} if request_id else {}
    response = client.post("/predict", files={"file": (Path(name).name, photo_bytes(name), "image/jpeg")},
                           headers=headers)  # fmt: skip
    assert response.status_code == 200, response.text
    return response.json()["prediction_id"]


def send(client: TestClient, prediction_id: str, label: str):
    return client.post("/feedback", json={"prediction_id": prediction_id, "label": label})


def counter(client: TestClient, label: str, correct: str) -> float:
    prefix = f'catsdogs_feedback_total{{correct="{correct}",label="{label}",source="anonymous"}} '
    lines = [line for line in client.get("/metrics").text.splitlines() if line.startswith(prefix)]
    return float(lines[0].split()[-1]) if lines else 0.0


def test_feedback_round_trip_counts_right_and_wrong(client):
    wrong_before, right_before = counter(client, "dog", "false"), counter(client, "dog", "true")
    cat_photo = predict(client, CAT)
    response = send(client, cat_photo, "dog")
    assert response.status_code == 200, response.text
    assert response.json() == {"prediction_id": cat_photo, "label": "dog", "predicted": "cat", "correct": False,
                               "model_version": "seeded-imagenet-head", "source": "anonymous"}  # fmt: skip
    assert send(client, predict(client, DOG), "dog").json()["correct"] is True
    assert counter(client, "dog", "false") == wrong_before + 1
    assert counter(client, "dog", "true") == right_before + 1


def test_prediction_ids_are_the_servers_whatever_request_id_the_client_sends(client):
    cat, dog = predict(client, CAT, request_id="chosen-by-client"), predict(client, DOG, request_id="chosen-by-client")
    assert cat != dog and "chosen-by-client" not in cat + dog
    for prediction_id in (cat, dog):  # 128 random bits and the issue time, URL-safe base64
        assert len(prediction_id) == 30 and len(base64.urlsafe_b64decode(prediction_id + "==")) == 22
    # each prediction keeps its own answer: the second did not replace the first
    assert send(client, cat, "cat").json()["correct"] is True and send(client, dog, "dog").json()["correct"] is True
    assert send(client, "chosen-by-client", "cat").status_code == 404  # X-Request-ID is for tracing only
    assert len({predict(client, CAT) for _ in range(20)}) == 20


def test_the_same_feedback_twice_counts_once_and_a_different_one_conflicts(client):
    prediction_id = predict(client, CAT)
    before = counter(client, "cat", "true")
    assert send(client, prediction_id, "cat").status_code == 200
    assert send(client, prediction_id, "cat").status_code == 200
    assert counter(client, "cat", "true") == before + 1
    response = send(client, prediction_id, "dog")
    assert response.status_code == 409 and response.json()["error"]["code"] == "feedback_conflict"


def test_batch_items_get_their_own_prediction_ids(client):
    files = [("files", ("cat.jpg", photo_bytes(CAT), "image/jpeg")), ("files", ("x.jpg", b"nope", "image/jpeg")),
             ("files", ("dog.jpg", photo_bytes(DOG), "image/jpeg"))]  # fmt: skip
    response = client.post("/predict/batch", files=files, headers={"x-request-id": "batch-42"})
    items = response.json()["results"]
    ids = [item.get("prediction_id") for item in items]
    assert ids[1] is None and ids[0] and ids[2] and ids[0] != ids[2]  # the failed file made no prediction
    answer = send(client, ids[2], "cat").json()
    assert answer["prediction_id"] == ids[2] and answer["predicted"] == "dog" and answer["correct"] is False


@pytest.mark.parametrize(
    ("body", "content_type", "status", "code"),
    [
        ({"prediction_id": "never-issued", "label": "cat"}, "application/json", 404, "unknown_prediction_id"),
        ({"prediction_id": "x", "label": "horse"}, "application/json", 422, "unknown_label"),
        ({"prediction_id": "x", "label": "Cat"}, "application/json", 422, "unknown_label"),
        ({"prediction_id": "x"}, "application/json", 400, "invalid_feedback"),
        ({"request_id": "x", "label": "cat"}, "application/json", 400, "invalid_feedback"),
        ({"prediction_id": 7, "label": "cat"}, "application/json", 400, "invalid_feedback"),
        ({"prediction_id": "x" * 129, "label": "cat"}, "application/json", 400, "invalid_feedback"),
        (["x", "cat"], "application/json", 400, "invalid_feedback"),
        (b'{"prediction_id": ', "application/json", 400, "invalid_feedback"),
        (b"\xff\xfe", "application/json", 400, "invalid_feedback"),
        (b"prediction_id=x&label=cat", "application/x-www-form-urlencoded", 415, "unsupported_media_type"),
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
        assert small.app.state.observer.wait_idle()  # all three recorded, the oldest evicted
        assert send(small, first, "cat").status_code == 404
        assert send(small, second, "dog").status_code == 200 and send(small, third, "cat").status_code == 200


def test_feedback_without_a_model_is_503(tmp_path):
    with make_client(tmp_path / "missing.onnx") as empty:
        response = send(empty, "x", "cat")
        assert response.status_code == 503 and response.json()["error"]["code"] == "model_not_loaded"


def test_the_sqlite_store_survives_a_restart(onnx_model, tmp_path):
    db = str(tmp_path / "feedback.db")
    with make_client(onnx_model, feedback_db=db) as before_restart:
        prediction_id = predict(before_restart, DOG)
    with make_client(onnx_model, feedback_db=db) as after_restart:
        assert send(after_restart, prediction_id, "cat").json()["correct"] is False
        assert send(after_restart, prediction_id, "dog").status_code == 409  # the feedback was stored too


@pytest.fixture(params=["memory", "sqlite", "postgresql"])
def target(request, tmp_path) -> str | None:
    """Where a store keeps its predictions: each kind FEEDBACK_DB takes (unset: memory)."""
    if request.param == "postgresql":
        return fresh_database(request.getfixturevalue("postgres"))
    return str(tmp_path / "s.db") if request.param == "sqlite" else None


def record(prediction_id: str, label: str = "cat", image: str | None = None) -> PredictionRecord:
    return PredictionRecord(prediction_id, "req", time.time(), "v1", label, {"cat": 0.9, "dog": 0.1}, 0.5, image)


def test_stores_evict_the_oldest_and_keep_what_feedback_needs(target):
    store = PredictionStore(target, 3)
    for i in range(5):
        store.add(record(f"p{i}"))
    assert [store.get(f"p{i}") is not None for i in range(5)] == [False, False, True, True, True]
    assert store.give_feedback("p4", "dog")[0] is Feedback.RECORDED
    assert store.give_feedback("p4", "dog")[0] is Feedback.REPEATED
    assert store.give_feedback("p4", "cat")[0] is Feedback.CONFLICT
    assert store.give_feedback("p0", "cat") == (Feedback.UNKNOWN, None)
    kept = store.get("p4")
    assert kept is not None and kept.feedback == "dog" and kept.pet_score == 0.5 and kept.request_id == "req"
    assert kept.probabilities == {"cat": 0.9, "dog": 0.1}
    store.close()


def test_a_store_evicts_in_steps_of_a_tenth_of_its_size_and_keeps_the_newest(target):
    """Batches as the observer writes them: the table never holds more than 10% over its size (each eviction walks
    the whole table, so it runs once per tenth of the size), and the `size` newest predictions are all kept."""
    store = PredictionStore(target, 100)
    ids = [f"p{i}" for i in range(250)]
    counts = []
    for start in range(0, len(ids), 5):
        store.add_many([record(prediction_id) for prediction_id in ids[start : start + 5]])
        counts.append(store.run("SELECT COUNT(*) FROM predictions").fetchone()[0])
    assert max(counts) <= 110 and counts[-1] >= 100
    assert all(store.get(prediction_id) is not None for prediction_id in ids[-100:])
    assert store.get(ids[0]) is None
    store.close()


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_racing_processes_cannot_both_win(kind, tmp_path, request):
    """Two stores on one database (as two service processes hold), eight rounds of feedback with different labels
    given at the same moment: exactly one is recorded each time, the other is a conflict."""
    target = fresh_database(request.getfixturevalue("postgres")) if kind == "postgresql" else str(tmp_path / "s.db")
    first, second = PredictionStore(target, 100), PredictionStore(target, 100)
    for round_ in range(8):
        first.add(record(f"race-{round_}"))
        barrier = threading.Barrier(2)

        def give(store: PredictionStore, label: str, barrier=barrier, prediction_id=f"race-{round_}") -> Feedback:
            barrier.wait()
            return store.give_feedback(prediction_id, label)[0]

        with ThreadPoolExecutor(2) as pool:
            outcomes = sorted(o.value for o in pool.map(give, (first, second), ("cat", "dog")))
        assert outcomes == ["conflict", "recorded"], outcomes
    first.close(), second.close()


def test_a_store_of_another_schema_version_is_refused_and_the_old_layout_kept(tmp_path):
    old = tmp_path / "old.db"
    with sqlite3.connect(old) as db:  # the layout before schema versions, keyed by the client's request id
        db.execute("CREATE TABLE predictions (seq INTEGER PRIMARY KEY AUTOINCREMENT, request_id TEXT UNIQUE)")
        db.execute("INSERT INTO predictions (request_id) VALUES ('kept')")
    store = PredictionStore(str(old), 10)
    store.add(record("new"))
    assert store.get("new") is not None
    store.close()
    with sqlite3.connect(old) as db:
        assert db.execute("SELECT request_id FROM predictions_v0").fetchall() == [("kept",)]
        db.execute("UPDATE store_schema SET version = 99")
    refused = PredictionStore(str(old), 10)  # a newer service's store: said, and never written
    assert refused.error and "schema version 99; this service reads 1" in refused.error
    with pytest.raises(StoreError, match="schema version 99"):
        refused.get("new")


def test_two_service_processes_share_feedback_through_postgresql(onnx_model, postgres):
    """Predict on one process, give feedback on the other, as two replicas behind a Service would."""
    database = fresh_database(postgres)
    with contextlib.ExitStack() as stack:
        one, two = (stack.enter_context(contextlib.contextmanager(running_service)(onnx_model, FEEDBACK_DB=database))
                    for _ in range(2))  # fmt: skip
        photo = photo_bytes(CAT)
        answer = httpx.post(f"{one.url}/predict", content=photo, headers={"content-type": "image/jpeg"}, timeout=30)
        prediction_id = answer.json()["prediction_id"]
        for _ in range(20):  # the first process records it off its event loop: a moment may pass
            feedback = httpx.post(f"{two.url}/feedback", json={"prediction_id": prediction_id, "label": "dog"},
                                  timeout=30)  # fmt: skip
            if feedback.status_code != 503:
                break
            assert feedback.json()["error"]["code"] == "prediction_not_recorded_yet"
            time.sleep(float(feedback.headers["retry-after"]) / 4)
        assert feedback.status_code == 200 and feedback.json()["correct"] is False, feedback.text
        conflict = httpx.post(f"{one.url}/feedback", json={"prediction_id": prediction_id, "label": "cat"}, timeout=30)
        assert conflict.status_code == 409, conflict.text


def test_labelled_predictions_are_kept_apart_and_bounded_too(target):
    store = PredictionStore(target, 2)  # photos kept: labels wait for harvest
    store.add(record("labelled", image="p.jpg"))
    assert store.give_feedback("labelled", "dog")[0] is Feedback.RECORDED
    for i in range(4):
        store.add(record(f"later-{i}", image="p.jpg"))
    assert store.get("labelled") is not None and store.get("later-0") is None  # feedback is data: it stays
    outcomes = []
    for i in range(3):  # but a client posting feedback cannot grow the store without bound: refused, not evicted
        store.add(record(f"more-{i}", image="p.jpg"))
        outcomes.append(store.give_feedback(f"more-{i}", "cat")[0])
    assert outcomes == [Feedback.RECORDED, Feedback.FULL, Feedback.FULL]
    store.add(record("last", image="p.jpg"))
    assert store.get("labelled").feedback == "dog" and store.get("more-2").feedback is None
    store.add(record("trusted", image="p.jpg"))
    assert store.give_feedback("trusted", "cat", "labeller")[0] is Feedback.RECORDED
    for i in range(6):  # a flood of anonymous labels never keeps a key's label out: each kind has its own bound
        store.add(record(f"flood-{i}", image="p.jpg"))
        store.give_feedback(f"flood-{i}", "dog")
    assert store.get("trusted").feedback_source == "labeller"
    store.close()


def test_photos_are_kept_only_when_asked_content_addressed_and_joined_to_their_prediction(onnx_model, tmp_path):
    with make_client(onnx_model) as default:  # off by default: nothing is kept, and the page says so
        predict(default, CAT)
        assert default.app.state.observer.images is None
        assert "Photos are classified by this service and not stored." in default.get("/").text
    folder = tmp_path / "kept"
    with make_client(onnx_model, feedback_images=folder, feedback_images_days=3) as client:
        ids = [predict(client, name) for name in (CAT, CAT, DOG)]
        observer = client.app.state.observer
        assert observer.wait_idle()
        names = sorted(p.name for p in folder.iterdir())
        expected = sorted({hashlib.sha256(photo_bytes(name)).hexdigest() + ".jpg" for name in (CAT, DOG)})
        assert names == expected  # the same photo is kept once
        assert (folder / expected[0]).read_bytes() in (photo_bytes(CAT), photo_bytes(DOG))
        records = [observer.store.get(i) for i in ids]
        assert records[0].image == records[1].image == hashlib.sha256(photo_bytes(CAT)).hexdigest() + ".jpg"
        assert "each photo is kept for 3 days" in client.get("/").text


def test_kept_photos_expire_and_never_exceed_the_cap_and_labelled_ones_wait_for_harvest(tmp_path):
    (tmp_path / ".gone.jpg.partial").write_bytes(b"cut short")  # a crash mid-write: cleaned at start
    folder = ImageFolder(tmp_path, max_bytes=250, retention_s=3600, labelled_max_bytes=150)

    def files() -> int:
        return sum(p.stat().st_size for p in tmp_path.iterdir() if p.is_file())

    a, b, c = (folder.save(bytes([i]) * 100, "image/jpeg") for i in range(3))  # the third evicts the oldest
    assert a not in folder.sizes and folder.bytes == 200 == files()
    assert folder.keep_labelled(b) and folder.labelled_bytes() == 100  # a label: linked, not copied
    assert (tmp_path / "labelled" / b).samefile(tmp_path / b)
    assert not folder.keep_labelled(a)  # gone before its label came: nothing to keep
    old = time.time() - 7200
    for name in (b, c):
        os.utime(tmp_path / name, (old, old))
    assert folder.save(bytes([2]) * 100, "image/jpeg") == c  # sent again: its retention starts again
    assert folder.expire() == 1 and list(folder.sizes) == [c]  # b expired from the folder...
    assert (tmp_path / "labelled" / b).read_bytes() == bytes([1]) * 100  # ...and waits in the labelled area
    d, e = (folder.save(bytes([i]) * 100, "image/jpeg") for i in (3, 4))  # full: the least recently sent goes
    assert sorted(folder.sizes) == sorted([d, e]) and folder.bytes == 200 and (tmp_path / "labelled" / b).is_file()
    assert not folder.keep_labelled(d)  # past the labelled area's bound: refused, the caller counts and alerts
    assert folder.save(b"x" * 300, "image/jpeg") is None  # larger than the whole cap: not kept, nothing deleted
    (tmp_path / "other-process.jpg").write_bytes(b"y" * 100)  # another process wrote the same folder
    folder.expire()  # the account is made true from the disk, then within the cap again
    assert files() <= 250 and folder.bytes <= 250
    assert not list(tmp_path.glob(".*")) and not list(tmp_path.glob("labelled/.*"))


def test_a_postgresql_restart_or_outage_is_a_503_while_it_lasts_never_a_stuck_store(tmp_path, onnx_model):
    directory = Path(tempfile.mkdtemp(prefix="catsdogs-postgres-"))
    try:
        with postgres_server(directory) as url:
            store = PredictionStore(fresh_database(url), 100)
            store.add(record("before"))
            restart(directory)  # the store's connection is gone
            assert store.give_feedback("before", "cat")[0] is Feedback.RECORDED  # a new connection, at once
            store.close()
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    nowhere = f"postgresql://catsdogs@127.0.0.1:{free_port()}/nothing"  # no server: the service still starts
    with make_client(onnx_model, feedback_db=nowhere) as client:
        prediction_id = predict(client, CAT)  # answered; its record is lost and counted
        response = send(client, prediction_id, "cat")
        assert response.status_code == 503 and response.json()["error"]["code"] == "store_unavailable"
        assert "127.0.0.1" not in response.text  # the database's address stays in the log


def test_an_id_issued_moments_ago_on_a_shared_store_is_retried_not_refused(onnx_model, tmp_path):
    """Another replica may not have written it yet: 503 with Retry-After while it is recent, then 404."""
    with make_client(onnx_model, feedback_db=str(tmp_path / "shared.db")) as client:
        fresh, stale = new_prediction_id(), new_prediction_id(now=time.time() - 3600)
        response = send(client, fresh, "cat")
        assert response.status_code == 503 and response.json()["error"]["code"] == "prediction_not_recorded_yet"
        assert response.headers["retry-after"] == "1"
        assert send(client, stale, "cat").status_code == 404 and send(client, "not-an-id", "cat").status_code == 404
        assert (
            issued_at(fresh) == pytest.approx(time.time(), abs=5)
            and issued_at("x" * 29) is None
            and issued_at("é" * 30) is None
        )
        assert len(base64.urlsafe_b64decode(fresh + "==")) == 22 and len(fresh) == 30


def test_a_batch_is_recorded_whole_or_not_at_all(target):
    """The observer records what has gathered in one call (one transaction on SQLite): a batch that fails half-way
    leaves nothing half-written, and the store goes on."""
    store = PredictionStore(target, 100)
    store.add_many([record(f"batch-{i}") for i in range(5)])
    assert all(store.get(f"batch-{i}") is not None for i in range(5))
    broken = dataclasses.replace(record("broken"), request_id=None)  # NOT NULL
    with pytest.raises(Exception):  # noqa: B017 - sqlite3.IntegrityError or psycopg's NotNullViolation
        store.add_many([record("fresh-1"), broken, record("fresh-2")])
    if not store.postgres:  # one transaction: the row before the failure is gone too
        assert store.get("fresh-1") is None
    assert store.get("fresh-2") is None
    store.add_many([record("batch-0"), record("fresh-3")])  # one there already (an insert tried again): skipped
    assert store.get("fresh-3") is not None
    store.add_many([record("after")])
    assert store.get("after") is not None and store.give_feedback("after", "cat")[0] is Feedback.RECORDED
    store.close()


FIRST_STORE, SHIPPED_STORE = "a2dbfe5", "f2a13b1"  # the first feedback commit's store; the one shipped before schema 2


def store_code(commit: str) -> types.ModuleType:
    """server/store.py as it was at `commit`, run as its own module: stores made by that code, not by hand."""
    source = subprocess.run(["git", "show", f"{commit}:server/store.py"], cwd=ROOT, capture_output=True, text=True,
                            check=True).stdout  # fmt: skip
    module = types.ModuleType(f"store_at_{commit}")
    sys.modules[module.__name__] = module  # dataclasses look their module up
    exec(compile(source, f"{commit}:server/store.py", "exec"), module.__dict__)
    return module


@pytest.mark.parametrize("commit", [FIRST_STORE, SHIPPED_STORE])
@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_stores_made_by_earlier_code_are_upgraded_not_refused(commit, database, tmp_path, request):
    target = str(tmp_path / "old.db") if database == "sqlite" else fresh_database(request.getfixturevalue("postgres"))
    old = store_code(commit)
    fields = {f.name for f in dataclasses.fields(old.PredictionRecord)}
    made = old.PredictionStore(target, 10)
    for name in ("labelled", "unlabelled"):
        extra = {"image": f"{name}.jpg"} if "image" in fields else {}
        made.add(old.PredictionRecord(name, "r", time.time(), "v1", "cat", {"cat": 0.9, "dog": 0.1}, 0.8, **extra))
    assert made.give_feedback("labelled", "dog")[0].value == "recorded"
    made.close()
    store = PredictionStore(target, 10)  # today's code: migrated in place
    assert store.error is None and (store.version(), store.revision()) == (1, 3)
    labelled, unlabelled = store.get("labelled"), store.get("unlabelled")
    assert (labelled.feedback, labelled.feedback_source, labelled.label) == ("dog", "anonymous", "cat")
    assert unlabelled.feedback is None and unlabelled.feedback_source is None and unlabelled.is_pet is None
    assert labelled.image == ("labelled.jpg" if "image" in fields else None)
    store.add(record("new"))
    assert store.give_feedback("new", "cat", "labeller")[0] is Feedback.RECORDED
    assert store.get("new").feedback_source == "labeller"
    assert [r.prediction_id for r in store.feedback_rows()] == (["labelled"] if "image" in fields else [])
    store.close()
    again = PredictionStore(target, 10)  # upgraded once: opening it again changes nothing
    assert again.revision() == 3 and again.get("labelled").feedback_source == "anonymous"
    again.close()
    rolled_back = old.PredictionStore(target, 10)  # the earlier release on the upgraded store: a blue/green rollback
    extra = {"image": "later.jpg"} if "image" in fields else {}
    rolled_back.add(
        old.PredictionRecord("later", "r", time.time(), "v1", "dog", {"cat": 0.2, "dog": 0.8}, 0.9, **extra)
    )
    assert rolled_back.give_feedback("later", "dog")[0].value == "recorded"
    rolled_back.close()
    after = PredictionStore(target, 10)  # and back again: its label has no source, which reads as anonymous
    assert after.get("later").feedback == "dog" and after.get("later").feedback_source is None
    after.close()


def test_a_store_the_service_cannot_use_fails_ready_and_feedback_never_crashes(onnx_model, tmp_path):
    path = tmp_path / "newer.db"
    PredictionStore(str(path), 10).close()
    with sqlite3.connect(path) as db:
        db.execute("UPDATE store_schema SET version = 3")  # written by a newer service
    with make_client(onnx_model, feedback_db=str(path)) as client:
        ready = client.get("/ready")
        assert ready.status_code == 503 and ready.json()["error"]["code"] == "store_unusable"
        prediction_id = predict(client, CAT)  # predictions are still answered
        response = send(client, prediction_id, "cat")
        assert response.status_code == 503 and response.json()["error"]["code"] == "store_unavailable"


def test_a_label_committed_by_a_call_that_then_failed_is_counted_and_kept_on_the_retry(onnx_model, tmp_path):
    """The store's connection cut after its UPDATE committed (server.store.Watchdog): the client is told 503 and
    retries; the retry finds its own label there, and is counted and keeps its photo as the first would have."""
    with make_client(onnx_model, feedback_images=tmp_path / "images", feedback_rate=0.0) as client:
        store = client.app.state.observer.store
        real, calls = store.give_feedback, []

        def committed_then_cut(*args: object) -> tuple:
            calls.append(args)
            outcome = real(*args)
            if len(calls) == 1:
                raise StoreError("the database did not answer within 7 s")  # after the commit
            return outcome

        store.give_feedback = committed_then_cut
        before = counter(client, "cat", "true")
        prediction_id = predict(client, CAT)
        assert send(client, prediction_id, "cat").status_code == 503
        assert counter(client, "cat", "true") == before  # not yet: the service cannot know it was recorded
        retried = send(client, prediction_id, "cat")
        assert retried.status_code == 200 and retried.json()["label"] == "cat"
        assert counter(client, "cat", "true") == before + 1
        assert list((tmp_path / "images" / "labelled-anonymous").iterdir())  # kept for harvest
        assert send(client, prediction_id, "cat").status_code == 200
        assert counter(client, "cat", "true") == before + 1  # a plain repeat is counted once, as before

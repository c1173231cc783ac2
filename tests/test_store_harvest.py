"""A label the service acknowledged is kept until harvest took it: PredictionStore.mark_harvested, the bound that
refuses new labels instead of evicting unharvested ones, and a retry that finds its own label."""

from __future__ import annotations

import dataclasses
import sqlite3
import time

import psycopg
import pytest

from server.images import ANONYMOUS_LABELLED, LABELLED, ImageFolder
from server.keys import add_key
from server.store import ANONYMOUS, Feedback, PredictionRecord, PredictionStore, StoreError
from tests.images import photo_bytes
from tests.postgres import fresh_database
from tests.test_faults import proxied_postgres  # noqa: F401 - a fixture
from tests.test_feedback import CAT, DOG, counter, make_client, predict, send, store_code

BEFORE_HARVESTED = "6c10e62"  # the release before revision 3: its stores have no harvested_time


@pytest.fixture(params=["sqlite", "postgresql"])
def shared(request, tmp_path) -> str:
    """A store other processes can open too (harvest reads the service's)."""
    if request.param == "postgresql":
        return fresh_database(request.getfixturevalue("postgres"))
    return str(tmp_path / "s.db")


def record(prediction_id: str, label: str = "cat", image: str | None = "photo.jpg") -> PredictionRecord:
    return PredictionRecord(prediction_id, "req", time.time(), "v1", label, {"cat": 0.9, "dog": 0.1}, 0.5, image)


def test_harvest_marks_labels_taken_through_a_read_only_store(shared):
    service = PredictionStore(shared, 100)
    service.add_many([record(f"p{i}") for i in range(4)])
    service.give_feedback("p0", "cat", "labeller")
    service.give_feedback("p1", "dog")
    harvest = PredictionStore(shared, 1, read_only=True)
    read = harvest.feedback_rows()
    assert [r.prediction_id for r in read] == ["p0", "p1"]
    unlabelled, gone = service.get("p2"), dataclasses.replace(read[0], prediction_id="gone")
    assert harvest.mark_harvested([*read, unlabelled, gone]) == 2  # p2 has no label, "gone" is not there
    assert harvest.mark_harvested(read) == 2  # run again: reported done, the first time kept
    assert harvest.mark_harvested([]) == 0
    harvest.close()
    marked = service.run("SELECT prediction_id FROM predictions WHERE harvested_time IS NOT NULL ORDER BY 1")
    assert [row[0] for row in marked.fetchall()] == ["p0", "p1"]
    service.close()


def test_harvest_marks_only_the_labels_it_read(shared):
    service = PredictionStore(shared, 100)
    service.add_many([record("p"), record("q")])
    service.give_feedback("p", "dog")
    service.give_feedback("q", "cat", "labeller")
    harvest = PredictionStore(shared, 1, read_only=True)
    read = harvest.feedback_rows()
    assert service.give_feedback("p", "cat", "labeller")[0] is Feedback.REPLACED  # after harvest read the store
    assert harvest.mark_harvested(read) == 1  # q's: p's label is another now
    assert (
        service.get("p").feedback_source == "labeller"
        and not service.give_feedback("p", "cat", "labeller")[1].harvested
    )
    assert harvest.mark_harvested(harvest.feedback_rows()) == 2  # read again: the label there now
    harvest.close()
    service.close()


def test_a_relabel_after_harvest_waits_for_the_next_harvest(shared):
    service = PredictionStore(shared, 100)
    service.add(record("p"))
    service.give_feedback("p", "dog")
    assert service.mark_harvested([service.get("p")]) == 1
    assert service.give_feedback("p", "dog", "labeller")[0] is Feedback.REPLACED  # a key's label: not harvested yet
    assert service.run("SELECT harvested_time FROM predictions").fetchone()[0] is None
    service.close()


def test_marking_harvested_needs_an_upgraded_store_and_says_so(shared):
    old = store_code(BEFORE_HARVESTED)
    made = old.PredictionStore(shared, 10)
    made.add(old.PredictionRecord("p", "r", time.time(), "v1", "cat", {"cat": 0.9, "dog": 0.1}, 0.8, "p.jpg"))
    made.give_feedback("p", "dog", "labeller")
    made.close()
    harvest = PredictionStore(shared, 1, read_only=True)  # read-only never migrates: the older store is read as is
    assert [r.prediction_id for r in harvest.feedback_rows()] == ["p"]
    with pytest.raises(StoreError, match="revision 2; marking labels harvested needs revision 3"):
        harvest.mark_harvested(harvest.feedback_rows())
    harvest.close()
    upgraded = PredictionStore(shared, 10)  # the service upgrades it as it starts
    upgraded.probe()
    upgraded.close()
    harvest = PredictionStore(shared, 1, read_only=True)
    assert harvest.mark_harvested(harvest.feedback_rows()) == 1
    harvest.close()
    rolled_back = old.PredictionStore(shared, 10)  # the previous release still runs on the upgraded store
    rolled_back.add(old.PredictionRecord("q", "r", time.time(), "v1", "cat", {"cat": 0.9, "dog": 0.1}, 0.8, "q.jpg"))
    assert rolled_back.give_feedback("q", "cat", "labeller")[0].value == "recorded"
    rolled_back.close()


def test_a_read_only_store_never_creates_nor_migrates(tmp_path):
    missing = tmp_path / "typo.db"
    with pytest.raises(StoreError, match="no feedback store at"):
        PredictionStore(str(missing), 1, read_only=True)
    assert not missing.exists()
    path = tmp_path / "old.db"
    sqlite3.connect(path).close()  # a file that holds no store: refused, left as it is
    with pytest.raises(StoreError, match="schema version None"):
        PredictionStore(str(path), 1, read_only=True)
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT name FROM sqlite_master").fetchall() == []


@pytest.fixture(params=["memory", "sqlite", "postgresql"])
def target(request, tmp_path) -> str | None:
    """Each kind FEEDBACK_DB takes (unset: memory)."""
    if request.param == "postgresql":
        return fresh_database(request.getfixturevalue("postgres"))
    return str(tmp_path / "s.db") if request.param == "sqlite" else None


def test_labels_harvest_has_not_taken_are_never_evicted_and_past_the_bound_new_ones_are_refused(target):
    """Hole 5: a store of size 3 with three keyed labels harvest has not taken keeps them through any number of
    predictions, refuses a fourth (never evicting one of the three), takes one again once harvest marked a label, and
    evicts only harvested labels, the oldest first, past `size` of them."""
    store = PredictionStore(target, 3)
    store.add_many([record(f"k{i}") for i in range(3)])
    assert [store.give_feedback(f"k{i}", "cat", "labeller")[0] for i in range(3)] == [Feedback.RECORDED] * 3
    for batch in range(5):  # evictions run after each of these
        store.add_many([record(f"later-{batch}-{i}") for i in range(3)])
    assert all(store.get(f"k{i}").feedback == "cat" for i in range(3))
    store.add(record("k3"))
    outcome, refused = store.give_feedback("k3", "dog", "labeller")
    assert outcome is Feedback.FULL and refused.feedback is None and store.get("k3").feedback is None
    store.add(record("a0"))
    assert store.give_feedback("a0", "dog")[0] is Feedback.RECORDED  # anonymous labels have a bound of their own
    assert store.give_feedback("a0", "cat", "labeller")[0] is Feedback.FULL  # a key's in place of one: refused too
    assert store.give_feedback("k0", "cat", "labeller")[0] is Feedback.REPEATED  # a repeat is no new label
    assert store.mark_harvested([store.get("k0")]) == 1
    assert store.give_feedback("k3", "dog", "labeller")[0] is Feedback.RECORDED
    assert store.mark_harvested([store.get(f"k{i}") for i in (1, 2, 3)]) == 3
    store.add(record("after"))  # four harvested labels: the oldest goes
    assert store.get("k0") is None and all(store.get(f"k{i}") is not None for i in (1, 2, 3))
    assert store.get("a0").feedback == "dog"
    store.close()


def test_labels_without_a_photo_never_fill_the_bound_and_are_evicted(target):
    """FEEDBACK_DB without FEEDBACK_IMAGES (docker-compose.yml, the k8s overlay): a label whose prediction kept no
    photo is nothing harvest can take or mark. It never counts against the bound (past `size` of them a label of
    that kind was refused for good) and is evicted like a harvested one, the `size` most recent of each kind kept."""
    store = PredictionStore(target, 2)
    for source in (ANONYMOUS, "labeller"):
        for i in range(5):
            store.add(record(f"{source}-{i}", image=None))
            assert store.give_feedback(f"{source}-{i}", "cat", source)[0] is Feedback.RECORDED, (source, i)
    store.add_many([record(f"later-{i}", image=None) for i in range(2)])  # an eviction
    labelled = store.run("SELECT feedback_source, COUNT(*) FROM predictions WHERE feedback IS NOT NULL GROUP BY 1")
    assert dict(labelled.fetchall()) == {ANONYMOUS: 2, "labeller": 2}
    assert all(store.get(f"{source}-4").feedback == "cat" for source in (ANONYMOUS, "labeller"))
    store.add(record("with-photo"))  # a label with a photo still waits for harvest and counts
    assert store.give_feedback("with-photo", "dog", "labeller")[0] is Feedback.RECORDED
    store.close()


def test_the_previous_release_evicts_no_label_waiting_for_harvest(shared):
    """Blue/green: 6c10e62's code (the other colour, or after a rollback) on the same store keeps the `size` newest
    labels of each kind, harvested or not. This code keeps harvested ones down to `size` minus those waiting, so the
    older code's eviction finds nothing to take: two labels waiting, then four harvested ones newer than them."""
    service = PredictionStore(shared, 4)
    for source in (ANONYMOUS, "labeller"):
        names = [f"{source}-{i}" for i in range(6)]
        for i, name in enumerate(names):
            service.add(record(name))
            assert service.give_feedback(name, "cat", source)[0] is Feedback.RECORDED
            if i >= 2:  # the two oldest wait for harvest
                assert service.mark_harvested([service.get(name)]) == 1
    service.add(record("later"))  # this code's eviction
    old = store_code(BEFORE_HARVESTED)
    rolled_back = old.PredictionStore(shared, 4)
    rolled_back.add(old.PredictionRecord("old", "r", time.time(), "v1", "cat", {"cat": 0.9, "dog": 0.1}, 0.8, "o.jpg"))
    rolled_back.close()  # its eviction ran (a step of one prediction at this size)
    for source in (ANONYMOUS, "labeller"):
        assert [service.get(f"{source}-{i}") is not None for i in range(6)] == [True] * 2 + [False] * 2 + [True] * 2
    labelled = service.run("SELECT feedback_source, COUNT(*) FROM predictions WHERE feedback IS NOT NULL GROUP BY 1")
    assert dict(labelled.fetchall()) == {ANONYMOUS: 4, "labeller": 4}  # `size` of each kind: nothing for it to take
    service.close()


def metric_value(client, name: str, labels: str) -> float:
    prefix = f"{name}{{{labels}}} "
    lines = [line for line in client.get("/metrics").text.splitlines() if line.startswith(prefix)]
    return float(lines[0].split()[-1]) if lines else 0.0


def test_post_feedback_refuses_a_label_past_the_bound_with_503_counted(onnx_model, tmp_path):
    images = tmp_path / "images"  # labels wait for harvest only with their photos kept
    with make_client(onnx_model, feedback_store_size=2, feedback_images=images, feedback_rate=0.0) as client:
        observer = client.app.state.observer
        ids = []
        for _ in range(3):
            ids.append(predict(client, CAT))
            assert observer.wait_idle()
            if len(ids) < 3:
                assert send(client, ids[-1], "cat").status_code == 200
        refused = send(client, ids[2], "cat")
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "label_store_full", refused.text
        assert int(refused.headers["retry-after"]) > 1
        assert metric_value(client, "catsdogs_labels_refused_total", 'source="anonymous"') == 1
        assert send(client, ids[0], "cat").status_code == 200  # a label kept is still acknowledged again
        assert observer.store.mark_harvested([observer.store.get(i) for i in ids[:2]]) == 2
        assert send(client, ids[2], "cat").status_code == 200
        assert metric_value(client, "catsdogs_labels_refused_total", 'source="anonymous"') == 1


def test_post_feedback_refuses_a_label_whose_photo_area_is_at_its_bound_with_503_counted(onnx_model, tmp_path):
    """A label is answered 200 only with its photo kept for harvest: past the labelled area's bound it is refused
    (503 label_store_full, counted), never recorded without its photo. A photo gone already is no bound."""
    images = tmp_path / "images"
    cat_bytes = len(photo_bytes(CAT))
    with make_client(onnx_model, feedback_images=images, feedback_rate=0.0,
                     feedback_anonymous_labelled_max_bytes=cat_bytes) as client:  # fmt: skip
        observer = client.app.state.observer
        cat, dog = predict(client, CAT), predict(client, DOG)
        assert observer.wait_idle()
        assert send(client, cat, "cat").status_code == 200  # its photo fills the anonymous area
        assert observer.images.labelled_bytes(ANONYMOUS_LABELLED) == cat_bytes
        refused = send(client, dog, "dog")
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "label_store_full", refused.text
        assert int(refused.headers["retry-after"]) > 1
        assert observer.store.get(dog).feedback is None  # not recorded: no acknowledged label without its photo
        assert metric_value(client, "catsdogs_labels_refused_total", 'source="anonymous"') == 1
        assert observer.images.labelled_bytes(ANONYMOUS_LABELLED) == cat_bytes
        assert send(client, cat, "cat").status_code == 200  # a repeat of a label kept: acknowledged again
        assert metric_value(client, "catsdogs_labels_refused_total", 'source="anonymous"') == 1
        gone = predict(client, DOG)  # the same photo as dog's: deleted (past the retention) before its label came
        assert observer.wait_idle()
        (images / observer.store.get(gone).image).unlink()
        assert send(client, gone, "dog").status_code == 200  # no photo to keep: no bound, recorded as before
        assert metric_value(client, "catsdogs_labelled_photos_refused_total", 'source="anonymous"') == 1
        (images / ANONYMOUS_LABELLED / observer.store.get(cat).image).unlink()  # harvest took it: room again
        again = predict(client, CAT)
        assert observer.wait_idle()
        assert send(client, again, "cat").status_code == 200
        assert observer.images.labelled_bytes(ANONYMOUS_LABELLED) == cat_bytes
        assert metric_value(client, "catsdogs_labels_refused_total", 'source="anonymous"') == 1


def test_a_keys_label_has_its_own_photo_area_and_is_refused_at_its_bound_never_replacing_silently(onnx_model, tmp_path):
    """A key's label has its own area and bound: a key's label in place of an anonymous one whose photo the key's
    area cannot take is refused (503, counted for the keys), the anonymous label left as it was."""
    images, keys = tmp_path / "images", tmp_path / "api-keys.jsonl"
    labeller = {"Authorization": f"Bearer {add_key(keys, 'labeller', ['label'])}"}
    cat_bytes, dog_bytes = len(photo_bytes(CAT)), len(photo_bytes(DOG))
    bounds = {"feedback_labelled_max_bytes": cat_bytes, "feedback_anonymous_labelled_max_bytes": cat_bytes + dog_bytes}
    with make_client(onnx_model, feedback_images=images, feedback_rate=0.0, api_keys_file=keys, **bounds) as client:
        observer = client.app.state.observer
        cat, dog = predict(client, CAT), predict(client, DOG)
        assert observer.wait_idle()
        assert send(client, cat, "cat").status_code == 200 and send(client, dog, "cat").status_code == 200
        assert observer.images.labelled_bytes(ANONYMOUS_LABELLED) == cat_bytes + dog_bytes  # full
        keyed = client.post("/feedback", json={"prediction_id": cat, "label": "cat"}, headers=labeller)
        assert keyed.status_code == 200 and keyed.json()["source"] == "labeller", keyed.text  # the key's own area
        assert observer.images.labelled_bytes(LABELLED) == cat_bytes  # now full too
        replacing = client.post("/feedback", json={"prediction_id": dog, "label": "dog"}, headers=labeller)
        assert replacing.status_code == 503 and replacing.json()["error"]["code"] == "label_store_full"
        kept = observer.store.get(dog)
        assert (kept.feedback, kept.feedback_source) == ("cat", ANONYMOUS)  # the anonymous label, its photo kept
        assert metric_value(client, "catsdogs_labels_refused_total", 'source="key"') == 1
        assert metric_value(client, "catsdogs_labels_refused_total", 'source="anonymous"') == 0


def test_a_photo_linked_already_is_linked_anew_for_harvests_orphan_hour(tmp_path):
    """The service checks a label's photo room (keep_labelled) before its store commits: a photo found linked already
    (an orphan of a label that never committed) gets a new ctime, so harvest never takes it for an orphan then."""
    folder = ImageFolder(tmp_path, max_bytes=1000, anonymous_labelled_max_bytes=1000)
    name = folder.save(b"x" * 100, "image/jpeg")
    assert folder.keep_labelled(name, ANONYMOUS_LABELLED)
    linked = tmp_path / ANONYMOUS_LABELLED / name
    before = linked.stat().st_ctime_ns
    time.sleep(0.05)
    assert folder.keep_labelled(name, ANONYMOUS_LABELLED)
    assert linked.stat().st_ctime_ns > before


def test_post_feedback_without_kept_photos_never_answers_label_store_full(onnx_model):
    """FEEDBACK_DB without FEEDBACK_IMAGES: no label waits for harvest, so none is refused past the bound."""
    with make_client(onnx_model, feedback_store_size=2, feedback_rate=0.0) as client:
        for _ in range(4):
            prediction_id = predict(client, CAT)
            assert client.app.state.observer.wait_idle()
            answer = send(client, prediction_id, "cat")
            assert answer.status_code == 200, answer.text


def test_a_label_committed_before_postgresql_cut_the_connection_is_acknowledged_counted_and_kept(
    onnx_model,
    proxied_postgres,  # noqa: F811 - the fixture imported above
    tmp_path,
):
    """Hole 6: the UPDATE reaches the server and commits, then the connection breaks before its answer comes back;
    the store's one retry on a new connection finds the label there. That is this label's first acknowledgement:
    counted once, its photo kept for harvest, the answer the same as a plain first label's."""
    proxied, direct, proxy = proxied_postgres
    images = tmp_path / "images"
    with make_client(onnx_model, feedback_db=proxied, feedback_images=images, feedback_rate=0.0) as client:
        prediction_id = predict(client, CAT)
        assert client.app.state.observer.wait_idle()
        before = counter(client, "cat", "true")
        proxy.cut_after(b"UPDATE predictions SET feedback")
        answer = send(client, prediction_id, "cat")
        assert proxy.marker is None  # the fault happened
        assert answer.status_code == 200 and answer.json()["label"] == "cat", answer.text
        assert counter(client, "cat", "true") == before + 1
        assert list((images / ANONYMOUS_LABELLED).iterdir())  # kept for harvest
        assert send(client, prediction_id, "cat").json() == answer.json()  # a plain repeat: the same answer
        assert counter(client, "cat", "true") == before + 1  # counted once
    with psycopg.connect(direct) as db:
        assert db.execute("SELECT feedback FROM predictions").fetchall() == [("cat",)]


def test_a_retry_that_reaches_another_process_finds_its_label_and_keeps_its_photo(onnx_model, tmp_path):
    """Hole 6, WORKERS > 1 (or both colours live): the first process's store call commits and then fails (503), and
    the client's retry reaches a second process on the same SQLite file and photo folder. The retry is the same
    acknowledgement: 200 with the same answer, and the photo is kept for harvest."""
    shared = {"feedback_db": str(tmp_path / "s.db"), "feedback_images": tmp_path / "images", "feedback_rate": 0.0}
    with make_client(onnx_model, **shared) as one, make_client(onnx_model, **shared) as two:
        store = one.app.state.observer.store
        real = store.give_feedback

        def committed_then_failed(*args: object) -> tuple:
            real(*args)
            raise StoreError("the database did not answer within 7 s")  # after the commit

        store.give_feedback = committed_then_failed
        prediction_id = predict(one, CAT)
        assert one.app.state.observer.wait_idle()
        assert send(one, prediction_id, "cat").status_code == 503
        assert list((tmp_path / "images" / ANONYMOUS_LABELLED).iterdir())  # linked before the store's commit
        retried = send(two, prediction_id, "cat")
        assert retried.status_code == 200, retried.text
        assert retried.json() | {"correct": True} == retried.json() and retried.json()["label"] == "cat"
        assert list((tmp_path / "images" / ANONYMOUS_LABELLED).iterdir())  # kept for harvest
        assert two.app.state.observer.store.give_feedback(prediction_id, "cat")[0] is Feedback.REPEATED

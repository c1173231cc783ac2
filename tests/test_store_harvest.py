"""A label the service acknowledged is kept until harvest took it: PredictionStore.mark_harvested, the bound that
refuses new labels instead of evicting unharvested ones, and a retry that finds its own label."""

from __future__ import annotations

import sqlite3
import time

import pytest

from server.store import Feedback, PredictionRecord, PredictionStore, StoreError
from tests.postgres import fresh_database
from tests.test_feedback import store_code

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
    assert [r.prediction_id for r in harvest.feedback_rows()] == ["p0", "p1"]
    assert harvest.mark_harvested(["p0", "p1", "p2", "gone"]) == 2  # p2 has no label, "gone" is not there
    assert harvest.mark_harvested(["p0", "p1"]) == 2  # run again: reported done, the first time kept
    assert harvest.mark_harvested([]) == 0
    harvest.close()
    marked = service.run("SELECT prediction_id FROM predictions WHERE harvested_time IS NOT NULL ORDER BY 1")
    assert [row[0] for row in marked.fetchall()] == ["p0", "p1"]
    service.close()


def test_a_relabel_after_harvest_waits_for_the_next_harvest(shared):
    service = PredictionStore(shared, 100)
    service.add(record("p"))
    service.give_feedback("p", "dog")
    assert service.mark_harvested(["p"]) == 1
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
        harvest.mark_harvested(["p"])
    harvest.close()
    upgraded = PredictionStore(shared, 10)  # the service upgrades it as it starts
    upgraded.probe()
    upgraded.close()
    harvest = PredictionStore(shared, 1, read_only=True)
    assert harvest.mark_harvested(["p"]) == 1
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

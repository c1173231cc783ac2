"""Feedback to data: a real service process keeps photos and feedback, `loop.harvest` turns them into labelled
photos by its rules (trusted labels used once, disagreements and confident contradictions held, anonymous labels
only through review and never on a photo the model called not a pet, evaluation photos left out)."""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import json
import os
import secrets
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import httpx2 as httpx
import pytest

import loop.harvest as harvest_module
from loop.harvest import main as harvest
from server.images import ANONYMOUS_LABELLED, LABELLED, ImageFolder
from server.keys import add_key, revoke_key
from server.store import ANONYMOUS, PredictionRecord, PredictionStore, StoreError
from tests.conftest import DATASET, SHARED, running_service
from tests.service import Service

CAT1, CAT2, CAT3, CAT4 = "cats/cat.1.jpg", "cats/cat.2.jpg", "cats/cat.3.jpg", "cats/cat.4.jpg"
DOG2, DOG5, DOG6 = "dogs/dog.2.jpg", "dogs/dog.5.jpg", "dogs/dog.6.jpg"


NOT_PET = SHARED / "datasets" / "not-pets-dev"


def name_of(photo: str) -> str:
    return hashlib.sha256((DATASET / photo).read_bytes()).hexdigest() + ".jpg"


def test_feedback_through_the_api_becomes_a_labelled_data_version(onnx_model, tmp_path):
    db, images, out = tmp_path / "feedback.db", tmp_path / "kept", tmp_path / "feedback"
    manifest = tmp_path / "manifest.csv"  # the original data's evaluation photos: cat.3 is one
    manifest.write_text(f"file,source,sha256,label,split\ntest/cat/x.jpg,{CAT3},{name_of(CAT3)[:-4]},cat,test\n"
                        f"train/dog/y.jpg,{DOG6},{name_of(DOG6)[:-4]},dog,train\n")  # fmt: skip

    keys = tmp_path / "api-keys.jsonl"
    labeller = {"Authorization": f"Bearer {add_key(keys, 'labeller', ['label'])}"}
    not_pet = NOT_PET / "imagenet_574_golf_ball.jpg"

    def send(running: Service, photo: str, label: str, headers: dict[str, str] | None = None) -> dict:
        body = (DATASET / photo).read_bytes()
        answer = httpx.post(f"{running.url}/predict", content=body, headers={"content-type": "image/jpeg"}, timeout=30)
        given = httpx.post(f"{running.url}/feedback", json={"prediction_id": answer.json()["prediction_id"],
                                                           "label": label}, headers=headers, timeout=30)  # fmt: skip
        assert given.status_code == 200, given.text
        return answer.json()

    env = {"FEEDBACK_DB": str(db), "FEEDBACK_IMAGES": str(images), "API_KEYS_FILE": str(keys)}
    with contextlib.contextmanager(running_service)(onnx_model, **env) as on:
        send(on, CAT1, "cat", labeller)  # right: used
        send(on, DOG2, "dog", labeller)  # right: used
        sure = send(on, CAT4, "dog", labeller)  # against a sure answer: held for review
        unsure = send(on, DOG5, "cat", labeller)  # against an unsure answer: used as given
        send(on, CAT2, "cat", labeller), send(on, CAT2, "dog", labeller)  # two different labels: held
        send(on, CAT3, "cat", labeller)  # an evaluation photo: left out
        send(on, DOG6, "dog", labeller)  # already a training photo: left out, counted as not new
        anonymous = send(on, "dogs/dog.3.jpg", "dog")  # right, but anonymous: held for a person
        car = send(on, str(not_pet), "cat")  # a non-pet confirmed as a cat by nobody in particular: left out
    assert max(sure["probabilities"].values()) >= 0.99 > max(unsure["probabilities"].values()), (sure, unsure)
    assert car["is_pet"] is False and anonymous["is_pet"] is True
    params = tmp_path / "params.yaml"
    params.write_text(json.dumps({"preprocess": {"labels": ["cat", "dog"]}, "feedback": {"review_confidence": 0.99}}))
    review, report = tmp_path / "review.csv", tmp_path / "harvest.json"
    common = ["--db", str(db), "--images", str(images), "--out", str(out), "--manifest", str(manifest),
              "--params", str(params), "--review-out", str(review), "--report", str(report),
              "--keys", str(keys)]  # fmt: skip
    harvest(common)
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*.jpg")) == sorted(
        [f"cat/{name_of(CAT1)}", f"dog/{name_of(DOG2)}", f"cat/{name_of(DOG5)}"]
    )
    assert (out / "cat" / name_of(CAT1)).read_bytes() == (DATASET / CAT1).read_bytes()
    summary = json.loads(report.read_text())["this_run"]
    assert summary["used"] == 3 and summary["left_out"] == {
        "identical to an evaluation photo": 1,
        "identical to a training photo": 1,
        "anonymous label on a photo the model called not a pet": 1,
    }
    assert summary["held_for_review"] == {"trusted labels disagree": 1,
                                          "contradicts an answer of probability >= 0.99": 1,
                                          "anonymous label: a person confirms it": 1}  # fmt: skip
    assert summary["by_source"] == {"anonymous": {"held": 1, "left_out": 1},
                                    "labeller": {"used": 3, "held": 2, "left_out": 2}}  # fmt: skip
    assert not list(out.rglob(".*"))  # copied atomically
    assert (images / "labelled" / name_of(CAT1)).is_file()  # kept until its data version comes back
    assert (images / "labelled" / name_of(CAT4)).is_file()  # held: kept until harvested

    # a person confirms the cat is a cat after all (the feedback was wrong), and leaves the others undecided
    rows = list(csv.DictReader(review.open()))
    assert {row["sources"] for row in rows} == {"labeller", "anonymous"}
    for row in rows:
        row["confirmed_label"] = "cat" if row["image"] == name_of(CAT4) else ""
    with review.open("w", newline="") as filled:
        writer = csv.DictWriter(filled, list(rows[0]))
        writer.writeheader(), writer.writerows(rows)
    harvest([*common, "--reviewed", str(review)])
    summary = json.loads(report.read_text())["this_run"]
    assert summary["used"] == 1 and summary["already_harvested"] == 3  # each photo used once
    assert (out / "cat" / name_of(CAT4)).is_file() and summary["by_source"]["review"] == {"used": 1}
    assert summary["held_for_review"] == {"trusted labels disagree": 1, "anonymous label: a person confirms it": 1}

    # a person starts on the review file; a harvest meanwhile keeps what they typed (merged, never overwritten)
    rows = list(csv.DictReader(review.open()))
    for row in rows:
        if row["image"] == name_of("dogs/dog.3.jpg"):
            row["confirmed_label"] = "dog"
    with review.open("w", newline="") as filled:
        writer = csv.DictWriter(filled, list(rows[0]))
        writer.writeheader(), writer.writerows(rows)
    (images / name_of(CAT1)).unlink()  # expired from the service's folder: already harvested, nothing lost
    harvest(common)  # and without the review file, nothing decided is held or asked again
    summary = json.loads(report.read_text())["this_run"]
    assert summary["used"] == 0 and summary["already_harvested"] == 4 and (out / "cat" / name_of(CAT1)).is_file()
    assert summary["held_for_review"] == {"trusted labels disagree": 1, "anonymous label: a person confirms it": 1}
    kept = {row["image"]: row["confirmed_label"] for row in csv.DictReader(review.open())}
    assert kept[name_of("dogs/dog.3.jpg")] == "dog"
    assert not (images / "labelled" / name_of(CAT1)).exists()  # found harvested before: let go of
    anonymous_photo = name_of("dogs/dog.3.jpg")  # held for a person: kept in the anonymous area, never a key's
    assert (images / "labelled-anonymous" / anonymous_photo).is_file() and not (
        images / "labelled" / anonymous_photo
    ).exists()
    assert not list((images / "labelled-anonymous").glob(f"{hashlib.sha256(not_pet.read_bytes()).hexdigest()}.*"))
    assert not (images / "labelled" / name_of(CAT3)).exists()  # an evaluation photo: left out, let go of

    # the person drops the photo the labeller's two labels disagree on
    drop = tmp_path / "drop.csv"
    drop.write_text(f"image,confirmed_label\n{name_of(CAT2)},none\n")
    harvest([*common, "--reviewed", str(drop)])
    summary = json.loads(report.read_text())["this_run"]
    assert summary["left_out"]["dropped by a person's review"] == 1
    assert not (images / "labelled" / name_of(CAT2)).exists()

    # a review may relabel a harvested photo, even once the service let go of it: it then has one label only
    for kept_copy in (images / name_of(DOG5), images / "labelled" / name_of(DOG5)):
        kept_copy.unlink(missing_ok=True)
    relabel = tmp_path / "relabel.csv"
    relabel.write_text(f"image,confirmed_label\n{name_of(DOG5)},dog\n")
    harvest([*common, "--reviewed", str(relabel)])
    assert json.loads(report.read_text())["this_run"]["relabelled"] == 1
    assert (out / "dog" / name_of(DOG5)).read_bytes() == (DATASET / DOG5).read_bytes()
    assert not (out / "cat" / name_of(DOG5)).exists()
    relabel.write_text(f"image,confirmed_label\n{name_of(DOG5)},none\n")  # and drop a harvested photo
    harvest([*common, "--reviewed", str(relabel)])
    assert not list(out.rglob(name_of(DOG5)))
    assert (
        "trusted labels disagree" not in json.loads(report.read_text())["this_run"]["held_for_review"]
    )  # CAT2's drop stays
    relabel.write_text(f"image,confirmed_label\n{name_of(DOG5)},Dog\n")  # not a label: refused, not dropped
    with pytest.raises(SystemExit, match="confirmed_label 'Dog' must be one of"):
        harvest([*common, "--reviewed", str(relabel)])
    relabel.write_text(f"image,label\n{name_of(DOG5)},dog\n")
    with pytest.raises(SystemExit, match="needs the columns image and confirmed_label"):
        harvest([*common, "--reviewed", str(relabel)])


def test_harvest_reads_the_store_read_only_and_never_creates_one(tmp_path):
    missing = tmp_path / "typo.db"
    with pytest.raises(SystemExit, match="no feedback store at"):
        harvest(["--db", str(missing), "--images", str(tmp_path), "--out", str(tmp_path / "out"),
                 "--review-out", str(tmp_path / "r.csv"), "--report", str(tmp_path / "h.json")])  # fmt: skip
    assert not missing.exists()


def test_harvest_needs_to_be_told_where_the_service_wrote(capsys, monkeypatch):
    monkeypatch.delenv("FEEDBACK_DB", raising=False)
    monkeypatch.delenv("FEEDBACK_IMAGES", raising=False)
    with pytest.raises(SystemExit) as stopped:
        harvest([])
    assert stopped.value.code == 2 and "give FEEDBACK_DB and FEEDBACK_IMAGES" in capsys.readouterr().err


def test_a_keys_label_against_a_harvested_photo_is_held_and_a_review_reaches_photos_the_store_forgot(tmp_path):
    from loop.harvest import harvest as rules
    from server.store import PredictionRecord

    images, out = tmp_path / "kept", tmp_path / "feedback"
    photo, forgotten = "a" * 64 + ".jpg", "b" * 64 + ".jpg"
    images.mkdir(), (out / "cat").mkdir(parents=True)
    for name in (photo, forgotten):
        (out / "cat" / name).write_bytes(b"harvested before")
    (images / photo).write_bytes(b"harvested before")
    later = PredictionRecord("p", "r", 0.0, "v", "cat", {"cat": 0.6, "dog": 0.4}, 0.9, photo, "dog", "labeller", True)
    hostile = dataclasses.replace(later, prediction_id="q", image="../../etc/passwd")  # never a path
    result = rules(
        [later, hostile],
        images,
        out,
        ["cat", "dog"],
        set(),
        0.99,
        {forgotten[:64]: "none"},
        labellers={"labeller": 0.0},
    )
    assert [row["reason"] for row in result.held] == ["a trusted label contradicts the harvested one"]
    assert (out / "cat" / photo).is_file() and not (out / "cat" / forgotten).exists()  # dropped, record or not


class Written:
    """A feedback store and a photo folder written as the service writes them (server.observer: the label recorded,
    then its photo linked into its source's labelled area), without a service process."""

    def __init__(self, tmp_path: Path) -> None:
        self.db, self.images, self.out = tmp_path / "feedback.db", tmp_path / "kept", tmp_path / "feedback"
        self.keys, self.manifest = tmp_path / "api-keys.jsonl", tmp_path / "manifest.csv"
        self.review, self.report = tmp_path / "review.csv", tmp_path / "harvest.json"
        self.params = tmp_path / "params.yaml"
        self.params.write_text(json.dumps({"preprocess": {"labels": ["cat", "dog"]},
                                           "feedback": {"review_confidence": 0.99}}))  # fmt: skip
        self.store = PredictionStore(str(self.db), 1000)
        self.folder = ImageFolder(
            self.images, 1 << 30, labelled_max_bytes=1 << 30, anonymous_labelled_max_bytes=1 << 30
        )

    def predict(self, data: bytes, label: str = "cat", *, made: float | None = None, is_pet: bool = True) -> str:
        name = self.folder.save(data, "image/jpeg")
        probabilities = {label: 0.6, ({"cat", "dog"} - {label}).pop(): 0.4}
        made = time.time() if made is None else made
        record = PredictionRecord(secrets.token_urlsafe(16), "r", made, "v1", label, probabilities, 0.9, name,
                                  is_pet=is_pet)  # fmt: skip
        self.store.add(record)
        return record.prediction_id

    def label(self, prediction_id: str, label: str, source: str = ANONYMOUS) -> Path:
        outcome, record = self.store.give_feedback(prediction_id, label, source)
        assert record is not None and record.image, outcome
        area = ANONYMOUS_LABELLED if source == ANONYMOUS else LABELLED
        assert self.folder.keep_labelled(record.image, area)
        return self.images / area / record.image

    def args(self, *more: str) -> list[str]:
        return ["--db", str(self.db), "--images", str(self.images), "--out", str(self.out), "--manifest",
                str(self.manifest), "--params", str(self.params), "--review-out", str(self.review), "--report",
                str(self.report), *more]  # fmt: skip

    def summary(self) -> dict:
        return json.loads(self.report.read_text())


@pytest.fixture
def written(tmp_path: Path) -> Iterator[Written]:
    made = Written(tmp_path)
    yield made
    made.store.close()


def sha_name(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest() + ".jpg"


def test_a_photo_labelled_while_harvest_runs_is_kept_however_long_ago_it_was_sent(written, monkeypatch):
    # sent two hours ago (the upload's mtime, which its labelled link shares), labelled while harvest runs: after
    # harvest read the store, before it looked at the labelled area
    data = b"a photo sent two hours ago"
    prediction = written.predict(data)
    two_hours_ago = time.time() - 7200
    os.utime(written.images / sha_name(data), (two_hours_ago, two_hours_ago))
    rules = harvest_module.harvest

    def label_meanwhile(*args, **kwargs):
        written.label(prediction, "cat")  # acknowledged: the service answered 200
        return rules(*args, **kwargs)

    monkeypatch.setattr(harvest_module, "harvest", label_meanwhile)
    harvest(written.args())
    labelled = written.images / ANONYMOUS_LABELLED / sha_name(data)
    assert labelled.is_file(), "a label given while harvest ran lost its photo"
    monkeypatch.setattr(harvest_module, "harvest", rules)
    harvest(written.args())  # the next harvest finds it: held for a person, photo and all
    rows = list(csv.DictReader(written.review.open()))
    assert [(row["image"], row["reason"]) for row in rows] == [
        (sha_name(data), "anonymous label: a person confirms it")
    ]


def test_an_orphan_is_judged_by_when_its_link_was_made_not_when_its_photo_was_sent(written, monkeypatch):
    # a photo in the labelled area whose record the store no longer holds: deleted only once its link is old
    data = b"an orphan sent long ago"
    written.folder.save(data, "image/jpeg")
    long_ago = time.time() - 7200
    os.utime(written.images / sha_name(data), (long_ago, long_ago))
    (written.images / LABELLED).mkdir()
    orphan = written.images / LABELLED / sha_name(data)
    orphan.hardlink_to(written.images / sha_name(data))  # linked now: its ctime is now, its mtime two hours ago
    harvest(written.args())
    assert orphan.is_file()
    monkeypatch.setattr(harvest_module, "ORPHAN_AFTER_S", -1)  # an hour later
    harvest(written.args())
    assert not orphan.exists() and (written.images / sha_name(data)).is_file()


def test_a_revoked_keys_labels_are_set_aside_and_only_valid_keys_are_trusted(written):
    alice = add_key(written.keys, "alice", ["label"])
    add_key(written.keys, "mallory", ["label"]), add_key(written.keys, "reader", ["predict"])
    assert alice
    good, poison, mixed, scoped = b"alice's cat", b"mallory's poison", b"mallory and anonymous", b"a predict key's"
    written.label(written.predict(good), "cat", "alice")
    written.label(written.predict(poison, "dog"), "cat", "mallory")  # waiting for harvest when mallory is revoked
    written.label(written.predict(mixed), "cat", "mallory")
    written.label(written.predict(mixed), "cat")
    written.label(written.predict(scoped), "cat", "reader")  # recorded under a key without the label scope
    assert revoke_key(written.keys, "mallory") == 1
    harvest(written.args("--keys", str(written.keys)))
    assert sorted(str(p.relative_to(written.out)) for p in written.out.rglob("*.jpg")) == [f"cat/{sha_name(good)}"]
    summary = written.summary()["this_run"]
    assert summary["left_out"] == {"labels only from revoked or unknown keys": 2}  # the poison, the predict key's
    assert summary["held_for_review"] == {"anonymous label: a person confirms it": 1}  # as if mallory never spoke
    assert summary["by_source"]["mallory"] == {"left_out": 1} and summary["by_source"]["reader"] == {"left_out": 1}
    assert not (written.images / LABELLED / sha_name(poison)).exists()  # left out for good: let go of


def test_keyed_labels_without_a_readable_keys_file_stop_the_harvest(written, monkeypatch):
    monkeypatch.delenv("API_KEYS_FILE", raising=False)
    written.label(written.predict(b"a key's cat"), "cat", "alice")
    with pytest.raises(SystemExit, match="no API_KEYS_FILE"):
        harvest(written.args())
    with pytest.raises(SystemExit, match="cannot read API_KEYS_FILE"):
        harvest(written.args("--keys", str(written.keys)))  # not there
    assert not written.out.exists() and not written.report.exists()


def test_a_keys_label_on_a_prediction_older_than_the_key_is_reviewed(written):
    # "bob"'s line deleted by hand, and a new key given the freed name: the old labels are not the new key's
    old = written.predict(b"before this bob", made=time.time() - 3600)
    written.label(old, "cat", "bob")
    add_key(written.keys, "bob", ["label"])
    written.label(written.predict(b"after"), "cat", "bob")
    harvest(written.args("--keys", str(written.keys)))
    summary = written.summary()["this_run"]
    assert summary["used"] == 1 and list(summary["held_for_review"]) == [
        "a label under a key's name, on a prediction older than that key: a person confirms it"
    ]


@pytest.mark.parametrize("cell", ["*", "[0-9a-f]*", "../cat/x", "A" * 64, "a" * 63])
def test_a_review_row_is_checked_before_anything_is_applied(written, cell):
    (written.out / "cat").mkdir(parents=True)
    harvested = [written.out / "cat" / f"{digit * 64}.jpg" for digit in "0a"]
    for photo in harvested:
        photo.write_bytes(b"harvested before")
    filled = written.review.with_name("filled.csv")
    filled.write_text(f"image,confirmed_label\n{'b' * 64},dog\n{cell},none\n")
    with pytest.raises(SystemExit, match=r"row 2 \(line 3\): image .* is not a photo's sha256"):
        harvest(written.args("--reviewed", str(filled)))
    # the same rows in the review file harvest keeps (decisions it took in before): refused too, every time
    written.review.write_text(f"image,reason,confirmed_label\n{cell},decided by a person's review,none\n")
    with pytest.raises(SystemExit, match=r"row 1 \(line 2\)"):
        harvest(written.args())
    assert all(photo.is_file() for photo in harvested)
    written.review.unlink()
    filled.write_text(f"image,confirmed_label\n{'a' * 64},cat\n{'a' * 64}.jpg,none\n")  # two decisions, one photo
    with pytest.raises(SystemExit, match="decided 'none' here and 'cat' above"):
        harvest(written.args("--reviewed", str(filled)))
    assert all(photo.is_file() for photo in harvested)


def test_the_review_file_says_where_each_held_photo_is_and_how_to_apply_it(written, capsys):
    data = b"an anonymous cat"
    written.label(written.predict(data), "cat")
    harvest(written.args())
    (row,) = csv.DictReader(written.review.open())
    assert row["image"] == sha_name(data) and Path(row["photo"]).read_bytes() == data
    printed = capsys.readouterr().out
    assert "`photo` column" in printed and f"make harvest REVIEWED={written.review}" in printed
    row["confirmed_label"] = "cat"
    with written.review.open("w", newline="") as filled:
        writer = csv.DictWriter(filled, list(row))
        writer.writeheader(), writer.writerow(row)
    harvest(written.args("--reviewed", str(written.review)))
    assert (written.out / "cat" / sha_name(data)).read_bytes() == data


def test_a_label_that_contradicts_an_identical_training_photo_is_counted_as_a_signal(written, capsys):
    same, other = b"a training cat, labelled cat", b"a training cat, labelled dog"
    rows = [f"train/cat/{n}.jpg,{n}.jpg,{sha_name(data)[:-4]},cat,train\n" for n, data in enumerate((same, other))]
    written.manifest.write_text("file,source,sha256,label,split\n" + "".join(rows))
    written.label(written.predict(same), "cat")
    written.label(written.predict(other), "dog")
    harvest(written.args())
    left_out = written.summary()["this_run"]["left_out"]
    assert left_out == {"identical to a training photo": 1, "identical to a training photo, with another label": 1}
    assert "WARNING 1 photos identical to a training photo were given another label" in capsys.readouterr().out


def test_the_report_keeps_this_runs_counts_apart_from_the_totals(written, monkeypatch):
    add_key(written.keys, "alice", ["label"])
    written.label(written.predict(b"one"), "cat", "alice")
    harvest(written.args("--keys", str(written.keys)))
    harvest(written.args("--keys", str(written.keys)))  # nothing new
    report = written.summary()
    assert report["this_run"]["used"] == 0 and report["this_run"]["already_harvested"] == 1
    assert report["totals"]["data_feedback_photos"] == 1
    assert report["totals"]["data_feedback_photos_by_label"] == {"cat": 1}


def harvested_times(db: Path) -> dict[str, float | None]:
    with contextlib.closing(sqlite3.connect(db)) as connection:
        return dict(connection.execute("SELECT prediction_id, harvested_time FROM predictions"))


def test_labels_are_marked_harvested_once_their_photos_are_let_go_of(written, capsys):
    add_key(written.keys, "alice", ["label"])
    used = written.predict(b"alice's cat")
    written.label(used, "cat", "alice")
    held, dropped = written.predict(b"held"), written.predict(b"dropped")
    written.label(held, "cat"), written.label(dropped, "dog")
    harvest(written.args("--keys", str(written.keys)))
    # copied, not yet in a data version that came back: the store keeps the label (an evicted record would leave
    # its waiting photo an orphan if this copy were lost before it is pushed)
    assert set(harvested_times(written.db).values()) == {None}
    filled = written.review.with_name("filled.csv")
    filled.write_text(f"image,confirmed_label\n{sha_name(b'dropped')},none\n")
    harvest(written.args("--keys", str(written.keys), "--reviewed", str(filled)))
    times = harvested_times(written.db)
    assert times[used] and times[dropped] and times[held] is None  # found harvested, dropped; held: kept
    assert written.summary()["store"] == {"labels_done": 2, "marked_harvested": 2}
    assert "2 labels marked harvested in the store" in capsys.readouterr().out


def test_a_store_that_cannot_mark_labels_harvested_is_said_so(written, capsys, monkeypatch):
    written.label(written.predict(b"an anonymous cat"), "cat")
    filled = written.review.with_name("filled.csv")
    filled.write_text(f"image,confirmed_label\n{sha_name(b'an anonymous cat')},none\n")
    monkeypatch.delattr(PredictionStore, "mark_harvested")  # store code older than harvest
    harvest(written.args("--reviewed", str(filled)))
    assert "labels NOT marked harvested: this store code has no mark_harvested" in capsys.readouterr().out
    assert written.summary()["store"] == {"labels_done": 1, "marked_harvested": None}


def test_a_store_too_old_to_mark_labels_harvested_is_said_so(written, capsys, monkeypatch):
    written.label(written.predict(b"an anonymous cat"), "cat")
    filled = written.review.with_name("filled.csv")
    filled.write_text(f"image,confirmed_label\n{sha_name(b'an anonymous cat')},none\n")

    def too_old(self: PredictionStore, labels: list[PredictionRecord]) -> int:
        raise StoreError("the feedback store has schema revision 2; marking labels harvested needs revision 3")

    monkeypatch.setattr(PredictionStore, "mark_harvested", too_old)
    harvest(written.args("--reviewed", str(filled)))
    assert "NOT marked harvested: the store said: the feedback store has schema revision 2" in capsys.readouterr().out


def test_a_key_label_given_after_harvest_read_the_store_is_not_marked_harvested(written, monkeypatch):
    """Harvest marks the labels it read, never another that replaced one since (a key's label in place of an anonymous
    one after its second read): that label was acknowledged, and marked it could be evicted before any harvest."""
    add_key(written.keys, "alice", ["label"])
    prediction_id = written.predict(b"called not a pet", is_pet=False)
    written.label(prediction_id, "cat")  # left out for good: an anonymous label on a non-pet, its label done with
    mark = harvest_module.mark_harvested

    def label_meanwhile(*args, **kwargs):
        written.label(prediction_id, "dog", "alice")  # replaces the anonymous label just before the mark
        return mark(*args, **kwargs)

    monkeypatch.setattr(harvest_module, "mark_harvested", label_meanwhile)
    harvest(written.args("--keys", str(written.keys)))
    assert written.summary()["store"] == {"labels_done": 1, "marked_harvested": 0}
    assert harvested_times(written.db)[prediction_id] is None
    assert written.store.get(prediction_id).feedback_source == "alice"


def test_a_photo_left_out_keeps_its_photo_when_a_key_labels_it_while_harvest_runs(written, monkeypatch):
    add_key(written.keys, "alice", ["label"])
    data = b"called not a pet, labelled anonymously"
    written.label(written.predict(data, is_pet=False), "cat")  # left out: anonymous, on a non-pet
    later = written.predict(data, is_pet=False)
    (written.images / sha_name(data)).unlink()  # gone from the folder since: the labelled areas hold it alone
    rules = harvest_module.harvest

    def label_meanwhile(*args, **kwargs):
        result = rules(*args, **kwargs)
        written.label(later, "cat", "alice")  # acknowledged while harvest decides on the photo's older labels
        return result

    monkeypatch.setattr(harvest_module, "harvest", label_meanwhile)
    harvest(written.args("--keys", str(written.keys)))
    assert written.summary()["this_run"]["left_out"] == {"anonymous label on a photo the model called not a pet": 1}
    assert written.summary()["store"]["labels_done"] == 0  # nothing marked: the next harvest decides
    monkeypatch.setattr(harvest_module, "harvest", rules)
    harvest(written.args("--keys", str(written.keys)))
    assert (written.out / "cat" / sha_name(data)).read_bytes() == data  # the key's label, photo and all

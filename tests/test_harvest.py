"""Feedback to data: a real service process keeps photos and feedback, `loop.harvest` turns them into labelled
photos by its rules (trusted labels used once, disagreements and confident contradictions held, anonymous labels
only through review and never on a photo the model called not a pet, evaluation photos left out)."""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import json

import httpx2 as httpx
import pytest

from loop.harvest import main as harvest
from server.keys import add_key
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
              "--params", str(params), "--review-out", str(review), "--report", str(report)]  # fmt: skip
    harvest(common)
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*.jpg")) == sorted(
        [f"cat/{name_of(CAT1)}", f"dog/{name_of(DOG2)}", f"cat/{name_of(DOG5)}"]
    )
    assert (out / "cat" / name_of(CAT1)).read_bytes() == (DATASET / CAT1).read_bytes()
    summary = json.loads(report.read_text())
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
    summary = json.loads(report.read_text())
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
    summary = json.loads(report.read_text())
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
    summary = json.loads(report.read_text())
    assert summary["left_out"]["dropped by a person's review"] == 1
    assert not (images / "labelled" / name_of(CAT2)).exists()

    # a review may relabel a harvested photo, even once the service let go of it: it then has one label only
    for kept_copy in (images / name_of(DOG5), images / "labelled" / name_of(DOG5)):
        kept_copy.unlink(missing_ok=True)
    relabel = tmp_path / "relabel.csv"
    relabel.write_text(f"image,confirmed_label\n{name_of(DOG5)},dog\n")
    harvest([*common, "--reviewed", str(relabel)])
    assert json.loads(report.read_text())["relabelled"] == 1
    assert (out / "dog" / name_of(DOG5)).read_bytes() == (DATASET / DOG5).read_bytes()
    assert not (out / "cat" / name_of(DOG5)).exists()
    relabel.write_text(f"image,confirmed_label\n{name_of(DOG5)},none\n")  # and drop a harvested photo
    harvest([*common, "--reviewed", str(relabel)])
    assert not list(out.rglob(name_of(DOG5)))
    assert "trusted labels disagree" not in json.loads(report.read_text())["held_for_review"]  # CAT2's drop stays
    relabel.write_text(f"image,confirmed_label\n{name_of(DOG5)},Dog\n")  # not a label: refused, not dropped
    with pytest.raises(SystemExit, match="confirmed_label must be one of"):
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
    result = rules([later, hostile], images, out, ["cat", "dog"], set(), 0.99, {forgotten[:64]: "none"})
    assert [row["reason"] for row in result.held] == ["a trusted label contradicts the harvested one"]
    assert (out / "cat" / photo).is_file() and not (out / "cat" / forgotten).exists()  # dropped, record or not

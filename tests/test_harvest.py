"""Feedback to data: a real service process keeps photos and feedback, `deploy.harvest` turns them into labelled
photos by its rules (used once, disagreements and confident contradictions held, evaluation photos left out)."""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json

import httpx2 as httpx
import pytest

from deploy.harvest import main as harvest
from tests.conftest import DATASET, running_service
from tests.service import Service

CAT1, CAT2, CAT3, CAT4 = "cats/cat.1.jpg", "cats/cat.2.jpg", "cats/cat.3.jpg", "cats/cat.4.jpg"
DOG2, DOG5 = "dogs/dog.2.jpg", "dogs/dog.5.jpg"


def name_of(photo: str) -> str:
    return hashlib.sha256((DATASET / photo).read_bytes()).hexdigest() + ".jpg"


def test_feedback_through_the_api_becomes_a_labelled_data_version(onnx_model, tmp_path):
    db, images, out = tmp_path / "feedback.db", tmp_path / "kept", tmp_path / "feedback"
    manifest = tmp_path / "manifest.csv"  # the original data's evaluation photos: cat.3 is one
    manifest.write_text(f"file,source,sha256,label,split\ntest/cat/x.jpg,{CAT3},{name_of(CAT3)[:-4]},cat,test\n")

    def send(running: Service, photo: str, label: str) -> dict:
        body = (DATASET / photo).read_bytes()
        answer = httpx.post(f"{running.url}/predict", content=body, headers={"content-type": "image/jpeg"}, timeout=30)
        given = httpx.post(f"{running.url}/feedback", json={"prediction_id": answer.json()["prediction_id"],
                                                           "label": label}, timeout=30)  # fmt: skip
        assert given.status_code == 200, given.text
        return answer.json()

    with contextlib.contextmanager(running_service)(onnx_model, FEEDBACK_DB=str(db), FEEDBACK_IMAGES=str(images)) as on:
        send(on, CAT1, "cat")  # right: used
        send(on, DOG2, "dog")  # right: used
        sure = send(on, CAT4, "dog")  # against a sure answer: held for review
        unsure = send(on, DOG5, "cat")  # against an unsure answer: used as given
        send(on, CAT2, "cat"), send(on, CAT2, "dog")  # the same photo, two different labels: held
        send(on, CAT3, "cat")  # an evaluation photo: left out
    assert max(sure["probabilities"].values()) >= 0.99 > max(unsure["probabilities"].values()), (sure, unsure)
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
    assert summary["used"] == 3 and summary["left_out"] == {"identical to an evaluation photo": 1}
    assert summary["held_for_review"] == {"feedbacks disagree": 1, "contradicts an answer of probability >= 0.99": 1}

    # a person confirms the cat is a cat after all (the feedback was wrong), and leaves the other undecided
    rows = list(csv.DictReader(review.open()))
    for row in rows:
        row["confirmed_label"] = "cat" if row["image"] == name_of(CAT4) else ""
    with review.open("w", newline="") as filled:
        writer = csv.DictWriter(filled, list(rows[0]))
        writer.writeheader(), writer.writerows(rows)
    harvest([*common, "--reviewed", str(review)])
    summary = json.loads(report.read_text())
    assert summary["used"] == 1 and summary["already_harvested"] == 3  # each photo used once
    assert (out / "cat" / name_of(CAT4)).is_file() and summary["held_for_review"] == {"feedbacks disagree": 1}

    (images / name_of(CAT1)).unlink()  # expired from the service's folder: already harvested, nothing lost
    harvest(common)  # and without the review file, nothing decided is held or asked again
    summary = json.loads(report.read_text())
    assert summary["used"] == 0 and summary["already_harvested"] == 4 and (out / "cat" / name_of(CAT1)).is_file()
    assert summary["held_for_review"] == {"feedbacks disagree": 1}

    # a review may relabel a harvested photo: it then has one label only
    relabel = tmp_path / "relabel.csv"
    relabel.write_text(f"image,confirmed_label\n{name_of(DOG5)},dog\n")
    harvest([*common, "--reviewed", str(relabel)])
    assert json.loads(report.read_text())["relabelled"] == 1
    assert (out / "dog" / name_of(DOG5)).is_file() and not (out / "cat" / name_of(DOG5)).exists()
    relabel.write_text(f"image,confirmed_label\n{name_of(DOG5)},Dog\n")  # not a label: refused, not dropped
    with pytest.raises(SystemExit, match="confirmed_label must be one of"):
        harvest([*common, "--reviewed", str(relabel)])
    relabel.write_text(f"image,label\n{name_of(DOG5)},dog\n")
    with pytest.raises(SystemExit, match="needs the columns image and confirmed_label"):
        harvest([*common, "--reviewed", str(relabel)])


def test_harvest_needs_to_be_told_where_the_service_wrote(capsys, monkeypatch):
    monkeypatch.delenv("FEEDBACK_DB", raising=False)
    monkeypatch.delenv("FEEDBACK_IMAGES", raising=False)
    with pytest.raises(SystemExit) as stopped:
        harvest([])
    assert stopped.value.code == 2 and "give FEEDBACK_DB and FEEDBACK_IMAGES" in capsys.readouterr().err

"""Smoke test and post-deployment evaluation against the real service over HTTP."""

from __future__ import annotations

import hashlib
import json
import shutil
import time

import numpy as np
import pytest

from deploy import evaluate
from deploy.client import free_port
from deploy.smoke import smoke
from tests.conftest import DATASET, labelled_folder, photos
from tests.service import Service


def test_smoke_passes_on_a_healthy_service(service):
    assert smoke(service.url, [*photos("cat", 2), *photos("dog", 2)], timeout=10) == []


def test_smoke_checks_the_released_model_sha256(service, onnx_model):
    released = hashlib.sha256(onnx_model.read_bytes()).hexdigest()
    assert smoke(service.url, photos("cat", 1), timeout=10, expect_sha256=released) == []
    [failure] = smoke(service.url, photos("cat", 1), timeout=10, expect_sha256="0" * 64)
    assert failure.startswith(f"/ready: model_sha256 {released} is not the released")


def test_smoke_fails_on_a_service_without_a_model(tmp_path):
    bare = Service(tmp_path / "absent.onnx")
    try:
        with pytest.raises(TimeoutError, match="ready"):
            smoke(bare.url, photos("cat", 1), timeout=5)
    finally:
        bare.stop()


def test_evaluation_counts_failed_requests_as_wrong(service, tmp_path):
    data = labelled_folder(tmp_path / "eval", 10, start=101)
    shutil.copyfile(DATASET / "dogs" / "dog.90002.jpg", data / "dog" / "truncated.jpg")  # the service answers 400
    out = tmp_path / "report.json"
    with pytest.raises(SystemExit, match="below --min-accuracy"):
        evaluate.main(["--url", service.url, "--data", str(data), "--out", str(out), "--min-accuracy", "0.99"])
    report = json.loads(out.read_text())
    assert report["images"] == 21 and report["errors"] == 1
    counts = report["confusion_matrix"]["counts"]
    assert sum(map(sum, counts)) == 21 and counts[1][2] == 1  # the failed dog sits in the "failed" column
    correct = counts[0][0] + counts[1][1]
    assert report["accuracy"] == pytest.approx(correct / 21)
    assert correct <= 20 and report["accuracy"] < 1
    assert set(report["precision"]) == set(report["recall"]) == {"cat", "dog"}
    assert report["latency_ms"]["p95"] >= report["latency_ms"]["p50"] > 0


def test_the_serve_side_confusion_matrix_and_rates_equal_scikit_learns():
    from sklearn.metrics import confusion_matrix, precision_score, recall_score

    rng = np.random.default_rng(0)
    truths, answers = rng.integers(0, 3, 500), rng.integers(0, 4, 500)  # 3 classes and a "failed" column
    answers[truths == 2] = np.where(answers[truths == 2] == 2, 0, answers[truths == 2])  # class 2 never predicted
    matrix = evaluate.confusion_matrix(truths, answers, 4)
    np.testing.assert_array_equal(matrix, confusion_matrix(truths, answers, labels=range(4)))
    precision, recall = evaluate.precision_recall(matrix[:3, :3], matrix[:3].sum(1))  # a failed answer is a miss
    rates = {"labels": range(3), "average": None, "zero_division": 0}
    np.testing.assert_allclose(precision, precision_score(truths, answers, **rates))
    np.testing.assert_allclose(recall, recall_score(truths, answers, **rates))
    assert precision[2] == 0 and recall[2] == 0


def test_plural_capitalised_folders_are_scored_like_the_model_labels(service, tmp_path, monkeypatch, capsys):
    data = tmp_path / "eval"
    for folder, label in (("Cats", "cat"), ("dogs", "dog")):
        (data / folder).mkdir(parents=True)
        for photo in photos(label, 8, start=201):
            shutil.copyfile(photo, data / folder / photo.name)
    monkeypatch.chdir(tmp_path)
    evaluate.main(["--url", service.url, "--data", str(data), "--min-accuracy", "0.8"])
    out = capsys.readouterr().out
    assert "report written to build/eval-deployed.json" in out
    report = json.loads((tmp_path / "build" / "eval-deployed.json").read_text())
    counts = report["confusion_matrix"]["counts"]
    assert report["confusion_matrix"]["rows_true"] == ["cat", "dog"] and report["errors"] == 0
    assert counts[0][2] == counts[1][2] == 0 and sum(map(sum, counts)) == 16
    assert report["accuracy"] >= 0.8 and "0 failed requests" in out


def expect_usage_error(argv: list[str], capsys, match: str) -> float:
    started = time.perf_counter()
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(argv)
    elapsed = time.perf_counter() - started
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1 and match in err, err
    return elapsed


def test_a_wrong_url_fails_fast_in_one_line(tmp_path, capsys):
    url = f"http://127.0.0.1:{free_port()}"
    assert expect_usage_error(["--url", url, "--data", str(DATASET)], capsys, f"cannot reach the service at {url}") < 5
    assert expect_usage_error(["--url", "localhost:8000", "--data", str(DATASET)], capsys, "cannot reach") < 5


def test_a_missing_folder_fails_before_asking_the_service(tmp_path, capsys):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens: the folder is checked first
    assert expect_usage_error(["--url", url, "--data", str(tmp_path / "nope")], capsys, "no such folder") < 1


def test_a_folder_matching_no_label_is_refused(service, tmp_path, capsys):
    (tmp_path / "birds").mkdir()
    shutil.copyfile(photos("cat", 1)[0], tmp_path / "birds" / "bird.jpg")
    expect_usage_error(["--url", service.url, "--data", str(tmp_path)], capsys, "matches none of the model's labels")

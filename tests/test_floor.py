"""server.floor: an accuracy is held to a floor by the lower end of its Wilson 95% interval, never by its point
estimate, in export.convert and in deploy.evaluate alike."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from deploy import evaluate
from server.floor import floor, photos_needed, wilson
from tests.conftest import ROOT, labelled_folder
from training.stats import interval


def test_the_floor_interval_is_training_stats_wilson_interval():
    for n in (0, 1, 5, 16, 195, 400, 10_000):
        for correct in {0, 1, n // 2, max(n - 4, 0), max(n - 1, 0), n}:
            assert wilson(correct, n) == pytest.approx(interval(correct, n), abs=1e-12), (correct, n)


def test_a_model_shown_below_the_floor_is_refused():
    verdict = floor(100, 195, 0.90, "--min-accuracy")  # a broken deployment: half the photos right
    assert not verdict["accepted"] and verdict["ci95"][1] < 0.90
    assert "shown below --min-accuracy 0.9000" in verdict["reason"]


def test_a_point_estimate_above_the_floor_is_not_enough():
    """The served model's 191 of 195 test photos (97.9%): above a 0.97 floor as a point estimate, but the interval
    reaches down to 94.8%, so it is not shown to be above it; a 0.90 floor it is shown to clear."""
    refused = floor(191, 195, 0.97, "--min-accuracy")
    assert refused["rate"] > 0.97 and refused["ci95"][0] < 0.97 and not refused["accepted"]
    assert "its lower bound is below --min-accuracy" in refused["reason"]
    accepted = floor(191, 195, 0.90, "--min-accuracy")
    assert accepted["accepted"] and accepted["ci95"][0] >= 0.90 and "shown at least" in accepted["reason"]


def test_too_few_photos_is_a_refusal_even_all_right():
    needed = photos_needed(0.90)
    assert 30 <= needed <= 40
    assert floor(needed, needed, 0.90, "x")["accepted"] and not floor(needed - 1, needed - 1, 0.90, "x")["accepted"]
    assert f"{needed} photos would be needed" in floor(16, 16, 0.90, "x")["reason"]
    assert not floor(0, 0, 0.0001, "x")["accepted"]  # no photos shows nothing
    with pytest.raises(ValueError, match=r"--min-accuracy: a floor in \[0, 1\)"):
        floor(5, 5, 1.2, "--min-accuracy")


def test_deploy_evaluate_refuses_an_accuracy_above_the_floor_only_as_a_point_estimate(service, tmp_path):
    data = labelled_folder(tmp_path / "eval", 8, start=201)
    out = tmp_path / "report.json"
    with pytest.raises(SystemExit, match=r"below --min-accuracy 0\.9000, not shown at least the floor"):
        evaluate.main(["--url", service.url, "--data", str(data), "--out", str(out), "--min-accuracy", "0.9"])
    report = json.loads(out.read_text())
    assert report["images"] == 16 and report["accuracy"] >= 0.9  # a point estimate that would have passed
    assert report["floor"]["ci95"][0] < 0.9 and not report["floor"]["accepted"]
    evaluate.main(["--url", service.url, "--data", str(data), "--out", str(out), "--min-accuracy", "0.5"])
    assert json.loads(out.read_text())["floor"]["accepted"]


def test_the_floor_runs_where_deploy_evaluate_runs_without_scipy_or_yaml():
    """make eval-deployed runs in the serve-only environment (requirements-serve.txt): no SciPy, no YAML parser."""
    blocked = "import sys; sys.modules.update(dict.fromkeys(['scipy', 'yaml', 'torch', 'mlflow']))"
    code = f"{blocked}; import deploy.evaluate; from server.floor import floor; print(floor(191, 195, 0.9, 'x'))"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "'accepted': True" in result.stdout, result.stderr


@pytest.mark.parametrize("value", ["1.0", "1.5", "-0.1", "nan"])
def test_deploy_evaluate_refuses_a_floor_that_is_not_one_before_evaluating(value, capsys, tmp_path):
    """An impossible floor is a usage error (exit 2) before any photo is sent, not a traceback after the run."""
    with pytest.raises(SystemExit) as stopped:
        evaluate.main(["--url", "http://127.0.0.1:9", "--data", str(tmp_path), "--min-accuracy", value])
    assert stopped.value.code == 2
    assert "a floor in [0, 1)" in capsys.readouterr().err

"""loop.replay against a real service: progress while it runs with its output piped, and the 429s it waited out."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import httpx2 as httpx

from loop.replay import Tally, replay_all
from tests.conftest import ROOT, photos, running_service


def metric(text: str, name: str) -> float:
    """A sample's value in a Prometheus text page; 0 when the series was never written."""
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + " ")]
    return values[0] if values else 0.0


def test_replay_shows_progress_when_piped_and_counts_the_429s_it_waited_out(onnx_model, tmp_path):
    traffic = tmp_path / "traffic"
    for label in ("cat", "dog"):
        (traffic / label).mkdir(parents=True)
        for photo in photos(label, 3):
            shutil.copyfile(photo, traffic / label / photo.name)
    limits = {"PREDICT_RATE": "2", "PREDICT_BURST": "1", "FEEDBACK_RATE": "2", "FEEDBACK_BURST": "1"}
    with contextlib.contextmanager(running_service)(onnx_model, **limits) as service:
        run = subprocess.run([sys.executable, "-m", "loop.replay", str(traffic), "--url", service.url,
                              "--concurrency", "3", "--progress-s", "0.3"],
                             cwd=ROOT, capture_output=True, text=True, timeout=300)  # fmt: skip
        page = httpx.get(f"{service.url}/metrics", timeout=30).text
    assert run.returncode == 0, run.stderr
    [line] = run.stdout.splitlines()  # stdout is the summary alone; progress goes to stderr
    summary = json.loads(line)
    assert summary["photos"] == summary["predicted"] == summary["feedback 200"] == 6, summary
    waited = summary["waited out"]
    assert waited["predict 429"] >= 1 and waited["seconds"] >= waited["predict 429"], summary  # Retry-After >= 1 s
    for route in ("predict", "feedback"):  # each 429 the service sent was waited out, and counted once
        refused = metric(page, f'catsdogs_rate_limited_total{{client="anonymous",route="{route}"}}')
        assert refused == waited[f"{route} 429"], (route, refused, summary)
    progress = [text for text in run.stderr.splitlines() if text.startswith("loop.replay: ")]
    assert len(progress) >= 2 and "\r" not in run.stderr, run.stderr  # lines, not a bar, when stderr is a pipe
    assert progress[-1].startswith("loop.replay: 6/6 photos ["), progress
    assert f"429s waited out: {waited['predict 429']} predict, {waited['feedback 429']} feedback" in progress[-1]


def test_replay_refuses_a_progress_interval_that_is_not_positive(tmp_path):
    run = subprocess.run([sys.executable, "-m", "loop.replay", str(tmp_path), "--progress-s", "0"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert run.returncode == 2 and "--progress-s must be above 0" in run.stderr


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_on_a_terminal_progress_is_tqdms_bar_with_the_waits_beside_it():
    tally, stream = Tally(), Terminal()

    def send(item: tuple[Path, str]) -> list[str]:
        tally.waited("feedback", 1)
        return ["predicted"]

    replay_all(send, [(Path(f"{i}.jpg"), "cat") for i in range(3)], tally, 2, 10, stream)
    assert tally.outcomes == {"predicted": 3} and tally.waited_out() == {"predict 429": 0, "feedback 429": 3,
                                                                         "seconds": 3}  # fmt: skip
    bar = stream.getvalue()
    assert "\r" in bar and "3/3" in bar and "429s waited out: 0 predict, 3 feedback" in bar, bar
    assert "loop.replay: " not in bar  # no plain lines on a terminal

"""The single-host blue/green pieces that run without containers: bluegreen.sh's refusals, the nginx stand-in's
template rendering, and the rehearsal's own checks. The real deploy under load is `make deploy-test` (.ci/run)."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

from deploy.rehearse import Answer, Scenario, check_records, check_switch, log_time

ROOT = Path(__file__).resolve().parents[1]
HOST = ROOT / "deploy" / "host"


@pytest.fixture
def deploy_path(tmp_path: Path) -> Path:
    """A DEPLOY_PATH laid out as CD uploads it."""
    (tmp_path / "deploy" / "host").mkdir(parents=True)
    shutil.copy2(ROOT / "docker-compose.yml", tmp_path)
    for name in ("bluegreen.sh", "releases.py", "proxy.yml", "nginx.conf.template"):
        shutil.copy2(HOST / name, tmp_path / "deploy" / "host")
    return tmp_path


def bluegreen(deploy_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": os.environ["PATH"], "HOME": str(deploy_path)}
    script = deploy_path / "deploy" / "host" / "bluegreen.sh"
    return subprocess.run(["bash", str(script), *args], env=env, capture_output=True, text=True, timeout=30)


def test_bluegreen_refuses_what_would_break_the_live_colour(deploy_path):
    assert bluegreen(deploy_path, "active").stdout.strip() == "none"
    (deploy_path / "proxy").mkdir(exist_ok=True)  # the script makes it too
    (deploy_path / "proxy" / "upstream.conf").write_text(
        "server 127.0.0.1:8001;\n"
    )  # the one record of the live colour
    assert bluegreen(deploy_path, "active").stdout.strip() == "blue"
    refused = bluegreen(deploy_path, "retire", "blue")
    assert refused.returncode == 1 and "refusing to stop the live colour blue" in refused.stderr
    rejected = bluegreen(deploy_path, "reject", "blue", "smoke test failed")
    assert rejected.returncode == 1 and "refusing to reject the live colour blue" in rejected.stderr
    again = bluegreen(deploy_path, "switch", "blue")
    assert again.returncode == 1 and "blue is live already" in again.stderr
    unknown = bluegreen(deploy_path, "switch", "purple")
    assert unknown.returncode == 2 and "unknown colour 'purple'" in unknown.stderr
    assert "no previous release to roll back to" in bluegreen(deploy_path, "rollback").stderr
    (deploy_path / "models" / "empty").mkdir(parents=True)
    no_model = bluegreen(deploy_path, "candidate", "img@sha256:00", "models/empty")
    assert no_model.returncode == 1 and "no model.onnx in models/empty" in no_model.stderr
    usage = bluegreen(deploy_path)
    assert usage.returncode == 2 and "bluegreen.sh rollback" in usage.stderr
    with open(deploy_path / "proxy" / ".lock", "w") as lock:  # a deploy in progress
        fcntl.flock(lock, fcntl.LOCK_EX)
        busy = bluegreen(deploy_path, "retire", "green")
    assert busy.returncode == 1 and "another bluegreen.sh is running" in busy.stderr
    assert (deploy_path / "proxy" / "upstream.conf").read_text() == "server 127.0.0.1:8001;\n"  # untouched


def test_rollback_brings_back_the_release_before_the_live_one(deploy_path):
    def history(*outcomes: tuple[str, str]) -> str:
        (deploy_path / "deployments.jsonl").write_text(
            "".join(
                json.dumps({"outcome": o, "image": f"img@{m}", "models": f"models/{m}"}) + "\n" for o, m in outcomes
            )
        )
        previous = [sys.executable, str(deploy_path / "deploy" / "host" / "releases.py"), "previous"]
        return subprocess.run(previous, cwd=deploy_path, capture_output=True, text=True).stdout.strip()

    assert history(("deployed", "a"), ("deployed", "b")) == "img@a\tmodels/a"
    # a deploy that failed its checks after the switch was switched back: it does not count
    assert history(("deployed", "a"), ("deployed", "b"), ("failed", "x"), ("deployed", "c"), ("reverted", "b"),
                   ("failed", "c")) == "img@a\tmodels/a"  # fmt: skip
    # a rollback is a new live release: a second one rolls forward again
    assert history(("deployed", "a"), ("deployed", "b"), ("rolled-back", "a")) == "img@b\tmodels/b"
    assert history(("deployed", "a")) == ""


def test_the_nginx_stand_in_renders_the_proxy_template_as_the_official_image_does(tmp_path):
    templates, conf = tmp_path / "templates", tmp_path / "conf.d"
    templates.mkdir(), conf.mkdir()
    shutil.copy2(HOST / "nginx.conf.template", templates / "default.conf.template")
    bin_dir = tmp_path / "bin"  # `nginx` here only proves the entrypoint hands over to the command it was given
    bin_dir.mkdir()
    (bin_dir / "nginx").write_text('#!/bin/sh\necho "nginx $*"\n')
    (bin_dir / "nginx").chmod(0o755)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "PUBLIC_PORT": "8123",
           "NGINX_ENVSUBST_TEMPLATE_DIR": str(templates), "NGINX_ENVSUBST_OUTPUT_DIR": str(conf)}  # fmt: skip
    entrypoint = HOST / "standin" / "nginx" / "docker-entrypoint.sh"
    done = subprocess.run(
        ["sh", str(entrypoint), "nginx", "-g", "daemon off;"], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("nginx -g daemon off;")
    rendered = (conf / "default.conf").read_text()
    assert "listen 8123;" in rendered and "${PUBLIC_PORT}" not in rendered
    assert "proxy_set_header Host $host;" in rendered  # nginx's own variables are not the environment's


def answers(*rows: tuple[float, float, str]) -> list[Answer]:
    return [Answer(sent, done, 200, "cat", version) for sent, done, version in rows]


def test_the_rehearsal_sees_a_switch_that_is_not_one():
    good = Scenario("deploy")
    check_switch(good, answers((1, 2, "a"), (9, 10.5, "a"), (11, 12, "b"), (13, 14, "b")), (10, 10.5), 11, "a", "b")
    assert good.problems == []
    late = Scenario("deploy")  # the old model answered a request sent 3 s after the switch
    check_switch(late, answers((1, 2, "a"), (13, 14, "a"), (15, 16, "b")), (10, 10.5), 20, "a", "b")
    assert any("after the switch were answered by a" in problem for problem in late.problems)
    killed = Scenario("deploy")  # the old colour was still answering once its retirement began
    check_switch(killed, answers((9.5, 12, "a"), (11, 12, "b")), (10, 10.5), 11, "a", "b")
    assert any("after its retirement began" in problem for problem in killed.problems)
    never = Scenario("deploy")
    check_switch(never, answers((1, 2, "a"), (15, 16, "a")), (10, 10.5), 20, "a", "b")
    early = Scenario("deploy")  # the new model answered before the reload began
    check_switch(early, answers((1, 2, "b"), (11, 12, "b")), (10, 10.5), 20, "a", "b")
    assert any("answered by b before the switch" in problem for problem in early.problems)
    assert any("no request was answered by b" in problem for problem in never.problems)


def test_log_times_are_read_from_the_scripts_own_lines():
    log = "podman chatter switch: traffic\n2026-11-29T17:13:26.190Z switch: traffic -> green (127.0.0.1:1)\n"
    expected = datetime(2026, 11, 29, 17, 13, 26, 190000, tzinfo=UTC).timestamp()
    assert log_time(log, r"switch: traffic") == pytest.approx(expected)
    assert log_time(log, r"retire") is None


def test_the_records_must_hold_every_run(tmp_path):
    image, a, b, broken = "img@sha256:1", "a" * 64, "b" * 64, "c" * 64
    releases = [(f"models/{a}", a), (f"models/{b}", b)]
    runs = (("deployed", a, f"models/{a}"), ("deployed", b, f"models/{b}"), ("failed", broken, "models/broken"),
            ("deployed", a, "models/rejected"), ("reverted", b, f"models/{b}"), ("failed", a, "models/rejected"),
            ("rolled-back", a, f"models/{a}"))  # fmt: skip
    lines = [{"at": "2026-11-29T17:00:00Z", "outcome": outcome, "image": image, "image_id": "sha256:2",
              "model_sha256": sha, "models": f"/srv/{models}", "colour": "blue",
              "commit": "rehearsal-rejected" if models == "models/rejected" else "",
              "release": None if outcome == "failed" else {"sha256": sha}}
             for outcome, sha, models in runs]  # fmt: skip

    def problems(history: list[dict], current: dict) -> list[str]:
        (tmp_path / "deployments.jsonl").write_text("".join(json.dumps(line) + "\n" for line in history))
        (tmp_path / "current.json").write_text(json.dumps(current))
        return check_records(tmp_path, image, releases).problems

    assert problems(lines, lines[-1]) == []
    assert any("expected" in problem for problem in problems(lines[:2] + lines[3:], lines[-1]))
    assert any("is not the last deployment" in problem for problem in problems(lines, lines[1]))
    wrong_rollback = [*lines[:-1], {**lines[-1], "models": "/srv/models/rejected"}]  # the rejected release came back
    assert any("the rollback brought back" in problem for problem in problems(wrong_rollback, wrong_rollback[-1]))

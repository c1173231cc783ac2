"""deploy/host/bluegreen.sh killed at every step: SIGKILL (nothing of the script runs again) or SIGHUP (a dropped
SSH session: its traps run), at each step its trace shows (a command of the script's own) in `switch`, `candidate`,
`retire` and `rollback`. After each, once the next call returns: the records (proxy/upstream.conf, current.json)
and what the public port serves agree, nothing half-done is left, and that next call ran correctly.

Docker is tests/fakedocker/docker here, whose containers are real processes answering real HTTP (a killed script
must be restarted in seconds, hundreds of times); `make deploy-test` runs the same script on real containers and
nginx."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from deploy.client import free_port
from tests.test_host_deploy import ROOT
from tests.test_host_deploy import deploy_path as deploy_path  # a fixture, used by `host`

FAKE = ROOT / "tests" / "fakedocker"
PROLOGUE: dict[str, int] = {}  # a command's first step of its own (its `case`), as traced


@pytest.fixture
def host(deploy_path: Path, tmp_path_factory: pytest.TempPathFactory):
    """A DEPLOY_PATH with two model folders, and the environment bluegreen.sh runs with there."""
    state, bin_dir = tmp_path_factory.mktemp("docker"), tmp_path_factory.mktemp("bin")
    (bin_dir / "python3").symlink_to(sys.executable)  # this interpreter: no version manager's shim per call
    for name in ("a", "b"):
        (deploy_path / "models" / name).mkdir(parents=True)
        (deploy_path / "models" / name / "model.onnx").write_bytes(f"model {name}".encode())
    env = {"PATH": f"{FAKE}:{bin_dir}:{os.environ['PATH']}", "HOME": str(deploy_path), "FAKE_DOCKER_STATE": str(state),
           "PUBLIC_PORT": str(free_port()), "BLUE_PORT": str(free_port()), "GREEN_PORT": str(free_port()),
           "HEALTH_TIMEOUT": "10"}  # fmt: skip
    yield deploy_path, env
    for record in state.glob("*.json"):  # every process the fake started
        with contextlib.suppress(OSError):
            os.killpg(json.loads(record.read_text())["pid"], signal.SIGTERM)


def run(host: tuple[Path, dict], *args: str, kill_at: int | None = None, how: int = signal.SIGKILL) -> tuple[int, int]:
    """bluegreen.sh ARGS traced; killed (its whole process group) as it reaches its `kill_at`th step, a command of
    the script's own (a top-level trace line, not one inside a function or a command substitution). (exit status,
    steps seen)."""
    deploy_path, env = host
    script = deploy_path / "deploy" / "host" / "bluegreen.sh"
    process = subprocess.Popen(["bash", "-x", str(script), *args], env=env, cwd=deploy_path, text=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)  # fmt: skip
    assert process.stderr
    seen, lines = 0, []
    for line in process.stderr:
        lines.append(line)
        if line.startswith("+ "):  # bash ignores PS4 from the environment as root: its default
            seen += 1
            if line.startswith("+ case ") and not PROLOGUE.get(args[0]):
                PROLOGUE[args[0]] = seen  # the steps before it (the lock, the settling) are every command's
            if seen == kill_at:
                os.killpg(process.pid, how)
                break
    process.stderr.close()
    code = process.wait(timeout=60)
    if code and kill_at is None:
        print("".join(line for line in lines if not line.startswith("+")))  # the script's own messages
    return code, seen


def ready(port: str | int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=5) as answer:
        return json.load(answer)


def check_agree(host: tuple[Path, dict]) -> str:
    """The records and the public port agree, nothing half-done left; the live colour."""
    deploy_path, env = host
    proxy = deploy_path / "proxy"
    assert not (proxy / "switching").exists() and not (proxy / "upstream.conf.old").exists()
    live = subprocess.run(["bash", str(deploy_path / "deploy/host/bluegreen.sh"), "active"], env=env, cwd=deploy_path,
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    assert live in ("blue", "green")
    colour_port = env[f"{live.upper()}_PORT"]
    assert (proxy / "upstream.conf").read_text() == f"server 127.0.0.1:{colour_port};\n"
    assert ready(env["PUBLIC_PORT"])["instance"] == ready(colour_port)["instance"]  # nginx serves the live colour
    current = json.loads((deploy_path / "current.json").read_text())
    assert current["colour"] == live, current
    return live


def check_live(host: tuple[Path, dict]) -> str:
    deploy_path, env = host
    return subprocess.run(["bash", str(deploy_path / "deploy/host/bluegreen.sh"), "active"], env=env, cwd=deploy_path,
                          capture_output=True, text=True).stdout.strip()  # fmt: skip


def other(colour: str) -> str:
    return "green" if colour == "blue" else "blue"


def container_running(host: tuple[Path, dict], colour: str) -> bool:
    try:
        ready(host[1][f"{colour.upper()}_PORT"])
    except OSError:
        return False
    return True


def test_a_switch_killed_at_every_step_is_undone_or_finished(host):
    deploy_path, _ = host
    for colour, models in (("blue", "a"), ("green", "b")):  # a live on blue, b a healthy candidate on green
        assert run(host, "candidate", f"img@sha256:{models}", f"models/{models}")[0] == 0
        if colour == "blue":
            assert run(host, "switch", "blue")[0] == 0
    _, steps = run(host, "switch", "green")  # a whole switch, to count its steps
    assert check_agree(host) == "green"
    undone = finished = 0
    for kill_at in range(1, steps + 1):
        target = other(check_live(host))
        how = signal.SIGHUP if kill_at % 3 == 0 else signal.SIGKILL  # a dropped SSH session, or nothing runs again
        run(host, "switch", target, kill_at=kill_at, how=how)
        after = check_live(host)  # the committed colour: `active` reads the records, settles nothing
        undone, finished = undone + (after != target), finished + (after == target)
        if kill_at % 5 == 0:  # what CD's cleanup asks first: `settle` alone leaves everything agreeing
            assert run(host, "settle")[0] == 0 and check_agree(host) == after
        # the next call settles what the kill left first, then switches to the other colour as asked
        assert run(host, "switch", other(after))[0] == 0, f"the switch after a kill at step {kill_at} failed"
        assert check_agree(host) == other(after)
    print(f"switch killed at each of its {steps} steps: {undone} undone, {finished} finished")
    assert undone and finished
    records = [json.loads(line) for line in (deploy_path / "deployments.jsonl").read_text().splitlines()]
    interrupted = [r for r in records if "did not finish" in r["reason"]]
    assert interrupted and all(r["outcome"] == "failed" for r in interrupted)  # an interrupted switch is recorded


def test_settle_finishes_undoes_or_clears_each_state_a_killed_switch_can_leave(host):
    """The three states a kill between two steps leaves, made on purpose (the kill test above meets them by timing):
    copies made before the intent, an intent not recorded, an intent recorded."""
    deploy_path, env = host
    proxy = deploy_path / "proxy"
    assert run(host, "candidate", "img@sha256:a", "models/a")[0] == 0
    assert run(host, "switch", "blue")[0] == 0
    assert run(host, "candidate", "img@sha256:b", "models/b")[0] == 0  # green, idle
    blue, green = (f"server 127.0.0.1:{env[f'{c}_PORT']};\n" for c in ("BLUE", "GREEN"))
    # killed after copying the old upstream, before writing its intent
    (proxy / "upstream.conf.old").write_text(blue)
    (proxy / "switching.new").write_text("green token-0 1\n")
    assert run(host, "settle")[0] == 0 and check_agree(host) == "blue"
    assert not (proxy / "switching.new").exists()
    # killed after the upstream was rewritten (nginx may or may not have reloaded), before the record
    (proxy / "upstream.conf.old").write_text(blue)
    (proxy / "switching").write_text("green token-1 1\n")
    (proxy / "upstream.conf").write_text(green)
    assert run(host, "settle")[0] == 0 and check_agree(host) == "blue"
    last = json.loads((deploy_path / "deployments.jsonl").read_text().splitlines()[-1])
    assert last["outcome"] == "failed" and "did not finish" in last["reason"] and last["colour"] == "green"
    # killed after the record (the commit), before the leftovers went: finished, not undone
    assert run(host, "switch", "green")[0] == 0
    (proxy / "upstream.conf.old").write_text(blue)
    (proxy / "switching").write_text(json.loads((deploy_path / "current.json").read_text())["switch"] + "\n")
    assert run(host, "settle")[0] == 0 and check_agree(host) == "green"


@pytest.mark.parametrize("command", ["candidate", "retire", "rollback"])
def test_candidate_retire_and_rollback_killed_then_the_next_call_runs(host, command):
    assert run(host, "candidate", "img@sha256:a", "models/a")[0] == 0
    assert run(host, "switch", "blue")[0] == 0
    assert run(host, "candidate", "img@sha256:b", "models/b")[0] == 0
    assert run(host, "switch", "green")[0] == 0  # b live on green, a still on blue: the previous release
    args = {"candidate": ("candidate", "img@sha256:a", "models/a"), "retire": ("retire", "blue"),
            "rollback": ("rollback",)}[command]  # fmt: skip
    _, steps = run(host, *args, kill_at=10_000)  # a whole run (nothing to kill): its steps
    # every step from the command's own on: the steps before it are every command's, killed in the switch test
    for kill_at in range(PROLOGUE[command], steps + 1):
        live = check_agree(host)
        idle = "blue" if live == "green" else "green"
        if not container_running(host, idle):
            assert run(host, "candidate", "img@sha256:a", "models/a")[0] == 0
        args = {"candidate": ("candidate", "img@sha256:a", "models/a"), "retire": ("retire", idle),
                "rollback": ("rollback",)}[command]  # fmt: skip
        run(host, *args, kill_at=kill_at, how=signal.SIGHUP if kill_at % 2 else signal.SIGKILL)
        assert run(host, *args)[0] == 0, f"{command} again after a kill at trace line {kill_at}"
        check_agree(host)

"""deploy/host/bluegreen.sh killed at every step: SIGKILL (nothing of the script runs again) or SIGHUP (a dropped
SSH session: its traps run), at each step its trace shows (a command of the script's own) in `switch`, `candidate`,
`retire` and `rollback`, and at every step of `settle` undoing or finishing a switch. After each, once the next call
returns: the records (proxy/upstream.conf, current.json) and what the public port serves agree, nothing half-done
is left, and that next call ran correctly. The states a kill meets only by timing, and a reload nginx refuses, are
also made on purpose.

Docker is tests/fakedocker/docker here, whose containers are real processes answering real HTTP (a killed script
must be restarted in seconds, hundreds of times); `make deploy-test` runs the same script on real containers and
nginx."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from deploy.client import free_port
from tests.test_host_deploy import ROOT
from tests.test_host_deploy import deploy_path as deploy_path  # a fixture, used by `host`

FAKE = ROOT / "tests" / "fakedocker"
PROLOGUE: dict[str, int] = {}  # a command's first step of its own (its `case`), as traced
TRACE: list[str] = []  # the last run's steps


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
    TRACE.clear()
    for line in process.stderr:
        lines.append(line)
        if line.startswith("+ "):  # bash ignores PS4 from the environment as root: its default
            seen += 1
            TRACE.append(line)
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


def docker(host: tuple[Path, dict], *args: str) -> str:
    deploy_path, env = host
    return subprocess.run(["docker", *args], env=env, cwd=deploy_path, capture_output=True, text=True).stdout.strip()


def reload_nginx(host: tuple[Path, dict]) -> None:
    """nginx reads proxy/upstream.conf again, as a switch's reload does."""
    nginx = docker(host, "ps", "-aq", "--filter", "label=com.docker.compose.project=catsdogs-proxy",
                   "--filter", "label=com.docker.compose.service=proxy")  # fmt: skip
    docker(host, "exec", nginx, "nginx", "-s", "reload")


def live_on_blue_green_idle(host: tuple[Path, dict]) -> tuple[str, str]:
    """a live on blue, b a healthy candidate on green; their upstream lines."""
    assert run(host, "candidate", "img@sha256:a", "models/a")[0] == 0
    assert run(host, "switch", "blue")[0] == 0
    assert run(host, "candidate", "img@sha256:b", "models/b")[0] == 0
    return tuple(f"server 127.0.0.1:{host[1][f'{c}_PORT']};\n" for c in ("BLUE", "GREEN"))  # type: ignore[return-value]


def half_switched(host: tuple[Path, dict], token: str, intent: str) -> None:
    """A switch to green killed after nginx reloaded on it, before its record: the public port answers from green."""
    proxy = host[0] / "proxy"
    (proxy / "switching").write_text(f"{token}\n{intent}")
    (proxy / "upstream.conf").write_text(f"server 127.0.0.1:{host[1]['GREEN_PORT']};\n")
    reload_nginx(host)
    assert ready(host[1]["PUBLIC_PORT"])["instance"] == ready(host[1]["GREEN_PORT"])["instance"]


def failed_lines(deploy_path: Path, token: str) -> int:
    lines = [json.loads(line) for line in (deploy_path / "deployments.jsonl").read_text().splitlines()]
    return sum(line["switch"] == token and line["outcome"] == "failed" for line in lines)


def test_settle_finishes_undoes_or_clears_each_state_a_killed_switch_can_leave(host):
    """The states a kill between two steps leaves, made on purpose (the kill test above meets them by timing): copies
    made before the intent, an intent not recorded, one recorded, and the intents of an older bluegreen.sh (its
    copy of the old upstream present, or already moved back: the intent without it)."""
    deploy_path, _ = host
    proxy = deploy_path / "proxy"
    blue, _ = live_on_blue_green_idle(host)
    states = 0
    # killed while writing its intent aside (or an older script's copy of the old upstream)
    (proxy / "upstream.conf.old").write_text(blue)
    (proxy / "switching.new").write_text(f"green token-0 1\nhad-upstream\n{blue}")
    assert run(host, "settle")[0] == 0 and check_agree(host) == "blue"
    assert not (proxy / "switching.new").exists()
    states += 1
    # killed after the upstream was rewritten and nginx reloaded, before the record
    half_switched(host, "green token-1 1", f"had-upstream\n{blue}")
    assert run(host, "settle")[0] == 0 and check_agree(host) == "blue"
    last = json.loads((deploy_path / "deployments.jsonl").read_text().splitlines()[-1])
    assert last["outcome"] == "failed" and "did not finish" in last["reason"] and last["colour"] == "green"
    states += 1
    # an older script's intent (its token only) with its copy of the old upstream
    half_switched(host, "green token-2 1", "")
    (proxy / "upstream.conf.old").write_text(blue)
    assert run(host, "settle")[0] == 0 and check_agree(host) == "blue"
    states += 1
    # an older script's intent whose copy it had already moved back before its reload failed (or it was killed):
    # current.json names the live colour, nginx may still serve the other
    half_switched(host, "green token-3 1", "")
    (proxy / "upstream.conf").write_text(blue)
    assert run(host, "settle")[0] == 0 and check_agree(host) == "blue"
    assert failed_lines(deploy_path, "green token-3 1") == 1
    states += 1
    # the same state but the copy never existed: there the intent itself says there was an upstream
    half_switched(host, "green token-4 1", f"had-upstream\n{blue}")
    assert run(host, "settle")[0] == 0 and run(host, "settle")[0] == 0 and check_agree(host) == "blue"
    assert failed_lines(deploy_path, "green token-4 1") == 1  # settled twice, recorded once
    states += 1
    # killed after the record (the commit), before the intent went: finished, not undone
    assert run(host, "switch", "green")[0] == 0
    (proxy / "switching").write_text(
        f"{json.loads((deploy_path / 'current.json').read_text())['switch']}\nhad-upstream\n{blue}"
    )
    assert run(host, "settle")[0] == 0 and check_agree(host) == "green"
    states += 1
    # killed inside the record, after current.json (the commit), before its deployments.jsonl line
    history = deploy_path / "deployments.jsonl"
    committed = history.read_text().splitlines()
    history.write_text("".join(line + "\n" for line in committed[:-1]))
    (proxy / "switching").write_text(f"{json.loads(committed[-1])['switch']}\nhad-upstream\n{blue}")
    assert run(host, "settle")[0] == 0 and check_agree(host) == "green"
    assert history.read_text().splitlines() == committed
    states += 1
    print(f"settle: {states} states made on purpose")


def test_a_reload_nginx_refuses_is_undone_again_by_every_next_call(host):
    """nginx refusing the reload back: the intent stays, no call but a settling one runs, and once nginx reloads the
    records and what the public port serves agree; a switch whose own reload is refused is undone the same way."""
    deploy_path, env = host
    proxy, fault = deploy_path / "proxy", Path(env["FAKE_DOCKER_STATE"]) / "reload-fails"
    blue, _ = live_on_blue_green_idle(host)
    half_switched(host, "green token-1 1", f"had-upstream\n{blue}")
    fault.touch()
    for args in (("settle",), ("settle",), ("candidate", "img@sha256:a", "models/a"), ("switch", "green")):
        assert run(host, *args)[0] == 1, args  # each settles first, and stops there
        assert (proxy / "switching").exists() and check_live(host) == "blue"
        assert (proxy / "upstream.conf").read_text() == blue
        assert ready(env["PUBLIC_PORT"])["instance"] == ready(env["GREEN_PORT"])["instance"]  # nginx: not yet
        assert container_running(host, "blue") and container_running(host, "green")  # nothing recreated
    fault.unlink()
    assert run(host, "settle")[0] == 0 and check_agree(host) == "blue"
    assert failed_lines(deploy_path, "green token-1 1") == 1
    # the same with an older script's intent and its copy: a refused reload must not lose what the copy said
    half_switched(host, "green token-2 1", "")
    (proxy / "upstream.conf.old").write_text(blue)
    fault.touch()
    assert run(host, "settle")[0] == 1 and check_live(host) == "blue"
    fault.unlink()
    assert run(host, "settle")[0] == 0 and check_agree(host) == "blue"
    fault.touch()  # a switch whose own reload nginx refuses: undone (the upstream back), nginx never moved
    assert run(host, "switch", "green")[0] == 1
    assert check_live(host) == "blue" and (proxy / "switching").exists()
    fault.unlink()
    assert run(host, "switch", "green")[0] == 0 and check_agree(host) == "green"


def settling() -> int:
    """The step the last run began settling at (those before it, the lock, are every command's: the switch test's)."""
    return next(step for step, line in enumerate(TRACE, 1) if line.startswith("+ settle "))


def test_settle_killed_at_every_step_then_settled(host):
    """`settle` itself killed at each of its steps (undoing an uncommitted switch and recording it once; the lock
    before them is every command's, killed in the switch test), and settled again; then finishing a committed one."""
    deploy_path, _ = host
    blue, _ = live_on_blue_green_idle(host)
    half_switched(host, "green token-0 1", f"had-upstream\n{blue}")
    _, steps = run(host, "settle")  # a whole undo, to count its steps
    assert check_agree(host) == "blue"
    first = settling()
    for kill_at in range(first, steps + 1):
        token = f"green token-{kill_at} 1"
        half_switched(host, token, f"had-upstream\n{blue}")
        run(host, "settle", kill_at=kill_at, how=signal.SIGHUP if kill_at % 2 else signal.SIGKILL)
        assert run(host, "settle")[0] == 0, f"settle after a kill at step {kill_at} of settle failed"
        assert check_agree(host) == "blue"
        assert failed_lines(deploy_path, token) == 1, f"killed at step {kill_at}: recorded once"
    assert run(host, "switch", "green")[0] == 0
    committed = json.loads((deploy_path / "current.json").read_text())["switch"]
    (deploy_path / "proxy" / "switching").write_text(f"{committed}\nhad-upstream\n{blue}")
    _, finish = run(host, "settle")
    finish_from = settling()
    for kill_at in range(finish_from, finish + 1):
        (deploy_path / "proxy" / "switching").write_text(f"{committed}\nhad-upstream\n{blue}")
        run(host, "settle", kill_at=kill_at)
        assert run(host, "settle")[0] == 0 and check_agree(host) == "green"
    print(
        f"settle killed at each of its {steps - first + 1} steps undoing a switch and"
        f" {finish - finish_from + 1} finishing one"
    )


def test_a_public_port_that_hangs_fails_the_switch_within_its_bound_and_says_how_long(host):
    deploy_path, env = host
    live_on_blue_green_idle(host)
    hang = Path(env["FAKE_DOCKER_STATE"]) / "proxy-hangs"
    hang.touch()
    script = deploy_path / "deploy" / "host" / "bluegreen.sh"
    began = time.monotonic()
    process = subprocess.Popen(["bash", str(script), "switch", "green"], env={**env, "SWITCH_TIMEOUT": "4"},
                               cwd=deploy_path, text=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               start_new_session=True)  # fmt: skip
    try:
        _, stderr = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        pytest.fail("the switch still waited for the public port after 60 s")
    finally:
        hang.unlink()
    took = time.monotonic() - began
    assert process.returncode == 1, stderr
    waited = re.search(r"does not answer from green \(instance \w+\) after (\d+) s", stderr)
    assert waited, stderr
    assert 4 <= int(waited.group(1)) <= took + 1 and int(waited.group(1)) <= 4 + 3, (waited.group(0), took)
    assert check_agree(host) == "blue"


def test_a_colour_believes_x_forwarded_for_from_its_gateway_only(host, tmp_path):
    """The address that reaches a colour through its published port (its network's gateway: the proxy) is the only
    one whose X-Forwarded-For picks a rate-limit bucket; an operator's FORWARDED_ALLOW_IPS replaces it."""
    deploy_path, env = host
    log, bin_dir = tmp_path / "trusted.log", tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "docker").write_text(f"""#!/bin/sh
case " $* " in *" compose "*" up "*) echo "$*|${{FORWARDED_ALLOW_IPS-}}" >> {log};; esac
exec {FAKE / "docker"} "$@"
""")
    (bin_dir / "docker").chmod(0o755)
    wrapped = (deploy_path, {**env, "PATH": f"{bin_dir}:{env['PATH']}"})
    assert run(wrapped, "candidate", "img@sha256:a", "models/a")[0] == 0
    started = [line.split("|")[1] for line in log.read_text().splitlines() if " -d " in line]
    gateway = docker(host, "network", "inspect", "-f", "{{range .IPAM.Config}}{{.Gateway}} {{end}}",
                     "catsdogs-blue_default")  # fmt: skip
    assert started and all(trusted == gateway and re.fullmatch(r"[\d.]+", trusted) for trusted in started), started
    log.unlink()
    operator = (deploy_path, {**wrapped[1], "FORWARDED_ALLOW_IPS": "192.0.2.7"})
    assert run(operator, "candidate", "img@sha256:b", "models/b")[0] == 0
    assert [line.split("|")[1] for line in log.read_text().splitlines() if " -d " in line] == ["192.0.2.7"]


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
    print(f"{command} killed at each of its {steps - PROLOGUE[command] + 1} steps")

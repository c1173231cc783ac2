"""`make deploy-test`: a real blue/green deploy on this host, under load, through deploy/host/bluegreen.sh as CD runs
it.

A temporary DEPLOY_PATH laid out as CD uploads it (docker-compose.yml, deploy/host/, models/<sha256>/) holds two
releases of the serve image (two model files) and a broken one. While a load generator sends photos through the
nginx proxy at a steady rate, four scenarios run, each through the script's own commands:

  first     candidate A, switch (starts the proxy)                       no load yet: nothing served before
  deploy    candidate B beside A, switch, retire A                       zero failed requests; the model changes
  failing   candidate with a model file that does not load               refused with one line; B keeps serving
  rollback  bluegreen.sh rollback (A back the same way)                  zero failed requests; the model changes back

and the records the script writes (current.json, deployments.jsonl) are checked. Every container, network and volume
the run created is removed, also when it fails. The last line states, per scenario, the requests sent, the failures,
and the served model's sha256 before and after.

With `--engine podman` (a machine without Docker, like this project's CI host) three test stand-ins take the Docker
engine's place, and nothing in bluegreen.sh changes: podman's Docker-compatible API for the `docker` CLI
(`podman system service`), a `docker compose` CLI plugin bridged to podman-compose (deploy/host/standin/), and the
engine's health-check schedule (podman runs HEALTHCHECKs through systemd timers, which a container host without
systemd lacks: this runs `podman healthcheck run` at the compose file's interval instead). The proxy's image is the
nginx stand-in of deploy/host/standin/nginx (`make nginx-standin`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import httpx2 as httpx
import yaml

from deploy.client import free_port, wait_ready
from server.model_file import sha256_file

ROOT = Path(__file__).resolve().parents[1]
STANDIN = ROOT / "deploy" / "host" / "standin"
PROJECT = "catsdogs-rehearsal"
COLOURS = ("blue", "green")


@dataclass
class Answer:
    sent: float  # wall clock (time.time()), comparable with the script's log
    done: float
    status: int | str  # the HTTP status, or the exception's name for a request that got no answer
    label: str | None = None
    version: str | None = None


@dataclass
class Traffic:
    """Photos POSTed through the proxy at a steady rate by a few keep-alive connections (httpx clients)."""

    url: str
    photos: list[bytes]
    rate: float = 20.0
    connections: int = 4
    answers: list[Answer] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._next = 0
        self._threads = [threading.Thread(target=self._send, daemon=True) for _ in range(self.connections)]

    def start(self) -> Traffic:
        self._start = time.monotonic()
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)

    def since(self, index: int) -> list[Answer]:
        with self._lock:
            return self.answers[index:]

    def mark(self) -> int:
        with self._lock:
            return len(self.answers)

    def _send(self) -> None:
        with httpx.Client(timeout=30) as client:
            while not self._stop.is_set():
                with self._lock:
                    slot, self._next = self._next, self._next + 1
                delay = self._start + slot / self.rate - time.monotonic()
                if delay > 0 and self._stop.wait(delay):
                    return
                photo = self.photos[slot % len(self.photos)]
                sent = time.time()
                try:
                    response = client.post(f"{self.url}/predict", content=photo, headers={"Content-Type": "image/jpeg"})
                    body = response.json() if response.headers.get("content-type") == "application/json" else {}
                    answer = Answer(
                        sent, time.time(), response.status_code, body.get("label"), body.get("model_version")
                    )
                except httpx.HTTPError as error:
                    answer = Answer(sent, time.time(), type(error).__name__)
                with self._lock:
                    self.answers.append(answer)


class HealthSchedule:
    """The Docker engine's health-check schedule, for podman without systemd: each container of the projects gets
    `podman healthcheck run` every `interval` seconds from its start, as Docker probes it."""

    def __init__(self, projects: list[str], interval: float) -> None:
        self.projects, self.interval = projects, interval
        self._stop = threading.Event()
        self._due: dict[str, float] = {}
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> HealthSchedule:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            now = time.monotonic()
            for project in self.projects:
                label = f"label=com.docker.compose.project={project}"
                listed = subprocess.run(["podman", "ps", "-q", "--filter", label], capture_output=True, text=True)
                for container in listed.stdout.split():
                    due = self._due.setdefault(container, now + self.interval)
                    if now >= due:
                        subprocess.run(["podman", "healthcheck", "run", container], capture_output=True)
                        self._due[container] = now + self.interval


@contextlib.contextmanager
def engine(kind: str, compose: str, workdir: Path) -> Iterator[dict[str, str]]:
    """The environment in which bluegreen.sh's `docker` and `docker compose` reach a real engine."""
    env = dict(os.environ)
    if kind == "docker":
        yield env
        return
    socket = workdir / "podman.sock"
    service = subprocess.Popen(["podman", "system", "service", "--time=0", f"unix://{socket}"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    plugins = workdir / "docker-config" / "cli-plugins"
    plugins.mkdir(parents=True)
    shutil.copy2(STANDIN / "docker-compose", plugins / "docker-compose")
    command = shlex.split(compose)
    env.update(DOCKER_HOST=f"unix://{socket}", DOCKER_CONFIG=str(plugins.parent),
               PODMAN_COMPOSE=str(Path(shutil.which(command[0]) or command[0]).resolve()))  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while subprocess.run(["docker", "info"], env=env, capture_output=True).returncode != 0:
            if time.monotonic() > deadline:
                raise SystemExit("podman's Docker API did not answer in 30 s")
            time.sleep(0.5)
        interval = compose_interval(ROOT / "docker-compose.yml")
        with HealthSchedule([f"{PROJECT}-{colour}" for colour in COLOURS], interval):
            yield env
    finally:
        service.terminate()
        service.wait(timeout=30)


def compose_interval(path: Path) -> float:
    """The serve service's health-check interval from the compose file ("10s")."""
    text = yaml.safe_load(path.read_text())["services"]["serve"]["healthcheck"]["interval"]
    return float(text.rstrip("s"))


def log_time(stderr: str, pattern: str) -> float | None:
    """The wall time of the script's first log line matching pattern (its lines start with an ISO UTC timestamp)."""
    for line in stderr.splitlines():
        if re.search(pattern, line) and re.match(r"\d{4}-\d\d-\d\dT", line):
            return datetime.fromisoformat(line.split(" ", 1)[0].replace("Z", "+00:00")).timestamp()
    return None


@dataclass
class Scenario:
    name: str
    sent: int = 0
    failures: list[str] = field(default_factory=list)
    sha_before: str = ""
    sha_after: str = ""
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0
    answered_by: Counter[str] = field(default_factory=Counter)  # 200s by the model version that answered

    def line(self) -> str:
        by = ", ".join(f"{count} by {version}" for version, count in self.answered_by.items())
        return (f"{self.name}: {self.sent} sent, {len(self.failures)} failed{f' ({by})' if by else ''}, "
                f"model sha256 {self.sha_before[:12] or '-'} -> {self.sha_after[:12] or '-'}")  # fmt: skip


class Rehearsal:
    def __init__(self, env: dict[str, str], deploy_path: Path, ports: dict[str, int]) -> None:
        self.env = {**env, "PROJECT": PROJECT, "FEEDBACK_VOLUME": f"{PROJECT}-feedback",
                    "PUBLIC_PORT": str(ports["public"]), "BLUE_PORT": str(ports["blue"]),
                    "GREEN_PORT": str(ports["green"])}  # fmt: skip
        self.deploy_path = deploy_path
        self.url = f"http://127.0.0.1:{ports['public']}"
        self.log: list[str] = []

    def script(
        self, *args: str, env: dict[str, str] | None = None, quiet: bool = False
    ) -> subprocess.CompletedProcess[str]:
        """bluegreen.sh as CD runs it: `bash DEPLOY_PATH/deploy/host/bluegreen.sh ARGS`; its log echoed here."""
        command = ["bash", str(self.deploy_path / "deploy" / "host" / "bluegreen.sh"), *args]
        if not quiet:
            print("+", shlex.join(command[1:]), flush=True)
        done = subprocess.run(command, env={**self.env, **(env or {})}, capture_output=True, text=True)
        for line in done.stderr.splitlines():
            if re.match(r"\d{4}-\d\d-\d\dT|---|\{\"ts\"", line):  # its log and the service's, not the engine's chatter
                print("  ", line, flush=True)
        self.log.append(done.stderr)
        return done

    def containers(self, colour: str) -> list[str]:
        """The containers (running or not) of a colour's compose project."""
        label = f"label=com.docker.compose.project={PROJECT}-{colour}"
        listed = subprocess.run(
            ["docker", "ps", "-aq", "--filter", label], env=self.env, capture_output=True, text=True
        )
        return listed.stdout.split()

    def served(self) -> tuple[str, str]:
        """The model file's sha256 and the model version the proxy's /ready reports."""
        ready = wait_ready(self.url, 30)
        return ready["model_sha256"], ready["model_version"]


def check_switch(scenario: Scenario, answers: list[Answer], switch: tuple[float | None, float | None],
                 retired_at: float | None, old: str, new: str) -> None:  # fmt: skip
    """The served model changes at the switch (between the reload and the script's check that the public port serves
    the new model), and the old colour stops only after its last answer."""
    began, switched_at = switch
    if began is None or switched_at is None:
        scenario.problems.append("no switch lines in the script's log")
        return
    late_old = [a for a in answers if a.version == old and a.sent > switched_at + 1]
    early_new = [a for a in answers if a.version == new and a.done < began - 0.5]
    if late_old:
        scenario.problems.append(f"{len(late_old)} requests sent over 1 s after the switch were answered by {old}")
    if early_new:
        scenario.problems.append(f"{len(early_new)} requests answered by {new} before the switch")
    if not any(a.version == new for a in answers):
        scenario.problems.append(f"no request was answered by {new}")
    if retired_at is not None:
        last_old = max((a.done for a in answers if a.version == old), default=0.0)
        if last_old > retired_at:
            scenario.problems.append(f"{old} answered {last_old - retired_at:.2f} s after its retirement began")


def run(args: argparse.Namespace) -> list[Scenario]:
    photos = [path.read_bytes() for path in args.photos]
    with tempfile.TemporaryDirectory(prefix="deploy-test-") as tmp:
        workdir = Path(tmp)
        deploy_path = workdir / "deploy-path"  # what CD uploads to DEPLOY_PATH
        (deploy_path / "deploy" / "host").mkdir(parents=True)
        shutil.copy2(ROOT / "docker-compose.yml", deploy_path)
        for name in ("bluegreen.sh", "releases.py", "proxy.yml", "nginx.conf.template"):
            shutil.copy2(ROOT / "deploy" / "host" / name, deploy_path / "deploy" / "host")
        releases = []
        for source in (args.release_a, args.release_b):
            digest = sha256_file(source / "model.onnx")
            target = deploy_path / "models" / digest
            target.mkdir(parents=True)
            shutil.copy2(source / "model.onnx", target / "model.onnx")
            # what CD uploads beside the model (deploy.model_release's record; here without a registry)
            release = {"sha256": digest, "source": str(source), "registered": None}
            (target / "release.json").write_text(json.dumps(release, indent=2) + "\n")
            releases.append((f"models/{digest}", digest))
        broken = deploy_path / "models" / "broken"  # a model file that does not load
        broken.mkdir()
        (broken / "model.onnx").write_bytes((args.release_a / "model.onnx").read_bytes()[:65536])
        shutil.copytree(deploy_path / releases[0][0], deploy_path / "models" / "rejected")  # A again, another folder
        ports = {"public": free_port(), "blue": free_port(), "green": free_port()}
        with engine(args.engine, args.compose, workdir) as env:
            if args.proxy_image:
                env["PROXY_IMAGE"] = args.proxy_image
            rehearsal = Rehearsal(env, deploy_path, ports)
            try:
                return scenarios(rehearsal, args.image, releases, photos, args.rate)
            finally:
                cleanup(rehearsal)


def scenarios(r: Rehearsal, image: str, releases: list[tuple[str, str]], photos: list[bytes],
              rate: float) -> list[Scenario]:  # fmt: skip
    digests = subprocess.run(["docker", "image", "inspect", "-f", "{{join .RepoDigests \" \"}}", image],
                             env=r.env, capture_output=True, text=True, check=True).stdout.split()  # fmt: skip
    reference = digests[0] if digests else image  # IMAGE@DIGEST as CD passes it (a local build may have none)
    (models_a, sha_a), (_, sha_b) = releases
    results: list[Scenario] = []

    first = Scenario("first release")
    started = time.monotonic()
    candidate = r.script("candidate", reference, models_a)
    colour = candidate.stdout.split()[0] if candidate.returncode == 0 else ""
    switch = r.script("switch", colour) if colour else candidate
    if switch.returncode != 0:
        first.problems.append(f"the first release did not deploy:\n{(candidate.stderr + switch.stderr)[-3000:]}")
        return [first]
    first.sha_after, first.seconds = r.served()[0], time.monotonic() - started
    if first.sha_after != sha_a:
        first.problems.append(f"served {first.sha_after}, released {sha_a}")
    results.append(first)

    traffic = Traffic(r.url, photos, rate=rate).start()
    try:
        time.sleep(2)
        plan = (("deploy", sha_b), ("failing candidate", sha_b), ("switch back", sha_b), ("rollback", sha_a))
        for name, expect in plan:
            scenario = Scenario(name)
            scenario.sha_before, version_before = r.served()
            mark, started = traffic.mark(), time.monotonic()
            stderr = ACTIONS[name](r, scenario, reference, releases, photos)
            time.sleep(2)  # answers to the requests sent up to the end of the scenario
            answers = traffic.since(mark)
            scenario.seconds = time.monotonic() - started
            scenario.sha_after, version_after = r.served()
            scenario.sent = len(answers)
            scenario.failures += [f"{a.status} {a.label}" for a in answers if a.status != 200 or not a.label]
            scenario.answered_by = Counter(a.version for a in answers if a.status == 200 and a.version)
            print(f"   {scenario.line()} in {scenario.seconds:.0f} s", flush=True)
            if scenario.sha_after != expect:
                scenario.problems.append(f"serves {scenario.sha_after[:12]} after it, expected {expect[:12]}")
            if name in ("deploy", "rollback"):
                switched = log_time(stderr, r"switch: the proxy goes to"), log_time(stderr, r"switch: traffic")
                retired = log_time(stderr, r"retire \w+: the proxy's old workers are done")
                check_switch(scenario, answers, switched, retired, version_before, version_after)
            live = r.script("active", quiet=True).stdout.strip()
            for colour in COLOURS:  # only the live colour may be left running
                if colour != live and r.containers(colour):
                    scenario.problems.append(f"{colour} is not live and still has containers: {r.containers(colour)}")
            results.append(scenario)
    finally:
        traffic.stop()
    results.append(check_records(r.deploy_path, reference, releases))
    return results


def deploy(r: Rehearsal, scenario: Scenario, image: str, releases: list[tuple[str, str]], photos: list[bytes]) -> str:
    """The second release under load, with a slow upload in flight across the switch (the drain is tested)."""
    live = r.script("active", quiet=True).stdout.strip()
    candidate = r.script("candidate", image, releases[1][0])
    if candidate.returncode != 0:
        scenario.problems.append(f"the candidate failed:\n{candidate.stderr[-3000:]}")
        return candidate.stderr
    before = httpx.post(f"{r.url}/predict", content=photos[0], headers={"Content-Type": "image/jpeg"}, timeout=30)
    slow = SlowUpload(r.url, photos[0], seconds=4).start()
    time.sleep(1)  # its first bytes are in, on one of nginx's workers, before the reload
    switch = r.script("switch", candidate.stdout.split()[0])
    retire = r.script("retire", live) if switch.returncode == 0 else switch
    slow.join()
    stderr = candidate.stderr + switch.stderr + retire.stderr
    if retire.returncode != 0:
        scenario.problems.append(f"the deploy failed:\n{stderr[-3000:]}")
    # feedback for a prediction the old colour made reaches the new one's store (one store for both colours)
    label = before.json().get("label")
    after = httpx.post(f"{r.url}/feedback", json={"prediction_id": before.json().get("prediction_id"), "label": label},
                       timeout=30)  # fmt: skip
    if after.status_code != 200:
        scenario.problems.append(f"feedback after the switch for a prediction before it: {after.status_code}")
    began, retired = log_time(stderr, r"switch: the proxy goes to"), log_time(stderr, r"retire \w+: the proxy's old")
    if slow.answer.status != 200 or slow.answer.sent > (began or 0):
        scenario.failures.append(f"the slow upload across the switch: {slow.answer.status}")
    elif retired is None or slow.answer.done > retired:
        scenario.problems.append("the old colour's retirement began before the slow upload it held was answered")
    else:
        print(f"   a slow upload sent before the switch was answered {slow.answer.status} by {slow.answer.version} "
              f"{slow.answer.done - slow.answer.sent:.1f} s later")  # fmt: skip
    return stderr


def failing(r: Rehearsal, scenario: Scenario, image: str, releases: list[tuple[str, str]], photos: list[bytes]) -> str:
    """A candidate whose model file does not load: refused with one line and its logs; the live colour untouched."""
    refused = r.script("candidate", image, "models/broken")
    last = refused.stderr.strip().splitlines()[-1] if refused.stderr.strip() else ""
    if refused.returncode == 0:
        scenario.problems.append("a candidate whose model does not load was accepted")
    elif "FAILED" not in last or "--- the last log lines" not in refused.stderr or "cannot load" not in refused.stderr:
        scenario.problems.append(f"the refusal does not end with one clear line and the logs: {last!r}")
    else:
        print(f"   refused as it should be: {last}")
    return refused.stderr


def switch_back(r: Rehearsal, scenario: Scenario, image: str, releases: list[tuple[str, str]],
                photos: list[bytes]) -> str:  # fmt: skip
    """CD's failure path after a switch: a candidate (release A again, from another folder) passes its health check,
    takes traffic, then fails CD's public smoke test: switch back (reverted), reject it (failed)."""
    live = r.script("active", quiet=True).stdout.strip()
    candidate = r.script("candidate", image, "models/rejected")
    colour = candidate.stdout.split()[0] if candidate.returncode == 0 else ""
    steps = [candidate]
    if colour:
        steps.append(r.script("switch", colour, env={"COMMIT": "rehearsal-rejected"}))
        steps.append(r.script("switch", live, env={"OUTCOME": "reverted"}))
        steps.append(r.script("reject", colour, "the public smoke test failed (rehearsal)"))
    stderr = "".join(step.stderr for step in steps)
    if any(step.returncode != 0 for step in steps):
        scenario.problems.append(f"the switch back failed:\n{stderr[-3000:]}")
    return stderr


def rollback(r: Rehearsal, scenario: Scenario, image: str, releases: list[tuple[str, str]],
             photos: list[bytes]) -> str:  # fmt: skip
    """`bluegreen.sh rollback`: the release before the live one (the first; a reverted deploy does not count)."""
    back = r.script("rollback")
    if back.returncode != 0:
        scenario.problems.append(f"the rollback failed:\n{back.stderr[-3000:]}")
    return back.stderr


ACTIONS = {"deploy": deploy, "failing candidate": failing, "switch back": switch_back, "rollback": rollback}


class SlowUpload(threading.Thread):
    """One photo POSTed in four parts a second apart (chunked), on its own connection."""

    def __init__(self, url: str, photo: bytes, seconds: float) -> None:
        super().__init__(daemon=True)
        self.url, self.photo, self.seconds = url, photo, seconds
        self.answer = Answer(0, 0, "not sent")

    def start(self) -> SlowUpload:  # type: ignore[override]
        super().start()
        return self

    def parts(self) -> Iterator[bytes]:
        size = len(self.photo) // 4 + 1
        for start in range(0, len(self.photo), size):
            yield self.photo[start : start + size]
            time.sleep(self.seconds / 4)

    def run(self) -> None:
        sent = time.time()
        try:
            response = httpx.post(f"{self.url}/predict", content=self.parts(), timeout=60,
                                  headers={"Content-Type": "image/jpeg"})  # fmt: skip
            body = response.json()
            self.answer = Answer(sent, time.time(), response.status_code, body.get("label"), body.get("model_version"))
        except (httpx.HTTPError, ValueError) as error:
            self.answer = Answer(sent, time.time(), type(error).__name__)


def check_records(deploy_path: Path, image: str, releases: list[tuple[str, str]]) -> Scenario:
    """current.json and deployments.jsonl hold every run: time, outcome, image digest, model sha256; the rollback
    brought back the first release's folder, not the rejected one's."""
    (models_a, sha_a), (_, sha_b) = releases
    records = Scenario("records")
    try:
        lines = [json.loads(line) for line in (deploy_path / "deployments.jsonl").read_text().splitlines()]
        current = json.loads((deploy_path / "current.json").read_text())
    except (OSError, json.JSONDecodeError) as error:
        records.problems.append(f"unreadable: {error}")
        return records
    outcomes = [(line["outcome"], line["model_sha256"]) for line in lines]
    broken = next((sha for outcome, sha in outcomes if outcome == "failed"), "")
    expected = [("deployed", sha_a), ("deployed", sha_b), ("failed", broken), ("deployed", sha_a),
                ("reverted", sha_b), ("failed", sha_a), ("rolled-back", sha_a)]  # fmt: skip
    if outcomes != expected or not broken:
        records.problems.append(f"deployments.jsonl holds {outcomes}, expected {expected}")
    elif not lines[-1]["models"].endswith(models_a) or lines[3]["commit"] != "rehearsal-rejected":
        records.problems.append(f"the rollback brought back {lines[-1]['models']}, not the first release {models_a}")
    for line in lines:
        release_sha = (line.get("release") or {}).get(
            "sha256", line["model_sha256"] if line["outcome"] == "failed" else ""
        )
        if line["image"] != image or not line["at"].endswith("Z") or release_sha != line["model_sha256"]:
            records.problems.append(f"incomplete record: {line}")
        if not line["image_id"] and line["outcome"] != "failed":
            records.problems.append(f"no image id: {line}")
    if current != lines[-1]:
        records.problems.append(f"current.json {current} is not the last deployment {lines[-1]}")
    records.sha_after = current.get("model_sha256", "")
    print(f"   deployments.jsonl: {[outcome for outcome, _ in outcomes]}; current.json: {current['outcome']}, "
          f"{current['colour']}, {current['image']}")  # fmt: skip
    return records


def cleanup(r: Rehearsal) -> None:
    """Remove every container, network and volume of the rehearsal's compose projects, and say if any is left."""
    compose_files = {**{colour: "docker-compose.yml" for colour in COLOURS}, "proxy": "deploy/host/proxy.yml"}
    for suffix, path in compose_files.items():
        subprocess.run(["docker", "compose", "-p", f"{PROJECT}-{suffix}", "-f", path, "down", "-v", "--timeout", "5"],
                       cwd=r.deploy_path, env={**r.env, "PORT": "127.0.0.1:0"}, capture_output=True)  # fmt: skip
    left = []
    for colour in (*COLOURS, "proxy"):
        project = f"{PROJECT}-{colour}"
        left += subprocess.run(["docker", "ps", "-aq", "--filter", f"label=com.docker.compose.project={project}"],
                               env=r.env, capture_output=True, text=True).stdout.split()  # fmt: skip
    for kind in ("network", "volume"):
        names = subprocess.run(["docker", kind, "ls", "--format", "{{.Name}}"], env=r.env, capture_output=True,
                               text=True).stdout.split()  # fmt: skip
        left += [f"{kind} {name}" for name in names if name.startswith(PROJECT)]
    print(f"cleanup: {', '.join(left) + ' LEFT' if left else 'no container, network or volume left'}", flush=True)
    if left:
        raise SystemExit(f"deploy-test left {left}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", choices=["docker", "podman"], default="docker")
    parser.add_argument("--compose", default="podman-compose", help="with --engine podman: the podman-compose command")
    parser.add_argument("--image", required=True, help="the serve image (built by make image)")
    parser.add_argument("--proxy-image", help="the proxy's nginx image (PROXY_IMAGE; default proxy.yml's)")
    parser.add_argument("--rate", type=float, default=20.0, help="photos per second sent through the proxy")
    parser.add_argument("--photos", type=Path, nargs="+", required=True, help="real photos the load sends")
    parser.add_argument("release_a", type=Path, help="a folder holding the first release's model.onnx")
    parser.add_argument("release_b", type=Path, help="a folder holding the second release's (a different file)")
    args = parser.parse_args(argv)
    if sha256_file(args.release_a / "model.onnx") == sha256_file(args.release_b / "model.onnx"):
        parser.error("the two releases hold the same model file: the switch would not be visible")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a CI timeout still cleans up (run's finally)
    started = time.monotonic()
    results = run(args)
    problems = [f"{s.name}: {p}" for s in results for p in s.problems]
    problems += [f"{s.name}: {len(s.failures)} failed requests ({Counter(s.failures)})" for s in results if s.failures]
    for problem in problems:
        print(f"FAIL {problem}", file=sys.stderr)
    summary = "; ".join(s.line() for s in results if s.name not in ("records",))
    print(f"deploy-test {'FAILED' if problems else 'passed'} in {time.monotonic() - started:.0f} s: {summary}")
    if problems:
        sys.exit(1)


if __name__ == "__main__":
    main()

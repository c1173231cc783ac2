"""`make bench-quickstart`: README's quick start, step by step, timed on a fresh clone of this repository.

Clones the committed HEAD into a new folder beside the repository (so `../shared` resolves the same way), then runs
each step exactly as README writes it and records its wall time, with the machine it ran on:

  1. make setup
  2. make train export RAW_DATA=... PRETRAINED=...
  3. make serve, until /ready answers 200
  4. curl -F file=@<a photo> localhost:PORT/predict  (the answer's latency_ms, and the request's wall time)
  5. stop the service (SIGTERM), its exit status and the time it took
  then `git status --short` in the clone: what the run left behind.

    make bench-quickstart RAW_DATA=../shared/datasets/cats-vs-dogs-2k PRETRAINED=../shared/weights/...pt

It writes reports/bench-quickstart.json. It takes as long as the quick start does (about 15 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from deploy.client import free_port

ROOT = Path(__file__).resolve().parents[1]


def machine() -> dict[str, Any]:
    """What the times were measured on."""
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    names = [line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")]
    model = names[0] if names else platform.processor()
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 0
    return {"cpu": model, "cpus": len(os.sched_getaffinity(0)), "memory_gib": round(memory / 2**30, 1),
            "system": platform.platform(), "python": platform.python_version()}  # fmt: skip


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (make, its shell, the service)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def timed(command: list[str], cwd: Path, log: Path) -> float:
    started = time.perf_counter()
    with log.open("a") as out:
        out.write(f"\n$ {' '.join(command)}\n")
        out.flush()
        subprocess.run(command, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, check=True)
    return round(time.perf_counter() - started, 1)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--raw-data", default=os.environ.get("RAW_DATA", ""))
    parser.add_argument("--pretrained", default=os.environ.get("PRETRAINED", ""))
    parser.add_argument("--photo", type=Path, help="the photo step 4 sends (default: RAW_DATA/cats/cat.1.jpg)")
    parser.add_argument("--clone", type=Path, default=ROOT.parent / "quickstart-clone")
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "bench-quickstart.json")
    args = parser.parse_args(argv)
    if args.clone.exists():
        shutil.rmtree(args.clone)
    subprocess.run(["git", "clone", "-q", str(ROOT), str(args.clone)], check=True)
    log = args.clone.parent / f"{args.clone.name}.log"
    log.write_text("")
    data = [f"RAW_DATA={args.raw_data}"] if args.raw_data else []
    weights = [f"PRETRAINED={args.pretrained}"] if args.pretrained else []
    steps: dict[str, Any] = {}
    steps["1. make setup"] = timed(["make", "setup"], args.clone, log)
    steps["2. make train export"] = timed(["make", "train", "export", *data, *weights], args.clone, log)
    port = free_port()
    started = time.perf_counter()
    with log.open("a") as out:
        serve = subprocess.Popen(["make", "serve", f"PORT={port}"], cwd=args.clone, stdout=out,
                                 stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    while True:
        try:
            with urllib.request.urlopen(f"{url}/ready", timeout=1) as ready:
                if ready.status == 200:
                    break
        except OSError:
            pass
        if serve.poll() is not None or time.perf_counter() - started > 300:
            raise SystemExit(f"make serve did not become ready; see {log}")
        time.sleep(0.05)
    steps["3. make serve, until /ready is 200"] = round(time.perf_counter() - started, 2)
    photo = args.photo or Path(args.raw_data or ".") / "cats" / "cat.1.jpg"
    answers = []
    for _ in range(2):  # the first request, and one after it
        sent = time.perf_counter()
        curl = subprocess.run(["curl", "-fsS", "-F", f"file=@{photo}", f"{url}/predict"], capture_output=True,
                              text=True, check=True)  # fmt: skip
        answers.append({"wall_ms": round((time.perf_counter() - sent) * 1000, 1), **json.loads(curl.stdout)})
    steps["4. curl -F file=@... /predict"] = {"first": answers[0], "second": answers[1]}
    services = [pid for pid in descendants(serve.pid) if b"-m\0server" in Path(f"/proc/{pid}/cmdline").read_bytes()]
    stopped = time.perf_counter()
    for pid in services:
        os.kill(pid, signal.SIGTERM)  # what README says: kill -TERM the service (or Ctrl-C)
    status = serve.wait(60)
    steps["5. stop (SIGTERM)"] = {"seconds": round(time.perf_counter() - stopped, 2), "make_exit_status": status}
    git_status = subprocess.run(["git", "status", "--short"], cwd=args.clone, capture_output=True, text=True).stdout
    report = {"machine": machine(), "commit": subprocess.run(["git", "rev-parse", "HEAD"], cwd=args.clone,
              capture_output=True, text=True).stdout.strip(), "steps_seconds": steps,
              "git_status_after": git_status.splitlines(), "log": str(log)}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    sys.exit(0 if main() else 1)

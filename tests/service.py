"""`python -m server` as a child process on a free port, with its JSON log lines collected."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx2 as httpx

from deploy.client import free_port
from tests.conftest import ROOT


class Service:
    def __init__(self, model: Path, **env: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        environment = {**os.environ, "MODEL_PATH": str(model), "PORT": str(self.port), "HOST": "127.0.0.1",
                       "LOG_FORMAT": "json", "ORT_THREADS": "1", "PYTHONUNBUFFERED": "1", **env}  # fmt: skip
        self.started = time.perf_counter()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "server"],
            cwd=ROOT,
            env=environment,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.process.stdout
        for line in self.process.stdout:
            self.lines.append(line.decode(errors="replace").rstrip())

    def wait_ready(self, timeout: float = 60) -> float:
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline:
            assert self.process.poll() is None, "\n".join(self.lines)
            try:
                if httpx.get(f"{self.url}/ready", timeout=1).status_code == 200:
                    return time.perf_counter() - self.started
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise TimeoutError("\n".join(self.lines))

    def records(self) -> list[dict]:
        return [json.loads(line) for line in self.lines if line.startswith("{")]

    def wait_for_records(self, predicate: Callable[[dict], bool], count: int = 1, timeout: float = 10) -> list[dict]:
        """The log records matching `predicate`, once there are at least `count` of them (the log is written after
        the response is sent, so a test that reads it at once races the service); AssertionError past `timeout`."""
        deadline = time.perf_counter() + timeout
        while len(found := [r for r in self.records() if predicate(r)]) < count:
            assert time.perf_counter() < deadline, f"{len(found)} of {count} log records after {timeout} s"
            time.sleep(0.02)
        return found

    def stop(self) -> None:
        """SIGTERM, then a clean exit: uvicorn finishes, logs our shutdown line, and re-raises the signal."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout=30)
        self.reader.join(timeout=5)
        assert code == 0, "\n".join(self.lines)  # a clean stop: shutdown logged, exit status 0
        assert any(r["message"] == "shutdown" for r in self.records()), "\n".join(self.lines)

"""A minimal HTTP client for the service, on the standard library (CI/CD runners need nothing installed)."""

from __future__ import annotations

import json
import mimetypes
import os
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

RATE_LIMIT_RETRIES = 30  # a 429 is waited out (its Retry-After, at most MAX_RETRY_AFTER_S) this many times
MAX_RETRY_AFTER_S = 10


def auth() -> dict[str, str]:
    """The Authorization header for the key in the API_KEY environment variable (make api-key), or none. Read from
    the environment, never from an argument, so the key shows in no process list and no shell history."""
    key = os.environ.get("API_KEY", "").strip()
    return {"Authorization": f"Bearer {key}"} if key else {}


def request(url: str, method: str = "GET", body: bytes | None = None, headers: dict[str, str] | None = None,
            timeout: float = 30, on_wait: Callable[[float], None] | None = None
            ) -> tuple[int, dict[str, Any]]:  # fmt: skip
    """(status, JSON body) for one request, with API_KEY's Authorization when set; HTTP errors are returned, not
    raised, after a 429 has been waited out (Retry-After) up to RATE_LIMIT_RETRIES times, each wait's seconds told
    to `on_wait` first."""
    for attempt in range(RATE_LIMIT_RETRIES + 1):
        req = urllib.request.Request(url, data=body, method=method, headers={**auth(), **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as response:
                return response.status, json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as error:
            retry_after = error.headers.get("Retry-After", "")
            if error.code == 429 and attempt < RATE_LIMIT_RETRIES and retry_after.isdigit():
                seconds = min(int(retry_after), MAX_RETRY_AFTER_S)
                if on_wait is not None:
                    on_wait(seconds)
                time.sleep(seconds)
                continue
            try:
                return error.code, json.loads(error.read() or b"{}")
            except json.JSONDecodeError:
                return error.code, {}
    raise AssertionError("unreachable")


def predict(base_url: str, image: bytes, filename: str = "photo.jpg", timeout: float = 30,
            on_wait: Callable[[float], None] | None = None) -> tuple[int, dict]:  # fmt: skip
    """POST /predict with the photo as the raw body, its type from the file name's extension (so no file name, with
    whatever characters it holds, is ever written into the request); `on_wait` as for request()."""
    media_type = mimetypes.guess_type(filename)[0] or "application/octet-stream"  # not an image: the service says 415
    return request(f"{base_url}/predict", "POST", image, {"Content-Type": media_type}, timeout, on_wait)


def wait_ready(base_url: str, timeout: float) -> dict[str, Any]:
    """Poll /ready until it answers 200; raises TimeoutError with the last answer."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            status, body = request(f"{base_url}/ready", timeout=5)
            if status == 200:
                return body
            last = (status, body)
        except (urllib.error.URLError, ConnectionError, TimeoutError) as error:
            last = error
        time.sleep(1)
    raise TimeoutError(f"{base_url}/ready did not answer 200 within {timeout:.0f} s; last answer: {last}")


def free_port() -> int:
    """A TCP port nobody listens on right now, for a local service."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]

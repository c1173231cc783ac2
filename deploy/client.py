"""A minimal HTTP client for the service, on the standard library (CI/CD runners need nothing installed)."""

from __future__ import annotations

import json
import mimetypes
import socket
import time
import urllib.error
import urllib.request
from typing import Any


def request(url: str, method: str = "GET", body: bytes | None = None, headers: dict[str, str] | None = None,
            timeout: float = 30) -> tuple[int, dict[str, Any]]:  # fmt: skip
    """(status, JSON body) for one request; HTTP errors are returned, not raised."""
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as error:
        try:
            return error.code, json.loads(error.read() or b"{}")
        except json.JSONDecodeError:
            return error.code, {}


def predict(base_url: str, image: bytes, filename: str = "photo.jpg", timeout: float = 30) -> tuple[int, dict]:
    """POST /predict with the photo as the raw body, its type from the file name's extension (so no file name, with
    whatever characters it holds, is ever written into the request)."""
    media_type = mimetypes.guess_type(filename)[0] or "application/octet-stream"  # not an image: the service says 415
    return request(f"{base_url}/predict", "POST", image, {"Content-Type": media_type}, timeout)


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

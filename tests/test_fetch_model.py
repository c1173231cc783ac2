"""The init container's model fetch over real HTTP: the pinned file lands, anything else is refused."""

from __future__ import annotations

import functools
import hashlib
import http.server
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from server.fetch_model import FetchError, fetch
from tests.conftest import ROOT


class QuietServer(http.server.ThreadingHTTPServer):
    def handle_error(self, request: object, client_address: object) -> None:
        """The size-limit test hangs up mid-file; that is expected, not worth a traceback."""


@pytest.fixture(scope="module")
def model_server(onnx_model: Path) -> Iterator[str]:
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(onnx_model.parent))
    server = QuietServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/{onnx_model.name}"
    server.shutdown()


def test_the_pinned_file_is_fetched_once(model_server, onnx_model, tmp_path):
    sha256 = hashlib.sha256(onnx_model.read_bytes()).hexdigest()
    out = tmp_path / "models" / "model.onnx"
    assert fetch(model_server, sha256, out, max_bytes=10**9) is True
    assert out.read_bytes() == onnx_model.read_bytes()
    assert fetch(model_server, sha256, out, max_bytes=10**9) is False  # already there: no second download


def test_a_different_file_is_refused_and_nothing_is_left(model_server, tmp_path):
    out = tmp_path / "model.onnx"
    with pytest.raises(FetchError, match="not the pinned"):
        fetch(model_server, "0" * 64, out, max_bytes=10**9)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(FetchError, match="larger than"):
        fetch(model_server, "0" * 64, out, max_bytes=1000)
    assert list(tmp_path.iterdir()) == []


def test_the_cli_fails_with_a_clear_line(model_server, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "server.fetch_model", "--url", model_server, "--sha256", "abc", "--out",
         str(tmp_path / "m.onnx")], cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 1 and "Invalid sha256 'abc'" in result.stderr


def test_a_models_folder_as_model_path_gets_model_onnx_inside(model_server, onnx_model, tmp_path):
    """The serve image sets MODEL_PATH=/models (a folder): the fetched file lands in it, as the server reads it."""
    sha256 = hashlib.sha256(onnx_model.read_bytes()).hexdigest()
    result = subprocess.run(
        [sys.executable, "-m", "server.fetch_model", "--url", model_server, "--sha256", sha256],
        cwd=ROOT, capture_output=True, text=True, env={"PATH": "/usr/bin:/bin", "MODEL_PATH": str(tmp_path)},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "model.onnx").read_bytes() == onnx_model.read_bytes()


def test_make_fetch_model_puts_the_pinned_file_in_the_models_folder(model_server, onnx_model, tmp_path):
    sha256 = hashlib.sha256(onnx_model.read_bytes()).hexdigest()
    command = ["make", "--no-print-directory", "fetch-model", f"URL={model_server}", f"SHA256={sha256}",
               f"MODEL_DIR={tmp_path / 'models'}"]  # fmt: skip
    (tmp_path / "models").mkdir()
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "models" / "model.onnx").read_bytes() == onnx_model.read_bytes()
    missing = subprocess.run(["make", "--no-print-directory", "fetch-model", f"SHA256={sha256}"], cwd=ROOT,
                             capture_output=True, text=True, timeout=60)  # fmt: skip
    assert missing.returncode == 2 and "set URL=" in missing.stderr

"""The init container's model fetch over real HTTP: the pinned file lands, anything else is refused."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import http.server
import os
import shutil
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from server.fetch_model import FetchError, fetch
from tests.conftest import ROOT


class QuietServer(http.server.ThreadingHTTPServer):
    def handle_error(self, request: object, client_address: object) -> None:
        """The size-limit and deadline tests hang up mid-file; that is expected, not worth a traceback."""


class Dripping(http.server.BaseHTTPRequestHandler):
    """A server that sends its body a byte every half second, for ever (as a hostile or broken mirror would)."""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "1000000")
        self.end_headers()
        with contextlib.suppress(OSError):
            for _ in range(1000000):
                self.wfile.write(b"x")
                self.wfile.flush()
                time.sleep(0.5)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A self-signed certificate for 127.0.0.1 (the https:// test servers), trusted through SSL_CERT_FILE."""
    folder = tmp_path_factory.mktemp("tls")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(folder / "key.pem"), "-out",
                    str(folder / "cert.pem")], check=True, capture_output=True)  # fmt: skip
    return folder


def https_server(handler: Callable[..., http.server.BaseHTTPRequestHandler], tls: Path) -> QuietServer:
    server = QuietServer(("127.0.0.1", 0), handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tls / "cert.pem", tls / "key.pem")
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture(scope="module")
def model_server(onnx_model: Path, certificate: Path) -> Iterator[str]:
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(onnx_model.parent))
    server = https_server(handler, certificate)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SSL_CERT_FILE", str(certificate / "cert.pem"))  # this process and the CLI children trust it
        yield f"https://127.0.0.1:{server.server_address[1]}/{onnx_model.name}"
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
    with pytest.raises(FetchError, match="more than 1000 "):
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
        [sys.executable, "-m", "server.fetch_model", "--url", model_server, "--sha256", sha256], cwd=ROOT,
        capture_output=True, text=True,
        env={"PATH": "/usr/bin:/bin", "MODEL_PATH": str(tmp_path), "SSL_CERT_FILE": os.environ["SSL_CERT_FILE"]},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "model.onnx").read_bytes() == onnx_model.read_bytes()


def test_make_fetch_model_puts_the_pinned_file_in_the_models_folder(onnx_model, tmp_path):
    sha256 = hashlib.sha256(onnx_model.read_bytes()).hexdigest()
    command = ["make", "--no-print-directory", "fetch-model", f"URL={onnx_model}", f"SHA256={sha256}",
               f"MODEL_DIR={tmp_path / 'models'}"]  # fmt: skip
    (tmp_path / "models").mkdir()
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "models" / "model.onnx").read_bytes() == onnx_model.read_bytes()
    missing = subprocess.run(["make", "--no-print-directory", "fetch-model", f"SHA256={sha256}"], cwd=ROOT,
                             capture_output=True, text=True, timeout=60)  # fmt: skip
    assert missing.returncode == 2 and "set URL=" in missing.stderr


@pytest.mark.parametrize("url", ["http://127.0.0.1:9/model.onnx", "file:///etc/passwd", "ftp://example.com/m.onnx"])
def test_only_https_or_a_local_path_is_fetched(url, tmp_path):
    result = subprocess.run([sys.executable, "-m", "server.fetch_model", "--url", url, "--sha256", "0" * 64, "--out",
                             str(tmp_path / "m.onnx")], cwd=ROOT, capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 1 and result.stderr.strip().count("\n") == 0, result.stderr
    assert "only https:// URLs (or a local file path)" in result.stderr and list(tmp_path.iterdir()) == []


def test_a_server_that_drips_bytes_is_given_up_at_the_deadline(certificate, tmp_path, monkeypatch):
    monkeypatch.setenv("SSL_CERT_FILE", str(certificate / "cert.pem"))
    server = https_server(Dripping, certificate)
    started = time.perf_counter()
    try:
        with pytest.raises(FetchError, match="within the deadline"):
            fetch(f"https://127.0.0.1:{server.server_address[1]}/m.onnx", "0" * 64, tmp_path / "m.onnx",
                  max_bytes=10**9, deadline_s=2)  # fmt: skip
    finally:
        server.shutdown()
    assert time.perf_counter() - started < 2 + 2 and list(tmp_path.iterdir()) == []


def test_no_more_than_the_volume_holds(model_server, tmp_path, monkeypatch):
    free = shutil.disk_usage(tmp_path).free
    monkeypatch.setattr("server.fetch_model.shutil.disk_usage", lambda path: shutil._ntuple_diskusage(free, free, 4096))
    with pytest.raises(FetchError, match="volume's free space"):
        fetch(model_server, "0" * 64, tmp_path / "m.onnx", max_bytes=10**9)
    assert list(tmp_path.iterdir()) == []

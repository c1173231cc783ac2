"""Edges found in review: 500s keep their request id, logs cannot be forged, library wording is not an API."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import httpx2 as httpx
import pytest
from starlette.testclient import TestClient

from server.app import create_app
from server.logs import JsonFormatter, TextFormatter
from tests.images import photo_bytes
from tests.test_app import CAT, assert_error, post_file, settings_for


def test_a_500_carries_the_request_id_and_a_json_error(onnx_model: Path):
    app = create_app(settings_for(onnx_model))
    with TestClient(app, raise_server_exceptions=False) as client:
        app.state.model.input_name = "no-such-input"  # session.run now really fails inside onnxruntime
        generated = post_file(client, photo_bytes(CAT))
        response = client.post("/predict", files={"file": ("c.jpg", photo_bytes(CAT), "image/jpeg")},
                               headers={"X-Request-ID": "boom-1"})  # fmt: skip
    assert_error(response, 500, "internal_error")
    assert response.headers["x-request-id"] == "boom-1"
    assert len(generated.headers["x-request-id"]) == 32
    assert app.state.admission.admitted == 0


def record(message: str, **extra: object) -> logging.LogRecord:
    entry = logging.makeLogRecord({"name": "catsdogs", "levelname": "INFO", "levelno": 20, "msg": message})
    entry.__dict__.update(extra)
    return entry


def test_text_logs_escape_control_characters_so_a_path_cannot_forge_a_line():
    forged = "/predict\n2026-01-01 00:00:00,000 INFO    catsdogs: request path=/admin status=200"
    line = TextFormatter().format(record("request", path=forged, status=404))
    assert "\n" not in line and "\\n2026-01-01" in line
    assert "\x1b" not in TextFormatter().format(record("colour \x1b[31mred\x1b[0m"))


def test_json_logs_carry_no_terminal_colour_codes():
    entry = record("Started server process [%d]", color_message="Started server process [\x1b[36m%d\x1b[0m]")
    line = JsonFormatter().format(entry)
    assert "color_message" not in json.loads(line) and "\\u001b" not in line


def test_too_many_files_stops_the_parse_at_the_first_file_over_the_limit(onnx_model):
    """The 413 comes when the third file begins, before the rest of the body is parsed: the part after it, which
    Starlette would refuse as invalid multipart (no field name), is never read."""
    files = [("files", (f"{i}.jpg", photo_bytes(CAT), "image/jpeg")) for i in range(3)]
    request = httpx.Request("POST", "http://test/predict/batch", files=files)
    body = request.read()
    boundary = request.headers["content-type"].split("boundary=")[1].encode()
    closing = b"--" + boundary + b"--\r\n"
    unnamed = b"--" + boundary + b'\r\nContent-Disposition: form-data; filename="x.jpg"\r\n\r\nxx\r\n'
    tampered = body.removesuffix(closing) + unnamed + closing
    headers = {"content-type": request.headers["content-type"]}
    with TestClient(create_app(settings_for(onnx_model, max_batch_files=2))) as client:
        assert_error(client.post("/predict/batch", content=tampered, headers=headers), 413, "too_many_files")
        first_two = b"".join(b"--" + boundary + part for part in body.split(b"--" + boundary)[1:3])
        response = client.post("/predict/batch", content=first_two + unnamed + closing, headers=headers)
    assert_error(response, 400, "invalid_multipart")  # two files fit: the unnamed part is read and refused


@pytest.mark.parametrize("count", [1, 2])
def test_the_file_limit_counts_files_not_fields(onnx_model, count):
    with TestClient(create_app(settings_for(onnx_model, max_batch_files=2))) as client:
        files = [("files", (f"{i}.jpg", photo_bytes(CAT), "image/jpeg")) for i in range(count)]
        response = client.post("/predict/batch", files=files, data={"note": "x", "other": "y"})
    assert response.status_code == 200 and response.json()["count"] == count

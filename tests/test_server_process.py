"""The service as users run it: `python -m server` (uvicorn) on a free port, spoken to over real HTTP."""

from __future__ import annotations

import json
import signal
import socket
import time

import httpx2 as httpx

from bench.loadgen import prepare, read_response
from tests.images import photo_bytes
from tests.service import Service


def test_real_uvicorn_serves_predictions_with_request_ids(service):
    response = httpx.post(
        f"{service.url}/predict",
        files={"file": ("cat.jpg", photo_bytes("cats/cat.1.jpg"), "image/jpeg")},
        headers={"X-Request-ID": "req-42"},
        timeout=30,
    )
    assert response.status_code == 200 and response.json()["label"] == "cat"
    assert response.headers["x-request-id"] == "req-42"
    assert "server" not in response.headers  # no version banner
    [line] = service.wait_for_records(lambda r: r.get("request_id") == "req-42")
    assert line["message"] == "request" and line["path"] == "/predict" and line["status"] == 200
    assert line["label"] == "cat" and 0.5 < line["confidence"] <= 1 and line["latency_ms"] > 0
    assert line["ts"].endswith("Z") and line["method"] == "POST"
    startup = [r for r in service.records() if r["message"] == "startup"]
    assert startup and startup[0]["model_version"] == "seeded-imagenet-head" and startup[0]["load_seconds"] > 0
    assert startup[0]["model_path"] and startup[0]["model_choice"]  # the file served, and why
    [feedback] = [r for r in service.records() if r["message"] == "feedback"]  # where feedback goes, said at start
    assert feedback["feedback_store"].startswith("memory") and feedback["photos_kept"].startswith("no")
    assert feedback["api_keys"].startswith("none") and feedback["predict_requires_key"] is False


def test_oversized_streamed_body_is_refused_while_it_streams(service):
    limit = 10 * 1024 * 1024
    chunk = b"\xff" * (1024 * 1024)
    sent, response = 0, b""
    with socket.create_connection(("127.0.0.1", service.port), timeout=10) as connection:
        head = "POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nTransfer-Encoding: chunked\r\n\r\n"
        connection.sendall(head.encode())
        try:
            for _ in range(20):  # 20 MiB offered, without a Content-Length to refuse up front
                connection.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
                sent += len(chunk)
                connection.settimeout(0.05)
                try:
                    response = connection.recv(65536)
                except TimeoutError:
                    continue
                finally:
                    connection.settimeout(10)
                if response:
                    break
        except (BrokenPipeError, ConnectionResetError):
            pass
        answer = read_response(connection, timeout=30, received=response)
    assert answer.status == 413 and b"payload_too_large" in answer.body, answer
    assert sent < 20 * 1024 * 1024 and sent <= limit + 2 * len(chunk)


def test_declared_oversized_body_is_refused_before_it_is_sent(service):
    with socket.create_connection(("127.0.0.1", service.port), timeout=10) as connection:
        connection.sendall(
            b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: 20971520\r\n\r\n"
        )
        response = read_response(connection, timeout=30)
    assert response.status == 413 and b"payload_too_large" in response.body


def test_health_only_mode_starts_without_a_model(tmp_path):
    service = Service(tmp_path / "absent.onnx")
    try:
        deadline = time.perf_counter() + 60
        while True:
            try:
                health = httpx.get(f"{service.url}/health", timeout=1)
                break
            except httpx.TransportError:
                assert time.perf_counter() < deadline and service.process.poll() is None, "\n".join(service.lines)
                time.sleep(0.05)
        assert health.json() == {"status": "ok", "model_loaded": False}
        ready = httpx.get(f"{service.url}/ready", timeout=5)
        assert ready.status_code == 503 and ready.json()["error"]["code"] == "model_not_loaded"
    finally:
        service.stop()


def test_json_log_lines_carry_no_terminal_colour_codes(service):
    assert service.records() and not any("\x1b" in line or "color_message" in line for line in service.lines)


def metric_value(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=5).text
    return next(float(line.split()[1]) for line in text.splitlines() if line.startswith(f"{name} "))


def test_graceful_shutdown_finishes_in_flight_requests(onnx_model):
    """The request is still sending its body when SIGTERM arrives, so it is in flight whatever the machine's speed."""
    service = Service(onnx_model)
    service.wait_ready()
    files = [("files", (f"{i}.jpg", photo_bytes(f"dogs/dog.{i}.jpg"), "image/jpeg")) for i in range(1, 33)]
    request = prepare("POST", f"{service.url}/predict/batch", files=files)
    with socket.create_connection(("127.0.0.1", service.port), timeout=60) as connection:
        connection.sendall(request[:2000])  # the head and the start of the body
        deadline = time.perf_counter() + 30
        while metric_value(service.url, "catsdogs_http_requests_in_flight") < 2:  # ours and this scrape
            assert time.perf_counter() < deadline
            time.sleep(0.02)
        service.process.send_signal(signal.SIGTERM)
        service.wait_for_records(lambda r: r["message"] == "Shutting down", timeout=30)
        assert service.process.poll() is None
        connection.sendall(request[2000:])
        response = read_response(connection, timeout=60)
    service.stop()
    assert response.status == 200, response
    assert json.loads(response.body)["count"] == 32 and json.loads(response.body)["errors"] == 0


def test_error_request_lines_carry_the_error_code(service):
    for request_id, data in (("req-empty", b""), ("req-corrupt", b"<html>not an image</html>")):
        response = httpx.post(
            f"{service.url}/predict", files={"file": ("x.jpg", data, "image/jpeg")},
            headers={"X-Request-ID": request_id}, timeout=30,
        )  # fmt: skip
        assert response.status_code == 400
    httpx.get(f"{service.url}/nowhere", headers={"X-Request-ID": "req-404"}, timeout=30)
    ours = {"req-empty", "req-corrupt", "req-404"}
    lines = service.wait_for_records(lambda r: r.get("message") == "request" and r["request_id"] in ours, count=3)
    codes = {r["request_id"]: r.get("error_code") for r in lines}
    assert codes["req-empty"] != codes["req-corrupt"]
    assert codes["req-empty"] == "empty_image" and codes["req-404"] == "not_found"

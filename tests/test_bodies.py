"""Bodies from hostile or clumsy clients, against real uvicorn: a body that crawls is cut off at its deadline
without holding what honest requests need, and a client that hangs up is not a server error."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx2 as httpx
import pytest

from bench.clients import honest, slow_uploads
from bench.loadgen import prepare, read_response
from server.bodies import body_deadline
from tests.conftest import running_service
from tests.images import photo_bytes
from tests.service import Service
from tests.test_app import CAT, metric

# Short deadlines so the test takes seconds: a body gets 2 s, one more per 500 bytes, at most 3 s.
DEADLINES = {"BODY_TIMEOUT": "2", "BODY_TIMEOUT_MAX": "3", "READ_MIN_RATE": "500", "HEADER_TIMEOUT": "2",
             "HEADER_TIMEOUT_MAX": "3"}  # fmt: skip


@pytest.fixture(scope="module")
def service(onnx_model: Path) -> Iterator[Service]:
    yield from running_service(onnx_model, **DEADLINES)


def test_the_deadline_grows_with_the_bytes_received_up_to_its_cap():
    assert body_deadline(0, 20, 60, 500) == 20
    assert body_deadline(5000, 20, 60, 500) == 30  # one more second per 500 bytes, as Apache's MinRate
    assert body_deadline(10**7, 20, 60, 500) == 60


def test_honest_users_are_served_while_forty_uploads_crawl(service):
    """40 photo-sized uploads sending a byte every half second used to take every admission place (503 for all)."""
    photo = photo_bytes(CAT)
    with slow_uploads(service.port, 40, interval=0.5) as crawling:
        served = honest(service.url, photo, 5)
        crawling.wait_ended(15)
    assert served["statuses"] == {"200": 5}, served
    print(f"honest while 40 uploads crawl: p50 {served['p50_ms']} ms, worst {served['max_ms']} ms")
    summary = crawling.summary()
    assert summary["outcomes"] == {"408": 40}, summary  # every one answered and closed by the server...
    assert summary["ended_after_s"]["max"] <= 3 + 2, summary  # ...within BODY_TIMEOUT_MAX (and some slack)
    text = httpx.get(f"{service.url}/metrics").text
    assert metric(text, "catsdogs_request_body_bytes_held") == 0
    assert metric(text, "catsdogs_inference_requests_admitted") == 0


def test_a_client_that_hangs_up_mid_upload_is_499_never_a_server_error(service):
    request = prepare("POST", f"{service.url}/predict", content=photo_bytes(CAT), headers={
        "content-type": "image/jpeg", "x-request-id": "hangs-up"})  # fmt: skip
    with socket.create_connection(("127.0.0.1", service.port), timeout=10) as connection:
        connection.sendall(request[:-1000])  # all but the last kilobyte, then gone
    [line] = service.wait_for_records(lambda r: r.get("request_id") == "hangs-up")
    assert line["status"] == 499 and line["error_code"] == "client_closed" and line["level"] == "info"
    assert not [r for r in service.records() if r["level"] == "error"]
    text = httpx.get(f"{service.url}/metrics").text
    assert metric(text, "catsdogs_http_requests_total", method="POST", endpoint="/predict", status="499") == 1
    assert metric(text, "catsdogs_http_requests_total", method="POST", endpoint="/predict", status="500") == 0


def test_a_batch_v2_and_feedback_body_that_crawls_is_cut_off_too(service):
    for path, content_type in (("/predict/batch", "multipart/form-data; boundary=x"),
                               ("/v2/models/catsdogs/infer", "application/json"),
                               ("/feedback", "application/json")):  # fmt: skip
        head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\nContent-Length: 3000\r\n\r\n"
        started = time.perf_counter()
        with socket.create_connection(("127.0.0.1", service.port), timeout=10) as connection:
            connection.sendall(head.encode() + b"-")
            answer = read_response(connection, timeout=10)
            closed = connection.recv(65536) == b""
        assert answer.status == 408 and b"did not arrive in time" in answer.body and closed, (path, answer)
        assert answer.headers["connection"] == "close"
        assert time.perf_counter() - started < 3 + 2

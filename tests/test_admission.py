"""Backpressure: a bounded number of inference requests, refused at once past the bound, never left hanging."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx2 as httpx
import pytest
from starlette.testclient import TestClient

from bench.loadgen import read_response
from bench.serve import predict_request
from server.admission import Admission
from server.app import create_app
from server.errors import Overloaded
from server.metrics import Metrics
from tests.images import photo_bytes
from tests.service import Service
from tests.test_app import CAT, assert_error, metric, post_file, settings_for


@pytest.fixture
def small(onnx_model: Path) -> Iterator[TestClient]:
    """One inference slot, one waiting place, one second of waiting."""
    app = create_app(settings_for(onnx_model, inference_concurrency=1, max_queue=1, queue_timeout=1))
    with TestClient(app) as client:
        yield client


def test_past_the_bound_requests_get_503_with_retry_after_at_once(small):
    admission = small.app.state.admission
    holders = [{"state": {}} for _ in range(admission.capacity)]
    for scope in holders:  # two requests hold the slot and the waiting place
        small.portal.call(admission.enter, scope)
    started = time.perf_counter()
    response = post_file(small, photo_bytes(CAT))
    assert time.perf_counter() - started < 1.0
    assert_error(response, 503, "overloaded")
    assert response.headers["retry-after"] == "1" and response.headers["x-request-id"]
    files = [("files", ("cat.jpg", photo_bytes(CAT), "image/jpeg"))]
    assert_error(small.post("/predict/batch", files=files), 503, "overloaded")
    assert metric(small.get("/metrics").text, "catsdogs_requests_rejected_total", reason="overloaded") == 2
    small.portal.call(admission.release, holders.pop())
    assert post_file(small, photo_bytes(CAT)).status_code == 200  # one place free again
    small.portal.call(admission.release, holders.pop())
    assert admission.admitted == 0 and admission.held_bytes == 0  # every request let go of what it held


def test_bodies_held_are_bounded_in_bytes_received(onnx_model):
    photo = photo_bytes(CAT)
    app = create_app(settings_for(onnx_model, max_queue=8, max_admitted_bytes=len(photo) * 3))
    with TestClient(app) as client:
        admission = client.app.state.admission
        other = {"state": {}}
        client.portal.call(admission.hold, other, len(photo) * 2)  # a request holding two photos' worth of body
        assert_error(post_file(client, photo), 503, "overloaded")  # a third and its multipart framing do not fit
        assert post_file(client, photo[: len(photo) // 2], mime="image/jpeg").status_code == 400  # half fits
        big = {"content-length": str(len(photo) * 100)}  # what a header declares is not what is held
        assert client.post("/predict", content=photo[:100], headers={**big, "content-type": "image/jpeg"}).status_code
        client.portal.call(admission.release, other)
        assert admission.held_bytes == 0 and post_file(client, photo).status_code == 200
        assert metric(client.get("/metrics").text, "catsdogs_request_body_bytes_held") == 0
    with TestClient(create_app(settings_for(onnx_model, max_admitted_bytes=10))) as alone:
        assert post_file(alone, photo).status_code == 200  # a lone request is admitted whatever its size


def test_a_request_that_waits_too_long_for_a_slot_gets_503(small):
    slots = small.app.state.admission.free_slots
    small.portal.call(slots.acquire)  # the only inference slot is busy
    try:
        started = time.perf_counter()
        response = post_file(small, photo_bytes(CAT))
        waited = time.perf_counter() - started
    finally:
        small.portal.call(lambda: slots.release())
    assert_error(response, 503, "queue_timeout")
    assert response.headers["retry-after"] == "1"
    assert 0.9 < waited < 4.0
    text = small.get("/metrics").text
    assert metric(text, "catsdogs_requests_rejected_total", reason="queue_timeout") == 1
    assert metric(text, "catsdogs_inference_requests_queued") == 0
    assert post_file(small, photo_bytes(CAT)).status_code == 200


def test_a_flood_gets_only_200s_and_fast_503s_and_the_service_stays_ready(onnx_model):
    """256 ordinary requests, 64 at a time, against real uvicorn: no dropped connection, no slow refusal."""
    service = Service(onnx_model, INFERENCE_CONCURRENCY="2", MAX_QUEUE="4", QUEUE_TIMEOUT="10")
    try:
        service.wait_ready()
        photo = photo_bytes(CAT)

        request = predict_request(service.port, photo)

        def send(_: int) -> tuple[int, float, str, str]:
            """One request on a fresh connection (bench.loadgen: a thin client, the cores are shared)."""
            started = time.perf_counter()
            with socket.create_connection(("127.0.0.1", service.port), timeout=60) as connection:
                connection.sendall(request)
                response = read_response(connection, timeout=60)
            seconds = time.perf_counter() - started
            code = json.loads(response.body)["error"]["code"] if response.status != 200 else ""
            return response.status, seconds, code, response.headers.get("retry-after", "")

        with ThreadPoolExecutor(64) as pool:
            results = list(pool.map(send, range(256)))  # a transport error would raise here
        statuses = [status for status, *_ in results]
        refused = [(seconds, code, retry) for status, seconds, code, retry in results if status == 503]
        assert set(statuses) <= {200, 503}, statuses
        assert statuses.count(200) >= 6 and refused, statuses
        assert {code for _, code, _ in refused} == {"overloaded"}
        assert {retry for *_, retry in refused} == {"1"}
        refusal_seconds = sorted(seconds for seconds, *_ in refused)
        served_seconds = sorted(seconds for status, seconds, *_ in results if status == 200)
        refused_lines = service.wait_for_records(lambda r: r.get("status") == 503, count=len(refused))
        refusal_ms = sorted(r["latency_ms"] for r in refused_lines)
        assert len(refusal_ms) == len(refused) and refusal_ms[len(refusal_ms) // 2] < 50, refusal_ms
        median_200, median_503 = served_seconds[len(served_seconds) // 2], refusal_seconds[len(refusal_seconds) // 2]
        print(f"flood: {statuses.count(200)} x 200, {len(refused)} x 503; client-side median 200 {median_200:.3f} s, "
              f"503 {median_503:.3f} s; server-side median 503 {refusal_ms[len(refusal_ms) // 2]:.1f} ms")  # fmt: skip
        assert median_503 < median_200
        assert httpx.get(f"{service.url}/ready", timeout=5).status_code == 200
        text = httpx.get(f"{service.url}/metrics", timeout=5).text
        assert metric(text, "catsdogs_requests_rejected_total", reason="overloaded") == len(refused)
        assert metric(text, "catsdogs_inference_requests_admitted") == 0
        after = httpx.post(f"{service.url}/predict", files={"file": ("cat.jpg", photo, "image/jpeg")}, timeout=30)
        assert after.status_code == 200 and after.json()["label"] == "cat"
    finally:
        service.stop()


def test_slots_are_taken_in_arrival_order_and_a_waiter_past_its_deadline_takes_none():
    """Admission.run with one slot: waiters past QUEUE_TIMEOUT get queue_timeout and run nothing; the freed slot goes
    to the waiters in arrival order, one that was cancelled while waiting takes none, and a request cancelled while
    its thread runs keeps the slot until the thread is done; an error raised in the thread reaches the caller and
    frees the slot."""

    async def scenario() -> tuple[list[str], list[str], bool]:
        admission = Admission(slots=1, queue=8, timeout=0.5, metrics=Metrics())
        ran: list[str] = []
        gate = threading.Event()
        held = asyncio.ensure_future(admission.run(gate.wait))  # the only slot, until the gate opens
        await asyncio.sleep(0.05)
        expired = [asyncio.ensure_future(admission.run(ran.append, name)) for name in "abc"]
        results = await asyncio.gather(*expired, return_exceptions=True)
        outcomes = [f"{type(error).__name__}:{error.code}" for error in results if isinstance(error, Overloaded)]
        admission.timeout = 30
        queued = [asyncio.ensure_future(admission.run(ran.append, name)) for name in "xyz"]
        gone = asyncio.ensure_future(admission.run(ran.append, "gone"))
        await asyncio.sleep(0.05)
        gone.cancel()
        held.cancel()  # its client went away; its thread still runs
        await asyncio.sleep(0.2)
        still_held = not ran
        gate.set()
        await asyncio.gather(*queued)
        [failed] = await asyncio.gather(admission.run(divmod, 1, 0), return_exceptions=True)  # raises in its thread
        ran.append(f"{type(failed).__name__}, then {await admission.run(str.upper, 'ok')}")  # and its slot is free
        admission.close()
        return ran, outcomes, still_held

    ran, outcomes, still_held = asyncio.run(scenario())
    assert outcomes == ["Overloaded:queue_timeout"] * 3
    assert ran == ["x", "y", "z", "ZeroDivisionError, then OK"] and still_held

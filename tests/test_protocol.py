"""The head of a request has a deadline too (uvicorn has none): half-open connections are closed, honest users
are served meanwhile."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.clients import half_open, honest
from bench.loadgen import read_response
from server.protocol import CoalescingTransport
from tests.conftest import running_service
from tests.images import photo_bytes
from tests.service import Service
from tests.test_app import CAT

HEADER = {"HEADER_TIMEOUT": "2", "HEADER_TIMEOUT_MAX": "3", "READ_MIN_RATE": "500"}


@pytest.fixture(scope="module")
def service(onnx_model: Path) -> Iterator[Service]:
    yield from running_service(onnx_model, **HEADER)


def test_three_hundred_half_open_connections_neither_stop_honest_users_nor_stay_open(service):
    with half_open(service.port, 300) as stalled:
        served = honest(service.url, photo_bytes(CAT), 5)
        stalled.wait_ended(15)
    assert served["statuses"] == {"200": 5}, served
    print(f"honest beside 300 half-open connections: p50 {served['p50_ms']} ms, worst {served['max_ms']} ms")
    summary = stalled.summary()
    assert summary["outcomes"] == {"408": 300}, summary
    assert summary["ended_after_s"]["max"] <= 3 + 2, summary


def test_a_head_that_keeps_coming_slowly_gets_more_time_but_not_for_ever(service):
    with socket.create_connection(("127.0.0.1", service.port), timeout=10) as connection:
        started = time.perf_counter()
        connection.sendall(b"GET /health HTTP/1.1\r\nX-Padding: " + b"a" * 1000)  # 1,000 bytes: 2 s more, capped at 3
        answer = connection.recv(65536)
        waited = time.perf_counter() - started
    assert answer.startswith(b"HTTP/1.1 408") and 2.5 < waited < 3 + 2, (answer[:100], waited)


def test_a_kept_alive_connection_gets_a_new_clock_for_each_request(service):
    with socket.create_connection(("127.0.0.1", service.port), timeout=10) as connection:
        for _ in range(2):
            time.sleep(1.2)  # together longer than HEADER_TIMEOUT, each request well within it
            connection.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert read_response(connection, timeout=5).status == 200


def test_a_response_leaves_in_one_write_in_the_order_written():
    """server.protocol.CoalescingTransport: what uvicorn writes in one turn of the loop (the head, then the body)
    reaches the socket in one call; closing sends what is pending first; aborting drops it."""

    class Recorder:
        def __init__(self) -> None:
            self.writes: list[bytes] = []
            self.closed = self.aborted = False

        def write(self, data: bytes) -> None:
            self.writes.append(data)

        def close(self) -> None:
            self.closed = True

        def abort(self) -> None:
            self.aborted = True

        def is_closing(self) -> bool:
            return self.closed

    async def scenario() -> tuple[Recorder, Recorder]:
        loop = asyncio.get_running_loop()
        sent, aborted = Recorder(), Recorder()
        transport = CoalescingTransport(sent, loop)  # type: ignore[arg-type]
        transport.write(b"HTTP/1.1 200 OK\r\n\r\n")
        transport.write(memoryview(b"body"))
        assert sent.writes == []  # not yet: at the end of this turn
        await asyncio.sleep(0)
        transport.write(b"late")
        transport.close()  # sends "late" first, then closes
        assert transport.is_closing() and transport.get_write_buffer_size is not None
        dropped = CoalescingTransport(aborted, loop)  # type: ignore[arg-type]
        dropped.write(b"never")
        dropped.abort()
        await asyncio.sleep(0)
        gone = CoalescingTransport(closing := Recorder(), loop)  # type: ignore[arg-type]
        gone.write(b"to a peer that went away in the same turn")
        closing.closed = True  # the connection was lost meanwhile: the write is dropped, not raised by the loop
        await asyncio.sleep(0)
        assert closing.writes == []
        return sent, aborted

    sent, aborted = asyncio.run(scenario())
    assert sent.writes == [b"HTTP/1.1 200 OK\r\n\r\nbody", b"late"] and sent.closed
    assert aborted.writes == [] and aborted.aborted

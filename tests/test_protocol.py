"""The head of a request has a deadline too (uvicorn has none): half-open connections are closed, honest users
are served meanwhile."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.clients import half_open, honest
from bench.loadgen import read_response
from server.protocol import LINGERING_TIMEOUT_S, CoalescingTransport
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


def drip_until_closed(connection: socket.socket, drip: bytes, every_s: float, limit_s: float) -> tuple[bytes, float]:
    """Send `drip` every `every_s` seconds until the server closes the connection; what came back and when."""
    started, answer = time.perf_counter(), b""
    connection.settimeout(every_s)
    while time.perf_counter() - started < limit_s:
        try:
            connection.sendall(drip)
            chunk = connection.recv(65536)
        except TimeoutError:
            continue
        except (BrokenPipeError, ConnectionResetError):
            break
        if not chunk:
            break
        answer += chunk
    return answer, time.perf_counter() - started


def test_bytes_that_start_no_request_after_an_answer_are_closed_within_the_head_deadline(service):
    """Empty lines after a kept-alive answer re-arm nothing in uvicorn: the head clock runs from them."""
    with socket.create_connection(("127.0.0.1", service.port), timeout=10) as connection:
        connection.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_response(connection, timeout=5).status == 200
        answer, held = drip_until_closed(connection, b"\r\n", 0.5, 30)
    print(f"empty lines after an answer: closed after {held:.1f} s")
    assert answer.startswith(b"HTTP/1.1 408") and held < 3 + 2, (answer[:80], held)


def test_a_refused_body_that_keeps_dripping_is_closed_after_its_answer(service):
    """413 before the body: the client reads its answer (then EOF), the rest it drips is dropped, and the server
    closes its socket at the head deadline however long the drip goes on."""
    with socket.create_connection(("127.0.0.1", service.port), timeout=10) as connection:
        connection.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
                           b"Content-Length: 100000000\r\n\r\n")  # fmt: skip
        first = read_response(connection, timeout=5)
        assert connection.recv(100) == b""  # the answer is all there is
        started, port = time.perf_counter(), connection.getsockname()[1]
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            while holds(service.process.pid, port) and time.perf_counter() - started < 30:
                connection.sendall(b"x" * 100)
                time.sleep(0.3)
        held = time.perf_counter() - started
    print(f"a refused body dripping on: closed {held:.1f} s after the 413")
    assert first.status == 413 and 2 - 1 < held < 2 + 2, (first.status, held)


def holds(pid: int, client_port: int) -> bool:
    """Whether process `pid` still has a socket open to this machine's `client_port` (/proc: its descriptors and the
    kernel's TCP tables), whatever the socket's state."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = str(fd.readlink())
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[2].rsplit(":", 1)[1], 16) == client_port and fields[9] in inodes:
                return True
    return False


def test_a_refused_body_that_stops_is_closed_after_the_lingering_timeout(onnx_model):
    """The answer ends the server's side at once (the client reads EOF); the server closes its socket after
    LINGERING_TIMEOUT_S without a byte."""
    with contextlib.ExitStack() as stack:
        service = stack.enter_context(contextlib.contextmanager(running_service)(onnx_model, HEADER_TIMEOUT="60"))
        connection = stack.enter_context(socket.create_connection(("127.0.0.1", service.port), timeout=30))
        connection.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
                           b"Content-Length: 100000000\r\n\r\nxxxx")  # fmt: skip
        assert read_response(connection, timeout=5).status == 413
        started, port = time.perf_counter(), connection.getsockname()[1]
        assert connection.recv(100) == b""  # the answer is all there is
        while holds(service.process.pid, port) and time.perf_counter() - started < 30:
            time.sleep(0.1)
        held = time.perf_counter() - started
    print(f"a refused body that stops: closed {held:.1f} s after the 413")
    assert LINGERING_TIMEOUT_S - 1 < held < LINGERING_TIMEOUT_S + 3, held


def test_connections_past_the_limit_are_answered_503_and_the_rest_served(onnx_model):
    with contextlib.ExitStack() as stack:
        service = stack.enter_context(contextlib.contextmanager(running_service)(onnx_model, MAX_CONNECTIONS="3"))
        held = [stack.enter_context(socket.create_connection(("127.0.0.1", service.port), timeout=10))
                for _ in range(4)]  # fmt: skip
        time.sleep(0.2)  # accepted, in order
        answers = []
        for connection in [*held[:3], held[3], *held[:3]]:  # the first three before and after the fourth's refusal
            connection.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            answers.append(read_response(connection, timeout=5))
        assert [answer.status for answer in answers] == [200, 200, 200, 503, 200, 200, 200]
        assert json.loads(answers[3].body)["error"]["code"] == "too_many_connections"
        assert answers[3].headers["retry-after"] == "1"
        assert held[3].recv(100) == b""  # answered, then closed
        held[0].close()
        time.sleep(0.2)
        with socket.create_connection(("127.0.0.1", service.port), timeout=10) as connection:
            connection.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert read_response(connection, timeout=5).status == 200  # room again once one closed

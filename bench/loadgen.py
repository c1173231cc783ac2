"""A thin HTTP/1.1 client for load generation and for tests that must misbehave on purpose.

Requests are built by httpx (its multipart encoder and headers) and sent as prepared bytes; responses are parsed
by httptools (uvicorn's own parser). Nothing here parses HTTP by hand, every read has a deadline, and a peer that
closes early is an error, never a loop. One thread drives many connections, so the client costs the shared cores
little (`make bench` measures the service, not its client).
"""

from __future__ import annotations

import selectors
import socket
import time
from dataclasses import dataclass, field
from typing import Any

import httptools
import httpx2 as httpx


def prepare(method: str, url: str, **kwargs: Any) -> bytes:
    """One request as the bytes on the wire (httpx.Request's body and headers, e.g. files= for multipart)."""
    request = httpx.Request(method, url, **kwargs)
    body = request.read()
    target = request.url.raw_path.decode("ascii")
    head = "".join(f"{name}: {value}\r\n" for name, value in request.headers.items())
    return f"{method} {target} HTTP/1.1\r\n{head}\r\n".encode("latin-1") + body


@dataclass
class Response:
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    body: bytearray = field(default_factory=bytearray)


class ResponseReader:
    """Feeds received bytes to httptools; `complete` holds each response once its last byte has arrived."""

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.current = Response()
        self.complete: list[Response] = []

    def feed(self, data: bytes) -> None:
        self.parser.feed_data(data)

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self.current.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_body(self, body: bytes) -> None:
        self.current.body += body

    def on_message_complete(self) -> None:
        self.current.status = self.parser.get_status_code()
        self.complete.append(self.current)
        self.current = Response()


def read_response(connection: socket.socket, timeout: float = 60, received: bytes = b"") -> Response:
    """The next whole response on a connection; TimeoutError past `timeout` s in all, ConnectionError when the
    peer closes before it is complete."""
    reader = ResponseReader()
    reader.feed(received)
    deadline = time.monotonic() + timeout
    while not reader.complete:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"no whole response within {timeout:g} s")
        connection.settimeout(remaining)
        chunk = connection.recv(65536)
        if not chunk:
            raise ConnectionError("the server closed the connection before the response was complete")
        reader.feed(chunk)
    return reader.complete[0]


def connect(port: int, timeout: float = 60) -> socket.socket:
    connection = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return connection


class Client:
    """One keep-alive connection sending a prepared request and reading each response whole."""

    def __init__(self, port: int, request: bytes, timeout: float = 60) -> None:
        self.connection = connect(port, timeout)
        self.request, self.timeout = request, timeout

    def send(self) -> int:
        self.connection.sendall(self.request)
        return read_response(self.connection, self.timeout).status

    def close(self) -> None:
        self.connection.close()


def one_shot(port: int, request: bytes, timeout: float = 120) -> tuple[int, float]:
    """One request on a fresh connection: (status, seconds); status 0 when the connection failed or was dropped."""
    started = time.perf_counter()
    try:
        with connect(port, timeout) as connection:
            connection.sendall(request)
            return read_response(connection, timeout).status, time.perf_counter() - started
    except OSError:  # ConnectionError and TimeoutError included
        return 0, time.perf_counter() - started


def load(port: int, request: bytes, clients: int, seconds: float, timeout: float = 60) -> dict[str, float]:
    """Closed-loop load from `clients` keep-alive connections for `seconds`, all driven by one thread through a
    selector: requests per second, and errors (any status but 200). Raises when a connection closes or stalls."""
    selector = selectors.DefaultSelector()
    for _ in range(clients):
        connection = connect(port, timeout)
        connection.sendall(request)
        selector.register(connection, selectors.EVENT_READ, data=ResponseReader())
    done = errors = 0
    started = time.perf_counter()
    stop = started + seconds
    while selector.get_map():
        ready = selector.select(timeout=timeout)
        if not ready:
            raise TimeoutError(f"no response for {timeout:g} s")
        for key, _ in ready:
            connection, reader = key.fileobj, key.data
            chunk = connection.recv(65536)  # type: ignore[union-attr]
            if not chunk:
                raise ConnectionError("the server closed a keep-alive connection")
            reader.feed(chunk)
            for response in reader.complete:
                done += response.status == 200
                errors += response.status != 200
            if not reader.complete:
                continue
            reader.complete.clear()
            if time.perf_counter() < stop:
                connection.sendall(request)  # type: ignore[union-attr]
            else:
                selector.unregister(connection)
                connection.close()  # type: ignore[union-attr]
    elapsed = time.perf_counter() - started
    return {"clients": clients, "requests": done, "errors": errors, "rps": round(done / elapsed, 2)}

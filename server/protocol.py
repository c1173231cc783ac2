"""uvicorn's HTTP/1.1 protocol with a deadline for each request's line and headers, which uvicorn does not have,
and a response's head and body sent in one system call.

uvicorn closes a keep-alive connection that stays idle after a response (`timeout_keep_alive`), but a connection
that sends half a request line or header and stops is kept open for ever, before the application ever sees it.
Here every request's head must be complete within HEADER_TIMEOUT seconds, one more for every READ_MIN_RATE bytes
received, at most HEADER_TIMEOUT_MAX (Apache's RequestReadTimeout header=20-40,MinRate=500); past that the
client gets 408 and the connection is closed. The body's deadline is server.bodies'.

The clock also runs from any byte that arrives between requests (uvicorn's keep-alive timer stops at the first byte,
and bytes that start no request, such as empty lines, start nothing else): a connection that sends anything but a
request is closed within the head deadline too. A response sent before its request's body was read (413, 401, 429,
...) ends the connection as nginx's lingering close does: the rest of the body is read and dropped, and the
connection closed after LINGERING_TIMEOUT_S without a byte or HEADER_TIMEOUT in all (nginx: lingering_timeout 5 s,
lingering_time 30 s), so the client can read its answer and a client that goes on dripping is cut off.

A worker holds at most MAX_CONNECTIONS connections: each request on one opened beyond it is answered 503
`too_many_connections` and the connection closed (uvicorn's own limit_concurrency would refuse every connection's
requests alike, the ones it already holds too, and with a plain-text body).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from starlette.types import Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from server.errors import RETRY_AFTER_S, error_response

TIMED_OUT = b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
LINGERING_TIMEOUT_S = 5  # nginx's lingering_timeout


async def too_many_connections(scope: Scope, receive: Receive, send: Send) -> None:
    """The answer to every request on a connection opened past MAX_CONNECTIONS."""
    message = "this worker holds as many connections as it may; retry, or reuse a connection"
    headers = {"Retry-After": str(RETRY_AFTER_S), "Connection": "close"}
    await error_response(scope, 503, "too_many_connections", message, headers)(scope, receive, send)


class CoalescingTransport:
    """The connection's transport, with the writes made in one turn of the event loop sent in one system call.

    uvicorn writes a response's status line and headers, then its body: two `send` calls for every answer, each
    0.06 ms of CPU on the development machine (cProfile of the event loop under 16 clients). Here they leave
    together at the end of the loop's turn, in the order written. Anything that ends or hands over the connection
    (close, write_eof, set_protocol) sends what is pending first; abort drops it, as the real one does.
    """

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self.transport, self.loop = transport, loop
        self.pending: list[bytes] = []

    def write(self, data: bytes) -> None:
        if not self.pending:
            self.loop.call_soon(self.flush)
        self.pending.append(bytes(data))

    def flush(self) -> None:
        if self.pending:
            data, self.pending = b"".join(self.pending), []
            if not self.transport.is_closing():  # the peer went away in the same turn: nothing to send it
                self.transport.write(data)

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def close(self) -> None:
        self.flush()
        self.transport.close()

    def write_eof(self) -> None:
        self.flush()
        self.transport.write_eof()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.flush()
        self.transport.set_protocol(protocol)

    def abort(self) -> None:
        self.pending = []
        self.transport.abort()

    def get_write_buffer_size(self) -> int:
        return self.transport.get_write_buffer_size() + sum(map(len, self.pending))

    def __getattr__(self, name: str) -> Any:  # is_closing, get_extra_info, pause_reading, ...: the real transport's
        return getattr(self.transport, name)


class HeaderDeadlineProtocol(HttpToolsProtocol):
    """HttpToolsProtocol, plus the clock that runs from a request's first byte (or the connection's opening) to
    the end of its headers."""

    def __init__(
        self, *args: Any, timeout: float, max_timeout: float, min_rate: float, max_connections: int, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.max_connections = max_connections
        self.header_timeout, self.header_timeout_max, self.min_rate = timeout, max_timeout, min_rate
        self.head_started: float | None = None
        self.head_bytes = 0
        self.head_timer: asyncio.TimerHandle | None = None
        self.lingering: tuple[float, asyncio.TimerHandle] | None = None  # (when it must end, the silence timer)

    def start_head_clock(self) -> None:
        if self.head_started is None:
            self.head_started, self.head_bytes = time.monotonic(), 0
            self.head_timer = self.loop.call_later(self.header_timeout, self.check_head)

    def stop_head_clock(self) -> None:
        self.head_started = None
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None

    def check_head(self) -> None:
        """The head's deadline came: extend it for the bytes received, or answer 408 and close."""
        if self.head_started is None:
            return
        allowed = min(self.header_timeout + self.head_bytes / self.min_rate, self.header_timeout_max)
        remaining = self.head_started + allowed - time.monotonic()
        if remaining > 0:
            self.head_timer = self.loop.call_later(remaining, self.check_head)
            return
        self.stop_head_clock()
        if not self.transport.is_closing():
            self.transport.write(TIMED_OUT)
            self.transport.close()

    def between_requests(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def linger(self) -> None:
        """The answer went before its request's body: read and drop the rest a while, then close."""
        self.stop_head_clock()
        if self.transport.can_write_eof():
            self.transport.write_eof()  # the answer is all there is: the client sees it end
        self.lingering = (time.monotonic() + self.header_timeout, self.loop.call_later(LINGERING_TIMEOUT_S, self.close))

    def close(self) -> None:
        if self.lingering is not None:
            self.lingering[1].cancel()
        if not self.transport.is_closing():
            self.transport.close()

    # uvicorn's protocol interface
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(CoalescingTransport(transport, self.loop))  # type: ignore[arg-type]
        if len(self.connections) > self.max_connections:  # this one included: it is past the limit
            self.app = too_many_connections
        self.start_head_clock()

    def data_received(self, data: bytes) -> None:
        if self.lingering is not None:  # the rest of a refused body: dropped
            ends, silence = self.lingering
            silence.cancel()
            remaining = min(ends - time.monotonic(), LINGERING_TIMEOUT_S)
            self.lingering = (ends, self.loop.call_later(max(0, remaining), self.close))
            return
        if self.between_requests():
            self.start_head_clock()  # whatever these bytes are, a request's head must be complete in time
        if self.head_started is not None:
            self.head_bytes += len(data)
        super().data_received(data)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.cycle is not None and self.cycle.more_body and not self.transport.is_closing():
            self._unset_keepalive_if_required()
            self.linger()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.start_head_clock()  # the next request on a kept-alive connection

    def on_headers_complete(self) -> None:
        self.stop_head_clock()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self.stop_head_clock()
        if self.lingering is not None:
            self.lingering[1].cancel()
        super().connection_lost(exc)

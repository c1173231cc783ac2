"""uvicorn's HTTP/1.1 protocol with a deadline for each request's line and headers, which uvicorn does not have.

uvicorn closes a keep-alive connection that stays idle after a response (`timeout_keep_alive`), but a connection
that sends half a request line or header and stops is kept open for ever, before the application ever sees it.
Here every request's head must be complete within HEADER_TIMEOUT seconds, one more for every READ_MIN_RATE bytes
received, at most HEADER_TIMEOUT_MAX (Apache's RequestReadTimeout header=20-40,MinRate=500); past that the
client gets 408 and the connection is closed. The body's deadline is server.bodies'.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

TIMED_OUT = b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"


class HeaderDeadlineProtocol(HttpToolsProtocol):
    """HttpToolsProtocol, plus the clock that runs from a request's first byte (or the connection's opening) to
    the end of its headers."""

    def __init__(self, *args: Any, timeout: float, max_timeout: float, min_rate: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.header_timeout, self.header_timeout_max, self.min_rate = timeout, max_timeout, min_rate
        self.head_started: float | None = None
        self.head_bytes = 0
        self.head_timer: asyncio.TimerHandle | None = None

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

    # uvicorn's protocol interface
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.start_head_clock()

    def data_received(self, data: bytes) -> None:
        if self.head_started is not None:
            self.head_bytes += len(data)
        super().data_received(data)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.start_head_clock()  # the next request on a kept-alive connection

    def on_headers_complete(self) -> None:
        self.stop_head_clock()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self.stop_head_clock()
        super().connection_lost(exc)

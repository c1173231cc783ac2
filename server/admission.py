"""Backpressure: a bounded number of inference requests per process, refused at once past the bound.

A request is admitted before its body is read: every admitted request may hold a body of up to MAX_UPLOAD_BYTES
(twice over while a multipart part spools to /tmp), so counting after the read would leave the memory held by
bodies unbounded. `slots` requests run (INFERENCE_CONCURRENCY) and up to `queue` more wait for a slot (MAX_QUEUE);
one more is answered 503 with Retry-After without its body being kept, as is one whose body (its Content-Length, or
MAX_UPLOAD_BYTES when it has none) would take the admitted requests' bodies past MAX_ADMITTED_BYTES (a lone request
is always admitted). A request that waits for a slot longer than `timeout` seconds (QUEUE_TIMEOUT) is answered 503 too.
See docs/capacity.md, "Backpressure" and "Memory budget".
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TypeVar

import anyio
import anyio.to_thread
from starlette.requests import ClientDisconnect, Request
from starlette.types import Scope

from server.errors import Overloaded
from server.metrics import Metrics

T = TypeVar("T")


class Admission:
    """Admits at most `slots + queue` inference requests; runs their inference `slots` at a time, in FIFO order."""

    def __init__(self, slots: int, queue: int, timeout: float, metrics: Metrics, max_bytes: int = 2**62) -> None:
        self.slots, self.queue, self.timeout, self.metrics = slots, queue, timeout, metrics
        self.capacity = slots + queue
        self.max_bytes = max_bytes  # the bodies admitted requests may hold, in all
        self.admitted = 0
        self.held_bytes = 0
        self.limiter = anyio.CapacityLimiter(slots)  # the inference slots, waited for in arrival order
        self.threads = anyio.CapacityLimiter(slots)  # worker threads: always free for a slot holder

    def enter(self, size: int = 0) -> None:
        """Count one more admitted request that may hold `size` body bytes, or raise Overloaded past a bound."""
        if self.admitted >= self.capacity or (self.admitted and self.held_bytes + size > self.max_bytes):
            self.metrics.rejected.labels("overloaded").inc()
            raise Overloaded(
                "overloaded",
                f"the service is at capacity ({self.slots} running, {self.queue} waiting); retry shortly",
            )
        self.admitted += 1
        self.held_bytes += size
        self.metrics.admitted.set(self.admitted)

    def leave(self, size: int = 0) -> None:
        self.admitted -= 1
        self.held_bytes -= size
        self.metrics.admitted.set(self.admitted)

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        """fn(*args) in a worker thread once an inference slot is free; Overloaded after waiting `timeout` s."""
        self.metrics.queued.inc()
        acquired = False
        try:
            with anyio.move_on_after(self.timeout):
                await self.limiter.acquire()
                acquired = True
        finally:
            self.metrics.queued.dec()
        if not acquired:
            self.metrics.rejected.labels("queue_timeout").inc()
            raise Overloaded("queue_timeout", f"no inference slot became free within {self.timeout:g} s; retry")
        try:
            return await anyio.to_thread.run_sync(fn, *args, limiter=self.threads)
        finally:
            self.limiter.release()


async def admit(request: Request) -> None:
    """Admit the request once (the middleware lets it go when the response is sent); past the bound, discard the
    body it is sending, without keeping it, and raise Overloaded, so the client reads a clean 503."""
    state = request.scope.setdefault("state", {})
    if state.get("admission") is not None:
        return
    admission: Admission = request.app.state.admission
    limit = request.app.state.settings.max_upload_bytes
    declared = request.headers.get("content-length", "")
    size = min(int(declared), limit) if declared.isdigit() else limit  # a chunked body may grow to the limit
    try:
        admission.enter(size)
    except Overloaded:
        with anyio.move_on_after(1.0), contextlib.suppress(ClientDisconnect):
            received = 0
            async for chunk in request.stream():
                received += len(chunk)
                if received > limit:
                    break
        raise
    state["admission"] = (admission, size)


def release(scope: Scope) -> None:
    """Let the request's admission go, if it was admitted (server.middleware, once the response is sent)."""
    admitted = scope.get("state", {}).pop("admission", None)
    if admitted is not None:
        admission, size = admitted
        admission.leave(size)

"""Backpressure: what requests really hold, bounded, and refused at once past the bound.

Two budgets, each counting what is held, never what a header declares:
- bytes of request bodies received and still held (being received, waiting or running), at most `max_bytes`
  (MAX_ADMITTED_BYTES); the chunk that would pass it ends its request with 503 `overloaded`, unless that request is
  the only one holding bytes (so the largest legal upload works on an idle service);
- inference requests admitted once their body is complete: `slots` running (INFERENCE_CONCURRENCY) and `queue`
  waiting for a slot (MAX_QUEUE); one more is 503 `overloaded`, and one that waits `timeout` seconds for a slot
  (QUEUE_TIMEOUT) is 503 `queue_timeout`.
A request still receiving its body holds no inference place, so slow uploads cannot starve the requests whose body
has arrived; how long a body may take is bounded in server.bodies. See docs/capacity.md.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

from starlette.requests import ClientDisconnect, Request
from starlette.types import Scope

from server.errors import Overloaded
from server.metrics import Metrics

T = TypeVar("T")
DISCARD_SECONDS = 1.0  # how long a refused request's body is read and dropped, so the client reads a clean 503


class Admission:
    """The two budgets of one process, and the inference slots, taken in arrival order."""

    def __init__(self, slots: int, queue: int, timeout: float, metrics: Metrics, max_bytes: int = 2**62) -> None:
        self.slots, self.queue, self.timeout, self.metrics = slots, queue, timeout, metrics
        self.capacity = slots + queue
        self.max_bytes = max_bytes
        self.admitted = 0  # inference requests running or waiting for a slot
        self.held_bytes = 0  # body bytes received and not yet let go
        self.holders = 0  # requests holding any body bytes
        # the inference slots: asyncio's Semaphore hands a freed slot to the first waiter (no barging), so they are
        # taken in arrival order, at a third of the CPU of anyio's CapacityLimiter under a cancel scope
        self.free_slots = asyncio.Semaphore(slots)
        self.waiting = 0  # requests waiting for a slot
        # One thread per slot, for inference only: a slot holder always finds its thread free, and what other
        # routes run in threads (feedback's store) cannot take it.
        self.executor = ThreadPoolExecutor(slots, thread_name_prefix="inference")
        # read when /metrics is scraped, not set at every change (two fewer locked updates a request)
        metrics.admitted.set_function(lambda: self.admitted)
        metrics.held_bytes.set_function(lambda: self.held_bytes)
        metrics.queued.set_function(lambda: self.waiting)

    def close(self) -> None:
        self.executor.shutdown(wait=False)

    def overloaded(self) -> Overloaded:
        self.metrics.rejected.labels("overloaded").inc()
        return Overloaded(
            "overloaded", f"the service is at capacity ({self.slots} running, {self.queue} waiting); retry"
        )

    def full(self, declared: int = 0) -> bool:
        """Whether a request that declares a `declared`-byte body would be refused now: every inference place taken,
        or its body past the bytes the others hold (a lone request always fits)."""
        return self.admitted >= self.capacity or (self.holders > 0 and self.held_bytes + declared > self.max_bytes)

    def hold(self, scope: Scope, size: int) -> None:
        """Count `size` more body bytes held by the request, or raise Overloaded past max_bytes."""
        state = scope.setdefault("state", {})
        held = state.get("held_bytes", 0)
        alone = self.holders == (1 if held else 0)
        if not alone and self.held_bytes + size > self.max_bytes:
            raise self.overloaded()
        self.holders += 0 if held else 1
        self.held_bytes += size
        state["held_bytes"] = held + size

    def enter(self, scope: Scope) -> None:
        """Admit the request for inference (once), or raise Overloaded when every place is taken."""
        state = scope.setdefault("state", {})
        if state.get("admitted"):
            return
        if self.admitted >= self.capacity:
            raise self.overloaded()
        self.admitted += 1
        state["admitted"] = True

    def release(self, scope: Scope) -> None:
        """Let go of all the request holds (the middleware, once the response is sent or the request ended)."""
        state = scope.get("state", {})
        if state.pop("admitted", False):
            self.admitted -= 1
        held = state.pop("held_bytes", 0)
        if held:
            self.held_bytes -= held
            self.holders -= 1

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        """fn(*args) in an inference thread once a slot is free; Overloaded after waiting `timeout` s."""
        if self.free_slots.locked():
            await self.wait_for_slot()
        else:
            await self.free_slots.acquire()  # a free slot and nobody before us: no wait, no timer
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[T] = loop.create_future()

        def settle(done: Future[T]) -> None:  # on the event loop, once the thread is done
            self.free_slots.release()  # even if this request was cancelled while it ran
            if answer.cancelled():
                return
            if done.cancelled():  # nothing cancels it today (a slot always finds its thread free); if something
                answer.cancel()  # ever does, the caller sees a cancellation instead of waiting for ever
                return
            error = done.exception()
            if error is None:
                answer.set_result(done.result())
            else:
                answer.set_exception(error)

        def hand_back(done: Future[T]) -> None:  # in the inference thread
            with contextlib.suppress(RuntimeError):  # the loop closed (shutdown): nobody waits for the answer
                loop.call_soon_threadsafe(settle, done)

        # One thread future and one loop future, joined by one callback: run_in_executor's wrap_future chains
        # them both ways and needs a shield besides, three more futures and their callbacks on every request.
        try:
            running = self.executor.submit(fn, *args)
        except BaseException:  # the executor is shut down: nothing will run, so nothing else frees the slot
            self.free_slots.release()
            raise
        running.add_done_callback(hand_back)  # settle frees the slot from here on, however this request ends
        return await answer

    async def wait_for_slot(self) -> None:
        """Wait in arrival order for an inference slot; Overloaded after `timeout` seconds."""
        self.waiting += 1
        try:
            async with asyncio.timeout(self.timeout):
                await self.free_slots.acquire()
        except TimeoutError:
            self.metrics.rejected.labels("queue_timeout").inc()
            message = f"no inference slot became free within {self.timeout:g} s; retry"
            raise Overloaded("queue_timeout", message) from None
        finally:
            self.waiting -= 1


async def refuse_early(request: Request) -> None:
    """Before any of its body is read: 503 at once when every inference place is taken, or when the body it
    declares would not fit beside what the others hold (a check, not a reservation: the bytes are counted as they
    arrive). The body the client is sending is read for at most DISCARD_SECONDS and dropped, so the client reads a
    clean 503, not a reset."""
    admission: Admission = request.app.state.admission
    limit = request.app.state.settings.max_upload_bytes
    declared = request.headers.get("content-length", "")
    if not admission.full(min(int(declared), limit) if declared.isascii() and declared.isdigit() else 0):
        return
    error = admission.overloaded()
    with contextlib.suppress(TimeoutError, ClientDisconnect):
        async with asyncio.timeout(DISCARD_SECONDS):
            received = 0
            async for chunk in request.stream():
                received += len(chunk)
                if received > limit:
                    break
    raise error

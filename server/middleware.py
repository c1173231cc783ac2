"""Around every HTTP request: its id, its admission released, its metrics and its log line."""

from __future__ import annotations

import os
import re
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.admission import Admission
from server.errors import note_error
from server.logs import get_logger
from server.metrics import Metrics

REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
UNLOGGED = frozenset({"/metrics", "/health"})  # scraped and probed every few seconds: counted, not logged


class RequestMiddleware:
    """Request id (X-Request-ID in when it is safe, else generated; echoed out), the HTTP metrics, and one
    structured log line per request except the scrapes and probes in UNLOGGED."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics, self.logger = app, metrics, get_logger()
        self.in_flight = 0
        # each (method, route, status)'s two metric children, looked up once: routes are the app's (or "unmatched")
        # and statuses a few dozen, so this stays small whatever clients send
        self.children: dict[tuple[str, str, int], tuple[Any, Any]] = {}
        metrics.in_flight.set_function(lambda: self.in_flight)  # read at each scrape

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = next((value for name, value in scope["headers"] if name == b"x-request-id"), b"").decode("latin-1")
        request_id = incoming if REQUEST_ID.match(incoming) else os.urandom(16).hex()  # uuid4's bits, no UUID object
        started = time.perf_counter()
        state = scope.setdefault("state", {})
        state.update(request_id=request_id, started=started)
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        self.in_flight += 1
        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            note_error(scope, "internal_error")
            raise
        finally:
            self.in_flight -= 1
            admission: Admission | None = getattr(scope["app"].state, "admission", None)
            if admission is not None:  # None only before the lifespan has started
                admission.release(scope)
            elapsed = time.perf_counter() - started
            endpoint = getattr(scope.get("route"), "path", "unmatched")
            counted = (scope["method"], endpoint, status)
            if counted not in self.children:  # prometheus_client's labels() checks and locks on every call
                self.children[counted] = (self.metrics.requests.labels(scope["method"], endpoint, str(status)),
                                          self.metrics.request_latency.labels(endpoint))  # fmt: skip
            requests, latency = self.children[counted]
            requests.inc()
            latency.observe(elapsed)
            if endpoint not in UNLOGGED:
                self.logger.info(
                    "request",
                    extra={"request_id": request_id, "method": scope["method"], "path": scope["path"],
                           "status": status, "latency_ms": round(elapsed * 1000, 3),
                           **({"caller": state["caller"]} if "caller" in state else {}), **state.get("log", {})},
                )  # fmt: skip

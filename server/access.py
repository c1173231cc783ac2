"""Who may do what: the request's identity (a Bearer key of API_KEYS_FILE, or anonymous), the scope a route needs,
and the rate limits (a token bucket per key, and per client address for anonymous clients).

The client address is the one uvicorn puts in the ASGI scope: behind a proxy, the forwarded address, but only when
the proxy is one uvicorn trusts (FORWARDED_ALLOW_IPS, uvicorn's own setting); a client cannot pick its bucket by
sending X-Forwarded-For itself. Refusals follow RFC 6750: 401 with `WWW-Authenticate: Bearer error="invalid_token"`
for a key that was sent and is wrong or revoked; 401 with the bare `Bearer realm="catsdogs"` challenge (no error
code, as section 3.1 asks) for a request with no usable credentials: no key where one is required, another scheme
than Bearer, or an empty one; 403 `insufficient_scope` for a key without the scope, and 429 with Retry-After past a
limit. A key is never logged: only its name, once it is known.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict

from starlette.requests import Request

from server.errors import ClientError
from server.keys import NOBODY, Identity, KeyRing

MAX_BUCKETS = 100_000  # clients tracked at once; the least recently seen is forgotten past it (a full bucket again)


def challenge(error: str | None, description: str = "", scope: str | None = None) -> dict[str, str]:
    """RFC 6750's Bearer challenge; `error` None for a request that sent no usable credentials (no error code)."""
    value = 'Bearer realm="catsdogs"'
    if error:
        value += f', error="{error}", error_description="{description}"'
    return {"WWW-Authenticate": value + (f', scope="{scope}"' if scope else "")}


def identify(request: Request) -> Identity:
    """The request's identity: NOBODY without an Authorization header; 401 for one that names no key here."""
    header = request.headers.get("authorization")
    if header is None:
        return NOBODY
    scheme, _, key = header.partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key:
        # another scheme, or Bearer without a key: no usable credentials, so no error code (RFC 6750 section 3.1)
        raise ClientError(401, "invalid_key", "send 'Authorization: Bearer <key>'", challenge(None))
    keys: KeyRing | None = request.app.state.keys
    identity = keys.identify(key) if keys is not None else None
    if identity is None:
        raise ClientError(401, "invalid_key", "the key is not valid here (wrong or revoked)",
                          challenge("invalid_token", "wrong or revoked key"))  # fmt: skip
    request.scope["state"]["caller"] = identity.name  # logged with the request: the name, never the key
    return identity


def require(request: Request, scope: str) -> Identity:
    """The request's identity, which must hold `scope`: 401 without a key, 403 with a key that lacks it."""
    identity = identify(request)
    if identity.anonymous:
        raise ClientError(401, "key_required", f"this route needs a key with the '{scope}' scope",
                          challenge(None, scope=scope))  # fmt: skip
    if scope not in identity.scopes:
        raise ClientError(403, "insufficient_scope", f"the key '{identity.name}' lacks the '{scope}' scope",
                          challenge("insufficient_scope", "the key lacks the scope", scope))  # fmt: skip
    return identity


def check_predict(request: Request) -> None:
    """Before a predicting route reads its body: the `predict` scope when PREDICT_REQUIRES_KEY=true (a key sent
    anyway is checked: 401 when wrong), then the caller's PREDICT_RATE bucket."""
    settings = request.app.state.settings
    if settings.predict_requires_key:
        identity = require(request, "predict")
    else:
        identity = identify(request) if "authorization" in request.headers else NOBODY
    if settings.predict_rate > 0:
        limit(request, request.app.state.limits["predict"], identity, "predict")


def client_address(request: Request) -> str:
    return request.client.host if request.client else "unknown"


class RateLimiter:
    """A token bucket per client: `rate` requests a second on average, `burst` at once; rate 0 is no limit."""

    def __init__(self, rate: float, burst: int, max_buckets: int = MAX_BUCKETS) -> None:
        self.rate, self.burst, self.max_buckets = rate, max(1, burst), max_buckets
        self.buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # client -> (tokens, when)

    def wait(self, client: str, now: float | None = None) -> float:
        """0 when `client` may go now (a token is taken), else the seconds until it may."""
        if self.rate <= 0:
            return 0.0
        now = time.monotonic() if now is None else now
        tokens, then = self.buckets.pop(client, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - then) * self.rate)
        waited = 0.0 if tokens >= 1 else (1 - tokens) / self.rate
        self.buckets[client] = (tokens - 1 if waited == 0 else tokens, now)
        if len(self.buckets) > self.max_buckets:
            self.buckets.popitem(last=False)
        return waited


def limit(request: Request, limiter: RateLimiter, identity: Identity, route: str) -> None:
    """429 with Retry-After when the identity's bucket (its key, or its address when anonymous) is empty."""
    source = f"address:{client_address(request)}" if identity.anonymous else f"key:{identity.name}"
    waited = limiter.wait(source)
    if waited:
        request.app.state.metrics.rate_limited.labels(route, "anonymous" if identity.anonymous else "key").inc()
        raise ClientError(429, "rate_limited", f"too many requests; retry in {math.ceil(waited)} s",
                          {"Retry-After": str(math.ceil(waited))})  # fmt: skip

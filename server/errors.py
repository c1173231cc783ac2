"""What a refused request gets: the error classes, and the one mapping from an error to its response and log code.

The service's own API answers `{"error": {"code", "message"}}`; the Open Inference Protocol's routes (`/v2...`)
answer `{"error": "message"}`, as that protocol asks. Either way the code goes into the request's log line.
"""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import Scope

from imaging import ImageError
from server.logs import get_logger

RETRY_AFTER_S = 1
CLIENT_CLOSED = 499  # nginx's status for a request the client abandoned
HTTP_CODES = {404: "not_found", 405: "method_not_allowed"}
V2_PREFIX = "/v2"


class ClientError(Exception):
    """A request the service refuses: an HTTP status, a stable code and a message saying what to change."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


class Overloaded(ClientError):
    """No room for the request now: 503 with Retry-After; `code` says which bound (overloaded, queue_timeout)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(503, code, message, {"Retry-After": str(RETRY_AFTER_S)})


class BodyTimeout(ClientError):
    """The body did not arrive in time (server.bodies): 408, and the connection is closed, as Apache does."""

    def __init__(self, message: str) -> None:
        super().__init__(408, "body_timeout", message, {"Connection": "close"})


class ClientClosed(ClientError):
    """The client hung up before its request was complete: no one reads the answer. Logged and counted with
    nginx's 499, never as a server error."""

    def __init__(self) -> None:
        super().__init__(CLIENT_CLOSED, "client_closed", "the client closed the connection before the request ended")


def note_error(scope: Scope, code: str) -> None:
    """Put the error's code on the request's log line (server.middleware writes it)."""
    scope.setdefault("state", {}).setdefault("log", {})["error_code"] = code


def is_v2(scope: Scope) -> bool:
    """Whether the request matched an Open Inference Protocol route (its errors take that protocol's shape)."""
    path = getattr(scope.get("route"), "path", "")
    return path == V2_PREFIX or path.startswith(f"{V2_PREFIX}/")


def error_response(
    scope: Scope, status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> Response:
    note_error(scope, code)
    body: object = {"error": message} if is_v2(scope) else {"error": {"code": code, "message": message}}
    return JSONResponse(body, status_code=status, headers=headers)


async def refused(request: Request, exc: Exception) -> Response:
    """The exception handler for every error a client can cause (ClientError, ImageError, HTTPException)."""
    if isinstance(exc, HTTPException):
        code = HTTP_CODES.get(exc.status_code, "http_error")
        return error_response(request.scope, exc.status_code, code, str(exc.detail), exc.headers)
    assert isinstance(exc, ClientError | ImageError), exc
    headers = exc.headers if isinstance(exc, ClientError) else None
    return error_response(request.scope, exc.status, exc.code, exc.message, headers)


async def failed(request: Request, exc: Exception) -> Response:
    """Any other exception: a bug. Starlette sends this outside the middleware stack, so it adds the request id."""
    request_id = request.scope.get("state", {}).get("request_id")
    get_logger().exception("unhandled error", extra={"request_id": request_id})
    headers = {"X-Request-ID": request_id} if request_id else None
    return error_response(request.scope, 500, "internal_error", "the service failed to handle the request", headers)

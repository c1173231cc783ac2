"""POST /feedback: the true label of a recent prediction, joined to it through the prediction store."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from typing import Any, TypeVar

import anyio.to_thread
from starlette.requests import Request
from starlette.responses import JSONResponse

from server.bodies import media_type, read_body
from server.errors import RETRY_AFTER_S, ClientError
from server.inference import require_model
from server.observer import Observer

MAX_FEEDBACK_BYTES = 4096
T = TypeVar("T")
EXAMPLE = '{"request_id": "...", "label": "..."}'


def parse_feedback(body: bytes) -> tuple[str, str]:
    """(request_id, label) from a JSON body, or ValueError saying what is wrong."""
    try:
        payload: Any = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise ValueError("the body is not valid JSON") from None
    if not isinstance(payload, dict):
        raise ValueError(f"send a JSON object: {EXAMPLE}")
    request_id, label = payload.get("request_id"), payload.get("label")
    if not isinstance(request_id, str) or not request_id:
        raise ValueError("'request_id' must be a non-empty string (the X-Request-ID of the prediction)")
    if not isinstance(label, str):
        raise ValueError("'label' must be a string")
    return request_id, label


async def store_call(fn: Callable[..., T], *args: object) -> T:
    """A call to the prediction store, off the event loop; a store that fails (a locked or full database) is a 503
    the client may retry, never a 500."""
    try:
        return await anyio.to_thread.run_sync(fn, *args)
    except (OSError, sqlite3.Error) as error:
        raise ClientError(503, "store_unavailable", f"the prediction store failed: {error}; retry",
                          {"Retry-After": str(RETRY_AFTER_S)}) from None  # fmt: skip


async def feedback(request: Request) -> JSONResponse:
    """POST /feedback {"request_id", "label"}: the true label of a recent prediction."""
    model = require_model(request)
    if media_type(request.headers) != "application/json":
        raise ClientError(415, "unsupported_media_type", f"send application/json: {EXAMPLE}")
    try:
        request_id, label = parse_feedback(await read_body(request, MAX_FEEDBACK_BYTES))
    except ValueError as error:
        raise ClientError(400, "invalid_feedback", str(error)) from None
    if label not in model.labels:
        raise ClientError(422, "unknown_label", f"{label!r} is not a label of the model: {', '.join(model.labels)}")
    observer: Observer = request.app.state.observer
    record = await store_call(observer.find, request_id)
    if record is None:
        raise ClientError(404, "unknown_request_id", f"no recent prediction has request id {request_id!r}")
    if record.feedback not in (None, label):
        raise ClientError(409, "feedback_conflict", f"this prediction already has the feedback {record.feedback!r}")
    correct = label == record.label
    if record.feedback is None:  # a repeat of the same answer is accepted and counted once
        await store_call(observer.record_feedback, record, label, correct)
    request.scope["state"]["log"] = {"feedback": label, "correct": correct}
    return JSONResponse(
        {"request_id": request_id, "label": label, "predicted": record.label, "correct": correct,
         "model_version": record.model_version},
    )  # fmt: skip

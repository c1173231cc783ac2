"""POST /feedback: the true label of a recent prediction, joined to it by the id the server issued."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse

from server.access import challenge, identify, limit
from server.bodies import media_type, read_body
from server.errors import RETRY_AFTER_S, ClientError
from server.inference import require_model
from server.logs import get_logger
from server.observer import Observer, issued_at
from server.store import STORE_ERRORS, Feedback, PredictionRecord

MAX_FEEDBACK_BYTES = 4096
FULL_RETRY_AFTER_S = 300  # a store at its bound of labels waiting for harvest: until someone runs make harvest
IN_FLIGHT_S = 30  # an id issued this recently and not found may still be in another replica's queue
MAX_ID_CHARS = 128
EXAMPLE = '{"prediction_id": "...", "label": "..."}'


def parse_feedback(body: bytes) -> tuple[str, str]:
    """(prediction_id, label) from a JSON body, or ValueError saying what is wrong."""
    try:
        payload: Any = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise ValueError("the body is not valid JSON") from None
    if not isinstance(payload, dict):
        raise ValueError(f"send a JSON object: {EXAMPLE}")
    prediction_id, label = payload.get("prediction_id"), payload.get("label")
    if not isinstance(prediction_id, str) or not 0 < len(prediction_id) <= MAX_ID_CHARS:
        raise ValueError("'prediction_id' must be the prediction's own prediction_id (a string of 1 to 128 characters)")
    if not isinstance(label, str):
        raise ValueError("'label' must be a string")
    return prediction_id, label


async def give_feedback(
    request: Request, prediction_id: str, label: str, source: str
) -> tuple[Feedback, PredictionRecord | None]:
    """Observer.give_feedback on the store's own threads (never the pool V2's parsing uses), answered within
    STORE_TIMEOUT seconds whatever the database does: a store that fails or hangs (a locked or full database, a
    database server down or not answering) is a 503 the client may retry, never a 500 and never a hang. A call
    still waiting for a thread at its deadline never starts; one running is bounded by the store's own deadlines."""
    observer: Observer = request.app.state.observer
    timeout = request.app.state.settings.store_timeout
    deadline = time.monotonic() + timeout

    def call() -> tuple[Feedback, PredictionRecord | None]:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        return observer.give_feedback(prediction_id, label, source, timeout=min(5, remaining))

    try:
        async with asyncio.timeout(timeout):
            return await asyncio.get_running_loop().run_in_executor(observer.calls, call)
    except (*STORE_ERRORS, TimeoutError) as error:  # the detail (a path, a host, SQL) is for the log, not the client
        reason = f"no answer within {timeout} s" if isinstance(error, TimeoutError) else type(error).__name__
        get_logger().warning("the prediction store failed", extra={"error": f"{reason}: {error}"})
        raise ClientError(503, "store_unavailable", "the prediction store is unavailable; retry",
                          {"Retry-After": str(RETRY_AFTER_S)}) from None  # fmt: skip


async def feedback(request: Request) -> JSONResponse:
    """POST /feedback {"prediction_id", "label"}: the true label of a recent prediction."""
    model = require_model(request)
    identity = identify(request)  # anonymous, or a key: 401 when wrong or revoked
    if not identity.anonymous and "label" not in identity.scopes:
        raise ClientError(403, "insufficient_scope", f"the key '{identity.name}' lacks the 'label' scope",
                          challenge("insufficient_scope", "the key lacks the scope", "label"))  # fmt: skip
    if media_type(request.headers) != "application/json":
        raise ClientError(415, "unsupported_media_type", f"send application/json: {EXAMPLE}")
    try:
        prediction_id, label = parse_feedback(await read_body(request, MAX_FEEDBACK_BYTES))
    except ValueError as error:
        raise ClientError(400, "invalid_feedback", str(error)) from None
    if label not in model.labels:
        raise ClientError(422, "unknown_label", f"{label!r} is not a label of the model: {', '.join(model.labels)}")
    limits = request.app.state.limits  # a well-formed label, before it reaches the store
    limit(request, limits["feedback"] if identity.anonymous else limits["feedback_key"], identity, "feedback")
    observer: Observer = request.app.state.observer
    outcome, record = await give_feedback(request, prediction_id, label, identity.name)
    if record is None:
        issued = issued_at(prediction_id)  # on a shared store, another replica may not have written it yet
        if observer.store.shared and issued is not None and 0 <= time.time() - issued < IN_FLIGHT_S:
            raise ClientError(503, "prediction_not_recorded_yet", "this prediction is not recorded yet; retry",
                              {"Retry-After": "1"})  # fmt: skip
        raise ClientError(404, "unknown_prediction_id", f"no recent prediction has prediction_id {prediction_id!r}")
    if outcome is Feedback.FULL:  # never evict a label acknowledged before: refuse this one, visibly
        raise ClientError(503, "label_store_full", "the service holds as many labels waiting for harvest as it may "
                          "keep; retry later", {"Retry-After": str(FULL_RETRY_AFTER_S)})  # fmt: skip
    if outcome is Feedback.CONFLICT:
        raise ClientError(409, "feedback_conflict", f"this prediction already has the feedback {record.feedback!r}")
    correct = label == record.label
    request.scope["state"]["log"] = {"feedback": label, "correct": correct, "prediction_id": prediction_id,
                                     "source": identity.name}  # fmt: skip
    return JSONResponse(
        {"prediction_id": prediction_id, "label": label, "predicted": record.label, "correct": correct,
         "model_version": record.model_version, "source": identity.name},
    )  # fmt: skip

"""The service's own endpoints: health, readiness, the model, predictions, metrics and the OpenAPI document."""

from __future__ import annotations

import socket
import time
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from server.access import check_predict
from server.bodies import read_uploads
from server.errors import ClientError
from server.inference import predict_images, require_model
from server.metrics import Metrics
from server.model import Model, Prediction
from server.observer import observe
from server.openapi import document


def prediction_body(prediction: Prediction, model: Model, started: float, prediction_id: str | None) -> dict[str, Any]:
    return {
        "prediction_id": prediction_id,  # what POST /feedback takes
        "label": prediction.label,
        "probabilities": prediction.probabilities,
        "is_pet": prediction.is_pet,
        "pet_score": prediction.pet_score,
        "model_version": model.version,
        "latency_ms": round((time.perf_counter() - started) * 1000, 3),
    }


# Which container (or host) answered: Docker's host name is the container's id, so a blue/green switch proves at the
# public port that the candidate container answers, not merely one with the same model (deploy/host/bluegreen.sh).
INSTANCE = socket.gethostname()


async def health(request: Request) -> JSONResponse:
    return JSONResponse({"status": "ok", "model_loaded": request.app.state.model is not None})


async def ready(request: Request) -> JSONResponse:
    model = require_model(request)
    store_error = request.app.state.observer.store.error
    if store_error:  # every prediction's record and every feedback would be lost: not ready
        raise ClientError(503, "store_unusable", f"the feedback store cannot be used: {store_error}")
    return JSONResponse(
        {"status": "ready", "model_version": model.version, "precision": model.precision, "model_sha256": model.sha256,
         "instance": INSTANCE}
    )  # fmt: skip


async def model_info(request: Request) -> JSONResponse:
    return JSONResponse(require_model(request).describe())


async def predict(request: Request) -> JSONResponse:
    started = request.scope["state"]["started"]
    model = require_model(request)
    check_predict(request)
    [(name, data)] = await read_uploads(request, "file", max_files=1)
    [result] = await predict_images(request, [data])
    if not isinstance(result, Prediction):
        raise result
    [prediction_id] = observe(request, [(name, data)], [result])
    request.scope["state"]["log"] = {"label": result.label, "confidence": round(result.confidence, 4)}
    return JSONResponse(prediction_body(result, model, started, prediction_id))


async def predict_batch(request: Request) -> JSONResponse:
    started = request.scope["state"]["started"]
    model = require_model(request)
    check_predict(request)
    uploads = await read_uploads(request, "files", max_files=request.app.state.settings.max_batch_files)
    results = await predict_images(request, [data for _, data in uploads])
    ids = observe(request, uploads, results)
    items: list[dict[str, Any]] = []
    for (filename, _), result, prediction_id in zip(uploads, results, ids, strict=True):
        if isinstance(result, Prediction):
            items.append({"file": filename, **prediction_body(result, model, started, prediction_id)})
        else:
            items.append({"file": filename, "error": {"code": result.code, "message": result.message}})
    errors = sum("error" in item for item in items)
    request.scope["state"]["log"] = {"files": len(items), "errors": errors}
    return JSONResponse({"results": items, "model_version": model.version, "count": len(items), "errors": errors})


async def metrics(request: Request) -> Response:
    registry: Metrics = request.app.state.metrics
    return Response(registry.render(), media_type=registry.content_type)


async def openapi(request: Request) -> JSONResponse:
    model: Model | None = request.app.state.model
    labels, version = (model.labels, model.version) if model else (None, None)
    return JSONResponse(document(request.app.state.settings, labels, version))

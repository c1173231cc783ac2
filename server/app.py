"""The HTTP service: routes, lifespan (model load and warm-up), request logging, metrics and JSON errors."""

from __future__ import annotations

import math
import re
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from imaging import limit_pillow
from server import page
from server.admission import RETRY_AFTER_S, Admission, Overloaded, admit
from server.config import Settings
from server.feedback import feedback
from server.logs import get_logger
from server.metrics import Metrics
from server.model import Model, ModelError, Prediction
from server.observe import Observer, observe
from server.openapi import document
from server.preprocess import ImageError

REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class ClientError(Exception):
    """A request the service refuses; becomes {"error": {"code", "message"}} with the status."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


# --- request body -------------------------------------------------------------------------------------------------


async def limited_stream(request: Request, limit: int) -> AsyncGenerator[bytes, None]:
    """The raw body, refused with 413 as soon as it grows past the limit (nothing beyond it is buffered)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ClientError(413, "payload_too_large", f"the body is {declared} bytes; the limit is {limit}")
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > limit:
            raise ClientError(413, "payload_too_large", f"the body exceeds the {limit} byte limit")
        yield chunk


class TooManyFiles(Exception):
    """More file parts than the request may carry."""


class UploadParser(MultiPartParser):
    """Starlette's multipart parser that counts the file parts itself and stops at the first one too many."""

    def __init__(self, *args: Any, file_limit: int, **kwargs: Any) -> None:
        super().__init__(*args, max_files=math.inf, **kwargs)
        self.file_limit = file_limit

    def on_part_end(self) -> None:
        super().on_part_end()
        if sum(isinstance(value, UploadFile) for _, value in self.items) > self.file_limit:
            raise TooManyFiles


async def read_uploads(request: Request, field: str, max_files: int) -> list[tuple[str, bytes]]:
    """(filename, bytes) of each uploaded image: multipart parts named `field`, or a raw image/* body.
    The request is admitted (server.admission) before any of its body is read."""
    settings: Settings = request.app.state.settings
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    body = limited_stream(request, settings.max_upload_bytes)
    if not content_type.startswith("image/") and content_type != "multipart/form-data":
        raise ClientError(
            415, "unsupported_media_type", f"send multipart/form-data with a '{field}' field, or an image/* body"
        )
    await admit(request)
    if content_type.startswith("image/"):
        return [("body", b"".join([chunk async for chunk in body]))]
    parser = UploadParser(request.headers, body, file_limit=max_files, max_fields=16)
    try:
        form = await parser.parse()
    except TooManyFiles:
        raise ClientError(413, "too_many_files", f"at most {max_files} files per request") from None
    except MultiPartException as error:
        raise ClientError(400, "invalid_multipart", str(error)) from None
    try:
        parts = [part for part in form.getlist(field) if isinstance(part, UploadFile)]
        if not parts:
            raise ClientError(422, "missing_file", f"the form has no file in field '{field}'")
        return [(part.filename or f"{field}[{i}]", await part.read()) for i, part in enumerate(parts)]
    finally:
        await form.close()


# --- inference ----------------------------------------------------------------------------------------------------


def require_model(request: Request) -> Model:
    model: Model | None = request.app.state.model
    if model is None:
        raise ClientError(503, "model_not_loaded", f"no model is loaded: {request.app.state.model_error}")
    return model


def classify(model: Model, metrics: Metrics, images: list[bytes]) -> list[Prediction | ImageError]:
    """Model.classify_all plus the inference metrics. Runs in a worker thread."""
    results, seconds = model.classify_all(images)
    predictions = [r for r in results if isinstance(r, Prediction)]
    for run in seconds:  # one observation per session.run, so a batch does not look like one slow inference
        metrics.inference_latency.observe(run)
    for prediction in predictions:
        metrics.predictions.labels(prediction.label).inc()
        metrics.confidence.observe(prediction.confidence)
        if prediction.is_pet is False:
            metrics.not_a_pet.inc()
    return results


async def run_classify(request: Request, images: list[bytes]) -> list[Prediction | ImageError]:
    """Inference off the event loop, at most `inference_concurrency` at a time so cores are not oversubscribed;
    the request is admitted first (a no-op when read_uploads did), and waits at most QUEUE_TIMEOUT for a slot."""
    model = require_model(request)
    state = request.app.state
    await admit(request)
    return await state.admission.run(classify, model, state.metrics, images)


def prediction_body(prediction: Prediction, model: Model, started: float) -> dict[str, Any]:
    return {
        "label": prediction.label,
        "probabilities": prediction.probabilities,
        "is_pet": prediction.is_pet,
        "pet_score": prediction.pet_score,
        "model_version": model.version,
        "latency_ms": round((time.perf_counter() - started) * 1000, 3),
    }


# --- endpoints ----------------------------------------------------------------------------------------------------


async def health(request: Request) -> JSONResponse:
    return JSONResponse({"status": "ok", "model_loaded": request.app.state.model is not None})


async def ready(request: Request) -> JSONResponse:
    model = require_model(request)
    return JSONResponse(
        {"status": "ready", "model_version": model.version, "precision": model.precision, "model_sha256": model.sha256}
    )


async def model_info(request: Request) -> JSONResponse:
    return JSONResponse(require_model(request).describe())


async def predict(request: Request) -> JSONResponse:
    started = request.scope["state"]["started"]
    model = require_model(request)
    [(name, data)] = await read_uploads(request, "file", max_files=1)
    [result] = await run_classify(request, [data])
    if isinstance(result, ImageError):
        raise ClientError(result.status, result.code, result.message)
    observe(request, [(name, data)], [result])
    request.scope["state"]["log"] = {"label": result.label, "confidence": round(result.confidence, 4)}
    return JSONResponse(prediction_body(result, model, started))


async def predict_batch(request: Request) -> JSONResponse:
    started = request.scope["state"]["started"]
    model = require_model(request)
    limit = request.app.state.settings.max_batch_files
    uploads = await read_uploads(request, "files", max_files=limit)
    results = await run_classify(request, [data for _, data in uploads])
    items: list[dict[str, Any]] = []
    for (filename, _), result in zip(uploads, results, strict=True):
        if isinstance(result, ImageError):
            items.append({"file": filename, "error": {"code": result.code, "message": result.message}})
        else:
            items.append({"file": filename, **prediction_body(result, model, started)})
    observe(request, uploads, results, items)
    errors = sum("error" in item for item in items)
    request.scope["state"]["log"] = {"files": len(items), "errors": errors}
    return JSONResponse({"results": items, "model_version": model.version, "count": len(items), "errors": errors})


async def metrics_endpoint(request: Request) -> Response:
    metrics: Metrics = request.app.state.metrics
    return Response(metrics.render(), media_type=metrics.content_type)


async def openapi_endpoint(request: Request) -> JSONResponse:
    model: Model | None = request.app.state.model
    labels, version = (model.labels, model.version) if model else (None, None)
    return JSONResponse(document(request.app.state.settings, labels, version))


# --- errors, middleware, lifespan ---------------------------------------------------------------------------------


async def client_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ClientError)
    request.scope["state"].setdefault("log", {})["error_code"] = exc.code  # "empty" and "corrupt" differ in logs
    return error_response(exc.status, exc.code, exc.message)


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    request.scope["state"].setdefault("log", {})["error_code"] = code
    return error_response(exc.status_code, code, str(exc.detail), headers=exc.headers)


async def overloaded(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, Overloaded)
    request.scope["state"].setdefault("log", {})["error_code"] = exc.code
    return error_response(503, exc.code, exc.message, headers={"Retry-After": str(RETRY_AFTER_S)})


async def server_error(request: Request, exc: Exception) -> Response:
    """Starlette sends this response outside the middleware stack, so it carries the request id itself."""
    request_id = request.scope.get("state", {}).get("request_id")
    get_logger().exception("unhandled error", extra={"request_id": request_id})
    headers = {"X-Request-ID": request_id} if request_id else None
    return error_response(500, "internal_error", "the service failed to handle the request", headers=headers)


class RequestMiddleware:
    """Request id (X-Request-ID in, echoed out), one structured log line and the HTTP metrics per request."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics, self.log = app, metrics, get_logger()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = incoming if REQUEST_ID.match(incoming) else uuid.uuid4().hex
        started = time.perf_counter()
        state = scope.setdefault("state", {})
        state.update(request_id=request_id, started=started)
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode())]
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            self.metrics.in_flight.dec()
            if (admitted := state.pop("admission", None)) is not None:
                admission, size = admitted
                admission.leave(size)
            elapsed = time.perf_counter() - started
            route = scope.get("route")
            endpoint = getattr(route, "path", "unmatched")
            self.metrics.requests.labels(scope["method"], endpoint, str(status)).inc()
            self.metrics.request_latency.labels(endpoint).observe(elapsed)
            if endpoint not in ("/metrics", "/health"):
                self.log.info(
                    "request",
                    extra={"request_id": request_id, "method": scope["method"], "path": scope["path"],
                           "status": status, "latency_ms": round(elapsed * 1000, 3), **state.get("log", {})},
                )  # fmt: skip


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    """Load and warm the model before the service reports ready; without one, serve health only."""
    settings: Settings = app.state.settings
    log = get_logger()
    app.state.admission = Admission(
        settings.inference_concurrency,
        settings.max_queue,
        settings.queue_timeout,
        app.state.metrics,
        max_bytes=settings.max_queue_bytes,
    )
    limit_pillow(settings.max_image_pixels)
    try:
        model: Model | None = Model(
            settings.model_path,
            threads=settings.ort_threads,
            max_pixels=settings.max_image_pixels,
            max_decode_bytes=settings.max_decode_bytes,
            solo_threads=settings.ort_solo_threads,
            decoders=settings.decode_concurrency,
            pet_threshold=settings.pet_threshold,
        )
        app.state.model_error = None
    except ModelError as error:
        model, app.state.model_error = None, str(error)
        log.warning("no model: health-only mode, /ready and /predict answer 503", extra={"reason": str(error)})
    app.state.model = model
    app.state.metrics.model_loaded.set(1 if model else 0)
    if model:
        app.state.metrics.model_info.labels(model.version, model.precision, model.sha256).set(1)
        log.info(
            "startup",
            extra={"model_version": model.version, "model_path": str(model.path), "precision": model.precision,
                   "model_choice": model.choice, "load_seconds": round(model.load_seconds, 3),
                   "ort_threads": settings.ort_threads, "ort_solo_threads": model.solo_threads,
                   "inference_concurrency": settings.inference_concurrency, "max_queue": settings.max_queue},
        )  # fmt: skip
    app.state.observer = Observer(settings, app.state.metrics, model)
    yield
    app.state.observer.close()
    log.info("shutdown", extra={"model_version": model.version if model else None})


def create_app(settings: Settings | None = None) -> Starlette:
    """The ASGI application (uvicorn: `server.app:create_app` with factory=True)."""
    from server import v2  # imports this module's helpers, so it comes in once they exist

    metrics = Metrics()
    app = Starlette(
        routes=[
            Route("/health", health, methods=["GET"]),
            Route("/ready", ready, methods=["GET"]),
            Route("/model", model_info, methods=["GET"]),
            Route("/predict", predict, methods=["POST"]),
            Route("/predict/batch", predict_batch, methods=["POST"]),
            Route("/metrics", metrics_endpoint, methods=["GET"]),
            *v2.routes,
            Route("/feedback", feedback, methods=["POST"]),
            *page.ROUTES,
            Route("/openapi.json", openapi_endpoint, methods=["GET"]),
        ],
        exception_handlers={
            ClientError: client_error,
            Overloaded: overloaded,
            HTTPException: http_error,
            Exception: server_error,
        },
        lifespan=lifespan,
    )
    app.state.settings = settings or Settings.from_env()
    app.state.metrics = metrics
    app.state.model, app.state.model_error = None, "the service is starting"
    app.add_middleware(RequestMiddleware, metrics=metrics)
    return app

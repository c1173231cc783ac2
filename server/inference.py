"""The inference call every route makes: the loaded model, admission and an inference slot, and its metrics."""

from __future__ import annotations

import time

from starlette.requests import Request

from imaging import ImageError
from server.errors import ClientError
from server.metrics import Metrics
from server.model import Model, Prediction


def require_model(request: Request) -> Model:
    """The loaded model, or 503 model_not_loaded (health-only mode, or still starting)."""
    model: Model | None = request.app.state.model
    if model is None:
        raise ClientError(503, "model_not_loaded", f"no model is loaded: {request.app.state.model_error}")
    return model


def classify_counted(model: Model, metrics: Metrics, images: list[bytes]) -> list[Prediction | ImageError]:
    """Model.classify_all plus the inference metrics. Runs in a worker thread."""
    cpu = time.thread_time()
    results, seconds = model.classify_all(images)
    metrics.inference_cpu.inc(time.thread_time() - cpu)
    for run in seconds:  # one observation per session.run, so a batch does not look like one slow inference
        metrics.inference_latency.observe(run)
    for result in results:
        if isinstance(result, Prediction):
            metrics.predictions.labels(result.label).inc()
            metrics.confidence.observe(result.confidence)
            if result.is_pet is False:
                metrics.not_a_pet.inc()
    return results


async def predict_images(request: Request, images: list[bytes]) -> list[Prediction | ImageError]:
    """Each image's prediction or ImageError, off the event loop, at most `inference_concurrency` at a time so the
    cores are not oversubscribed. The request, its body read, is admitted (server.admission: 503 when every place
    is taken) and waits at most QUEUE_TIMEOUT for a slot."""
    model = require_model(request)
    state = request.app.state
    state.admission.enter(request.scope)
    return await state.admission.run(classify_counted, model, state.metrics, images)

"""The application, assembled: routes, error handlers, middleware and the lifespan that loads the model.

Nothing imports this module but uvicorn (`server.app:create_app`, factory=True) and the tests: the routes live in
server.api, server.v2, server.feedback and server.page, the request plumbing in the leaves they import.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.routing import Route

from imaging import ImageError, limit_pillow
from server import api, page, v2
from server.access import RateLimiter
from server.admission import Admission
from server.config import Settings
from server.errors import ClientError, failed, refused
from server.feedback import feedback
from server.keys import KeyRing
from server.logs import get_logger, lean_records
from server.metrics import Metrics
from server.middleware import RequestMiddleware
from server.model import Model, ModelError
from server.observer import Observer


def load_model(app: Starlette) -> Model | None:
    """The model MODEL_PATH names, loaded and warm; None (health-only mode) when it cannot be loaded."""
    settings: Settings = app.state.settings
    logger = get_logger()
    try:
        model = Model.from_settings(settings)
    except ModelError as error:
        app.state.model_error = str(error)
        logger.warning("no model: health-only mode, /ready and /predict answer 503", extra={"reason": str(error)})
        return None
    app.state.model_error = None
    logger.info(
        "startup",
        extra={"model_version": model.version, "model_path": str(model.path), "precision": model.precision,
               "model_choice": model.choice, "load_seconds": round(model.load_seconds, 3),
               "ort_threads": settings.ort_threads, "ort_solo_threads": model.solo_threads,
               "inference_concurrency": settings.inference_concurrency, "max_queue": settings.max_queue},
    )  # fmt: skip
    return model


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    """Load and warm the model before the service reports ready; without one, serve health only."""
    settings: Settings = app.state.settings
    metrics: Metrics = app.state.metrics
    app.state.admission = Admission(
        settings.inference_concurrency,
        settings.max_queue,
        settings.queue_timeout,
        metrics,
        max_bytes=settings.max_admitted_bytes,
    )
    limit_pillow(settings.max_image_pixels)
    model = app.state.model = load_model(app)
    metrics.model_loaded.set(1 if model else 0)
    if model:
        metrics.model_info.labels(model.version, model.precision, model.sha256).set(1)
    app.state.observer = Observer(settings, metrics, model)
    app.state.keys = KeyRing(settings.api_keys_file) if settings.api_keys_file else None
    photos, keys = settings.feedback_images, app.state.keys
    kept = (
        f"{photos}: {settings.feedback_images_days} days after last sent, at most "
        f"{settings.feedback_images_max_bytes} bytes; labelled by a key: until harvested, at most "
        f"{settings.feedback_labelled_max_bytes} bytes"
    )
    get_logger().info(
        "feedback",
        extra={"feedback_store": app.state.observer.store.where(),
               "photos_kept": kept if photos else "no (FEEDBACK_IMAGES unset)",
               "api_keys": f"{settings.api_keys_file} ({len(keys.entries)} keys)" if keys
                           else "none (API_KEYS_FILE unset: every client is anonymous)",
               "predict_requires_key": settings.predict_requires_key},
    )  # fmt: skip
    app.state.limits = {
        "predict": RateLimiter(settings.predict_rate, settings.predict_burst),
        "feedback": RateLimiter(settings.feedback_rate, settings.feedback_burst),
        "feedback_key": RateLimiter(settings.key_feedback_rate, settings.key_feedback_burst),
    }
    yield
    app.state.observer.close()
    app.state.admission.close()
    get_logger().info("shutdown", extra={"model_version": model.version if model else None})


def create_app(settings: Settings | None = None) -> Starlette:
    """The ASGI application (uvicorn: `server.app:create_app` with factory=True)."""
    metrics = Metrics()
    lean_records()
    app = Starlette(
        routes=[
            Route("/health", api.health, methods=["GET"]),
            Route("/ready", api.ready, methods=["GET"]),
            Route("/model", api.model_info, methods=["GET"]),
            Route("/predict", api.predict, methods=["POST"]),
            Route("/predict/batch", api.predict_batch, methods=["POST"]),
            Route("/metrics", api.metrics, methods=["GET"]),
            *v2.ROUTES,
            Route("/feedback", feedback, methods=["POST"]),
            *page.ROUTES,
            Route("/openapi.json", api.openapi, methods=["GET"]),
        ],
        exception_handlers={ClientError: refused, ImageError: refused, HTTPException: refused, Exception: failed},
        lifespan=lifespan,
    )
    app.state.settings = settings or Settings.from_env()
    app.state.page = page.render(app.state.settings)
    app.state.metrics = metrics
    app.state.model, app.state.model_error = None, "the service is starting"
    app.state.keys, app.state.limits = None, {}
    app.add_middleware(RequestMiddleware, metrics=metrics)
    return app

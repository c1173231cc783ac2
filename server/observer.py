"""What the service keeps from each prediction: the prediction store (for feedback), the drift windows and the
prediction log. `observe` is the one hook every predicting route calls; the Observer lives on app.state."""

from __future__ import annotations

import mimetypes
import time
from collections.abc import Mapping

from starlette.requests import Request

from imaging import ImageError
from server.bodies import media_type
from server.config import Settings
from server.drift import DriftMonitor
from server.logs import get_logger
from server.metrics import Metrics
from server.model import Model, Prediction
from server.predlog import PredictionLog
from server.store import PredictionRecord, PredictionStore, open_store


class Observer:
    def __init__(self, settings: Settings, metrics: Metrics, model: Model | None) -> None:
        self.metrics = metrics
        self.store: PredictionStore = open_store(settings.feedback_store_size, settings.feedback_db)
        self.prediction_log = (
            PredictionLog(settings.prediction_log, settings.prediction_log_sample_every)
            if settings.prediction_log
            else None
        )
        reference = model.metadata.get("reference") if model else None
        if model and not reference:
            get_logger().warning("the model carries no reference distributions: no drift metrics")
        self.drift = DriftMonitor(reference, settings.drift_window, metrics.drift_psi, metrics.drift_window)

    def record(
        self, request_id: str, model_version: str, prediction: Prediction, data: bytes, content_type: str
    ) -> None:
        self.store.add(
            PredictionRecord(request_id, time.time(), model_version, prediction.label, prediction.probabilities,
                             prediction.pet_score)
        )  # fmt: skip
        self.drift.observe(prediction)
        if self.prediction_log:
            fields = {"request_id": request_id, "model_version": model_version, "label": prediction.label,
                      "probabilities": prediction.probabilities}  # fmt: skip
            if prediction.pet_score is not None:
                fields.update(pet_score=prediction.pet_score, is_pet=prediction.is_pet)
            self.prediction_log.prediction(fields, data, content_type)

    def record_feedback(self, record: PredictionRecord, label: str, correct: bool) -> None:
        self.store.set_feedback(record.request_id, label)
        self.metrics.feedback.labels(label, str(correct).lower()).inc()
        if self.prediction_log:
            self.prediction_log.feedback(record.request_id, record.model_version, label, record.label, correct)

    def close(self) -> None:
        self.store.close()
        if self.prediction_log:
            self.prediction_log.close()


def upload_type(headers: Mapping[str, str], filename: str) -> str:
    """The declared type: a raw body's Content-Type, else the one a browser derives from the part's file name."""
    declared = media_type(headers)
    if declared.startswith("image/"):
        return declared
    return mimetypes.guess_type(filename)[0] or "application/octet-stream"


def observe(
    request: Request, uploads: list[tuple[str, bytes]], results: list[Prediction | ImageError], *, batch: bool
) -> list[str | None]:
    """Record each prediction (errors are skipped) and return its id, None for an error. A single prediction's id
    is the request's X-Request-ID; a batch's items get their own, `<request id>/<index>`."""
    observer: Observer = request.app.state.observer
    model: Model = request.app.state.model
    request_id: str = request.scope["state"]["request_id"]
    ids: list[str | None] = []
    for index, ((filename, data), result) in enumerate(zip(uploads, results, strict=True)):
        if not isinstance(result, Prediction):
            ids.append(None)
            continue
        ids.append(f"{request_id}/{index}" if batch else request_id)
        observer.record(ids[-1], model.version, result, data, upload_type(request.headers, filename))
    return ids

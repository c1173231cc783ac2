"""What the service keeps from each prediction: the feedback store, the drift windows and the prediction log.

`observe` is the one hook /predict and /predict/batch call; the Observer lives on app.state from start-up.
"""

from __future__ import annotations

import mimetypes
import time
from typing import TYPE_CHECKING, Any

from starlette.requests import Request

from server.drift import DriftMonitor
from server.feedback import PredictionRecord, PredictionStore, open_store
from server.logs import get_logger
from server.predlog import PredictionLog

if TYPE_CHECKING:
    from server.config import Settings
    from server.metrics import Metrics
    from server.model import Model, Prediction


class Observer:
    def __init__(self, settings: Settings, metrics: Metrics, model: Model | None) -> None:
        self.metrics = metrics
        self.store: PredictionStore = open_store(settings.feedback_store_size, settings.feedback_db)
        self.log = PredictionLog(settings.prediction_log, settings.prediction_log_sample_every) if (
            settings.prediction_log) else None  # fmt: skip
        reference = model.metadata.get("reference") if model else None
        if model and not reference:
            get_logger().warning("the model carries no reference distributions: no drift metrics")
        self.drift = DriftMonitor(reference, settings.drift_window, metrics.drift_psi, metrics.drift_window)

    def record(
        self,
        request_id: str,
        model_version: str,
        prediction: Prediction,
        data: bytes,
        content_type: str,
    ) -> None:
        pet_score = prediction.pet_score
        record = PredictionRecord(request_id, time.time(), model_version, prediction.label,
                                  prediction.probabilities, pet_score)  # fmt: skip
        self.store.add(record)
        self.drift.observe(prediction)
        if self.log:
            fields = {"request_id": request_id, "model_version": model_version, "label": prediction.label,
                      "probabilities": prediction.probabilities}  # fmt: skip
            if pet_score is not None:
                fields.update(pet_score=pet_score, is_pet=prediction.is_pet)
            self.log.prediction(fields, data, content_type)

    def log_feedback(self, record: PredictionRecord, label: str, correct: bool) -> None:
        if self.log:
            self.log.feedback(record.request_id, record.model_version, label, record.label, correct)

    def close(self) -> None:
        self.store.close()
        if self.log:
            self.log.close()


def upload_type(request: Request, filename: str) -> str:
    """The declared type: a raw body's Content-Type, else the one a browser derives from the part's file name."""
    declared = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if declared.startswith("image/"):
        return declared
    return mimetypes.guess_type(filename)[0] or "application/octet-stream"


def observe(
    request: Request,
    uploads: list[tuple[str, bytes]],
    results: list[Any],
    items: list[dict[str, Any]] | None = None,
) -> None:
    """Record each prediction (errors are skipped). A batch's items get their own ids, `<request id>/<index>`,
    added to each successful item as "request_id"; a single prediction's id is the request's X-Request-ID."""
    observer: Observer = request.app.state.observer
    model = request.app.state.model
    request_id: str = request.scope["state"]["request_id"]
    for index, ((filename, data), result) in enumerate(zip(uploads, results, strict=True)):
        if not hasattr(result, "probabilities"):
            continue
        item_id = request_id if items is None else f"{request_id}/{index}"
        if items is not None:
            items[index]["request_id"] = item_id
        observer.record(item_id, model.version, result, data, upload_type(request, filename))

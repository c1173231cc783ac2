"""The optional prediction log: one JSON line per prediction and per feedback, to be joined offline by prediction id.

The log rotates at PREDICTION_LOG_MAX_BYTES and keeps PREDICTION_LOG_BACKUPS old files (the standard library's
RotatingFileHandler), so it never holds more than (1 + backups) x max bytes. Image bytes are never written, except
that with PREDICTION_LOG_SAMPLE_EVERY=N every Nth image is saved next to the log (`<log>.samples/`), named by its
sha256 (the same photo is kept once), oldest deleted first past PREDICTION_SAMPLES_MAX_BYTES.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from server.images import ImageFolder


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


class PredictionLog:
    def __init__(
        self, path: Path, sample_every: int = 0, *, max_bytes: int, backups: int, samples_max_bytes: int
    ) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.handler = logging.handlers.RotatingFileHandler(
            path, maxBytes=max_bytes, backupCount=backups, encoding="utf-8"
        )
        self.handler.setFormatter(logging.Formatter("%(message)s"))
        self.sample_every = sample_every
        self.samples = ImageFolder(path.with_name(f"{path.name}.samples"), samples_max_bytes) if sample_every else None
        self.seen = 0

    def write(self, line: dict[str, Any]) -> None:
        """One JSON line, written through at once (a write error raises, for the observer to count, and leaves
        nothing buffered to fail again later)."""
        record = logging.makeLogRecord({"msg": json.dumps(line, separators=(",", ":")), "levelno": logging.INFO})
        if self.handler.shouldRollover(record):
            self.handler.doRollover()
        os.write(self.handler.stream.fileno(), (self.handler.format(record) + "\n").encode())

    def prediction(self, fields: dict[str, Any], data: bytes, content_type: str, size: int | None = None) -> None:
        """fields: request id, model version, label, probabilities (and pet score); plus the upload's size (`size`,
        when the bytes were not carried this far: nothing samples them) and type."""
        size = len(data) if size is None else size
        line = {"event": "prediction", "time": now(), **fields, "bytes": size, "content_type": content_type}
        if self.samples and self.seen % self.sample_every == 0:
            line["sample"] = self.samples.save(data, content_type)
        self.seen += 1
        self.write(line)

    def feedback(self, prediction_id: str, model_version: str, label: str, predicted: str, correct: bool) -> None:
        self.write({"event": "feedback", "time": now(), "prediction_id": prediction_id,
                    "model_version": model_version, "label": label, "predicted": predicted,
                    "correct": correct})  # fmt: skip

    def close(self) -> None:
        self.handler.close()

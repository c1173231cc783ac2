"""The optional prediction log: one JSON line per prediction and per feedback, to be joined offline by request id.

Image bytes are never written, except that with PREDICTION_LOG_SAMPLE_EVERY=N every Nth image is saved as a file
next to the log (`<log>.samples/`) and its name goes into the line.
"""

from __future__ import annotations

import json
import mimetypes
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


class PredictionLog:
    def __init__(self, path: Path, sample_every: int = 0) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = path.open("a", buffering=1, encoding="utf-8")  # line-buffered: each line is one write
        self.sample_every = sample_every
        self.samples = path.with_name(f"{path.name}.samples")
        self.seen = 0

    def write(self, line: dict[str, Any]) -> None:
        self.file.write(json.dumps(line, separators=(",", ":")) + "\n")

    def prediction(self, fields: dict[str, Any], data: bytes, content_type: str) -> None:
        """fields: request id, model version, label, probabilities (and pet score); plus the upload's size and type."""
        line = {"event": "prediction", "time": now(), **fields, "bytes": len(data), "content_type": content_type}
        if self.sample_every and self.seen % self.sample_every == 0:
            self.samples.mkdir(exist_ok=True)
            name = UNSAFE.sub("_", fields["request_id"]) + (mimetypes.guess_extension(content_type) or ".bin")
            (self.samples / name).write_bytes(data)
            line["sample"] = name
        self.seen += 1
        self.write(line)

    def feedback(self, request_id: str, model_version: str, label: str, predicted: str, correct: bool) -> None:
        self.write({"event": "feedback", "time": now(), "request_id": request_id, "model_version": model_version,
                    "label": label, "predicted": predicted, "correct": correct})  # fmt: skip

    def close(self) -> None:
        self.file.close()

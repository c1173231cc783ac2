"""The ONNX model: one onnxruntime session per process, its metadata, and warm-up."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from imaging import DEFAULT_MAX_DECODE_BYTES
from server.preprocess import ImageError, Preprocessor

METADATA_KEY = "catsdogs"  # written by export.convert: one JSON document in the model's metadata_props


class ModelError(Exception):
    """The model file is missing, unreadable or lacks the metadata the service needs."""


@dataclass(frozen=True)
class Prediction:
    label: str
    probabilities: dict[str, float]

    @property
    def confidence(self) -> float:
        return self.probabilities[self.label]


class Model:
    """An exported classifier ready to serve: session, preprocessing and labels all from the file itself."""

    def __init__(
        self, path: Path, *, threads: int, max_pixels: int, max_decode_bytes: int = DEFAULT_MAX_DECODE_BYTES
    ) -> None:
        started = time.perf_counter()
        if not path.is_file():
            raise ModelError(f"model file not found: {path}")
        data = path.read_bytes()
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            self.session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        except Exception as error:
            raise ModelError(f"cannot load {path}: {error}") from error
        try:
            self.metadata: dict[str, Any] = json.loads(self.session.get_modelmeta().custom_metadata_map[METADATA_KEY])
            labels = list(self.metadata["preprocess"]["labels"])
        except (KeyError, TypeError, json.JSONDecodeError):
            raise ModelError(f"{path} carries no catsdogs metadata (export it with `make export`)") from None
        self.preprocess = Preprocessor(
            self.metadata["preprocess"], max_pixels=max_pixels, max_decode_bytes=max_decode_bytes
        )
        self.labels: list[str] = labels
        self.input_name = self.session.get_inputs()[0].name
        self.path = path
        self.sha256 = hashlib.sha256(data).hexdigest()
        self.threads = threads
        self.warm_up()
        self.load_seconds = time.perf_counter() - started

    @property
    def version(self) -> str:
        return str(self.metadata.get("model_version", self.sha256[:12]))

    def warm_up(self, runs: int = 3) -> None:
        """First runs allocate and plan; do them before the service says it is ready."""
        size = self.preprocess.input_size
        sample = np.zeros((1, 3, size, size), dtype=np.float32)
        for _ in range(runs):
            self.session.run(None, {self.input_name: sample})

    def predict(self, batch: np.ndarray) -> list[Prediction]:
        """Probabilities for a stack of preprocessed images."""
        probabilities = self.session.run(None, {self.input_name: batch})[0]
        return [
            Prediction(
                self.labels[int(row.argmax())], {label: float(p) for label, p in zip(self.labels, row, strict=True)}
            )
            for row in probabilities
        ]

    def classify_all(self, images: list[bytes]) -> tuple[list[Prediction | ImageError], float]:
        """Each image's prediction, or its ImageError; the good ones run as one batch. Returns the results and the
        seconds session.run took."""
        arrays: dict[int, np.ndarray] = {}
        errors: dict[int, ImageError] = {}
        for index, data in enumerate(images):
            try:
                arrays[index] = self.preprocess(data)
            except ImageError as error:
                errors[index] = error
        predictions: dict[int, Prediction] = {}
        seconds = 0.0
        if arrays:
            started = time.perf_counter()
            predictions = dict(zip(arrays, self.predict(np.stack(list(arrays.values()))), strict=True))
            seconds = time.perf_counter() - started
        return [predictions[i] if i in predictions else errors[i] for i in range(len(images))], seconds

    def classify(self, data: bytes) -> Prediction:
        """Image bytes to a prediction, through the service's own path (raises ImageError for a bad image)."""
        [result], _ = self.classify_all([data])
        if isinstance(result, ImageError):
            raise result
        return result

    @property
    def precision(self) -> str:
        return str(self.metadata.get("precision", "float32"))

    def describe(self) -> dict[str, Any]:
        """What /model reports: labels, input, preprocessing, version, lineage and the file's sha256."""
        return {
            **self.metadata,
            "model_version": self.version,
            "file": self.path.name,
            "sha256": self.sha256,
            "precision": self.precision,
            "ort_threads": self.threads,
            "onnxruntime": ort.__version__,
        }

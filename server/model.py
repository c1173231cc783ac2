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

from server.preprocess import ImageError, Preprocessor

METADATA_KEY = "catsdogs"  # written by export.convert: one JSON document in the model's metadata_props


class ModelError(Exception):
    """The model file is missing, unreadable or lacks the metadata the service needs."""


@dataclass(frozen=True)
class Prediction:
    label: str
    probabilities: dict[str, float]
    # not-a-pet: None for a model without the pet output; is_pet False means the label is not to be trusted
    is_pet: bool | None = None
    pet_score: float | None = None

    @property
    def confidence(self) -> float:
        return self.probabilities[self.label]


class Model:
    """An exported classifier ready to serve: session, preprocessing and labels all from the file itself."""

    def __init__(self, path: Path, *, threads: int, max_pixels: int, pet_threshold: float | None = None) -> None:
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
        self.preprocess = Preprocessor(self.metadata["preprocess"], max_pixels=max_pixels)
        self.labels: list[str] = labels
        self.input_name = self.session.get_inputs()[0].name
        self.output_names, self.pet_threshold = self.read_outputs(path, pet_threshold)
        self.pet_threshold_source = "PET_THRESHOLD" if pet_threshold is not None else "metadata"
        self.path = path
        self.sha256 = hashlib.sha256(data).hexdigest()
        self.threads = threads
        self.warm_up()
        self.load_seconds = time.perf_counter() - started

    def read_outputs(self, path: Path, override: float | None) -> tuple[list[str], float | None]:
        """The outputs to fetch, by the names the metadata gives, and the pet threshold (None: no pet output)."""
        available = [output.name for output in self.session.get_outputs()]
        probabilities = self.metadata.get("output_name", available[0])
        pet = self.metadata.get("pet") or {}
        if probabilities not in available or pet.get("output_name", available[0]) not in available:
            raise ModelError(f"{path} has outputs {available}, not those its metadata names")
        if not pet:
            return [probabilities], None
        threshold = pet.get("threshold") if override is None else override
        if not isinstance(threshold, (int, float)):
            raise ModelError(f"{path} has a pet output but no pet threshold: set PET_THRESHOLD")
        return [probabilities, pet["output_name"]], float(threshold)

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
        outputs = self.session.run(self.output_names, {self.input_name: batch})
        probabilities = outputs[0]
        pet_scores = outputs[1] if self.pet_threshold is not None else [None] * len(probabilities)
        return [
            Prediction(
                self.labels[int(row.argmax())],
                {label: float(p) for label, p in zip(self.labels, row, strict=True)},
                None if score is None else bool(score >= self.pet_threshold),
                None if score is None else min(1.0, max(0.0, float(score))),
            )
            for row, score in zip(probabilities, pet_scores, strict=True)
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
        pet = self.metadata.get("pet")
        if pet:
            pet = {
                **pet,
                "threshold": self.pet_threshold,
                "threshold_source": self.pet_threshold_source,
                "chosen_threshold": pet.get("threshold"),
            }
        return {
            **self.metadata,
            "pet": pet,
            "model_version": self.version,
            "file": self.path.name,
            "sha256": self.sha256,
            "precision": self.precision,
            "ort_threads": self.threads,
            "onnxruntime": ort.__version__,
        }

"""The ONNX model: one onnxruntime session per process, its metadata, and warm-up."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnxruntime as ort

from imaging import DEFAULT_MAX_DECODE_BYTES, ImageError
from server.mirror import MirrorGate, with_mirror
from server.model_file import METADATA_KEY, choose_model_file
from server.preprocess import Preprocessor

if TYPE_CHECKING:  # the export stages load models without the service's settings
    from server.config import Settings

PROVIDERS = ["CPUExecutionProvider"]


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


def session_options(threads: int) -> ort.SessionOptions:
    """Every graph optimisation, `threads` intra-op threads that sleep when they have no work. onnxruntime's default
    is to spin between operators and after a run: a few ms faster for one photo on an idle machine, but the spinning
    burns a core that the other inferences, the event loop and the neighbours on a shared machine need, and it is
    counted in the service's CPU per request (docs/capacity.md: "The service's own cost per request")."""
    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return options


class Model:
    """An exported classifier ready to serve: session, preprocessing and labels all from the file itself.

    `threads` onnxruntime threads per inference is right under load (inferences side by side use the cores). With
    `solo_threads` > `threads`, a second session over the same file runs an inference that starts while no other
    is running on that many threads, so one request on an idle machine uses the idle cores.
    """

    def __init__(
        self,
        path: Path,
        *,
        threads: int,
        max_pixels: int,
        max_decode_bytes: int = DEFAULT_MAX_DECODE_BYTES,
        solo_threads: int = 0,
        decoders: int = 0,
        pet_threshold: float | None = None,
    ) -> None:
        started = time.perf_counter()
        if not path.exists():
            raise ModelError(f"model file not found: {path}")
        chosen = choose_model_file(path)  # a folder: int8 when quantized from the float32 beside it, else float32
        path, self.choice = chosen.path, chosen.reason
        if not path.is_file():
            raise ModelError(f"model file not found: {path}")
        data = path.read_bytes()
        try:
            self.session = ort.InferenceSession(data, session_options(threads), providers=PROVIDERS)
            self.solo_session = (
                ort.InferenceSession(data, session_options(solo_threads), providers=PROVIDERS)
                if solo_threads > threads
                else None
            )
        except Exception as error:
            raise ModelError(f"cannot load {path}: {error}") from error
        self.running = 0  # inferences in session.run now (either session)
        self.active = 0  # classify_all calls in progress (decoding or running)
        self.running_lock = threading.Lock()
        # at most `decoders` images decoded at once (0: no bound), so the decode memory peaks do not all add up
        self.decoding = threading.BoundedSemaphore(decoders) if decoders else contextlib.nullcontext()
        try:
            self.metadata: dict[str, Any] = json.loads(self.session.get_modelmeta().custom_metadata_map[METADATA_KEY])
            labels = list(self.metadata["preprocess"]["labels"])
        except (KeyError, TypeError, json.JSONDecodeError):
            raise ModelError(f"{path} carries no catsdogs metadata (export it with `make export`)") from None
        try:
            self.preprocess = Preprocessor(
                self.metadata["preprocess"], max_pixels=max_pixels, max_decode_bytes=max_decode_bytes
            )
        except (ValueError, KeyError, TypeError) as error:
            raise ModelError(f"{path}: the service cannot honour its preprocessing spec: {error}") from None
        self.labels: list[str] = labels
        self.input_name = self.session.get_inputs()[0].name
        self.output_names, self.pet_threshold = self.read_outputs(path, pet_threshold)
        self.mirror = MirrorGate.from_metadata(self.metadata)  # flip averaging, only where it can change the answer
        self.pet_threshold_source = "PET_THRESHOLD" if pet_threshold is not None else "metadata"
        self.path = path
        self.sha256 = hashlib.sha256(data).hexdigest()
        self.threads = threads
        self.solo_threads = solo_threads if self.solo_session else threads
        self.warm_up()
        self.load_seconds = time.perf_counter() - started

    @classmethod
    def from_settings(cls, settings: Settings, *, threads: int | None = None) -> Model:
        """The model the service serves for these settings (every budget and both sessions); `threads` overrides
        ORT_THREADS (make classify runs one inference at a time on all the CPUs)."""
        return cls(
            settings.model_path,
            threads=settings.ort_threads if threads is None else threads,
            max_pixels=settings.max_image_pixels,
            max_decode_bytes=settings.max_decode_bytes,
            solo_threads=settings.ort_solo_threads,
            decoders=settings.decode_concurrency,
            pet_threshold=settings.pet_threshold,
        )

    def read_outputs(self, path: Path, override: float | None) -> tuple[list[str], float | None]:
        """The outputs to fetch, by the names the metadata gives, and the pet threshold (None: no pet output)."""
        available = [output.name for output in self.session.get_outputs()]
        probabilities = self.metadata.get("output_name", available[0])
        pet = self.metadata.get("pet") or {}
        if probabilities not in available or (pet and pet.get("output_name") not in available):
            raise ModelError(f"{path} has outputs {available}, not those its metadata names")
        if not pet:
            if override is not None:
                logging.getLogger("catsdogs").warning(
                    "PET_THRESHOLD is set but the model has no pet output: is_pet and pet_score stay null"
                )
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
        for session in (self.session, self.solo_session):
            for _ in range(runs if session else 0):
                session.run(None, {self.input_name: sample})  # type: ignore[union-attr]

    @property
    def has_pet_output(self) -> bool:
        """Whether the model gives a pet score (is_pet and pet_score are null without one)."""
        return self.pet_threshold is not None

    def predict(self, image: np.ndarray) -> Prediction:
        """The prediction for one preprocessed image (CHW). onnxruntime's arena keeps the activations of the largest
        batch it has run (~19 MB an image for MobileNetV2 with flip averaging), and batch 1 is also the fastest per
        image on CPU (25 ms vs 37 ms at batch 4 on 2 cores), so every image runs alone."""
        outputs, _ = with_mirror(self.run, image[np.newaxis], self.mirror)
        row = outputs[0][0]
        label = self.labels[int(row.argmax())]
        probabilities = {name: float(p) for name, p in zip(self.labels, row, strict=True)}
        if self.pet_threshold is None:
            return Prediction(label, probabilities)
        score = float(outputs[1][0])
        return Prediction(label, probabilities, score >= self.pet_threshold, min(1.0, max(0.0, score)))

    def run(self, batch: np.ndarray) -> list[np.ndarray]:
        """The model's outputs (output_names) from session.run on the solo session when no other inference is
        running, else on the shared one."""
        with self.running_lock:
            solo = self.running == 0 and self.active <= 1  # no other request decoding or running
            self.running += 1
        session = self.solo_session if solo and self.solo_session else self.session
        try:
            return session.run(self.output_names, {self.input_name: batch})
        finally:
            with self.running_lock:
                self.running -= 1

    def classify_all(self, images: list[bytes]) -> tuple[list[Prediction | ImageError], list[float]]:
        """Each image's prediction, or its ImageError, and the seconds each session.run took (one per image run).
        Each image is decoded and run in turn, so a batch holds one decoded image at a time."""
        errors: dict[int, ImageError] = {}
        predictions: dict[int, Prediction] = {}
        seconds: list[float] = []
        with self.running_lock:
            self.active += 1
        try:
            for index, data in enumerate(images):
                try:
                    with self.decoding:
                        array = self.preprocess(data)
                except ImageError as error:
                    errors[index] = error
                    continue
                started = time.perf_counter()
                predictions[index] = self.predict(array)
                seconds.append(time.perf_counter() - started)
        finally:
            with self.running_lock:
                self.active -= 1
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
            "file_choice": self.choice,
            "sha256": self.sha256,
            "precision": self.precision,
            "ort_threads": self.threads,
            "ort_solo_threads": self.solo_threads,
            "onnxruntime": ort.__version__,
        }

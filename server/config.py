"""Service settings from environment variables, read once at start-up."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

MIB = 1024 * 1024


def available_cpus() -> int:
    """CPUs this process may really use: the affinity mask, capped by a cgroup v2 CPU quota (container limits)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            cpus = min(cpus, max(1, int(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cpus)


def _int(name: str, default: int, minimum: int = 0) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"Invalid {name}={raw!r}: expected an integer >= {minimum}") from None
    if value < minimum:
        raise ValueError(f"Invalid {name}={raw!r}: expected an integer >= {minimum}")
    return value


def _choice(name: str, default: str, allowed: tuple[str, ...]) -> str:
    value = os.environ.get(name, default).lower()
    if value not in allowed:
        raise ValueError(f"Invalid {name}={value!r}. Only {', '.join(allowed)} are supported.")
    return value


def _fraction(name: str) -> float | None:
    raw = os.environ.get(name, "")
    try:
        value = float(raw) if raw else None
    except ValueError:
        value = -1.0
    if value is not None and not 0.0 <= value <= 1.0:
        raise ValueError(f"Invalid {name}={raw!r}: expected a number from 0 to 1")
    return value


@dataclass(frozen=True)
class Settings:
    model_path: Path
    host: str
    port: int
    workers: int
    ort_threads: int
    inference_concurrency: int
    max_upload_bytes: int
    max_image_pixels: int
    max_batch_files: int
    log_level: str
    log_format: str
    graceful_timeout: int
    pet_threshold: float | None = None  # None: the threshold recorded in the model's metadata

    @classmethod
    def from_env(cls) -> Settings:
        """Every setting has a default, sized from the CPUs this process may use (see README, "Threads and workers").

        One onnxruntime thread per inference: for MobileNetV2 at batch 1 a second intra-op thread cuts latency by
        ~5%, while two inferences side by side nearly double throughput. Two inferences in flight per core: an
        inference slot also spans the hand-over to and from the event loop, and with only one per core the cores
        sat idle during it (`make bench`: 82% of the in-process throughput at 16 clients, 92% with two).
        """
        workers = _int("WORKERS", 1, minimum=1)
        cpus_per_worker = max(1, available_cpus() // workers)
        ort_threads = _int("ORT_THREADS", 0) or 1
        return cls(
            model_path=Path(os.environ.get("MODEL_PATH", "models/model.onnx")),
            host=os.environ.get("HOST", "0.0.0.0"),
            port=_int("PORT", 8000, minimum=1),
            workers=workers,
            ort_threads=ort_threads,
            inference_concurrency=_int("INFERENCE_CONCURRENCY", 0) or 2 * max(1, cpus_per_worker // ort_threads),
            max_upload_bytes=_int("MAX_UPLOAD_BYTES", 10 * MIB, minimum=1),
            max_image_pixels=_int("MAX_IMAGE_PIXELS", 50_000_000, minimum=1),
            max_batch_files=_int("MAX_BATCH_FILES", 32, minimum=1),
            log_level=_choice("LOG_LEVEL", "info", ("debug", "info", "warning", "error")),
            log_format=_choice("LOG_FORMAT", "json", ("json", "text")),
            graceful_timeout=_int("GRACEFUL_TIMEOUT", 30, minimum=0),
            pet_threshold=_fraction("PET_THRESHOLD"),
        )

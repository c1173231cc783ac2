"""Service settings from environment variables, read once at start-up."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from imaging import DEFAULT_MAX_DECODE_BYTES, DEFAULT_MAX_PIXELS

MIB = 1024 * 1024


def available_cpus() -> int:
    """CPUs this process may really use: the affinity mask, capped by a cgroup CPU quota (container limits)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = cgroup_cpu_quota(Path("/sys/fs/cgroup"))
    if quota is not None:
        cpus = min(cpus, max(1, int(quota)))
    return max(1, cpus)


def cgroup_cpu_quota(root: Path) -> float | None:
    """The CPU limit in CPUs from cgroup v2 (`cpu.max`) or v1 (`cpu/cpu.cfs_quota_us`), or None when unlimited."""
    try:
        quota, period = (root / "cpu.max").read_text().split()
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    for folder in (root / "cpu", root / "cpu,cpuacct"):
        try:
            quota_us = int((folder / "cpu.cfs_quota_us").read_text())
            period_us = int((folder / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            continue
        return None if quota_us <= 0 or period_us <= 0 else quota_us / period_us
    return None


@dataclass(frozen=True)
class SettingHelp:
    """One environment variable as `python -m server --help` and README describe it."""

    name: str
    default: str
    meaning: str


# Every variable Settings.from_env reads, one line each (tests/test_config.py checks none is missing).
SETTINGS_HELP: tuple[SettingHelp, ...] = (
    SettingHelp(
        "MODEL_PATH",
        "models",
        "an ONNX model file, or a folder: its model.int8.onnx when quantized from the model.onnx beside it, else "
        "model.onnx; absent: health-only mode",
    ),
    SettingHelp("HOST", "0.0.0.0", "address to listen on"),
    SettingHelp("PORT", "8000", "TCP port to listen on (1-65535)"),
    SettingHelp("WORKERS", "1", "uvicorn worker processes, each with its own onnxruntime session"),
    SettingHelp("ORT_THREADS", "1", "onnxruntime intra-op threads per inference"),
    SettingHelp("INFERENCE_CONCURRENCY", "2 x CPUs / (WORKERS x ORT_THREADS)", "inferences in flight per process"),
    SettingHelp(
        "ORT_SOLO_THREADS", "CPUs / WORKERS", "onnxruntime threads for an inference that runs alone (idle machine)"
    ),
    SettingHelp("MAX_QUEUE", "4 x INFERENCE_CONCURRENCY", "requests that may wait for an inference slot; past it 503"),
    SettingHelp("MAX_QUEUE_BYTES", str(48 * MIB), "bytes of bodies all admitted requests may hold; past it 503"),
    SettingHelp("QUEUE_TIMEOUT", "10", "seconds a request may wait for an inference slot before a 503"),
    SettingHelp("DECODE_CONCURRENCY", "CPUs / WORKERS", "images decoded at once (bounds decode memory)"),
    SettingHelp("MAX_UPLOAD_BYTES", str(10 * MIB), "request body limit in bytes (a whole /predict/batch body)"),
    SettingHelp("MAX_IMAGE_PIXELS", "50000000", "declared width x height limit per image"),
    SettingHelp("MAX_DECODE_BYTES", str(64 * MIB), "estimated peak memory to decode one image (docs/hardening.md)"),
    SettingHelp("MAX_BATCH_FILES", "32", "files per /predict/batch request"),
    SettingHelp("LOG_LEVEL", "info", "debug, info, warning or error"),
    SettingHelp("LOG_FORMAT", "json", "json (one object per line) or text"),
    SettingHelp("GRACEFUL_TIMEOUT", "30", "seconds in-flight requests get to finish on SIGTERM"),
    SettingHelp(
        "FEEDBACK_STORE_SIZE", "10000", "recent predictions kept in memory for POST /feedback (oldest evicted)"
    ),
    SettingHelp("PET_THRESHOLD", "the model's", "pet_score at or above which is_pet is true (0-1; docs/not-a-pet.md)"),
    SettingHelp("FEEDBACK_DB", "unset", "SQLite file for the feedback store instead of memory (survives restarts)"),
    SettingHelp(
        "DRIFT_WINDOW", "500", "predictions per drift window (catsdogs_drift_psi against the model's reference)"
    ),
    SettingHelp("PREDICTION_LOG", "unset", "JSON-lines file of predictions and feedback (never image bytes)"),
    SettingHelp("PREDICTION_LOG_SAMPLE_EVERY", "0", "save every Nth image next to the prediction log (0: never)"),
)


def settings_help() -> str:
    """The settings table printed by `python -m server --help`."""
    width = max(len(s.name) for s in SETTINGS_HELP)
    rows = [f"  {s.name:<{width}}  {s.meaning} (default: {s.default})" for s in SETTINGS_HELP]
    return "\n".join([f"environment variables (CPUs available here: {available_cpus()}):", *rows])


def _int(name: str, default: int, minimum: int = 0, maximum: int | None = None) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    expected = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"Invalid {name}={raw!r}: expected an integer {expected}") from None
    if value < minimum or (maximum is not None and value > maximum):
        raise ValueError(f"Invalid {name}={raw!r}: expected an integer {expected}")
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
    ort_solo_threads: int
    inference_concurrency: int
    max_queue: int
    max_queue_bytes: int
    decode_concurrency: int
    queue_timeout: int
    max_upload_bytes: int
    max_image_pixels: int
    max_decode_bytes: int
    max_batch_files: int
    log_level: str
    log_format: str
    graceful_timeout: int
    feedback_store_size: int = 10_000
    feedback_db: Path | None = None
    drift_window: int = 500
    prediction_log: Path | None = None
    prediction_log_sample_every: int = 0
    pet_threshold: float | None = None  # None: the threshold recorded in the model's metadata

    @classmethod
    def from_env(cls) -> Settings:
        """Every setting has a default, sized from the CPUs this process may use (docs/serving.md, Threads and workers).

        One onnxruntime thread per inference: for MobileNetV2 at batch 1 a second intra-op thread cuts latency by
        ~5%, while two inferences side by side nearly double throughput. Two inferences in flight per core: an
        inference slot also spans the hand-over to and from the event loop, and with only one per core the cores
        sat idle during it (`make bench`: 82% of the in-process throughput at 16 clients, 92% with two).
        """
        workers = _int("WORKERS", 1, minimum=1)
        cpus_per_worker = max(1, available_cpus() // workers)
        ort_threads = _int("ORT_THREADS", 0) or 1
        concurrency = _int("INFERENCE_CONCURRENCY", 0) or 2 * max(1, cpus_per_worker // ort_threads)
        return cls(
            model_path=Path(os.environ.get("MODEL_PATH") or "models"),
            host=os.environ.get("HOST", "0.0.0.0"),
            port=_int("PORT", 8000, minimum=1, maximum=65535),
            workers=workers,
            ort_threads=ort_threads,
            # one request alone on an idle process runs on all its CPUs (0 or <= ORT_THREADS: never)
            ort_solo_threads=_int("ORT_SOLO_THREADS", cpus_per_worker),
            inference_concurrency=concurrency,
            # requests waiting for an inference slot (each may hold a body): see docs/capacity.md, "Memory budget"
            max_queue=_int("MAX_QUEUE", 4 * concurrency),
            max_queue_bytes=_int("MAX_QUEUE_BYTES", 48 * MIB, minimum=1),
            queue_timeout=_int("QUEUE_TIMEOUT", 10, minimum=1),
            # images decoded at once: decoding is CPU-bound and its memory peak is per image
            decode_concurrency=_int("DECODE_CONCURRENCY", 0) or cpus_per_worker,
            max_upload_bytes=_int("MAX_UPLOAD_BYTES", 10 * MIB, minimum=1),
            max_image_pixels=_int("MAX_IMAGE_PIXELS", DEFAULT_MAX_PIXELS, minimum=1),
            max_decode_bytes=_int("MAX_DECODE_BYTES", DEFAULT_MAX_DECODE_BYTES, minimum=1),
            max_batch_files=_int("MAX_BATCH_FILES", 32, minimum=1),
            log_level=_choice("LOG_LEVEL", "info", ("debug", "info", "warning", "error")),
            log_format=_choice("LOG_FORMAT", "json", ("json", "text")),
            graceful_timeout=_int("GRACEFUL_TIMEOUT", 30, minimum=0),
            feedback_store_size=_int("FEEDBACK_STORE_SIZE", 10_000, minimum=1),
            feedback_db=Path(os.environ["FEEDBACK_DB"]) if os.environ.get("FEEDBACK_DB") else None,
            drift_window=_int("DRIFT_WINDOW", 500, minimum=1),
            prediction_log=Path(os.environ["PREDICTION_LOG"]) if os.environ.get("PREDICTION_LOG") else None,
            prediction_log_sample_every=_int("PREDICTION_LOG_SAMPLE_EVERY", 0),
            pet_threshold=_fraction("PET_THRESHOLD"),
        )

    def oversubscription(self, cpus: int | None = None) -> str | None:
        """A warning when WORKERS x ORT_THREADS asks for more cores than this process may use, else None."""
        cpus = cpus or available_cpus()
        wanted = self.workers * self.ort_threads
        if wanted <= cpus:
            return None
        return (
            f"WORKERS={self.workers} x ORT_THREADS={self.ort_threads} = {wanted} inference threads on {cpus} CPUs: "
            "the cores are oversubscribed and every request gets slower (docs/serving.md, Threads and workers)"
        )

"""Service settings from environment variables, read once at start-up."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


Values = dict[str, Any]


def integer(minimum: int = 0, maximum: int | None = None) -> Callable[[str], int]:
    expected = f"an integer between {minimum} and {maximum}" if maximum is not None else f"an integer >= {minimum}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise ValueError(f"expected {expected}") from None
        if value < minimum or (maximum is not None and value > maximum):
            raise ValueError(f"expected {expected}")
        return value

    return parse


def choice(*allowed: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text.lower() not in allowed:
            raise ValueError(f"only {', '.join(allowed)} are supported")
        return text.lower()

    return parse


def fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 1.0:
        raise ValueError("expected a number from 0 to 1")
    return value


def number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value < float("inf"):
        raise ValueError("expected a number >= 0")
    return value


def boolean(text: str) -> bool:
    if text.lower() not in ("true", "false"):
        raise ValueError("expected true or false")
    return text.lower() == "true"


def per_worker(values: Values) -> int:
    """The CPUs each worker process may use."""
    return max(1, values["cpus"] // values["workers"])


@dataclass(frozen=True)
class Setting:
    """One environment variable: how its text is read, its default, and what it means (--help, README's table)."""

    name: str
    parse: Callable[[str], Any]  # the text (never empty) to a value, or ValueError saying what was expected
    default: Callable[[Values], Any]  # the value when unset or empty, from the settings read before it
    default_text: str
    meaning: str

    @property
    def field(self) -> str:
        return self.name.lower()


def fixed(value: Any) -> Callable[[Values], Any]:
    return lambda _: value


# Every variable the service reads, in the order they are read (a default may use the ones above it). Unset and
# empty are the same: the default.
SETTINGS: tuple[Setting, ...] = (
    Setting("MODEL_PATH", Path, fixed(Path("models")), "`models`",
            "an ONNX model file, or a folder: its `model.int8.onnx` when quantized from the `model.onnx` beside it, "
            "else `model.onnx`; absent: health-only mode"),
    Setting("HOST", str, fixed("0.0.0.0"), "`0.0.0.0`", "address to listen on"),
    Setting("PORT", integer(1, 65535), fixed(8000), "8000", "TCP port to listen on"),
    Setting("WORKERS", integer(1), fixed(1), "1", "uvicorn worker processes, each with its own onnxruntime session"),
    Setting("ORT_THREADS", integer(1), fixed(1), "1", "onnxruntime intra-op threads per inference"),
    Setting("INFERENCE_CONCURRENCY", integer(1), lambda v: 2 * max(1, per_worker(v) // v["ort_threads"]),
            "2 x CPUs / (`WORKERS` x `ORT_THREADS`)", "inferences in flight per process (the rest wait for a slot)"),
    Setting("ORT_SOLO_THREADS", integer(0), per_worker, "CPUs / `WORKERS`",
            "onnxruntime threads for an inference that runs while no other does (0 or <= `ORT_THREADS`: off)"),
    Setting("MAX_QUEUE", integer(0), lambda v: 4 * v["inference_concurrency"], "4 x `INFERENCE_CONCURRENCY`",
            "requests that may wait for an inference slot; past it 503 `overloaded` at once"),
    Setting("MAX_ADMITTED_BYTES", integer(1), fixed(48 * MIB), str(48 * MIB),
            "request bodies (Content-Length, else `MAX_UPLOAD_BYTES`) that the admitted requests, running and "
            "waiting, may hold in all; past it 503 `overloaded`"),
    Setting("QUEUE_TIMEOUT", integer(1), fixed(10), "10",
            "seconds a request may wait for an inference slot before 503 `queue_timeout`"),
    Setting("HEADER_TIMEOUT", integer(1), fixed(20), "20",
            "seconds for a request's line and headers, one more for every `READ_MIN_RATE` bytes received, at most "
            "`HEADER_TIMEOUT_MAX`; then 408 and the connection closed (Apache's header=20-40,MinRate=500)"),
    Setting("HEADER_TIMEOUT_MAX", integer(1), fixed(40), "40", "the longest `HEADER_TIMEOUT` may grow to"),
    Setting("BODY_TIMEOUT", integer(1), fixed(20), "20",
            "seconds for a request's body, one more for every `READ_MIN_RATE` bytes received, at most "
            "`BODY_TIMEOUT_MAX`; then 408 and the connection closed (Apache's body=20,MinRate=500, capped)"),
    Setting("BODY_TIMEOUT_MAX", integer(1), fixed(60), "60",
            "the longest `BODY_TIMEOUT` may grow to: a `MAX_UPLOAD_BYTES` body must come at `MAX_UPLOAD_BYTES` / 60 "
            "bytes/s on average"),
    Setting("READ_MIN_RATE", integer(1), fixed(500), "500",
            "bytes per second that earn a slow client one more second (headers and body)"),
    Setting("MAX_CONNECTIONS", integer(1), fixed(512), "512",
            "open connections per worker; a request on one beyond it is answered 503 and closed (nginx's "
            "`worker_connections` default)"),
    Setting("DECODE_CONCURRENCY", integer(1), per_worker, "CPUs / `WORKERS`",
            "images decoded at once (each decode has its own memory peak)"),
    Setting("MAX_UPLOAD_BYTES", integer(1), fixed(10 * MIB), str(10 * MIB),
            "request body limit in bytes (a whole `/predict/batch` body)"),
    Setting("MAX_IMAGE_PIXELS", integer(1), fixed(DEFAULT_MAX_PIXELS), str(DEFAULT_MAX_PIXELS),
            "declared width x height limit per image (413 before decoding)"),
    Setting("MAX_DECODE_BYTES", integer(1), fixed(DEFAULT_MAX_DECODE_BYTES), str(DEFAULT_MAX_DECODE_BYTES),
            "estimated peak memory to decode one image (413 before decoding; docs/hardening.md)"),
    Setting("MAX_BATCH_FILES", integer(1), fixed(32), "32", "files per `/predict/batch` request"),
    Setting("LOG_LEVEL", choice("debug", "info", "warning", "error"), fixed("info"), "`info`",
            "`debug`, `info`, `warning` or `error`"),
    Setting("LOG_FORMAT", choice("json", "text"), fixed("json"), "`json`", "`json` (one object per line) or `text`"),
    Setting("GRACEFUL_TIMEOUT", integer(0), fixed(30), "30", "seconds in-flight requests get to finish on SIGTERM"),
    Setting("FEEDBACK_STORE_SIZE", integer(1), fixed(10_000), "10000",
            "recent predictions kept for `POST /feedback` (oldest evicted); labels whose photo was kept "
            "(FEEDBACK_IMAGES) are never evicted before `make harvest` took them: past this many waiting, of a "
            "key's or of anonymous ones, a new label gets 503 `label_store_full`"),
    Setting("FEEDBACK_DB", str, fixed(None), "unset (memory)",
            "the feedback store: a SQLite file (survives restarts; one host's processes) or a `postgresql://` URL "
            "(several processes or replicas)"),
    Setting("STORE_TIMEOUT", integer(1), fixed(10), "10",
            "seconds a `POST /feedback` waits on the feedback store (a hung or locked database) before 503 "
            "`store_unavailable`"),
    Setting("FEEDBACK_IMAGES", Path, fixed(None), "unset (off: no photo is written)",
            "folder keeping each predicted photo, named by its sha256, so that feedback can become training data"),
    Setting("FEEDBACK_IMAGES_DAYS", integer(1), fixed(7), "7",
            "days a kept photo stays in `FEEDBACK_IMAGES` after it was last sent (a labelled one: until harvested)"),
    Setting("FEEDBACK_IMAGES_MAX_BYTES", integer(1), fixed(1024 * MIB), str(1024 * MIB),
            "the size cap of `FEEDBACK_IMAGES` (past it, the least recently sent photos are deleted first)"),
    Setting("FEEDBACK_LABELLED_MAX_BYTES", integer(1), fixed(1024 * MIB), str(1024 * MIB),
            "labelled photos waiting for `make harvest` (`FEEDBACK_IMAGES/labelled`, outside the cap and the "
            "retention); past it a label's photo is not kept, and an alert fires"),
    Setting("FEEDBACK_ANONYMOUS_LABELLED_MAX_BYTES", integer(1), fixed(256 * MIB), str(256 * MIB),
            "photos labelled without a key, waiting for a person's review (`FEEDBACK_IMAGES/labelled-anonymous`); "
            "their own bound, so they never take a key's room"),
    Setting("OBSERVER_MAX_BYTES", integer(1), fixed(64 * MIB), str(64 * MIB),
            "uploads held while they wait to be kept (`FEEDBACK_IMAGES`, the log's samples) behind a slow store or "
            "disk; past it a prediction is answered but not recorded (counted, logged once)"),
    Setting("API_KEYS_FILE", Path, fixed(None), "unset (no keys: every client is anonymous)",
            "the API keys (`make api-key`): one JSON line per key, only its hash kept; `python -m server.keys --name "
            "NAME --revoke` revokes one within a second and keeps its name reserved (docs/threat-model.md)"),
    Setting("PREDICT_REQUIRES_KEY", boolean, fixed(False), "`false`",
            "`true`: the predicting routes need a key with the `predict` scope (401 without one)"),
    Setting("FEEDBACK_RATE", number, fixed(1.0), "1",
            "feedbacks a second per anonymous client address, on average (0: no limit; past it 429)"),
    Setting("FEEDBACK_BURST", integer(1), fixed(30), "30", "feedbacks an anonymous client address may send at once"),
    Setting("KEY_FEEDBACK_RATE", number, fixed(20.0), "20", "feedbacks a second per key, on average (0: no limit)"),
    Setting("KEY_FEEDBACK_BURST", integer(1), fixed(200), "200", "feedbacks a key may send at once"),
    Setting("PREDICT_RATE", number, fixed(0.0), "0 (no limit)",
            "predicting requests a second per key, or per client address when anonymous (past it 429)"),
    Setting("PREDICT_BURST", integer(1), fixed(60), "60", "predicting requests a client may send at once"),
    Setting("PET_THRESHOLD", fraction, fixed(None), "the model's (`/model` → `pet.threshold`)",
            "`pet_score` at or above which `is_pet` is true (0 to 1; docs/not-a-pet.md)"),
    Setting("DRIFT_WINDOW", integer(1), fixed(500), "500",
            "predictions per drift window (`catsdogs_drift_psi` against the model's reference)"),
    Setting("PREDICTION_LOG", Path, fixed(None), "unset",
            "JSON-lines file of predictions and feedback, joinable by prediction id (no image bytes)"),
    Setting("PREDICTION_LOG_SAMPLE_EVERY", integer(0), fixed(0), "0",
            "save every Nth image next to the prediction log (0: never)"),
    Setting("PREDICTION_LOG_MAX_BYTES", integer(1), fixed(8 * MIB), str(8 * MIB),
            "the prediction log rotates at this size"),
    Setting("PREDICTION_LOG_BACKUPS", integer(0), fixed(3), "3",
            "rotated prediction logs kept (the log holds at most (1 + this) x `PREDICTION_LOG_MAX_BYTES`)"),
    Setting("PREDICTION_SAMPLES_MAX_BYTES", integer(1), fixed(32 * MIB), str(32 * MIB),
            "sampled images kept next to the log, oldest deleted first past this size"),
)  # fmt: skip
RENAMED = {"MAX_QUEUE_BYTES": "MAX_ADMITTED_BYTES"}
POSTGRES_SCHEMES = ("postgresql://", "postgres://")  # FEEDBACK_DB: a PostgreSQL URL, not a file
WRITTEN_FILES = ("FEEDBACK_DB", "PREDICTION_LOG")  # checked before the service starts: a bad one is exit code 2
WRITTEN_FOLDERS = ("FEEDBACK_IMAGES",)
READ_FILES = ("API_KEYS_FILE",)  # must be readable at start (later, an unreadable one refuses every key)


def settings_help() -> str:
    """The settings table printed by `python -m server --help`."""
    width = max(len(s.name) for s in SETTINGS)
    rows = [f"  {s.name:<{width}}  {s.meaning.replace('`', '')} (default: {s.default_text.replace('`', '')})"
            for s in SETTINGS]  # fmt: skip
    return "\n".join([f"environment variables, unset or empty for the default (CPUs here: {available_cpus()}):",
                      *rows])  # fmt: skip


def settings_markdown() -> str:
    """The settings table of README.md (tests/test_docs.py checks README holds exactly this)."""
    rows = [f"| `{s.name}` | {s.default_text} | {s.meaning} |" for s in SETTINGS]
    return "\n".join(["| variable | default | meaning |", "| --- | --- | --- |", *rows])


@dataclass(frozen=True)
class Settings:
    model_path: Path
    host: str
    port: int
    workers: int
    ort_threads: int
    inference_concurrency: int
    ort_solo_threads: int
    max_queue: int
    max_admitted_bytes: int
    queue_timeout: int
    header_timeout: int
    header_timeout_max: int
    body_timeout: int
    body_timeout_max: int
    read_min_rate: int
    max_connections: int
    decode_concurrency: int
    max_upload_bytes: int
    max_image_pixels: int
    max_decode_bytes: int
    max_batch_files: int
    log_level: str
    log_format: str
    graceful_timeout: int
    feedback_store_size: int
    feedback_db: str | None
    store_timeout: int
    feedback_images: Path | None
    feedback_images_days: int
    feedback_images_max_bytes: int
    feedback_labelled_max_bytes: int
    feedback_anonymous_labelled_max_bytes: int
    observer_max_bytes: int
    api_keys_file: Path | None
    predict_requires_key: bool
    feedback_rate: float
    feedback_burst: int
    key_feedback_rate: float
    key_feedback_burst: int
    predict_rate: float
    predict_burst: int
    pet_threshold: float | None  # None: the threshold recorded in the model's metadata
    drift_window: int
    prediction_log: Path | None
    prediction_log_sample_every: int
    prediction_log_max_bytes: int
    prediction_log_backups: int
    prediction_samples_max_bytes: int

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, cpus: int | None = None) -> Settings:
        """Every setting from the environment, or its default, sized from the CPUs this process may use
        (docs/serving.md, Threads and workers). Raises ValueError naming the variable and what it expects.

        One onnxruntime thread per inference: for MobileNetV2 at batch 1 a second intra-op thread cuts latency by
        ~5%, while two inferences side by side nearly double throughput. Two inferences in flight per core: an
        inference slot also spans the hand-over to and from the event loop, and with only one per core the cores
        sat idle during it (`make bench`: 82% of the in-process throughput at 16 clients, 92% with two).
        """
        environ = os.environ if environ is None else environ
        for old, new in RENAMED.items():
            if environ.get(old):
                raise ValueError(f"{old} was renamed {new}: set {new} instead")
        values: Values = {"cpus": cpus or available_cpus()}
        for setting in SETTINGS:
            text = environ.get(setting.name, "")
            try:
                values[setting.field] = setting.parse(text) if text else setting.default(values)
            except ValueError as error:
                raise ValueError(f"Invalid {setting.name}={text!r}: {error}") from None
        return cls(**{setting.field: values[setting.field] for setting in SETTINGS})

    def check_files(self) -> None:
        """Raise ValueError, naming the variable, for a file the service must write (or read) but cannot."""
        if self.predict_requires_key and self.api_keys_file is None:
            raise ValueError("PREDICT_REQUIRES_KEY=true needs API_KEYS_FILE: without keys every prediction is a 401")
        for setting in (s for s in SETTINGS if s.name in READ_FILES):
            path = getattr(self, setting.field)
            if path is None:
                continue
            try:
                Path(path).read_bytes()
            except OSError as error:
                raise ValueError(f"Invalid {setting.name}={str(path)!r}: cannot read it ({error.strerror})") from None
        for setting in (s for s in SETTINGS if s.name in WRITTEN_FILES):
            value: Path | str | None = getattr(self, setting.field)
            if value is None or str(value).startswith(POSTGRES_SCHEMES):
                continue
            path = Path(value)
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                with open(path, "a"):
                    pass
            except OSError as error:
                raise ValueError(f"Invalid {setting.name}={str(path)!r}: cannot write it ({error.strerror})") from None
        for setting in (s for s in SETTINGS if s.name in WRITTEN_FOLDERS):
            folder: Path | None = getattr(self, setting.field)
            if folder is None:
                continue
            try:
                folder.mkdir(parents=True, exist_ok=True)
                probe = folder / ".write-probe"
                probe.touch()
                probe.unlink()
            except OSError as error:
                raise ValueError(
                    f"Invalid {setting.name}={str(folder)!r}: cannot write in it ({error.strerror})"
                ) from None

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

"""What the service keeps from each prediction: the prediction store (for feedback), the drift windows and the
prediction log. `observe` is the one hook every predicting route calls; the Observer lives on app.state."""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import functools
import mimetypes
import posixpath
import queue
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from starlette.requests import Request

from imaging import ImageError
from server.bodies import media_type
from server.config import Settings
from server.drift import DriftMonitor
from server.images import ANONYMOUS_LABELLED, LABELLED, ImageFolder
from server.logs import get_logger
from server.metrics import Metrics
from server.model import Model, Prediction
from server.predlog import PredictionLog
from server.store import ANONYMOUS, Feedback, PredictionRecord, PredictionStore

AREAS = {"key": LABELLED, "anonymous": ANONYMOUS_LABELLED}  # where a labelled photo waits, by its label's source
QUEUE_SIZE = 1000  # predictions waiting to be recorded: about a minute of full load; past it they are dropped
# Under load the worker takes what has gathered, records it in one go, then sleeps this long, so that a prediction
# put on the queue meanwhile wakes no thread (a wake-up is a system call per prediction, 0.2-0.3 ms of CPU per
# request in all on the development machine); idle, it waits for the next prediction as before.
GATHER_S = 0.05
BATCH = 256  # at most this many predictions recorded in one transaction
EXPIRE_EVERY_S = 60  # how often kept photos past their retention are looked for
STORE_THREADS = 4  # feedbacks at the store at once, per process: their own pool, never the one V2 parsing uses
UNSETTLED = 10_000  # feedbacks remembered whose store call failed (it may have committed before it failed)


class Observer:
    """Records each prediction off the event loop: the request puts it on a bounded queue and goes on; one worker
    thread writes the store, the drift windows and the prediction log. A full queue or a failed write (a locked
    database, a full disk) loses that record, counts it in catsdogs_observations_lost_total and logs it once per
    reason, and never delays or fails the answer."""

    def __init__(self, settings: Settings, metrics: Metrics, model: Model | None) -> None:
        self.metrics = metrics
        self.store = PredictionStore(settings.feedback_db, settings.feedback_store_size)
        self.store.probe()  # a store it cannot use (its schema) shows in /ready from the start
        if self.store.error:
            get_logger().error("the feedback store cannot be used: /ready answers 503",
                               extra={"reason": self.store.error})  # fmt: skip
        self.images = (
            ImageFolder(settings.feedback_images, settings.feedback_images_max_bytes,
                        retention_s=settings.feedback_images_days * 86400,
                        labelled_max_bytes=settings.feedback_labelled_max_bytes,
                        anonymous_labelled_max_bytes=settings.feedback_anonymous_labelled_max_bytes)
            if settings.feedback_images
            else None
        )  # fmt: skip
        self.expired_at = time.monotonic()
        self.prediction_log = (
            PredictionLog(
                settings.prediction_log,
                settings.prediction_log_sample_every,
                max_bytes=settings.prediction_log_max_bytes,
                backups=settings.prediction_log_backups,
                samples_max_bytes=settings.prediction_samples_max_bytes,
            )
            if settings.prediction_log
            else None
        )
        if self.images:
            for kind, area in AREAS.items():
                metrics.labelled_bytes.labels(kind).set_function(functools.partial(self.images.labelled_bytes, area))
                metrics.labelled_max_bytes.labels(kind).set(self.images.bounds[area])
        reference = model.metadata.get("reference") if model else None
        if model and not reference:
            get_logger().warning("the model carries no reference distributions: no drift metrics")
        self.drift = DriftMonitor(reference, settings.drift_window, metrics.drift_psi, metrics.drift_window)
        self.queue: queue.Queue[Observation | None] = queue.Queue(QUEUE_SIZE)
        # an upload's bytes ride along only when something keeps them (photos for feedback, the log's samples), and
        # the queue holds at most max_bytes of them: a slow store must not grow the process by the uploads it answered
        self.keeps_bytes = bool(self.images or (self.prediction_log and self.prediction_log.samples))
        self.max_bytes = settings.observer_max_bytes
        self.queued_bytes = 0
        self.pending: set[str] = set()  # ids queued, not yet in the store
        self.calls = ThreadPoolExecutor(STORE_THREADS, thread_name_prefix="store")  # feedback's store calls
        self.unsettled: OrderedDict[str, tuple[str, str]] = OrderedDict()  # prediction id -> (label, source)
        self.unsettled_lock = threading.Lock()
        self.written = threading.Condition()
        self.reported: set[str] = set()
        self.worker = threading.Thread(target=self.drain, name="observer", daemon=True)
        self.worker.start()

    def record(
        self, prediction_id: str, request_id: str, model_version: str, prediction: Prediction, data: bytes,
        content_type: str,
    ) -> None:  # fmt: skip
        """Queue one prediction to be recorded; never blocks."""
        record = PredictionRecord(prediction_id, request_id, time.time(), model_version, prediction.label,
                                  prediction.probabilities, prediction.pet_score, is_pet=prediction.is_pet)  # fmt: skip
        size, data = len(data), data if self.keeps_bytes else b""
        with self.written:  # pending before it is queued: the worker may write it at once
            full = self.queued_bytes + len(data) > self.max_bytes
            if not full:
                self.pending.add(prediction_id)
                self.queued_bytes += len(data)
        try:
            if full:
                raise queue.Full
            self.queue.put_nowait(Observation(record, prediction, data, content_type, size))
        except queue.Full:
            if not full:
                with self.written:
                    self.pending.discard(prediction_id)
                    self.queued_bytes -= len(data)
            self.lose("queue_full", "the observer's queue is full: predictions are answered but not recorded")

    def drain(self) -> None:
        while True:
            items = [self.queue.get()]  # idle: wait for the next prediction
            while len(items) < BATCH:
                try:
                    items.append(self.queue.get_nowait())
                except queue.Empty:
                    break
            stop = None in items
            observations = [item for item in items if item is not None]
            try:
                self.write(observations)
            except Exception as error:  # a side effect failing must never reach a request, nor stop this thread
                self.lose("write_failed", f"recording predictions failed: {type(error).__name__}: {error}",
                          len(observations))  # fmt: skip
            finally:
                with self.written:
                    self.pending.difference_update(item.record.prediction_id for item in observations)
                    self.queued_bytes -= sum(len(item.data) for item in observations)
                    self.written.notify_all()
            if stop:
                return
            time.sleep(GATHER_S)

    def write(self, items: list[Observation]) -> None:
        """Record what the queue held: each photo kept (when FEEDBACK_IMAGES), the predictions in one transaction,
        then the drift windows and the prediction log. A failure loses what it touched, never the rest."""
        records = []
        for item in items:
            record = item.record
            if self.images:  # kept first: the stored prediction names a photo that is on disk
                try:
                    record = dataclasses.replace(record, image=self.images.save(item.data, item.content_type))
                except OSError as error:  # a full disk loses the photo, not the prediction's record
                    self.lose("image_failed", f"keeping a photo failed: {error}")
            records.append(record)
        if self.images and time.monotonic() - self.expired_at > EXPIRE_EVERY_S:
            self.expired_at = time.monotonic()
            try:  # reads the store: a database that is down must not cost the records below
                self.images.expire()
            except Exception as error:
                self.lose("image_failed", f"expiring kept photos failed: {type(error).__name__}: {error}", 0)
        try:
            self.store.add_many(records)
        except Exception as error:  # a side effect failing must never reach a request
            self.lose("write_failed", f"recording a prediction failed: {type(error).__name__}: {error}", len(records))
        for item in items:
            try:
                self.drift.observe(item.prediction)
                if self.prediction_log:
                    self.log(self.prediction_log, item)
            except Exception as error:
                self.lose("write_failed", f"recording a prediction failed: {type(error).__name__}: {error}")

    @staticmethod
    def log(prediction_log: PredictionLog, item: Observation) -> None:
        prediction = item.prediction
        fields = {"prediction_id": item.record.prediction_id, "request_id": item.record.request_id,
                  "model_version": item.record.model_version, "label": prediction.label,
                  "probabilities": prediction.probabilities}  # fmt: skip
        if prediction.pet_score is not None:
            fields.update(pet_score=prediction.pet_score, is_pet=prediction.is_pet)
        prediction_log.prediction(fields, item.data, item.content_type, item.size)

    def lose(self, reason: str, message: str, count: int = 1) -> None:
        self.metrics.observations_lost.labels(reason).inc(count)
        if reason not in self.reported:  # once per reason: a full disk must not flood the log as well
            self.reported.add(reason)
            get_logger().warning(message, extra={"reason": reason})

    def give_feedback(
        self, prediction_id: str, label: str, source: str, timeout: float = 5
    ) -> tuple[Feedback, PredictionRecord | None]:
        """Record a feedback once its prediction is out of the queue (at most `timeout` seconds: a feedback sent right
        after its prediction must see it); a first one is counted and logged. Blocking: call it from a worker thread.

        The same label from the same source on a prediction labelled already is the same acknowledgement as the first:
        its photo is kept for harvest (idempotent) and the answer is the first's. That is what a retry finds when the
        store call before it committed and then failed (its connection cut after the change; the client told 503),
        in this process or another (WORKERS > 1, both colours live). It is counted once: by the retry when this
        process remembers the failed call, else not again (a plain repeat of a 200 must not count twice). A label
        the store refused at its bound (FULL), or whose kept photo its area's bound cannot take (checked before the
        commit: FULL too, never recorded), is counted in catsdogs_labels_refused_total."""
        with self.written:
            self.written.wait_for(lambda: prediction_id not in self.pending, timeout)
        kind = "anonymous" if source == ANONYMOUS else "key"
        refused = self.no_room_for_photo(prediction_id, kind)
        if refused is not None:
            return self.refuse(kind, "label_area_full", "a labelled photo area is at its bound: new labels with a kept "
                               "photo are refused (503) until make harvest takes them"), refused  # fmt: skip
        try:
            outcome, record = self.store.give_feedback(prediction_id, label, source)
        except Exception:
            with self.unsettled_lock:
                self.unsettled[prediction_id] = (label, source)
                while len(self.unsettled) > UNSETTLED:
                    self.unsettled.popitem(last=False)
            raise
        with self.unsettled_lock:
            tried = self.unsettled.pop(prediction_id, None)
        if outcome is Feedback.FULL:
            full = self.refuse(kind, "label_store_full", "the feedback store holds as many labels waiting for harvest "
                               "as it may: new labels are refused (503) until make harvest takes them")  # fmt: skip
            return full, record
        mine = outcome is Feedback.REPEATED and record is not None and record.feedback_source == source
        if mine and tried == (label, source):
            outcome = Feedback.RECORDED  # the failed call committed: this is its first acknowledgement
        # the photo waits for harvest outside the cap and the retention, in its source's area (each with its own
        # bound: a client without a key never takes a key's room); a repeat keeps it too unless harvest took it
        settle = outcome in (Feedback.RECORDED, Feedback.REPLACED) or (mine and not record.harvested)
        if self.images and record and record.image and settle:
            try:
                kept = self.images.keep_labelled(record.image, AREAS[kind])
            except OSError as error:
                kept = False
                get_logger().warning("keeping a labelled photo failed", extra={"error": str(error)})
            if not kept:
                self.metrics.labelled_refused.labels(kind).inc()
                self.lose("labelled_not_kept", "a labelled photo could not be kept for harvest (gone already, or its "
                          "area's bound reached since the label's room was checked): run make harvest", 0)  # fmt: skip
        # a first label counts, and a key's label in place of an anonymous one counts for the keys
        if record is not None and (outcome is Feedback.RECORDED or (outcome is Feedback.REPLACED and kind == "key")):
            correct = label == record.label
            self.metrics.feedback.labels(label, str(correct).lower(), kind).inc()
            if self.prediction_log:
                try:
                    self.prediction_log.feedback(prediction_id, record.model_version, label, record.label, correct)
                except OSError as error:
                    self.lose("write_failed", f"writing the prediction log failed: {error}")
        return outcome, record

    def no_room_for_photo(self, prediction_id: str, kind: str) -> PredictionRecord | None:
        """The prediction when a label of this kind must be refused for its photo, else None: only when the label
        would be recorded (the prediction is open to it) and its photo, still kept, would pass its area's bound.
        Checked before the store commits, with keep_labelled itself, so the photo is linked before the label is
        acknowledged: a label never waits for harvest without its photo. A photo linked for a label the store then
        refuses or fails to commit is an orphan in the area, which make harvest removes after an hour (acceptable: it
        only holds room that long). A photo gone already (past the cap or the retention) is no bound: the label is
        recorded as before, counted as labelled_not_kept."""
        if not self.images:
            return None
        before = self.store.get(prediction_id)  # /feedback only: /predict never pays for this read
        if before is None or not before.image:
            return None
        if before.feedback is not None and (kind == "anonymous" or before.feedback_source not in (None, ANONYMOUS)):
            return None  # not open to this label: a repeat or a conflict, answered by the store as before
        try:
            if self.images.keep_labelled(before.image, AREAS[kind]):
                return None
        except OSError as error:  # not a bound: the label is recorded, its photo counted as not kept after it
            get_logger().warning("keeping a labelled photo failed", extra={"error": str(error)})
            return None
        return before if self.images.present(before.image) else None

    def refuse(self, kind: str, reason: str, message: str) -> Feedback:
        """A label refused at a bound (503 label_store_full): counted, and logged once per reason and source."""
        self.metrics.labels_refused.labels(kind).inc()
        if f"{reason}_{kind}" not in self.reported:
            self.reported.add(f"{reason}_{kind}")
            get_logger().warning(message, extra={"reason": reason, "source": kind})
        return Feedback.FULL

    def wait_idle(self, timeout: float = 5) -> bool:
        """Whether every queued prediction was recorded within `timeout` seconds (for tests and tools that read the
        metrics or the store right after predicting)."""
        with self.written:
            return self.written.wait_for(lambda: not self.pending, timeout)

    def close(self, timeout: float = 10) -> None:
        """Record what is queued (for at most `timeout` seconds), then close the store and the log."""
        with contextlib.suppress(queue.Full):
            self.queue.put(None, timeout=timeout)
        self.worker.join(timeout)
        self.calls.shutdown(wait=False, cancel_futures=True)
        self.store.close()
        if self.prediction_log:
            self.prediction_log.close()


@dataclass(frozen=True)
class Observation:
    record: PredictionRecord
    prediction: Prediction
    data: bytes  # empty when nothing keeps the upload
    content_type: str
    size: int  # the upload's size in bytes


def new_prediction_id(now: float | None = None) -> str:
    """128 random bits, then the time it was issued (ms, 6 bytes), URL-safe base64: 30 characters."""
    issued = int((now or time.time()) * 1000).to_bytes(6, "big")
    return base64.urlsafe_b64encode(secrets.token_bytes(16) + issued).decode().rstrip("=")


def issued_at(prediction_id: str) -> float | None:
    """When an id of this form says it was issued (seconds), None for anything else. Not proof of anything: a
    client may write any time; it only tells a prediction still on its way to the store from an unknown one."""
    try:
        raw = base64.urlsafe_b64decode(prediction_id.encode("ascii") + b"==")
    except (ValueError, UnicodeEncodeError):
        return None
    return int.from_bytes(raw[16:], "big") / 1000 if len(raw) == 22 and len(prediction_id) == 30 else None


def upload_type(headers: Mapping[str, str], filename: str) -> str:
    """The declared type: a raw body's Content-Type, else the one a browser derives from the part's file name."""
    declared = media_type(headers)
    if declared.startswith("image/"):
        return declared
    return guessed_type(posixpath.splitext(filename)[1].lower())


@functools.lru_cache(maxsize=256)
def guessed_type(suffix: str) -> str:
    """The type mimetypes gives a file name ending in `suffix` (bounded: a client names its own files)."""
    return mimetypes.guess_type(f"upload{suffix}")[0] or "application/octet-stream"


def observe(
    request: Request, uploads: list[tuple[str, bytes]], results: list[Prediction | ImageError]
) -> list[str | None]:
    """Record each prediction (errors are skipped) under an id the server issues (128 random bits and its issue
    time), and return the ids (None for an error): what POST /feedback takes. The request's X-Request-ID is kept
    beside it, for tracing."""
    observer: Observer = request.app.state.observer
    model: Model = request.app.state.model
    request_id: str = request.scope["state"]["request_id"]
    ids: list[str | None] = []
    for (filename, data), result in zip(uploads, results, strict=True):
        if not isinstance(result, Prediction):
            ids.append(None)
            continue
        ids.append(new_prediction_id())
        observer.record(ids[-1], request_id, model.version, result, data, upload_type(request.headers, filename))
    return ids

"""Prometheus metrics of the service, in a registry of its own (one per app)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5, 1.0, 2.5, 5.0)
CONFIDENCE_BUCKETS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 0.999, 1.0)


class Metrics:
    """Requests, latencies, predictions, confidence, in-flight requests and model state."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "catsdogs_http_requests",
            "HTTP requests by endpoint and status",
            ["method", "endpoint", "status"],
            registry=r,
        )
        self.request_latency = Histogram(
            "catsdogs_http_request_duration_seconds",
            "Request latency",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inference_latency = Histogram(
            "catsdogs_inference_duration_seconds",
            "onnxruntime session.run latency",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inference_cpu = Counter(
            "catsdogs_inference_cpu_seconds",
            "CPU time of the threads that decode, preprocess and run the model (the in-process path); the process's "
            "CPU less this is the service's own cost",
            registry=r,
        )
        self.predictions = Counter("catsdogs_predictions", "Predictions by label", ["label"], registry=r)
        self.confidence = Histogram(
            "catsdogs_prediction_confidence",
            "Probability of the predicted label",
            buckets=CONFIDENCE_BUCKETS,
            registry=r,
        )
        self.not_a_pet = Counter(
            "catsdogs_not_a_pet", "Answers whose photo is neither a cat nor a dog (is_pet false)", registry=r
        )
        self.in_flight = Gauge("catsdogs_http_requests_in_flight", "Requests being handled", registry=r)
        self.rejected = Counter(
            "catsdogs_requests_rejected", "Requests refused with 503 by backpressure, by reason", ["reason"], registry=r
        )
        for reason in ("overloaded", "queue_timeout"):
            self.rejected.labels(reason)
        self.labelled_bytes = Gauge(
            "catsdogs_labelled_photos_bytes", "Labelled photos waiting for make harvest, by label source (key or "
            "anonymous)", ["source"], registry=r,
        )  # fmt: skip
        self.labelled_max_bytes = Gauge(
            "catsdogs_labelled_photos_max_bytes", "The labelled photos' bound, by label source", ["source"], registry=r
        )
        self.labelled_refused = Counter(
            "catsdogs_labelled_photos_refused", "Labels whose photo could not be kept for harvest, by label source",
            ["source"], registry=r,
        )  # fmt: skip
        self.rate_limited = Counter(
            "catsdogs_rate_limited", "Requests refused with 429 past a rate limit, by route and client kind",
            ["route", "client"], registry=r,
        )  # fmt: skip
        self.admitted = Gauge(
            "catsdogs_inference_requests_admitted", "Inference requests admitted (running or waiting)", registry=r
        )
        self.held_bytes = Gauge(
            "catsdogs_request_body_bytes_held", "Request body bytes received and held (bounded by MAX_ADMITTED_BYTES)",
            registry=r,
        )  # fmt: skip
        self.queued = Gauge("catsdogs_inference_requests_queued", "Requests waiting for an inference slot", registry=r)
        self.model_loaded = Gauge("catsdogs_model_loaded", "1 when a model is loaded and warm", registry=r)
        self.model_info = Gauge(
            "catsdogs_model_info", "The served model", ["version", "precision", "sha256"], registry=r
        )
        self.feedback = Counter(
            "catsdogs_feedback", "Feedback by true label, whether the prediction was right, and whether it came with "
            "a key (source key) or without (anonymous)", ["label", "correct", "source"], registry=r,
        )  # fmt: skip
        self.labels_refused = Counter(
            "catsdogs_labels_refused", "Labels refused with 503 label_store_full: the store holds FEEDBACK_STORE_SIZE "
            "labels of their source (key or anonymous) that make harvest has not taken, or their photo area is at its "
            "bound", ["source"], registry=r,
        )  # fmt: skip
        for source in ("key", "anonymous"):
            self.labels_refused.labels(source)
        self.observations_lost = Counter(
            "catsdogs_observations_lost", "Predictions answered but not recorded (store, drift, log), by reason",
            ["reason"], registry=r,
        )  # fmt: skip
        for reason in ("queue_full", "write_failed"):
            self.observations_lost.labels(reason)
        self.drift_psi = Gauge(
            "catsdogs_drift_psi", "PSI of a signal over the drift window vs the model's reference", ["signal"],
            registry=r,
        )  # fmt: skip
        self.drift_window = Gauge(
            "catsdogs_drift_window_predictions", "Predictions in the drift window", ["signal"], registry=r
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)

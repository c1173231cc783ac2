"""The service's OpenAPI 3.1 document (`GET /openapi.json`), built from data: one function per route.

To document a new route, write a function returning its operation(s) and add one line to `paths()`.
Responses reuse `ok(...)` and `errors(...)`, so every documented response carries X-Request-ID and every error
has the one error schema.
"""

from __future__ import annotations

from typing import Any

from server.config import Settings

Schema = dict[str, Any]
IMAGE_TYPES = ("image/jpeg", "image/png", "image/webp", "image/bmp", "image/gif")
ERRORS = {
    400: "Empty, corrupt or undecodable image, or invalid multipart body",
    404: "No such path",
    405: "Method not allowed on this path (the Allow header lists the allowed ones)",
    413: "Body over MAX_UPLOAD_BYTES, too many files, or an image over its decode budget",
    415: "Content type or image format not accepted",
    422: "No file in the expected field",
    500: "The service failed (a bug): the response still carries X-Request-ID",
    503: "No model loaded, or at capacity / waited too long for an inference slot (with Retry-After)",
}


def ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def ok(description: str, schema: Schema | None = None, media_type: str = "application/json") -> Schema:
    response: Schema = {
        "description": description,
        "headers": {"X-Request-ID": {"$ref": "#/components/headers/RequestId"}},
    }
    if schema is not None:
        response["content"] = {media_type: {"schema": schema}}
    return response


def errors(*statuses: int) -> dict[str, Schema]:
    """The JSON error responses of an operation; 503s also say when to retry."""
    responses = {}
    for status in statuses:
        response = ok(ERRORS[status], ref("Error"))
        if status == 503:
            response["headers"]["Retry-After"] = {
                "description": "Seconds to wait before retrying (when the service is at capacity)",
                "schema": {"type": "string"},
            }
        responses[str(status)] = response
    return responses


def operation(summary: str, responses: dict[str, Schema], **extra: Any) -> Schema:
    return {"summary": summary, "operationId": extra.pop("operation_id"), **extra, "responses": responses}


# --- routes -------------------------------------------------------------------------------------------------------


def health(settings: Settings) -> Schema:
    body = {"type": "object", "required": ["status", "model_loaded"],
            "properties": {"status": {"const": "ok"}, "model_loaded": {"type": "boolean"}}}  # fmt: skip
    return {"get": operation("Liveness", {"200": ok("The process runs", body)}, operation_id="health")}


def ready(settings: Settings) -> Schema:
    body = {"type": "object", "required": ["status", "model_version", "precision"],
            "properties": {"status": {"const": "ready"}, "model_version": {"type": "string"},
                           "precision": {"type": "string"}}}  # fmt: skip
    responses = {"200": ok("The model is loaded and warm", body), **errors(503)}
    return {"get": operation("Readiness", responses, operation_id="ready")}


def model(settings: Settings) -> Schema:
    body = {"type": "object", "required": ["model_version", "sha256", "precision", "preprocess"],
            "properties": {"model_version": {"type": "string"}, "sha256": {"type": "string"},
                           "precision": {"type": "string"}, "preprocess": {"type": "object"}}}  # fmt: skip
    responses = {"200": ok("The model's metadata: labels, preprocessing, version, lineage", body), **errors(503)}
    return {"get": operation("Model metadata", responses, operation_id="model")}


def upload_body(field: str, settings: Settings, *, many: bool) -> Schema:
    binary = {"type": "string", "format": "binary"}
    files = {"type": "array", "items": binary, "minItems": 1, "maxItems": settings.max_batch_files} if many else binary
    content: Schema = {
        "multipart/form-data": {
            "schema": {"type": "object", "required": [field], "properties": {field: files}},
            "encoding": {field: {"contentType": ", ".join(IMAGE_TYPES)}},
        }
    }
    if not many:
        content.update({media_type: {"schema": {"type": "string", "format": "binary"}} for media_type in IMAGE_TYPES})
    limit = f"at most {settings.max_upload_bytes} bytes in all"
    return {"required": True, "description": f"JPEG, PNG, WebP, BMP or GIF (first frame); {limit}", "content": content}


def predict(settings: Settings) -> Schema:
    responses = {"200": ok("The prediction", ref("Prediction")), **errors(400, 413, 415, 422, 503)}
    post = operation("Classify one photo", responses, operation_id="predict",
                     requestBody=upload_body("file", settings, many=False))  # fmt: skip
    return {"post": post}


def predict_batch(settings: Settings) -> Schema:
    responses = {"200": ok("One result per file, in order; a bad file gets an error entry", ref("BatchResult")),
                 **errors(400, 413, 415, 422, 503)}  # fmt: skip
    post = operation(f"Classify up to {settings.max_batch_files} photos", responses, operation_id="predict_batch",
                     requestBody=upload_body("files", settings, many=True))  # fmt: skip
    return {"post": post}


def metrics(settings: Settings) -> Schema:
    responses = {"200": ok("Prometheus text exposition", {"type": "string"}, "text/plain")}
    return {"get": operation("Prometheus metrics", responses, operation_id="metrics")}


def openapi(settings: Settings) -> Schema:
    responses = {"200": ok("This document", {"type": "object"})}
    return {"get": operation("The OpenAPI document", responses, operation_id="openapi")}


def paths(settings: Settings) -> dict[str, Schema]:
    return {
        "/health": health(settings),
        "/ready": ready(settings),
        "/model": model(settings),
        "/predict": predict(settings),
        "/predict/batch": predict_batch(settings),
        "/metrics": metrics(settings),
        "/openapi.json": openapi(settings),
    }


# --- shared schemas -----------------------------------------------------------------------------------------------


def schemas() -> dict[str, Schema]:
    probabilities = {"type": "object", "additionalProperties": {"type": "number", "minimum": 0, "maximum": 1}}
    prediction = {
        "type": "object",
        "required": ["label", "probabilities", "model_version", "latency_ms"],
        "properties": {"label": {"type": "string"}, "probabilities": probabilities,
                       "model_version": {"type": "string"}, "latency_ms": {"type": "number", "minimum": 0}},
    }  # fmt: skip
    detail = {
        "type": "object",
        "required": ["code", "message"],
        "properties": {"code": {"type": "string"}, "message": {"type": "string"}},
        "additionalProperties": False,
    }
    error = {"type": "object", "required": ["error"], "properties": {"error": detail}, "additionalProperties": False}
    named = {"type": "object", "required": ["file"], "properties": {"file": {"type": "string"}}}
    item = {"anyOf": [
        {"allOf": [ref("Prediction"), named]},
        {"type": "object", "required": ["file", "error"],
         "properties": {"file": {"type": "string"}, "error": detail}},
    ]}  # fmt: skip
    batch = {
        "type": "object",
        "required": ["results", "model_version", "count", "errors"],
        "properties": {"results": {"type": "array", "items": item}, "model_version": {"type": "string"},
                       "count": {"type": "integer", "minimum": 0}, "errors": {"type": "integer", "minimum": 0}},
    }  # fmt: skip
    return {"Error": error, "Prediction": prediction, "BatchResult": batch}


def document(settings: Settings, version: str = "0.1.0") -> Schema:
    """The whole OpenAPI 3.1 document for these settings (limits appear in the schemas)."""
    return {
        "openapi": "3.1.0",
        "info": {"title": "catsdogs", "version": version,
                 "description": "Cat or dog? A photo classifier: errors are {\"error\": {\"code\", \"message\"}}."},
        "paths": paths(settings),
        "components": {
            "schemas": schemas(),
            "headers": {"RequestId": {
                "description": "The request's id: the client's X-Request-ID when it is 1-128 of [A-Za-z0-9._:-], "
                               "else a generated one", "schema": {"type": "string"}}},
        },
    }  # fmt: skip

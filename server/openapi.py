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
    401: "A wrong, revoked or malformed key in Authorization, or none where a key is required (WWW-Authenticate)",
    403: "The key lacks the scope this route needs",
    429: "Past this client's rate limit (a key's, or an anonymous address's; with Retry-After)",
    404: "No such path, or no recent prediction with this request id",
    405: "Method not allowed on this path (the Allow header lists the allowed ones)",
    413: "Body over MAX_UPLOAD_BYTES, too many files, or an image over its decode budget",
    415: "Content type or image format not accepted",
    409: "The prediction already has a different feedback label",
    422: "No file in the expected field, or a label the model does not have",
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
        if status in (429, 503):
            response["headers"]["Retry-After"] = {
                "description": "Seconds to wait before retrying (at capacity, or past a rate limit)",
                "schema": {"type": "string"},
            }
        if status in (401, 403):
            response["headers"]["WWW-Authenticate"] = {"description": "RFC 6750's Bearer challenge",
                                                       "schema": {"type": "string"}}  # fmt: skip
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
                           "precision": {"type": "string"}, "model_sha256": {"type": "string"},
                           "instance": {"type": "string", "description": "the answering container"}}}  # fmt: skip
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


def security(settings: Settings, needed: bool) -> list[Schema]:
    """A Bearer key (make api-key), needed or optional (anonymous allowed)."""
    return [{"bearer": []}] if needed else [{}, {"bearer": []}]


def predict(settings: Settings) -> Schema:
    responses = {"200": ok("The prediction", ref("Prediction")), **errors(400, 401, 403, 413, 415, 422, 429, 503)}
    post = operation("Classify one photo", responses, operation_id="predict",
                     requestBody=upload_body("file", settings, many=False),
                     security=security(settings, settings.predict_requires_key))  # fmt: skip
    return {"post": post}


def predict_batch(settings: Settings) -> Schema:
    responses = {"200": ok("One result per file, in order; a bad file gets an error entry", ref("BatchResult")),
                 **errors(400, 401, 403, 413, 415, 422, 429, 503)}  # fmt: skip
    post = operation(f"Classify up to {settings.max_batch_files} photos", responses, operation_id="predict_batch",
                     requestBody=upload_body("files", settings, many=True),
                     security=security(settings, settings.predict_requires_key))  # fmt: skip
    return {"post": post}


def metrics(settings: Settings) -> Schema:
    responses = {"200": ok("Prometheus text exposition", {"type": "string"}, "text/plain")}
    return {"get": operation("Prometheus metrics", responses, operation_id="metrics")}


def openapi(settings: Settings) -> Schema:
    responses = {"200": ok("This document", {"type": "object"})}
    return {"get": operation("The OpenAPI document", responses, operation_id="openapi")}


def page(settings: Settings) -> Schema:
    responses = {"200": ok("The page for people (static HTML with a strict Content-Security-Policy)",
                           {"type": "string"}, "text/html")}  # fmt: skip
    return {"get": operation("The web page", responses, operation_id="page")}


def feedback(settings: Settings, labels: list[str] | None) -> Schema:
    label = {"enum": labels} if labels else {"type": "string"}
    body = {"type": "object", "required": ["prediction_id", "label"],
            "properties": {"prediction_id": {"type": "string", "minLength": 1, "maxLength": 128},
                           "label": label}}  # fmt: skip
    answer = {"type": "object", "required": ["prediction_id", "label", "predicted", "correct", "model_version"],
              "properties": {"prediction_id": {"type": "string"}, "label": {"type": "string"},
                             "predicted": {"type": "string"}, "correct": {"type": "boolean"},
                             "model_version": {"type": "string"},
                             "source": {"type": "string", "description": "the key's name, or anonymous"}}}  # fmt: skip
    responses = {"200": ok("Recorded (a repeat of the same label is counted once)", answer),
                 **errors(400, 401, 403, 404, 409, 413, 415, 422, 429, 503)}  # fmt: skip
    request = {"required": True, "content": {"application/json": {"schema": body}}}
    return {"post": operation("The true label of a recent prediction: with a key of the label scope it may become "
                              "training data; anonymous, only through a person's review", responses,
                              operation_id="feedback", requestBody=request,
                              security=security(settings, False))}  # fmt: skip


# --- Open Inference Protocol (KServe V2): errors are {"error": "message"} -------------------------------------------

V2_ERRORS = {"400": "Bad inference request or an unusable image", "404": "Unknown model or version",
             "413": "Body over MAX_UPLOAD_BYTES, too many images, or an image over its decode budget",
             "415": "An image format that is not accepted",
             "401": "A wrong or missing key (PREDICT_REQUIRES_KEY=true)", "403": "The key lacks the predict scope",
             "429": "Past this client's rate limit (Retry-After)",
             "503": "No model loaded, or at capacity (with Retry-After)"}  # fmt: skip


def v2_errors(*statuses: int) -> dict[str, Schema]:
    return {str(s): ok(V2_ERRORS[str(s)], ref("V2Error")) for s in statuses}


def path_parameters(names: list[str], version: str | None) -> list[Schema]:
    """The V2 path parameters: the one model name this server serves, and the loaded model's version."""
    values = {"model_name": {"enum": ["catsdogs"]}, "model_version": {"enum": [version]} if version else {}}
    return [{"name": n, "in": "path", "required": True, "schema": {"type": "string", **values[n]}} for n in names]


def v2_get(summary: str, operation_id: str, *statuses: int, params: list[Schema] = ()) -> Schema:
    responses = {"200": ok(summary, {"type": "object"}), **v2_errors(*statuses)}
    get = operation(summary, responses, operation_id=operation_id)
    if params:
        get["parameters"] = list(params)
    return {"get": get}


def v2_infer(operation_id: str, params: list[Schema]) -> Schema:
    tensor = {"type": "object", "required": ["name", "datatype", "shape"],
              "properties": {"name": {"type": "string"}, "datatype": {"type": "string"},
                             "shape": {"type": "array", "items": {"type": "integer"}},
                             "data": {"type": "array"}, "parameters": {"type": "object"}}}  # fmt: skip
    header = {"type": "object", "required": ["inputs"],
              "properties": {"id": {"type": "string"}, "inputs": {"type": "array", "items": tensor},
                             "outputs": {"type": "array", "items": {"type": "object"}}}}  # fmt: skip
    request = {"required": True, "description": "JSON with base64 BYTES data, or the binary tensor data extension "
               "(Inference-Header-Content-Length)", "content": {
                   "application/json": {"schema": header},
                   "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}  # fmt: skip
    responses = {"200": ok("Outputs probabilities, label (and pet_score, is_pet when the model gives them)",
                           {"type": "object"}), **v2_errors(400, 401, 403, 404, 413, 415, 429, 503)}  # fmt: skip
    post = operation("V2 inference on encoded images", responses, operation_id=operation_id, requestBody=request)
    post["parameters"] = params
    return {"post": post}


def v2_paths(model_version: str | None) -> dict[str, Schema]:
    model, version = "/v2/models/{model_name}", "/v2/models/{model_name}/versions/{model_version}"
    one, both = (
        path_parameters(["model_name"], model_version),
        path_parameters(["model_name", "model_version"], model_version),
    )
    return {
        "/v2/health/live": v2_get("V2 liveness", "v2_live"),
        "/v2/health/ready": v2_get("V2 readiness", "v2_ready", 503),
        "/v2": v2_get("V2 server metadata", "v2_server_metadata"),
        model: v2_get("V2 model metadata", "v2_model_metadata", 404, 503, params=one),
        version: v2_get("V2 model metadata (version)", "v2_version_metadata", 404, 503, params=both),
        f"{model}/ready": v2_get("V2 model readiness", "v2_model_ready", 404, 503, params=one),
        f"{version}/ready": v2_get("V2 model readiness (version)", "v2_version_ready", 404, 503, params=both),
        f"{model}/infer": v2_infer("v2_infer", one),
        f"{version}/infer": v2_infer("v2_version_infer", both),
    }


def paths(settings: Settings, labels: list[str] | None = None, model_version: str | None = None) -> dict[str, Schema]:
    return {
        "/health": health(settings),
        "/ready": ready(settings),
        "/model": model(settings),
        "/predict": predict(settings),
        "/predict/batch": predict_batch(settings),
        "/metrics": metrics(settings),
        "/openapi.json": openapi(settings),
        "/": page(settings),
        "/feedback": feedback(settings, labels),
        **v2_paths(model_version),
    }


# --- shared schemas -----------------------------------------------------------------------------------------------


def schemas() -> dict[str, Schema]:
    probabilities = {"type": "object", "additionalProperties": {"type": "number", "minimum": 0, "maximum": 1}}
    prediction = {
        "type": "object",
        "required": ["label", "probabilities", "model_version", "latency_ms"],
        "properties": {"label": {"type": "string"}, "probabilities": probabilities,
                       "is_pet": {"type": ["boolean", "null"],
                                  "description": "false: neither a cat nor a dog, do not trust label; null: the "
                                                 "model has no pet output"},
                       "pet_score": {"type": ["number", "null"], "minimum": 0, "maximum": 1},
                       "prediction_id": {"type": ["string", "null"],
                                         "description": "issued by the service: what POST /feedback takes"},
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
    v2_error = {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}}
    return {"Error": error, "V2Error": v2_error, "Prediction": prediction, "BatchResult": batch}


def document(
    settings: Settings, labels: list[str] | None = None, model_version: str | None = None, version: str = "0.1.0"
) -> Schema:
    """The whole OpenAPI 3.1 document for these settings (limits appear in the schemas)."""
    return {
        "openapi": "3.1.0",
        "info": {"title": "catsdogs", "version": version,
                 "description": "Cat or dog? A photo classifier: errors are {\"error\": {\"code\", \"message\"}}."},
        "paths": paths(settings, labels, model_version),
        "components": {
            "schemas": schemas(),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                           "description": "a key from `make api-key` (API_KEYS_FILE)"}},
            "headers": {"RequestId": {
                "description": "The request's id: the client's X-Request-ID when it is 1-128 of [A-Za-z0-9._:-], "
                               "else a generated one", "schema": {"type": "string"}}},
        },
    }  # fmt: skip

"""The Open Inference Protocol (KServe V2 REST) beside the service's own API, on the same model path and metrics.

Input `image`: encoded image files as a BYTES tensor of shape [N], sent with the binary tensor data extension
(`Inference-Header-Content-Length`, each element a 4-byte little-endian length and its bytes) or as JSON `data`
holding base64 strings. Outputs: `probabilities` (FP32 [N, labels], in the label order the metadata gives),
`label` (BYTES [N]) and, when the model gives them, `pet_score` (FP32 [N]) and `is_pet` (BOOL [N]).
Errors follow the protocol: {"error": "message"}.
"""

from __future__ import annotations

import base64
import binascii
import json
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.to_thread
import numpy as np
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from imaging import ImageError
from server.access import check_predict
from server.admission import refuse_early
from server.bodies import read_body
from server.errors import ClientError
from server.inference import predict_images, require_model
from server.model import Model, Prediction
from server.observer import observe

MODEL_NAME = "catsdogs"
INPUT_NAME = "image"
HEADER_LENGTH = "inference-header-content-length"
LENGTH_PREFIX = struct.Struct("<I")
MAX_INT_DIGITS = 18  # an integer in a request is a count or a size: anything longer is malformed


@dataclass(frozen=True)
class OutputTensor:
    """One output tensor: its datatype, the shape of one item, and how to read it from a prediction."""

    name: str
    datatype: str
    item_shape: Callable[[Model], list[int]]
    value: Callable[[Prediction, Model], Any]  # None: this model does not give it


OUTPUTS = (
    OutputTensor(
        "probabilities", "FP32", lambda m: [len(m.labels)], lambda p, m: [p.probabilities[x] for x in m.labels]
    ),
    OutputTensor("label", "BYTES", lambda m: [], lambda p, m: p.label),
    OutputTensor("pet_score", "FP32", lambda m: [], lambda p, m: p.pet_score),
    OutputTensor("is_pet", "BOOL", lambda m: [], lambda p, m: p.is_pet),
)
PET_OUTPUTS = frozenset({"pet_score", "is_pet"})
NUMPY_TYPES = {"FP32": np.dtype("<f4"), "BOOL": np.dtype(np.bool_)}


def bad_request(message: str) -> ClientError:
    return ClientError(400, "invalid_inference_request", message)


def served_model(request: Request) -> Model:
    """The loaded model, if the path names it (and the version, when given, is the one loaded)."""
    name = request.path_params["model_name"]
    if name != MODEL_NAME:
        raise ClientError(404, "unknown_model", f"unknown model '{name}'; this server serves '{MODEL_NAME}'")
    model = require_model(request)
    version = request.path_params.get("model_version")
    if version is not None and version != model.version:
        raise ClientError(404, "unknown_version", f"model '{name}' has version '{model.version}', not '{version}'")
    return model


def model_outputs(model: Model) -> list[OutputTensor]:
    """The outputs this model gives: the pet outputs only when the model has a pet head."""
    return list(OUTPUTS) if model.has_pet_output else [o for o in OUTPUTS if o.name not in PET_OUTPUTS]


# --- request ------------------------------------------------------------------------------------------------------


def no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(f"an integer of more than {MAX_INT_DIGITS} digits")
    return int(text)


def strict_json(data: bytes) -> object:
    """JSON as RFC 8259 has it: NaN and Infinity (which Python's json accepts) and absurdly long integers refused."""
    return json.loads(data, parse_constant=no_constant, parse_int=bounded_int)


def split_body(body: memoryview, header_length: str | None) -> tuple[dict[str, Any], memoryview]:
    """The JSON inference header and a view of the binary tensor data after it (no copy of the data)."""
    size = len(body)
    if header_length is not None:
        if not (header_length.isascii() and header_length.isdigit()) or int(header_length) > len(body):
            raise bad_request(f"Inference-Header-Content-Length {header_length!r} is not a length within the body")
        size = int(header_length)
    try:
        header = strict_json(body[:size].tobytes())
    except (ValueError, UnicodeDecodeError, RecursionError) as error:  # JSONDecodeError is a ValueError
        raise bad_request(f"the inference header is not JSON: {error}") from None
    if not isinstance(header, dict):
        raise bad_request("the inference header must be a JSON object")
    if "id" in header and not isinstance(header["id"], str):
        raise bad_request(f"the request 'id' must be a string, not {header['id']!r}")
    return header, body[size:] if size < len(body) else memoryview(b"")  # an empty view must not keep the body


def bytes_elements(data: memoryview, count: int) -> list[bytes]:
    """BYTES tensor data in the binary extension: each element a 4-byte little-endian length, then its bytes."""
    elements: list[bytes] = []
    offset = 0
    while offset < len(data):
        if len(elements) == count:
            raise bad_request(f"binary data for '{INPUT_NAME}' holds more than the {count} elements of its shape")
        if offset + LENGTH_PREFIX.size > len(data):
            raise bad_request(f"binary data for '{INPUT_NAME}' ends inside a length prefix")
        (length,) = LENGTH_PREFIX.unpack_from(data, offset)
        offset += LENGTH_PREFIX.size
        if offset + length > len(data):
            raise bad_request(f"binary element {len(elements)} of '{INPUT_NAME}' claims {length} bytes past the end")
        elements.append(data[offset : offset + length].tobytes())
        offset += length
    return elements


def base64_elements(data: object) -> list[bytes]:
    """JSON `data` of a BYTES tensor: base64 strings, flat ([N]) or one per row ([N, 1])."""
    strings = [x[0] if isinstance(x, list) and len(x) == 1 else x for x in data] if isinstance(data, list) else None
    if not strings or not all(isinstance(s, str) for s in strings):
        raise bad_request(f"'{INPUT_NAME}' data must be a non-empty list of base64 strings")
    try:
        return [base64.b64decode(s, validate=True) for s in strings]
    except (binascii.Error, ValueError):
        raise bad_request(f"'{INPUT_NAME}' data holds a string that is not base64") from None


def is_count(value: object) -> bool:
    return type(value) is int and value > 0  # type(): a JSON true is not a count


def image_input(header: dict[str, Any], binary: memoryview, max_elements: int) -> list[bytes]:
    """The encoded images of the request's one input, checked against its datatype, shape and the limits."""
    inputs = header.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise bad_request(f"send exactly one input, '{INPUT_NAME}'")
    tensor = inputs[0]
    if tensor.get("name") != INPUT_NAME or tensor.get("datatype") != "BYTES":
        raise bad_request(f"the input must be '{INPUT_NAME}' with datatype BYTES, not {tensor.get('name')!r} "
                          f"{tensor.get('datatype')!r}")  # fmt: skip
    shape = tensor.get("shape")
    if not (isinstance(shape, list) and len(shape) in (1, 2) and all(is_count(d) for d in shape)
            and shape[1:] in ([], [1])):  # fmt: skip
        raise bad_request(f"'{INPUT_NAME}' shape must be [N] (or [N, 1]), not {shape!r}")
    if shape[0] > max_elements:
        raise ClientError(413, "too_many_files", f"at most {max_elements} images per request, not {shape[0]}")
    parameters = tensor.get("parameters", {})
    if not isinstance(parameters, dict):
        raise bad_request(f"'{INPUT_NAME}' parameters must be an object")
    size = parameters.get("binary_data_size")
    if size is not None:
        if type(size) is not int or size != len(binary):
            raise bad_request(f"binary_data_size {size!r} does not match the {len(binary)} bytes after the header")
        images = bytes_elements(binary, shape[0])
    elif binary:
        raise bad_request("binary data follows the header but no input declares binary_data_size")
    else:
        images = base64_elements(tensor.pop("data", None))  # the strings go as soon as they are decoded
    if len(images) != shape[0]:
        raise bad_request(f"'{INPUT_NAME}' has shape {shape} but {len(images)} elements")
    return images


def flag(options: dict[str, Any], name: str, default: bool) -> bool:
    """A boolean parameter: absent is the default, anything but a JSON boolean is refused."""
    value = options.get(name, default)
    if not isinstance(value, bool):
        raise bad_request(f"parameter {name!r} must be true or false, not {value!r}")
    return value


def parse_request(
    holder: list[bytes], header_length: str | None, model: Model, max_elements: int
) -> tuple[dict[str, Any], list[bytes], list[tuple[OutputTensor, bool]]]:
    """The inference header, the images and the requested outputs, every field checked before any inference. Runs
    in a worker thread (a 10 MiB JSON body takes a while). The body is taken out of `holder`, so nothing else keeps
    it: at most about twice the body is held while it is parsed, then the images alone."""
    body = memoryview(holder.pop())
    header, binary = split_body(body, header_length)
    del body  # JSON: the body is freed before its base64 strings are decoded; binary: once the images are copied out
    images = image_input(header, binary, max_elements)
    del binary
    outputs = requested_outputs(header, model_outputs(model))
    header.pop("inputs", None)
    return header, images, outputs


def requested_outputs(header: dict[str, Any], available: list[OutputTensor]) -> list[tuple[OutputTensor, bool]]:
    """(output, as binary) for each output the request asks for; all of them when it names none."""
    parameters = header.get("parameters", {})
    if not isinstance(parameters, dict):
        raise bad_request("the request 'parameters' must be an object")
    binary_default = flag(parameters, "binary_data_output", False)
    requested = header.get("outputs")
    if requested is None:
        return [(output, binary_default) for output in available]
    by_name = {output.name: output for output in available}
    chosen: list[tuple[OutputTensor, bool]] = []
    for item in requested if isinstance(requested, list) else [None]:
        name = item.get("name") if isinstance(item, dict) else None
        if name not in by_name:
            raise bad_request(f"unknown output {name!r}; this model gives {', '.join(by_name)}")
        options = item.get("parameters", {})
        if not isinstance(options, dict):
            raise bad_request(f"output {name!r} parameters must be an object")
        chosen.append((by_name[name], flag(options, "binary_data", binary_default)))
    return chosen


# --- response -----------------------------------------------------------------------------------------------------


def output_tensor(
    output: OutputTensor, model: Model, predictions: list[Prediction], binary: bool
) -> tuple[dict, bytes]:
    """The output's JSON description and, when binary, its raw bytes."""
    values = [output.value(prediction, model) for prediction in predictions]
    tensor: dict[str, Any] = {
        "name": output.name,
        "datatype": output.datatype,
        "shape": [len(predictions), *output.item_shape(model)],
    }
    if output.datatype == "BYTES":
        raw = [str(value).encode() for value in values]
        if not binary:
            tensor["data"] = [value.decode() for value in raw]
            return tensor, b""
        data = b"".join(LENGTH_PREFIX.pack(len(value)) + value for value in raw)
    else:
        array = np.asarray(values, dtype=NUMPY_TYPES[output.datatype])
        if not binary:
            tensor["data"] = array.ravel().tolist()
            return tensor, b""
        data = array.tobytes()
    tensor["parameters"] = {"binary_data_size": len(data)}
    return tensor, data


def infer_response(header: dict[str, Any], model: Model, outputs: list[tuple[OutputTensor, bool]],
                   predictions: list[Prediction], prediction_ids: list[str]) -> Response:  # fmt: skip
    body: dict[str, Any] = {"model_name": MODEL_NAME, "model_version": model.version}
    if "id" in header:
        body["id"] = header["id"]
    body["parameters"] = {"prediction_ids": prediction_ids}  # for POST /feedback, one per image
    tensors, chunks = [], []
    for output, binary in outputs:
        tensor, data = output_tensor(output, model, predictions, binary)
        tensors.append(tensor)
        chunks.append(data)
    body["outputs"] = tensors
    if not any(chunks):
        return JSONResponse(body)
    head = json.dumps(body).encode()
    return Response(
        head + b"".join(chunks),
        media_type="application/octet-stream",
        headers={"Inference-Header-Content-Length": str(len(head))},
    )


# --- endpoints ----------------------------------------------------------------------------------------------------


async def server_live(request: Request) -> Response:
    return JSONResponse({"live": True})


async def server_ready(request: Request) -> Response:
    ready = request.app.state.model is not None
    return JSONResponse({"ready": ready}, status_code=200 if ready else 503)


async def server_metadata(request: Request) -> Response:
    return JSONResponse({"name": MODEL_NAME, "version": "2", "extensions": ["binary_tensor_data"]})


async def model_ready(request: Request) -> Response:
    model = served_model(request)
    return JSONResponse({"name": MODEL_NAME, "version": model.version, "ready": True})


async def model_metadata(request: Request) -> Response:
    model = served_model(request)
    outputs = []
    for output in model_outputs(model):
        tensor: dict[str, Any] = {"name": output.name, "datatype": output.datatype,
                                  "shape": [-1, *output.item_shape(model)]}  # fmt: skip
        if output.name == "probabilities":
            tensor["parameters"] = {"labels": model.labels}
        outputs.append(tensor)
    return JSONResponse({
        "name": MODEL_NAME,
        "versions": [model.version],
        "platform": "onnxruntime_onnx",
        "inputs": [{"name": INPUT_NAME, "datatype": "BYTES", "shape": [-1]}],
        "outputs": outputs,
        "parameters": {"sha256": model.sha256, "precision": model.precision, "content": "encoded image files"},
    })  # fmt: skip


async def infer(request: Request) -> Response:
    """POST /v2/models/catsdogs/infer: the same budgets, preprocessing, inference and metrics as /predict."""
    model = served_model(request)
    settings = request.app.state.settings
    check_predict(request)
    await refuse_early(request)  # every inference place taken: 503 before the body is read
    holder = [await read_body(request, settings.max_upload_bytes)]
    # parsing holds the body a second time (its JSON strings, or the images copied out): count it (503 past the bound)
    request.app.state.admission.hold(request.scope, len(holder[0]))
    header, images, outputs = await anyio.to_thread.run_sync(
        parse_request, holder, request.headers.get(HEADER_LENGTH), model, settings.max_batch_files
    )
    results = await predict_images(request, images)
    request.scope["state"]["log"] = {"protocol": "v2", "images": len(images)}
    predictions: list[Prediction] = []
    for index, result in enumerate(results):
        if isinstance(result, ImageError):
            raise ClientError(result.status, result.code, f"{INPUT_NAME}[{index}]: {result.message}")
        predictions.append(result)
    # recorded like /predict (one image) and /predict/batch (several): feedback, drift and the prediction log
    uploads = [(f"{INPUT_NAME}[{i}]", data) for i, data in enumerate(images)]
    prediction_ids = [str(item) for item in observe(request, uploads, results)]
    return infer_response(header, model, outputs, predictions, prediction_ids)


MODEL = "/v2/models/{model_name}"
VERSION = "/v2/models/{model_name}/versions/{model_version}"
ROUTES = [
    Route("/v2/health/live", server_live, methods=["GET"]),
    Route("/v2/health/ready", server_ready, methods=["GET"]),
    Route("/v2", server_metadata, methods=["GET"]),
    *(Route(base, model_metadata, methods=["GET"]) for base in (MODEL, VERSION)),
    *(Route(f"{base}/ready", model_ready, methods=["GET"]) for base in (MODEL, VERSION)),
    *(Route(f"{base}/infer", infer, methods=["POST"]) for base in (MODEL, VERSION)),
]

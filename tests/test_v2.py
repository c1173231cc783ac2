"""The Open Inference Protocol (KServe V2) driven by NVIDIA's own client, tritonclient.http, against real uvicorn."""

from __future__ import annotations

import base64
import hashlib
import json
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import httpx2 as httpx
import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from tests.conftest import ROOT
from tests.images import photo_bytes
from tests.service import Service
from tests.test_app import metric

PHOTOS = ["cats/cat.1.jpg", "dogs/dog.1.jpg", "cats/cat.2.jpg", "dogs/dog.2.jpg", "cats/cat.90004.jpg"]
MAX_FILES, MAX_BYTES = 8, 400_000
NOT_A_PET = ROOT.parent / "shared" / "datasets" / "not-pets-dev" / "imagenet_002_great_white_shark.jpg"


@pytest.fixture(scope="module")
def service(onnx_model: Path) -> Iterator[Service]:
    running = Service(onnx_model, MAX_BATCH_FILES=str(MAX_FILES), MAX_UPLOAD_BYTES=str(MAX_BYTES))
    running.wait_ready()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(service: Service) -> Iterator[triton.InferenceServerClient]:
    with triton.InferenceServerClient(url=service.url.removeprefix("http://"), connection_timeout=30) as c:
        yield c


def image_input(images: list[bytes], binary: bool = True) -> triton.InferInput:
    """Binary tensor data, or JSON `data` (which must be text: base64)."""
    tensor = triton.InferInput("image", [len(images)], "BYTES")
    elements = images if binary else [base64.b64encode(image) for image in images]
    tensor.set_data_from_numpy(np.array(elements, dtype=np.object_), binary_data=binary)
    return tensor


def predict_endpoint(service: Service, image: bytes) -> dict:
    response = httpx.post(f"{service.url}/predict", files={"file": ("photo.jpg", image, "image/jpeg")}, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def test_health_and_server_metadata(client, service):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("catsdogs")
    assert not client.is_model_ready("dogscats")
    metadata = client.get_server_metadata()
    assert metadata["name"] == "catsdogs" and "binary_tensor_data" in metadata["extensions"]


def test_model_metadata_describes_input_outputs_and_label_order(client, service, onnx_model):
    metadata = client.get_model_metadata("catsdogs")
    version = httpx.get(f"{service.url}/ready").json()["model_version"]
    assert metadata["name"] == "catsdogs" and metadata["versions"] == [version]
    assert metadata["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": [-1]}]
    outputs = {o["name"]: o for o in metadata["outputs"]}
    assert outputs["probabilities"]["datatype"] == "FP32" and outputs["probabilities"]["shape"] == [-1, 2]
    assert outputs["probabilities"]["parameters"]["labels"] == ["cat", "dog"]
    assert outputs["label"] == {"name": "label", "datatype": "BYTES", "shape": [-1]}
    assert metadata["parameters"]["sha256"] == hashlib.sha256(onnx_model.read_bytes()).hexdigest()
    assert client.get_model_metadata("catsdogs", model_version=version)["versions"] == [version]
    with pytest.raises(InferenceServerException, match="not 'nope'") as error:
        client.get_model_metadata("catsdogs", model_version="nope")
    assert error.value.status() == "404"


def test_ready_reports_the_model_sha256(service, onnx_model):
    ready = httpx.get(f"{service.url}/ready").json()
    assert ready["model_sha256"] == hashlib.sha256(onnx_model.read_bytes()).hexdigest()


@pytest.mark.parametrize("names", [PHOTOS[:1], PHOTOS], ids=["single", "batch"])
def test_binary_inference_equals_predict(client, service, names):
    images = [photo_bytes(name) for name in names]
    result = client.infer("catsdogs", [image_input(images)], request_id="req-7")
    response = result.get_response()
    assert response["id"] == "req-7" and response["model_name"] == "catsdogs"
    assert all("binary_data_size" in o["parameters"] for o in response["outputs"])  # all outputs came binary
    probabilities, labels = result.as_numpy("probabilities"), result.as_numpy("label")
    assert probabilities.dtype == np.float32 and probabilities.shape == (len(images), 2)
    assert labels.shape == (len(images),)
    for image, row, label in zip(images, probabilities, labels, strict=True):
        expected = predict_endpoint(service, image)
        assert label.decode() == expected["label"]
        np.testing.assert_allclose(row, [expected["probabilities"][x] for x in ("cat", "dog")], rtol=1e-6, atol=1e-7)
    assert [label.decode() for label in labels] == [name.split("/")[0][:-1] for name in names]


def test_json_base64_input_and_requested_outputs(service):
    images = [photo_bytes(name) for name in PHOTOS[:2]]
    request = {
        "id": "json-1",
        "inputs": [{"name": "image", "datatype": "BYTES", "shape": [2],
                    "data": [base64.b64encode(image).decode() for image in images]}],
        "outputs": [{"name": "label"}],
    }  # fmt: skip
    response = httpx.post(f"{service.url}/v2/models/catsdogs/infer", json=request, timeout=30,
                          headers={"X-Request-ID": "json-req"})  # fmt: skip
    assert response.status_code == 200, response.text
    ids = response.json()["parameters"]["prediction_ids"]
    assert response.json() == {
        "model_name": "catsdogs",
        "model_version": httpx.get(f"{service.url}/ready").json()["model_version"],
        "id": "json-1",
        "parameters": {"prediction_ids": ids},
        "outputs": [{"name": "label", "datatype": "BYTES", "shape": [2], "data": ["cat", "dog"]}],
    }
    assert len(set(ids)) == 2 and all(len(i) >= 22 and "json-req" not in i for i in ids)  # the server's, not ours


def test_requested_outputs_subset_with_binary_per_output(client, service):
    images = [photo_bytes(name) for name in PHOTOS[:2]]
    outputs = [triton.InferRequestedOutput("probabilities", binary_data=False)]
    result = client.infer("catsdogs", [image_input(images, binary=False)], outputs=outputs)
    response = result.get_response()
    assert [o["name"] for o in response["outputs"]] == ["probabilities"]
    assert len(response["outputs"][0]["data"]) == 4 and "parameters" not in response["outputs"][0]
    assert result.as_numpy("label") is None
    np.testing.assert_allclose(result.as_numpy("probabilities").sum(axis=1), 1, atol=1e-5)
    mixed = [triton.InferRequestedOutput("label", binary_data=True), triton.InferRequestedOutput("probabilities")]
    result = client.infer("catsdogs", [image_input(images)], outputs=mixed, model_version="")
    assert [x.decode() for x in result.as_numpy("label")] == ["cat", "dog"]


def test_a_non_image_is_a_400_naming_the_element(client):
    images = [photo_bytes(PHOTOS[0]), b"<html>not an image</html>"]
    with pytest.raises(InferenceServerException, match=r"image\[1\]: the file is not") as error:
        client.infer("catsdogs", [image_input(images)])
    assert error.value.status() == "400"


@pytest.mark.parametrize(
    ("request_body", "message"),
    [
        (b"{not json", "not JSON"),
        (b'{"inputs": []}', "exactly one input"),
        (b'{"inputs": [{"name": "x", "datatype": "BYTES", "shape": [1], "data": ["aa=="]}]}', "must be 'image'"),
        (b'{"inputs": [{"name": "image", "datatype": "BYTES", "shape": [2], "data": ["aa=="]}]}', "but 1 elements"),
        (b'{"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["%%%"]}]}', "not base64"),
        (b'{"inputs": [{"name": "image", "datatype": "BYTES", "shape": [2], "data": [["aa=="], ["a", "b"]]}]}',
         "list of base64 strings"),
        (b"[" * 100_000 + b"]" * 100_000, "not JSON"),
        (b'{"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["aa=="]}], '
         b'"outputs": [{"name": "logits"}]}', "unknown output 'logits'"),
        (b'{"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["aa=="]}], '
         b'"outputs": [{"name": "label", "parameters": []}]}', "must be an object"),
    ],
)  # fmt: skip
def test_malformed_requests_are_400_in_the_protocol_shape(service, request_body, message):
    response = httpx.post(f"{service.url}/v2/models/catsdogs/infer", content=request_body, timeout=30)
    assert response.status_code == 400 and message in response.json()["error"], response.text


@pytest.mark.parametrize(
    ("data", "message"),
    [(struct.pack("<I", 100) + b"abcd", "past the end"), (struct.pack("<I", 0) * 1000, "more than the 1 elements")],
    ids=["claims more than it has", "more elements than its shape"],
)
def test_binary_data_that_does_not_add_up_is_400(service, data, message):
    tensor = {"name": "image", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": len(data)}}
    header = json.dumps({"inputs": [tensor]}).encode()
    response = httpx.post(f"{service.url}/v2/models/catsdogs/infer", content=header + data, timeout=30,
                          headers={"Inference-Header-Content-Length": str(len(header))})  # fmt: skip
    assert response.status_code == 400 and message in response.json()["error"]


def test_limits_match_predict_batch(client):
    with pytest.raises(InferenceServerException, match=r"byte limit|the limit is") as error:
        client.infer("catsdogs", [image_input([b"x" * (MAX_BYTES + 1)])])
    assert error.value.status() == "413"
    with pytest.raises(InferenceServerException, match=f"at most {MAX_FILES} images") as error:
        client.infer("catsdogs", [image_input([photo_bytes(PHOTOS[0])] * (MAX_FILES + 1))])
    assert error.value.status() == "413"


def test_unknown_model_is_404(client):
    with pytest.raises(InferenceServerException, match="unknown model 'dogscats'") as error:
        client.infer("dogscats", [image_input([photo_bytes(PHOTOS[0])])])
    assert error.value.status() == "404"


def test_inference_counts_in_the_service_metrics(client, service):
    def predicted() -> float:
        text = httpx.get(f"{service.url}/metrics").text
        return sum(
            float(line.split()[-1]) for line in text.splitlines() if line.startswith("catsdogs_predictions_total")
        )

    before = predicted()
    client.infer("catsdogs", [image_input([photo_bytes(name) for name in PHOTOS[:3]])])
    assert predicted() == before + 3
    text = httpx.get(f"{service.url}/metrics").text
    assert 'endpoint="/v2/models/{model_name}/infer",method="POST",status="200"' in text


def test_not_ready_without_a_model(tmp_path):
    service = Service(tmp_path / "absent.onnx")
    try:
        deadline = time.perf_counter() + 60
        while True:
            try:
                httpx.get(f"{service.url}/health", timeout=1)
                break
            except httpx.TransportError:
                assert time.perf_counter() < deadline and service.process.poll() is None, "\n".join(service.lines)
                time.sleep(0.05)
        with triton.InferenceServerClient(url=service.url.removeprefix("http://"), connection_timeout=30) as client:
            assert client.is_server_live() and not client.is_server_ready() and not client.is_model_ready("catsdogs")
            with pytest.raises(InferenceServerException, match="no model is loaded") as error:
                client.infer("catsdogs", [image_input([photo_bytes(PHOTOS[0])])])
            assert error.value.status() == "503"
    finally:
        service.stop()


def test_pet_outputs_equal_predicts_on_the_real_model(client, service):
    images = [photo_bytes(name) for name in PHOTOS] + [NOT_A_PET.read_bytes()]
    result = client.infer("catsdogs", [image_input(images)])
    scores, flags = result.as_numpy("pet_score"), result.as_numpy("is_pet")
    assert scores.dtype == np.float32 and scores.shape == (len(images),) and flags.dtype == np.bool_
    for image, score, flag in zip(images, scores, flags, strict=True):
        expected = predict_endpoint(service, image)
        assert expected["pet_score"] is not None and bool(flag) is expected["is_pet"]
        assert float(score) == pytest.approx(expected["pet_score"], rel=1e-6, abs=1e-7)
    assert set(flags.tolist()) == {True, False}  # the photos are pets, the shark is not
    json_result = client.infer("catsdogs", [image_input(images, binary=False)],
                               outputs=[triton.InferRequestedOutput("is_pet", binary_data=False)])  # fmt: skip
    assert json_result.as_numpy("is_pet").tolist() == flags.tolist()


def metrics_value(service: Service, name: str, **labels: str) -> float:
    return metric(httpx.get(f"{service.url}/metrics", timeout=10).text, name, **labels)


def test_v2_predictions_take_feedback_and_feed_drift_like_predict(client, service):
    images = [photo_bytes(name) for name in PHOTOS[:2]]
    window = metrics_value(service, "catsdogs_drift_window_predictions", signal="label")
    result = client.infer("catsdogs", [image_input(images)], headers={"X-Request-ID": "v2-feedback"})
    ids = result.get_response()["parameters"]["prediction_ids"]
    assert len(set(ids)) == 2 and all(len(i) >= 22 for i in ids)
    deadline = time.perf_counter() + 10  # predictions reach the drift windows off the event loop
    while metrics_value(service, "catsdogs_drift_window_predictions", signal="label") < window + 2:
        assert time.perf_counter() < deadline, "the two predictions never reached the drift window"
        time.sleep(0.05)
    labels = [x.decode() for x in result.as_numpy("label")]
    right = metrics_value(service, "catsdogs_feedback_total", correct="true", label=labels[1], source="anonymous")
    answer = httpx.post(f"{service.url}/feedback", json={"prediction_id": ids[1], "label": labels[1]}, timeout=10)
    assert answer.status_code == 200 and answer.json()["correct"] is True
    assert metrics_value(service, "catsdogs_feedback_total", correct="true", label=labels[1], source="anonymous") == (
        right + 1
    )
    single = client.infer("catsdogs", [image_input(images[:1])], headers={"X-Request-ID": "v2-one"})
    [one] = single.get_response()["parameters"]["prediction_ids"]
    assert one not in ids and len(one) >= 22


def image_tensor(**extra: object) -> dict:
    return {"name": "image", "datatype": "BYTES", "shape": [1], "data": ["aa=="], **extra}


@pytest.mark.parametrize(
    ("body", "headers", "message"),
    [
        # headers arrive as latin-1: "²" and "¹²" are str.isdigit() but not int()-able
        (b'{"inputs": []}', {"Inference-Header-Content-Length": "\u00b2".encode("latin-1")},
         "Inference-Header-Content-Length"),
        (b'{"inputs": []}', {"Inference-Header-Content-Length": "\u00b9\u00b2".encode("latin-1")},
         "Inference-Header-Content-Length"),
        (b'{"id": ' + b"9" * 5000 + b', "inputs": []}', {}, "more than 18 digits"),
        (b'{"id": NaN, "inputs": []}', {}, "NaN is not a JSON number"),
        (json.dumps({"inputs": [image_tensor(shape=[1])]}).replace('"shape": [1]', '"shape": [Infinity]').encode(), {},
         "Infinity is not a JSON number"),
        (json.dumps({"id": 7, "inputs": [image_tensor()]}).encode(), {}, "'id' must be a string"),
        (json.dumps({"inputs": [image_tensor(shape=[True])]}).encode(), {}, "shape must be [N]"),
        (json.dumps({"inputs": [image_tensor(shape=[10**30])]}).encode(), {}, "more than 18 digits"),
        (json.dumps({"inputs": [image_tensor()], "parameters": {"binary_data_output": "yes"}}).encode(), {},
         "'binary_data_output' must be true or false"),
        (json.dumps({"inputs": [image_tensor()], "parameters": []}).encode(), {}, "'parameters' must be an object"),
        (json.dumps({"inputs": [image_tensor()], "outputs": [{"name": "label", "parameters": {"binary_data": 1}}]})
         .encode(), {}, "'binary_data' must be true or false"),
        (json.dumps({"inputs": [image_tensor(shape=[2])]}).encode(), {}, "has shape [2] but 1 elements"),
    ],
    ids=["superscript-length", "superscripts-length", "huge-int", "nan-id", "infinity", "id-not-string", "bool-shape",
         "huge-shape", "string-flag", "list-parameters", "int-binary-data", "shape-mismatch"],
)  # fmt: skip
def test_malformed_inference_requests_are_4xx_naming_the_field_before_any_inference(service, body, headers, message):
    before = metrics_value(service, "catsdogs_inference_duration_seconds_count")
    response = httpx.post(f"{service.url}/v2/models/catsdogs/infer", content=body, headers=headers, timeout=30)
    assert response.status_code == 400 and message in response.json()["error"], response.text
    assert metrics_value(service, "catsdogs_inference_duration_seconds_count") == before

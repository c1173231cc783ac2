"""The service in-process (Starlette TestClient) against a real ONNX model and a real onnxruntime session."""

from __future__ import annotations

import dataclasses
import io
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from starlette.testclient import TestClient

from server.app import create_app
from server.config import Settings
from tests.images import encode, exif_rotated_twins, photo_bytes, png_header_only, reencoded, truncated_jpeg

CAT, DOG = "cats/cat.1.jpg", "dogs/dog.1.jpg"


def settings_for(model: Path, **overrides: object) -> Settings:
    return dataclasses.replace(Settings.from_env(), model_path=model, ort_threads=1, **overrides)


@pytest.fixture(scope="module")
def client(onnx_model: Path):
    with TestClient(create_app(settings_for(onnx_model, max_upload_bytes=10 * 1024 * 1024))) as test_client:
        yield test_client


def post_file(client: TestClient, data: bytes, name: str = "photo.jpg", field: str = "file", mime: str = "image/jpeg"):
    return client.post("/predict", files={field: (name, data, mime)})


def assert_error(response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"]["code"] == code and body["error"]["message"]


def test_health_ready_and_model_metadata(client, onnx_model):
    assert client.get("/health").json() == {"status": "ok", "model_loaded": True}
    ready = client.get("/ready")
    assert ready.status_code == 200 and ready.json()["model_version"] == "seeded-imagenet-head"
    info = client.get("/model").json()
    assert info["labels"] == ["cat", "dog"] and info["input_size"] == 224
    assert info["preprocess"]["mean"] == [0.485, 0.456, 0.406]
    import hashlib

    assert info["sha256"] == hashlib.sha256(onnx_model.read_bytes()).hexdigest()


@pytest.mark.parametrize(("name", "label"), [(CAT, "cat"), (DOG, "dog")])
def test_predict_classifies_real_photos(client, name, label):
    response = post_file(client, photo_bytes(name))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["label"] == label
    assert set(body["probabilities"]) == {"cat", "dog"}
    assert abs(sum(body["probabilities"].values()) - 1) < 1e-5
    assert body["probabilities"][label] > 0.5
    assert body["model_version"] == "seeded-imagenet-head" and body["latency_ms"] > 0


def test_raw_image_body_equals_multipart(client):
    data = photo_bytes(CAT)
    raw = client.post("/predict", content=data, headers={"content-type": "image/jpeg"})
    assert raw.status_code == 200
    assert raw.json()["probabilities"] == post_file(client, data).json()["probabilities"]


@pytest.mark.parametrize(("fmt", "mime"), [("PNG", "image/png"), ("WEBP", "image/webp"), ("BMP", "image/bmp")])
def test_other_formats_give_the_same_answer(client, fmt, mime):
    reference = post_file(client, reencoded(DOG, "PNG"), "dog.png", mime="image/png").json()
    response = post_file(client, reencoded(DOG, fmt), f"dog.{fmt.lower()}", mime=mime)
    assert response.status_code == 200
    assert response.json()["label"] == reference["label"]
    assert abs(response.json()["probabilities"]["dog"] - reference["probabilities"]["dog"]) < 0.05


def test_gif_first_frame_is_classified(client):
    with Image.open(io.BytesIO(photo_bytes(CAT))) as image:
        first = image.convert("RGB")
    second = Image.new("RGB", first.size, (0, 0, 255))
    buffer = io.BytesIO()
    first.save(buffer, format="GIF", save_all=True, append_images=[second])
    response = post_file(client, buffer.getvalue(), "cat.gif", mime="image/gif")
    assert response.status_code == 200 and response.json()["label"] == "cat"


def test_exif_rotated_photo_is_classified_like_its_upright_twin(client):
    upright, rotated = exif_rotated_twins(DOG, "PNG")
    a, b = post_file(client, upright, mime="image/png").json(), post_file(client, rotated, mime="image/png").json()
    assert a["probabilities"]["dog"] == pytest.approx(b["probabilities"]["dog"], abs=1e-6)
    upright, rotated = exif_rotated_twins(CAT, "JPEG")  # lossy both ways: same label, close probabilities
    a, b = post_file(client, upright).json(), post_file(client, rotated).json()
    assert a["label"] == b["label"] == "cat"
    assert abs(a["probabilities"]["cat"] - b["probabilities"]["cat"]) < 0.05


def test_cmyk_photo_is_classified_like_its_rgb_twin(client):
    cmyk = photo_bytes("cats/cat.90005.jpg")
    rgb_twin = reencoded("cats/cat.90005.jpg", "PNG")
    a, b = post_file(client, cmyk).json(), post_file(client, rgb_twin, mime="image/png").json()
    assert a["label"] == b["label"]
    assert abs(a["probabilities"]["cat"] - b["probabilities"]["cat"]) < 0.05


def test_batch_returns_one_result_per_file_in_order_with_errors_inline(client):
    files = [
        ("files", ("cat.jpg", photo_bytes(CAT), "image/jpeg")),
        ("files", ("notes.txt", b"not an image at all", "image/jpeg")),
        ("files", ("dog.jpg", photo_bytes(DOG), "image/jpeg")),
    ]
    response = client.post("/predict/batch", files=files)
    assert response.status_code == 200
    body = response.json()
    assert [r["file"] for r in body["results"]] == ["cat.jpg", "notes.txt", "dog.jpg"]
    assert body["results"][0]["label"] == "cat" and body["results"][2]["label"] == "dog"
    assert body["results"][1]["error"]["code"] == "invalid_image"
    assert body["errors"] == 1 and body["count"] == 3
    single = post_file(client, photo_bytes(DOG)).json()
    assert body["results"][2]["probabilities"]["dog"] == pytest.approx(single["probabilities"]["dog"], abs=1e-5)


def test_batch_count_is_bounded(onnx_model):
    with TestClient(create_app(settings_for(onnx_model, max_batch_files=2))) as small:
        for count in (3, 10):
            files = [("files", (f"{i}.jpg", photo_bytes(CAT), "image/jpeg")) for i in range(count)]
            assert_error(small.post("/predict/batch", files=files), 413, "too_many_files")


@pytest.mark.parametrize(
    ("payload", "status", "code"),
    [
        (b"", 400, "empty_image"),
        (truncated_jpeg(), 400, "corrupt_image"),
        (photo_bytes("cats/cat.90003.jpg"), 400, "invalid_image"),  # an HTML page named .jpg
        (png_header_only(30000, 30000), 413, "image_too_large"),
        (png_header_only(8000, 7000), 413, "image_too_large"),  # 56 MP: under Pillow's bomb limit, over ours
    ],
    ids=["empty", "truncated", "html", "bomb-30000", "over-max-pixels"],
)
def test_bad_images_get_clear_client_errors(client, payload, status, code):
    assert_error(post_file(client, payload), status, code)


def test_unsupported_image_format_is_415(client):
    with Image.open(io.BytesIO(photo_bytes(CAT))) as image:
        tiff = encode(image, "TIFF")
    assert_error(post_file(client, tiff, "cat.tiff", mime="image/tiff"), 415, "unsupported_format")


def test_wrong_content_type_is_415(client):
    response = client.post("/predict", content=b"hello", headers={"content-type": "text/plain"})
    assert_error(response, 415, "unsupported_media_type")
    assert_error(client.post("/predict", json={"file": "cat.jpg"}), 415, "unsupported_media_type")


def test_missing_file_field_is_422(client):
    assert_error(post_file(client, photo_bytes(CAT), field="image"), 422, "missing_file")
    text_field = client.post("/predict", data={"file": "not a file"}, files={"other": ("a.jpg", b"x", "image/jpeg")})
    assert_error(text_field, 422, "missing_file")


def test_upload_over_the_limit_is_413(client):
    big = photo_bytes(CAT) + b"\0" * (20 * 1024 * 1024)
    assert_error(post_file(client, big), 413, "payload_too_large")
    response = client.post("/predict", content=big, headers={"content-type": "image/jpeg"})
    assert_error(response, 413, "payload_too_large")


def test_unknown_paths_and_methods_are_json_errors(client):
    assert_error(client.get("/nope"), 404, "not_found")
    assert_error(client.get("/predict"), 405, "method_not_allowed")


def test_request_id_is_echoed_or_generated(client):
    assert client.get("/health", headers={"X-Request-ID": "abc-123"}).headers["x-request-id"] == "abc-123"
    generated, again = (client.get("/health").headers["x-request-id"] for _ in range(2))
    assert re.fullmatch(r"[0-9a-f]{32}", generated) and generated != again  # 128 random bits, new each time
    unsafe = client.get("/health", headers={"X-Request-ID": "bad id\twith spaces"}).headers["x-request-id"]
    assert unsafe != "bad id\twith spaces"


def metric(text: str, name: str, **labels: str) -> float:
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))  # the exposition sorts labels
    for line in text.splitlines():
        if line.startswith(f"{name}{{{wanted}}}" if labels else f"{name} "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_metrics_move_with_traffic(client):
    before = client.get("/metrics").text
    post_file(client, photo_bytes(CAT))
    post_file(client, b"")
    after = client.get("/metrics")
    assert after.headers["content-type"].startswith("text/plain")
    text = after.text
    ok = {"method": "POST", "endpoint": "/predict", "status": "200"}
    bad = {"method": "POST", "endpoint": "/predict", "status": "400"}
    assert (
        metric(text, "catsdogs_http_requests_total", **ok) == metric(before, "catsdogs_http_requests_total", **ok) + 1
    )
    assert (
        metric(text, "catsdogs_http_requests_total", **bad) == metric(before, "catsdogs_http_requests_total", **bad) + 1
    )
    for name, labels in [
        ("catsdogs_predictions_total", {"label": "cat"}),
        ("catsdogs_inference_duration_seconds_count", {}),
        ("catsdogs_prediction_confidence_count", {}),
    ]:
        assert metric(text, name, **labels) == metric(before, name, **labels) + 1, name
    assert metric(text, "catsdogs_model_loaded") == 1
    assert "catsdogs_http_requests_in_flight" in text
    assert "catsdogs_http_request_duration_seconds_bucket" in text


def test_without_a_model_the_service_runs_health_only(tmp_path):
    with TestClient(create_app(settings_for(tmp_path / "missing.onnx"))) as bare:
        assert bare.get("/health").json() == {"status": "ok", "model_loaded": False}
        assert_error(bare.get("/ready"), 503, "model_not_loaded")
        assert "missing.onnx" in bare.get("/ready").json()["error"]["message"]
        assert_error(bare.get("/model"), 503, "model_not_loaded")
        assert_error(post_file(bare, photo_bytes(CAT)), 503, "model_not_loaded")
        assert metric(bare.get("/metrics").text, "catsdogs_model_loaded") == 0


def test_a_file_that_is_not_a_model_is_health_only_too(tmp_path):
    junk = tmp_path / "model.onnx"
    junk.write_bytes(b"not onnx")
    with TestClient(create_app(settings_for(junk))) as bare:
        assert bare.get("/health").json()["model_loaded"] is False
        assert_error(bare.get("/ready"), 503, "model_not_loaded")


def test_a_16_bit_greyscale_copy_is_the_same_picture(client):
    """Pillow's own conversion clips 16-bit values to white: the copy used to come back as another picture."""
    with Image.open(io.BytesIO(photo_bytes(CAT))) as photo:
        grey = np.asarray(photo.convert("L"))
    eight, sixteen = encode(Image.fromarray(grey), "PNG"), encode(Image.fromarray(grey.astype(np.uint16) * 257), "PNG")
    assert Image.open(io.BytesIO(sixteen)).mode == "I;16"
    a = post_file(client, eight, "grey.png", mime="image/png").json()
    b = post_file(client, sixteen, "grey16.png", mime="image/png").json()
    assert a["label"] == b["label"] == "cat"
    assert abs(a["probabilities"]["cat"] - b["probabilities"]["cat"]) < 0.01

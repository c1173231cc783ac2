"""Byte-mutation fuzzing of the decoder through the service: whatever Pillow makes of mangled bytes, the answer is
a prediction or that image's 4xx, never a 5xx, never another image's error, and never slow."""

from __future__ import annotations

import io
import random
import time
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image, ImageFile
from starlette.testclient import TestClient

from server.app import create_app
from tests.images import photo_bytes
from tests.test_app import CAT, settings_for

SEED = 20261129
FORMATS = {"JPEG": {}, "PNG": {}, "GIF": {}, "WEBP": {"quality": 80}, "BMP": {}, "TIFF": {}}
CASES_PER_FORMAT = 50  # 300 in all
SECONDS_PER_IMAGE = 2.0  # far above a normal decode (about 10 ms): a case past it is a decoder running away


def seeds() -> dict[str, bytes]:
    with Image.open(io.BytesIO(photo_bytes(CAT))) as photo:
        small = photo.convert("RGB").resize((96, 72))
    encoded = {}
    for fmt, options in FORMATS.items():
        buffer = io.BytesIO()
        (small.convert("P") if fmt == "GIF" else small).save(buffer, format=fmt, **options)
        encoded[fmt] = buffer.getvalue()
    return encoded


def mutate(data: bytes, rng: random.Random) -> bytes:
    """One of: a few bytes flipped, a truncation, a chunk repeated (the mutations AFL's havoc stage starts with)."""
    kind = rng.choice(("flip", "truncate", "repeat"))
    if kind == "flip":
        mutated = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            mutated[rng.randrange(len(mutated))] ^= 1 << rng.randrange(8)
        return bytes(mutated)
    if kind == "truncate":
        return data[: rng.randrange(1, len(data))]
    start = rng.randrange(len(data))
    chunk = data[start : start + rng.randint(1, 256)]
    return data[:start] + chunk * rng.randint(2, 64) + data[start:]


def cases() -> list[tuple[str, bytes]]:
    rng = random.Random(SEED)
    return [(fmt, mutate(data, rng)) for fmt, data in seeds().items() for _ in range(CASES_PER_FORMAT)]


def test_mutated_images_get_a_prediction_or_their_own_4xx(onnx_model: Path):
    statuses: Counter[str] = Counter()
    slowest = 0.0
    with TestClient(create_app(settings_for(onnx_model))) as client:
        good = photo_bytes(CAT)
        for index, (fmt, data) in enumerate(cases()):
            started = time.perf_counter()
            files = [("files", ("good.jpg", good, "image/jpeg")), ("files", (f"case.{fmt.lower()}", data, "image/*"))]
            response = client.post("/predict/batch", files=files)
            slowest = max(slowest, time.perf_counter() - started)
            assert response.status_code == 200, (index, fmt, response.text)
            good_item, case = response.json()["results"]
            assert good_item["label"] == "cat", (index, fmt, good_item)  # the other image is unharmed
            statuses["200" if "label" in case else case["error"]["code"]] += 1
        single = client.post("/predict", content=cases()[-1][1], headers={"content-type": "image/tiff"})
        assert single.status_code < 500
    print(f"fuzz: {sum(statuses.values())} cases, {dict(statuses)}, slowest batch {slowest:.2f} s")
    assert sum(statuses.values()) == len(FORMATS) * CASES_PER_FORMAT
    assert slowest < SECONDS_PER_IMAGE * 2


@pytest.mark.parametrize("exception", [MemoryError, NotImplementedError, OverflowError, KeyError])
def test_any_failure_inside_pillow_is_the_images_error(exception, monkeypatch, onnx_model: Path):
    """What Pillow's own fuzz harness expects from bad bytes (and anything else) stays within the decoder."""

    def fail(self: ImageFile.ImageFile) -> None:
        raise exception("raised by Pillow")

    monkeypatch.setattr(ImageFile.ImageFile, "load", fail)  # decoding the pixels of a file

    with TestClient(create_app(settings_for(onnx_model))) as client:
        response = client.post("/predict", content=photo_bytes(CAT), headers={"content-type": "image/jpeg"})
    expected = 413 if exception is MemoryError else 400
    assert response.status_code == expected, response.text

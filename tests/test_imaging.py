"""The shared decoder: budgets for every class of hostile image, real photos still accepted, one frame, one message."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from imaging import DEFAULT_MAX_DECODE_BYTES, Decoder, ImageError, find_images, label_for_name
from imaging.decode import to_8_bits
from tests.conftest import LARGE, ROOT
from tests.images import (
    animated,
    flat_image,
    flat_png,
    phone_photo,
    photo_bytes,
    png_header_only,
    rle_bmp,
    transparent_png,
)

SPEC = {"resize_size": 256, "jpeg_draft": True, "reducing_gap": 2.0}


@pytest.fixture(scope="module")
def decode() -> Decoder:
    return Decoder.from_spec(SPEC)


def refusal(decode: Decoder, data: bytes) -> ImageError:
    with pytest.raises(ImageError) as refused:
        decode(data)
    return refused.value


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(lambda: flat_png(7000, 7000, "RGBA"), id="flat-RGBA-PNG-7000x7000"),
        pytest.param(lambda: flat_image("WEBP", 3000, 3000, lossless=True), id="flat-WebP-3000x3000"),
        pytest.param(lambda: flat_image("GIF", 5000, 5000, "P"), id="flat-GIF-5000x5000"),
        pytest.param(lambda: rle_bmp(7000, 7000), id="RLE8-BMP-7000x7000"),
        pytest.param(lambda: flat_png(64, 200000), id="PNG-64x200000"),
    ],
)
def test_images_over_the_memory_budget_are_refused_before_decoding(decode, data):
    payload = data()
    assert len(payload) < 300_000  # small on the wire: the cost is in the declared size
    error = refusal(decode, payload)
    assert (error.status, error.code) == (413, "image_too_large")
    assert "MAX_DECODE_BYTES" in error.message and "64 MiB" in error.message


def test_the_budget_is_a_setting(decode):
    accepted = flat_png(2000, 2000, "RGBA")  # 16 MB decoded
    assert decode(accepted).mode == "RGB"
    tight = Decoder.from_spec(SPEC, max_bytes=8 * 1024 * 1024)
    assert "8 MiB" in refusal(tight, accepted).message


def test_pixel_limit_has_one_message_whoever_notices_first():
    decode = Decoder.from_spec(SPEC, max_pixels=50_000_000)
    ours = refusal(decode, png_header_only(8000, 7000))  # 56 MP: under Pillow's own limit, over ours
    pillows = refusal(decode, png_header_only(30000, 30000))  # 900 MP: Pillow's check raises first
    assert (ours.status, ours.code, ours.message) == (pillows.status, pillows.code, pillows.message)
    assert ours.status == 413 and "50000000" in ours.message and "MAX_IMAGE_PIXELS" in ours.message


def test_a_12_megapixel_phone_photo_is_accepted_and_decoded_small(decode):
    for data in (phone_photo(), phone_photo(progressive=True)):
        image = decode(data)
        assert image.mode == "RGB" and image.size == (504, 378)  # DCT scaling by 1/8


def test_reduced_images_stay_close_to_full_resolution(decode):
    """The box reduction before the resize changes the picture by less than JPEG's draft does."""
    with Image.open(io.BytesIO(photo_bytes(LARGE))) as photo:
        big = photo.convert("RGB").resize((2048, 1152))
    data = io.BytesIO()
    big.save(data, format="PNG")
    reduced = decode(data.getvalue())
    assert reduced.size == (1024, 576)  # factor 2 keeps the shorter side >= 2 x 256
    full = Decoder.from_spec({**SPEC, "reducing_gap": None})(data.getvalue())
    assert full.size == (2048, 1152)
    a = np.asarray(reduced.resize((455, 256), Image.Resampling.BILINEAR), dtype=np.float32)
    b = np.asarray(full.resize((455, 256), Image.Resampling.BILINEAR), dtype=np.float32)
    assert np.abs(a - b).mean() < 1.0  # grey levels out of 255


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "PNG"])
def test_animations_give_their_first_frame_at_the_cost_of_one(decode, fmt):
    data = animated(fmt, 300)
    image = decode(data)
    assert image.size == (256, 256)
    assert (np.asarray(image) == 128).all()  # frame 0 is mid-grey, every later frame differs


def test_transparent_pixels_take_the_spec_background():
    data = transparent_png("cats/cat.1.jpg")
    with Image.open(io.BytesIO(data)) as raw:
        alpha = np.asarray(raw)[..., 3]
    assert (alpha == 0).sum() > 1000 and ((alpha > 0) & (alpha < 255)).any()
    for background in ((255, 255, 255), (0, 128, 0)):
        image = np.asarray(Decoder.from_spec({**SPEC, "alpha_background": background})(data))
        assert (image[alpha == 0] == background).all()


def test_formats_outside_the_list_and_4_bit_rle_bmps_are_refused(decode):
    """Pillow decodes 4-bit RLE in a Python loop per pixel: seconds of CPU for a few bytes on the wire."""
    tiff = io.BytesIO()
    Image.new("RGB", (8, 8)).save(tiff, format="TIFF")
    for data in (tiff.getvalue(), rle_bmp(2000, 2000, bits=4)):
        error = refusal(decode, data)
        assert (error.status, error.code) == (415, "unsupported_format")
    assert decode(rle_bmp(2000, 2000)).mode == "RGB"  # 8-bit RLE is decoded in bulk: accepted


MEASURE = """
import json, sys
from imaging import ImageError
from server.preprocess import Preprocessor
from tests.images import flat_png
def peak():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")) / 1024
spec = {"labels": ["cat", "dog"], "input_size": 224, "resize_size": 256, "interpolation": "bilinear",
        "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "jpeg_draft": True, "reducing_gap": 2.0}
images = {name: eval(make) for name, make in json.loads(sys.argv[1]).items()}
preprocess = Preprocessor(spec, max_pixels=50_000_000)
preprocess(flat_png(300, 300))
before = peak()
out = {}
for name, data in images.items():
    arrays = [preprocess(one) for one in data]
    out[name] = [arrays[0].shape, peak() - before]
print(json.dumps(out))
"""


def peak_mib(cases: dict[str, str]) -> dict[str, tuple[list[int], float]]:
    """Each case's (output shape, peak RSS growth in MiB) in one fresh process, cases run in order."""
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(MEASURE), json.dumps(cases)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout)


def test_extreme_aspect_ratios_and_batches_stay_within_the_budget():
    """1xN and Nx1 images cost as little as any other (resizing them whole took gigabytes), and a batch of the
    largest accepted PNG costs one image's budget, not 32, since each image is freed once it is an array."""
    budget_mib = DEFAULT_MAX_DECODE_BYTES / 2**20
    measured = peak_mib({
        "1x3000": "[flat_png(1, 3000)]",
        "3000x1": "[flat_png(3000, 1)]",
        "batch": "[flat_png(3800, 3800)] * 32",
    })  # fmt: skip
    assert measured["1x3000"] == [[3, 224, 224], pytest.approx(0, abs=16)]
    assert measured["3000x1"] == [[3, 224, 224], pytest.approx(0, abs=16)]
    assert measured["batch"][0] == [3, 224, 224]
    assert measured["batch"][1] < budget_mib + 32 * 0.6 + 16  # one decode + 32 float32 arrays + slack


def test_a_folder_or_file_name_names_a_label_whatever_its_case_and_number():
    labels = ["cat", "dog"]
    names = ("cat", "cats", "Cat", "CATS", "Dogs", "dog")
    assert [label_for_name(name, labels) for name in names] == ["cat", "cat", "cat", "cat", "dog", "dog"]
    assert label_for_name("birds", labels) is None and label_for_name("ca", labels) is None
    assert label_for_name("Boxes", ["box"]) == "box" and label_for_name("Foxes", ["Fox"]) == "Fox"


def test_images_are_found_by_name_hidden_files_left_out(tmp_path):
    for name in ("a/cat.1.JPG", "a/b/dog.2.png", "a/notes.txt", "a/.hidden.jpg", ".cache/x.jpg", "c.webp"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    assert [p.relative_to(tmp_path).as_posix() for p in find_images(tmp_path)] == [
        "a/b/dog.2.png", "a/cat.1.JPG", "c.webp",
    ]  # fmt: skip


def test_high_bit_depth_is_scaled_to_8_bits_or_refused():
    values = np.arange(0, 65536, 64, dtype=np.uint16).reshape(32, 32)
    scaled = to_8_bits(Image.fromarray(values))
    assert scaled.mode == "L" and np.array_equal(np.asarray(scaled), (values >> 8).astype(np.uint8))
    assert np.asarray(to_8_bits(Image.fromarray(values.astype(np.int32)))).max() == 255  # "I" within 16 bits
    with pytest.raises(ImageError) as refused:
        to_8_bits(Image.fromarray(values.astype(np.int32) * 4))  # values past 16 bits: no honest way to read it
    assert refused.value.status == 415

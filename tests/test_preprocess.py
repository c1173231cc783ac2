"""The server's Pillow + NumPy preprocessing on real and awkward photos (no torch here)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from server.preprocess import ImageError, Preprocessor
from tests.conftest import CMYK, GRAYSCALE, LARGE, RGBA_PNG
from tests.images import exif_rotated_twins, photo_bytes, png_header_only

SPEC = {
    "labels": ["cat", "dog"],
    "input_size": 224,
    "resize_size": 256,
    "interpolation": "bilinear",
    "mean": [0.485, 0.456, 0.406],
    "std": [0.229, 0.224, 0.225],
    "jpeg_draft": True,
}


@pytest.fixture(scope="module")
def preprocess() -> Preprocessor:
    return Preprocessor(SPEC, max_pixels=50_000_000)


def test_output_is_normalized_chw_float32(preprocess):
    array = preprocess(photo_bytes("cats/cat.1.jpg"))
    assert array.shape == (3, 224, 224) and array.dtype == np.float32
    assert -2.2 < array.min() < array.max() < 2.7  # ImageNet normalisation of [0, 1] pixels


def test_exif_orientation_is_applied(preprocess):
    upright, rotated = exif_rotated_twins("dogs/dog.1.jpg")  # a landscape photo, stored portrait
    assert preprocess.decode(rotated).size == preprocess.decode(upright).size == Image.open(io.BytesIO(upright)).size
    np.testing.assert_array_equal(preprocess(rotated), preprocess(upright))
    with Image.open(io.BytesIO(rotated)) as stored:
        assert stored.size != preprocess.decode(rotated).size  # what ignoring EXIF would have given


def test_every_mode_becomes_rgb(preprocess):
    for name in (CMYK, GRAYSCALE, RGBA_PNG):
        assert preprocess.decode(photo_bytes(name)).mode == "RGB", name
    gray = np.asarray(preprocess.decode(photo_bytes(GRAYSCALE)))
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()
    with Image.open(io.BytesIO(photo_bytes(RGBA_PNG))) as raw:
        transparent = np.asarray(raw)[..., 3] == 0
    if transparent.any():
        assert (np.asarray(preprocess.decode(photo_bytes(RGBA_PNG)))[transparent] == 255).all()


def test_jpeg_draft_decodes_large_photos_small_but_never_below_the_resize(preprocess):
    decoded = preprocess.decode(photo_bytes(LARGE))  # 1920x1080
    assert min(decoded.size) >= SPEC["resize_size"]
    assert decoded.size == (480, 270)  # DCT scaling by 1/4: the largest that keeps both sides >= 256
    exact = Preprocessor({**SPEC, "jpeg_draft": False}, max_pixels=50_000_000)
    assert exact.decode(photo_bytes(LARGE)).size == (1920, 1080)
    assert np.abs(preprocess(photo_bytes(LARGE)) - exact(photo_bytes(LARGE))).mean() < 0.05


def test_huge_declared_dimensions_are_refused_before_decoding(preprocess):
    with pytest.raises(ImageError) as refused:
        preprocess(png_header_only(30000, 30000))
    assert refused.value.status == 413


def test_unknown_preprocessing_is_refused_at_load():
    with pytest.raises(ValueError, match="Only nearest, bilinear, bicubic"):
        Preprocessor({**SPEC, "interpolation": "lanczos"}, max_pixels=1)
    with pytest.raises(ValueError, match="Only 'center'"):
        Preprocessor({**SPEC, "crop": "random"}, max_pixels=1)

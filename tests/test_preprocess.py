"""The server's Pillow + NumPy preprocessing on real and awkward photos (no torch here)."""

from __future__ import annotations

import io
import time

import numpy as np
import pytest
from PIL import Image

from imaging import ImageError
from server.preprocess import Preprocessor
from tests.conftest import CMYK, GRAYSCALE, LARGE, RGBA_PNG
from tests.images import SPEC, exif_rotated_twins, flat_png, photo_bytes, png_header_only, transparent_png


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
    transparent_photo = transparent_png("dogs/dog.3.jpg")
    with Image.open(io.BytesIO(transparent_photo)) as raw:
        transparent = np.asarray(raw)[..., 3] == 0
    assert transparent.sum() > 1000
    assert (np.asarray(preprocess.decode(transparent_photo))[transparent] == 255).all()
    green = Preprocessor({**SPEC, "alpha_background": [0, 128, 0]}, max_pixels=50_000_000)
    assert (np.asarray(green.decode(transparent_photo))[transparent] == (0, 128, 0)).all()


def test_jpeg_draft_decodes_large_photos_small_but_never_below_the_resize(preprocess):
    decoded = preprocess.decode(photo_bytes(LARGE))  # 1920x1080
    assert min(decoded.size) >= SPEC["resize_size"]
    assert decoded.size == (480, 270)  # DCT scaling by 1/4: the largest that keeps both sides >= 256
    exact = Preprocessor({**SPEC, "jpeg_draft": False, "reducing_gap": None}, max_pixels=50_000_000)
    assert exact.decode(photo_bytes(LARGE)).size == (1920, 1080)
    assert np.abs(preprocess(photo_bytes(LARGE)) - exact(photo_bytes(LARGE))).mean() < 0.05


def test_huge_declared_dimensions_are_refused_before_decoding(preprocess):
    with pytest.raises(ImageError) as refused:
        preprocess(png_header_only(30000, 30000))
    assert refused.value.status == 413


@pytest.mark.parametrize("size", [(20, 3000), (3000, 20), (64, 1500)])
def test_extreme_aspect_ratios_resample_only_the_crop_and_match_the_whole_resize(preprocess, size):
    """Same pixels, to within one grey level, as resizing the whole image to a shorter side of 256 and cropping."""
    ramp = np.linspace(0, 255, max(size)).astype(np.uint8)  # varies along the long side: the crop's place shows
    rows = np.broadcast_to(ramp, (min(size), max(size)))
    image = Image.fromarray(np.ascontiguousarray(rows if size[0] > size[1] else rows.T)).convert("RGB")
    assert image.size == size
    short, long = min(size), max(size)
    whole = (256, int(256 * long / short)) if size[0] <= size[1] else (int(256 * long / short), 256)
    resized = image.resize(whole, Image.Resampling.BILINEAR)
    left, top = round((whole[0] - 224) / 2.0), round((whole[1] - 224) / 2.0)
    expected = np.asarray(resized.crop((left, top, left + 224, top + 224)), dtype=np.float32).transpose(2, 0, 1)
    expected = (expected / 255 - preprocess.mean) / preprocess.std
    np.testing.assert_allclose(preprocess.to_array(image), expected, rtol=0, atol=1.01 / 255 / 0.224)


def test_a_1x20000_png_costs_no_more_than_a_photo(preprocess):
    """Resizing it whole took 5 GB and 12 s; only the crop's region is resampled now."""
    started = time.process_time()
    assert preprocess(flat_png(1, 20000)).shape == (3, 224, 224)
    assert time.process_time() - started < 1.0  # a generous bound: about 5 ms here


def test_unknown_preprocessing_is_refused_at_load():
    with pytest.raises(ValueError, match="Only nearest, bilinear, bicubic"):
        Preprocessor({**SPEC, "interpolation": "lanczos"}, max_pixels=1)
    with pytest.raises(ValueError, match="Only 'center'"):
        Preprocessor({**SPEC, "crop": "random"}, max_pixels=1)

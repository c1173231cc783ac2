"""What decoding one image costs in memory, estimated from its header before a single pixel is decoded.

Pillow keeps one byte per pixel for the modes 1, L and P, two for 16-bit greyscale and four for every other mode
(RGB is padded to four). The estimate adds up the buffers `imaging.decode.Decoder` holds at its peak: the decoded
image, the decoder's own copies, the full-size conversions it makes before reducing, and the small working images
after. `bench/hostile.py` checks it against the peak RSS of a fresh process for each class of image.
"""

from __future__ import annotations

from PIL import Image

MIB = 1024 * 1024
DEFAULT_MAX_PIXELS = 50_000_000  # declared pixels, any format: the decompression-bomb limit
DEFAULT_MAX_DECODE_BYTES = 64 * MIB  # the estimated peak memory of decoding one image

BMP_RLE = (1, 2)  # RLE8, RLE4: decoded in Python into a bytearray, then copied to bytes, then into the image
REDUCIBLE_MODES = frozenset({"L", "RGB", "RGBA", "LA"})
ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})


def bytes_per_pixel(mode: str) -> int:
    """Pillow's storage for one pixel of a mode."""
    if mode in ("1", "L", "P"):
        return 1
    if mode.startswith("I;16"):
        return 2
    return 4


def decoder_bytes(image: Image.Image, scans: int) -> int:
    """Bytes a format's decoder holds besides the image while it decodes (checked by bench/hostile.py).

    libwebp composes onto two canvases of its own and Pillow copies the frame out as one bytes object; Pillow's
    RLE BMP decoder keeps two copies; a JPEG of several scans (progressive) keeps every DCT coefficient of the
    declared size, two bytes each, whatever the draft scale.
    """
    pixels = image.size[0] * image.size[1]
    if image.format == "WEBP":
        return pixels * 12
    if image.format == "BMP" and image.info.get("compression") in BMP_RLE:
        return pixels * 2
    layers = getattr(image, "layer", None)
    if image.format in ("JPEG", "MPO") and scans > 1 and layers:
        h_max, v_max = max(layer[1] for layer in layers), max(layer[2] for layer in layers)
        return int(pixels * 2 * sum(layer[1] * layer[2] for layer in layers) / (h_max * v_max))
    return 0


def decode_cost(mode: str, size: tuple[int, int], *, alpha: bool, factor: int) -> int:
    """Peak bytes to hold a `size` image of `mode` (after any JPEG draft), reduce it by `factor` and make it RGB.

    Full-size steps: the decoded image and the decoder's copies; a conversion to RGB/RGBA when the mode cannot be
    reduced or composited as it is; Pillow's premultiplied copy when it reduces an image with alpha; without a
    reduction, compositing onto the background (three more full-size RGBA images) and the EXIF transposition.
    """
    pixels = size[0] * size[1]
    full = bytes_per_pixel(mode)
    if mode.startswith("I"):  # 16/32-bit greyscale, scaled to 8 bits first: a copy of the values and the result
        full += bytes_per_pixel(mode) + 2
        mode = "L"
    converted = mode not in REDUCIBLE_MODES or (alpha and mode not in ("RGBA", "LA"))
    if factor >= 2:
        full += 4 * converted + 4 * alpha
        small = -(-size[0] // factor) * -(-size[1] // factor)
        return pixels * full + small * 4 * 5
    full += 4 * converted + (4 * 3 if alpha else 0) + 4  # the last 4: the transposed copy
    return pixels * full

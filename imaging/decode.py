"""Decode, check, reduce, orient and convert: image bytes to the upright RGB picture the model transform starts from."""

from __future__ import annotations

import io
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from imaging.budget import (
    ALPHA_MODES,
    DEFAULT_MAX_DECODE_BYTES,
    DEFAULT_MAX_PIXELS,
    MIB,
    REDUCIBLE_MODES,
    decode_cost,
    decoder_bytes,
)

ACCEPTED_FORMATS = frozenset({"JPEG", "PNG", "WEBP", "BMP", "GIF", "MPO"})  # MPO: phone JPEGs with a depth frame
EXTENSIONS = {"JPEG": ".jpg", "MPO": ".jpg", "PNG": ".png", "WEBP": ".webp", "BMP": ".bmp", "GIF": ".gif"}
IMAGE_SUFFIXES = frozenset({*EXTENSIONS.values(), ".jpeg"})  # file names taken for images in a folder
HIGH_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})  # scaled to 8 bits by to_8_bits
# Modes the accepted formats open in that the decoder reads correctly; any other (32-bit float "F", say) is refused.
READABLE_MODES = HIGH_BIT_MODES | {"1", "L", "P", "LA", "PA", "La", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr"}
DRAFT_FORMATS = frozenset({"JPEG", "MPO"})
BMP_RLE4 = 2
EXIF_ORIENTATION = 0x0112
TRANSPOSE = {  # EXIF orientation -> the transposition that shows the picture upright, as ImageOps.exif_transpose
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


class ImageError(Exception):
    """An image that cannot be used: an HTTP status, a stable code and a message naming the limit or the fault."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def limit_pillow(max_pixels: int) -> None:
    """Align Pillow's own decompression-bomb check, which is process-wide, with ours: call once at start-up.

    Pillow then raises only for images ours refuses too (with the same message, see `too_many_pixels`), and its
    warning, which fires only between the limit and twice the limit, is ignored: those images are refused anyway.
    """
    Image.MAX_IMAGE_PIXELS = max_pixels
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)


def too_many_pixels(max_pixels: int) -> ImageError:
    """The one refusal for declared dimensions over the pixel limit, whether Pillow's check or ours saw it first."""
    return ImageError(413, "image_too_large", f"the image declares more than {max_pixels} pixels (MAX_IMAGE_PIXELS)")


class Decoder:
    """Image bytes to an upright RGB image, refusing anything whose decoding would cost more than the budget.

    Only the first frame of an animated image is read, and its declared size and mode are checked against the
    pixel limit and the memory budget before any pixel is decoded. JPEGs decode at the smallest DCT scale that
    keeps both sides >= resize_size (`jpeg_draft`); any image whose shorter side is at least `reducing_gap` times
    resize_size is then reduced by an integer factor (Pillow's box `reduce`), so the later steps and the model's
    resize work on a small image.
    """

    def __init__(
        self,
        *,
        resize_size: int,
        jpeg_draft: bool,
        reducing_gap: float | None,
        background: tuple[int, int, int],
        max_pixels: int = DEFAULT_MAX_PIXELS,
        max_bytes: int = DEFAULT_MAX_DECODE_BYTES,
    ) -> None:
        if reducing_gap is not None and reducing_gap < 1:
            raise ValueError(f"Invalid reducing_gap {reducing_gap!r}: expected None or a number >= 1")
        self.resize_size = resize_size
        self.draft = jpeg_draft
        self.reducing_gap = reducing_gap
        self.background = tuple(background)
        self.max_pixels = max_pixels
        self.max_bytes = max_bytes

    @classmethod
    def from_spec(
        cls, spec: Mapping[str, Any], *, max_pixels: int = DEFAULT_MAX_PIXELS, max_bytes: int = DEFAULT_MAX_DECODE_BYTES
    ) -> Decoder:
        """The decoder a preprocessing spec (the dict that travels with the model) asks for."""
        return cls(
            resize_size=int(spec["resize_size"]),
            jpeg_draft=bool(spec.get("jpeg_draft", False)),
            reducing_gap=spec.get("reducing_gap"),
            background=tuple(spec.get("alpha_background", (255, 255, 255))),
            max_pixels=max_pixels,
            max_bytes=max_bytes,
        )

    def __call__(self, data: bytes) -> Image.Image:
        """Bytes to an upright RGB image (raises ImageError, and only ImageError, whatever the bytes)."""
        image = self.open(data)
        try:
            factor = self.check(image, scans=data.count(b"\xff\xda") if image.format in DRAFT_FORMATS else 1)
            image.load()
            transpose = TRANSPOSE.get(image.getexif().get(EXIF_ORIENTATION, 1))
            image = to_8_bits(image)
            if factor >= 2:
                image = self.reducible(image).reduce(factor)
            image = self.to_rgb(image)
            return image.transpose(transpose) if transpose is not None else image
        except ImageError:
            raise
        except Exception as error:  # hostile bytes: a failure of Pillow's is the image's, never the service's
            raise undecodable(error) from None

    def open(self, data: bytes) -> Image.Image:
        """The image's header: format and declared size, no pixel decoded yet."""
        if not data:
            raise ImageError(400, "empty_image", "the file is empty")
        try:
            image = Image.open(io.BytesIO(data))
        except UnidentifiedImageError:
            raise ImageError(400, "invalid_image", "the file is not an image in a format Pillow recognises") from None
        except Image.DecompressionBombError:  # Pillow's own, process-wide limit (Image.MAX_IMAGE_PIXELS)
            raise too_many_pixels(self.max_pixels) from None
        except Exception as error:  # as in __call__
            raise undecodable(error) from None
        if image.format not in ACCEPTED_FORMATS:
            accepted = ", ".join(sorted(ACCEPTED_FORMATS - {"MPO"}))
            raise ImageError(415, "unsupported_format", f"{image.format} images are not accepted; use {accepted}")
        if image.format == "BMP" and image.info.get("compression") == BMP_RLE4:  # Pillow decodes it pixel by pixel
            raise ImageError(415, "unsupported_format", "4-bit run-length-encoded BMPs are not accepted")
        if image.mode not in READABLE_MODES:
            raise ImageError(415, "unsupported_format", f"{image.mode} {image.format} images are not accepted")
        return image

    def check(self, image: Image.Image, scans: int = 1) -> int:
        """Refuse an image over the pixel limit or the memory budget; set the JPEG draft; return the reduce factor.

        `scans`: a JPEG's start-of-scan markers (0xFFDA), counted over the whole file: a scan of an EXIF thumbnail
        or of an MPO's second frame counts too, which can only over-estimate.
        """
        width, height = image.size
        if width * height > self.max_pixels:
            raise too_many_pixels(self.max_pixels)
        buffers = decoder_bytes(image, scans)
        if self.draft and image.format in DRAFT_FORMATS:
            image.draft("RGB", (self.resize_size, self.resize_size))
        factor = self.reduce_factor(image.size)
        cost = buffers + decode_cost(image.mode, image.size, alpha=has_alpha(image), factor=factor)
        if cost > self.max_bytes:
            raise ImageError(
                413,
                "image_too_large",
                f"decoding this {width}x{height} {image.mode} {image.format} needs about {cost / MIB:.0f} MiB; "
                f"the limit is {self.max_bytes / MIB:.0f} MiB per image (MAX_DECODE_BYTES)",
            )
        return factor

    def reduce_factor(self, size: tuple[int, int]) -> int:
        """The integer factor that keeps the shorter side at least reducing_gap x resize_size (1: no reduction)."""
        if self.reducing_gap is None:
            return 1
        return max(1, int(min(size) / (self.reducing_gap * self.resize_size)))

    def reducible(self, image: Image.Image) -> Image.Image:
        """The image in a mode Pillow can reduce without losing transparency: L, RGB, RGBA or LA."""
        if has_alpha(image):
            return image if image.mode in ("RGBA", "LA") else image.convert("RGBA")
        return image if image.mode in REDUCIBLE_MODES else image.convert("RGB")

    def to_rgb(self, image: Image.Image) -> Image.Image:
        """Any mode to RGB; transparency is composited onto the spec's background colour."""
        if image.mode == "RGB":
            return image
        if has_alpha(image):
            rgba = image if image.mode == "RGBA" else image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (*self.background, 255))
            return Image.alpha_composite(background, rgba).convert("RGB")
        return image.convert("RGB")


def undecodable(error: Exception) -> ImageError:
    """Any failure of Pillow on the bytes (the errors Pillow's own fuzzers expect: OSError, SyntaxError, ValueError,
    EOFError, MemoryError, NotImplementedError, OverflowError, and any other) as the image's client error."""
    if isinstance(error, MemoryError):
        return ImageError(413, "image_too_large", "decoding this image ran out of memory")
    detail = str(error) or type(error).__name__
    return ImageError(400, "corrupt_image", f"the image is corrupt or truncated: {detail}")


def to_8_bits(image: Image.Image) -> Image.Image:
    """A 16-bit greyscale image scaled to 8 bits (the top byte of each value), as its 8-bit copy would be; Pillow's
    own conversion clips every value above 255 to white. 32-bit integer images ("I") are read as 16-bit values
    and refused when a value does not fit."""
    if image.mode not in HIGH_BIT_MODES:
        return image
    values = np.array(image)  # a copy, shifted in place: at most two 16-bit buffers at once
    if image.mode == "I" and (values.min(initial=0) < 0 or values.max(initial=0) > 0xFFFF):
        raise ImageError(415, "unsupported_format", "32-bit greyscale with values beyond 16 bits is not accepted")
    np.right_shift(values, 8, out=values)
    return Image.fromarray(values.astype(np.uint8), mode="L")


def has_alpha(image: Image.Image) -> bool:
    return image.mode in ALPHA_MODES or "transparency" in image.info

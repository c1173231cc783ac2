"""Photo bytes to model input with Pillow and NumPy, following the preprocessing spec that travels with the model."""

from __future__ import annotations

import io
import warnings
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

ACCEPTED_FORMATS = frozenset({"JPEG", "PNG", "WEBP", "BMP", "GIF", "MPO"})  # MPO: phone JPEGs with a depth frame
RESAMPLING = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
}
SUPPORTED_STEPS = {
    "resize_policy": "shorter_side",
    "crop": "center",
    "color": "RGB",
    "layout": "NCHW",
    "exif_transpose": True,
}


class ImageError(Exception):
    """A client's image that cannot be used; status and code go into the error response."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class Preprocessor:
    """Decode, orient, convert to RGB, resize, crop and normalize exactly as the training evaluation transform."""

    def __init__(self, spec: dict[str, Any], max_pixels: int) -> None:
        for key, expected in SUPPORTED_STEPS.items():
            if spec.get(key, expected) != expected:
                raise ValueError(f"Invalid preprocess {key} {spec[key]!r}. Only {expected!r} is supported.")
        if spec["interpolation"] not in RESAMPLING:
            raise ValueError(f"Invalid interpolation {spec['interpolation']!r}. Only {', '.join(RESAMPLING)}.")
        self.input_size = int(spec["input_size"])
        self.resize_size = int(spec["resize_size"])
        self.resample = RESAMPLING[spec["interpolation"]]
        self.draft = bool(spec.get("jpeg_draft", False))
        self.background = tuple(spec.get("alpha_background", (255, 255, 255)))
        self.scale = np.float32(spec.get("scale", 1 / 255))
        self.mean = np.asarray(spec["mean"], dtype=np.float32).reshape(3, 1, 1)
        self.std = np.asarray(spec["std"], dtype=np.float32).reshape(3, 1, 1)
        self.max_pixels = max_pixels

    def __call__(self, data: bytes) -> np.ndarray:
        """One image's bytes to a float32 CHW array."""
        return self.to_array(self.decode(data))

    def decode(self, data: bytes) -> Image.Image:
        """Bytes to an upright RGB image; refuses huge declared dimensions before decoding any pixel."""
        if not data:
            raise ImageError(400, "empty_image", "the uploaded file is empty")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                image = Image.open(io.BytesIO(data))
        except UnidentifiedImageError:
            raise ImageError(400, "invalid_image", "the file is not a decodable image") from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ImageError(413, "image_too_large", "the image's declared dimensions are too large") from None
        with image:
            if image.format not in ACCEPTED_FORMATS:
                accepted = ", ".join(sorted(ACCEPTED_FORMATS - {"MPO"}))
                raise ImageError(415, "unsupported_format", f"{image.format} images are not accepted; use {accepted}")
            width, height = image.size
            if width * height > self.max_pixels:
                raise ImageError(413, "image_too_large", f"{width}x{height} exceeds the {self.max_pixels} pixel limit")
            try:
                if self.draft and image.format in ("JPEG", "MPO"):
                    image.draft("RGB", (self.resize_size, self.resize_size))
                return self.to_rgb(ImageOps.exif_transpose(image))
            except (OSError, SyntaxError, ValueError) as error:
                raise ImageError(400, "corrupt_image", f"the image is corrupt or truncated: {error}") from None

    def to_rgb(self, image: Image.Image) -> Image.Image:
        """Any mode to RGB; transparency is composited onto the spec's background colour."""
        if image.mode == "RGB":
            return image
        if image.mode in ("RGBA", "LA", "PA", "RGBa") or "transparency" in image.info:
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (*self.background, 255))
            return Image.alpha_composite(background, rgba).convert("RGB")
        return image.convert("RGB")

    def to_array(self, image: Image.Image) -> np.ndarray:
        """Resize the shorter side, centre-crop, scale and normalize into CHW float32."""
        width, height = image.size
        short, long = min(width, height), max(width, height)
        new_short, new_long = self.resize_size, int(self.resize_size * long / short)
        size = (new_short, new_long) if width <= height else (new_long, new_short)
        if size != image.size:
            image = image.resize(size, resample=self.resample)
        crop = self.input_size
        top = round((size[1] - crop) / 2.0)  # as torchvision center_crop
        left = round((size[0] - crop) / 2.0)
        image = image.crop((left, top, left + crop, top + crop))
        pixels = np.asarray(image, dtype=np.float32).transpose(2, 0, 1) * self.scale
        return (pixels - self.mean) / self.std

"""Photo bytes to model input with Pillow and NumPy, following the preprocessing spec that travels with the model."""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

from imaging import DEFAULT_MAX_DECODE_BYTES, Decoder

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
# Beyond this ratio of the resized longer side to resize_size, only the crop's region is resampled: resizing the
# whole of a 1x20000 image to a shorter side of 256 would take 5 GB and 12 s. The values then match the full
# resize to within one grey level (floating-point rounding of the same filter), not bit for bit.
MAX_FULL_RESIZE_RATIO = 4


class Preprocessor:
    """Decode, orient, convert to RGB, resize, crop and normalize exactly as the training evaluation transform."""

    def __init__(self, spec: dict[str, Any], max_pixels: int, max_decode_bytes: int = DEFAULT_MAX_DECODE_BYTES) -> None:
        for key, expected in SUPPORTED_STEPS.items():
            if spec.get(key, expected) != expected:
                raise ValueError(f"Invalid preprocess {key} {spec[key]!r}. Only {expected!r} is supported.")
        if spec["interpolation"] not in RESAMPLING:
            raise ValueError(f"Invalid interpolation {spec['interpolation']!r}. Only {', '.join(RESAMPLING)}.")
        self.input_size = int(spec["input_size"])
        self.resize_size = int(spec["resize_size"])
        self.resample = RESAMPLING[spec["interpolation"]]
        self.scale = np.float32(spec.get("scale", 1 / 255))
        self.mean = np.asarray(spec["mean"], dtype=np.float32).reshape(3, 1, 1)
        self.std = np.asarray(spec["std"], dtype=np.float32).reshape(3, 1, 1)
        self.decoder = Decoder.from_spec(spec, max_pixels=max_pixels, max_bytes=max_decode_bytes)

    def __call__(self, data: bytes) -> np.ndarray:
        """One image's bytes to a float32 CHW array."""
        return self.to_array(self.decode(data))

    def decode(self, data: bytes) -> Image.Image:
        """Bytes to an upright RGB image (imaging.Decoder: the same decoding that training reads through)."""
        return self.decoder(data)

    def to_array(self, image: Image.Image) -> np.ndarray:
        """Resize the shorter side, centre-crop, scale and normalize into CHW float32."""
        width, height = image.size
        short, long = min(width, height), max(width, height)
        new_short, new_long = self.resize_size, int(self.resize_size * long / short)
        size = (new_short, new_long) if width <= height else (new_long, new_short)
        crop = self.input_size
        top = round((size[1] - crop) / 2.0)  # as torchvision center_crop
        left = round((size[0] - crop) / 2.0)
        if size != image.size and new_long > MAX_FULL_RESIZE_RATIO * self.resize_size:
            scale_x, scale_y = width / size[0], height / size[1]
            box = (left * scale_x, top * scale_y, (left + crop) * scale_x, (top + crop) * scale_y)
            image = image.resize((crop, crop), resample=self.resample, box=box)
        else:
            if size != image.size:
                image = image.resize(size, resample=self.resample)
            image = image.crop((left, top, left + crop, top + crop))
        pixels = np.asarray(image, dtype=np.float32).transpose(2, 0, 1) * self.scale
        return (pixels - self.mean) / self.std

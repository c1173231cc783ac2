"""Image files to upright RGB pictures, the one implementation that serving, data preparation and training share:
finding images and their class in folders, and decoding them within a budget.

Pillow and NumPy only: the serving image imports this package and must stay free of torch.
"""

from __future__ import annotations

from imaging.budget import DEFAULT_MAX_DECODE_BYTES, DEFAULT_MAX_PIXELS, decode_cost, decoder_bytes
from imaging.decode import ACCEPTED_FORMATS, EXTENSIONS, IMAGE_SUFFIXES, Decoder, ImageError, limit_pillow
from imaging.folders import find_images, is_image_file, label_for_name

__all__ = [
    "ACCEPTED_FORMATS",
    "DEFAULT_MAX_DECODE_BYTES",
    "DEFAULT_MAX_PIXELS",
    "EXTENSIONS",
    "IMAGE_SUFFIXES",
    "Decoder",
    "ImageError",
    "decode_cost",
    "decoder_bytes",
    "find_images",
    "is_image_file",
    "label_for_name",
    "limit_pillow",
]

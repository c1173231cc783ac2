"""Image bytes to an upright RGB picture, the one implementation that serving, data preparation and training share.

Pillow and NumPy only: the serving image imports this package and must stay free of torch.
"""

from __future__ import annotations

from imaging.budget import DEFAULT_MAX_DECODE_BYTES, DEFAULT_MAX_PIXELS, decode_cost, decoder_bytes
from imaging.decode import ACCEPTED_FORMATS, EXTENSIONS, IMAGE_SUFFIXES, Decoder, ImageError, limit_pillow

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
    "limit_pillow",
]

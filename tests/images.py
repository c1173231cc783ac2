"""Real photos from ../shared turned into the inputs the server must handle (formats, twins, bad files)."""

from __future__ import annotations

import io
import struct
import zlib

from PIL import Image, ImageOps

from tests.conftest import DATASET


def photo_bytes(name: str) -> bytes:
    return (DATASET / name).read_bytes()


def encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def reencoded(name: str, fmt: str) -> bytes:
    """A shared photo, decoded upright in RGB and saved again in another format."""
    with Image.open(DATASET / name) as image:
        return encode(ImageOps.exif_transpose(image).convert("RGB"), fmt)


def exif_rotated_twins(name: str, fmt: str = "PNG") -> tuple[bytes, bytes]:
    """(upright, stored rotated with EXIF orientation 6 'rotate 90° to view'): the same picture to a viewer."""
    with Image.open(DATASET / name) as image:
        upright = image.convert("RGB")
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # orientation 6 turns this back upright
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(upright, fmt), encode(stored, fmt, exif=exif)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares huge dimensions but holds no pixel data: a decompression bomb's header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def truncated_jpeg() -> bytes:
    return photo_bytes("dogs/dog.90002.jpg")

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


def transparent_png(name: str) -> bytes:
    """A real photo as RGBA with fully transparent left and right quarters and a half-transparent band in between."""
    with Image.open(DATASET / name) as image:
        rgba = image.convert("RGBA")
    alpha = Image.new("L", rgba.size, 255)
    width, height = rgba.size
    alpha.paste(0, (0, 0, width // 4, height))
    alpha.paste(0, (width - width // 4, 0, width, height))
    alpha.paste(128, (width // 4, 0, width // 2, height // 8))
    rgba.putalpha(alpha)
    return encode(rgba, "PNG")


def flat_png(width: int, height: int, mode: str = "RGB") -> bytes:
    """A decodable PNG of one colour: a few hundred bytes on the wire for millions of pixels."""
    channels = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
    colour = {"L": 0, "RGB": 2, "RGBA": 6}[mode]
    row = b"\x00" + b"\x80" * (width * channels)
    deflate = zlib.compressobj(9)
    data = b"".join(deflate.compress(row) for _ in range(height)) + deflate.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, colour, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", data) + _chunk(b"IEND", b"")


def rle_bmp(width: int, height: int, bits: int = 8) -> bytes:
    """An 8-bit (or 4-bit) RLE BMP of width x height made of "delta" escapes (skip 255 columns and rows): tiny."""
    palette = b"".join(bytes((i, i, i, 0)) for i in range(256))
    pixels = b"\x00\x02\xff\xff" * (height // 255 + 2) + b"\x00\x01"
    offset = 14 + 40 + len(palette)
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, bits, {8: 1, 4: 2}[bits], len(pixels), 2835, 2835, 256, 0)
    return b"BM" + struct.pack("<IHHI", offset + len(pixels), 0, 0, offset) + info + palette + pixels


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def flat_image(fmt: str, width: int, height: int, mode: str = "RGB", **options: object) -> bytes:
    """A one-colour image saved by Pillow: tiny on the wire in any compressed format."""
    return encode(Image.new(mode, (width, height), 128 if mode in ("L", "P") else (128,) * len(mode)), fmt, **options)


def animated(fmt: str, frames: int, size: tuple[int, int] = (256, 256)) -> bytes:
    """An animation of `frames` distinct grey frames; the first is mid-grey."""
    images = [Image.new("L", size, (128 + i) % 256) for i in range(frames)]
    return encode(images[0], fmt, save_all=True, append_images=images[1:], duration=40, loop=0)


def phone_photo(name: str = "cats/cat.90008.jpg", size: tuple[int, int] = (4032, 3024), **options: object) -> bytes:
    """A real photo upscaled to a phone camera's 12 MP and saved as a quality-90 JPEG."""
    with Image.open(DATASET / name) as image:
        return encode(image.convert("RGB").resize(size, Image.Resampling.BICUBIC), "JPEG", quality=90, **options)


# A preprocessing spec as a trained model carries it (params.yaml's `preprocess`), for tests and benchmarks.
SPEC = {
    "labels": ["cat", "dog"],
    "input_size": 224,
    "resize_size": 256,
    "interpolation": "bilinear",
    "mean": [0.485, 0.456, 0.406],
    "std": [0.229, 0.224, 0.225],
    "jpeg_draft": True,
    "reducing_gap": 2.0,
}

"""Non-pet images ImageNet never had, generated deterministically in code: documents, screenshots, blank and noisy
images, line drawings, gradients and charts. They check the not-a-pet signal away from ImageNet's photos.

`python -m export.synthetic OUT_DIR` writes them as files for a look; the pipeline generates them in memory.
"""

from __future__ import annotations

import argparse
import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

Rng = np.random.Generator
WORDS = [
    "invoice",
    "total",
    "amount",
    "due",
    "date",
    "account",
    "customer",
    "order",
    "shipping",
    "address",
    "payment",
    "terms",
    "the",
    "of",
    "and",
    "to",
    "in",
    "for",
    "with",
    "report",
    "summary",
    "quarter",
    "revenue",
    "growth",
    "meeting",
    "agenda",
    "notes",
    "project",
    "status",
    "update",
    "please",
    "sign",
    "here",
    "policy",
    "number",
    "reference",
    "page",
    "section",
    "table",
    "figure",
    "results",
    "analysis",
]
SIZES = ((640, 480), (800, 600), (1024, 768), (1280, 720), (500, 500), (600, 800))


def font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def colour(rng: Rng, low: int = 0, high: int = 256) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(low, high, 3))  # type: ignore[return-value]


def sentence(rng: Rng, words: int) -> str:
    return " ".join(rng.choice(WORDS, words)).capitalize()


def document(rng: Rng) -> Image.Image:
    """A page of text: heading, paragraphs, sometimes a table, on white or off-white paper."""
    width = int(rng.integers(500, 900))
    image = Image.new("RGB", (width, int(width * 1.41)), colour(rng, 235))
    draw = ImageDraw.Draw(image)
    size = int(rng.integers(11, 18))
    y = 40
    draw.text((40, y), sentence(rng, 4).upper(), fill=(10, 10, 10), font=font(size + 8))
    y += size * 3
    while y < image.height - 60:
        if rng.random() < 0.15:  # a ruled table
            rows, cols = int(rng.integers(3, 7)), int(rng.integers(2, 5))
            cell = (width - 80) // cols
            for _ in range(rows):
                for c in range(cols):
                    box = (40 + c * cell, y, 40 + (c + 1) * cell, y + size * 2)
                    draw.rectangle(box, outline=(60, 60, 60))
                    draw.text((box[0] + 4, y + 4), str(rng.choice(WORDS)), fill=(20, 20, 20), font=font(size))
                y += size * 2
            y += size
            continue
        for _ in range(int(rng.integers(2, 7))):
            draw.text((40, y), sentence(rng, int(rng.integers(5, 11))), fill=colour(rng, 0, 60), font=font(size))
            y += int(size * 1.5)
        y += size
    return image


def screenshot(rng: Rng) -> Image.Image:
    """A window or web page: title bar, sidebar, buttons, text fields and text."""
    width, height = SIZES[int(rng.integers(len(SIZES)))]
    background = colour(rng, 200) if rng.random() < 0.7 else colour(rng, 20, 60)
    ink = (20, 20, 20) if sum(background) > 300 else (230, 230, 230)
    image = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 0, width, 36), fill=colour(rng))
    draw.text((12, 10), sentence(rng, 3), fill=(255, 255, 255), font=font(16))
    sidebar = int(rng.integers(0, width // 4))
    if sidebar:
        draw.rectangle((0, 36, sidebar, height), fill=colour(rng, 150, 230))
        for i in range(int(rng.integers(4, 12))):
            draw.text((10, 50 + i * 28), str(rng.choice(WORDS)).title(), fill=ink, font=font(14))
    x0, y = sidebar + 20, 56
    while y < height - 40:
        kind = rng.random()
        if kind < 0.3:
            w = int(rng.integers(80, 200))
            draw.rounded_rectangle((x0, y, x0 + w, y + 32), radius=6, fill=colour(rng))
            draw.text((x0 + 10, y + 8), str(rng.choice(WORDS)).title(), fill=(255, 255, 255), font=font(14))
            y += 48
        elif kind < 0.5:
            draw.rectangle((x0, y, width - 20, y + 30), outline=(120, 120, 120), fill=(255, 255, 255))
            y += 44
        else:
            draw.text((x0, y), sentence(rng, int(rng.integers(4, 12))), fill=ink, font=font(14))
            y += 24
    return image


def blank(rng: Rng) -> Image.Image:
    """One flat colour (black, white, grey or any)."""
    width, height = SIZES[int(rng.integers(len(SIZES)))]
    choice = rng.random()
    fill = (0, 0, 0) if choice < 0.2 else (255, 255, 255) if choice < 0.4 else colour(rng)
    return Image.new("RGB", (width, height), fill)


def noise(rng: Rng) -> Image.Image:
    """Gaussian, uniform, salt-and-pepper or blocky noise, colour or grey."""
    width, height = SIZES[int(rng.integers(len(SIZES)))]
    kind = int(rng.integers(4))
    if kind == 0:
        pixels = rng.normal(128, rng.uniform(10, 80), (height, width, 3))
    elif kind == 1:
        pixels = rng.uniform(0, 255, (height, width, 1 if rng.random() < 0.5 else 3)) * np.ones((1, 1, 3))
    elif kind == 2:
        pixels = np.full((height, width, 3), 128.0)
        mask = rng.random((height, width))
        pixels[mask < 0.1], pixels[mask > 0.9] = 0, 255
    else:
        block = int(rng.integers(8, 64))
        small = rng.uniform(0, 255, (height // block + 1, width // block + 1, 3))
        pixels = np.kron(small, np.ones((block, block, 1)))[:height, :width]
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def drawing(rng: Rng) -> Image.Image:
    """Line art: strokes, circles, polygons and curves on paper."""
    width, height = SIZES[int(rng.integers(len(SIZES)))]
    image = Image.new("RGB", (width, height), colour(rng, 225))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(5, 40))):
        ink = (0, 0, 0) if rng.random() < 0.6 else colour(rng)
        line = int(rng.integers(1, 6))
        x, y = int(rng.integers(width)), int(rng.integers(height))
        r = int(rng.integers(10, min(width, height) // 3))
        kind = int(rng.integers(4))
        if kind == 0:
            draw.ellipse((x - r, y - r, x + r, y + r), outline=ink, width=line)
        elif kind == 1:
            draw.polygon([tuple(rng.integers(0, (width, height))) for _ in range(int(rng.integers(3, 7)))], outline=ink)
        elif kind == 2:
            draw.arc((x - r, y - r, x + r, y + r), int(rng.integers(360)), int(rng.integers(360)), fill=ink, width=line)
        else:
            points = np.cumsum(rng.normal(0, 20, (int(rng.integers(5, 40)), 2)), 0) + np.array([x, y])
            draw.line([tuple(p) for p in points.astype(int)], fill=ink, width=line)
    return image


def gradient(rng: Rng) -> Image.Image:
    """A linear or radial gradient between two colours."""
    width, height = SIZES[int(rng.integers(len(SIZES)))]
    a, b = np.array(colour(rng), float), np.array(colour(rng), float)
    ys, xs = np.mgrid[0:height, 0:width]
    if rng.random() < 0.5:
        angle = rng.uniform(0, np.pi)
        t = xs * np.cos(angle) + ys * np.sin(angle)
    else:
        t = np.hypot(xs - rng.uniform(0, width), ys - rng.uniform(0, height))
    t = (t - t.min()) / max(np.ptp(t), 1e-9)
    return Image.fromarray((a + (b - a) * t[..., None]).astype(np.uint8))


def chart(rng: Rng) -> Image.Image:
    """A bar, line or pie chart with axes, title and labels."""
    width, height = SIZES[int(rng.integers(len(SIZES)))]
    image = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    draw.text((width // 3, 10), sentence(rng, 3), fill=(0, 0, 0), font=font(18))
    left, top, right, bottom = 60, 50, width - 30, height - 50
    values = rng.uniform(0.1, 1.0, int(rng.integers(3, 12)))
    kind = int(rng.integers(3))
    if kind == 2:
        start = 0.0
        for value in values / values.sum():
            box = (width // 2 - 150, height // 2 - 150, width // 2 + 150, height // 2 + 150)
            draw.pieslice(box, start, start + 360 * value, fill=colour(rng), outline=(255, 255, 255))
            start += 360 * value
        return image
    draw.line((left, top, left, bottom, right, bottom), fill=(0, 0, 0), width=2)
    for i in range(5):
        y = bottom - (bottom - top) * i // 4
        draw.line((left - 5, y, right, y), fill=(220, 220, 220))
        draw.text((10, y - 6), f"{i * 25}", fill=(0, 0, 0), font=font(12))
    step = (right - left) / len(values)
    points = [(left + step * (i + 0.5), bottom - (bottom - top) * v) for i, v in enumerate(values)]
    if kind == 0:
        fill = colour(rng)
        for x, y in points:
            draw.rectangle((x - step * 0.35, y, x + step * 0.35, bottom), fill=fill)
    else:
        draw.line(points, fill=colour(rng), width=3)
    return image


KINDS: dict[str, Callable[[Rng], Image.Image]] = {
    "document": document,
    "screenshot": screenshot,
    "blank": blank,
    "noise": noise,
    "drawing": drawing,
    "gradient": gradient,
    "chart": chart,
}


def generate(per_kind: int = 30, seed: int = 0) -> list[tuple[str, str, bytes]]:
    """(name, kind, encoded bytes) for per_kind images of every kind; the same seed gives the same bytes."""
    images = []
    for k, (kind, make) in enumerate(KINDS.items()):
        for i in range(per_kind):
            rng = np.random.default_rng([seed, k, i])
            buffer = io.BytesIO()
            fmt = "JPEG" if i % 3 == 0 else "PNG"  # both encodings, as uploads come
            make(rng).save(buffer, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
            images.append((f"{kind}_{i:03d}.{fmt.lower().replace('jpeg', 'jpg')}", kind, buffer.getvalue()))
    return images


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", type=Path)
    parser.add_argument("--per-kind", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, _, data in generate(args.per_kind, args.seed):
        (args.out / name).write_bytes(data)
    print(f"{len(KINDS) * args.per_kind} images in {args.out}")


if __name__ == "__main__":
    main()

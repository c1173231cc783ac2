"""Preprocessing defined once: the spec that travels with the model, and the torchvision presets built from it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torchvision.transforms import v2 as T

from imaging import Decoder

INTERPOLATIONS = {
    "nearest": T.InterpolationMode.NEAREST,
    "bilinear": T.InterpolationMode.BILINEAR,
    "bicubic": T.InterpolationMode.BICUBIC,
}
ALPHA_BACKGROUND = (255, 255, 255)


@dataclass(frozen=True)
class PreprocessSpec:
    """Everything needed to turn a photo into the model's input; saved with every model."""

    labels: tuple[str, ...]
    input_size: int
    resize_size: int
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    jpeg_draft: bool
    # Box-reduce by an integer factor first when the shorter side is at least this many times resize_size
    # (imaging.Decoder); None for models trained before the step existed, which are served without it.
    reducing_gap: float | None = None
    # Fixed steps, stated so a consumer can check it implements every one of them.
    resize_policy: str = "shorter_side"
    crop: str = "center"
    exif_transpose: bool = True
    color: str = "RGB"
    alpha_background: tuple[int, int, int] = field(default=ALPHA_BACKGROUND)
    scale: float = 1 / 255
    layout: str = "NCHW"

    def __post_init__(self) -> None:
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"Invalid interpolation {self.interpolation!r}. Only {', '.join(INTERPOLATIONS)} are supported."
            )
        if self.reducing_gap is not None and self.reducing_gap < 1:
            raise ValueError(f"reducing_gap must be None or at least 1, got {self.reducing_gap}")
        if self.resize_size < self.input_size:
            raise ValueError("resize_size must be at least input_size")
        if len(self.labels) < 2 or len(set(self.labels)) != len(self.labels):
            raise ValueError(f"labels must be two or more distinct names, got {self.labels}")

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> PreprocessSpec:
        tuples = {k: tuple(v) for k, v in raw.items() if isinstance(v, list)}
        return cls(**{**raw, **tuples})

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


class ImageLoader:
    """Picklable file loader for DataLoader workers: the file's bytes through the decoder the server uses."""

    def __init__(self, *, spec: PreprocessSpec) -> None:
        self.decode = Decoder.from_spec(spec.to_dict())

    def __call__(self, path: str | Path) -> Image.Image:
        return self.decode(Path(path).read_bytes())


def _to_normalized_tensor(spec: PreprocessSpec) -> list[Any]:
    return [
        T.PILToTensor(),
        T.ToDtype(torch.float32, scale=True),
        T.Normalize(mean=list(spec.mean), std=list(spec.std)),
    ]


class ClassificationPresetEval:
    """Deterministic resize (shorter side), centre crop, scale and normalize."""

    def __init__(self, *, spec: PreprocessSpec) -> None:
        self.transforms = T.Compose(
            [
                T.Resize(spec.resize_size, interpolation=INTERPOLATIONS[spec.interpolation], antialias=True),
                T.CenterCrop(spec.input_size),
                *_to_normalized_tensor(spec),
            ]
        )

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.transforms(image)


class ClassificationPresetTrain:
    """Light augmentation for the training split only, at the same object scale as evaluation (resize, then crop)."""

    def __init__(
        self,
        *,
        spec: PreprocessSpec,
        hflip: float = 0.5,
        rotation_degrees: float = 10.0,
        color_jitter: float = 0.0,
    ) -> None:
        interpolation = INTERPOLATIONS[spec.interpolation]
        steps: list[Any] = [
            T.Resize(spec.resize_size, interpolation=interpolation, antialias=True),
            T.RandomCrop(spec.input_size),
        ]
        if hflip > 0:
            steps.append(T.RandomHorizontalFlip(hflip))
        if rotation_degrees > 0:
            steps.append(T.RandomRotation(rotation_degrees, interpolation=interpolation))
        if color_jitter > 0:
            steps.append(T.ColorJitter(brightness=color_jitter, contrast=color_jitter, saturation=color_jitter))
        self.transforms = T.Compose([*steps, *_to_normalized_tensor(spec)])

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.transforms(image)

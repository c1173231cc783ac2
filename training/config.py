"""params.yaml loaded into frozen dataclasses at the CLI edge."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

DEFAULT_PARAMS = Path("params.yaml")


@dataclass(frozen=True)
class SplitParams:
    train: float
    val: float
    test: float

    def __post_init__(self) -> None:
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-9 or min(self.train, self.val, self.test) <= 0:
            raise ValueError(f"split fractions must be positive and sum to 1, got {total}")


@dataclass(frozen=True)
class DataParams:
    raw_dir: str
    processed_dir: str
    reports_dir: str
    split: SplitParams
    split_salt: str
    source_url: str
    source_sha256: str


@dataclass(frozen=True)
class AugmentParams:
    hflip: float
    rotation_degrees: float
    color_jitter: float


@dataclass(frozen=True)
class StageParams:
    epochs: int
    lr: float
    weight_decay: float
    patience: int
    label_smoothing: float = 0.0
    unfreeze_blocks: int = 0
    augment: AugmentParams | None = None


@dataclass(frozen=True)
class TrainParams:
    seed: int
    batch_size: int
    num_workers: int
    baseline: StageParams
    final: StageParams
    hflip_average: bool = False


@dataclass(frozen=True)
class MlflowParams:
    experiment: str
    registered_model: str
    champion_alias: str
    candidate_alias: str = "candidate"


@dataclass(frozen=True)
class ExportParams:
    opset: int
    min_accuracy: float
    int8_reduce_range: bool
    calibration_images: int
    mirror_gate: bool = True


@dataclass(frozen=True)
class PetParams:
    not_pets_dir: str
    keep_target: float
    synthetic_per_kind: int
    shows_pet: tuple[str, ...] = ()  # not-pet files that show a domestic cat or dog after all (audited by eye)


@dataclass(frozen=True)
class Params:
    data: DataParams
    preprocess: dict[str, Any]
    train: TrainParams
    mlflow: MlflowParams
    export: ExportParams
    pet: PetParams | None = None
    gates: dict[str, Any] | None = None  # training.gates.Rule reads it: the one rule of every gate


def _stage(raw: dict[str, Any]) -> StageParams:
    augment = raw.get("augment")
    return StageParams(**{**raw, "augment": AugmentParams(**augment) if augment else None})


def load_params(path: Path = DEFAULT_PARAMS) -> Params:
    """Read params.yaml into typed, immutable parameters."""
    raw = yaml.safe_load(Path(path).read_text())
    data = raw["data"]
    train = raw["train"]
    return Params(
        data=DataParams(**{**data, "split": SplitParams(**data["split"])}),
        preprocess=dict(raw["preprocess"]),
        train=TrainParams(**{**train, "baseline": _stage(train["baseline"]), "final": _stage(train["final"])}),
        mlflow=MlflowParams(**raw["mlflow"]),
        export=ExportParams(**raw["export"]),
        pet=PetParams(**{**raw["pet"], "shows_pet": tuple(raw["pet"].get("shows_pet") or ())})
        if raw.get("pet")
        else None,
        gates=raw.get("gates"),
    )

"""Which file MODEL_PATH serves: a file as given, or in a folder the int8 model when it was quantized from the
float32 model beside it, else the float32 model.

Only the two served names are ever looked at. `make export` writes and gates each model in a hidden staging folder
beside them and renames it to its served name only once its gate accepted it (export/staging.py), so a model that a
refused or interrupted gate left behind is never chosen here."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnxruntime as ort

FLOAT32, INT8 = "model.onnx", "model.int8.onnx"
METADATA_KEY = "catsdogs"  # written by export.convert: one JSON document in the model's metadata_props


@dataclass(frozen=True)
class ModelFile:
    path: Path
    reason: str


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def read_metadata(path: Path) -> dict[str, Any]:
    """The metadata an exported model carries (export.convert.write_metadata); {} when it carries none."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # only the metadata is read
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    metadata = json.loads(session.get_modelmeta().custom_metadata_map.get(METADATA_KEY, "{}"))
    return metadata if isinstance(metadata, dict) else {}


def quantized_from(path: Path) -> str | None:
    """The sha256 of the float32 file an int8 model records it was quantized from (None when it records none)."""
    source = read_metadata(path).get("quantized_from")
    sha256 = source.get("sha256") if isinstance(source, dict) else None
    return sha256 if isinstance(sha256, str) else None


def choose_model_file(path: Path) -> ModelFile:
    """The file to serve for MODEL_PATH, and why. A folder serves model.int8.onnx only when its recorded source is
    the model.onnx beside it (an int8 left from an older model is never served), else model.onnx."""
    if not path.is_dir():
        return ModelFile(path, "MODEL_PATH names this file")
    float32, int8 = path / FLOAT32, path / INT8
    if not int8.is_file():
        return ModelFile(float32, f"no {INT8} in {path} (make export keeps it only when the int8 gate accepts it; "
                                  "reports/quantize.json says why not)")  # fmt: skip
    if not float32.is_file():
        return ModelFile(int8, f"{INT8} is the only model in {path}")
    try:
        source = quantized_from(int8)
    except Exception as error:  # an unreadable int8 must not stop the float32 model from serving
        return fall_back(float32, f"cannot read {INT8}: {error}")
    if source is None:
        return fall_back(float32, f"{INT8} does not record the {FLOAT32} it was quantized from")
    current = sha256_file(float32)
    if source != current:
        return fall_back(
            float32, f"{INT8} was quantized from another {FLOAT32} (sha256 {source[:12]}, this one {current[:12]})"
        )
    return ModelFile(
        int8,
        f"{INT8} was quantized from the {FLOAT32} beside it (sha256 {current[:12]}); its gate: reports/quantize.json",
    )


def fall_back(float32: Path, why: str) -> ModelFile:
    reason = f"{why}: serving {FLOAT32}"
    logging.getLogger("catsdogs").warning("model file", extra={"model_path": str(float32), "model_choice": reason})
    return ModelFile(float32, reason)

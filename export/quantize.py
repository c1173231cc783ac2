"""Static int8 quantization (QDQ, per-channel weights) calibrated on training images, with its accuracy gate."""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

from export.convert import log_to_run, write_metadata
from export.evaluate import evaluate_onnx, load_split, read_metadata
from training.config import DEFAULT_PARAMS, load_params
from training.presets import PreprocessSpec
from training.utils import write_json


class ArrayReader(CalibrationDataReader):
    """Feeds calibration inputs one batch at a time."""

    def __init__(self, input_name: str, inputs: np.ndarray, batch_size: int = 16) -> None:
        self.batches = iter([{input_name: inputs[i : i + batch_size]} for i in range(0, len(inputs), batch_size)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.batches, None)


def quantize_int8(fp32_path: Path, int8_path: Path, input_name: str, calibration: np.ndarray) -> None:
    """Write a QDQ int8 copy of fp32_path, activations calibrated on the given inputs."""
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32_path), str(prepared))
        quantize_static(
            str(prepared),
            str(int8_path),
            ArrayReader(input_name, calibration),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
        )


def compare(targets: np.ndarray, fp32: np.ndarray, int8: np.ndarray, max_drop: float) -> dict[str, Any]:
    """Accuracy drop and every label flip between float32 and int8 probabilities on the same images."""
    fp32_labels, int8_labels = fp32.argmax(1), int8.argmax(1)
    flips = np.flatnonzero(fp32_labels != int8_labels).tolist()
    accuracy_fp32 = float((fp32_labels == targets).mean())
    accuracy_int8 = float((int8_labels == targets).mean())
    drop = accuracy_fp32 - accuracy_int8
    return {
        "accuracy_fp32": accuracy_fp32,
        "accuracy_int8": accuracy_int8,
        "accuracy_drop": drop,
        "max_accuracy_drop": max_drop,
        "label_flips": len(flips),
        "flipped_indices": flips,
        "max_abs_probability_diff": float(np.abs(fp32 - int8).max()),
        "accepted": drop <= max_drop,
    }


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, default=Path("models/model.onnx"), help="the float32 model")
    parser.add_argument("--params", type=Path, default=DEFAULT_PARAMS)
    parser.add_argument("--data", type=Path, default=None, help="prepared ImageFolder root (default: params)")
    parser.add_argument("--report", type=Path, default=Path("reports/quantize.json"))
    return parser


def main(argv: list[str] | None = None) -> None:
    args = get_args_parser().parse_args(argv)
    params = load_params(args.params)
    settings = params.export
    metadata = read_metadata(args.model)
    spec = PreprocessSpec.from_dict(metadata["preprocess"])
    data_dir = args.data or Path(params.data.processed_dir)
    train_inputs, _ = load_split(data_dir, "train", spec)
    rng = np.random.default_rng(params.train.seed)
    calibration = train_inputs[rng.permutation(len(train_inputs))[: settings.calibration_images]]
    inputs, targets = load_split(data_dir, "test", spec)

    int8_path = args.model.with_name(f"{args.model.stem}.int8.onnx")
    quantize_int8(args.model, int8_path, metadata["input_name"], calibration)
    write_metadata(int8_path, {**metadata, "precision": "int8"})
    fp32, fp32_probabilities = evaluate_onnx(args.model, inputs, targets, list(spec.labels))
    int8, int8_probabilities = evaluate_onnx(int8_path, inputs, targets, list(spec.labels))
    gate = compare(targets, fp32_probabilities, int8_probabilities, settings.int8_max_accuracy_drop)
    report = {"float32": fp32, "int8": int8, "gate": gate, "calibration_images": len(calibration)}
    write_json(args.report, report)
    if not gate["accepted"]:
        int8_path.unlink()
        int8_path.with_suffix(".json").unlink()
        raise SystemExit(
            f"int8 model refused: test accuracy {gate['accuracy_int8']:.4f} vs float32 {gate['accuracy_fp32']:.4f} "
            f"(drop {gate['accuracy_drop']:.4f} > {gate['max_accuracy_drop']:.4f}), {gate['label_flips']} label flips"
        )
    log_to_run(metadata.get("run_id"), [int8_path], {"onnx_int8_test_accuracy": int8["accuracy"],
                                                     "onnx_int8_label_flips": gate["label_flips"]})  # fmt: skip
    print(
        json.dumps({"written": str(int8_path), **{k: v for k, v in gate.items() if k != "flipped_indices"}}, indent=2)
    )


if __name__ == "__main__":
    main()

"""Static int8 quantization (QDQ, per-channel weights) calibrated on training images, with its accuracy gate.

Accepted, models/model.int8.onnx is written beside the float32 model, pinned to it by sha256 (`quantized_from`), and
is what the service serves from the folder; refused, no int8 file is left and float32 is served (exit 0, one warning
line; --strict exits 1 instead). Either way the report and the MLflow run's `served_model` tag say which is served.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

from export import not_a_pet
from export.convert import choose_mirror_gate, log_to_run, write_metadata
from export.evaluate import evaluate_onnx, load_split, make_session, predict, read_metadata
from export.reference import reference_for_split
from export.served import tag_served
from server.mirror import ALWAYS
from training import tracking
from training.config import DEFAULT_PARAMS, load_params
from training.presets import PreprocessSpec
from training.stats import paired
from training.utils import sha256_file, write_json


class ArrayReader(CalibrationDataReader):
    """Feeds calibration inputs one batch at a time."""

    def __init__(self, input_name: str, inputs: np.ndarray, batch_size: int = 16) -> None:
        self.batches = iter([{input_name: inputs[i : i + batch_size]} for i in range(0, len(inputs), batch_size)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.batches, None)


def head_nodes(model: onnx.ModelProto) -> list[str]:
    """The nodes after the backbone's last convolution: global pooling, the class and pet heads, the view averaging.

    They stay float32. Quantized, their outputs came out in 8-bit steps of 1/255: probabilities that did not sum to
    1 (a cat at 0.996 with the dog at exactly 0.0) and a pet score whose threshold (about 0.02) sat 5 steps above
    zero. They are two matrix products on 1280 features, under 1% of the work, so keeping them costs no speed.
    A node is in the backbone when a convolution reads what it computes (so a squeeze-and-excitation block's pooling
    stays in it); every graph output must come from the heads.
    """
    producers = {output: node for node in model.graph.node for output in node.output}
    backbone: set[int] = set()
    pending = [node for node in model.graph.node if node.op_type == "Conv"]
    if not pending:
        raise ValueError("the model has no Conv node: nothing to quantize as a backbone")
    while pending:
        node = pending.pop()
        if id(node) not in backbone:
            backbone.add(id(node))
            pending.extend(producers[name] for name in node.input if name in producers)
    heads = [node for node in model.graph.node if id(node) not in backbone]
    names = {node.name for node in heads}
    unnamed = [node.op_type for node in heads if not node.name]
    outputs = {producers[output.name].name for output in model.graph.output if output.name in producers}
    if unnamed or not outputs <= names:
        raise ValueError(f"cannot keep the heads in float32: unnamed nodes {unnamed} or outputs {outputs - names}")
    return [node.name for node in heads]


def quantize_int8(
    fp32_path: Path, int8_path: Path, input_name: str, calibration: np.ndarray, reduce_range: bool = True
) -> None:
    """Write a QDQ int8 copy of fp32_path, activations calibrated on the given inputs; the heads stay float32.
    reduce_range: 7-bit weights, so that no CPU's 8-bit dot products saturate (those without VNNI do)."""
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32_path), str(prepared))
        quantize_static(
            str(prepared),
            str(int8_path),
            ArrayReader(input_name, calibration),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            reduce_range=reduce_range,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=head_nodes(onnx.load(str(prepared))),
        )


def quantized_metadata(metadata: dict[str, Any], fp32_path: Path) -> dict[str, Any]:
    """The float32 model's metadata for its int8 copy, pinned to the float32 file by sha256 (server.model_file checks
    the pin before serving the int8 model from a folder)."""
    return {
        **metadata,
        "precision": "int8",
        "quantized_from": {"file": fp32_path.name, "sha256": sha256_file(fp32_path)},
    }


def compare(targets: np.ndarray, fp32: np.ndarray, int8: np.ndarray, max_relative_loss: float) -> dict[str, Any]:
    """int8 vs float32 on the same photos: label flips, and the paired accuracy comparison with its intervals.

    Accepted when the exact 95% upper bound of the share of photos only float32 gets right is at most
    max_relative_loss of float32's accuracy (MLPerf's 99% of the FP32 reference): a bound on what int8 can lose,
    not a point estimate that one photo moves by half a point.
    """
    fp32_labels, int8_labels = fp32.argmax(1), int8.argmax(1)
    flips = np.flatnonzero(fp32_labels != int8_labels).tolist()
    comparison = paired(fp32_labels == targets, int8_labels == targets)
    limit = max_relative_loss * comparison["accuracy_reference"]
    return {
        "photos": len(targets),
        "accuracy_fp32": comparison["accuracy_reference"],
        "accuracy_int8": comparison["accuracy_candidate"],
        "accuracy_drop": -comparison["difference"],
        "paired": comparison,
        "rule": f"the 95% upper bound of int8's paired loss <= {max_relative_loss:g} x float32's accuracy",
        "max_relative_loss": max_relative_loss,
        "max_loss": limit,
        "label_flips": len(flips),
        "flipped_indices": flips,
        "max_abs_probability_diff": float(np.abs(fp32 - int8).max()),
        "accepted": comparison["max_loss_upper95"] <= limit,
    }


Sets = dict[str, tuple[np.ndarray, np.ndarray]]  # held-out set name -> (pet scores, non-pet scores)


def pet_rates_hold(fp32: Sets, fp32_threshold: float, int8: Sets, int8_threshold: float) -> dict[str, Any]:
    """The not-a-pet rates of int8 at its own threshold against float32's at its own, paired on the same images of
    each held-out set: pets kept and non-pets flagged. They hold when int8 is not worse beyond the noise (McNemar's
    exact p >= 0.05 whenever int8 is lower): with a few hundred images a bound as tight as the accuracy rule's
    cannot be shown either way, so this is the check the data allows, and the report keeps every count."""
    sets: dict[str, Any] = {}
    for name, (fp32_pets, fp32_others) in fp32.items():
        int8_pets, int8_others = int8[name]
        kept = paired(fp32_pets >= fp32_threshold, int8_pets >= int8_threshold)
        caught = paired(fp32_others < fp32_threshold, int8_others < int8_threshold)
        sets[name] = {"pets_kept": kept, "not_pets_flagged": caught}
    worse = [
        f"{name}: {what}" for name, rates in sets.items() for what, p in rates.items()
        if p["difference"] < 0 and p["mcnemar_p"] < 0.05
    ]  # fmt: skip
    return {"sets": sets, "worse": worse, "hold": not worse}


def evaluation_set(data_dir: Path, spec: PreprocessSpec, calibration_count: int, seed: int) -> dict[str, Any]:
    """Calibration images (drawn from train) and every other prepared photo (rest of train, val, test) to compare on."""
    train_inputs, train_targets = load_split(data_dir, "train", spec)
    order = np.random.default_rng(seed).permutation(len(train_inputs))
    calibration, rest = order[:calibration_count], order[calibration_count:]
    parts = [load_split(data_dir, split, spec) for split in ("val", "test")]
    return {
        "calibration": train_inputs[calibration],
        "inputs": np.concatenate([train_inputs[rest], *(p[0] for p in parts)]),
        "targets": np.concatenate([train_targets[rest], *(p[1] for p in parts)]),
        "test": parts[1],
    }


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, default=Path("models/model.onnx"), help="the float32 model")
    parser.add_argument("--params", type=Path, default=DEFAULT_PARAMS)
    parser.add_argument("--data", type=Path, default=None, help="prepared ImageFolder root (default: params)")
    parser.add_argument("--report", type=Path, default=Path("reports/quantize.json"))
    parser.add_argument("--strict", action="store_true", help="exit 1 when the gate refuses int8 (default: warn, "
                        "serve float32, exit 0)")  # fmt: skip
    return parser


def remove(int8_path: Path) -> None:
    """The int8 model and its sidecar, so that none made from another float32 model is left to serve."""
    for path in (int8_path, int8_path.with_suffix(".json")):
        path.unlink(missing_ok=True)


def refusal(gate: dict[str, Any]) -> str:
    if gate.get("pet_rates_worse"):
        return f"int8 model refused: its not-a-pet rates are worse than float32's: {'; '.join(gate['pet_rates_worse'])}"
    return (
        f"int8 model refused: on {gate['photos']} photos its accuracy is {gate['accuracy_int8']:.4f} vs float32 "
        f"{gate['accuracy_fp32']:.4f}; it may lose up to {gate['paired']['max_loss_upper95']:.4%} (95% bound) > "
        f"{gate['max_relative_loss']:g} x float32's accuracy = {gate['max_loss']:.4%} "
        f"(export.int8_max_relative_loss); {gate['label_flips']} label flips"
    )


def main(argv: list[str] | None = None) -> None:
    args = get_args_parser().parse_args(argv)
    params = load_params(args.params)
    settings = params.export
    tracking.configure(params.mlflow.experiment)
    metadata = read_metadata(args.model)
    spec = PreprocessSpec.from_dict(metadata["preprocess"])
    data_dir = args.data or Path(params.data.processed_dir)
    int8_path = args.model.with_name(f"{args.model.stem}.int8.onnx")
    remove(int8_path)  # a run that fails half-way leaves no int8 model behind
    data = evaluation_set(data_dir, spec, settings.calibration_images, params.train.seed)
    calibration, (inputs, targets) = data["calibration"], data["test"]

    quantize_int8(args.model, int8_path, metadata["input_name"], calibration, settings.int8_reduce_range)
    int8_metadata = quantized_metadata(metadata, args.model)
    if metadata.get("reference"):  # drift's baseline from the int8 model's own outputs, as convert does for float32
        int8_metadata["reference"] = reference_for_split(int8_path, data_dir, spec)
    write_metadata(int8_path, int8_metadata)
    fp32, _ = evaluate_onnx(args.model, inputs, targets, list(spec.labels))
    int8, _ = evaluate_onnx(int8_path, inputs, targets, list(spec.labels))
    fp32_all = predict(make_session(args.model), data["inputs"])
    int8_all = predict(make_session(int8_path), data["inputs"])
    gate = compare(data["targets"], fp32_all, int8_all, settings.int8_max_relative_loss)
    report: dict[str, Any] = {
        "float32": fp32,
        "int8": int8,
        "gate": gate,
        "gate_photos": "every prepared photo except the calibration images (rest of train, val, test)",
        "calibration_images": len(calibration),
        "reduce_range": settings.int8_reduce_range,
    }
    if gate["accepted"] and metadata.get("pet") and params.pet is not None:
        # int8 moves the pet score: its threshold is re-chosen on its own (always flip-averaged) scores by the same
        # rule, its mirror gate around that threshold, and its rates must hold against float32's, each as served
        if metadata.get("mirror"):
            write_metadata(int8_path, {**int8_metadata, "mirror": {"gate": ALWAYS.to_dict()}})
        pet, pet_report, _ = not_a_pet.calibrate(int8_path, data_dir, params.pet)
        int8_metadata = {**int8_metadata, "pet": {**metadata["pet"], **pet}}
        if metadata.get("mirror"):
            mirror_gate, report["mirror"] = choose_mirror_gate(int8_path, data_dir, spec, params, int8_metadata)
            int8_metadata["mirror"] = {**metadata["mirror"], "gate": mirror_gate.to_dict()}
        write_metadata(int8_path, int8_metadata)
        _, _, fp32_sets = not_a_pet.calibrate(args.model, data_dir, params.pet)
        _, _, int8_sets = not_a_pet.calibrate(int8_path, data_dir, params.pet)
        rates = pet_rates_hold(fp32_sets, metadata["pet"]["threshold"], int8_sets, pet["threshold"])
        report["pet"] = {"threshold_float32": metadata["pet"].get("threshold"), "threshold_int8": pet["threshold"],
                         "at_threshold": pet_report["at_threshold"], "paired_with_float32": rates}  # fmt: skip
        if not rates["hold"]:
            gate = {**gate, "accepted": False, "pet_rates_worse": rates["worse"]}
    if not gate["accepted"]:
        remove(int8_path)
        reason = refusal(gate)
        write_json(args.report, {**report, "served": "float32", "reason": reason})
        tag_served(metadata.get("run_id"), args.model.name)
        if args.strict:
            raise SystemExit(reason)
        print(f"warning: {reason}; serving float32 {args.model}", file=sys.stderr)
        return
    reason = (
        f"int8 model accepted: on {gate['photos']} photos it may lose up to {gate['paired']['max_loss_upper95']:.4%} "
        f"(95% bound) <= {gate['max_relative_loss']:g} x float32's accuracy = {gate['max_loss']:.4%}, and its "
        "not-a-pet rates hold"
    )
    write_json(args.report, {**report, "served": "int8", "reason": reason})
    log_to_run(metadata.get("run_id"), [int8_path], {"onnx_int8_test_accuracy": int8["accuracy"],
                                                     "onnx_int8_label_flips": gate["label_flips"]})  # fmt: skip
    tag_served(metadata.get("run_id"), int8_path.name)
    print(
        json.dumps({"written": str(int8_path), **{k: v for k, v in gate.items() if k != "flipped_indices"}}, indent=2)
    )


if __name__ == "__main__":
    main()

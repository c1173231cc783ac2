"""Static int8 quantization (QDQ, per-channel weights) calibrated on training images, with its gate: int8 as served
must be shown not worse than float32 as served on accuracy, pets kept and non-pets flagged (training.gates).

The int8 model is written and judged in a staging folder beside the float32 model (export.staging). Accepted, it is
renamed to models/model.int8.onnx, pinned to the float32 model by sha256 (`quantized_from`), and is what the service
serves from the folder; refused or interrupted, no int8 file is left under that name and float32 is served (a
refusal exits 0 with one warning line; --strict exits 1 instead). The report and the MLflow run's `served_model` tag
say which is served.
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

from export import answers, not_a_pet
from export.answers import served_answers
from export.convert import choose_mirror_gate, log_to_run, write_metadata
from export.evaluate import evaluate_onnx, load_split, read_metadata
from export.reference import reference_for_split
from export.served import tag_served
from export.staging import aside, publish, remove
from server.mirror import ALWAYS
from training import gates, tracking
from training.config import DEFAULT_PARAMS, Params, load_params
from training.presets import ClassificationPresetEval, PreprocessSpec
from training.train import load_data
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


def evaluation_set(data_dir: Path, spec: PreprocessSpec, calibration_count: int, seed: int) -> dict[str, Any]:
    """Calibration images (drawn from train) and every other prepared photo (rest of train, val, test), as files with
    their label index, for the gate; the test split as arrays for the per-class report."""
    train = load_data(data_dir, "train", spec, ClassificationPresetEval(spec=spec))
    order = np.random.default_rng(seed).permutation(len(train))
    calibration, rest = order[:calibration_count], order[calibration_count:]
    files = [train.samples[i] for i in sorted(rest)]
    files += [sample for split in ("val", "test") for sample in load_data(data_dir, split, spec, None).samples]
    return {
        "calibration": np.stack([train[int(i)][0].numpy() for i in calibration]),
        "photos": [(Path(path).read_bytes(), int(target)) for path, target in files],
        "test": load_split(data_dir, "test", spec),
    }


def judge(fp32_path: Path, int8_path: Path, photos: list[tuple[bytes, int]], not_pets: list[bytes],
          rule: gates.Rule) -> dict[str, Any]:  # fmt: skip
    """int8 against float32, each as served (its own mirror gate and pet threshold), on the same photos and the
    pooled non-pets: not worse on accuracy, pets kept and non-pets flagged (training.gates)."""
    fp32 = served_answers(fp32_path, photos, not_pets)
    int8 = served_answers(int8_path, photos, not_pets)
    verdict = gates.judge(answers.comparisons(fp32, int8, "prepared photos but calibration"), rule)
    return {"photos": len(photos), "not_pets": len(not_pets) if fp32.flagged is not None else 0, **verdict}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, default=Path("models/model.onnx"), help="the float32 model")
    parser.add_argument("--params", type=Path, default=DEFAULT_PARAMS)
    parser.add_argument("--data", type=Path, default=None, help="prepared ImageFolder root (default: params)")
    parser.add_argument("--report", type=Path, default=Path("reports/quantize.json"))
    parser.add_argument("--strict", action="store_true", help="exit 1 when the gate refuses int8 (default: warn, "
                        "serve float32, exit 0)")  # fmt: skip
    return parser


def quantize_and_judge(
    fp32_path: Path, int8_path: Path, data_dir: Path, data: dict[str, Any], params: Params, rule: gates.Rule
) -> dict[str, Any]:
    """Write the int8 model at int8_path (a staging path: export.staging), its pet threshold and mirror gate chosen
    on its own scores, and judge it against the float32 model; the report, with the gate's verdict under `gate`."""
    settings = params.export
    metadata = read_metadata(fp32_path)
    spec = PreprocessSpec.from_dict(metadata["preprocess"])
    calibration, (inputs, targets) = data["calibration"], data["test"]
    quantize_int8(fp32_path, int8_path, metadata["input_name"], calibration, settings.int8_reduce_range)
    int8_metadata = quantized_metadata(metadata, fp32_path)
    if metadata.get("reference"):  # drift's baseline from the int8 model's own outputs, as convert does for float32
        int8_metadata["reference"] = reference_for_split(int8_path, data_dir, spec)
    write_metadata(int8_path, int8_metadata)
    fp32, _ = evaluate_onnx(fp32_path, inputs, targets, list(spec.labels))
    int8, _ = evaluate_onnx(int8_path, inputs, targets, list(spec.labels))
    report: dict[str, Any] = {
        "float32": fp32,
        "int8": int8,
        "calibration_images": len(calibration),
        "reduce_range": settings.int8_reduce_range,
    }
    if metadata.get("pet") and params.pet is not None:
        # int8 moves the pet score: its threshold is re-chosen on its own (always flip-averaged) scores by the same
        # rule, then its mirror gate around that threshold, so that the gate below judges it as it would be served
        if metadata.get("mirror"):
            write_metadata(int8_path, {**int8_metadata, "mirror": {"gate": ALWAYS.to_dict()}})
        pet, pet_report, _ = not_a_pet.calibrate(int8_path, data_dir, params.pet)
        int8_metadata = {**int8_metadata, "pet": {**metadata["pet"], **pet}}
        if metadata.get("mirror"):
            mirror_gate, report["mirror"] = choose_mirror_gate(int8_path, data_dir, spec, params, int8_metadata)
            int8_metadata["mirror"] = {**metadata["mirror"], "gate": mirror_gate.to_dict()}
        write_metadata(int8_path, int8_metadata)
        report["pet"] = {"threshold_float32": metadata["pet"].get("threshold"), "threshold_int8": pet["threshold"],
                         "at_threshold": pet_report["at_threshold"]}  # fmt: skip
    report["gate"] = judge(fp32_path, int8_path, data["photos"], answers.gate_not_pets(params.pet), rule)
    report["gate_photos"] = "every prepared photo except the calibration images (rest of train, val, test)"
    return report


def refusal(gate: dict[str, Any]) -> str:
    return f"int8 model refused: {gate['reason']}"


def main(argv: list[str] | None = None) -> None:
    args = get_args_parser().parse_args(argv)
    params = load_params(args.params)
    settings = params.export
    rule = gates.Rule.from_dict(params.gates)
    tracking.configure(params.mlflow.experiment)
    metadata = read_metadata(args.model)
    spec = PreprocessSpec.from_dict(metadata["preprocess"])
    data_dir = args.data or Path(params.data.processed_dir)
    int8_path = args.model.with_name(f"{args.model.stem}.int8.onnx")
    remove(int8_path)  # an int8 model from an earlier run is served again only if this run's gate accepts its own
    data = evaluation_set(data_dir, spec, settings.calibration_images, params.train.seed)
    with aside(int8_path) as candidate:  # nothing under the served name until the gate accepted it
        report = quantize_and_judge(args.model, candidate, data_dir, data, params, rule)
        if report["gate"]["accepted"]:
            publish(candidate, int8_path)
    gate = report["gate"]
    if not gate["accepted"]:
        reason = refusal(gate)
        write_json(args.report, {**report, "served": "float32", "reason": reason})
        tag_served(metadata.get("run_id"), args.model.name)
        if args.strict:
            raise SystemExit(reason)
        print(f"warning: {reason}; serving float32 {args.model}", file=sys.stderr)
        return
    reason = f"int8 model accepted: {gate['reason']}"
    write_json(args.report, {**report, "served": "int8", "reason": reason})
    log_to_run(metadata.get("run_id"), [int8_path], {"onnx_int8_test_accuracy": report["int8"]["accuracy"]})
    tag_served(metadata.get("run_id"), int8_path.name)
    print(json.dumps({"written": str(int8_path), "reason": reason}, indent=2))


if __name__ == "__main__":
    main()

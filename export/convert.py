"""Export stage: the final checkpoint to ONNX with its metadata, checked, evaluated and gated on test accuracy."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import onnx
import torch

from export import mirror, not_a_pet, synthetic
from export.evaluate import METADATA_KEY, evaluate_onnx, load_split, make_session, predict, torch_probabilities
from export.reference import reference_for_split
from export.served import tag_served
from export.staging import aside, publish, remove
from imaging import DEFAULT_MAX_PIXELS
from server.floor import floor
from server.mirror import ALWAYS, MirrorGate
from server.preprocess import Preprocessor
from training import gates, tracking
from training.config import DEFAULT_PARAMS, Params, load_params
from training.model import Predictor, load_predictor
from training.presets import PreprocessSpec
from training.stats import proportion
from training.utils import sha256_file, write_json

INPUT_NAME, OUTPUT_NAME, PET_OUTPUT_NAME = "image", "probabilities", "pet_score"
LINEAGE_KEYS = ("model_version", "run_id", "data_version", "raw_data_md5", "git_commit", "pretrained_sha256")


def model_metadata(checkpoint: dict[str, Any], precision: str) -> dict[str, Any]:
    """Everything a consumer needs, taken from the checkpoint: preprocessing, labels, lineage."""
    spec = PreprocessSpec.from_dict(checkpoint["preprocess"]).to_dict()
    lineage = {key: checkpoint[key] for key in LINEAGE_KEYS if checkpoint.get(key)}
    return {
        "labels": spec["labels"],
        "input_size": spec["input_size"],
        "preprocess": spec,
        "input_name": INPUT_NAME,
        "output_name": OUTPUT_NAME,
        "pet": {"output_name": PET_OUTPUT_NAME} if checkpoint.get("pet_head") else None,
        "precision": precision,
        "hflip_average": bool(checkpoint.get("hflip_average", False)),
        **lineage,
    }


def export_onnx(predictor: Predictor, input_size: int, path: Path, opset: int) -> None:
    """torch.onnx.export with softmax (and flip averaging, and the pet score) in the graph and a dynamic batch axis,
    checked."""
    example = torch.randn(2, 3, input_size, input_size)  # batch 2: the parity tests use other sizes
    torch.onnx.export(
        predictor.eval(),
        (example,),
        str(path),
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME, PET_OUTPUT_NAME] if predictor.pet_head is not None else [OUTPUT_NAME],
        opset_version=opset,
        dynamo=True,
        external_data=False,
        dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},),
    )
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)


def write_metadata(path: Path, metadata: dict[str, Any]) -> dict[str, Any]:
    """Store metadata in the model's metadata_props and in a sidecar <name>.json that adds the file's sha256."""
    proto = onnx.load(str(path))
    onnx.helper.set_model_props(proto, {METADATA_KEY: json.dumps(metadata, sort_keys=True)})
    proto.producer_name = "catsdogs"
    proto.doc_string = f"cat/dog classifier {metadata.get('model_version', '')}".strip()
    onnx.save(proto, str(path))
    sidecar = {**metadata, "file": path.name, "sha256": sha256_file(path)}
    write_json(path.with_suffix(".json"), sidecar)
    return sidecar


def single_view(predictor: Predictor) -> Predictor:
    """The predictor without its in-graph flip averaging (the mirror view is server.mirror's)."""
    return Predictor(predictor.model, hflip_average=False, pet_head=predictor.pet_head).eval()


def choose_mirror_gate(
    path: Path, data_dir: Path, spec: PreprocessSpec, params: Params, metadata: dict[str, Any]
) -> tuple[MirrorGate, dict[str, Any]]:
    """export.mirror's gate for the model at `path`, chosen on development data and kept only when training.gates
    shows it not worse than both views always, on every photo and the pooled non-pets (held out: the ImageNet
    non-pets not used for choosing and the generated ones)."""
    dev = [load_split(data_dir, split, spec) for split in ("train", "val")]
    test = load_split(data_dir, "test", spec)
    preprocess = Preprocessor(spec.to_dict(), max_pixels=DEFAULT_MAX_PIXELS)
    not_pets = not_a_pet.not_pet_sets(params.pet)
    images = {name: [f.read_bytes() for f in files] for name, files in not_pets.items()}
    if params.pet is not None:
        images["held_out"] += [data for _, _, data in synthetic.generate(params.pet.synthetic_per_kind)]
    arrays = {name: np.stack([preprocess(data) for data in items]) if items else np.empty((0,))
              for name, items in images.items()}  # fmt: skip
    threshold = metadata["pet"]["threshold"] if metadata.get("pet") else None
    return mirror.study(path, (np.concatenate([d[0] for d in dev]), np.concatenate([d[1] for d in dev])), test,
                        arrays["dev"], arrays["held_out"], threshold, params.train.seed,
                        gates.Rule.from_dict(params.gates))  # fmt: skip


def accuracy_gate(path: Path, inputs: np.ndarray, targets: np.ndarray, minimum: float) -> dict[str, Any]:
    """The exported model's accuracy on the given photos against export.min_accuracy, by server.floor's rule (the
    Wilson 95% interval's lower end at least the minimum)."""
    session = make_session(path)
    correct = int((predict(session, inputs).argmax(1) == targets).sum())
    return {"photos": "val+test", **floor(correct, len(targets), minimum, "export.min_accuracy")}


def log_to_run(run_id: str | None, files: list[Path], metrics: dict[str, float]) -> None:
    """Attach the exported files and their metrics to the MLflow run the checkpoint came from."""
    if not run_id:
        return
    try:
        with mlflow.start_run(run_id=run_id):
            for file in files:
                mlflow.log_artifact(str(file), artifact_path="onnx")
            mlflow.log_metrics(metrics)
    except mlflow.exceptions.MlflowException as error:
        print(f"warning: could not log to MLflow run {run_id}: {error}", file=sys.stderr)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint", type=Path, default=Path("models/final.pt"))
    parser.add_argument("--out", type=Path, default=Path("models/model.onnx"))
    parser.add_argument("--params", type=Path, default=DEFAULT_PARAMS)
    parser.add_argument("--data", type=Path, default=None, help="prepared ImageFolder root (default: params)")
    parser.add_argument("--report", type=Path, default=Path("reports/export.json"))
    return parser


def main(argv: list[str] | None = None) -> None:
    args = get_args_parser().parse_args(argv)
    # An int8 model beside the output was quantized from the model this export replaces: remove it first, so that
    # a refused or interrupted export cannot leave it alone in the folder to be served (server.model_file).
    remove(args.out.with_name(f"{args.out.stem}.int8.onnx"))
    params = load_params(args.params)
    settings = params.export
    tracking.configure(params.mlflow.experiment)
    predictor, checkpoint = load_predictor(args.checkpoint)
    spec = PreprocessSpec.from_dict(checkpoint["preprocess"])
    labels = list(spec.labels)
    data_dir = args.data or Path(params.data.processed_dir)
    inputs, targets = load_split(data_dir, "test", spec)
    val_inputs, val_targets = load_split(data_dir, "val", spec)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    # written and gated aside, renamed into place only once accepted: a refused or interrupted export leaves the
    # model.onnx (and sidecar) the last accepted export published, never one no gate accepted
    with aside(args.out) as staged:
        # The graph runs one view; flip averaging is the runtime's (server.mirror), always averaged until the gate
        # is chosen below, so the parity and the pet threshold are those of flip averaging, as trained.
        export_onnx(single_view(predictor), spec.input_size, staged, settings.opset)
        metadata = model_metadata(checkpoint, "float32")
        if predictor.hflip_average:
            metadata["mirror"] = {"gate": ALWAYS.to_dict()}
        write_metadata(staged, metadata)
        reference = torch_probabilities(predictor, inputs)
        parity = float(np.abs(reference - predict(make_session(staged), inputs)).max())
        pet = None
        if metadata["pet"] is not None:
            if params.pet is None:
                raise SystemExit(
                    "the model has a pet head but params.yaml has no `pet` section to choose its threshold"
                )
            pet_metadata, pet_report, pet_sets = not_a_pet.calibrate(staged, data_dir, params.pet)
            metadata["pet"].update(pet_metadata)
            pet = (pet_report, pet_sets)
        mirror_report = None
        if predictor.hflip_average and settings.mirror_gate:
            gate, mirror_report = choose_mirror_gate(staged, data_dir, spec, params, metadata)
            metadata["mirror"] = {"gate": gate.to_dict(), "rule": mirror_report["choice"],
                                  "chosen_on": "train+val photos and the development not-pets",
                                  "served": mirror_report["served"]}  # fmt: skip
        write_metadata(staged, metadata)
        metadata["reference"] = reference_for_split(staged, data_dir, spec)  # drift's baseline (server.drift)
        write_metadata(staged, metadata)
        fp32, fp32_probabilities = evaluate_onnx(staged, inputs, targets, labels)
        gate = accuracy_gate(staged, np.concatenate([val_inputs, inputs]), np.concatenate([val_targets, targets]),
                             settings.min_accuracy)  # fmt: skip
        report: dict[str, Any] = {
            "test_images": len(targets),
            "torch_accuracy": float((reference.argmax(1) == targets).mean()),
            "float32": fp32,
            "test_accuracy_ci95": proportion(int((fp32_probabilities.argmax(1) == targets).sum()), len(targets)),
            "gate": {**gate, "min_accuracy": settings.min_accuracy},
            "max_abs_probability_diff_vs_torch": parity,
        }
        if pet is not None:
            report["pet_threshold"] = metadata["pet"]["threshold"]
        if mirror_report is not None:
            report["mirror"] = mirror_report
        if not gate["accepted"]:
            raise SystemExit(f"export refused: the ONNX model on val+test: {gate['reason']}")
        publish(staged, args.out)
    written = [args.out, args.out.with_suffix(".json")]
    metrics = {"onnx_test_accuracy": fp32["accuracy"], "onnx_latency_p50_ms": fp32["latency_p50_ms"]}

    write_json(args.report, report)
    log_to_run(
        checkpoint.get("run_id"), written, {**metrics, "onnx_val_test_accuracy_ci95_low": report["gate"]["ci95"][0]}
    )
    tag_served(checkpoint.get("run_id"), args.out.name)  # until export.quantize accepts an int8 model
    if pet is not None:
        not_a_pet.publish(*pet, args.report.with_name("not-a-pet.json"), checkpoint.get("run_id"))
    print(json.dumps({"written": [str(p) for p in written], **metrics}, indent=2))


if __name__ == "__main__":
    main()

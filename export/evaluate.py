"""Evaluate an exported ONNX model with onnxruntime on a prepared split: accuracy, per-class metrics, latency."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from server.mirror import MirrorGate, Run, with_mirror
from server.model_file import METADATA_KEY, read_metadata
from training.config import DEFAULT_PARAMS, load_params
from training.metrics import classification_report
from training.presets import ClassificationPresetEval, PreprocessSpec
from training.train import load_data
from training.utils import write_json


def make_session(path: Path, threads: int = 0) -> ort.InferenceSession:
    """A CPU session with every graph optimisation, as the service's; threads=0 lets onnxruntime choose."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def load_split(data_dir: Path, split: str, spec: PreprocessSpec) -> tuple[np.ndarray, np.ndarray]:
    """Every image of a split through the training evaluation transform, as one float32 array and its targets."""
    dataset = load_data(data_dir, split, spec, ClassificationPresetEval(spec=spec))
    inputs = np.stack([dataset[i][0].numpy() for i in range(len(dataset))])
    return inputs, np.asarray(dataset.targets)


def runner(session: ort.InferenceSession) -> tuple[Run, list[str], MirrorGate | None]:
    """A session as the service runs it: the outputs its metadata names (probabilities first, then the pet score
    when it has one), and its mirror view's gate (server.mirror)."""
    metadata = json.loads(session.get_modelmeta().custom_metadata_map.get(METADATA_KEY, "{}"))
    names = [str(metadata.get("output_name", session.get_outputs()[0].name))]
    if (metadata.get("pet") or {}).get("output_name"):
        names.append(metadata["pet"]["output_name"])
    input_name = session.get_inputs()[0].name
    return (lambda batch: session.run(names, {input_name: batch})), names, MirrorGate.from_metadata(metadata)


def outputs(session: ort.InferenceSession, inputs: np.ndarray, batch_size: int = 32) -> dict[str, np.ndarray]:
    """Every output the model's metadata names, for a stack of inputs, with the mirror view where its gate says so
    (server.mirror.with_mirror decides photo by photo, so the batch size does not change an answer)."""
    run, names, gate = runner(session)
    chunks = [with_mirror(run, inputs[i : i + batch_size], gate)[0] for i in range(0, len(inputs), batch_size)]
    return {name: np.concatenate([chunk[k] for chunk in chunks]) for k, name in enumerate(names)}


def predict(session: ort.InferenceSession, inputs: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """Probabilities for a stack of inputs, batch by batch, as the service computes them."""
    return next(iter(outputs(session, inputs, batch_size).values()))


def latency_ms(session: ort.InferenceSession, inputs: np.ndarray, repeats: int = 50) -> dict[str, float]:
    """Batch-1 session.run latency after a warm-up: median and p95 in milliseconds."""
    name = session.get_inputs()[0].name
    sample = inputs[:1]
    for _ in range(5):
        session.run(None, {name: sample})
    timings = []
    for _ in range(repeats):
        started = time.perf_counter()
        session.run(None, {name: sample})
        timings.append((time.perf_counter() - started) * 1000)
    return {"latency_p50_ms": float(np.percentile(timings, 50)), "latency_p95_ms": float(np.percentile(timings, 95))}


def evaluate_onnx(
    path: Path, inputs: np.ndarray, targets: np.ndarray, labels: list[str]
) -> tuple[dict[str, Any], np.ndarray]:
    """Accuracy, per-class precision/recall/F1, confusion matrix and latency of one ONNX file, and its probabilities."""
    session = make_session(path)
    probabilities = predict(session, inputs)
    report = classification_report(targets, probabilities.argmax(1), labels)
    report.update(latency_ms(session, inputs))
    return report, probabilities


@torch.inference_mode()
def torch_probabilities(predictor: torch.nn.Module, inputs: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """PyTorch eval-mode probabilities of a training.model.Predictor for the same inputs."""
    predictor.eval()
    chunks = [torch.from_numpy(inputs[i : i + batch_size]) for i in range(0, len(inputs), batch_size)]
    outputs = [predictor(chunk) for chunk in chunks]
    return torch.cat([out[0] if isinstance(out, tuple) else out for out in outputs]).numpy()


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, default=Path("models/model.onnx"))
    parser.add_argument("--split", default="test", choices=["train", "val", "test"])
    parser.add_argument("--params", type=Path, default=DEFAULT_PARAMS)
    parser.add_argument("--data", type=Path, default=None, help="prepared ImageFolder root (default: params)")
    parser.add_argument("--out", type=Path, default=Path("reports/evaluate.json"))
    return parser


def main(argv: list[str] | None = None) -> None:
    args = get_args_parser().parse_args(argv)
    params = load_params(args.params)
    spec = PreprocessSpec.from_dict(read_metadata(args.model)["preprocess"])
    inputs, targets = load_split(args.data or Path(params.data.processed_dir), args.split, spec)
    report, _ = evaluate_onnx(args.model, inputs, targets, list(spec.labels))
    report["model"] = str(args.model)
    report["split"] = args.split
    write_json(args.out, report)
    print(json.dumps({k: v for k, v in report.items() if not isinstance(v, list)}, indent=2))


if __name__ == "__main__":
    main()

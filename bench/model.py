"""`make bench-model`: PyTorch eager vs onnxruntime float32 vs onnxruntime int8, batch 1 and 8, in one process.

A model with the not-a-pet output is also timed against the same model exported without it (the pet head's cost),
the onnxruntime sessions interleaved in rounds so that a busy machine slows them alike."""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from bench.common import cpu_info, time_ms
from export.convert import export_onnx
from export.evaluate import make_session, read_metadata
from export.quantize import quantize_int8
from training.model import Predictor, load_predictor
from training.utils import write_json

ROUNDS = 5


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint", type=Path, default=Path("models/final.pt"))
    parser.add_argument("--onnx", type=Path, default=Path("models/model.onnx"))
    parser.add_argument("--int8", type=Path, default=Path("models/model.int8.onnx"))
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--out", type=Path, default=Path("reports/bench-model.json"))
    return parser


def main(argv: list[str] | None = None) -> None:
    args = get_args_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    model, _ = load_predictor(args.checkpoint)
    size = read_metadata(args.onnx)["input_size"]
    rng = np.random.default_rng(0)
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        int8_path = args.int8
        if not int8_path.is_file():  # quantize here, calibrated on noise: speed only, accuracy comes from make export
            int8_path = Path(tmp) / "model.int8.onnx"
            calibration = rng.standard_normal((32, 3, size, size), dtype=np.float32)
            quantize_int8(args.onnx, int8_path, "image", calibration)
        sessions = {
            "ort_fp32": make_session(args.onnx, args.threads),
            "ort_int8": make_session(int8_path, args.threads),
        }
        if model.pet_head is not None:  # the same model without the pet output: what the pet score costs
            without = Path(tmp) / "without_pet.onnx"
            export_onnx(Predictor(model.model, model.hflip_average).eval(), size, without, opset=18)
            sessions["ort_fp32_without_pet"] = make_session(without, args.threads)
        for batch in (1, 8):
            inputs = rng.standard_normal((batch, 3, size, size), dtype=np.float32)
            tensor = torch.from_numpy(inputs)
            with torch.inference_mode():
                torch_ms = time_ms(lambda t=tensor: model(t), args.repeats)
            row = {"torch_eager": float(np.median(torch_ms)) / batch}
            timings: dict[str, list[float]] = {name: [] for name in sessions}
            for _ in range(ROUNDS):
                for name, session in sessions.items():
                    run = lambda s=session, x=inputs: s.run(None, {"image": x})  # noqa: E731
                    timings[name] += time_ms(run, max(1, args.repeats // ROUNDS), warmup=2)
            for name, values in timings.items():
                row[name] = float(np.median(values)) / batch
            row["speedup_fp32_vs_torch"] = row["torch_eager"] / row["ort_fp32"]
            row["speedup_int8_vs_fp32"] = row["ort_fp32"] / row["ort_int8"]
            if "ort_fp32_without_pet" in row:
                row["pet_output_cost"] = row["ort_fp32"] / row["ort_fp32_without_pet"] - 1
            results[f"batch_{batch}_ms_per_image"] = {k: round(v, 3) for k, v in row.items()}
    report = {
        "cpu": cpu_info(),
        "threads": args.threads,
        "torch": torch.__version__,
        "onnxruntime": ort.__version__,
        "int8_source": str(args.int8) if args.int8.is_file() else "quantized here (noise calibration)",
        **results,
    }
    write_json(args.out, report)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

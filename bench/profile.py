"""`make bench-profile`: where an exported model spends its time, by onnxruntime's own profiler.

Each model runs `--runs` times at batch 1 on one thread, with every graph optimisation on (as the service and the
export checks run it); the report gives the time per run, the share of each operator type, the costliest nodes,
and the node counts before and after onnxruntime's optimisations (a node it cannot fuse or fold is work a simpler
graph would not do).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from bench.common import write_report


def profile(path: Path, runs: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "profile")
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        shape = [1, *session.get_inputs()[0].shape[1:]]
        sample = {session.get_inputs()[0].name: np.zeros(shape, dtype=np.float32)}
        for _ in range(runs):
            session.run(None, sample)
        events = json.loads(Path(session.end_profiling()).read_text())
        optimized = Counter(node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node)
    by_type: dict[str, float] = defaultdict(float)
    by_node: dict[str, float] = defaultdict(float)
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            by_type[event["args"]["op_name"]] += event["dur"]
            by_node[event["name"].removesuffix("_kernel_time")] += event["dur"]
    total = sum(by_type.values())
    exported = Counter(node.op_type for node in onnx.load(str(path)).graph.node)
    return {
        "model": str(path),
        "runs": runs,
        "kernel_ms_per_run": round(total / runs / 1000, 3),
        "share_by_op_type": {op: round(us / total, 4) for op, us in sorted(by_type.items(), key=lambda x: -x[1])},
        "costliest_nodes_ms_per_run": {name: round(us / runs / 1000, 3)
                                       for name, us in sorted(by_node.items(), key=lambda x: -x[1])[:10]},
        "nodes_exported": dict(exported.most_common()),
        "nodes_after_optimisation": dict(optimized.most_common()),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("models", nargs="+", type=Path, help="exported ONNX files")
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--out", type=Path, default=Path("reports/bench-profile.json"))
    args = parser.parse_args(argv)
    write_report(args.out, {"profiles": [profile(path, args.runs) for path in args.models]})


if __name__ == "__main__":
    main()

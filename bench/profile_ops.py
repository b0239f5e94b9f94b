"""Where an LRP graph's time goes in ONNX Runtime on the CPU: kernel time per op type (ONNX Runtime's profiler,
one thread, --runs runs after one warm-up), for the forward pass and each preset's built graph.

    python bench/profile_ops.py /tmp/resnet50_224.onnx --batch 2 --presets epsilon epsilon_gamma_box
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

import onnxlrp

sys.path.insert(0, str(Path(__file__).parent))
from bench import composite as bench_composite  # noqa: E402

ort.set_default_logger_severity(3)


def kernel_ms(model: onnx.ModelProto, x: np.ndarray, runs: int) -> collections.Counter:
    """Milliseconds per run of each op type's kernels: per node, the median over the runs."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.enable_profiling = True
    options.profile_file_prefix = os.path.join(tempfile.mkdtemp(), "profile")
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    session.run(None, {name: x})
    for _ in range(runs):
        session.run(None, {name: x})
    with open(session.end_profiling()) as file:
        events = json.load(file)
    per_node = collections.defaultdict(list)
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            per_node[event["name"], event["args"]["op_name"]].append(event["dur"] / 1e3)
    times = collections.Counter()
    for (_, op), durations in per_node.items():
        times[op] += statistics.median(durations)  # the warm-up run's allocations and first touches left out
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--presets", nargs="+", default=["epsilon", "epsilon_plus_flat", "epsilon_gamma_box"])
    args = parser.parse_args()
    source = onnxlrp.load(args.model)
    dims = [d.dim_value for d in source.graph.input[0].type.tensor_type.shape.dim[1:]]
    x = np.random.default_rng(0).normal(size=[args.batch] + dims).astype(np.float32)
    forward = sum(kernel_ms(source, x, args.runs).values())
    print(f"forward pass: {forward:.1f} ms of kernels")
    for preset in args.presets:
        composite = bench_composite(preset)
        times = kernel_ms(onnxlrp.build(source, composite), x, args.runs)
        total = sum(times.values())
        print(f"\n{preset}: {total:.1f} ms of kernels, {total / forward:.2f}x the forward pass's")
        print("| op type | ms | share |\n|---|---|---|")
        for op, ms in times.most_common(12):
            print(f"| {op} | {ms:.1f} | {ms / total:.0%} |")


if __name__ == "__main__":
    main()

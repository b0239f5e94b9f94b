"""Time ONNX Runtime's session creation for a deep MLP and for its LRP graph, per graph optimization level.

    python bench/deep_model.py --layers 1000 2000 --composite epsilon
    python bench/deep_model.py --layers 2000 --levels all basic disabled

Prints, per depth and level, the CPU seconds `InferenceSession` takes on the original and on the built model,
and their ratio. The MLP is width x width Gemm layers with ReLU between (random weights).
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

import onnxlrp

LEVELS = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL, "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
          "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC, "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}


def deep_mlp(layers: int, width: int = 16, classes: int = 10) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    nodes, initializers, x = [], [], "input"
    for index in range(layers):
        columns = classes if index == layers - 1 else width
        initializers += [numpy_helper.from_array((rng.standard_normal((width, columns)) / np.sqrt(width))
                                                 .astype(np.float32), f"w{index}"),
                         numpy_helper.from_array(np.full(columns, 0.01, np.float32), f"b{index}")]
        out = "logits" if index == layers - 1 else f"h{index}"
        nodes.append(helper.make_node("Gemm", [x, f"w{index}", f"b{index}"], [out], name=f"dense{index}"))
        if index < layers - 1:
            nodes.append(helper.make_node("Relu", [out], [f"a{index}"], name=f"relu{index}"))
            x = f"a{index}"
    graph = helper.make_graph(nodes, "deep", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", width])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])],
                              initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def session_seconds(blob: bytes, level: str) -> float:
    options = ort.SessionOptions()
    options.graph_optimization_level = LEVELS[level]
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    start = time.process_time()  # CPU seconds: steadier than wall time on a shared machine
    ort.InferenceSession(blob, options, providers=["CPUExecutionProvider"])
    return time.process_time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, nargs="+", default=[1000, 2000])
    parser.add_argument("--composite", default="epsilon")
    parser.add_argument("--levels", nargs="+", default=list(LEVELS), choices=list(LEVELS))
    args = parser.parse_args()
    ort.set_default_logger_severity(3)
    for layers in args.layers:
        model = deep_mlp(layers)
        start = time.perf_counter()
        built = onnxlrp.build(model, onnxlrp.load_composite(args.composite))
        build_seconds = time.perf_counter() - start
        original, explained = model.SerializeToString(), built.SerializeToString()
        print(f"{layers} layers: build {build_seconds:.1f} s, {len(built.graph.node)} nodes "
              f"(original {len(model.graph.node)})", flush=True)
        for level in args.levels:
            plain, lrp = session_seconds(original, level), session_seconds(explained, level)
            print(f"  {level:>8}: original {plain:6.2f} s, built {lrp:7.2f} s, ratio {lrp / plain:5.1f}", flush=True)


if __name__ == "__main__":
    main()

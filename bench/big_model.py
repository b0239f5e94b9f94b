"""Build a model over 2 GB (an MLP whose weights live in an external data file) and report the peak memory and
time of `onnxlrp build` on it, relative to the size of the weights.

    python bench/big_model.py --gigabytes 2.1 --composite epsilon --folder /tmp/big
    python bench/big_model.py --gigabytes 0.3 --composite epsilon_plus_flat --check

The source model is written tensor by tensor (never whole in memory); the build runs in a child process whose
peak resident memory (ru_maxrss) is read after it exits. --check also runs both models in ONNX Runtime on one
sample and compares the logits.
"""
from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

WIDTH = 8192
CLASSES = 10


def write_mlp(path: Path, gigabytes: float, width: int = WIDTH) -> int:
    """An MLP of width x width Gemm layers (ReLU between) with its weights in `path`.data; returns weight bytes."""
    layers = max(1, round(gigabytes * 2**30 / (width * width * 4)))
    data = path.with_name(path.name + ".data")
    rng = np.random.default_rng(0)
    nodes, initializers, offset = [], [], 0
    x = "input"
    with open(data, "wb") as file:
        for index in range(layers + 1):
            columns = CLASSES if index == layers else width
            weight = (rng.standard_normal((width, columns), dtype=np.float32) / np.sqrt(width)).astype(np.float32)
            bias = np.full(columns, 0.01, dtype=np.float32)
            for name, values in ((f"w{index}", weight), (f"b{index}", bias)):
                tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=values.shape)
                tensor.data_location = TensorProto.EXTERNAL
                for key, value in (("location", data.name), ("offset", str(offset)), ("length", str(values.nbytes))):
                    entry = tensor.external_data.add()
                    entry.key, entry.value = key, value
                file.write(values.tobytes())
                offset += values.nbytes
                initializers.append(tensor)
            out = "logits" if index == layers else f"h{index}"
            nodes.append(helper.make_node("Gemm", [x, f"w{index}", f"b{index}"], [out], name=f"dense{index}"))
            if index < layers:
                nodes.append(helper.make_node("Relu", [out], [f"a{index}"], name=f"relu{index}"))
                x = f"a{index}"
    graph = helper.make_graph(nodes, "big_mlp",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", width])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", CLASSES])],
                              initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return offset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gigabytes", type=float, default=2.1, help="size of the weights")
    parser.add_argument("--composite", default="epsilon")
    parser.add_argument("--folder", type=Path, default=Path("/tmp/onnxlrp_big"))
    parser.add_argument("--check", action="store_true", help="run both models on one sample and compare logits")
    args = parser.parse_args()
    args.folder.mkdir(parents=True, exist_ok=True)
    source, built = args.folder / "big.onnx", args.folder / "big_lrp.onnx"
    weights = write_mlp(source, args.gigabytes)
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "onnxlrp", "build", str(source), "-o", str(built),
                             "--composite", args.composite], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    print(result.stdout.strip() or result.stderr.strip())
    sizes = {p.name: p.stat().st_size for p in args.folder.iterdir() if p.name.startswith("big_lrp")}
    print(f"weights {weights / 2**30:.2f} GiB, composite {args.composite}: build {seconds:.1f} s, "
          f"peak RSS {peak / 2**30:.2f} GiB = {peak / weights:.2f}x the weights; files {sizes}")
    if args.check and result.returncode == 0:
        import onnxruntime as ort
        x = np.random.default_rng(1).standard_normal((2, WIDTH), dtype=np.float32)
        expected = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"]).run(["logits"], {"input": x})
        actual = ort.InferenceSession(str(built), providers=["CPUExecutionProvider"]).run(["logits"], {"input": x})
        print("logits equal:", np.allclose(expected[0], actual[0], rtol=1e-5, atol=1e-6))


if __name__ == "__main__":
    main()

"""Time the forms of a strided convolution's transposed pass (the input-gradient LRP needs) per layer shape in
ONNX Runtime on the CPU, and check that they agree; ResNet-50's strided layers at 224x224 by default.

    python bench/transposed.py --batch 2 --threads 1 --repeats 7
    python bench/transposed.py --model /tmp/resnet50_224.onnx --batch 2   # whole graphs (bench/zoo_model.py)

Forms, all built by `onnxlrp.ir.ops.Ops.transposed_conv` with its `form` argument:
  convtranspose  ONNX Runtime's ConvTranspose (a GEMM and col2im on the CPU);
  phases         one stride-1 Conv per output phase (s^2 in 2-D, each with the taps that reach it), the phases
                 interleaved by Concat and DepthToSpace;
  dilated        the input spread out with zeros (stride 1 between its values), then a stride-1 Conv with the
                 flipped weight.
Writes a markdown table (median ms per form, and the largest difference to ConvTranspose). With --model, it
times instead the whole LRP graph of that model per preset, built with ConvTranspose for every strided layer and
with the forms `transposed_form` chooses, in turn in each round, beside the forward pass.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort

import onnxlrp
from onnxlrp.ir import ops as writer
from onnxlrp.ir.ops import Ops

sys.path.insert(0, str(Path(__file__).parent))
from bench import composite as bench_composite  # noqa: E402

ort.set_default_logger_severity(3)
# name: (in channels, out channels, kernel, stride, pad, input side): ResNet-50 (torchvision) at 224x224
LAYERS = {
    "conv1 7x7/2": (3, 64, 7, 2, 3, 224),
    "layer2 3x3/2": (128, 128, 3, 2, 1, 56),
    "layer2 down 1x1/2": (256, 512, 1, 2, 0, 56),
    "layer3 3x3/2": (256, 256, 3, 2, 1, 28),
    "layer3 down 1x1/2": (512, 1024, 1, 2, 0, 28),
    "layer4 3x3/2": (512, 512, 3, 2, 1, 14),
    "layer4 down 1x1/2": (1024, 2048, 1, 2, 0, 14),
}
FORMS = ("convtranspose", "phases", "dilated")


def graph(form: str, cin: int, cout: int, kernel: int, stride: int, pad: int, side: int, batch: int
          ) -> tuple[bytes, list[int]]:
    """A model whose output is the transposed pass of one Conv layer in `form`, and its input's shape."""
    out_side = (side + 2 * pad - kernel) // stride + 1
    rng = np.random.default_rng(0)
    weight = rng.normal(0, 1 / np.sqrt(cin * kernel * kernel), [cout, cin, kernel, kernel]).astype(np.float32)
    s = gs.Variable("s", np.float32, [batch, cout, out_side, out_side])
    g = gs.Graph(inputs=[s], opset=17)
    ops = Ops(g, 17)
    attrs = {"strides": [stride] * 2, "pads": [pad] * 4}
    result = ops.transposed_conv(s, gs.Constant("weight", weight), attrs, [side] * 2, [out_side] * 2,
                                 [kernel] * 2, weight.shape, form=form)
    result.dtype, result.shape = np.float32, [batch, cin, side, side]
    g.outputs = [result]
    model = gs.export_onnx(g.cleanup().toposort())
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString(), [batch, cout, out_side, out_side]


def measure(batch: int, threads: int, repeats: int) -> list[dict]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    rows = []
    for name, (cin, cout, kernel, stride, pad, side) in LAYERS.items():
        calls, results = [], []
        for form in FORMS:
            data, shape = graph(form, cin, cout, kernel, stride, pad, side, batch)
            session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
            feed = {"s": np.random.default_rng(1).normal(size=shape).astype(np.float32)}
            calls.append(lambda session=session, feed=feed: session.run(None, feed))
            results.append(calls[-1]()[0])
        row = {"layer": name, **{f: t * 1e3 for f, t in zip(FORMS, paired(calls, repeats))},
               "diff": max(float(np.abs(r - results[0]).max() / np.abs(results[0]).max()) for r in results[1:])}
        rows.append(row)
        print(row, flush=True)
    return rows


def paired(calls: list, repeats: int) -> list[float]:
    """Median CPU seconds of this process per call, the calls run in turn in every round (one load for all): on
    a shared machine the CPU time of a one-thread session moves much less with the load than the wall time."""
    for call in calls:
        call()
    times = [[] for _ in calls]
    for _ in range(repeats):
        for call, spent in zip(calls, times):
            start = time.process_time()
            call()
            spent.append(time.process_time() - start)
    return [statistics.median(t) for t in times]


def whole_graphs(path: str, presets: list[str], batch: int, threads: int, repeats: int) -> None:
    """LRP graph over the forward pass, strided transposed passes as ConvTranspose and as chosen."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    source = onnxlrp.load(path)
    dims = [d.dim_value for d in source.graph.input[0].type.tensor_type.shape.dim[1:]]
    x = np.random.default_rng(0).normal(size=[batch] + dims).astype(np.float32)
    forward = ort.InferenceSession(source.SerializeToString(), options, providers=["CPUExecutionProvider"])
    chosen = writer.transposed_form
    print("| preset | ConvTranspose: LRP / forward | chosen forms: LRP / forward | max rel. difference |")
    print("|---|---|---|---|")
    for preset in presets:
        composite = bench_composite(preset)
        writer.transposed_form = lambda g: "conv" if "conv" in g.forms() else "convtranspose"
        baseline = onnxlrp.build(source, composite)
        writer.transposed_form = chosen
        built = onnxlrp.build(source, composite)
        sessions = [ort.InferenceSession(m.SerializeToString(), options, providers=["CPUExecutionProvider"])
                    for m in (baseline, built)]
        relevance = [s.run(["relevance"], {"input": x})[0] for s in sessions]
        calls = [lambda: forward.run(None, {"input": x})] + \
            [lambda s=s: s.run(["relevance"], {"input": x}) for s in sessions]
        plain, old, new = paired(calls, repeats)
        diff = float(np.abs(relevance[1] - relevance[0]).max() / np.abs(relevance[0]).max())
        print(f"| `{preset}` | {old / plain:.2f} | {new / plain:.2f} | {diff:.1e} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--model", help="time whole LRP graphs of this .onnx model instead of single layers")
    parser.add_argument("--presets", nargs="+", default=["epsilon", "epsilon_plus_flat", "epsilon_gamma_box"])
    args = parser.parse_args()
    if args.model:
        whole_graphs(args.model, args.presets, args.batch, args.threads, args.repeats)
        return
    rows = measure(args.batch, args.threads, args.repeats)
    print(f"\nonnxruntime {ort.__version__}, batch {args.batch}, {args.threads} thread(s), median of "
          f"{args.repeats}, ms\n")
    print("| layer | " + " | ".join(FORMS) + " | max rel. difference |")
    print("|---" * (len(FORMS) + 2) + "|")
    for row in rows:
        print(f"| {row['layer']} | " + " | ".join(f"{row[f]:.2f}" for f in FORMS) + f" | {row['diff']:.1e} |")


if __name__ == "__main__":
    main()

"""Time the LRP graphs that two checkouts of onnxlrp build for one model, in one process and in turn in every
round, beside the forward pass: what a change to the emitted graph gains, measured in one run.

    python bench/compare_speed.py BEFORE_CHECKOUT AFTER_CHECKOUT --model /tmp/resnet50_224.onnx --batch 2

Each checkout builds in a process of its own that imports that checkout's onnxlrp only (compare_checkouts.py's
import_checkout) with bench.py's composites (zbox bounds -3, 3). ONNX Runtime runs on the CPU with --threads
threads; times are CPU seconds of this process, the median of --repeats rounds (transposed.py's `paired`).
Prints a markdown table: LRP / forward per checkout and preset, and the largest difference of the two relevances
over the largest relevance.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

HERE = Path(__file__).resolve().parent
BUILD = """
import sys
from pathlib import Path
sys.path.insert(0, {here!r})
from compare_checkouts import import_checkout
onnxlrp = import_checkout(Path({checkout!r}))
from bench import composite
import onnx
onnx.save(onnxlrp.build(onnxlrp.load({model!r}), composite({preset!r})), {out!r})
"""


def build(checkout: Path, model: str, preset: str, out: Path) -> None:
    """The LRP graph of `model` under `preset` as `checkout` builds it, written to `out`."""
    code = BUILD.format(here=str(HERE), checkout=str(checkout.resolve()), model=model, preset=preset, out=str(out))
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": ""})


def main() -> None:
    sys.path.insert(0, str(HERE))
    from transposed import paired

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--model", required=True, help="an .onnx model with one image input (bench/zoo_model.py)")
    parser.add_argument("--presets", nargs="+", default=["epsilon", "epsilon_plus_flat", "epsilon_gamma_box"])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.inter_op_num_threads = 1
    source = onnx.load(args.model)
    dims = [d.dim_value for d in source.graph.input[0].type.tensor_type.shape.dim[1:]]
    name = source.graph.input[0].name
    x = np.random.default_rng(0).normal(size=[args.batch] + dims).astype(np.float32)
    forward = ort.InferenceSession(args.model, options, providers=["CPUExecutionProvider"])
    folder = Path(tempfile.mkdtemp())
    print(f"onnxruntime {ort.__version__}, batch {args.batch}, {args.threads} thread(s), median of {args.repeats}\n")
    print("| preset | before: LRP / forward | after: LRP / forward | after / before | max rel. difference |")
    print("|---|---|---|---|---|")
    for preset in args.presets:
        paths = [folder / f"{preset}_{i}.onnx" for i in range(2)]
        for checkout, path in zip((args.before, args.after), paths):
            build(checkout, args.model, preset, path)
        sessions = [ort.InferenceSession(str(p), options, providers=["CPUExecutionProvider"]) for p in paths]
        relevance = [s.run(["relevance"], {name: x})[0] for s in sessions]
        calls = [lambda: forward.run(None, {name: x})] + \
            [lambda s=s: s.run(["relevance"], {name: x}) for s in sessions]
        plain, old, new = paired(calls, args.repeats)
        diff = float(np.abs(relevance[1] - relevance[0]).max() / np.abs(relevance[0]).max())
        print(f"| `{preset}` | {old / plain:.2f} | {new / plain:.2f} | {new / old:.3f} | {diff:.1e} |", flush=True)


if __name__ == "__main__":
    main()

"""Build time and peak memory of quantized and float16 models against their float source (issue 18).

    python bench/quantized.py                      # the largest quantized fixtures, one preset each
    python bench/quantized.py --models fixtures/quantized/vit_qdq_channel.onnx --composite cp_lrp --repeats 5

Each build runs in a child process that imports onnxlrp, builds once to warm up, then builds `--repeats` times and
reports the median build time, the time of the load check inside it (an ONNX Runtime session of the built model)
and its peak resident memory (ru_maxrss, which includes the Python interpreter and ONNX Runtime themselves).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT = [("fixtures/transformers/bert_op17.onnx", "attnlrp"), ("fixtures/quantized/bert_qdq.onnx", "attnlrp"),
           ("fixtures/quantized/bert_qoperator.onnx", "attnlrp"), ("fixtures/quantized/bert_int4.onnx", "attnlrp"),
           ("fixtures/transformers/vit_op17.onnx", "cp_lrp"), ("fixtures/quantized/vit_qdq_channel.onnx", "cp_lrp"),
           ("fixtures/quantized/vit_fp16.onnx", "cp_lrp"), ("fixtures/cnn_ts.onnx", "epsilon_gamma_box"),
           ("fixtures/quantized/cnn_qoperator_channel.onnx", "epsilon_gamma_box")]

CHILD = """
import json, resource, statistics, sys, time
import onnx, onnxlrp
import onnxlrp.pipeline
path, composite, repeats = sys.argv[1], sys.argv[2], int(sys.argv[3])
checks = []
original = onnxlrp.pipeline.require_loadable
def timed(model, source):
    start = time.perf_counter()
    original(model, source)
    checks.append(time.perf_counter() - start)
onnxlrp.pipeline.require_loadable = timed  # the name build calls
model = onnx.load(path)
onnxlrp.build(model, composite)
times = []
for _ in range(repeats):
    start = time.perf_counter()
    onnxlrp.build(model, composite)
    times.append(time.perf_counter() - start)
print(json.dumps({"build_s": statistics.median(times), "check_s": statistics.median(checks[1:]),
                  "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def measure(path: str, composite: str, repeats: int) -> dict:
    result = subprocess.run([sys.executable, "-c", CHILD, path, composite, str(repeats)], cwd=ROOT,
                            capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", help="model paths (default: the largest quantized fixtures)")
    parser.add_argument("--composite", help="preset for --models")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    cases = [(m, args.composite or "epsilon") for m in args.models] if args.models else DEFAULT
    print("| model | KB | preset | build s (median) | of which load check s | peak MB |")
    print("|---|---|---|---|---|---|")
    for path, composite in cases:
        found = measure(path, composite, args.repeats)
        size = (ROOT / path).stat().st_size / 1024
        print(f"| {path} | {size:.0f} | `{composite}` | {found['build_s']:.2f} | {found['check_s']:.3f} | "
              f"{found['peak_mb']:.0f} |", flush=True)


if __name__ == "__main__":
    main()

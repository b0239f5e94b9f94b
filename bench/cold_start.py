"""Where a built model's session start goes, and what each way of storing it costs: per preset, the session start
of ONNX Runtime's CPU provider (a fresh process per start, median of --repeats; wall and CPU seconds) and the file
size, against the source model's.

    python bench/zoo_model.py resnet50 224 /tmp/resnet50_224.onnx
    python bench/cold_start.py /tmp/resnet50_224.onnx --presets epsilon epsilon_plus_flat epsilon_gamma_box

Rows per preset: the default build at each graph optimisation level (off, basic, extended, all: the difference
between two levels is what that level's passes cost), the build with `--fold-weights` (modified weights stored)
at the all level, and the build with `--optimize-for cpu` (ONNX Runtime's own optimised model, NCHWc layouts for
this CPU, its weights in OUT.data as the command writes them) at the all level (what a session with default
options does) and with optimisation off; and, for reference, the source model with its weights in an external
file. File sizes count the .data file.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import onnx
import onnxruntime as ort

import onnxlrp
from onnxlrp.ir.files import save_atomic

sys.path.insert(0, str(Path(__file__).parent))
from bench import composite as bench_composite  # noqa: E402

LEVELS = {"off": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
          "all": "ORT_ENABLE_ALL"}
CHILD = """
import sys, time
import onnxruntime as ort
ort.set_default_logger_severity(3)
options = ort.SessionOptions()
options.intra_op_num_threads = 1
options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, sys.argv[2])
wall, cpu = time.perf_counter(), time.process_time()
ort.InferenceSession(sys.argv[1], options, providers=["CPUExecutionProvider"])
print(time.perf_counter() - wall, time.process_time() - cpu)
"""


def start_seconds(path: Path, level: str, repeats: int) -> tuple[float, float]:
    """Median wall and CPU seconds of creating a session on `path`, each in a fresh process."""
    runs = [subprocess.run([sys.executable, "-c", CHILD, str(path), LEVELS[level]], capture_output=True, text=True,
                           check=True).stdout.split() for _ in range(repeats)]
    return statistics.median(float(r[0]) for r in runs), statistics.median(float(r[1]) for r in runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--presets", nargs="+", default=["epsilon", "epsilon_plus_flat", "epsilon_gamma_box"])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    ort.set_default_logger_severity(3)
    folder = Path(tempfile.mkdtemp())
    source = Path(args.model)
    size = source.stat().st_size
    wall, cpu = start_seconds(source, "all", args.repeats)
    rows = [{"preset": "(source model)", "form": "as it is, level all", "wall": wall, "cpu": cpu, "size": 1.0}]
    base = cpu
    external = folder / "source_external.onnx"
    save_atomic(onnxlrp.load(source), external, external_data=True)
    wall, cpu = start_seconds(external, "all", args.repeats)
    rows.append({"preset": "(source model)", "form": "weights in an external file, level all", "wall": wall,
                 "cpu": cpu, "size": 1.0})
    print(json.dumps(rows[:2]), flush=True)
    for preset in args.presets:
        composite = bench_composite(preset)
        paths = {option: folder / f"{preset}_{option}.onnx" for option in ("default", "folded", "optimized")}
        onnx.save(onnxlrp.build(source, composite), str(paths["default"]))
        onnx.save(onnxlrp.build(source, composite, fold_weights=True), str(paths["folded"]))
        save_atomic(onnxlrp.build(source, composite, optimize_for="cpu"), paths["optimized"], external_data=True)
        forms = [(paths["default"], f"default build, level {level}", level) for level in LEVELS] + [
            (paths["folded"], "--fold-weights, level all", "all"),
            (paths["optimized"], "--optimize-for cpu (weights in .data), level all", "all"),
            (paths["optimized"], "--optimize-for cpu (weights in .data), level off", "off")]
        for path, form, level in forms:
            wall, cpu = start_seconds(path, level, args.repeats)
            data = path.with_name(path.name + ".data")
            stored = path.stat().st_size + (data.stat().st_size if data.exists() else 0)
            rows.append({"preset": preset, "form": form, "wall": wall, "cpu": cpu, "size": stored / size})
            print(json.dumps(rows[-1]), flush=True)
    print(f"\nonnxruntime {ort.__version__}; session start in a fresh process, median of {args.repeats}\n")
    print("| preset | form | start s (wall) | start s (CPU) | CPU / source model's | file / model |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| `{r['preset']}` | {r['form']} | {r['wall']:.2f} | {r['cpu']:.2f} | {r['cpu'] / base:.2f} | "
              f"{r['size']:.2f} |")


if __name__ == "__main__":
    main()

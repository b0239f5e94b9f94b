"""Time onnxlrp's LRP graph against the plain forward pass in ONNX Runtime, and Zennit against torch, per model,
preset and batch size, in one run; write the results as a markdown table.

    python bench/bench.py --models resnet50 vgg16 --presets epsilon epsilon_plus_flat epsilon_gamma_box \\
        --batch 1 32 --out bench/results-cpu.md
    python bench/bench.py --models resnet50 --batch 32 --provider CUDAExecutionProvider --dtype float16
    python bench/bench.py --models resnet152 --build-only          # build time, peak memory, file size

MODEL is a torchvision model name (random weights; needs torch and torchvision; Zennit, when installed, adds its
timings on the same device; for vit_* models under cp_lrp, LXT's own map does) or an .onnx file. With CUDA, the graphs run with io_binding (inputs and outputs on
the GPU) and also with host copies, torch and Zennit run on the GPU, and the relevance is compared with the CPU's.
Build time and peak memory are measured in a fresh process per build (peak resident set of the process that
loads the model, builds and starts a session). Medians of --repeats rounds after warm-up; in each round the
forward pass and the LRP graph (torch and Zennit) run in turn, so that each ratio is measured under one load.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

import onnxlrp

ort.set_default_logger_severity(3)
BOUNDS = {"low": -3.0, "high": 3.0}  # standardized images: the zbox bounds Zennit's EpsilonGammaBox gets here
THREADS = 0  # ONNX Runtime's and torch's own choice unless --threads says
PASSES = {"epsilon": 2, "zero": 2, "zplus": 3, "gamma": 4, "alpha_beta": 4}  # the floor per linear layer


def paired_medians(calls: list, repeats: int, warmup: int = 2) -> list[float]:
    """Median seconds of each call, run in turn within every repeat, so that a ratio between them is measured
    under the same load (the development machine is shared)."""
    for call in calls:
        for _ in range(warmup):
            call()
    times = [[] for _ in calls]
    for _ in range(repeats):
        for call, spent in zip(calls, times):
            start = time.perf_counter()
            call()
            spent.append(time.perf_counter() - start)
    return [statistics.median(spent) for spent in times]


def composite(preset: str) -> onnxlrp.Composite:
    chosen = onnxlrp.load_composite(preset)
    return chosen.with_params(BOUNDS) if "box" in preset else chosen


def floor(preset: str) -> int:
    """Convolution-sized passes per layer (the forward included) of the rule most convolutions get."""
    entries = [e for e in composite(preset).entries if "Conv" in e.op_types or not e.op_types]
    rule = next((e.rule for e in entries if e.first_linear is not True), "epsilon")
    return PASSES.get(rule, 2)


def export_torchvision(name: str, path: Path, side: int):
    import torch
    import torchvision
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None).eval()
    torch.onnx.export(model, (torch.randn(1, 3, side, side),), str(path), dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}})
    return model


def to_float16(model: onnx.ModelProto) -> onnx.ModelProto:
    from onnxlrp.ir.precision import to_float16 as convert
    return convert(model)


def peak_mb() -> float:
    """Peak resident memory of this process in MB: VmHWM, which exec resets (ru_maxrss keeps the parent's)."""
    status = Path("/proc/self/status")
    if status.exists():
        line = next(line for line in status.read_text().splitlines() if line.startswith("VmHWM:"))
        return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build_stats(source: str, preset: str, dtype: str) -> dict:
    """Build in this process (run as a child): seconds, file size, session start, peak resident memory."""
    start = time.perf_counter()
    built = onnxlrp.build(onnxlrp.load(source), composite(preset), source=source)
    if dtype == "float16":
        built = to_float16(built)
    seconds = time.perf_counter() - start
    peak_build = peak_mb()
    data = built.SerializeToString()
    size = len(data)
    del built
    start = time.perf_counter()
    ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return {"build_s": seconds, "bytes": size, "build_peak_mb": peak_build,
            "session_s": time.perf_counter() - start, "session_peak_mb": peak_mb()}


def measured_build(source: Path, preset: str, dtype: str) -> dict:
    result = subprocess.run([sys.executable, __file__, "--child-build", str(source), preset, dtype],
                            capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


TF32 = False  # --tf32: let CUDA round float32 products to TensorFloat-32 (ONNX Runtime's default, not onnxlrp's)


def providers_for(provider: str) -> list:
    if provider == "CPUExecutionProvider":
        return [provider]
    return [(provider, {"use_tf32": str(int(TF32))}), "CPUExecutionProvider"]


def session_options() -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    return options


def runners(model_bytes: bytes, provider: str, x: np.ndarray, outputs: list[str]):
    """Calls that run a model with host copies and, on CUDA, with io_binding (input and outputs on the device)."""
    session = ort.InferenceSession(model_bytes, session_options(), providers=providers_for(provider))
    name = session.get_inputs()[0].name
    hosted = lambda: session.run(outputs, {name: x})  # noqa: E731
    if provider != "CUDAExecutionProvider":
        return hosted, None, session
    binding = session.io_binding()
    binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(x, "cuda", 0))
    for output in outputs:
        binding.bind_output(output, "cuda")

    def bound():
        session.run_with_iobinding(binding)
        binding.synchronize_outputs()
    return hosted, bound, session


def reference_seconds(model, name: str, x: np.ndarray, preset: str, device: str, repeats: int
                      ) -> tuple[float, float | None]:
    """Median seconds of a torch forward pass and of the reference implementation's attribution with the same
    preset (Zennit, or LXT for torchvision's ViT), on `device`."""
    import torch
    if THREADS:
        torch.set_num_threads(THREADS)
    model = model.to(device)
    tensor = torch.from_numpy(x).to(device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def forward():
        with torch.no_grad():
            model(tensor)
        sync()
    attribution = lxt_attribution(model, name, preset) if name.startswith("vit_") else \
        zennit_attribution(model, name, preset)
    if attribution is None:
        return paired_medians([forward], repeats)[0], None
    with attribution as attribute:
        def explained():
            attribute(tensor.clone().requires_grad_(True))
            sync()
        seconds, reference = paired_medians([forward, explained], repeats)
    return seconds, reference


@contextmanager
def _zennit(model, chosen):
    from zennit.attribution import Gradient
    with Gradient(model=model, composite=chosen) as attributor:
        yield lambda x: attributor(x, lambda y: torch_one_hot(y) * y)


def torch_one_hot(y):
    import torch
    return torch.eye(y.shape[1], device=y.device)[y.argmax(1)]


def zennit_attribution(model, name: str, preset: str):
    """Zennit's attribution of `model` under the preset of the same name (None where it has none)."""
    try:
        chosen = zennit_composite(name, preset)
    except ImportError:
        return None
    return None if chosen is None else _zennit(model, chosen)


@contextmanager
def _lxt(model):
    from lxt.efficient import monkey_patch
    from torchvision.models import vision_transformer
    monkey_patch(vision_transformer)  # patches the classes' methods for the rest of the process

    def attribute(x):
        logits = model(x)
        logits.gather(1, logits.argmax(1, keepdim=True)).sum().backward()
        return x * x.grad
    yield attribute


def lxt_attribution(model, name: str, preset: str):
    """LXT's own map of torchvision's ViT (cp_LRP); None for other presets or without LXT."""
    return _lxt(model) if preset == "cp_lrp" and importlib.util.find_spec("lxt") else None


def zennit_composite(name: str, preset: str):
    """Zennit's composite of the same name with the canonizer of the architecture (None where it has none)."""
    from zennit.canonizers import SequentialMergeBatchNorm
    from zennit.composites import COMPOSITES, LayerMapComposite, layer_map_base
    from zennit.rules import Epsilon
    from zennit.torchvision import ResNetCanonizer, VGGCanonizer
    from zennit.types import Convolution, Linear
    canonizer = ResNetCanonizer() if name.startswith("resnet") else (
        VGGCanonizer() if name.startswith("vgg") else SequentialMergeBatchNorm())
    if preset == "epsilon":
        return LayerMapComposite(layer_map=layer_map_base() + [(Convolution, Epsilon()), (Linear, Epsilon())],
                                 canonizers=[canonizer])
    if preset not in COMPOSITES:
        return None
    return COMPOSITES[preset](canonizers=[canonizer], **(BOUNDS if "box" in preset else {}))


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.linalg.norm(actual.astype(np.float64) - expected) / np.linalg.norm(expected))


def machine(provider: str) -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else \
        platform.processor()
    threads = f"{THREADS} thread(s)" if THREADS else "default threads"
    text = f"{cpu}, {os.cpu_count()} cores ({threads}), onnxruntime {ort.__version__}, {provider}"
    if provider == "CUDAExecutionProvider":
        try:
            import torch
            text += f", GPU {torch.cuda.get_device_name(0)}"
        except Exception:  # torch missing or without CUDA: the provider list still says where it ran
            pass
    return text


def fmt(value, digits: int = 2, scale: float = 1.0) -> str:
    return "–" if value is None else f"{value * scale:.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["resnet50", "vgg16", "efficientnet_b0"])
    parser.add_argument("--presets", nargs="+", default=["epsilon", "epsilon_plus_flat", "epsilon_gamma_box"])
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--size", type=int, default=224, help="image side for torchvision models")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--provider", default="CPUExecutionProvider",
                        choices=["CPUExecutionProvider", "CUDAExecutionProvider"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16"],
                        help="float16: also time the graph converted to float16 and give its error against float32")
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU threads for ONNX Runtime and torch alike (default: their own choice); on a shared "
                             "machine 1 keeps the timings stable")
    parser.add_argument("--tf32", action="store_true", help="CUDA: allow TensorFloat-32 products (faster, ~1e-3)")
    parser.add_argument("--no-zennit", action="store_true", help="skip torch and Zennit (or LXT)")
    parser.add_argument("--build-only", action="store_true", help="only build time, peak memory and file size")
    parser.add_argument("--out", type=Path, help="write the markdown table here (and print it)")
    args = parser.parse_args()
    global THREADS, TF32
    THREADS, TF32 = args.threads, args.tf32

    folder = Path(tempfile.mkdtemp())
    device = "cuda" if args.provider == "CUDAExecutionProvider" else "cpu"
    builds, speeds = [], []
    for name in args.models:
        torch_model = None
        if name.endswith(".onnx"):
            source_path = Path(name)
        else:
            source_path = folder / f"{name}.onnx"
            torch_model = export_torchvision(name, source_path, args.size)
        source_bytes = source_path.read_bytes()
        source = onnx.load_from_string(source_bytes)
        dims = [d.dim_value for d in source.graph.input[0].type.tensor_type.shape.dim[1:]]
        for preset in args.presets:
            stats = measured_build(source_path, preset, "float32")
            builds.append((name, preset, stats, stats["bytes"] / len(source_bytes)))
            print(f"{name} {preset}: built in {stats['build_s']:.1f} s, file {builds[-1][3]:.3f}x the model, "
                  f"session start {stats['session_s']:.2f} s", flush=True)
        if args.build_only:
            continue
        for batch in args.batch:
            x = np.random.default_rng(0).normal(size=[batch] + dims).astype(np.float32)
            plain, plain_bound, _ = runners(source_bytes, args.provider, x, [source.graph.output[0].name])
            for preset in args.presets:
                built = onnxlrp.build(source, composite(preset), source=name).SerializeToString()
                lrp_call, lrp_bound_call, session = runners(built, args.provider, x, ["relevance"])
                forward, lrp = paired_medians([plain, lrp_call], args.repeats)
                forward_bound, lrp_bound = paired_medians([plain_bound, lrp_bound_call], args.repeats) \
                    if plain_bound else (None, None)
                row = {"model": name, "batch": batch, "preset": preset, "forward": forward, "lrp": lrp,
                       "forward_bound": forward_bound, "lrp_bound": lrp_bound, "floor": floor(preset),
                       "provider": session.get_providers()[0]}
                relevance = session.run(["relevance"], {"input": x})[0]
                if args.provider != "CPUExecutionProvider":
                    cpu = ort.InferenceSession(built, session_options(), providers=["CPUExecutionProvider"])
                    row["vs_cpu"] = relative_error(relevance, cpu.run(["relevance"], {"input": x})[0])
                if args.dtype == "float16":
                    half = to_float16(onnx.load_from_string(built)).SerializeToString()
                    try:
                        half_call, half_bound, half_session = runners(half, args.provider, x, ["relevance"])
                        row["lrp16"] = paired_medians([half_bound or half_call], args.repeats)[0]
                        row["vs_float32"] = relative_error(half_session.run(["relevance"], {"input": x})[0],
                                                           relevance)
                    except Exception as error:  # ONNX Runtime CPU lacks float16 kernels for some ops
                        print(f"  float16 does not run on {args.provider}: {str(error).splitlines()[0][:200]}")
                if torch_model is not None and not args.no_zennit:
                    row["torch"], row["zennit"] = reference_seconds(torch_model, name, x, preset, device, args.repeats)
                speeds.append(row)
                print(json.dumps({k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items()}),
                      flush=True)
    table = markdown(args, builds, speeds)
    print(table)
    if args.out:
        args.out.write_text(table)


def markdown(args, builds: list, speeds: list[dict]) -> str:
    cuda = args.provider == "CUDAExecutionProvider"
    lines = [f"Measured on {machine(args.provider)}; float32, torchvision models at {args.size}x{args.size} "
             f"with random weights, median of {args.repeats} rounds.", ""]
    if speeds:
        time_note = " (io_binding; with host copies)" if cuda else ""
        head = ["model", "batch", "preset", "LRP / forward", "floor", "Zennit / torch", "onnxlrp / Zennit",
                f"forward ms{time_note}", f"LRP ms{time_note}", "Zennit ms"]
        if any(r["model"].startswith("vit_") for r in speeds):
            head = [cell.replace("Zennit", "Zennit or LXT") for cell in head]
        if cuda:
            head.append("CUDA vs CPU (rel. L2)")
        if args.dtype == "float16":
            head += [f"float16 LRP ms{' (io_binding)' if cuda else ''}", "float16 vs float32 (rel. L2)"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in speeds:
            fwd, lrp = (r["forward_bound"], r["lrp_bound"]) if cuda else (r["forward"], r["lrp"])
            zennit, torch_fwd = r.get("zennit"), r.get("torch")
            cells = [r["model"], str(r["batch"]), f"`{r['preset']}`", fmt(lrp / fwd), str(r["floor"]),
                     fmt(zennit / torch_fwd if zennit and torch_fwd else None),
                     fmt(lrp / zennit if zennit else None, 3)]
            if cuda:
                cells += [f"{fmt(fwd, 1, 1e3)}; {fmt(r['forward'], 1, 1e3)}",
                          f"{fmt(lrp, 1, 1e3)}; {fmt(r['lrp'], 1, 1e3)}"]
            else:
                cells += [fmt(fwd, 1, 1e3), fmt(lrp, 1, 1e3)]
            cells.append(fmt(zennit, 1, 1e3))
            if cuda:
                cells.append("–" if r.get("vs_cpu") is None else f"{r['vs_cpu']:.1e}")
            if args.dtype == "float16":
                cells += [fmt(r.get("lrp16"), 1, 1e3),
                          "–" if r.get("vs_float32") is None else f"{r['vs_float32']:.1e}"]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    head = ["model", "preset", "file / model", "build s", "build peak MB", "session start s", "peak MB with session"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, preset, stats, ratio in builds:
        lines.append(f"| {name} | `{preset}` | {ratio:.3f} | {stats['build_s']:.2f} | {stats['build_peak_mb']:.0f} | "
                     f"{stats['session_s']:.2f} | {stats['session_peak_mb']:.0f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--child-build":
        print(json.dumps(build_stats(*sys.argv[2:])))
    else:
        main()

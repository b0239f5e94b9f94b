"""Time the LRP graph against the plain forward pass in ONNX Runtime, and Zennit against torch where installed.

    python bench/bench.py vgg16 --composite epsilon_plus_flat --batch 1
    python bench/bench.py fixtures/vgg_ts.onnx --batch 8

MODEL is an .onnx file or a torchvision model name (random weights; needs torch, torchvision and zennit,
which also adds the Zennit timings). Prints ratios measured in this one run, and the medians behind them.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

import onnxlrp

ort.set_default_logger_severity(3)


def median_seconds(call, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def torchvision_model(name: str, size: int, path: Path):
    import torch
    import torchvision
    model = getattr(torchvision.models, name)(weights=None).eval()
    x = torch.randn(1, 3, size, size)
    torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=17, input_names=["input"],
                      output_names=["logits"], dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}})
    return model


def zennit_seconds(model, x: np.ndarray, composite: str, repeats: int) -> tuple[float, float]:
    """Median seconds of a torch forward pass and of Zennit's attribution (same composite, canonizers)."""
    import torch
    from zennit.attribution import Gradient
    from zennit.composites import COMPOSITES
    from zennit.torchvision import ResNetCanonizer, VGGCanonizer
    canonizer = ResNetCanonizer() if "resnet" in type(model).__name__.lower() else VGGCanonizer()
    kwargs = {"low": -3.0, "high": 3.0} if composite == "epsilon_gamma_box" else {}
    tensor = torch.from_numpy(x)
    with torch.no_grad():
        forward = median_seconds(lambda: model(tensor), repeats)
    chosen = COMPOSITES[composite](canonizers=[canonizer], **kwargs)
    with Gradient(model=model, composite=chosen) as attributor:
        def attribute():
            attributor(tensor.clone().requires_grad_(True), lambda y: torch.eye(y.shape[1])[y.argmax(1)] * y)
        explain = median_seconds(attribute, repeats)
    return forward, explain


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--composite", default="epsilon_plus_flat")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--size", type=int, default=224, help="image side for torchvision models")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--provider", default="CPUExecutionProvider")
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp())
    torch_model = None
    if args.model.endswith(".onnx"):
        source_path = Path(args.model)
    else:
        source_path = folder / f"{args.model}.onnx"
        torch_model = torchvision_model(args.model, args.size, source_path)
    source = onnxlrp.load(source_path)
    composite = onnxlrp.load_composite(args.composite)
    if args.composite == "epsilon_gamma_box":
        composite = composite.with_params({"low": -3.0, "high": 3.0})
    built = onnxlrp.build(source, composite, source=str(source_path))
    shape = [args.batch] + [d.dim_value for d in source.graph.input[0].type.tensor_type.shape.dim[1:]]
    x = np.random.default_rng(0).normal(size=shape).astype(np.float32)

    providers = [args.provider, "CPUExecutionProvider"]
    plain = ort.InferenceSession(source.SerializeToString(), providers=providers)
    explaining = ort.InferenceSession(built.SerializeToString(), providers=providers)
    forward = median_seconds(lambda: plain.run(None, {"input": x}), args.repeats)
    lrp = median_seconds(lambda: explaining.run(["relevance"], {"input": x}), args.repeats)
    print(f"model {source_path.name}, composite {args.composite}, batch {args.batch}, "
          f"provider {explaining.get_providers()[0]}")
    print(f"onnxlrp LRP graph / ORT forward: {lrp / forward:.2f}  (medians {lrp * 1e3:.2f} ms / {forward * 1e3:.2f} ms)")
    if torch_model is not None:
        torch_forward, zennit = zennit_seconds(torch_model, x, args.composite, args.repeats)
        print(f"Zennit / torch forward: {zennit / torch_forward:.2f}  "
              f"(medians {zennit * 1e3:.2f} ms / {torch_forward * 1e3:.2f} ms)")
        print(f"onnxlrp LRP graph / Zennit: {lrp / zennit:.2f}")


if __name__ == "__main__":
    main()

"""Explanations per second on this machine, in one run: onnxlrp (ONNX Runtime, all cores) against Zennit (torch, all
cores) under the same preset, on the digits test set and on ResNet-50 (torchvision, random weights) at batch 1, 8
and 32; and `onnxlrp explain` end to end on the digits test set as PNG files (reading, preprocessing, heatmaps).

    python bench/throughput.py --out bench/results-throughput.md     # needs torch, torchvision and zennit

Each ratio is measured within one round: onnxlrp and Zennit run in turn (bench.paired_medians).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from PIL import Image

import onnxlrp
from onnxlrp.app.explain import explain_inputs

sys.path.insert(0, str(Path(__file__).parent))
from bench import composite, export_torchvision, machine, paired_medians, zennit_attribution  # noqa: E402

DIGITS = Path(__file__).parents[1] / "fixtures" / "digits"
PRESET = "epsilon_plus_flat"


def digits_network(model: onnx.ModelProto):
    """The digits CNN of fixtures/digits/train.py in torch, its BatchNorm folded as the exporter folded it, with the
    exported weights."""
    import torch
    from torch import nn
    network = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10)).eval()
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    layers = [m for m in network if isinstance(m, (nn.Conv2d, nn.Linear))]
    nodes = [n for n in model.graph.node if n.op_type in ("Conv", "Gemm")]
    for layer, node in zip(layers, nodes, strict=True):
        weight, bias = (weights[name] for name in node.input[1:3])
        if node.op_type == "Gemm" and not any(a.name == "transB" and a.i for a in node.attribute):
            weight = weight.T
        layer.weight.data = torch.from_numpy(weight.copy())
        layer.bias.data = torch.from_numpy(bias.copy())
    return network


def rates(explainer: onnxlrp.Explainer, network, name: str, x: np.ndarray, repeats: int) -> tuple[float, float]:
    """Explanations per second of onnxlrp and of Zennit on the batch `x`, medians of `repeats` rounds."""
    import torch
    tensor = torch.from_numpy(x)
    with zennit_attribution(network, name, PRESET) as attribute:
        seconds = paired_medians([lambda: explainer.explain(x),
                                  lambda: attribute(tensor.clone().requires_grad_(True))], repeats)
    return len(x) / seconds[0], len(x) / seconds[1]


def end_to_end(images: np.ndarray, batch: int) -> float:
    """`onnxlrp explain` on the digits test set as PNG files: explanations per second, reading to writing."""
    with tempfile.TemporaryDirectory() as folder:
        pictures = Path(folder) / "pictures"
        pictures.mkdir()
        for k, image in enumerate(images):
            Image.fromarray(image).save(pictures / f"{k:04d}.png")
        start = time.perf_counter()
        explain_inputs(str(DIGITS / "digits_epsilon_plus_flat.onnx"), [str(pictures)], str(Path(folder) / "out"),
                       batch_size=batch)
        return len(images) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    ort.set_default_logger_severity(3)
    rows = []
    test = np.load(DIGITS / "test.npz")
    x = (test["images"][:, None].astype(np.float32) / 255)
    digits = onnxlrp.Explainer(DIGITS / "digits_epsilon_plus_flat.onnx")
    network = digits_network(onnxlrp.load(DIGITS / "digits.onnx"))
    import torch
    with torch.no_grad():  # the torch twin computes the exported model's logits
        np.testing.assert_allclose(network(torch.from_numpy(x[:32])).numpy(), digits.explain(x[:32])[0], atol=1e-4)
    ours, theirs = rates(digits, network, "digits", x, args.repeats)
    rows.append(("digits test set", len(x), ours, theirs))
    rows.append(("digits, `onnxlrp explain` on PNG files", 16, end_to_end(test["images"], 16), None))
    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder) / "resnet50.onnx"
        resnet = export_torchvision("resnet50", source, 224)
        built = onnxlrp.Explainer(onnxlrp.build(onnxlrp.load(source), composite(PRESET)))
        rng = np.random.default_rng(0)
        for batch in args.batches:
            sample = rng.standard_normal((batch, 3, 224, 224), dtype=np.float32)
            ours, theirs = rates(built, resnet, "resnet50", sample, args.repeats)
            rows.append((f"ResNet-50, batch {batch}", batch, ours, theirs))
    lines = [f"Explanations per second under {PRESET}, {machine('CPUExecutionProvider')}:", "",
             "| what | batch | onnxlrp | Zennit | onnxlrp / Zennit |", "|---|---|---|---|---|"]
    for what, batch, ours, theirs in rows:
        ratio = "–" if theirs is None else f"{ours / theirs:.2f}x"
        lines.append(f"| {what} | {batch} | {ours:.1f} | {'–' if theirs is None else f'{theirs:.1f}'} | {ratio} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()

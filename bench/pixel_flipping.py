"""Pixel flipping on the digits example: how fast does the explained logit fall when the pixels an explanation
calls most relevant are removed first?

    python bench/pixel_flipping.py [--fill zero|mean] [--steps 16] [--plot docs/pixel_flipping.png]

For every held-out digit (fixtures/digits/test.npz) and every method, pixels are sorted by relevance (largest
first) and removed in `steps` equal steps (set to 0, the background, or to the per-pixel mean of the test set).
The curve is the mean logit of the originally predicted class after each step; its area (the mean over the
steps 0..steps, a trapezoid on [0, 1]) is printed: the smaller, the faster the logit falls and the more faithful
the order. Methods: every preset composite, gradient x input computed by finite differences on the plain model
(independent of onnxlrp's graph), and a random order (the mean of a few seeds). Only numpy, ONNX Runtime,
onnxlrp and pillow are needed.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image, ImageDraw, ImageFont

import onnxlrp

ROOT = Path(__file__).resolve().parent.parent
DIGITS = ROOT / "fixtures" / "digits"
COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf",
          "#000080", "#7f7f00"]


def logits_of(session: ort.InferenceSession, x: np.ndarray) -> np.ndarray:
    return session.run(["logits"], {"input": x})[0]


def gradient_times_input(session: ort.InferenceSession, x: np.ndarray, classes: np.ndarray,
                         step: float = 1e-3) -> np.ndarray:
    """d logit_c / d x by central differences, one image at a time, times x."""
    eye = np.eye(x[0].size, dtype=np.float32).reshape(x[0].size, *x.shape[1:]) * step
    gradients = np.empty_like(x)
    for k, (sample, c) in enumerate(zip(x, classes)):
        up, down = logits_of(session, sample + eye)[:, c], logits_of(session, sample - eye)[:, c]
        gradients[k] = ((up - down) / (2 * step)).reshape(x.shape[1:])
    return gradients * x


def flipping_curve(session: ort.InferenceSession, x: np.ndarray, classes: np.ndarray, relevance: np.ndarray,
                   fill: np.ndarray, steps: int, rng: np.random.Generator) -> np.ndarray:
    """Mean logit of `classes` after removing 0, 1/steps, ..., all pixels, most relevant first (ties at random)."""
    flat = relevance.reshape(len(x), -1)
    jitter = rng.random(flat.shape) * 1e-12 * (np.abs(flat).max() + 1e-30)  # break exact ties without bias
    order = np.argsort(-(flat + jitter), axis=1, kind="stable")
    pixels = flat.shape[1]
    curve = []
    for step in range(steps + 1):
        removed = order[:, :round(step * pixels / steps)]
        flipped = x.reshape(len(x), -1).copy()
        rows = np.arange(len(x))[:, None]
        flipped[rows, removed] = fill.reshape(-1)[removed]
        curve.append(logits_of(session, flipped.reshape(x.shape))[np.arange(len(x)), classes].mean())
    return np.array(curve)


def area(curve: np.ndarray) -> float:
    """Trapezoid area under the curve over [0, 1]."""
    return float(((curve[1:] + curve[:-1]) / 2).mean())


def plot(curves: dict[str, np.ndarray], path: Path, title: str) -> None:
    """A small line plot with pillow: one line per method, legend on the right."""
    width, height, left, top, right, bottom, legend = 900, 480, 60, 30, 20, 50, 260
    low = min(0.0, min(float(c.min()) for c in curves.values()))
    high = max(float(c.max()) for c in curves.values())
    image = Image.new("RGB", (width, height), "white")
    draw, font = ImageDraw.Draw(image), ImageFont.load_default()
    plot_width, plot_height = width - left - right - legend, height - top - bottom
    to_xy = lambda t, v: (left + t * plot_width, top + (high - v) / (high - low) * plot_height)  # noqa: E731
    draw.rectangle([left, top, left + plot_width, top + plot_height], outline="black")
    for tick in np.linspace(low, high, 6):
        y = to_xy(0, tick)[1]
        draw.line([left - 4, y, left, y], fill="black")
        draw.text((6, y - 6), f"{tick:.1f}", fill="black", font=font)
    for tick in np.linspace(0, 1, 5):
        x = to_xy(tick, low)[0]
        draw.line([x, top + plot_height, x, top + plot_height + 4], fill="black")
        draw.text((x - 10, top + plot_height + 8), f"{tick:.0%}", fill="black", font=font)
    draw.text((left + plot_width / 2 - 80, height - 20), "share of pixels removed", fill="black", font=font)
    draw.text((left, 8), title, fill="black", font=font)
    zero = to_xy(0, 0)[1]
    draw.line([left, zero, left + plot_width, zero], fill="#cccccc")
    for k, (name, curve) in enumerate(curves.items()):
        color = "#000000" if name == "random" else COLORS[k % len(COLORS)]
        points = [to_xy(t, v) for t, v in zip(np.linspace(0, 1, len(curve)), curve)]
        draw.line(points, fill=color, width=3 if name == "random" else 2)
        y = top + 10 + 18 * k
        draw.line([width - legend + 10, y + 6, width - legend + 35, y + 6], fill=color, width=3)
        draw.text((width - legend + 42, y), f"{name} ({area(curve):.2f})", fill="black", font=font)
    image.save(path, optimize=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fill", choices=("zero", "mean"), default="zero")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--plot", type=Path, help="Write the curves as a PNG here.")
    args = parser.parse_args()

    data = np.load(DIGITS / "test.npz")
    x = (data["images"][:, None].astype(np.float32) / 255)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    plain = ort.InferenceSession(str(DIGITS / "digits.onnx"), options, providers=["CPUExecutionProvider"])
    predicted = logits_of(plain, x).argmax(axis=1)
    fill = np.zeros(x.shape[1:], np.float32) if args.fill == "zero" else x.mean(axis=0)
    print(f"{len(x)} held-out digits, {x[0].size} pixels, {args.steps} steps, removed pixels set to {args.fill}; "
          f"accuracy {float((predicted == data['classes']).mean()):.4f}")

    explanations = {}
    for name in onnxlrp.preset_names():
        _, explanations[name] = onnxlrp.Explainer(DIGITS / "digits.onnx", composite=name).explain(x, predicted)
    explanations["gradient x input"] = gradient_times_input(plain, x, predicted)
    difference = explanations["zero"] - explanations["gradient x input"]
    squares = lambda r: (r ** 2).sum(axis=(1, 2, 3))  # noqa: E731
    relative = np.sqrt(squares(difference) / squares(explanations["gradient x input"]))
    print(f"uniform LRP-0 (zero) vs finite-difference gradient x input, relative L2 per digit: median "
          f"{np.median(relative):.3f}, largest {relative.max():.3f}")

    rng = np.random.default_rng(0)
    curves = {name: flipping_curve(plain, x, predicted, r, fill, args.steps, rng) for name, r in explanations.items()}
    randoms = [flipping_curve(plain, x, predicted, rng.random(x.shape), fill, args.steps, rng) for _ in range(5)]
    curves["random"] = np.mean(randoms, axis=0)
    print(f"{'method':28s} {'area under logit curve':>22s} {'logit at 0%':>12s} {'at 25%':>8s}")
    quarter = args.steps // 4
    for name, curve in sorted(curves.items(), key=lambda item: area(item[1])):
        print(f"{name:28s} {area(curve):22.3f} {curve[0]:12.3f} {curve[quarter]:8.3f}")
    random_area = area(curves["random"])
    slower = [name for name in onnxlrp.preset_names() if area(curves[name]) >= random_area]
    print("every preset drops the logit faster than a random order" if not slower
          else f"NOT faster than random: {', '.join(slower)}")
    if args.plot:
        plot(curves, args.plot,
             f"pixel flipping on the digits CNN ({len(x)} test digits, removed pixels = {args.fill})")
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()

"""Faithfulness on the digits example: `onnxlrp evaluate` over the 450 held-out digits with every preset.

    python bench/pixel_flipping.py [--fill black|white|mean|zero] [-o OUT]

The same run as `onnxlrp evaluate fixtures/digits/digits.onnx DIGITS.npy -o OUT --composite NAME ...` (every
preset) with 16 pixels flipped per step and 4x4 regions: pixel flipping and region perturbation as Quantus defines
them (onnxlrp/app/evaluate.py), against gradient x input (uniform LRP-0) and a random order. It also checks that
uniform LRP-0 is gradient x input on this network, against central finite differences on the plain model.
Needs the dataset extra (matplotlib) for the plot.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

import onnxlrp
from onnxlrp.app import evaluate as ev

ROOT = Path(__file__).resolve().parent.parent
DIGITS = ROOT / "fixtures" / "digits"


def gradient_times_input(session: ort.InferenceSession, x: np.ndarray, classes: np.ndarray,
                         step: float = 1e-3) -> np.ndarray:
    """d logit_c / d x by central differences, one image at a time, times x."""
    eye = np.eye(x[0].size, dtype=np.float32).reshape(x[0].size, *x.shape[1:]) * step
    gradients = np.empty_like(x)
    for k, (sample, c) in enumerate(zip(x, classes)):
        up, down = (session.run(["logits"], {"input": sample + sign * eye})[0][:, c] for sign in (1, -1))
        gradients[k] = ((up - down) / (2 * step)).reshape(x.shape[1:])
    return gradients * x


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fill", choices=ev.FILLS, default="black")
    parser.add_argument("-o", "--output", type=Path, help="Write faithfulness.csv and faithfulness.png here.")
    args = parser.parse_args()

    data = np.load(DIGITS / "test.npz")
    x = data["images"][:, None].astype(np.float32) / 255
    presets = onnxlrp.preset_names()
    start = time.perf_counter()
    built = ev.explainers(DIGITS / "digits.onnx", presets)
    settings = ev.Settings(features_in_step=16, patch_size=4, regions=16, fill=args.fill)
    results = ev.evaluate(built, x, presets, settings)
    print(f"{len(x)} held-out digits, {len(presets)} presets, fill {args.fill}: {time.perf_counter() - start:.0f} s")
    for line in ev.lines(results):
        print(line)
    random = next(r for r in results if r.method == ev.RANDOM)
    worse = [r.method for r in results if r.method in presets and r.region_aopc <= random.region_aopc]
    print("every preset's region AOPC beats a random order" if not worse else f"NOT above random: {worse}")

    options = ort.SessionOptions()
    options.log_severity_level = 3
    plain = ort.InferenceSession(str(DIGITS / "digits.onnx"), options, providers=["CPUExecutionProvider"])
    classes = plain.run(["logits"], {"input": x})[0].argmax(axis=1)
    finite = gradient_times_input(plain, x, classes)
    zero = built["zero"].explain(x, classes)[1]
    squares = lambda r: (r ** 2).sum(axis=(1, 2, 3))  # noqa: E731
    relative = np.sqrt(squares(zero - finite) / squares(finite))
    print(f"uniform LRP-0 vs finite-difference gradient x input, relative L2 per digit: median "
          f"{np.median(relative):.3f}, largest {relative.max():.3f}")
    if args.output:
        for line in ev.write(results, args.output, f"digits CNN: {len(x)} test digits, fill {args.fill}")[-1:]:
            print(line)


if __name__ == "__main__":
    main()

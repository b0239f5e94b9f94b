"""Draw docs/lstm_relevance.png: the trained LSTM example (fixtures/make_lstm_example.py) on three held-out class-1
sequences, each as its input and its relevance over time per feature, computed by the model onnxlrp builds under
`epsilon` in ONNX Runtime; the planted pattern framed in green, the decoy in orange. Needs matplotlib. Run from the
repository root: `python docs/make_lstm_picture.py`."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

import onnxlrp  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RECURRENT = ROOT / "fixtures" / "recurrent"
EXAMPLE = np.load(RECURRENT / "example_lstm.npz")
SAMPLES = [14, 8, 3]  # class 1: the pattern early, midway and late, each with a decoy
WIDTH = 3  # steps of the pattern


def relevance() -> np.ndarray:
    """The relevance [N, T, F] of the committed sequences for class 1."""
    model = onnxlrp.build(onnx.load(RECURRENT / "example_lstm.onnx"), "epsilon")
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = EXAMPLE["x"][SAMPLES]
    return session.run(["relevance"], {"x": x, "target": np.ones(len(x), np.int64)})[0]


def strip(axis: plt.Axes, values: np.ndarray, sample: int, title: str) -> matplotlib.image.AxesImage:
    """Features as rows, steps as columns, red positive and blue negative around white 0; the pattern framed."""
    bound = np.abs(values).max()
    image = axis.imshow(values.T, cmap="bwr", vmin=-bound, vmax=bound, aspect="auto")
    frames = [(EXAMPLE["start"][sample], 0, "green", "-")]
    if EXAMPLE["decoy_feature"][sample] >= 0:
        frames.append((EXAMPLE["decoy_start"][sample], EXAMPLE["decoy_feature"][sample], "darkorange", "--"))
    for start, feature, color, style in frames:
        axis.add_patch(Rectangle((start - 0.5, feature - 0.5), WIDTH, 1, fill=False, edgecolor=color, linewidth=2,
                                 linestyle=style))
    axis.set_yticks(range(values.shape[1]), [f"feature {f}" for f in range(values.shape[1])], fontsize=7)
    axis.set_xticks(range(0, values.shape[0], 2), [str(t) for t in range(0, values.shape[0], 2)], fontsize=7)
    axis.set_title(title, fontsize=8)
    return image


def main() -> None:
    relevances = relevance()
    figure, axes = plt.subplots(len(SAMPLES), 2, figsize=(10, 1.7 * len(SAMPLES)), constrained_layout=True)
    for row, (sample, values) in enumerate(zip(SAMPLES, relevances)):
        positive = np.maximum(values, 0)
        start = EXAMPLE["start"][sample]
        share = positive[start:start + WIDTH, 0].sum() / positive.sum()
        figure.colorbar(strip(axes[row, 0], EXAMPLE["x"][sample], sample, f"sequence {sample}: input"), ax=axes[row, 0])
        figure.colorbar(strip(axes[row, 1], values, sample, f"relevance for class 1 ({share:.0%} of the positive "
                              f"relevance in the green frame)"), ax=axes[row, 1])
    for axis in axes[-1]:
        axis.set_xlabel("time step", fontsize=8)
    figure.suptitle("LSTM trained to find +2, -2, +2 in feature 0 (green); the same pattern in another feature "
                    "(orange) is a decoy", fontsize=9)
    figure.savefig(ROOT / "docs" / "lstm_relevance.png", dpi=110)


if __name__ == "__main__":
    main()

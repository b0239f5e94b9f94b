"""Draw the pictures of the trained classic examples (fixtures/make_examples.py) from the relevance that their built
models compute in ONNX Runtime: docs/wine_relevance.png (per-feature bars), docs/digits_kmeans.png and
docs/digits_one_class.png (8x8 heatmaps). Needs matplotlib. Run from the repository root:
`python docs/make_examples.py`."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402

import onnxlrp  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "fixtures" / "examples"
DOCS = ROOT / "docs"
ARRAYS = np.load(EXAMPLES / "examples.npz")
WINE, DIGITS, OUTLIERS = 0, [0, 1, 2, 3, 5], [0, 2, 6, 7, 10]  # the samples drawn


def run(name: str, x: np.ndarray, target: np.ndarray | None = None) -> list[np.ndarray]:
    """The built model's outputs (its own, then `relevance`)."""
    model = onnxlrp.build(onnx.load(EXAMPLES / f"{name}.onnx"))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"X": x} if target is None else {"X": x, "target": target})


def symmetric(axis: plt.Axes, values: np.ndarray, title: str) -> None:
    """An 8x8 heatmap, red for positive and blue for negative relevance, white at 0."""
    bound = np.abs(values).max() or 1.0
    axis.imshow(values.reshape(8, 8), cmap="bwr", vmin=-bound, vmax=bound)
    axis.set_title(title, fontsize=8)
    axis.set_xticks([]), axis.set_yticks([])


def digit(axis: plt.Axes, pixels: np.ndarray, title: str) -> None:
    axis.imshow(pixels.reshape(8, 8), cmap="gray_r", vmin=0, vmax=16)
    axis.set_title(title, fontsize=8)
    axis.set_xticks([]), axis.set_yticks([])


def wine() -> None:
    """One held-out wine: each feature's contribution to the score of each cultivar, the predicted one marked."""
    x = ARRAYS["wine"][WINE:WINE + 1]
    features, classes = ARRAYS["wine/features"], ARRAYS["wine/classes"]
    label = int(run("wine_pipeline", x)[0][0])
    figure, axes = plt.subplots(1, len(classes), figsize=(11, 4.2), sharey=True)
    for c, axis in enumerate(axes):
        relevance = run("wine_pipeline", x, np.array([c]))[-1][0]
        axis.barh(np.arange(len(features)), relevance, color=np.where(relevance >= 0, "tab:red", "tab:blue"))
        axis.axvline(0, color="black", linewidth=0.6)
        axis.set_title(f"{classes[c]}{' (predicted)' if c == label else ''}: sum {relevance.sum():.2f}", fontsize=9)
    axes[0].set_yticks(np.arange(len(features)), features, fontsize=8)
    axes[0].invert_yaxis()
    figure.suptitle("Wine (StandardScaler + LogisticRegression): relevance of each feature for each cultivar, "
                    "w_ci (x_i - mean_i) / scale_i", fontsize=10)
    figure.tight_layout()
    figure.savefig(DOCS / "wine_relevance.png", dpi=100)


def kmeans() -> None:
    """Held-out digits, the centroid of the cluster each is assigned to, and NEON's relevance for that cluster."""
    x = ARRAYS["digits"][DIGITS]
    label, _, relevance = run("digits_kmeans", x)
    centroids = ARRAYS["digits_kmeans/centroids"]
    figure, axes = plt.subplots(3, len(DIGITS), figsize=(1.9 * len(DIGITS), 6.8))
    for column, (pixels, cluster, values) in enumerate(zip(x, label, relevance)):
        digit(axes[0, column], pixels, f"digit {ARRAYS['digits/labels'][DIGITS[column]]}")
        digit(axes[1, column], centroids[cluster], f"centroid of cluster {cluster}")
        symmetric(axes[2, column], values, f"relevance, sum {values.sum():.0f}")
    figure.suptitle("k-means on the digits (10 clusters): why each digit is in its cluster (NEON)", fontsize=10)
    figure.tight_layout()
    figure.savefig(DOCS / "digits_kmeans.png", dpi=100)


def one_class() -> None:
    """Held-out zeros and other digits before a one-class SVM of the zeros, and One-class DTD's relevance."""
    x = ARRAYS["digits_one_class/inputs"][OUTLIERS]
    label, _, relevance = run("digits_one_class", x)
    figure, axes = plt.subplots(2, len(OUTLIERS), figsize=(1.9 * len(OUTLIERS), 4.4))
    for column, (pixels, inlier, values) in enumerate(zip(x, label[:, 0], relevance)):
        kind = "inlier" if inlier == 1 else "outlier"
        digit(axes[0, column], pixels, f"digit {ARRAYS['digits_one_class/labels'][OUTLIERS[column]]}: {kind}")
        symmetric(axes[1, column], values, f"relevance, sum {values.sum():.0f}")
    figure.suptitle("One-class SVM of the zeros: what makes each digit an outlier (One-class DTD)", fontsize=10)
    figure.tight_layout()
    figure.savefig(DOCS / "digits_one_class.png", dpi=100)


if __name__ == "__main__":
    wine()
    kmeans()
    one_class()

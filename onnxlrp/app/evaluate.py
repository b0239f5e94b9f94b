"""`onnxlrp evaluate`: faithfulness of explanations over a dataset, by perturbing the inputs they call relevant.

Pixel flipping and region perturbation follow Quantus 0.6.0 (quantus/metrics/faithfulness/pixel_flipping.py and
region_perturbation.py, `evaluate_batch`; the baselines of quantus/helpers/utils.py `get_baseline_dict`): the same
orders (numpy's argsort of the negated relevance), the same fills computed on the array being perturbed, the same
curves, and Quantus's area `calculate_auc` (the trapezoid rule with dx=1). tests/test_evaluate.py checks them
against numbers Quantus computed (fixtures/make_quantus_reference.py). The area over the perturbation curve (AOPC,
Samek et al. 2017) is the mean over the steps 0..L of the drop of the explained score from the unperturbed input.
"""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import onnx_graphsurgeon as gs

from ..api import Explainer, in_batches, open_session
from ..errors import LrpError
from .extras import png, pyplot, write_files

Predict = Callable[[np.ndarray], np.ndarray]  # a batch of inputs -> the scores [N, C]
FILLS = ("black", "white", "mean", "zero")  # Quantus's perturb_baseline: sample min, max, mean; or the value 0
GRADIENT = "gradient x input"
RANDOM = "random"


def fill_values(flat: np.ndarray, fill: str) -> np.ndarray:
    """The value each sample's removed features get, [N, 1], computed on the batch `flat` [N, F] as it is now
    (Quantus get_baseline_value(batched=True): black = min, white = max, mean = mean of the sample)."""
    if fill == "zero":
        return np.zeros((len(flat), 1), flat.dtype)
    aggregate = {"black": np.min, "white": np.max, "mean": np.mean}[fill]
    return aggregate(flat, axis=1)[:, None]


def _replace(flat: np.ndarray, indices: np.ndarray, fill: str) -> np.ndarray:
    """Quantus batch_baseline_replacement_by_indices: a copy of `flat` with `indices` [N, I] set to the fill."""
    perturbed = flat.copy()
    perturbed[np.arange(len(flat))[:, None], indices] = np.broadcast_to(fill_values(flat, fill), indices.shape)
    return perturbed


def _scores(predict: Predict, x: np.ndarray, classes: np.ndarray) -> np.ndarray:
    return predict(x)[np.arange(len(x)), classes]


def pixel_flipping(predict: Predict, x: np.ndarray, classes: np.ndarray, relevance: np.ndarray,
                   features_in_step: int = 1, fill: str = "black") -> np.ndarray:
    """Quantus PixelFlipping: the score of `classes` after each step [N, steps]; every step sets the next
    `features_in_step` input features, most relevant first, to the fill (cumulatively)."""
    batch = len(x)
    relevance = np.broadcast_to(relevance, x.shape).reshape(batch, -1)
    features = relevance.shape[1]
    if features_in_step < 1 or features % features_in_step:
        raise LrpError(f"--features-in-step {features_in_step}: must divide the {features} input features")
    order = np.argsort(-relevance, axis=1)
    perturbed, curve = x.reshape(batch, -1), []
    for start in range(0, features, features_in_step):
        perturbed = _replace(perturbed, order[:, start:start + features_in_step], fill)
        curve.append(_scores(predict, perturbed.reshape(x.shape), classes))
    return np.stack(curve, axis=1)


def _padding(size: int, patch: int) -> tuple[int, int]:
    """Quantus get_padding_size: what makes `size` a multiple of `patch`, split floor / ceil."""
    total = -size % patch
    return total // 2, total - total // 2


def region_perturbation(predict: Predict, x: np.ndarray, classes: np.ndarray, relevance: np.ndarray,
                        patch_size: int = 8, regions: int = 100, fill: str = "black") -> np.ndarray:
    """Quantus RegionPerturbation (order "morf"): the drop of the score of `classes` [N, steps] after each step;
    the input [N, C, H, W] is padded (edge) to a grid of patch_size x patch_size regions over all channels, the
    regions sorted by their summed relevance (zero-padded), and the first `regions` set to the fill in turn."""
    if x.ndim != 4:
        raise LrpError(f"region perturbation: inputs of shape {list(x.shape)} are not images [N, C, H, W]")
    if patch_size < 1 or patch_size > min(x.shape[2:]):
        raise LrpError(f"--patch-size {patch_size}: must be between 1 and the image size {list(x.shape[2:])}")
    batch = len(x)
    relevance = np.broadcast_to(relevance, x.shape)
    padding = ((0, 0), (0, 0), _padding(x.shape[2], patch_size), _padding(x.shape[3], patch_size))
    padded_shape = tuple(n + a + b for n, (a, b) in zip(x.shape, padding))
    rows, columns = padded_shape[2] // patch_size, padded_shape[3] // patch_size
    index = np.arange(int(np.prod(padded_shape[1:]))).reshape(padded_shape[1:])
    blocks = index.reshape(padded_shape[1], rows, patch_size, columns, patch_size).transpose(1, 3, 0, 2, 4)
    blocks = blocks.reshape(rows * columns, -1)  # row-major regions, each its flat indices in C, H, W order
    sums = np.pad(relevance, padding, mode="constant").reshape(batch, -1)[:, blocks].sum(axis=-1)
    order = np.argsort(-sums, -1)
    before = _scores(predict, x, classes)
    perturbed = np.pad(x, padding, mode="edge").reshape(batch, -1)
    drops = []
    for step in range(min(regions, rows * columns)):
        perturbed = _replace(perturbed, blocks[order[:, step]], fill)
        inner = perturbed.reshape(padded_shape)[:, :, padding[2][0]:padded_shape[2] - padding[2][1],
                                                padding[3][0]:padded_shape[3] - padding[3][1]]
        drops.append(before - _scores(predict, inner, classes))
    return np.stack(drops, axis=1)


def auc(curves: np.ndarray) -> np.ndarray:
    """Quantus calculate_auc per sample: the trapezoid rule over the curve's steps with dx=1."""
    return np.trapezoid(curves, dx=1, axis=1)


def aopc(drops: np.ndarray) -> np.ndarray:
    """The area over the perturbation curve per sample: the mean of the drops over the steps 0 (no drop) to L."""
    return drops.sum(axis=1) / (drops.shape[1] + 1)


@dataclass(frozen=True)
class Settings:
    """How the inputs are perturbed and what is followed: the classifier's logit or its softmax."""
    features_in_step: int | None = None  # None: a 16th of the features (the largest divisor up to that)
    patch_size: int = 8
    regions: int = 100
    fill: str = "black"
    softmax: bool = False
    seed: int = 0
    batch_size: int = 256


@dataclass(frozen=True)
class Scores:
    """One method's mean curves and areas over the dataset."""
    method: str
    start: float  # mean score of the unperturbed inputs
    flipping: np.ndarray  # mean score after each pixel-flipping step
    drops: np.ndarray  # mean drop after each region
    flipping_auc: float
    flipping_aopc: float
    region_auc: float
    region_aopc: float


def forward(explainer: Explainer) -> Callable[[np.ndarray], np.ndarray]:
    """The built model's forward pass alone, up to the explained scores: ONNX Runtime runs every node of a graph,
    so the whole built model would compute the relevance on every perturbed batch too (3x the time)."""
    graph = gs.import_onnx(explainer.model)
    scores = graph.tensors()[explainer.explained_name]
    scores.dtype = scores.dtype or np.float32
    graph.outputs = [scores]
    graph.cleanup(remove_unused_graph_inputs=True)
    pruned = gs.export_onnx(graph)
    pruned.ir_version = explainer.model.ir_version
    session = open_session(pruned)
    return lambda x: in_batches(lambda feeds: session.run([scores.name], feeds), {explainer.input_name: x},
                                explainer.batch)[0]


def predictor(explainer: Explainer, softmax: bool, batch_size: int) -> Predict:
    """The explained scores of a built model's forward pass (its logits, or their softmax), run in batches."""
    run = forward(explainer)

    def predict(x: np.ndarray) -> np.ndarray:
        logits = np.concatenate([run(x[k:k + batch_size]) for k in range(0, len(x), batch_size)]).astype(np.float64)
        if not softmax:
            return logits
        exp = np.exp(logits - logits.max(axis=1, keepdims=True))
        return exp / exp.sum(axis=1, keepdims=True)
    return predict


def score(method: str, predict: Predict, x: np.ndarray, classes: np.ndarray, relevance: np.ndarray,
          settings: Settings) -> Scores:
    """Both perturbations of one method's relevance, averaged over the samples."""
    features = x[0].size
    step = settings.features_in_step or max(d for d in range(1, max(1, features // 16) + 1) if features % d == 0)
    before = _scores(predict, x, classes)
    flipping = pixel_flipping(predict, x, classes, relevance, step, settings.fill)
    drops = region_perturbation(predict, x, classes, relevance, settings.patch_size, settings.regions, settings.fill)
    return Scores(method, float(before.mean()), flipping.mean(axis=0), drops.mean(axis=0), float(auc(flipping).mean()),
                  float(aopc(before[:, None] - flipping).mean()), float(auc(drops).mean()),
                  float(aopc(drops).mean()))


def explainers(model: str | Path, composites: Sequence[str]) -> dict[str, Explainer]:
    """The model built with every composite, and with `zero` (uniform LRP-0) for gradient x input."""
    if not composites:
        raise LrpError("--composite: name at least one composite")
    return {name: Explainer(model, composite=name) for name in dict.fromkeys([*composites, "zero"])}


def evaluate(built: dict[str, Explainer], x: np.ndarray, composites: Sequence[str], settings: Settings = Settings(),
             target: int | None = None) -> list[Scores]:
    """Every composite's relevance of the batch `x` (for `target`, or each sample's predicted class), gradient x
    input and a random order, scored by pixel flipping and region perturbation. Gradient x input is the relevance
    of uniform LRP-0 (composite `zero`), which equals it on networks of ReLU, max-pooling and linear layers."""
    if settings.fill not in FILLS:
        raise LrpError(f"--fill {settings.fill}: not one of {', '.join(FILLS)}")
    first = built[composites[0]]
    x = first.check_input(x, "data")
    if len(x) == 0:
        raise LrpError("data: no samples")
    predict = predictor(first, settings.softmax, settings.batch_size)
    classes = first.check_target(-1 if target is None else target, len(x))
    classes = np.where(classes < 0, predict(x).argmax(axis=1), classes)
    relevance = {name: built[name].explain(x, classes)[1] for name in composites}
    relevance[GRADIENT] = built["zero"].explain(x, classes)[1]
    relevance[RANDOM] = np.random.default_rng(settings.seed).random(x.shape)
    return [score(name, predict, x, classes, r, settings) for name, r in relevance.items()]


COLUMNS = ("method", "flipping_auc", "flipping_aopc", "region_auc", "region_aopc")


def table(results: Sequence[Scores]) -> str:
    """The scores as CSV text, one row per method."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(COLUMNS)
    for r in results:
        writer.writerow([r.method] + [f"{getattr(r, c):.6g}" for c in COLUMNS[1:]])
    return text.getvalue()


def lines(results: Sequence[Scores]) -> list[str]:
    """The table as aligned text, best region AOPC first."""
    head = f"{'method':28s} {'flipping AUC':>13s} {'flipping AOPC':>14s} {'region AUC':>11s} {'region AOPC':>12s}"
    return [head] + [f"{r.method:28s} {r.flipping_auc:13.4f} {r.flipping_aopc:14.4f} {r.region_auc:11.4f} "
                     f"{r.region_aopc:12.4f}" for r in sorted(results, key=lambda r: -r.region_aopc)]


def plot(results: Sequence[Scores], title: str) -> bytes:
    """The mean pixel-flipping curves and region-perturbation drops, one line per method, as PNG bytes."""
    plt = pyplot()
    figure, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5))
    for axis in (left, right):
        axis.set_prop_cycle(color=plt.get_cmap("tab20").colors)
    for r in results:
        style = {RANDOM: {"color": "black", "linewidth": 2.5}, GRADIENT: {"linestyle": "--"}}.get(r.method, {})
        left.plot(np.linspace(0, 1, len(r.flipping) + 1), [r.start, *r.flipping], **style)
        right.plot(np.arange(len(r.drops) + 1), [0, *r.drops], label=f"{r.method} ({r.region_aopc:.2f})", **style)
    left.set(xlabel="share of features flipped", ylabel="explained score", title="pixel flipping")
    right.set(xlabel="regions perturbed", ylabel="drop of the explained score",
              title="region perturbation (AOPC in the legend)")
    right.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1))
    figure.suptitle(title)
    return png(figure)


def write(results: Sequence[Scores], outdir: str | Path, title: str) -> list[str]:
    """faithfulness.csv and faithfulness.png into `outdir` (created if missing); the lines to print."""
    folder = Path(outdir)
    if folder.exists() and not folder.is_dir():
        raise LrpError(f"{folder}: exists and is not a folder")
    if not folder.resolve().parent.is_dir():
        raise LrpError(f"{folder}: its parent folder does not exist")
    files = {"faithfulness.csv": table(results).encode(), "faithfulness.png": plot(results, title)}
    folder.mkdir(exist_ok=True)
    write_files(folder, files)
    return lines(results) + [f"wrote {folder / 'faithfulness.csv'} and {folder / 'faithfulness.png'}"]

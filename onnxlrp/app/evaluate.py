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
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..api import Explainer, in_batches, open_session
from ..errors import LrpError
from .explain import check_output_folder
from .extras import joined, png, pyplot, write_files

if TYPE_CHECKING:
    from .engine import Actors

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
    """The built model's forward pass alone, up to the explained scores, on the explainer's device and threads: ONNX
    Runtime runs every node of a graph, so the whole built model would compute the relevance on every perturbed
    batch too (3x the time)."""
    graph = gs.import_onnx(explainer.model)
    scores = graph.tensors()[explainer.explained_name]
    scores.dtype = scores.dtype or np.float32
    graph.outputs = [scores]
    graph.cleanup(remove_unused_graph_inputs=True)
    pruned = gs.export_onnx(graph)
    pruned.ir_version = explainer.model.ir_version
    device = "cuda" if "CUDAExecutionProvider" in explainer.session.get_providers() else "cpu"
    session = open_session(pruned, device, explainer.session.get_session_options().intra_op_num_threads or None)
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


def random_relevance(seed: int, start: int, shape: tuple[int, ...]) -> np.ndarray:
    """The random order's relevance of the samples `start`, `start` + 1 ... (`shape`: theirs): the rows of one
    draw `default_rng(seed).random` over the whole dataset, whichever batch they come in (PCG64 advanced past
    the draws of the samples before)."""
    return np.random.Generator(np.random.PCG64(seed).advance(start * int(np.prod(shape[1:])))).random(shape)


@dataclass(frozen=True)
class Task:
    """What is scored: the composites (their models built), how, and for which class (None: the predicted one)."""
    composites: tuple[str, ...]
    settings: Settings = Settings()
    target: int | None = None


class Curves:
    """Every method's curves per sample for batches of rows {"start": the first sample's number, "x": the samples},
    with one session per built model held for the object's life."""

    def __init__(self, task: Task, built: dict[str, Explainer]):
        self.task, self.built = task, built
        self.predict = predictor(built[task.composites[0]], task.settings.softmax, task.settings.batch_size)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        parts = [self.samples(int(start), x) for start, x in zip(batch["start"], batch["x"])]
        return joined(parts)

    def samples(self, start: int, x: np.ndarray) -> dict[str, np.ndarray]:
        """The samples `x`, numbered from `start`: their explained class's score unperturbed, every method's
        pixel-flipping curve [N, methods, steps] and region-perturbation drops [N, methods, regions]."""
        settings, first = self.task.settings, self.built[self.task.composites[0]]
        classes = first.check_target(-1 if self.task.target is None else self.task.target, len(x))
        classes = np.where(classes < 0, self.predict(x).argmax(axis=1), classes)
        relevance = [self.built[name].explain(x, classes)[1] for name in (*self.task.composites, "zero")]
        relevance.append(random_relevance(settings.seed, start, x.shape))
        features = x[0].size
        step = settings.features_in_step or max(d for d in range(1, max(1, features // 16) + 1) if features % d == 0)
        return {"sample": np.arange(start, start + len(x)), "before": _scores(self.predict, x, classes),
                "flipping": np.stack([pixel_flipping(self.predict, x, classes, r, step, settings.fill)
                                      for r in relevance], axis=1),
                "drops": np.stack([region_perturbation(self.predict, x, classes, r, settings.patch_size,
                                                       settings.regions, settings.fill) for r in relevance], axis=1)}


class CurvesWorker(Curves):
    """`Curves` as a Ray Data actor (engine.py `run_on_actors`): the built models come as bytes, each worker opens
    its own sessions on its device and threads."""

    def __init__(self, task: Task, models: dict[str, bytes], device: str | None, threads: int):
        super().__init__(task, {name: Explainer(onnx.load_from_string(model), device=device or "cpu",
                                                threads=threads) for name, model in models.items()})


def summary(method: str, before: np.ndarray, flipping: np.ndarray, drops: np.ndarray) -> Scores:
    """One method's per-sample curves averaged over the samples."""
    return Scores(method, float(before.mean()), flipping.mean(axis=0), drops.mean(axis=0), float(auc(flipping).mean()),
                  float(aopc(before[:, None] - flipping).mean()), float(auc(drops).mean()),
                  float(aopc(drops).mean()))


def explainers(model: str | Path, composites: Sequence[str]) -> dict[str, Explainer]:
    """The model built with every composite, and with `zero` (uniform LRP-0) for gradient x input."""
    if not composites:
        raise LrpError("--composite: name at least one composite")
    return {name: Explainer(model, composite=name) for name in dict.fromkeys([*composites, "zero"])}


def evaluate(built: dict[str, Explainer], x: np.ndarray, composites: Sequence[str], settings: Settings = Settings(),
             target: int | None = None, actors: Actors | None = None) -> list[Scores]:
    """Every composite's relevance of the batch `x` (for `target`, or each sample's predicted class), gradient x
    input and a random order, scored by pixel flipping and region perturbation. Gradient x input is the relevance
    of uniform LRP-0 (composite `zero`), which equals it on networks of ReLU, max-pooling and linear layers.
    The curves are computed per `settings.batch_size` samples, in this process or (with `actors`, engine.py
    `run_on_actors`) on Ray's workers: the same numbers, averaged here."""
    if settings.fill not in FILLS:
        raise LrpError(f"--fill {settings.fill}: not one of {', '.join(FILLS)}")
    first = built[composites[0]]
    x = first.check_input(x, "data")
    if len(x) == 0:
        raise LrpError("data: no samples")
    first.check_target(-1 if target is None else target, len(x))
    task, size = Task(tuple(dict.fromkeys(composites)), settings, target), settings.batch_size
    rows = [{"start": start, "x": x[start:start + size]} for start in range(0, len(x), size)]
    if actors is None:
        curves = Curves(task, built)
        parts = [curves.samples(row["start"], row["x"]) for row in rows]
    else:
        models = {name: built[name].model.SerializeToString() for name in (*task.composites, "zero")}
        parts = list(actors(CurvesWorker, {"task": task, "models": models}, rows))
    columns = joined(parts)
    order = np.argsort(columns["sample"], kind="stable")
    if not np.array_equal(columns["sample"][order], np.arange(len(x))):
        raise LrpError(f"the workers returned {len(order)} curves for {len(x)} samples")
    before, flipping, drops = columns["before"][order], columns["flipping"][order], columns["drops"][order]
    methods = [*task.composites, GRADIENT, RANDOM]
    return [summary(method, before, flipping[:, k], drops[:, k]) for k, method in enumerate(methods)]


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
    check_output_folder(folder)
    files = {"faithfulness.csv": table(results).encode(), "faithfulness.png": plot(results, title)}
    folder.mkdir(exist_ok=True)
    write_files(folder, files)
    return lines(results) + [f"wrote {folder / 'faithfulness.csv'} and {folder / 'faithfulness.png'}"]

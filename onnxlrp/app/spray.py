"""`onnxlrp spray`: spectral relevance analysis (SpRAy, Lapuschkin et al. 2019) of the explanations of a class.

Per class, each heatmap is sum-pooled to a small grid and divided by its largest magnitude; a symmetric k-nearest-
neighbour graph of these vectors is clustered spectrally (scikit-learn), with the number of clusters at the
largest gap of the normalised Laplacian's smallest eigenvalues (or given); t-SNE places the samples in 2-D. The
report is one self-contained HTML page (matplotlib pictures inlined as base64 PNG) and a CSV of sample -> cluster.
"""
from __future__ import annotations

import base64
import csv
import html
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import LrpError
from ..ir.files import first_line
from .dataset import PARQUET_SUFFIX, SHARD_PREFIX, read_shards
from .extras import png, pyplot, require, write_files

MAX_CLUSTERS = 10
EXAMPLES = 4


@dataclass(frozen=True)
class ClassResult:
    """One class analysed: its samples (rows of the dataset), their pooled heatmaps, the smallest eigenvalues of
    the graph Laplacian, the cluster of each sample and the 2-D embedding."""
    explained: int
    rows: np.ndarray
    features: np.ndarray
    eigenvalues: np.ndarray
    clusters: np.ndarray
    embedding: np.ndarray

    @property
    def count(self) -> int:
        return int(self.clusters.max()) + 1


@dataclass(frozen=True)
class SprayResult:
    """The dataset analysed (ids, explained classes, relevance and, when known, the inputs) and each class."""
    ids: list[str]
    explained: np.ndarray
    relevance: np.ndarray
    inputs: np.ndarray | None
    classes: list[ClassResult]
    labels: list[str] | None = None

    def name(self, explained: int) -> str:
        """A class as the report names it."""
        if explained < 0:
            return "all samples"
        return f"{explained} ({self.labels[explained]})" if self.labels and explained < len(self.labels) \
            else str(explained)


def planes(relevance: np.ndarray) -> np.ndarray:
    """One relevance value per pixel [N, H, W]: [N, C, H, W] summed over channels, [N, H, W] as is, [N, F] as
    rows of one pixel's height."""
    relevance = np.asarray(relevance, dtype=np.float64)
    if relevance.ndim == 4:
        return relevance.sum(axis=1)
    if relevance.ndim in (2, 3):
        return relevance if relevance.ndim == 3 else relevance[:, None, :]
    raise LrpError(f"relevance of shape {list(relevance.shape)} is not a batch of heatmaps ([N, C, H, W], "
                   "[N, H, W] or [N, F])")


def pool(relevance: np.ndarray, grid: int) -> np.ndarray:
    """Each heatmap sum-pooled to at most grid x grid cells (fewer along a shorter side) and divided by its largest
    magnitude, flattened [N, cells]."""
    if grid < 1:
        raise LrpError(f"--grid {grid}: must be at least 1")
    maps = planes(relevance)
    for axis in (1, 2):
        edges = np.linspace(0, maps.shape[axis], min(grid, maps.shape[axis]) + 1).round().astype(int)[:-1]
        maps = np.add.reduceat(maps, edges, axis=axis)
    flat = maps.reshape(len(maps), -1)
    largest = np.abs(flat).max(axis=1, keepdims=True)
    return np.divide(flat, largest, out=np.zeros_like(flat), where=largest > 0)


def affinity(features: np.ndarray, neighbors: int):
    """The symmetric k-nearest-neighbour graph (1 where either sample is among the other's neighbours), sparse."""
    neighbors_graph = require("sklearn.neighbors").kneighbors_graph
    graph = neighbors_graph(features, min(neighbors, len(features) - 1), mode="connectivity", include_self=False)
    return graph.maximum(graph.T)


def spectrum(graph, count: int) -> np.ndarray:
    """The `count` smallest eigenvalues of the graph's normalised Laplacian, ascending (dense: classes of up to a
    few thousand samples)."""
    laplacian = require("scipy.sparse.csgraph").laplacian(graph.toarray(), normed=True)
    return np.sort(np.linalg.eigvalsh(laplacian))[:count]


def eigengap(eigenvalues: np.ndarray, largest: int) -> int:
    """The number of clusters k (1..largest) with the largest gap between the k-th and (k+1)-th eigenvalue."""
    gaps = np.diff(eigenvalues[:largest + 1])
    return int(np.argmax(gaps)) + 1 if len(gaps) else 1


def analyse(features: np.ndarray, clusters: str | int, neighbors: int, explained: int,
            rows: np.ndarray) -> ClassResult:
    """SpRAy on one class's pooled heatmaps."""
    if len(features) < 4:
        raise LrpError(f"class {explained}: {len(features)} samples; SpRAy needs at least 4")
    graph = affinity(features, neighbors)
    eigenvalues = spectrum(graph, min(len(features), 2 * MAX_CLUSTERS))
    count = eigengap(eigenvalues, min(MAX_CLUSTERS, len(features) - 1)) if clusters == "auto" else int(clusters)
    if not 1 <= count < len(features):
        raise LrpError(f"--clusters {count}: class {explained} has {len(features)} samples")
    cluster = require("sklearn.cluster")
    labels = np.zeros(len(features), np.int64) if count == 1 else cluster.SpectralClustering(
        n_clusters=count, affinity="precomputed", assign_labels="cluster_qr", random_state=0).fit_predict(graph)
    tsne = require("sklearn.manifold").TSNE(n_components=2, perplexity=min(30.0, (len(features) - 1) / 3),
                                            init="pca", random_state=0)
    with require("threadpoolctl").threadpool_limits(limits=1):  # t-SNE's threads spin 10x slower on busy cores
        embedding = tsne.fit_transform(features)
    return ClassResult(explained, rows, features, eigenvalues, _by_size(labels), embedding)


def _by_size(labels: np.ndarray) -> np.ndarray:
    """Cluster numbers renamed so that 0 is the largest cluster (ties: the first to appear)."""
    names, first, sizes = np.unique(labels, return_index=True, return_counts=True)
    order = names[np.lexsort((first, -sizes))]
    return np.argsort(order)[np.searchsorted(names, labels)]


def spray(relevance: np.ndarray, explained: np.ndarray, ids: Sequence[str] | None = None,
          inputs: np.ndarray | None = None, classes: Sequence[int] | None = None, clusters: str | int = "auto",
          grid: int = 8, neighbors: int = 10, labels: list[str] | None = None) -> SprayResult:
    """SpRAy of every class in `classes` (default: every explained class with at least 4 samples) over the
    relevance [N, ...] of samples explained for `explained` [N] (-1: unknown, one group)."""
    relevance, explained = np.asarray(relevance), np.asarray(explained, dtype=np.int64).reshape(-1)
    if len(relevance) != len(explained):
        raise LrpError(f"{len(relevance)} heatmaps but {len(explained)} explained classes")
    ids = [str(i) for i in (ids if ids is not None else range(len(relevance)))]
    if len(ids) != len(relevance) or (inputs is not None and len(inputs) != len(relevance)):
        raise LrpError(f"{len(relevance)} heatmaps but {len(ids)} ids" +
                       (f" and {len(inputs)} inputs" if inputs is not None else ""))
    if clusters != "auto" and (not str(clusters).isdigit() or int(clusters) < 1):
        raise LrpError(f"--clusters {clusters}: 'auto' or a whole number of at least 1")
    present, counts = np.unique(explained, return_counts=True)
    if classes is None:
        chosen = [int(c) for c, n in zip(present, counts) if n >= 4]
        if not chosen:
            raise LrpError("no explained class has the 4 samples SpRAy needs")
    else:
        missing = sorted(set(classes) - set(int(c) for c in present))
        if missing:
            raise LrpError(f"--classes: no sample was explained for class {', '.join(map(str, missing))}")
        chosen = list(dict.fromkeys(classes))
    features = pool(relevance, grid)
    results = [analyse(features[explained == c], clusters, neighbors, c, np.flatnonzero(explained == c))
               for c in chosen]
    return SprayResult(ids, explained, relevance, inputs, results, labels)


def csv_text(result: SprayResult) -> str:
    """id, explained class, cluster: one row per analysed sample."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(("id", "explained", "cluster"))
    for part in result.classes:
        for row, cluster in zip(part.rows, part.clusters):
            writer.writerow((result.ids[row], part.explained, int(cluster)))
    return text.getvalue()


def _image(data: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'


def _show(axis, plane: np.ndarray, signed: bool = True) -> None:
    """A heatmap (blue, white at zero, red) or a gray input on a matplotlib axis."""
    largest = float(np.abs(plane).max()) or 1.0
    if signed:
        axis.imshow(plane, cmap="bwr", vmin=-largest, vmax=largest, interpolation="nearest")
    else:
        axis.imshow(plane, cmap="gray", interpolation="nearest")
    axis.set_xticks([]), axis.set_yticks([])


def _overview(result: SprayResult, part: ClassResult) -> bytes:
    """The eigenvalue spectrum (the chosen number of clusters marked) and the embedding coloured by cluster."""
    plt = pyplot()
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    left.plot(np.arange(1, len(part.eigenvalues) + 1), part.eigenvalues, "o-")
    left.axvline(part.count + 0.5, color="gray", linestyle="--")
    left.set(xlabel="k", ylabel="eigenvalue", title=f"smallest eigenvalues (eigengap: {part.count} clusters)")
    for k in range(part.count):
        chosen = part.clusters == k
        right.scatter(part.embedding[chosen, 0], part.embedding[chosen, 1], s=14, label=f"cluster {k} "
                      f"({int(chosen.sum())})")
    right.legend(fontsize=8)
    right.set(title="t-SNE of the pooled heatmaps", xticks=[], yticks=[])
    figure.suptitle(f"class {result.name(part.explained)}: {len(part.rows)} samples")
    return png(figure)


def _clusters(result: SprayResult, part: ClassResult) -> bytes:
    """Per cluster (a row): its mean heatmap, then a few examples (the input, when known, and its heatmap)."""
    plt = pyplot()
    heatmaps = planes(result.relevance[part.rows])
    pictures = planes(result.inputs[part.rows]) if result.inputs is not None else None
    per_example = 1 if pictures is None else 2
    columns = 1 + EXAMPLES * per_example
    figure, axes = plt.subplots(part.count, columns, figsize=(1.6 * columns, 1.8 * part.count), squeeze=False)
    for k in range(part.count):
        members = np.flatnonzero(part.clusters == k)
        _show(axes[k, 0], heatmaps[members].mean(axis=0))
        axes[k, 0].set_title(f"cluster {k}: mean of {len(members)}", fontsize=8)
        for e in range(EXAMPLES):
            cells = axes[k, 1 + e * per_example:1 + (e + 1) * per_example]
            if e >= len(members):
                for cell in cells:
                    cell.axis("off")
                continue
            member = members[e]
            if pictures is not None:
                _show(cells[0], pictures[member], signed=False)
            _show(cells[-1], heatmaps[member])
            cells[0].set_title(result.ids[part.rows[member]], fontsize=7)
    figure.tight_layout()
    return png(figure)


def report(result: SprayResult, csv_name: str) -> str:
    """The HTML page: per class, the spectrum and the embedding, then each cluster's mean and examples."""
    sections = []
    for part in result.classes:
        sizes = ", ".join(f"{k}: {int((part.clusters == k).sum())}" for k in range(part.count))
        name = html.escape(result.name(part.explained))
        sections.append(f"<h2>Class {name}</h2>\n<p>{len(part.rows)} samples, {part.count} clusters "
                        f"(sizes {sizes}).</p>\n{_image(_overview(result, part), 'spectrum and embedding')}\n"
                        f"<h3>Clusters: mean heatmap and examples</h3>\n"
                        f"{_image(_clusters(result, part), 'cluster means and examples')}")
    body = "\n".join(sections)
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>SpRAy report</title>\n"
            f"<style>body{{font-family:sans-serif;margin:2em}} img{{max-width:100%}}</style></head><body>\n"
            f"<h1>Spectral relevance analysis</h1>\n<p>{len(result.ids)} samples; heatmaps red for positive "
            f"relevance, blue for negative; the cluster of every sample is in {html.escape(csv_name)}.</p>\n"
            f"{body}\n</body></html>\n")


def write_report(result: SprayResult, path: str | Path) -> list[str]:
    """REPORT (HTML) and REPORT's stem + .csv beside it, both or neither; the lines to print."""
    path = Path(path)
    if path.is_dir():
        raise LrpError(f"{path}: is a folder; give the path of the HTML report")
    table = path.with_suffix(".csv")
    write_files(path.resolve().parent, {path.name: report(result, table.name).encode(),
                                        table.name: csv_text(result).encode()})
    lines = [f"class {result.name(p.explained)}: {len(p.rows)} samples, {p.count} clusters of "
             f"{', '.join(str(int((p.clusters == k).sum())) for k in range(p.count))}" for p in result.classes]
    return lines + [f"wrote {path} and {table}"]


def load(source: str | Path) -> dict[str, np.ndarray]:
    """What `spray` reads: the Parquet shards of `explain --format parquet` (dataset.read_shards), an .npz with
    `relevance` and `explained` (optionally `id` or `ids`, `inputs`), or a folder of `explain`'s STEM.npy relevance
    files (which do not record the explained class: one group, explained -1)."""
    path = Path(source)
    if path.is_dir() and any(path.glob(f"{SHARD_PREFIX}*{PARQUET_SUFFIX}")):
        return read_shards(path)
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {k: data[k] for k in data.files}
        except (OSError, ValueError) as error:
            raise LrpError(f"{path}: not a readable .npz archive ({first_line(error)})") from None
        missing = [k for k in ("relevance", "explained") if k not in arrays]
        if missing:
            raise LrpError(f"{path}: has no array named {', '.join(missing)}")
        return arrays
    if not path.is_dir():
        raise LrpError(f"{path}: no such file or folder")
    files = sorted(path.glob("*.npy"))
    if not files:
        raise LrpError(f"{path}: no relevance files (STEM.npy) in this folder")
    try:
        maps = [np.load(f, allow_pickle=False) for f in files]
    except (OSError, ValueError) as error:
        raise LrpError(f"{path}: a relevance file is not a readable .npy array "
                       f"({first_line(error)})") from None
    if len({m.shape for m in maps}) > 1:
        raise LrpError(f"{path}: the relevance files have different shapes")
    return {"relevance": np.stack(maps), "explained": np.full(len(maps), -1), "id": np.array([f.stem for f in files])}

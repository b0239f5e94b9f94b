"""`onnxlrp explain`: read images and arrays (through inputs.py), run the model, write relevance and heatmaps.

Every input is read and checked before anything is written; outputs go to a temporary folder that is moved into
place at the end, so that an error leaves nothing behind.
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import click
import numpy as np
from PIL import Image

from ..api import Explainer
from ..errors import LrpError, LrpWarning
from .heatmaps import heatmap
from .inputs import ModelInput, Options, Preprocessing, collect, is_array, preprocessing, read_array, read_image


@dataclass
class Sample:
    """One output stem: where it came from, and how to read its model input(s) and the picture to overlay."""
    stem: str
    source: Path
    read: Callable[[], tuple[np.ndarray, Image.Image | None]]  # inputs [n, ...] and the picture (images only)


def samples(files: Sequence[Path], model_input: ModelInput, prep: Preprocessing | None) -> list[Sample]:
    """One Sample per output stem: images give one, an .npy of one sample one, an .npy batch [N, ...] N
    (STEM-0, STEM-1, ...). Every file is read and checked here; stems must not collide."""
    result: list[Sample] = []
    for path in files:
        if is_array(path):
            batch = read_array(path, model_input)
            if np.load(path, mmap_mode="r").ndim == len(model_input.shape) - 1:
                result.append(Sample(path.stem, path, lambda p=path: (read_array(p, model_input), None)))
            else:
                result += [Sample(f"{path.stem}-{i}", path,
                                  lambda p=path, i=i: (read_array(p, model_input, i), None))
                           for i in range(batch.shape[0])]
        else:
            read_image(path, model_input, prep)
            result.append(Sample(path.stem, path, lambda p=path: read_image(p, model_input, prep)))
    seen: dict[str, Path] = {}
    for sample in result:
        if sample.stem in seen:
            raise LrpError(f"{sample.source}: its output name '{sample.stem}' is taken by {seen[sample.stem]}; "
                           "rename one of them")
        seen[sample.stem] = sample.source
    return result


def batches(items: Sequence[Sample], size: int) -> Iterator[Sequence[Sample]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


@dataclass
class Result:
    """What one sample gave: its input, the picture (for images), the classifier output, the class explained,
    the value its relevance is compared with (the explained logit, log-odds or 1), and the relevance."""
    sample: Sample
    x: np.ndarray
    picture: Image.Image | None
    output: np.ndarray
    explained: int
    value: float
    relevance: np.ndarray

    @property
    def total(self) -> float:
        return float(self.relevance.sum(dtype=np.float64))


def run(explainer: Explainer, items: Sequence[Sample], target: int | None, batch_size: int,
        progress: Callable[[Iterator], Iterator] = lambda it: it) -> Iterator[Result]:
    """Explain the samples batch by batch (the target class for all, or each one's predicted class), reading the
    next batch while this one runs (Explainer.stream)."""
    groups = list(batches(items, batch_size))
    read: list[list[tuple[np.ndarray, Image.Image | None]]] = []

    def inputs() -> Iterator[np.ndarray]:
        for group in groups:
            read.append([sample.read() for sample in group])
            yield np.concatenate([x for x, _ in read[-1]])

    for group, found in progress(zip(groups, explainer.stream(inputs(), target))):
        for k, (sample, (x, picture)) in enumerate(zip(group, read.pop(0))):
            yield Result(sample, x[0], picture, found.output[k], int(found.classes[k]), float(found.values[k]),
                         found.relevance[k])


def describe(result: Result, explainer: Explainer) -> str:
    """The line printed for one sample: file, predicted class, explained class, the classifier output there (named
    for what it holds: logit, probability, log-probability) and the relevance sum."""
    predicted = int(np.argmax(result.output))
    named = lambda c: f"{c} ({explainer.label(c)})" if explainer.labels else str(c)  # noqa: E731
    sample = result.sample
    source = f"{sample.source}" + (f" [{sample.stem}]" if sample.stem != sample.source.stem else "")
    return (f"{source}: predicted {named(predicted)}, explained {named(result.explained)}, "
            f"{explainer.shown} {result.output[result.explained]:.6g}, relevance sum {result.total:.6g}")


def write(result: Result, folder: Path, cmap: str, overlay: bool, prep: Preprocessing | None) -> None:
    """STEM.npy (float32 relevance of the sample) and STEM.png (its heatmap at the model's input size)."""
    np.save(folder / f"{result.sample.stem}.npy", result.relevance.astype(np.float32))
    channel_axis = -1 if prep is not None and prep.layout == "nhwc" else 0
    background = None
    if overlay:
        background = result.picture if result.picture is not None else _input_picture(result.x, channel_axis)
    picture = heatmap(result.relevance, cmap, background, channel_axis)
    Image.fromarray(picture).save(folder / f"{result.sample.stem}.png")


def _input_picture(x: np.ndarray, channel_axis: int) -> np.ndarray:
    """A preprocessed input shown as gray values 0..1 (min to max), for overlays on .npy inputs."""
    plane = x.mean(axis=channel_axis) if x.ndim == 3 else (x[None] if x.ndim == 1 else x)
    low, high = float(plane.min()), float(plane.max())
    return (plane - low) / (high - low) if high > low else np.zeros_like(plane, dtype=np.float64)


def check_output_folder(outdir: Path) -> None:
    """Refuse an output folder that is a file, or that cannot be created because its parent folder is missing."""
    if outdir.exists() and not outdir.is_dir():
        raise LrpError(f"{outdir}: exists and is not a folder")
    if not outdir.resolve().parent.is_dir():
        raise LrpError(f"{outdir}: its parent folder does not exist")


class Staging:
    """A temporary folder beside OUTDIR whose files move into OUTDIR only when everything succeeded."""

    def __init__(self, outdir: Path):
        self.outdir = outdir
        check_output_folder(outdir)
        parent = outdir if outdir.is_dir() else outdir.resolve().parent
        try:
            self.folder = Path(tempfile.mkdtemp(prefix=".onnxlrp-", dir=parent))
        except OSError as error:
            raise LrpError(f"{outdir}: cannot write there ({error.strerror or error})") from None

    def commit(self) -> None:
        try:
            if not self.outdir.is_dir():
                os.replace(self.folder, self.outdir)
                return
            for path in sorted(self.folder.iterdir()):
                os.replace(path, self.outdir / path.name)
            self.folder.rmdir()
        except OSError as error:
            raise LrpError(f"{self.outdir}: cannot move the results into place ({error.strerror or error})") from None

    def discard(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def chosen_target(target: str | int | None, classes: int, find: Callable[[str], int | None], names: str
                  ) -> int | None:
    """The class `--target` gives: the one `find` names (a class name, a token), else its number; an LrpError for
    neither or a number out of range. `names` says what `find` looks for."""
    if target is None:
        return None
    found = find(str(target))
    if found is None:
        try:
            found = int(target)
        except ValueError:
            raise LrpError(f"--target {target}: neither a class number nor {names}") from None
    if not 0 <= found < classes:
        raise LrpError(f"--target {target}: out of range (the model has {classes} classes, 0 to {classes - 1})")
    return found


def labelled_target(target: str | int | None, classes: int, labels: list[str] | None) -> int | None:
    """The class `--target` gives by its name among `labels` or by its number."""
    names = labels or []
    return chosen_target(target, classes, lambda s: names.index(s) if s in names else None,
                         "a class name (--labels or the model's metadata)")


def explain_inputs(model: str, inputs: Sequence[str], outdir: str, *, target: int | str | None = None,
                   batch_size: int = 16, device: str = "cpu", cmap: str = "bwr", overlay: bool = False,
                   options: Options = Options(), labels_file: str | None = None,
                   composite: str | None = None) -> list[str]:
    """The `explain` command: check every option and input, explain them, move the results into `outdir`;
    return the line to print per input. `options` say how pictures become model inputs."""
    explainer = Explainer(model, device=device, composite=composite)
    if labels_file is not None:
        explainer.labels = read_labels(labels_file, explainer.classes)
    target = labelled_target(target, explainer.classes, explainer.labels)
    prep = preprocessing(explainer.input, options)
    files = collect(inputs)
    items = samples(files, explainer.input, prep)
    _keep_inputs(files, items, Path(outdir))
    staging = Staging(Path(outdir))
    lines, totals, values = [], [], []
    try:
        count = -(-len(items) // batch_size)
        progress = (lambda it: _progress(it, count)) if count > 1 else (lambda it: it)
        for result in run(explainer, items, target, batch_size, progress):
            write(result, staging.folder, cmap, overlay, prep)
            lines.append(describe(result, explainer))
            totals.append(result.total)
            values.append(result.value)
        staging.commit()
    finally:
        staging.discard()
    if count > 1:
        click.echo(explainer.rate.line(), err=True)
    inflation = explainer.recorded.inflation(totals, values)
    if inflation is not None:
        warnings.warn(f"{model}: {inflation}", LrpWarning)
    return lines


def read_inputs(model_input: ModelInput, inputs: Sequence[str], options: Options = Options()) -> np.ndarray:
    """Every input (images, folders of them, .npy arrays) read for `model_input` as `explain` reads them, as one
    batch."""
    items = samples(collect(inputs), model_input, preprocessing(model_input, options))
    return np.concatenate([sample.read()[0] for sample in items])


def _keep_inputs(files: Sequence[Path], items: Sequence[Sample], outdir: Path) -> None:
    """Refuse an OUTDIR where a result would replace one of the inputs (a heatmap over its own picture)."""
    sources = {path.resolve() for path in files}
    for sample in items:
        for suffix in (".npy", ".png"):
            if (outdir / f"{sample.stem}{suffix}").resolve() in sources:
                raise LrpError(f"{outdir}: writing {sample.stem}{suffix} there would replace an input; "
                               "choose another output folder")


def _progress(iterable: Iterator, length: int) -> Iterator:
    """A progress bar on stderr (stdout carries the results)."""
    with click.progressbar(iterable, length=length, label="explaining", file=sys.stderr) as bar:
        yield from bar


def read_labels(path: str, classes: int) -> list[str]:
    """Class names from a text file, one per line (blank lines skipped), exactly one per class."""
    try:
        names = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as error:
        raise LrpError(f"{path}: cannot read the labels ({getattr(error, 'strerror', None) or error})") from None
    if len(names) != classes:
        raise LrpError(f"{path}: {len(names)} labels for a model with {classes} classes")
    return names

"""`onnxlrp explain`: read images and arrays, preprocess them for the model, run it, write relevance and heatmaps.

Every input is read and checked before anything is written; outputs go to a temporary folder that is moved into
place at the end, so that an error leaves nothing behind.
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import click
import numpy as np
from PIL import Image, UnidentifiedImageError

from ..api import Explainer
from ..errors import LrpError
from .heatmaps import heatmap

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
NORMALIZE = {"imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))}


@dataclass(frozen=True)
class Preprocessing:
    """How a picture becomes a model input: size (H, W), channels, layout, scale, mean and std per channel."""
    size: tuple[int, int]
    channels: int
    order: str = "rgb"
    layout: str = "nchw"
    scale: float = 1 / 255
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)

    def picture(self, image: Image.Image) -> Image.Image:
        """Resize the shorter side to cover `size`, then crop the centre (gray or RGB as the model takes)."""
        image = image.convert("L" if self.channels == 1 else "RGB")
        height, width = self.size
        factor = max(height / image.height, width / image.width)
        resized = (max(width, round(image.width * factor)), max(height, round(image.height * factor)))
        if resized != image.size:
            image = image.resize(resized, Image.Resampling.BILINEAR)
        left, top = (image.width - width) // 2, (image.height - height) // 2
        return image.crop((left, top, left + width, top + height))

    def array(self, picture: Image.Image) -> np.ndarray:
        """The model input of one picture, without the batch axis."""
        values = np.asarray(picture, dtype=np.float64).reshape(*self.size, self.channels)
        if self.order == "bgr":
            values = values[..., ::-1]
        values = (values * self.scale - np.asarray(self.mean)) / np.asarray(self.std)
        return np.ascontiguousarray(values if self.layout == "nhwc" else values.transpose(2, 0, 1))


@dataclass
class Sample:
    """One output stem: where it came from, and how to read its model input(s) and the picture to overlay."""
    stem: str
    source: Path
    read: Callable[[], tuple[np.ndarray, Image.Image | None]]  # inputs [n, ...] and the picture (images only)


def collect(paths: Sequence[str]) -> list[Path]:
    """The files named, and the images and .npy files inside the folders named (sorted)."""
    files: list[Path] = []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES | {".npy"})
            if not found:
                raise LrpError(f"{path}: no images or .npy files in this folder")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise LrpError(f"{path}: no such file or folder")
    return files


def preprocessing(explainer: Explainer, size: tuple[int, int] | None, order: str, layout: str | None,
                  scale: float, mean: tuple[float, ...] | None, std: tuple[float, ...] | None) -> Preprocessing | None:
    """The preprocessing for pictures, from the model's input shape and the options (None: the model does not
    take pictures; images are then refused when read)."""
    shape = explainer.input_shape
    if len(shape) != 4:
        return None
    if layout is None:
        layout = "nhwc" if shape[3] in (1, 3) and shape[1] not in (1, 3) else "nchw"
    channels, height, width = (shape[1], shape[2], shape[3]) if layout == "nchw" else (shape[3], shape[1], shape[2])
    if channels not in (1, 3):
        return None
    if size is None:
        if not (isinstance(height, int) and isinstance(width, int)):
            raise LrpError(f"the model's input size is dynamic ({height} x {width}): give --size H,W")
        size = (height, width)
    elif any(isinstance(d, int) and d != s for d, s in zip((height, width), size)):
        raise LrpError(f"--size {size[0]},{size[1]}: the model takes {height} x {width}")
    for name, values in (("--mean", mean), ("--std", std)):
        if values is not None and len(values) not in (1, channels):
            raise LrpError(f"{name}: {len(values)} values for a model with {channels} channel(s)")
    if std is not None and any(v == 0 for v in std):
        raise LrpError("--std: values must not be zero")
    return Preprocessing(size, channels, order, layout, scale, mean or (0.0,), std or (1.0,))


def samples(files: Sequence[Path], explainer: Explainer, prep: Preprocessing | None) -> list[Sample]:
    """One Sample per output stem: images give one, an .npy of one sample one, an .npy batch [N, ...] N
    (STEM-0, STEM-1, ...). Every file is read and checked here; stems must not collide."""
    result: list[Sample] = []
    for path in files:
        if path.suffix.lower() == ".npy":
            batch = _read_array(path, explainer)
            if np.load(path, mmap_mode="r").ndim == len(explainer.input_shape) - 1:
                result.append(Sample(path.stem, path, lambda p=path: (_read_array(p, explainer), None)))
            else:
                result += [Sample(f"{path.stem}-{i}", path, lambda p=path, i=i: (_read_array(p, explainer, i), None))
                           for i in range(batch.shape[0])]
        else:
            _read_image(path, explainer, prep)
            result.append(Sample(path.stem, path, lambda p=path: _read_image(p, explainer, prep)))
    seen: dict[str, Path] = {}
    for sample in result:
        if sample.stem in seen:
            raise LrpError(f"{sample.source}: its output name '{sample.stem}' is taken by {seen[sample.stem]}; "
                           "rename one of them")
        seen[sample.stem] = sample.source
    return result


def _read_array(path: Path, explainer: Explainer, index: int | None = None) -> np.ndarray:
    """An .npy file as a batch: one sample (the input shape without the batch axis), a batch [N, ...], or
    sample `index` of that batch."""
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as error:
        raise LrpError(f"{path}: not a readable .npy array ({str(error).splitlines()[0]})") from None
    original = list(array.shape)
    if array.ndim == len(explainer.input_shape) - 1:
        array = array[None]
    elif index is not None:
        array = array[index:index + 1]
    try:
        return explainer.check_input(np.array(array), str(path))
    except LrpError:
        raise LrpError(f"{path}: shape {original} is neither one sample nor a batch of the model input "
                       f"'{explainer.input_name}' {explainer.shape_text}") from None


def _read_image(path: Path, explainer: Explainer, prep: Preprocessing | None) -> tuple[np.ndarray, Image.Image]:
    if prep is None:
        raise LrpError(f"{path}: the model input '{explainer.input_name}' {explainer.shape_text} does not take "
                       "pictures (give a preprocessed .npy array)")
    try:
        with Image.open(path) as opened:
            opened.load()
            picture = prep.picture(opened)
    except (OSError, UnidentifiedImageError, ValueError) as error:
        raise LrpError(f"{path}: not a readable image ({str(error).splitlines()[0]})") from None
    return explainer.check_input(prep.array(picture)[None], str(path)), picture


def batches(items: Sequence[Sample], size: int) -> Iterator[Sequence[Sample]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


@dataclass
class Result:
    """What one sample gave: its input, the picture (for images), logits and relevance."""
    sample: Sample
    x: np.ndarray
    picture: Image.Image | None
    logits: np.ndarray
    relevance: np.ndarray


def run(explainer: Explainer, items: Sequence[Sample], target: int | None, batch_size: int,
        progress: Callable[[Iterator], Iterator] = lambda it: it) -> Iterator[Result]:
    """Explain the samples batch by batch (the target class for all, or each one's predicted class)."""
    for group in progress(batches(items, batch_size)):
        read = [sample.read() for sample in group]
        x = np.concatenate([inputs for inputs, _ in read])
        logits, relevance = explainer.explain(x, target)
        for k, (sample, (_, picture)) in enumerate(zip(group, read)):
            yield Result(sample, x[k], picture, logits[k], relevance[k])


def describe(result: Result, explainer: Explainer, target: int | None) -> str:
    """The line printed for one sample: file, predicted class, explained class, its logit, relevance sum."""
    predicted = int(np.argmax(result.logits))
    explained = predicted if target is None or target < 0 else target
    named = lambda c: f"{c} ({explainer.label(c)})" if explainer.labels else str(c)  # noqa: E731
    sample = result.sample
    source = f"{sample.source}" + (f" [{sample.stem}]" if sample.stem != sample.source.stem else "")
    return (f"{source}: predicted {named(predicted)}, explained {named(explained)}, "
            f"logit {result.logits[explained]:.6g}, relevance sum {float(result.relevance.sum(dtype=np.float64)):.6g}")


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


class Staging:
    """A temporary folder beside OUTDIR whose files move into OUTDIR only when everything succeeded."""

    def __init__(self, outdir: Path):
        self.outdir = outdir
        if outdir.exists() and not outdir.is_dir():
            raise LrpError(f"{outdir}: exists and is not a folder")
        parent = outdir if outdir.is_dir() else outdir.resolve().parent
        if not parent.is_dir():
            raise LrpError(f"{outdir}: its parent folder does not exist")
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


def explain_inputs(model: str, inputs: Sequence[str], outdir: str, *, target: int | None = None,
                   batch_size: int = 16, device: str = "cpu", cmap: str = "bwr", overlay: bool = False,
                   size: str | None = None, normalize: str | None = None, mean: str | None = None,
                   std: str | None = None, scale: str = "1/255", channels: str = "rgb", layout: str | None = None,
                   labels_file: str | None = None, composite: str | None = None) -> list[str]:
    """The `explain` command: check every option and input, explain them, move the results into `outdir`;
    return the line to print per input. Options are the command line's strings."""
    if normalize and (mean or std):
        raise LrpError("--normalize sets --mean and --std: give one or the other")
    if normalize:
        mean_values, std_values = NORMALIZE[normalize]
    else:
        mean_values, std_values = _numbers("--mean", mean), _numbers("--std", std)
    size_values = _numbers("--size", size)
    if size_values is not None and (len(size_values) != 2 or any(v < 1 or v != int(v) for v in size_values)):
        raise LrpError(f"--size must be two positive integers H,W (got '{size}')")
    explainer = Explainer(model, device=device, composite=composite)
    if labels_file is not None:
        explainer.labels = _labels(labels_file, explainer.classes)
    if target is not None and not 0 <= target < explainer.classes:
        raise LrpError(f"--target {target}: out of range (the model has {explainer.classes} classes, "
                       f"0 to {explainer.classes - 1})")
    prep = preprocessing(explainer, tuple(int(v) for v in size_values) if size_values else None, channels,
                         layout, _fraction(scale), mean_values, std_values)
    files = collect(inputs)
    items = samples(files, explainer, prep)
    _keep_inputs(files, items, Path(outdir))
    staging = Staging(Path(outdir))
    lines = []
    try:
        count = -(-len(items) // batch_size)
        progress = (lambda it: _progress(it, count)) if count > 1 else (lambda it: it)
        for result in run(explainer, items, target, batch_size, progress):
            write(result, staging.folder, cmap, overlay, prep)
            lines.append(describe(result, explainer, target))
        staging.commit()
    finally:
        staging.discard()
    return lines


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


def _numbers(option: str, text: str | None) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise LrpError(f"{option} must be comma-separated numbers (got '{text}')") from None


def _fraction(text: str) -> float:
    """A number or a fraction such as 1/255."""
    try:
        top, _, bottom = text.partition("/")
        return float(top) / float(bottom) if bottom else float(top)
    except (ValueError, ZeroDivisionError):
        raise LrpError(f"--scale must be a number or a fraction such as 1/255 (got '{text}')") from None


def _labels(path: str, classes: int) -> list[str]:
    """Class names from a text file, one per line (blank lines skipped), exactly one per class."""
    try:
        names = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as error:
        raise LrpError(f"{path}: cannot read the labels ({getattr(error, 'strerror', None) or error})") from None
    if len(names) != classes:
        raise LrpError(f"{path}: {len(names)} labels for a model with {classes} classes")
    return names

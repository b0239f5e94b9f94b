"""One input reader for images and arrays, shared by `explain` and `check`: which files are inputs, how a picture
becomes a model input (resized by `--resize`, scaled, mean and std) and how an .npy array is read as a batch.

It knows the model input by its name, shape and dtype only (not by a session), and parses the preprocessing
options from the command line's strings.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Sequence

import numpy as np
import onnx
from PIL import Image, UnidentifiedImageError

from ..api import ModelInput
from ..errors import LrpError
from ..ir.files import first_line

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
ARRAY_SUFFIX = ".npy"
NORMALIZE = {"imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))}


def _crop(image: Image.Image, height: int, width: int) -> Image.Image:
    """Resize the shorter side to cover the size, then crop the centre (what is outside is lost)."""
    factor = max(height / image.height, width / image.width)
    resized = (max(width, round(image.width * factor)), max(height, round(image.height * factor)))
    if resized != image.size:
        image = image.resize(resized, Image.Resampling.BILINEAR)
    left, top = (image.width - width) // 2, (image.height - height) // 2
    return image.crop((left, top, left + width, top + height))


def _stretch(image: Image.Image, height: int, width: int) -> Image.Image:
    """Resize to the size, whatever the aspect ratio (everything is kept, distorted)."""
    return image if image.size == (width, height) else image.resize((width, height), Image.Resampling.BILINEAR)


def _pad(image: Image.Image, height: int, width: int) -> Image.Image:
    """Resize the longer side to fit the size, then centre the picture on black (pixel value 0) borders."""
    factor = min(height / image.height, width / image.width)
    fitted = _stretch(image, max(1, min(height, round(image.height * factor))),
                      max(1, min(width, round(image.width * factor))))
    canvas = Image.new(image.mode, (width, height))
    canvas.paste(fitted, ((width - fitted.width) // 2, (height - fitted.height) // 2))
    return canvas


# How a picture of another aspect ratio is brought to the model's size (--resize; `crop` is the default).
RESIZE = {"crop": _crop, "stretch": _stretch, "pad": _pad}


@dataclass(frozen=True)
class Options:
    """The preprocessing options as the user gave them, parsed; the model input settles the rest."""
    size: tuple[int, int] | None = None
    order: str = "rgb"
    layout: str | None = None
    scale: float = 1 / 255
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    resize: str = "crop"


def parse_options(size: str | None = None, normalize: str | None = None, mean: str | None = None,
                  std: str | None = None, scale: str = "1/255", channels: str = "rgb",
                  layout: str | None = None, resize: str = "crop") -> Options:
    """The preprocessing options from the command line's strings, checked before any model is loaded."""
    if normalize and (mean or std):
        raise LrpError("--normalize sets --mean and --std: give one or the other")
    if normalize:
        mean_values, std_values = NORMALIZE[normalize]
    else:
        mean_values, std_values = _numbers("--mean", mean), _numbers("--std", std)
    size_values = _numbers("--size", size)
    if size_values is not None and (len(size_values) != 2 or any(v < 1 or v != int(v) for v in size_values)):
        raise LrpError(f"--size must be two positive integers H,W (got '{size}')")
    if resize not in RESIZE:
        raise LrpError(f"--resize must be one of {', '.join(RESIZE)} (got '{resize}')")
    return Options(tuple(int(v) for v in size_values) if size_values else None, channels, layout,
                   _fraction(scale), mean_values, std_values, resize)


@dataclass(frozen=True)
class Preprocessing:
    """How a picture becomes a model input: size (H, W), channels, layout, scale, mean and std per channel, and
    how another aspect ratio is resized (RESIZE)."""
    size: tuple[int, int]
    channels: int
    order: str = "rgb"
    layout: str = "nchw"
    scale: float = 1 / 255
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    resize: str = "crop"

    def picture(self, image: Image.Image) -> Image.Image:
        """The picture at the model's size (gray or RGB as the model takes), resized as `resize` says."""
        return RESIZE[self.resize](image.convert("L" if self.channels == 1 else "RGB"), *self.size)

    def array(self, picture: Image.Image) -> np.ndarray:
        """The model input of one picture, without the batch axis."""
        values = np.asarray(picture, dtype=np.float64).reshape(*self.size, self.channels)
        if self.order == "bgr":
            values = values[..., ::-1]
        values = (values * self.scale - np.asarray(self.mean)) / np.asarray(self.std)
        return np.ascontiguousarray(values if self.layout == "nhwc" else values.transpose(2, 0, 1))


def preprocessing(model_input: ModelInput, options: Options) -> Preprocessing | None:
    """The preprocessing for pictures, from the model input's shape and the options (None: the model does not
    take pictures; images are then refused when read)."""
    shape = model_input.shape
    if len(shape) != 4:
        return None
    layout = options.layout
    if layout is None:
        layout = "nhwc" if shape[3] in (1, 3) and shape[1] not in (1, 3) else "nchw"
    channels, height, width = (shape[1], shape[2], shape[3]) if layout == "nchw" else (shape[3], shape[1], shape[2])
    if channels not in (1, 3):
        return None
    size = options.size
    if size is None:
        if not (isinstance(height, int) and isinstance(width, int)):
            raise LrpError(f"the model's input size is dynamic ({height} x {width}): give --size H,W")
        size = (height, width)
    elif any(isinstance(d, int) and d != s for d, s in zip((height, width), size)):
        raise LrpError(f"--size {size[0]},{size[1]}: the model takes {height} x {width}")
    for name, values in (("--mean", options.mean), ("--std", options.std)):
        if values is not None and len(values) not in (1, channels):
            raise LrpError(f"{name}: {len(values)} values for a model with {channels} channel(s)")
    if options.std is not None and any(v == 0 for v in options.std):
        raise LrpError("--std: values must not be zero")
    return Preprocessing(size, channels, options.order, layout, options.scale, options.mean or (0.0,),
                         options.std or (1.0,), options.resize)


def collect(paths: Sequence[str], suffixes: set[str] | None = None, kinds: str = "images or .npy files",
            leave_out: Path | None = None) -> list[Path]:
    """The files named, and the files of `suffixes` (default: images and .npy files) inside the folders named,
    sorted; with `leave_out` (an output folder), recursively and without the files under it."""
    suffixes = suffixes or IMAGE_SUFFIXES | {ARRAY_SUFFIX}
    out = leave_out.resolve() if leave_out is not None else None
    files: list[Path] = []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            if out is not None and (out == path.resolve() or out in path.resolve().parents):
                raise LrpError(f"{leave_out}: the output folder is inside the input folder {path}; choose another")
            inside = path.iterdir() if out is None else (p for p in path.rglob("*") if out not in p.resolve().parents)
            found = sorted(p for p in inside if p.is_file() and p.suffix.lower() in suffixes
                           and not (out is not None and p.name.startswith(".")))
            if not found:
                raise LrpError(f"{path}: no {kinds} in this folder")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise LrpError(f"{path}: no such file or folder")
    return files


def is_array(path: Path) -> bool:
    """Whether a file is read as an .npy array; every other file is read as an image."""
    return path.suffix.lower() == ARRAY_SUFFIX


def read_batch(path: Path, model_input: ModelInput, options: Options) -> np.ndarray:
    """One file as a batch of model inputs: an .npy array (one sample or a batch) or a preprocessed image."""
    if not path.is_file():
        raise LrpError(f"{path}: no such file")
    if is_array(path):
        return read_array(path, model_input)
    return read_image(path, model_input, preprocessing(model_input, options))[0]


def read_array(path: Path, model_input: ModelInput, index: int | None = None) -> np.ndarray:
    """An .npy file as a batch: one sample (the input shape without the batch axis), a batch [N, ...], or
    sample `index` of that batch."""
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as error:
        raise LrpError(f"{path}: not a readable .npy array ({first_line(error)})") from None
    original = list(array.shape)
    if array.ndim == len(model_input.shape) - 1:
        array = array[None]
    elif index is not None:
        array = array[index:index + 1]
    try:
        return model_input.fit(np.array(array), str(path))
    except LrpError:
        raise LrpError(f"{path}: shape {original} is neither one sample nor a batch of the model input "
                       f"'{model_input.name}' {model_input.shape_text}") from None


def read_image(path: Path | BinaryIO, model_input: ModelInput, prep: Preprocessing | None,
               name: str | None = None) -> tuple[np.ndarray, Image.Image]:
    """An image (a file, or encoded bytes that messages call `name`) as a batch of one model input, and the picture
    it was cropped to (for overlays)."""
    where = name or str(path)
    if prep is None:
        raise LrpError(f"{where}: the model input '{model_input.name}' {model_input.shape_text} does not take "
                       "pictures (give a preprocessed .npy array)")
    try:
        with Image.open(path) as opened:
            opened.load()
            picture = prep.picture(opened)
    except (OSError, UnidentifiedImageError, ValueError) as error:
        raise LrpError(f"{where}: not a readable image ({first_line(error)})") from None
    return model_input.fit(prep.array(picture)[None], where), picture


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


def token_tables(model: onnx.ModelProto) -> dict[str, int]:
    """The integer inputs of a text model that look up rows of a float embedding table (Gather on axis 0), with the
    table's number of rows (the vocabulary for token ids)."""
    graph_inputs = {i.name for i in model.graph.input
                    if np.issubdtype(onnx.helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type), np.integer)}
    tables = {t.name: t.dims[0] for t in model.graph.initializer
              if t.dims and np.issubdtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type), np.floating)}
    return {node.input[1]: tables[node.input[0]] for node in model.graph.node
            if node.op_type == "Gather" and node.input[1:2] and node.input[1] in graph_inputs
            and node.input[0] in tables and all(a.i == 0 for a in node.attribute if a.name == "axis")}

"""`onnxlrp check`: run a model built with --layer-relevance and show, per linear layer in data-flow order, where
relevance is kept, absorbed (by biases and stabilizers: the layer's upper sum minus its lower sum) or negative."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from ..errors import LrpError
from ..ir.files import first_line, load
from ..lrp.layers import recorded
from ..lrp.seed import explained_value

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
SEED = 0


def check(model_path: str, input_path: str | None = None, target: int | None = None) -> str:
    """The report as text: one table per sample, ending with the input's total against the explained value."""
    model = load(model_path)
    info = recorded(model, model_path)
    x_info = next((i for i in model.graph.input if i.name == info["input"]), None)
    if x_info is None:
        raise LrpError(f"{model_path}: the recorded input '{info['input']}' is not an input of the model")
    notes = []
    if input_path is None:
        x = random_input(x_info, model_path)
        notes.append(f"no --input: a deterministic random input (standard normal, seed {SEED}) "
                     f"of shape {list(x.shape)}")
    else:
        x = read_input(input_path, x_info)
    layers = info["layers"]
    names = [info["logits"], info["relevance"]] + [layer["output"] for layer in layers] + \
        [layer["upper"] for layer in layers]
    session = _session(model, names, model_path)
    feeds = {x_info.name: x, info["target"]: np.full(len(x), -1, dtype=np.int64)}  # -1: the predicted class
    if target is not None:
        classes = next(o.shape[1] for o in session.get_outputs() if o.name == info["logits"])
        if isinstance(classes, int) and not 0 <= target < classes:
            raise LrpError(f"--target {target}: the model has {classes} classes")
        feeds[info["target"]] = np.full(len(x), target, dtype=np.int64)
    try:
        logits, relevance, *rest = session.run(names, feeds)
    except Exception as error:  # onnxruntime raises several types
        raise LrpError(f"{model_path}: could not run on the input ({first_line(error)})") from None
    lowers, uppers = rest[:len(layers)], rest[len(layers):]
    lines = notes
    for sample in range(len(x)):
        lines += _sample_report(sample, info, layers, logits[sample], relevance[sample],
                                [r[sample] for r in lowers], [u[sample] for u in uppers], target)
    return "\n".join(lines)


def _sample_report(sample: int, info: dict, layers: list[dict], logits, relevance, lowers, uppers,
                   target: int | None) -> list[str]:
    chosen = int(np.argmax(logits)) if target is None or target < 0 else target
    what, value = explained_value(info["explain"], logits, chosen)
    how = "predicted" if target is None or target < 0 else "--target"
    lines = [f"sample {sample}: class {chosen} ({how}), {what} {value:.6g}"]
    width = max([len("layer")] + [len(layer["node"]) for layer in layers])
    lines.append(f"  {'layer':<{width}}  {'op':<13} {'rule':<10} {'relevance':>12} {'absorbed':>12} {'negative':>9}")
    for layer, lower, upper in zip(layers, lowers, uppers):
        total = float(np.sum(lower, dtype=np.float64))
        absorbed = float(np.sum(upper, dtype=np.float64)) - total
        lines.append(f"  {layer['node']:<{width}}  {layer['op']:<13} {layer['rule']:<10} {total:>12.6g} "
                     f"{absorbed:>12.6g} {negative_share(lower):>8.1%}")
    total = float(np.sum(relevance, dtype=np.float64))
    ratio = f" ({total / value:.1%})" if value else ""
    lines.append(f"  input relevance {total:.6g} against the {what} {value:.6g}{ratio}")
    return lines


def negative_share(relevance: np.ndarray) -> float:
    """The share of the relevance's absolute mass that is negative."""
    magnitude = float(np.sum(np.abs(relevance), dtype=np.float64))
    return (0.0 - float(np.sum(np.minimum(relevance, 0), dtype=np.float64))) / magnitude if magnitude else 0.0


def random_input(value: onnx.ValueInfoProto, source: str) -> np.ndarray:
    """A standard-normal input of the model's input shape, batch 1 where the batch size is not fixed."""
    dims = _dims(value)
    if any(d is None for d in dims[1:]):
        raise LrpError(f"{source}: input '{value.name}' has dynamic dimensions {_shown(dims)}; give --input")
    shape = [dims[0] or 1] + dims[1:]
    return np.random.default_rng(SEED).standard_normal(shape).astype(_dtype(value))


def read_input(path: str, value: onnx.ValueInfoProto) -> np.ndarray:
    """A .npy array (with or without the batch axis) or an image, resized to the model's size and scaled by 1/255."""
    dims = _dims(value)
    if not Path(path).is_file():
        raise LrpError(f"{path}: no such file")
    if path.lower().endswith(IMAGE_SUFFIXES):
        x = _image(path, dims)
    else:
        try:
            x = np.load(path, allow_pickle=False)
        except Exception as error:  # numpy raises several types for files that are not .npy
            raise LrpError(f"{path}: not a .npy array ({first_line(error)})") from None
    if x.ndim == len(dims) - 1:
        x = x[None]
    fits = x.ndim == len(dims) and all(d is None or d == s for d, s in zip(dims[1:], x.shape[1:]))
    if not fits:
        raise LrpError(f"{path}: shape {list(x.shape)} does not fit input '{value.name}' {_shown(dims)}")
    return x.astype(_dtype(value))


def _image(path: str, dims: list[int | None]) -> np.ndarray:
    """The image as [C, H, W] (or [H, W, C] when the input's last axis holds the 1 or 3 channels)."""
    from PIL import Image, UnidentifiedImageError
    if len(dims) != 4:
        raise LrpError(f"{path}: an image needs a model input of rank 4 (got {_shown(dims)})")
    last = dims[3] in (1, 3) and dims[1] not in (1, 3)
    channels, height, width = (dims[3], dims[1], dims[2]) if last else (dims[1], dims[2], dims[3])
    if channels not in (1, 3):
        raise LrpError(f"{path}: an image needs an input with 1 or 3 channels (got {_shown(dims)})")
    try:
        image = Image.open(path).convert("L" if channels == 1 else "RGB")
    except (OSError, UnidentifiedImageError) as error:
        raise LrpError(f"{path}: not a readable image ({first_line(error)})") from None
    if height and width:
        image = image.resize((width, height), Image.BILINEAR)
    pixels = np.asarray(image, dtype=np.float32).reshape(image.height, image.width, channels) / 255.0
    return pixels if last else pixels.transpose(2, 0, 1)


def _session(model: onnx.ModelProto, names: list[str], source: str) -> ort.InferenceSession:
    """A session whose outputs include the internal tensors the metadata names."""
    declared = {o.name for o in model.graph.output}
    produced = {t for node in model.graph.node for t in node.output}
    missing = [n for n in names if n not in declared and n not in produced]
    if missing:
        raise LrpError(f"{source}: the recorded tensor(s) {', '.join(missing)} are not in the graph")
    elem_type = next(o.type.tensor_type.elem_type for o in model.graph.output if o.name == names[1])
    for name in dict.fromkeys(names):
        if name not in declared:
            model.graph.output.append(onnx.helper.make_tensor_value_info(name, elem_type, None))
    try:
        return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    except Exception as error:  # onnxruntime raises several types
        raise LrpError(f"{source}: ONNX Runtime cannot load the model ({first_line(error)})") from None


def _dims(value: onnx.ValueInfoProto) -> list[int | None]:
    return [d.dim_value if d.HasField("dim_value") else None for d in value.type.tensor_type.shape.dim]


def _shown(dims: list[int | None]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"


def _dtype(value: onnx.ValueInfoProto) -> np.dtype:
    return onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)

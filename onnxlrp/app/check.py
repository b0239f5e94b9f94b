"""`onnxlrp check`: run a model built with --layer-relevance and show, per linear layer in data-flow order, where
relevance is kept, absorbed (by biases and stabilizers: the layer's upper sum minus its lower sum) or negative."""
from __future__ import annotations

import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from ..api import batch_note, fixed_batch, in_batches, open_session, with_outputs
from ..errors import LrpError, LrpWarning
from ..ir.files import first_line, load
from ..lrp.layers import recorded
from ..lrp.seed import Recorded, chosen_classes, explained_value
from .inputs import ModelInput, Options, read_batch, token_tables

SEED = 0


def check(model_path: str, input_path: str | None = None, target: int | None = None,
          options: Options = Options()) -> str:
    """The report as text: one table per sample, ending with the input's total against the explained value.
    `input_path` is read as `explain` reads its inputs, images preprocessed as `options` say. A model with a fixed
    batch size runs in chunks of it; a total far beyond the explained value is an LrpWarning."""
    model = load(model_path)
    info = recorded(model, model_path)
    x_input, feeds, notes = _feeds(model, info, input_path, options, model_path)
    x = feeds[x_input.name]
    layers = info["layers"]
    names = [info["logits"], info["relevance"]] + [layer["output"] for layer in layers] + \
        [layer["upper"] for layer in layers]
    session = _session(model, names, model_path)
    classes = next(o.shape[1] for o in session.get_outputs() if o.name == info["logits"])
    try:
        chosen = chosen_classes(target, len(x), classes if isinstance(classes, int) else np.iinfo(np.int64).max)
    except LrpError:
        raise LrpError(f"--target {target}: the model has {classes} classes") from None
    batch = fixed_batch(x_input)
    if batch is not None and len(x) != batch:
        warnings.warn(batch_note(model_path, batch), LrpWarning)
    try:
        logits, relevance, *rest = in_batches(lambda chunk: session.run(names, chunk),
                                              {**feeds, info["target"]: chosen}, batch)  # -1: the predicted class
    except Exception as error:  # onnxruntime raises several types
        raise LrpError(f"{model_path}: could not run on the input ({first_line(error)})") from None
    lowers, uppers = rest[:len(layers)], rest[len(layers):]
    explained = np.where(chosen < 0, logits.argmax(axis=1), chosen)
    values = [explained_value(info["explain"], row, int(c)) for row, c in zip(logits, explained)]
    lines = notes
    for sample, (c, value) in enumerate(zip(explained, values)):
        lines += _sample_report(sample, int(c), target, value, layers, relevance[sample],
                                [r[sample] for r in lowers], [u[sample] for u in uppers])
    inflation = replace(Recorded.of(model), explain=info["explain"]).inflation(
        [float(np.sum(r, dtype=np.float64)) for r in relevance], [v for _, v in values])
    if inflation is not None:
        warnings.warn(f"{model_path}: {inflation}", LrpWarning)
    return "\n".join(lines)


def _feeds(model: onnx.ModelProto, info: dict, input_path: str | None, options: Options, source: str
           ) -> tuple[ModelInput, dict[str, np.ndarray], list[str]]:
    """The explained model input, the feeds of every input but `target`, and the notes that say what was fed."""
    defaults = {t.name for t in model.graph.initializer} | {info["target"]}
    inputs = {i.name: _model_input(i) for i in model.graph.input if i.name not in defaults}
    if info["input"] not in inputs:
        raise LrpError(f"{source}: the recorded input '{info['input']}' is not an input of the model")
    x_input = inputs.pop(info["input"])
    notes = []
    if input_path is None:
        x = random_input(x_input, source, token_tables(model).get(x_input.name))
        what = "token ids, uniform" if np.issubdtype(x.dtype, np.integer) else "standard normal"
        notes.append(f"no --input: a deterministic random input ({what}, seed {SEED}) of shape {list(x.shape)}")
    else:
        x = read_batch(Path(input_path), x_input, options)
    others = {name: _filler(other, x, source) for name, other in inputs.items()}
    if others:
        notes.append("other inputs: " + ", ".join(f"{name} = {int(value.flat[0]) if value.size else 0}"
                                                 for name, value in others.items()))
    return x_input, {x_input.name: x, **others}, notes


def _sample_report(sample: int, chosen: int, target: int | None, explained: tuple[str, float], layers: list[dict],
                   relevance, lowers, uppers) -> list[str]:
    what, value = explained
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


def random_input(model_input: ModelInput, source: str, vocabulary: int | None = None) -> np.ndarray:
    """A standard-normal input of the model's input shape (token ids: uniform below `vocabulary`), batch 1 where
    the batch size is not fixed."""
    dims = list(model_input.shape)
    if any(d is None for d in dims[1:]):
        raise LrpError(f"{source}: input '{model_input.name}' has dynamic dimensions {model_input.shape_text}; "
                       "give --input")
    shape = [dims[0] or 1] + dims[1:]
    rng = np.random.default_rng(SEED)
    if vocabulary is not None:
        return rng.integers(0, vocabulary, size=shape).astype(model_input.dtype)
    return rng.standard_normal(shape).astype(model_input.dtype)


def _filler(model_input: ModelInput, x: np.ndarray, source: str) -> np.ndarray:
    """The value of a model input that is not explained (a text model's attention mask: 1, every token; other
    integer inputs such as token type ids: 0), in the explained input's shape."""
    if not np.issubdtype(model_input.dtype, np.integer) or len(model_input.shape) != x.ndim:
        raise LrpError(f"{source}: check feeds only the explained input and integer inputs of its shape "
                       f"(masks, token types), not '{model_input.name}' {model_input.shape_text}")
    return np.full(x.shape, int("mask" in model_input.name.lower()), dtype=model_input.dtype)


def _session(model: onnx.ModelProto, names: list[str], source: str) -> ort.InferenceSession:
    """A session whose outputs include the internal tensors the metadata names."""
    try:
        return open_session(with_outputs(model, names, source))
    except LrpError:
        raise
    except Exception as error:  # onnxruntime raises several types
        raise LrpError(f"{source}: ONNX Runtime cannot load the model ({first_line(error)})") from None


def _model_input(value: onnx.ValueInfoProto) -> ModelInput:
    """The recorded input as the reader takes it: its name, shape (None where dynamic) and dtype."""
    dims = tuple(d.dim_value if d.HasField("dim_value") else None for d in value.type.tensor_type.shape.dim)
    return ModelInput(value.name, dims, onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type))

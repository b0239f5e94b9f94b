"""Layers that move relevance without a rule: elementwise activations, reshaping, transposes, slicing and
concatenation (arithmetic is in elementwise.py)."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .graph import constant
from .ops import Ops, Tensor
from .registry import Context, Unsupported, computed, family, floating

ACTIVATIONS = ("Relu", "LeakyRelu", "PRelu", "Elu", "Selu", "Celu", "Gelu", "Sigmoid", "HardSigmoid", "Tanh",
               "Clip", "HardSwish", "Softplus", "Softsign", "Mish", "ThresholdedRelu")
RESHAPES = ("Reshape", "Flatten", "Squeeze", "Unsqueeze")


def _first_only(relevance: Tensor, node: gs.Node) -> list[Tensor | None]:
    return [relevance] + [None] * (len(node.inputs) - 1)


@family("activation", ACTIVATIONS + ("Identity", "Dropout", "BatchNormalization"), ("pass",))
def emit_pass(ctx: Context, node: gs.Node, relevance: Sequence[Tensor | None]) -> list[Tensor | None]:
    """Elementwise layers (and BatchNormalization that could not be folded) pass relevance unchanged."""
    return _first_only(relevance[0], node)


@family("cast", ("Cast",), ("pass",))
def emit_cast(ctx: Context, node: gs.Node, relevance: Sequence[Tensor | None]) -> list[Tensor | None]:
    """Relevance passes, in the type of the cast's input (a double model input cast to float)."""
    source = node.inputs[0]
    if not floating(source):
        raise Unsupported("a Cast from a non-float type carries no relevance")
    dtype = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(source.dtype))
    return [ctx.ops("Cast", relevance[0], to=dtype)]


@family("reshape", RESHAPES, ("pass",))
def emit_reshape(ctx: Context, node: gs.Node, relevance: Sequence[Tensor | None]) -> list[Tensor | None]:
    return _first_only(ctx.ops.reshape_like(relevance[0], node.inputs[0]), node)


@family("transpose", ("Transpose",), ("pass",))
def emit_transpose(ctx: Context, node: gs.Node, relevance: Sequence[Tensor | None]) -> list[Tensor | None]:
    perm = node.attrs.get("perm")
    if perm is None:
        perm = list(range(len(node.inputs[0].shape)))[::-1]
    return [ctx.ops("Transpose", relevance[0], perm=[int(i) for i in np.argsort(perm)])]


@family("concat", ("Concat",), ("pass",))
def emit_concat(ctx: Context, node: gs.Node, relevance: Sequence[Tensor | None]) -> list[Tensor | None]:
    """Each input gets back the slice of the relevance that it contributed (bounds read at run time where
    the sizes along the axis are not static, e.g. a cls token expanded to a computed shape)."""
    axis = node.attrs["axis"]
    sizes = [t.shape[axis] if t.shape is not None else None for t in node.inputs]
    if all(isinstance(s, int) for s in sizes):
        starts = np.cumsum([0] + sizes)
        return [ctx.ops.slice(relevance[0], [int(b)], [int(e)], [axis]) if computed(t) else None
                for t, b, e in zip(node.inputs, starts[:-1], starts[1:])]
    ops = ctx.ops
    if node.inputs[0].shape is None:
        raise Unsupported("Concat needs the rank of its inputs")
    axis %= len(node.inputs[0].shape)
    bounds, lower = [ops.ints([0])], []
    for tensor in node.inputs:
        bounds.append(ops("Add", bounds[-1], ops.slice(ops("Shape", tensor), [axis], [axis + 1], [0])))
        lower.append(ops("Slice", relevance[0], bounds[-2], bounds[-1], ops.ints([axis])) if computed(tensor)
                     else None)
    return lower


def _static_dims(tensor: Tensor, what: str) -> list[int]:
    shape = tensor.shape
    if shape is None or any(not isinstance(d, int) for d in shape[1:]):
        raise Unsupported(f"{what} needs static non-batch dimensions")
    return list(shape)


def _constant_ints(node: gs.Node, index: int, what: str) -> list[int] | None:
    if len(node.inputs) <= index or not node.inputs[index].name:
        return None
    values = constant(node.inputs[index])
    if values is None:
        raise Unsupported(f"{what} must be constant")
    return [int(v) for v in np.atleast_1d(values)]


def _zeros_like(ops: Ops, tensor: Tensor) -> Tensor:
    return ops("ConstantOfShape", ops("Shape", tensor))


@family("slice", ("Slice",), ("pass",))
def emit_slice(ctx: Context, node: gs.Node, relevance: Sequence[Tensor | None]) -> list[Tensor | None]:
    """The sliced relevance goes back where it was taken from; the rest of the input gets zero."""
    shape = _static_dims(node.inputs[0], "Slice")
    starts, ends = _constant_ints(node, 1, "Slice starts"), _constant_ints(node, 2, "Slice ends")
    axes = _constant_ints(node, 3, "Slice axes") or list(range(len(starts)))
    steps = _constant_ints(node, 4, "Slice steps") or [1] * len(starts)
    rank = len(shape)
    if any(axis % rank == 0 for axis in axes):
        raise Unsupported("Slice along the batch axis is not supported")
    if any(step != 1 for step in steps):  # strided or reversed: each axis's taken positions, put back in turn
        lower = relevance[0]
        for start, end, axis, step in zip(starts, ends, axes, steps):
            positions = range(*slice(start, end, step).indices(shape[axis % rank]))
            lower = _put_back(ctx.ops, lower, axis % rank, np.array(positions, dtype=np.int64), shape)
        return [lower] + [None] * (len(node.inputs) - 1)
    pads = [0] * (2 * rank)
    for start, end, axis in zip(starts, ends, axes):
        axis %= rank
        size = shape[axis]
        start, end = (min(max(v + size if v < 0 else v, 0), size) for v in (start, end))
        pads[axis], pads[rank + axis] = start, size - max(end, start)
    lower = ctx.ops("Pad", relevance[0], ctx.ops.ints(pads))
    return [lower] + [None] * (len(node.inputs) - 1)


def _put_back(ops: Ops, relevance: Tensor, axis: int, positions: np.ndarray, shape: list) -> Tensor:
    """Relevance of the elements taken at `positions` along `axis` returned to their places in an axis of
    `shape[axis]` elements (repeated positions add up), as a product with a one-hot matrix."""
    selection = np.zeros((positions.size, shape[axis]))
    selection[np.arange(positions.size), positions] = 1
    to_last = [a for a in range(len(shape)) if a != axis] + [axis]
    moved = ops("MatMul", ops("Transpose", relevance, perm=to_last), ops.const(selection))
    return ops("Transpose", moved, perm=[int(i) for i in np.argsort(to_last)])


@family("split", ("Split",), ("pass",))
def emit_split(ctx: Context, node: gs.Node, relevance: Sequence[Tensor | None]) -> list[Tensor | None]:
    """The relevance of the parts, concatenated back (zeros for parts nothing explained)."""
    parts = [r if r is not None else _zeros_like(ctx.ops, out) for r, out in zip(relevance, node.outputs)]
    lower = ctx.ops("Concat", *parts, axis=node.attrs.get("axis", 0))
    return [lower] + [None] * (len(node.inputs) - 1)


@family("pad", ("Pad",), ("pass",))
def emit_pad(ctx: Context, node: gs.Node, relevance: Sequence[Tensor | None]) -> list[Tensor | None]:
    """Relevance of the padding is dropped; the input gets the relevance of its own positions."""
    mode = node.attrs.get("mode", "constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    pads = _constant_ints(node, 1, "Pad pads")
    axes = _constant_ints(node, 3, "Pad axes")
    if mode != "constant" or any(p < 0 for p in pads):
        raise Unsupported(f"Pad in {mode} mode or with negative pads is not supported")
    shape = _static_dims(node.inputs[0], "Pad")
    half = len(pads) // 2
    axes = [a % len(shape) for a in axes] if axes else list(range(half))
    padded = [(a, pads[i]) for i, a in enumerate(axes) if pads[i] or pads[half + i]]
    if any(a == 0 for a, _ in padded):
        raise Unsupported("Pad along the batch axis is not supported")
    lower = ctx.ops.slice(relevance[0], [p for _, p in padded], [p + shape[a] for a, p in padded],
                          [a for a, _ in padded]) if padded else relevance[0]
    return [lower] + [None] * (len(node.inputs) - 1)


@family("gather", ("Gather",), ("pass",))
def emit_gather(ctx: Context, node: gs.Node, relevance: Sequence[Tensor | None]) -> list[Tensor | None]:
    """Gather of constant indices along one axis: each gathered element's relevance returns to its source
    (repeated indices add up), as a product with a one-hot matrix; one index along an axis whose length is only
    known at run time (BERT's pooler on a text of any length) pads the relevance around it."""
    indices = constant(node.inputs[1])
    shape = node.inputs[0].shape
    if indices is None or indices.ndim > 1 or shape is None:
        raise Unsupported("Gather needs constant scalar or 1-D indices and an input of known rank")
    axis = node.attrs.get("axis", 0) % len(shape)  # any axis: torch's attention packs q, k, v along the first
    upper = ctx.ops.unsqueeze(relevance[0], [axis]) if indices.ndim == 0 else relevance[0]
    if isinstance(shape[axis], int):
        return [_put_back(ctx.ops, upper, axis, np.atleast_1d(indices) % shape[axis], list(shape)), None]
    if indices.ndim != 0:
        raise Unsupported("Gather of several indices needs a static length along its axis")
    return [_pad_around(ctx.ops, upper, node.inputs[0], axis, int(indices)), None]


def _pad_around(ops: Ops, relevance: Tensor, source: Tensor, axis: int, index: int) -> Tensor:
    """Relevance of one position (size 1 along `axis`) placed at `index` of `source`'s axis, zeros around it."""
    length = ops.slice(ops("Shape", source), [axis], [axis + 1], [0])
    before = ops.ints([index]) if index >= 0 else ops("Add", length, ops.ints([index]))
    after = ops("Sub", ops("Sub", length, before), ops.ints([1]))
    rank = len(source.shape)  # pads: [0] * axis, before, [0] * (rank - 1), after, [0] * (rank - axis - 1)
    parts = [ops.ints([0] * axis), before, ops.ints([0] * (rank - 1)), after, ops.ints([0] * (rank - axis - 1))]
    pads = ops("Concat", *[p for p in parts if not isinstance(p, gs.Constant) or p.values.size], axis=0)
    return ops("Pad", relevance, pads)

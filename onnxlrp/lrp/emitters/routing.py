"""Layers that move relevance by their gradient, whatever the rule: elementwise activations, reshaping, transposes,
slicing and concatenation, gathers, broadcasts and selections, and the dequantization of an integer input."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ...canonical.patterns import ACTIVATION, SOFT_CAP
from ...ir.graph import constant, floating, static
from ...ir.ops import Ops, Tensor
from ..facts import computed
from ..families import Context, Family, Unsupported, family
from ..rules import Layer, Routing, Rule
from .arithmetic import unbroadcast

# The gradient of a node: relevance per output -> relevance per input.
Gradient = Callable[[Ops, gs.Node, Sequence[Tensor | None]], list[Tensor | None]]


@dataclass
class Routed(Routing):
    """A node whose relevance follows its gradient (docs/lrp.md §4: the `pass` rule)."""
    node: gs.Node
    gradient: Gradient

    def route(self, ops: Ops, rule: Rule, relevance: Sequence[Tensor | None]) -> list[Tensor | None]:
        return self.gradient(ops, self.node, relevance)


def routes(name: str, op_types: Sequence[str], **options) -> Callable[[Gradient], Family]:
    """Declare the decorated gradient as the family of `op_types`, under the one rule `pass`."""
    def declare(gradient: Gradient) -> Family:
        def describe(ctx: Context, node: gs.Node) -> Layer:
            return Routed(node, gradient)
        return family(name, op_types, ("pass",), **options)(describe)
    return declare

ACTIVATIONS = ("Relu", "LeakyRelu", "PRelu", "Elu", "Selu", "Celu", "Gelu", "Sigmoid", "HardSigmoid", "Tanh",
               "Clip", "HardSwish", "Softplus", "Softsign", "Mish", "ThresholdedRelu", ACTIVATION)
QDQ = ("QuantizeLinear", "DequantizeLinear")
RESHAPES = ("Reshape", "Flatten", "Squeeze", "Unsqueeze")
# Elementwise layers whose output is 0 exactly where their input is.
ZERO_PRESERVING = ("Relu", "LeakyRelu", "Identity", "Dropout")


def _first_only(relevance: Tensor, node: gs.Node) -> list[Tensor | None]:
    return [relevance] + [None] * (len(node.inputs) - 1)


@routes("activation", ACTIVATIONS + ("Identity", "Dropout", "BatchNormalization"),
        zeros=lambda node, rule: "routed" if node.op in ZERO_PRESERVING else None)
def activation(ops: Ops, node: gs.Node, relevance: Sequence[Tensor | None]) -> list[Tensor | None]:
    """Elementwise layers (and BatchNormalization that could not be folded) pass relevance unchanged."""
    return _first_only(relevance[0], node)


@routes("soft-capping", (SOFT_CAP,), zeros="kept")
def soft_capping(ops: Ops, node: gs.Node, relevance: Sequence[Tensor | None]) -> list[Tensor | None]:
    """y = cap * tanh(x / cap) (canonical/patterns.py) follows its gradient times its input, R_x = x (1 - t^2) R / y
    with t = y / cap (0 where y is 0): LXT patches the activation of an MLP (the identity rule, as the activations
    above) but not this Tanh, so its gradient reaches the scores and the logits."""
    x, y = node.inputs[0], node.outputs[0]
    t = ops("Div", y, ops.scalar(node.attrs["cap"]))
    slope = ops("Sub", ops.scalar(1.0), ops("Mul", t, t))
    return [ops("Mul", x, ops("Mul", slope, ops.divide_stabilized(relevance[0], y, 0.0)))]


@routes("negation", ("Neg",), zeros="routed")
def negation(ops: Ops, node: gs.Node, relevance: Sequence[Tensor | None]) -> list[Tensor | None]:
    """-x is a linear layer of weight -1 (a rotary embedding's half turn): under LRP-0 relevance passes."""
    return _first_only(relevance[0], node)


@routes("quantize", QDQ)
def quantize(ops: Ops, node: gs.Node, relevance: Sequence[Tensor | None]) -> list[Tensor | None]:
    """Quantizing and dequantizing changes values by rounding only: relevance passes. (Quantized models are explained
    on their float twin, canonical/quantized.py; what stays is the DequantizeLinear of an integer model input.)"""
    return _first_only(relevance[0], node)


@routes("cast", ("Cast",), zeros="routed")
def cast(ops: Ops, node: gs.Node, relevance: Sequence[Tensor | None]) -> list[Tensor | None]:
    """Relevance passes, in the type of the cast's input (a double model input cast to float)."""
    source = node.inputs[0]
    if not floating(source):
        raise Unsupported("a Cast from a non-float type carries no relevance")
    dtype = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(source.dtype))
    return [ops("Cast", relevance[0], to=dtype)]


@routes("reshape", RESHAPES, zeros="routed")
def reshape(ops: Ops, node: gs.Node, relevance: Sequence[Tensor | None]) -> list[Tensor | None]:
    return _first_only(ops.reshape_like(relevance[0], node.inputs[0]), node)


@routes("transpose", ("Transpose",), zeros="routed")
def transpose(ops: Ops, node: gs.Node, relevance: Sequence[Tensor | None]) -> list[Tensor | None]:
    perm = node.attrs.get("perm")
    if perm is None:
        perm = list(range(len(node.inputs[0].shape)))[::-1]
    return [ops("Transpose", relevance[0], perm=[int(i) for i in np.argsort(perm)])]


@routes("concat", ("Concat",), zeros="routed")
def concat(ops: Ops, node: gs.Node, relevance: Sequence[Tensor | None]) -> list[Tensor | None]:
    """Each input gets back the slice of the relevance that it contributed (bounds read at run time where
    the sizes along the axis are not static, e.g. a cls token expanded to a computed shape)."""
    axis = node.attrs["axis"]
    sizes = [t.shape[axis] if t.shape is not None else None for t in node.inputs]
    if all(isinstance(s, int) for s in sizes):
        starts = np.cumsum([0] + sizes)
        return [ops.slice(relevance[0], [int(b)], [int(e)], [axis]) if computed(t) else None
                for t, b, e in zip(node.inputs, starts[:-1], starts[1:])]
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
    if not static(tensor.shape):
        raise Unsupported(f"{what} needs static non-batch dimensions")
    return list(tensor.shape)


def _constant_ints(node: gs.Node, index: int, what: str) -> list[int] | None:
    if len(node.inputs) <= index or not node.inputs[index].name:
        return None
    values = constant(node.inputs[index])
    if values is None:
        raise Unsupported(f"{what} must be constant")
    return [int(v) for v in np.atleast_1d(values)]


def _zeros_like(ops: Ops, tensor: Tensor) -> Tensor:
    return ops("ConstantOfShape", ops("Shape", tensor))


WHOLE = 2**31 - 1  # a Slice bound at least this large reaches past any batch size


@routes("slice", ("Slice",), zeros="routed")
def slice_(ops: Ops, node: gs.Node, relevance: Sequence[Tensor | None]) -> list[Tensor | None]:
    """The sliced relevance goes back where it was taken from; the rest of the input gets zero."""
    if constant(node.inputs[1]) is None or constant(node.inputs[2]) is None:
        return _slice_at_run_time(ops, node, relevance)
    starts, ends = _constant_ints(node, 1, "Slice starts"), _constant_ints(node, 2, "Slice ends")
    axes = _constant_ints(node, 3, "Slice axes") or list(range(len(starts)))
    steps = _constant_ints(node, 4, "Slice steps") or [1] * len(starts)
    shape = node.inputs[0].shape
    if shape is None or any(not isinstance(shape[a % len(shape)], int) for a in axes if a % len(shape)):
        raise Unsupported("Slice needs static sizes along the axes it slices")
    rank = len(shape)
    if any(step != 1 for step in steps):  # strided or reversed: each axis's taken positions, put back in turn
        if any(axis % rank == 0 for axis in axes):
            raise Unsupported("Slice along the batch axis with steps is not supported")
        lower = relevance[0]
        for start, end, axis, step in zip(starts, ends, axes, steps):
            size = shape[axis % rank]
            positions = np.array(range(*slice(start, end, step).indices(size)), dtype=np.int64)
            lower = _route_along(ops, lower, axis % rank, rank, positions, size)
        return [lower] + [None] * (len(node.inputs) - 1)
    pads = [0] * (2 * rank)
    for start, end, axis in zip(starts, ends, axes):
        axis %= rank
        if axis == 0 and not isinstance(shape[0], int):  # of known size it is any axis (a recurrent layer's Y_h)
            if (start == 0 or start <= -WHOLE) and end >= WHOLE:
                continue  # keeps the whole batch, whatever its size
            raise Unsupported("Slice along the batch axis is not supported")
        size = shape[axis]
        start, end = (min(max(v + size if v < 0 else v, 0), size) for v in (start, end))
        pads[axis], pads[rank + axis] = start, size - max(end, start)
    lower = ops("Pad", relevance[0], ops.ints(pads))
    return [lower] + [None] * (len(node.inputs) - 1)


def _slice_at_run_time(ops: Ops, node: gs.Node, relevance: Sequence[Tensor | None]) -> list[Tensor | None]:
    """A Slice whose bounds are computed (Phi3's partial rotary: up to cos.shape[-1]), along constant axes other
    than the batch's with step 1: the padding that puts the relevance back is computed at run time."""
    rank = len(node.inputs[0].shape) if node.inputs[0].shape is not None else None
    axes = _constant_ints(node, 3, "Slice axes")
    steps = _constant_ints(node, 4, "Slice steps")
    if rank is None or axes is None or any(a % rank == 0 for a in axes) or any(s != 1 for s in steps or []):
        raise Unsupported("Slice with computed bounds needs constant axes other than the batch's and steps of 1")
    axes = [a % rank for a in axes]
    sizes = ops("Gather", ops("Shape", node.inputs[0]), ops.ints(axes), axis=0)
    zero = ops.scalar(0, np.int64)

    def bound(index: int) -> Tensor:  # negative bounds count from the end; then clamped to [0, size]
        value = ops("Cast", node.inputs[index], to=onnx.TensorProto.INT64)
        counted = ops("Where", ops("Less", value, zero), ops("Add", value, sizes), value)
        return ops("Min", ops("Max", counted, zero), sizes)
    begin = bound(1)
    end = ops("Max", bound(2), begin)
    places = ops.ints([[a] for a in axes] + [[rank + a] for a in axes])
    pads = ops("ScatterND", ops.ints([0] * (2 * rank)), places, ops("Concat", begin, ops("Sub", sizes, end), axis=0))
    return [ops("Pad", relevance[0], pads)] + [None] * (len(node.inputs) - 1)


@routes("split", ("Split",), zeros="routed")
def split(ops: Ops, node: gs.Node, relevance: Sequence[Tensor | None]) -> list[Tensor | None]:
    """The relevance of the parts, concatenated back (zeros for parts nothing explained)."""
    parts = [r if r is not None else _zeros_like(ops, out) for r, out in zip(relevance, node.outputs)]
    lower = ops("Concat", *parts, axis=node.attrs.get("axis", 0))
    return [lower] + [None] * (len(node.inputs) - 1)


@routes("pad", ("Pad",), zeros="routed")
def pad(ops: Ops, node: gs.Node, relevance: Sequence[Tensor | None]) -> list[Tensor | None]:
    """Constant mode: relevance of the padding is dropped, the input gets that of its own positions. Edge,
    reflect and wrap modes: padded values are copies of inner positions, and their relevance goes back to the
    positions they copy (the gradient of the Pad)."""
    mode = node.attrs.get("mode", "constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    pads = _constant_ints(node, 1, "Pad pads")
    axes = _constant_ints(node, 3, "Pad axes")
    if mode not in COPIED_BORDERS + ("constant",) or any(p < 0 for p in pads):
        raise Unsupported(f"Pad in {mode} mode or with negative pads is not supported")
    shape = _static_dims(node.inputs[0], "Pad")
    half = len(pads) // 2
    axes = [a % len(shape) for a in axes] if axes else list(range(half))
    padded = [(a, pads[i], pads[half + i]) for i, a in enumerate(axes) if pads[i] or pads[half + i]]
    if any(a == 0 for a, _, _ in padded):
        raise Unsupported("Pad along the batch axis is not supported")
    if mode == "constant":
        lower = ops.slice(relevance[0], [b for _, b, _ in padded], [b + shape[a] for a, b, _ in padded],
                              [a for a, _, _ in padded]) if padded else relevance[0]
        return [lower] + [None] * (len(node.inputs) - 1)
    lower = relevance[0]
    for axis, begin, end in reversed(padded):  # a Pad is one Pad per axis, in order: undo them in reverse
        size = shape[axis]
        if mode == "reflect" and max(begin, end) >= size:
            raise Unsupported("Pad in reflect mode with pads as large as the input is not supported")
        sources = _copied_positions(mode, np.arange(-begin, size + end), size)
        lower = _route_along(ops, lower, axis, len(shape), sources, size)
    return [lower] + [None] * (len(node.inputs) - 1)


COPIED_BORDERS = ("edge", "reflect", "wrap")


def _copied_positions(mode: str, positions: np.ndarray, size: int) -> np.ndarray:
    """Which input position each output position of an edge, reflect or wrap Pad copies."""
    if mode == "edge":
        return np.clip(positions, 0, size - 1)
    if mode == "wrap":
        return positions % size
    period = 2 * (size - 1) or 1
    folded = np.abs(positions) % period
    return np.where(folded < size, folded, period - folded)


def _route_along(ops: Ops, relevance: Tensor, axis: int, rank: int, sources: np.ndarray, size: int) -> Tensor:
    """Send the relevance of each position along `axis` to the input position it was copied from (`sources`);
    copies of one position add up. A product with a one-hot matrix on the last axis."""
    selection = np.zeros((sources.size, size))
    np.add.at(selection, (np.arange(sources.size), sources), 1)
    to_last = [a for a in range(rank) if a != axis] + [axis]
    moved = ops("MatMul", ops("Transpose", relevance, perm=to_last), ops.const(selection))
    return ops("Transpose", moved, perm=[int(i) for i in np.argsort(to_last)])


def _runtime_indices_on_a_vector(node: gs.Node) -> bool:
    """A Gather from a 1-D tensor at indices computed at run time (torch's as_strided over a flattened tensor)."""
    shape = node.inputs[0].shape
    return constant(node.inputs[1]) is None and shape is not None and len(shape) == 1


@routes("gather", ("Gather",), min_opset=lambda node: 16 if _runtime_indices_on_a_vector(node) else 0)
def gather(ops: Ops, node: gs.Node, relevance: Sequence[Tensor | None]) -> list[Tensor | None]:
    """Gather of constant indices along one axis: each gathered element's relevance returns to its source
    (repeated indices add up), as a product with a one-hot matrix; one index along an axis whose length is only
    known at run time (BERT's pooler on a text of any length) pads the relevance around it. From a 1-D tensor,
    indices computed at run time (not from the explained input) scatter the relevance back (ScatterElements)."""
    if _runtime_indices_on_a_vector(node):
        return [ops.scatter_flat(node.inputs[0], node.inputs[1], relevance[0]), None]
    indices = constant(node.inputs[1])
    shape = node.inputs[0].shape
    if indices is None or indices.ndim > 1 or shape is None:
        raise Unsupported("Gather needs constant scalar or 1-D indices and an input of known rank")
    axis = node.attrs.get("axis", 0) % len(shape)  # any axis: torch's attention packs q, k, v along the first
    upper = ops.unsqueeze(relevance[0], [axis]) if indices.ndim == 0 else relevance[0]
    if isinstance(shape[axis], int):
        positions = np.atleast_1d(indices) % shape[axis]
        return [_route_along(ops, upper, axis, len(shape), positions, shape[axis]), None]
    if indices.ndim != 0:
        raise Unsupported("Gather of several indices needs a static length along its axis")
    return [_pad_around(ops, upper, node.inputs[0], axis, int(indices)), None]


def _pad_around(ops: Ops, relevance: Tensor, source: Tensor, axis: int, index: int) -> Tensor:
    """Relevance of one position (size 1 along `axis`) placed at `index` of `source`'s axis, zeros around it."""
    length = ops.slice(ops("Shape", source), [axis], [axis + 1], [0])
    before = ops.ints([index]) if index >= 0 else ops("Add", length, ops.ints([index]))
    after = ops("Sub", ops("Sub", length, before), ops.ints([1]))
    rank = len(source.shape)  # pads: [0] * axis, before, [0] * (rank - 1), after, [0] * (rank - axis - 1)
    parts = [ops.ints([0] * axis), before, ops.ints([0] * (rank - 1)), after, ops.ints([0] * (rank - axis - 1))]
    pads = ops("Concat", *[p for p in parts if not isinstance(p, gs.Constant) or p.values.size], axis=0)
    return ops("Pad", relevance, pads)


@routes("expand", ("Expand",))
def expand(ops: Ops, node: gs.Node, relevance: Sequence[Tensor | None]) -> list[Tensor | None]:
    """The copies' relevance adds up on the element they copy."""
    return [unbroadcast(ops, relevance[0], node.inputs[0], node.outputs[0]), None]


@routes("where", ("Where",))
def where(ops: Ops, node: gs.Node, relevance: Sequence[Tensor | None]) -> list[Tensor | None]:
    """Each element's relevance goes to the operand it was selected from."""
    condition, a, b = node.inputs
    zero = ops.scalar(0.0)
    chosen = [ops("Where", condition, relevance[0], zero), ops("Where", condition, zero, relevance[0])]
    return [None] + [unbroadcast(ops, r, t, node.outputs[0]) if computed(t) else None for r, t in zip(chosen, (a, b))]


FAMILIES = (activation, soft_capping, negation, quantize, cast, reshape, transpose, concat, slice_, split, pad, gather,
            expand, where)

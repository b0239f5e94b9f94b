"""Layers that move relevance without a rule: elementwise activations, reshaping, transposes, concatenation,
arithmetic with constants, and sums of two computed tensors."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import onnx_graphsurgeon as gs

from .registry import Context, Unsupported, computed, family
from .ops import Tensor

ACTIVATIONS = ("Relu", "LeakyRelu", "PRelu", "Elu", "Selu", "Celu", "Gelu", "Sigmoid", "HardSigmoid", "Tanh",
               "Clip", "HardSwish", "Softplus", "Softsign", "Mish", "ThresholdedRelu")
RESHAPES = ("Reshape", "Flatten", "Squeeze", "Unsqueeze")


def _first_only(relevance: Tensor, node: gs.Node) -> list[Tensor | None]:
    return [relevance] + [None] * (len(node.inputs) - 1)


@family("activation", ACTIVATIONS + ("Identity", "Dropout", "BatchNormalization"), ("pass",))
def emit_pass(ctx: Context, node: gs.Node, relevance: Sequence[Tensor | None]) -> list[Tensor | None]:
    """Elementwise layers (and BatchNormalization that could not be folded) pass relevance unchanged."""
    return _first_only(relevance[0], node)


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
    """Each input gets back the slice of the relevance that it contributed."""
    axis = node.attrs["axis"]
    sizes = [t.shape[axis] if t.shape is not None else None for t in node.inputs]
    if any(not isinstance(s, int) for s in sizes):
        raise Unsupported("Concat needs static sizes along its axis")
    starts = np.cumsum([0] + sizes)
    return [ctx.ops.slice(relevance[0], [int(b)], [int(e)], [axis]) if computed(t) else None
            for t, b, e in zip(node.inputs, starts[:-1], starts[1:])]


@family("arithmetic", ("Add", "Sub", "Mul", "Div"), ("norm",))
def emit_arithmetic(ctx: Context, node: gs.Node, relevance: Sequence[Tensor | None]) -> list[Tensor | None]:
    """With a constant operand: an affine layer, relevance passes. Add/Sub of two computed tensors: `norm`."""
    flags = [computed(t) for t in node.inputs]
    if flags.count(True) == 1:
        return [relevance[0] if flag else None for flag in flags]
    if node.op not in ("Add", "Sub"):
        raise Unsupported(f"{node.op} of two computed tensors is not supported")
    a, b = node.inputs
    if a.shape is None or list(a.shape) != list(b.shape):
        raise Unsupported(f"{node.op} of two computed tensors needs equal shapes")
    _, params = ctx.rule(node)
    ops = ctx.ops
    s = ops.divide_stabilized(relevance[0], node.outputs[0], params["stabilizer"])
    lower_b = ops("Mul", b, s)
    return [ops("Mul", a, s), lower_b if node.op == "Add" else ops("Neg", lower_b)]

"""Softmax (AttnLRP's Prop. 3.1): the Softmax op and softmax written out (Exp, ReduceSum, Div, with or without
the max subtraction), and CP-LRP's stop at the attention weights."""
from __future__ import annotations

from typing import Callable, Sequence

import onnx_graphsurgeon as gs

from .graph import constant
from .ops import Tensor
from .registry import Context, Unsupported, family

# softmax: R_z = z * (R_s - s * sum(R_s)); stop: the attention weights are constants (CP-LRP), so a product with
# them is linear in the values and nothing reaches the scores, the queries or the keys.
SOFTMAX_RULES = ("softmax", "stop")


def stops(node: gs.Node, rule: Callable[[gs.Node], tuple[str, object]]) -> bool:
    """Whether a node's output is a constant to the walk: a Softmax under `stop`, and the maximum that a softmax
    written out subtracts (the softmax does not change with it)."""
    if node.op == "Softmax":
        return rule(node)[0] == "stop"
    return node.op == "ReduceMax" and bool(node.outputs[0].outputs) and all(
        subtracts_max(user) for user in node.outputs[0].outputs)


def _consumers(tensor: Tensor) -> list[str]:
    return [user.op for user in tensor.outputs]


def _axes(node: gs.Node) -> list[int] | None:
    """The constant axes of a reduction (input or attribute), None if not constant."""
    if len(node.inputs) > 1:
        values = constant(node.inputs[1])
        return None if values is None else [int(a) for a in values]
    return node.attrs.get("axes")


def _normalized_axes(tensor: Tensor, axes: Sequence[int], what: str) -> list[int]:
    if tensor.shape is None:
        raise Unsupported(f"{what} needs the rank of its input")
    return sorted(a % len(tensor.shape) for a in axes)


def relevance_at_input(ctx: Context, z: Tensor, s: Tensor, relevance: Tensor, axes: list[int]) -> Tensor:
    """z * g with g = R_s - s * sum(R_s) over `axes` (the softmax gradient of R_s / s); where z may be infinite,
    0 where g is 0, so that masked positions (z = -inf or the float minimum, s = 0) get 0."""
    ops = ctx.ops
    g = ops("Sub", relevance, ops("Mul", s, ops.reduce_sum(relevance, axes)))
    product = ops("Mul", z, g)
    return product if ctx.finite(z) else ops.zero_where_zero(g, product)


@family("softmax", ("Softmax",), SOFTMAX_RULES)
def emit_softmax(ctx: Context, node: gs.Node, relevance: Sequence[Tensor | None]) -> list[Tensor | None]:
    """Before opset 13 Softmax normalises over all axes from `axis` on; from 13 over `axis` alone."""
    ops = ctx.ops
    z = node.inputs[0]
    axis = node.attrs.get("axis", -1 if ops.opset >= 13 else 1)
    axes = _normalized_axes(z, [axis], "Softmax")
    if ops.opset < 13:
        axes = list(range(axes[0], len(z.shape)))
    return [relevance_at_input(ctx, z, node.outputs[0], relevance[0], axes)]


def written_out(node: gs.Node) -> tuple[Tensor, list[int]] | None:
    """For Div(e, ReduceSum(e)) with e = Exp(z) or Exp(z - ReduceMax(z)) (a softmax written out): z and the
    summed axes, else None."""
    e, total = node.inputs
    reduction = total.inputs[0] if total.inputs else None
    if reduction is None or reduction.op != "ReduceSum" or reduction.inputs[0] is not e or not e.inputs \
            or e.inputs[0].op != "Exp" or not reduction.attrs.get("keepdims", 1):
        return None
    axes = _axes(reduction)
    z = e.inputs[0].inputs[0]
    if z.inputs and subtracts_max(z.inputs[0]):
        z = z.inputs[0].inputs[0]
    return (z, _normalized_axes(z, axes, "a softmax written out")) if axes else None


def subtracts_max(node: gs.Node) -> bool:
    """Whether a node is the Sub(z, ReduceMax(z)) of a softmax written out (the maximum absorbs nothing)."""
    peak = node.inputs[1] if node.op == "Sub" else None
    return peak is not None and bool(peak.inputs) and peak.inputs[0].op == "ReduceMax" and \
        peak.inputs[0].inputs[0] is node.inputs[0] and _consumers(node.outputs[0]) == ["Exp"]


def emit_written_out(ctx: Context, node: gs.Node, relevance: Tensor) -> list[Tensor | None]:
    """The softmax rule at the Div of a softmax written out, computed for the logits z before any max subtraction;
    the Exp and the Sub of the maximum hand it on unchanged."""
    z, axes = written_out(node)
    return [relevance_at_input(ctx, z, node.outputs[0], relevance, axes), None]


@family("exp", ("Exp",), ("softmax",))
def emit_exp(ctx: Context, node: gs.Node, relevance: Sequence[Tensor | None]) -> list[Tensor | None]:
    """Exp inside a softmax written out hands on the relevance its Div computed for the Exp's input."""
    if not any(user.op == "Div" and user.inputs[0] is node.outputs[0] and written_out(user)
               for user in node.outputs[0].outputs):
        raise Unsupported("Exp outside a softmax written out is not supported")
    return [relevance[0]]

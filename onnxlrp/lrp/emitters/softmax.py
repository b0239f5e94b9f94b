"""Softmax (AttnLRP's Prop. 3.1), as the ONNX op and written out (canonical/patterns.py), and CP-LRP's stop at the
attention weights: under `stop` the softmax's output is a constant to the walk, so a product with it is linear in
the values and nothing reaches the scores, the queries or the keys."""
from __future__ import annotations

from dataclasses import dataclass

import onnx_graphsurgeon as gs

from ...canonical.patterns import CANONICAL
from ...ir.ops import Ops, Tensor
from ..families import Context, Unsupported, family
from ..rules import Layer, OfNode, Shared

SOFTMAX_RULES = ("softmax", "stop")


@dataclass
class Softmax(OfNode, Shared):
    """s = softmax(z) over `axes`: c = J^T (R / s) = R - s * sum(R), in closed form (R_z = z * c). `finite`: False
    where z may hold -inf (a mask): a row masked whole has s = NaN, which the model replaces (torch's
    scaled_dot_product_attention as exported: Where(IsNaN(s), 0, s)) and whose R is then 0, so s * sum(R) is taken
    as 0 where sum(R) is 0."""
    node: gs.Node
    axes: list[int]
    finite: bool = True

    @property
    def inputs(self) -> list[Tensor | None]:
        return [self.node.inputs[0]]

    def exact_backward(self, ops: Ops, relevance: Tensor) -> list[Tensor | None]:
        total = ops.reduce_sum(relevance, self.axes)
        share = ops("Mul", self.output, total)
        return [ops("Sub", relevance, share if self.finite else ops.zero_where_zero(total, share))]

    def backward(self, ops: Ops, s: Tensor) -> list[Tensor | None]:
        raise Unsupported("the softmax rule has no stabilizer")


def softmax_axes(node: gs.Node, opset: int) -> list[int]:
    """The axes a softmax normalises over: before opset 13 every axis from `axis` on, from 13 `axis` alone; a
    softmax written out says its own."""
    if node.domain == CANONICAL:
        return node.attrs["axes"]
    shape = node.inputs[0].shape
    if shape is None:
        raise Unsupported("Softmax needs the rank of its input")
    axis = node.attrs.get("axis", -1 if opset >= 13 else 1) % len(shape)
    return [axis] if opset >= 13 else list(range(axis, len(shape)))


@family("softmax", ("Softmax",), SOFTMAX_RULES, detachable=True)
def softmax(ctx: Context, node: gs.Node) -> Layer:
    return Softmax(node, softmax_axes(node, ctx.ops.opset), ctx.finite(node.inputs[0]))


FAMILIES = (softmax,)

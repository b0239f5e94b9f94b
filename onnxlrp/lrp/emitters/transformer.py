"""Transformer layers (docs/attnlrp.md §3): LayerNormalization with sigma constant (a norm written out gets the
same through the stop-gradient of its sigma: canonical/patterns.py), and products of two computed tensors, MatMul
and Einsum (the uniform rule of Prop. 3.3; CP-LRP stops at the softmax, see softmax.py)."""
from __future__ import annotations

from dataclasses import dataclass

import onnx_graphsurgeon as gs

from ...ir.ops import Ops, Tensor
from ..facts import computed
from ..families import Context, Unsupported, family
from ..rules import Layer, OfNode, Shared
from .arithmetic import Operands, unbroadcast


def _normalized_axes(node: gs.Node, axis: int) -> list[int]:
    shape = node.inputs[0].shape
    if shape is None:
        raise Unsupported(f"{node.op} needs the rank of its input")
    return list(range(axis % len(shape), len(shape)))


@dataclass
class LayerNorm(OfNode, Shared):
    """y = w * (x - mean) / sigma + b with sigma a constant: c = (w * s - mean(w * s)) / sigma on the normalised
    axes, so R_x = x * c. The bias absorbs its share; the mean subtraction is a linear map (the closed form of
    docs/attnlrp.md §3)."""
    node: gs.Node

    @property
    def inputs(self) -> list[Tensor | None]:
        return [self.node.inputs[0]] + [None] * (len(self.node.inputs) - 1)

    def backward(self, ops: Ops, s: Tensor) -> list[Tensor | None]:
        x, scale = self.node.inputs[0], self.node.inputs[1]
        axes = _normalized_axes(self.node, self.node.attrs.get("axis", -1))
        u = ops("Mul", scale, s)
        centered_u = ops("Sub", u, ops.reduce_mean(u, axes))
        centered_x = ops("Sub", x, ops.reduce_mean(x, axes))
        variance = ops.reduce_mean(ops("Mul", centered_x, centered_x), axes)
        sigma = ops("Sqrt", ops("Add", variance, ops.scalar(self.node.attrs.get("epsilon", 1e-5))))
        return [ops("Div", centered_u, sigma)] + [None] * (len(self.node.inputs) - 1)


@family("layer normalization", ("LayerNormalization",), ("norm",))
def layer_norm(ctx: Context, node: gs.Node) -> Layer:
    return LayerNorm(node)


@dataclass
class Product(Operands):
    """MatMul C = A B of two computed tensors (or of one computed tensor and a constant of rank 3 or more): with
    s = R_C / stab(C) under the node's epsilon (0 for `zero`), each computed factor gets its share, half each when
    both are computed: c_A = share * s B^T, c_B = share * A^T s; a constant factor gets none. Whatever the rule,
    only its epsilon applies (a linear rule's modifiers need a constant weight)."""
    stabilizer = "epsilon"

    def __post_init__(self):
        if any(t.shape is None or len(t.shape) < 2 for t in self.node.inputs):
            raise Unsupported("a product of two tensors needs operands of rank 2 or more")

    def backward(self, ops: Ops, s: Tensor) -> list[Tensor | None]:
        a, b = self.node.inputs
        if all(t is not None for t in self.inputs):
            s = ops("Mul", s, ops.scalar(0.5))
        return [ops("MatMul", s, _transposed(ops, b)) if self.inputs[0] is not None else None,
                ops("MatMul", _transposed(ops, a), s) if self.inputs[1] is not None else None]

    def fit(self, ops: Ops, index: int, relevance: Tensor) -> Tensor:
        return unbroadcast(ops, relevance, self.node.inputs[index], self.output, matrix_axes=2)


def _transposed(ops: Ops, tensor: Tensor) -> Tensor:
    rank = len(tensor.shape)
    return ops("Transpose", tensor, perm=list(range(rank - 2)) + [rank - 1, rank - 2])


@dataclass
class Einsum(Operands):
    """Einsum of two operands, as `Product`: each computed operand X gets share * X * (the Einsum's gradient for X
    applied to s), half each when both are computed."""
    stabilizer = "epsilon"

    def __post_init__(self):
        equation = self.node.attrs["equation"]
        equation = (equation.decode() if isinstance(equation, bytes) else equation).replace(" ", "")
        terms, _, result = equation.partition("->")
        self.operands, self.result = terms.split(","), result
        if len(self.operands) != 2 or not result or "." in equation or \
                any(len(set(t)) != len(t) for t in self.operands):
            raise Unsupported("Einsum needs two operands, an explicit output and no ellipsis or repeated index")
        for index, mine in enumerate(self.operands):
            if computed(self.node.inputs[index]) and set(mine) - set(self.operands[1 - index]) - set(result):
                raise Unsupported("Einsum that sums an index of one operand alone is not supported")

    def backward(self, ops: Ops, s: Tensor) -> list[Tensor | None]:
        if all(t is not None for t in self.inputs):
            s = ops("Mul", s, ops.scalar(0.5))
        return [ops("Einsum", s, self.node.inputs[1 - index],
                    equation=f"{self.result},{self.operands[1 - index]}->{self.operands[index]}")
                if tensor is not None else None for index, tensor in enumerate(self.inputs)]


@family("einsum", ("Einsum",), ("epsilon",))
def einsum(ctx: Context, node: gs.Node) -> Layer:
    return Einsum(node)


FAMILIES = (layer_norm, einsum)

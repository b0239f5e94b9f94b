"""Transformer layers (ATTNLRP.md §3): LayerNormalization with sigma constant (also written out: the sigma of a norm
is a constant to the walk), and MatMul of two computed tensors (the uniform rule of Prop. 3.3; CP-LRP stops at the
softmax, see softmax.py)."""
from __future__ import annotations

from typing import Sequence

import onnx_graphsurgeon as gs

from .elementwise import unbroadcast
from .graph import constant
from .ops import Ops, Tensor
from .registry import Context, Unsupported, computed, family


MEANS = ("ReduceMean", "GlobalAveragePool")  # tf2onnx writes a mean over the last axis as GlobalAveragePool
EPSILONS = ("Add", "Max")  # var + eps, or max(var, eps)


def sigma_of_a_norm(node: gs.Node) -> bool:
    """Whether a node computes the sigma of a norm written out: Sqrt(mean(d * d or d ^ 2) + eps), eps added or
    taken as a floor. Its output is a constant to the walk (LXT's stop-gradient), so that whatever divides or
    multiplies by sigma or 1 / sigma (torch's Div, tf2onnx's Reciprocal and Mul, RMSNorm) passes relevance."""
    if node.op != "Sqrt":
        return False
    tensor = node.inputs[0]
    while tensor.inputs and tensor.inputs[0].op in EPSILONS:
        operands = tensor.inputs[0].inputs
        computed_operands = [t for t in operands if constant(t) is None]
        if len(computed_operands) != 1:
            return False
        tensor = computed_operands[0]
    mean = tensor.inputs[0] if tensor.inputs else None
    if mean is None or mean.op not in MEANS or not mean.inputs[0].inputs:
        return False
    square = mean.inputs[0].inputs[0]
    exponent = constant(square.inputs[1]) if square.op == "Pow" else None
    return (square.op == "Mul" and square.inputs[0] is square.inputs[1]) or (
        exponent is not None and exponent.size == 1 and float(exponent.reshape(())) == 2.0)


def _normalized_axes(node: gs.Node, axis: int) -> list[int]:
    shape = node.inputs[0].shape
    if shape is None:
        raise Unsupported(f"{node.op} needs the rank of its input")
    return list(range(axis % len(shape), len(shape)))


@family("layer normalization", ("LayerNormalization",), ("norm",))
def emit_layer_norm(ctx: Context, node: gs.Node, relevance: Sequence[Tensor | None]) -> list[Tensor | None]:
    """y = w * (x - mean) / sigma + b with sigma a constant: u = w * R_y / stab(y), R_x = x * (u - mean(u)) / sigma.
    The bias absorbs its share; the mean subtraction is a linear map (the closed form of ATTNLRP.md §3)."""
    _, params = ctx.rule(node)
    ops = ctx.ops
    x, scale = node.inputs[0], node.inputs[1]
    axes = _normalized_axes(node, node.attrs.get("axis", -1))
    u = ops("Mul", scale, ops.divide_stabilized(relevance[0], node.outputs[0], params["stabilizer"]))
    centered_u = ops("Sub", u, ops.reduce_mean(u, axes))
    centered_x = ops("Sub", x, ops.reduce_mean(x, axes))
    variance = ops.reduce_mean(ops("Mul", centered_x, centered_x), axes)
    sigma = ops("Sqrt", ops("Add", variance, ops.scalar(node.attrs.get("epsilon", 1e-5))))
    return [ops("Mul", x, ops("Div", centered_u, sigma))] + [None] * (len(node.inputs) - 1)


def emit_product(ctx: Context, node: gs.Node, relevance: Sequence[Tensor | None]) -> list[Tensor | None]:
    """MatMul C = A B that is not a layer with a constant weight: epsilon over the summed index (epsilon of the
    node's rule, 0 for `zero`), then each computed factor gets its share, half each when both are computed
    (R_A = share * A * (s B^T), R_B = share * B * (A^T s), s = R_C / stab(C)); a constant factor gets none."""
    rule, params = ctx.rule(node)
    ops = ctx.ops
    a, b = node.inputs
    flags = [computed(a), computed(b)]
    if any(t.shape is None or len(t.shape) < 2 for t in (a, b)):
        raise Unsupported("a product of two tensors needs operands of rank 2 or more")
    epsilon = 0.0 if rule == "zero" else params["epsilon"]
    s = ops.divide_stabilized(relevance[0], node.outputs[0], epsilon)
    if flags.count(True) == 2:
        s = ops("Mul", s, ops.scalar(0.5))
    lower = [ops("MatMul", s, _transposed(ops, b)) if flags[0] else None,
             ops("MatMul", _transposed(ops, a), s) if flags[1] else None]
    return [unbroadcast(ops, ops("Mul", t, c), t, node.outputs[0], matrix_axes=2) if c is not None else None
            for t, c in zip((a, b), lower)]


def _transposed(ops: Ops, tensor: Tensor) -> Tensor:
    rank = len(tensor.shape)
    return ops("Transpose", tensor, perm=list(range(rank - 2)) + [rank - 1, rank - 2])


@family("einsum", ("Einsum",), ("epsilon",))
def emit_einsum(ctx: Context, node: gs.Node, relevance: Sequence[Tensor | None]) -> list[Tensor | None]:
    """Einsum of two operands, as `emit_product`: s = R / stab(C) (the composite's epsilon), and each computed
    operand X gets share * X * (the Einsum's gradient for X applied to s), half each when both are computed."""
    _, params = ctx.rule(node)
    equation = node.attrs["equation"]
    equation = (equation.decode() if isinstance(equation, bytes) else equation).replace(" ", "")
    terms, _, result = equation.partition("->")
    operands = terms.split(",")
    if len(operands) != 2 or not result or "." in equation or any(len(set(t)) != len(t) for t in operands):
        raise Unsupported("Einsum needs two operands, an explicit output and no ellipsis or repeated index")
    ops = ctx.ops
    flags = [computed(t) for t in node.inputs]
    s = ops.divide_stabilized(relevance[0], node.outputs[0], params["epsilon"])
    if all(flags):
        s = ops("Mul", s, ops.scalar(0.5))
    lower = []
    for index, (tensor, flag) in enumerate(zip(node.inputs, flags)):
        other, mine = operands[1 - index], operands[index]
        if not flag:
            lower.append(None)
        elif set(mine) - set(other) - set(result):
            raise Unsupported("Einsum that sums an index of one operand alone is not supported")
        else:
            gradient = ops("Einsum", s, node.inputs[1 - index], equation=f"{result},{other}->{mine}")
            lower.append(ops("Mul", tensor, gradient))
    return lower

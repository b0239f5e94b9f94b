"""Pairwise matching (Montavon et al. 2019, "Layer-wise Relevance Propagation: An Overview", section 10.4): a product
of two ReLU'd projections of two inputs, a_k = max(0, x W_k) * max(0, y V_k), explained in terms of pairs of input
features by the second-order rule

    R_ij = sum_k x_i y_j w_ik v_jk / stab(sum_ij x_i y_j w_ik v_jk) R_k,

the output `relevance_pairs` [N, I, J] of a Mul that the composite gives the rule `pairs`. The product is linear in
the outer product x y^T with the weight w_ik v_jk, so the rule is the one skeleton's plain rule (epsilon) on that
bilinear layer: z_k = (x W_k)(y V_k), s = R / stab(z), c_ij = sum_k w_ik v_jk s_k, R_ij = x_i y_j c_ij.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from ..errors import LrpError
from ..ir.graph import constant
from ..ir.ops import Ops, Tensor
from .families import Context, Unsupported
from .rules import Weighted, propagate
from .seed import RELEVANCE_PAIRS

PAIRS = "pairs"
FORM = "the pairs rule needs a Mul of two Relu(x @ W) of rank-2 tensors by constant matrices without bias"


@dataclass
class Projection:
    """One factor max(0, x W) of the product: the projected tensor x [N, features], the weight as stored and its
    layout (`rows`: [K, features], a Gemm with transB), and the projection x W before the ReLU."""
    x: Tensor
    weight: Tensor
    rows: bool
    projected: Tensor

    def columns(self, ops: Ops) -> Tensor:
        """The weight as [features, K]."""
        return ops("Transpose", self.weight) if self.rows else self.weight

    def lines(self, ops: Ops) -> Tensor:
        """The weight as [K, features]."""
        return self.weight if self.rows else ops("Transpose", self.weight)


def projection(factor: Tensor) -> Projection:
    """The factor as Relu(x @ W) (a Gemm after canonicalisation, or a MatMul), or Unsupported."""
    relu = factor.inputs[0] if factor.inputs else None
    dense = relu.inputs[0].inputs[0] if relu is not None and relu.op == "Relu" and relu.inputs[0].inputs else None
    if dense is None or dense.op not in ("Gemm", "MatMul") or len(dense.inputs) < 2:
        raise Unsupported(FORM)
    weight = constant(dense.inputs[1])
    bias = constant(dense.inputs[2]) if len(dense.inputs) > 2 and dense.inputs[2].name else None
    shape = dense.inputs[0].shape
    if weight is None or weight.ndim != 2 or shape is None or len(shape) != 2 or \
            set(dense.attrs) - {"transB"} or (bias is not None and np.any(bias != 0)):
        raise Unsupported(FORM)
    return Projection(dense.inputs[0], dense.inputs[1], bool(dense.attrs.get("transB", 0)), dense.outputs[0])


@dataclass
class Bilinear(Weighted):
    """z_k = sum_ij (x_i y_j) w_ik v_jk = (x W_k)(y V_k): a layer linear in the outer product x y^T [N, I, J], whose
    weight the rule reads is W (the plain rule modifies none) and whose input-gradient is W diag(s) V^T. Its output
    z is the product of the model's own projections: the plain rule needs no other forward pass."""
    left: Projection
    right: Projection
    x: Tensor
    output: Tensor

    def parameters(self) -> tuple[Tensor, None]:
        return self.left.weight, None

    def backward(self, ops: Ops, s: Tensor, weight: Tensor) -> Tensor:
        scaled = ops("Mul", ops.unsqueeze(s, [1]), self.left.columns(ops))  # [N, I, K]
        return ops("MatMul", scaled, self.right.lines(ops))  # [N, I, J]


def bilinear(ops: Ops, node: gs.Node) -> Bilinear:
    """The product node as a bilinear layer of the two tensors its factors project, or Unsupported."""
    if node.op != "Mul" or len(node.inputs) != 2:
        raise Unsupported(FORM)
    left, right = (projection(factor) for factor in node.inputs)
    outer = ops("Mul", ops.unsqueeze(left.x, [2]), ops.unsqueeze(right.x, [1]))
    return Bilinear(left, right, outer, ops("Mul", left.projected, right.projected))


@dataclass(frozen=True)
class Pairs:
    """The relevance of the pairs of features of a product node, [N, I, J]."""
    node: gs.Node
    relevance: Tensor
    shape: tuple


def second_order(ctx: Context, node: gs.Node, relevance: Tensor) -> Pairs:
    """relevance_pairs of a product node from the relevance R_k at its output, through the one skeleton."""
    layer = bilinear(ctx.ops, node)
    batch = (layer.left.x.shape or ["N"])[0]
    return Pairs(node, propagate(ctx, node, layer, [relevance])[0],
                 (batch, layer.left.x.shape[1], layer.right.x.shape[1]))


def expose(graph: gs.Graph, ops: Ops, found: list[Pairs], source: str) -> None:
    """Add the output `relevance_pairs` of the one product that the composite gives the rule `pairs`."""
    if len(found) > 1:
        raise LrpError(f"{source}: rule '{PAIRS}' is given to {len(found)} products that relevance reaches "
                       f"({', '.join(repr(pairs.node.name) for pairs in found)}); a composite may give it to one")
    pairs, = found
    result = gs.Variable(RELEVANCE_PAIRS, dtype=ops.dtype, shape=list(pairs.shape))
    graph.nodes.append(gs.Node("Identity", ops.fresh("lrp/relevance_pairs"), inputs=[pairs.relevance],
                               outputs=[result]))
    graph.outputs.append(result)

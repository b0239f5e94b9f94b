"""The RMS norms of language models as single ops (ONNX Runtime's SimplifiedLayerNormalization and
SkipSimplifiedLayerNormalization, ONNX's RMSNormalization of opset 23) written out in plain ops,
x / sqrt(mean(x^2) + eps) * scale, so that the declared pattern `sigma of a norm` (patterns.py) makes sigma a
constant to the walk as AttnLRP prescribes, and relevance passes the norm."""
from __future__ import annotations

from typing import Callable

import numpy as np
import onnx_graphsurgeon as gs

from ..errors import LrpError
from ..ir.graph import expand_each
from ..ir.ops import Ops, Tensor


def _rms(ops: Ops, x: Tensor, scale: Tensor, axes: list[int], epsilon: float) -> Tensor:
    """x / sqrt(mean over `axes` of x^2 + eps) * scale."""
    variance = ops.reduce_mean(ops("Pow", x, ops.scalar(2.0)), axes)
    sigma = ops("Sqrt", ops("Add", variance, ops.scalar(epsilon)))
    return ops("Mul", ops("Div", x, sigma), scale)


def _simplified(ops: Ops, node: gs.Node) -> list[Tensor | None]:
    """SimplifiedLayerNormalization(X, scale): output Y (its inv_std_var output is left out)."""
    rank = len(node.inputs[0].shape)
    axes = list(range(node.attrs.get("axis", -1) % rank, rank))
    return [_rms(ops, node.inputs[0], node.inputs[1], axes, node.attrs.get("epsilon", 1e-5))]


def _skip_simplified(ops: Ops, node: gs.Node) -> list[Tensor | None]:
    """SkipSimplifiedLayerNormalization(X, skip, gamma[, bias]): Y of s = X + skip (+ bias), and s as its fourth
    output (the residual stream that the next block adds to)."""
    x, skip, gamma = node.inputs[:3]
    total = ops("Add", x, skip)
    if len(node.inputs) > 3 and node.inputs[3].name:
        total = ops("Add", total, node.inputs[3])
    y = _rms(ops, total, gamma, [len(x.shape) - 1], node.attrs.get("epsilon", 1e-5))
    return [y, None, None, total]


# Op type -> the plain ops of its outputs (None for outputs of statistics that a model reads not).
NORMS: dict[str, Callable[[Ops, gs.Node], list[Tensor | None]]] = {
    "SimplifiedLayerNormalization": _simplified,
    "SkipSimplifiedLayerNormalization": _skip_simplified,
    "RMSNormalization": _simplified,
}


def expand_norms(graph: gs.Graph, strict: bool = True) -> bool:
    """Write every RMS norm op out in plain ops (ir/graph.py expand_each). Returns whether there was one."""
    return expand_each(graph, NORMS, _expand, strict)


def _expand(graph: gs.Graph, node: gs.Node) -> None:
    where = f"node '{node.name}' ({node.op})"
    if node.inputs[0].shape is None or node.inputs[0].dtype is None:
        raise LrpError(f"{where}: needs the rank and type of its input")
    ops = Ops(graph, graph.opset, np.dtype(node.inputs[0].dtype))
    ops.scope = node.name
    written = NORMS[node.op](ops, node)
    for output, value in zip(node.outputs, written):
        if value is None and (output.outputs or output in graph.outputs):
            raise LrpError(f"{where}: its output '{output.name}' (a statistic of the norm) is not supported")
    ops.stand_in(node, written)

"""Pooling and spatial reductions: `norm` through the rule skeleton, and a maximum's winner-take-all (its
gradient) under `wta`."""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ...canonical.classic import OUTLIER_SCORE
from ...ir.graph import constant, static
from ...ir.ops import Ops, Tensor
from ..families import Context, Unsupported, family
from ..rules import Layer, OfNode, Routing, Rule, Weighted

WINDOW_ATTRS = ("kernel_shape", "strides", "pads", "ceil_mode")


@dataclass
class Window(OfNode, Weighted):
    """A sliding-window sum or average over each channel (AveragePool, or MaxPool treated as sum pooling)."""
    node: gs.Node
    attrs: dict
    in_shape: list[int]
    out_shape: list[int]
    average: bool

    @property
    def kernel(self) -> list[int]:
        return list(self.attrs["kernel_shape"])

    def counts(self, include_pad: bool) -> np.ndarray:
        """How many input positions each window covers, [1, 1, *out_spatial] (as ONNX Runtime counts them)."""
        rank = len(self.kernel)
        strides = self.attrs.get("strides", [1] * rank)
        pads = self.attrs.get("pads", [0] * 2 * rank)
        per_axis = []
        for axis in range(rank):
            size, kernel, stride = self.in_shape[2 + axis], self.kernel[axis], strides[axis]
            starts = np.arange(self.out_shape[2 + axis]) * stride - pads[axis]
            ends = np.minimum(starts + kernel, size + pads[rank + axis])
            if not include_pad:
                starts, ends = np.maximum(starts, 0), np.minimum(ends, size)
            per_axis.append(ends - starts)
        grid = np.ones(self.out_shape[2:], dtype=np.float64)
        for axis, count in enumerate(per_axis):
            grid = grid * count.reshape([-1 if a == axis else 1 for a in range(rank)])
        return grid.reshape([1, 1] + list(grid.shape))

    def forward(self, ops: Ops, x: Tensor, weight=None, bias=None) -> Tensor:
        mean = ops("AveragePool", x, **{**self.attrs, "count_include_pad": 1})
        return mean if self.average else ops("Mul", mean, ops.const(self.counts(True)))

    def backward(self, ops: Ops, s: Tensor, weight=None) -> Tensor:
        if self.average:
            include_pad = bool(self.attrs.get("count_include_pad", 0))
            s = ops("Mul", s, ops.const(1.0 / self.counts(include_pad)))
        channels = self.in_shape[1]
        ones = np.ones([channels, 1] + self.kernel)
        return ops.transposed_conv(s, ops.const(ones), {**self.attrs, "group": channels}, self.in_shape[2:],
                                   self.out_shape[2:], self.kernel)

    def constant_input(self, ops: Ops, values: np.ndarray) -> Tensor:
        raise Unsupported("pooling has no weights for rules with constant inputs")


@dataclass
class Reduction(OfNode, Weighted):
    """A mean or sum over some axes (GlobalAveragePool, ReduceMean, ReduceSum)."""
    node: gs.Node
    axes: list[int]
    keepdims: bool
    divisor: float

    def forward(self, ops: Ops, x: Tensor, weight=None, bias=None) -> Tensor:
        total = ops.reduce_sum(x, self.axes, self.keepdims)
        return total if self.divisor == 1 else ops("Div", total, ops.scalar(self.divisor))

    def backward(self, ops: Ops, s: Tensor, weight=None) -> Tensor:
        expanded = s if self.keepdims else ops.unsqueeze(s, self.axes)
        return expanded if self.divisor == 1 else ops("Div", expanded, ops.scalar(self.divisor))

    def constant_input(self, ops: Ops, values: np.ndarray) -> Tensor:
        raise Unsupported("reductions have no weights for rules with constant inputs")


def _static_shapes(node: gs.Node) -> tuple[list[int], list[int]]:
    shapes = [node.inputs[0].shape, node.outputs[0].shape]
    if not all(static(s) for s in shapes):
        raise Unsupported("pooling needs static channel and spatial dimensions")
    return list(shapes[0]), list(shapes[1])


def _window(node: gs.Node, average: bool) -> tuple[dict, list[int], list[int]]:
    rank = len(node.attrs["kernel_shape"])
    if any(d != 1 for d in node.attrs.get("dilations", [1] * rank)):
        raise Unsupported("dilated pooling windows are not supported")
    attrs = {k: node.attrs[k] for k in WINDOW_ATTRS if k in node.attrs}
    if average:
        attrs["count_include_pad"] = node.attrs.get("count_include_pad", 0)
    return attrs, *_static_shapes(node)


def _reduction(node: gs.Node) -> tuple[list[int], bool, float]:
    shape = node.inputs[0].shape
    rank = len(shape) if shape is not None else None
    if node.op in ("GlobalAveragePool", "GlobalMaxPool"):
        axes, keepdims = list(range(2, rank)) if rank else None, True
    else:
        if len(node.inputs) > 1:
            values = constant(node.inputs[1])
            axes = None if values is None else [int(a) for a in values]
        else:
            axes = node.attrs.get("axes")
        keepdims = bool(node.attrs.get("keepdims", 1))
    if rank is None or not axes:
        raise Unsupported("reductions need a known rank and constant axes")
    axes = sorted(a % rank for a in axes)
    if 0 in axes:
        raise Unsupported("a reduction over the batch axis is not supported")
    sizes = [shape[a] for a in axes]
    if node.op in ("ReduceSum", "ReduceMax", "GlobalMaxPool"):  # a max treated as sum pooling sums
        divisor = 1.0
    elif all(isinstance(s, int) for s in sizes):
        divisor = float(np.prod(sizes))
    else:
        raise Unsupported("a mean over dynamic axes is not supported")
    return axes, keepdims, divisor


@family("average pooling", ("AveragePool",), ("norm",), zeros="kept")
def average_pool(ctx: Context, node: gs.Node) -> Layer:
    return Window(node, *_window(node, average=True), average=True)


@family("reduction", ("GlobalAveragePool", "ReduceMean", "ReduceSum"), ("norm",), zeros="kept")
def reduction(ctx: Context, node: gs.Node) -> Layer:
    return Reduction(node, *_reduction(node))


def _overlapping(node: gs.Node) -> bool:
    kernel = node.attrs.get("kernel_shape", [])
    strides = node.attrs.get("strides", [1] * len(kernel))
    dilations = node.attrs.get("dilations", [1] * len(kernel))
    return any(s < (k - 1) * d + 1 for k, s, d in zip(kernel, strides, dilations))


def _max_zeros(node: gs.Node, rule: Rule) -> str:
    return "routed" if rule.routes else "kept"


@dataclass
class MaxWindow(Window):
    """MaxPool: `wta` routes each window's relevance to its arg-max input (the gradient; overlapping windows add
    up); `norm` treats it as sum pooling, whose sums the relevance graph computes."""
    ops: Ops | None = None

    @cached_property
    def output(self) -> Tensor:
        return self.forward(self.ops, self.x)

    def route(self, ops: Ops, rule: Rule, relevance: Sequence[Tensor | None]) -> list[Tensor | None]:
        node = self.node
        if len(node.outputs) < 2:
            node.outputs.append(gs.Variable(ops.fresh(f"{node.name}/indices"), dtype=np.int64))
        return [ops.scatter_flat(node.inputs[0], node.outputs[1], relevance[0], add=_overlapping(node))]


@family("max pooling", ("MaxPool",), ("wta", "norm"), min_opset=lambda node: 16 if _overlapping(node) else 0,
        zeros=_max_zeros)
def max_pool(ctx: Context, node: gs.Node) -> Layer:
    return MaxWindow(node, *_window(node, average=False), average=False, ops=ctx.ops)


@dataclass
class MaxReduction(Reduction):
    """GlobalMaxPool, ReduceMax: `wta` gives the relevance of each maximum to the inputs that attain it (shared
    equally between ties, which is the gradient); `norm` treats the maximum as a sum."""
    ops: Ops | None = None

    @cached_property
    def output(self) -> Tensor:
        return self.forward(self.ops, self.x)

    def route(self, ops: Ops, rule: Rule, relevance: Sequence[Tensor | None]) -> list[Tensor | None]:
        x, maximum = self.node.inputs[0], self.node.outputs[0]
        kept = (lambda t: t) if self.keepdims else (lambda t: ops.unsqueeze(t, self.axes))
        winners = ops("Cast", ops("Equal", x, kept(maximum)), to=onnx.helper.np_dtype_to_tensor_dtype(ops.dtype))
        shares = ops("Div", kept(relevance[0]), ops.reduce_sum(winners, self.axes))
        return [ops("Mul", winners, shares)] + [None] * (len(self.node.inputs) - 1)


@family("max reduction", ("GlobalMaxPool", "ReduceMax"), ("wta", "norm"), zeros=_max_zeros)
def max_reduction(ctx: Context, node: gs.Node) -> Layer:
    return MaxReduction(node, *_reduction(node), ops=ctx.ops)


@dataclass
class SoftMin(OfNode, Routing):
    """A one-class SVM's outlier score o = -log(sum_j exp(-gamma h_j)) / gamma, a soft min-pooling over
    h_j = d_j - log(a_j) / gamma, d_j its squared distances (canonical/classic.py). Relevance goes to each distance by
    the gradient of a soft-min of stiffness `stiffness` x gamma, R_j = softmin_j(stiffness gamma h) R: min-take-most
    (with stiffness 1, the pooling's own gradient)."""
    node: gs.Node
    stiffness: float

    def route(self, ops: Ops, rule: Rule, relevance: Sequence[Tensor | None]) -> list[Tensor | None]:
        gamma = float(self.node.attrs["gamma"])
        h = ops("Sub", self.x, ops.const(np.asarray(self.node.attrs["log_weights"]) / gamma))
        shares = ops("Softmax", ops("Mul", h, ops.scalar(-self.stiffness * gamma)), axis=1)
        return [ops("Mul", shares, relevance[0])]


@family("outlier score", (OUTLIER_SCORE,), ("minpool",))
def outlier_score(ctx: Context, node: gs.Node) -> Layer:
    return SoftMin(node, float(ctx.rule(node)[1]["stiffness"]))


FAMILIES = (average_pool, reduction, max_pool, max_reduction, outlier_score)

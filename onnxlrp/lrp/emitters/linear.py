"""Linear layers (Gemm, MatMul by a constant, Conv, ConvTranspose, and a classic model's scores): a forward pass, its
input-gradient, and the emitter that applies any rule of rules.py to them."""
from __future__ import annotations

from dataclasses import dataclass
import numpy as np
import onnx_graphsurgeon as gs

from ...canonical.classic import CENTROIDS, LINEAR_MODEL
from ...errors import LrpError
from ...ir.graph import constant, static
from ...ir.ops import Ops, Tensor
from ..facts import computed
from ..families import Context, Unsupported, family
from ..rules import Layer, OfNode, Weighted
from .transformer import Product

LINEAR_OPS = ("Gemm", "MatMul", "Conv", "ConvTranspose")
LINEAR_RULES = ("epsilon", "zero", "gamma", "zplus", "alpha_beta", "zbox", "flat", "wsquare", "norm")


class Linear(OfNode, Weighted):
    """A linear layer with a constant weight: the layers whose relevance `--layer-relevance` records."""


@dataclass
class Dense(Linear):
    """y = x @ weight + bias with weight [K, M] (Gemm after canonicalisation, or a MatMul by a constant, whose
    bias the canonical MatMul(x, W, b) carries: canonical/patterns.py).

    Weights keep the layout the model stores (`rows`: [M, K], a Gemm with transB); modified ones are computed in
    the graph from the model's initializer. The forward pass and its input-gradient are Gemms over the same
    tensor with and without transB: no transposed copy.
    """
    node: gs.Node
    weight: np.ndarray
    bias: np.ndarray | None
    rows: bool = False

    @property
    def matrix(self) -> bool:
        """Whether the layer's input is a batch of vectors (rank 2), the case Gemm covers."""
        shape = self.node.inputs[0].shape
        return shape is not None and len(shape) == 2

    def parameters(self) -> tuple[Tensor, Tensor | None]:
        return self.node.inputs[1], self.node.inputs[2] if self.bias is not None else None

    def stored(self, weight: Tensor | np.ndarray) -> Tensor:
        """A weight tensor in the model's layout; the layer's own array stands for its initializer."""
        return self.node.inputs[1] if weight is self.weight else weight

    def forward(self, ops: Ops, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        if self.matrix:
            return ops("Gemm", x, weight, *([bias] if bias is not None else []), transB=int(self.rows))
        product = ops("MatMul", x, weight)
        return product if bias is None else ops("Add", product, bias)

    def backward(self, ops: Ops, s: Tensor, weight: Tensor | np.ndarray) -> Tensor:
        if self.matrix:
            return ops("Gemm", s, self.stored(weight), transB=int(not self.rows))
        return ops("MatMul", s, ops("Transpose", self.stored(weight)))

    def constant_input(self, ops: Ops, values: np.ndarray) -> Tensor:
        features = self.weight.shape[0]
        return ops("Expand", ops.const(_per_channel(self.node, values, features).reshape(1, -1)),
                   ops.ints([1, features]))


@dataclass
class Convolution(Linear):
    """Conv and ConvTranspose; the input-gradient of one is the other with the same weight and attributes."""
    node: gs.Node
    weight: np.ndarray
    bias: np.ndarray | None
    in_shape: list[int]
    out_shape: list[int]

    @property
    def transposed(self) -> bool:
        return self.node.op == "ConvTranspose"

    def parameters(self) -> tuple[Tensor, Tensor | None]:
        return self.node.inputs[1], self.node.inputs[2] if self.bias is not None else None

    def forward(self, ops: Ops, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return ops(self.node.op, x, weight, *([bias] if bias is not None else []), **self.node.attrs)

    def backward(self, ops: Ops, s: Tensor, weight: Tensor) -> Tensor:
        kernel = list(self.weight.shape[2:])
        if not self.transposed:
            return ops.transposed_conv(s, weight, self.node.attrs, self.in_shape[2:], self.out_shape[2:], kernel,
                                       self.weight.shape)
        # With the ConvTranspose's pads and strides (output_padding < stride), the Conv lands on the input's shape.
        attrs = {k: v for k, v in self.node.attrs.items() if k != "output_padding"}
        return ops("Conv", s, weight, **attrs)

    def constant_input(self, ops: Ops, values: np.ndarray) -> Tensor:
        flat = _per_channel(self.node, values, self.in_shape[1])
        per_channel = flat.reshape((1, -1) + (1,) * (len(self.in_shape) - 2))
        return ops("Expand", ops.const(per_channel), ops.ints([1] + list(self.in_shape[1:])))


def linear_layer(node: gs.Node) -> Dense | Convolution:
    """The canonical form of a linear node, or Unsupported with the reason."""
    x = node.inputs[0]
    weight = constant(node.inputs[1]) if len(node.inputs) > 1 else None
    if weight is None or not computed(x):
        raise Unsupported("a linear layer needs a computed input and a constant weight "
                          "(a product of two computed tensors is not supported)")
    bias = constant(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2].name else None
    if node.op in ("Gemm", "MatMul"):
        if weight.ndim != 2:
            raise Unsupported(f"MatMul by a constant of rank {weight.ndim} is not supported")
        rows = bool(node.attrs.get("transB", 0))
        weight = weight.T if rows else weight  # a view: [K, M] for the rules, no copy
        if bias is not None and node.op == "MatMul":  # the canonical MatMul's bias, of any broadcastable shape
            bias = np.broadcast_to(bias.reshape(-1), weight.shape[1:])
        if set(node.attrs) - {"transB"} or (bias is not None and bias.shape != weight.shape[1:]):
            raise Unsupported("Gemm with a C that is not a per-feature constant bias is not supported")
        return Dense(node, weight, bias, rows)
    in_shape, out_shape = x.shape, node.outputs[0].shape
    if not static(in_shape) or not static(out_shape):
        raise Unsupported("convolutions need static channel and spatial dimensions")
    return Convolution(node, weight, bias, list(in_shape), list(out_shape))


def is_layer(node: gs.Node) -> bool:
    """Whether a linear node is a layer with a constant weight (a MatMul of two computed tensors is not)."""
    weight = constant(node.inputs[1]) if len(node.inputs) > 1 else None
    return computed(node.inputs[0]) and weight is not None and (node.op != "MatMul" or weight.ndim == 2)


@family("linear", LINEAR_OPS, LINEAR_RULES,
        zeros=lambda node, rule: "kept" if is_layer(node) and rule.keeps_zeros else None)
def linear(ctx: Context, node: gs.Node) -> Layer:
    """A layer with a constant weight, or a MatMul of two computed tensors (a product: transformer.py)."""
    return Product(node) if node.op == "MatMul" and not is_layer(node) else linear_layer(node)


@family("linear model", (LINEAR_MODEL,), ("zero",) + tuple(r for r in LINEAR_RULES if r != "zero"),
        zeros=lambda node, rule: "kept" if rule.keeps_zeros else None)
def linear_model(ctx: Context, node: gs.Node) -> Layer:
    """A classic model's scores (canonical/classic.py): one dense layer, LRP-0 unless the composite names its op type,
    so that each feature gets its exact contribution w_ci x_i. It is not a `first_linear` layer of the presets."""
    return _scores(node)


@family("centroids", (CENTROIDS,), ("midpoint", "zero", "epsilon"),
        zeros=lambda node, rule: "kept" if rule.keeps_zeros else None)
def centroids(ctx: Context, node: gs.Node) -> Layer:
    """A k-means model's scores (canonical/classic.py), whose differences are the discriminants between clusters
    that its logit min-pools (lrp/seed.py); NEON's midpoint rule by default."""
    return _scores(node)


def _scores(node: gs.Node) -> Dense:
    """A classic model's scores node (canonical/classic.py) as the dense layer of its weight and bias."""
    return Dense(node, constant(node.inputs[1]).T, constant(node.inputs[2]), rows=True)


FAMILIES = (linear, linear_model, centroids)


def _per_channel(node: gs.Node, values: np.ndarray, channels: int) -> np.ndarray:
    """Input bounds (zbox's low and high) as a flat array of 1 or `channels` values, else a clear error."""
    flat = values.reshape(-1)
    if flat.size not in (1, channels):
        raise LrpError(f"node '{node.name}' ({node.op}): low/high (--low/--high) give {flat.size} values, but its "
                       f"input has {channels} channels: give 1 value or {channels}")
    return flat

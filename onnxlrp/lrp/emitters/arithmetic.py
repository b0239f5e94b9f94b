"""Elementwise arithmetic with broadcasting (Add, Sub, Mul, Div), Expand and Where.

Rules of the arithmetic family:
  norm    constants pass relevance unchanged (docs/lrp.md §4); a sum of two computed tensors splits it in proportion.
  absorb  a constant addend keeps its share too: R_x = x / (x + c) * R (docs/attnlrp.md §3, the transformer presets).
  stop    as absorb; in a product with a gate (an activation's output) the gate is a constant, so the signal gets
          all (CP-LRP).
  pairs   on a Mul of two ReLU'd projections: the product rule of `norm`, and the relevance of pairs of the
          projected features as the output relevance_pairs (lrp/pairs.py).
Every rule: a Mul or Div by a constant passes; a Div by a computed tensor treats it as a constant; a Sigmoid gate
gives all to its signal (signal-take-all, Arras et al. 2017; a constant signal keeps it); any other product of two
computed tensors gives each factor half (AttnLRP's uniform rule).
A broadcast operand gets the sum over the axes it was broadcast along. Written-out constructs (a softmax, an
activation x * f(x), a dense layer's bias) reach the walk as canonical nodes (canonical/patterns.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import onnx_graphsurgeon as gs

from ...canonical.patterns import GATES, is_activation
from ...ir.graph import scalar_constant
from ...ir.ops import Ops, Tensor
from ..facts import computed
from ..families import Context, Unsupported, family
from ..rules import Layer, OfNode, Rule, Shared

ARITHMETIC_RULES = ("norm", "absorb", "stop", "pairs")


def unbroadcast(ops: Ops, relevance: Tensor, operand: Tensor, output: Tensor, matrix_axes: int = 0) -> Tensor:
    """`relevance` (the output's shape, or for a MatMul operand its batch axes and the operand's last two axes)
    summed over the axes along which `operand` was broadcast."""
    if operand.shape is None or output.shape is None:
        raise Unsupported("broadcasting needs the ranks of the operands")
    lead = len(output.shape) - len(operand.shape)
    batch = list(operand.shape)[:len(operand.shape) - matrix_axes]
    axes = list(range(lead)) + [lead + i for i, d in enumerate(batch) if d == 1 and output.shape[lead + i] != 1]
    if not axes:
        return relevance
    summed = ops.reduce_sum(relevance, axes, keepdims=True)
    return ops.reshape_like(summed, operand) if lead else summed


@dataclass
class Operands(OfNode, Shared):
    """A node whose computed inputs share its output as the denominator (constants get no relevance)."""
    node: gs.Node

    @property
    def inputs(self) -> list[Tensor | None]:
        return [t if computed(t) else None for t in self.node.inputs]


class Elementwise(Operands):
    """A node with broadcasting operands; relevance reaching an operand is summed over its broadcast axes."""

    def fit(self, ops: Ops, index: int, relevance: Tensor) -> Tensor:
        return unbroadcast(ops, relevance, self.node.inputs[index], self.output)

    def shares(self, rule: Rule) -> list[float]:
        """What share of the relevance each operand gets where relevance passes unchanged (0: none)."""
        return [1.0 if t is not None else 0.0 for t in self.inputs]

    def route(self, ops: Ops, rule: Rule, relevance: Sequence[Tensor | None]) -> list[Tensor | None]:
        """Each operand's share of R, summed over its broadcast axes."""
        parts = {share: relevance[0] if share == 1 else ops("Mul", relevance[0], ops.scalar(share))
                 for share in set(self.shares(rule)) - {0.0}}
        return [self.fit(ops, index, parts[share]) if share else None
                for index, share in enumerate(self.shares(rule))]


class Sum(Elementwise):
    """Add, Sub: z = a +- b. With one computed operand, the constant absorbs nothing under `norm`; a sum of two
    computed tensors (and any sum under absorb and stop) splits R in proportion: c = s, -s for Sub's subtrahend."""

    def passes(self, rule: Rule) -> bool:
        return not rule.absorbs and sum(t is None for t in self.inputs) == 1

    def backward(self, ops: Ops, s: Tensor) -> list[Tensor | None]:
        return [s, ops("Neg", s) if self.node.op == "Sub" else s]


class Scaling(Elementwise):
    """Mul or Div by a constant (Div by a computed tensor: the denominator is a constant to the walk, as the sigma
    of a norm is): R passes to the computed operand, except to a Sigmoid gate of a constant signal, which keeps it
    (signal-take-all: a recurrent cell's gate times its constant initial state or bias)."""

    def passes(self, rule: Rule) -> bool:
        return True

    def shares(self, rule: Rule) -> list[float]:
        numerator = float(computed(self.node.inputs[0]))
        if self.node.op == "Div":
            return [numerator, 0.0]
        return [0.0 if t is not None and is_gate(t) else share for t, share in zip(self.inputs, super().shares(rule))]


def is_gate(tensor: Tensor) -> bool:
    """Whether a tensor is a Sigmoid gate's output, or its complement 1 - gate (a GRU's h = (1 - z) n + z h)."""
    producer = tensor.inputs[0] if tensor.inputs else None
    if producer is not None and producer.op == "Sub":
        one = scalar_constant(producer.inputs[0])
        return one is not None and float(one) == 1.0 and is_gate(producer.inputs[1])
    return producer is not None and producer.op in GATES


class Gated(Elementwise):
    """signal * gate of two computed tensors: a Sigmoid gate (or 1 - one) gives all to its signal, and under a rule
    that detaches gates (stop) so does an activation's output; otherwise each factor gets half (AttnLRP's uniform
    rule)."""

    def passes(self, rule: Rule) -> bool:
        return True

    def shares(self, rule: Rule) -> list[float]:
        a, b = self.node.inputs
        for signal, gate in ((a, b), (b, a)):
            if (is_gate(gate) and not is_gate(signal)) or \
                    (rule.detaches and is_activation(gate, computed) and not is_activation(signal, computed)):
                return [1.0 if t is signal else 0.0 for t in self.node.inputs]
        return [0.5, 0.5]


def _zeros(node: gs.Node, rule: Rule) -> str | None:
    """A sum of two computed tensors gives each its own share, the operand times R / z."""
    return "kept" if node.op in ("Add", "Sub") and all(computed(t) for t in node.inputs) else None


@family("arithmetic", ("Add", "Sub", "Mul", "Div"), ARITHMETIC_RULES, zeros=_zeros)
def arithmetic(ctx: Context, node: gs.Node) -> Layer:
    computed_operands = sum(computed(t) for t in node.inputs)
    if node.op in ("Add", "Sub"):
        return Sum(node)
    if node.op == "Div" and not computed(node.inputs[0]):
        raise Unsupported("a Div of a constant by a computed tensor is not supported")
    return Scaling(node) if node.op == "Div" or computed_operands == 1 else Gated(node)


FAMILIES = (arithmetic,)

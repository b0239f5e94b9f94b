"""Elementwise arithmetic with broadcasting (Add, Sub, Mul, Div), Expand and Where.

Rules of the arithmetic family:
  norm    constants pass relevance unchanged (LRP.md §4); a sum of two computed tensors splits it in proportion.
  absorb  a constant addend keeps its share too: R_x = x / (x + c) * R (ATTNLRP.md §3, the transformer presets).
  stop    as absorb; in a gated product the gate is a constant, so the signal gets all (CP-LRP).
Every rule: a Mul or Div by a constant passes; a Div by a computed tensor treats it as a constant (the sigma of a
norm written out); x * f(x) is one activation (identity); a Sigmoid gate gives all to its signal; any other product
of two computed tensors gives each factor half (AttnLRP's uniform rule); the Div of a softmax written out gets the
softmax rule (softmax.py). A broadcast operand gets the sum over the axes it was broadcast along. The Add of a
dense layer's bias after a MatMul (graph.bias_add) passes: the layer's rule counts the bias, as in a Gemm.
"""
from __future__ import annotations

from typing import Sequence

import onnx_graphsurgeon as gs

from . import softmax
from .graph import biased_matmul
from .ops import Ops, Tensor
from .registry import Context, Unsupported, computed, family

ARITHMETIC_RULES = ("norm", "absorb", "stop")
GATES = ("Sigmoid", "HardSigmoid")
# Ops whose output is an elementwise nonlinearity of their one computed input (a gate in a gated product).
ACTIVATION_OPS = GATES + ("Relu", "Gelu", "Tanh", "Elu", "Selu", "Softplus", "Mish", "HardSwish", "Erf")
# How far up a chain of ops an operand of a Mul is searched for the other operand (x * f(x) activations).
ACTIVATION_DEPTH = 8


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


def _zeros(node: gs.Node, rule: str) -> str | None:
    """A sum of two computed tensors gives each its own share, the operand times R / z."""
    sums = node.op in ("Add", "Sub") and all(computed(t) for t in node.inputs) and not softmax.subtracts_max(node)
    return "kept" if sums else None


@family("arithmetic", ("Add", "Sub", "Mul", "Div"), ARITHMETIC_RULES, zeros=_zeros)
def emit_arithmetic(ctx: Context, node: gs.Node, relevance: Sequence[Tensor | None]) -> list[Tensor | None]:
    rule, params = ctx.rule(node)
    output, upper = node.outputs[0], relevance[0]
    flags = [computed(t) for t in node.inputs]
    if biased_matmul(node) is not None:  # a dense layer's bias: the layer's rule accounts for it (linear.py)
        return [upper if flag else None for flag in flags]
    if node.op in ("Add", "Sub"):
        if (flags.count(True) == 1 and rule == "norm") or softmax.subtracts_max(node):
            shares = [upper if flag else None for flag in flags]
        else:
            s = ctx.ops.divide_stabilized(upper, output, params["stabilizer"], rectified=ctx.rectified(output))
            shares = [_times(ctx, t, s) if flag else None for t, flag in zip(node.inputs, flags)]
            if node.op == "Sub" and shares[1] is not None:
                shares[1] = ctx.ops("Neg", shares[1])
    elif node.op == "Div" and all(flags) and softmax.written_out(node):
        shares = softmax.emit_written_out(ctx, node, upper)
    elif node.op == "Div":
        if not flags[0]:
            raise Unsupported("a Div of a constant by a computed tensor is not supported")
        shares = [upper, None]
    elif flags.count(True) == 1:
        shares = [upper if flag else None for flag in flags]
    else:
        shares = _product(ctx.ops, node, upper, rule)
    return [unbroadcast(ctx.ops, share, t, output) if share is not None else None
            for share, t in zip(shares, node.inputs)]


def _times(ctx: Context, operand: Tensor, s: Tensor) -> Tensor:
    """operand * s, and 0 where s is 0 if the operand may be infinite (scores masked with -inf before a softmax)."""
    product = ctx.ops("Mul", operand, s)
    return product if ctx.finite(operand) else ctx.ops.zero_where_zero(s, product)


def _product(ops: Ops, node: gs.Node, relevance: Tensor, rule: str) -> list[Tensor | None]:
    """Mul of two computed tensors: an activation x * f(x) or a Sigmoid gate gives all to the signal; under `stop`
    a gate (an activation's output times a tensor that is not one) too; otherwise each factor gets half."""
    a, b = node.inputs
    for signal, gate in ((a, b), (b, a)):
        if _activation_of(gate, signal) or (_producer_op(gate) in GATES and _producer_op(signal) not in GATES) or \
                (rule == "stop" and _is_activation(gate) and not _is_activation(signal)):
            return [relevance if t is signal else None for t in node.inputs]
    half = ops("Mul", relevance, ops.scalar(0.5))
    return [half, half]


def _producer_op(tensor: Tensor) -> str | None:
    return tensor.inputs[0].op if tensor.inputs else None


def _is_activation(tensor: Tensor) -> bool:
    """Whether a tensor is an activation's output: an activation op, x * f(x) written out (SiLU, GELU), or a
    constant multiple of one."""
    producer = tensor.inputs[0] if tensor.inputs else None
    if producer is None or producer.op in ACTIVATION_OPS:
        return producer is not None
    if producer.op not in ("Mul", "Div"):
        return False
    sources = [t for t in producer.inputs if computed(t)]
    if len(sources) == 1:
        return _is_activation(sources[0])
    a, b = producer.inputs
    return producer.op == "Mul" and (_activation_of(a, b) or _activation_of(b, a))


def _activation_of(gate: Tensor, signal: Tensor) -> bool:
    """Whether `gate` is a function of `signal` (or of a tensor that `signal` only scales) alone, within a few ops:
    then signal * gate is one activation such as x * sigmoid(x) or 0.5 * x * (1 + erf(x / sqrt 2))."""
    for root in _scaled_chain(signal):
        if _function_of(gate, root, ACTIVATION_DEPTH):
            return True
    return False


def _scaled_chain(tensor: Tensor) -> list[Tensor]:
    """`tensor` and the tensors it is a constant multiple of (through Mul/Div by constants)."""
    chain = [tensor]
    while tensor.inputs and tensor.inputs[0].op in ("Mul", "Div") and len(chain) <= ACTIVATION_DEPTH:
        producer = tensor.inputs[0]
        sources = [t for t in producer.inputs if computed(t)]
        if len(sources) != 1 or (producer.op == "Div" and sources[0] is not producer.inputs[0]):
            break
        tensor = sources[0]
        chain.append(tensor)
    return chain


def _function_of(tensor: Tensor, source: Tensor, depth: int) -> bool:
    """Whether every computed input on the way up from `tensor` leads to `source` within `depth` ops."""
    if depth == 0 or not tensor.inputs:
        return False
    sources = [t for t in tensor.inputs[0].inputs if computed(t)]
    return bool(sources) and all(t is source or _function_of(t, source, depth - 1) for t in sources)


@family("expand", ("Expand",), ("pass",))
def emit_expand(ctx: Context, node: gs.Node, relevance: Sequence[Tensor | None]) -> list[Tensor | None]:
    """The copies' relevance adds up on the element they copy."""
    return [unbroadcast(ctx.ops, relevance[0], node.inputs[0], node.outputs[0]), None]


@family("where", ("Where",), ("pass",))
def emit_where(ctx: Context, node: gs.Node, relevance: Sequence[Tensor | None]) -> list[Tensor | None]:
    """Each element's relevance goes to the operand it was selected from."""
    condition, a, b = node.inputs
    ops, zero = ctx.ops, ctx.ops.scalar(0.0)
    chosen = [ops("Where", condition, relevance[0], zero), ops("Where", condition, zero, relevance[0])]
    return [None] + [unbroadcast(ops, r, t, node.outputs[0]) if computed(t) else None for r, t in zip(chosen, (a, b))]

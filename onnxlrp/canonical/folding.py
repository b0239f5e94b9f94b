"""Folding what follows a linear layer into it (in float64): BatchNormalization, as Zennit's canonizer does,
and per-channel arithmetic with constants."""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ..ir.graph import constant, replace
from ..ir.names import fresh_name

FOLDABLE = ("Conv", "ConvTranspose", "Gemm")


def fold_batchnorm(graph: gs.Graph) -> None:
    """Merge every BatchNormalization that directly follows a Conv, ConvTranspose or Gemm into it.

    A BatchNormalization that cannot be folded stays in the graph and later gets the `pass` rule.
    """
    graph_outputs = {id(t) for t in graph.outputs}
    for norm in [n for n in graph.nodes if n.op == "BatchNormalization"]:
        producer = _linear_producer(norm.inputs[0], graph_outputs)
        params = [constant(t) for t in norm.inputs[1:5]]
        if producer is None or len(norm.outputs) != 1 or any(p is None for p in params):
            continue
        gamma, beta, mean, var = (p.astype(np.float64) for p in params)
        scale = gamma / np.sqrt(var + norm.attrs.get("epsilon", 1e-5))
        weight, bias = _parameters(producer, len(scale))
        _absorb(graph, norm, producer, _scale_outputs(producer, weight, scale), (bias - mean) * scale + beta)


def _linear_producer(tensor: gs.Tensor, graph_outputs: set[int]) -> gs.Node | None:
    """The Conv, ConvTranspose or Gemm (with a constant weight) whose output `tensor` is, if the one node that
    reads it can be folded into it."""
    producer = tensor.inputs[0] if isinstance(tensor, gs.Variable) and tensor.inputs else None
    if (producer is None or producer.op not in FOLDABLE or len(tensor.outputs) != 1
            or id(tensor) in graph_outputs or constant(producer.inputs[1]) is None):
        return None
    return producer


def _parameters(producer: gs.Node, channels: int) -> tuple[np.ndarray, np.ndarray]:
    """A linear node's weight and bias in float64 (zeros where it has no bias)."""
    weight = producer.inputs[1].values.astype(np.float64)
    has_bias = len(producer.inputs) > 2 and isinstance(producer.inputs[2], gs.Constant)
    return weight, producer.inputs[2].values.astype(np.float64) if has_bias else np.zeros(channels)


def _absorb(graph: gs.Graph, folded: gs.Node, producer: gs.Node, weight: np.ndarray, bias: np.ndarray,
            chain_end: gs.Node | None = None) -> None:
    """Give the linear node the folded parameters (new constants in its weight's type: the old ones may be shared
    with other nodes), and the folded node's output to it (or to the last node of the layout chain between them)."""
    dtype = producer.inputs[1].values.dtype
    weights = gs.Constant(fresh_name(graph, f"{folded.name}/folded_weight"), weight.astype(dtype))
    biases = gs.Constant(fresh_name(graph, f"{folded.name}/folded_bias"), bias.astype(dtype))
    replace(producer.inputs, [producer.inputs[0], weights, biases])
    replace((chain_end or producer).outputs, [folded.outputs[0]])
    folded.outputs.clear()
    folded.inputs.clear()


def _scale_outputs(producer: gs.Node, weight: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Multiply the weight of each output channel (or feature) by its factor."""
    if producer.op == "Gemm" and not producer.attrs.get("transB", 0):
        return weight * scale[None, :]
    if producer.op in ("Conv", "Gemm"):  # output channels (features) first
        return weight * scale.reshape((-1,) + (1,) * (weight.ndim - 1))
    groups = producer.attrs.get("group", 1)
    grouped = weight.reshape((groups, weight.shape[0] // groups) + weight.shape[1:])
    factors = scale.reshape((groups, 1, weight.shape[1]) + (1,) * (weight.ndim - 2))
    return (grouped * factors).reshape(weight.shape)


AFFINE = ("Mul", "Div", "Add", "Sub")


def fold_affine(graph: gs.Graph) -> None:
    """Merge a per-channel Mul, Div, Add or Sub by a constant that directly follows a Conv, ConvTranspose or
    Gemm into it (a BatchNorm or bias that an exporter wrote as arithmetic, as tf2onnx does). One pass in
    topological order folds whole chains: a folded node hands its output to the linear node."""
    graph_outputs = {id(t) for t in graph.outputs}
    for node in [n for n in graph.nodes if n.op in AFFINE and len(n.inputs) == 2]:
        data, other = node.inputs if constant(node.inputs[1]) is not None else node.inputs[::-1]
        source, chain_end, axis = _through_layout(data, graph_outputs)
        producer = _linear_producer(source, graph_outputs)
        if producer is None or constant(other) is None or (node.op in ("Div", "Sub") and other is node.inputs[0]):
            continue
        factors = _per_channel(other.values, data.shape, axis)
        if factors is None:
            continue
        weight, bias = _parameters(producer, len(factors))
        if node.op in ("Mul", "Div"):
            scale = factors if node.op == "Mul" else 1.0 / factors
            weight, bias = _scale_outputs(producer, weight, scale), bias * scale
        else:
            bias = bias + (factors if node.op == "Add" else -factors)
        _absorb(graph, node, producer, weight, bias, chain_end)


LAYOUT = ("Transpose", "Cast")


def _through_layout(tensor: gs.Tensor, graph_outputs: set[int]) -> tuple[gs.Tensor, gs.Node | None, int]:
    """Follow `tensor` back through Transposes and float-to-float Casts that nothing else reads (torch exports of
    nets ported from TensorFlow: Conv, Transpose, Cast, Add(bias)). Returns the tensor before them, the last of
    them (None if there is none) and the axis of `tensor` that holds the channels of the tensor before them."""
    chain = []
    while (isinstance(tensor, gs.Variable) and len(tensor.inputs) == 1 and tensor.inputs[0].op in LAYOUT
           and len(tensor.outputs) == 1 and id(tensor) not in graph_outputs):
        node = tensor.inputs[0]
        if node.op == "Cast" and not all(np.issubdtype(np.dtype(t.dtype or np.int8), np.floating)
                                         for t in (node.inputs[0], node.outputs[0])):
            break
        chain.append(node)
        tensor = node.inputs[0]
    axis = 1
    for node in reversed(chain):
        if node.op == "Transpose":
            perm = node.attrs.get("perm") or list(range(len(node.inputs[0].shape or [])))[::-1]
            axis = list(perm).index(axis) if axis in perm else -1
    return tensor, (chain[0] if chain else None), axis


def _per_channel(values: np.ndarray, shape, axis: int = 1) -> np.ndarray | None:
    """The constant as one value per output channel, if it only varies along `axis` (where the linear layer's
    channels sit) of the tensor it is applied to."""
    if shape is None or not 0 <= axis < len(shape) or not isinstance(shape[axis], int):
        return None
    channels, rank = shape[axis], len(shape)
    if values.ndim > rank:
        return None
    padded = values.reshape((1,) * (rank - values.ndim) + values.shape)
    if any(d != 1 for i, d in enumerate(padded.shape) if i != axis) or padded.shape[axis] not in (1, channels):
        return None
    return np.broadcast_to(padded.reshape(-1).astype(np.float64), (channels,)).copy()


def fold(graph: gs.Graph) -> dict[str, tuple[str, ...]]:
    """Fold BatchNormalization, then per-channel arithmetic, into the linear layers before them; return, per linear
    node, the nodes folded into it ("name (op)"), for `inspect`."""
    candidates = {id(n): n for n in graph.nodes if n.op in ("BatchNormalization",) + AFFINE}
    producers = {id(n): n.inputs[0].inputs[0] if n.inputs and n.inputs[0].inputs else None
                 for n in candidates.values()}
    for n in candidates.values():  # an affine constant may be either input
        if n.op != "BatchNormalization" and len(n.inputs) == 2 and n.inputs[1].inputs:
            producers[id(n)] = producers[id(n)] or n.inputs[1].inputs[0]
    fold_batchnorm(graph)
    fold_affine(graph)  # folded nodes hand their (inferred) output tensor to the linear node: shapes stay
    folded: dict[str, list[str]] = {}
    for key, node in candidates.items():
        if not node.outputs and producers[key] is not None:  # _absorb empties a folded node
            target = producers[key]
            while not target.outputs:  # a chain: follow to the linear node that absorbed it
                target = producers[id(target)]
            folded.setdefault(target.name, []).append(f"{node.name} ({node.op})")
    graph.cleanup().toposort()
    return {k: tuple(v) for k, v in folded.items()}

"""Folding BatchNormalization into the linear layer before it (in float64), as Zennit's canonizer does."""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from .model import constant, replace

FOLDABLE = ("Conv", "ConvTranspose", "Gemm")


def fold_batchnorm(graph: gs.Graph) -> None:
    """Merge every BatchNormalization that directly follows a Conv, ConvTranspose or Gemm into it.

    A BatchNormalization that cannot be folded stays in the graph and later gets the `pass` rule.
    """
    graph_outputs = {id(t) for t in graph.outputs}
    for norm in [n for n in graph.nodes if n.op == "BatchNormalization"]:
        producer = norm.inputs[0].inputs[0] if norm.inputs[0].inputs else None
        params = [constant(t) for t in norm.inputs[1:5]]
        if (producer is None or producer.op not in FOLDABLE or len(norm.outputs) != 1
                or any(p is None for p in params) or len(norm.inputs[0].outputs) != 1
                or id(norm.inputs[0]) in graph_outputs or constant(producer.inputs[1]) is None):
            continue
        gamma, beta, mean, var = (p.astype(np.float64) for p in params)
        scale = gamma / np.sqrt(var + norm.attrs.get("epsilon", 1e-5))
        weight = producer.inputs[1].values.astype(np.float64)
        has_bias = len(producer.inputs) > 2 and isinstance(producer.inputs[2], gs.Constant)
        bias = producer.inputs[2].values.astype(np.float64) if has_bias else np.zeros_like(scale)
        folded_weight = _scale_outputs(producer, weight, scale)
        folded_bias = (bias - mean) * scale + beta
        dtype = producer.inputs[1].values.dtype
        weights = gs.Constant(f"{producer.name}/bn_weight", folded_weight.astype(dtype))
        biases = gs.Constant(f"{producer.name}/bn_bias", folded_bias.astype(dtype))
        replace(producer.inputs, [producer.inputs[0], weights, biases])
        replace(producer.outputs, [norm.outputs[0]])
        norm.outputs.clear()
        norm.inputs.clear()


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

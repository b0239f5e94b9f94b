"""ONNX Runtime's MultiHeadAttention (com.microsoft), what its transformer optimizer fuses attention into, written
out in plain ops as attention.py does for ONNX's Attention: the projections' bias, heads split, the KV cache
concatenated before the new keys and values (the present outputs), Q K^T times the scale, the key padding mask
(mask_filter_value where it is 0), the attention bias, the causal mask (unidirectional), Softmax, P V."""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..errors import LrpError
from ..ir.graph import expand_each, optional_input
from ..ir.ops import Ops
from .attention import merge_heads, order_bias, scaled_scores, split_heads, with_cache

# Inputs by position: query, key, value, bias, key_padding_mask, attention_bias, past_key, past_value; then what
# this rewrite refuses when given.
REFUSED_INPUTS = {8: "past_sequence_length", 9: "cache_indirection"}


def expand_multihead_attention(graph: gs.Graph, strict: bool = True) -> bool:
    """Write every MultiHeadAttention node out in plain ops (ir/graph.py expand_each). Returns whether there was one."""
    return expand_each(graph, ("MultiHeadAttention",), _expand, strict)


def _expand(graph: gs.Graph, node: gs.Node) -> None:
    where = f"node '{node.name}' (MultiHeadAttention)"
    query, key, value, bias, padding, attention_bias, past_key, past_value = (
        optional_input(node, i) for i in range(8))
    refused = [name for index, name in REFUSED_INPUTS.items() if optional_input(node, index) is not None]
    if len(node.outputs) > 3 and (node.outputs[3].outputs or node.outputs[3] in graph.outputs):
        refused.append("output qk")
    shapes = [t.shape for t in (query, key, value) if t is not None]
    if key is None or value is None or any(s is None or len(s) != 3 for s in shapes):
        refused.append("packed or head-split query, key and value (3D ones are supported)")
    if padding is not None and (padding.shape is None or len(padding.shape) != 2):
        refused.append("a key padding mask other than [N, L]")
    if refused:
        raise LrpError(f"{where}: {', '.join(refused)} is not supported")
    heads, hidden = node.attrs["num_heads"], query.shape[2]
    if not isinstance(hidden, int) or hidden % heads or query.dtype is None:
        raise LrpError(f"{where}: needs a query of known type and static hidden size")
    size = hidden // heads
    ops = Ops(graph, graph.opset, np.dtype(query.dtype))
    ops.scope = node.name
    if bias is not None:
        query, key, value = (ops("Add", t, ops("Slice", bias, ops.ints([i * hidden]), ops.ints([(i + 1) * hidden]),
                                                   ops.ints([0]))) for i, t in enumerate((query, key, value)))
    q, k, v = (split_heads(ops, t, heads) for t in (query, key, value))  # [N, heads, S, size]
    present = with_cache(ops, (past_key, past_value), (k, v))
    scale = node.attrs.get("scale", 0.0) or 1.0 / np.sqrt(size)
    scores = scaled_scores(ops, q, present[0], scale)
    if padding is not None:
        kept = ops("Cast", ops("Unsqueeze", padding, ops.ints([1, 2])), to=onnx.TensorProto.BOOL)
        filtered = ops.scalar(node.attrs.get("mask_filter_value", -10000.0))
        scores = ops("Add", scores, ops("Where", kept, ops.scalar(0.0), filtered))
    if attention_bias is not None:
        scores = ops("Add", scores, attention_bias)
    if node.attrs.get("unidirectional", 0):
        scores = ops("Add", scores, order_bias(ops, q, past_key, present[0], True, (-1, -1)))
    probabilities = ops("Softmax", scores, axis=-1)
    y = merge_heads(ops, ops("MatMul", probabilities, present[1]))
    ops.stand_in(node, [y, *present])

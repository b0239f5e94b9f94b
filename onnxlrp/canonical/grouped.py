"""ONNX Runtime's GroupQueryAttention (com.microsoft), what its GenAI model builder writes for every attention
layer, written out in plain ops as attention.py does for ONNX's Attention: heads split, the rotary embedding
(do_rotary), the KV cache concatenated before the new keys and values (the present outputs), key and value heads
repeated, Q K^T times the scale (soft-capped), the causal and padding mask (and a sliding window), Softmax, P V."""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..errors import LrpError
from ..ir.graph import expand_each, optional_input
from ..ir.ops import Ops, Tensor
from .attention import merge_heads, positions_allowed, repeat_heads, scaled_scores, softcapped, with_cache
from .rotary import rotate

# Inputs by position: query, key, value, past_key, past_value, seqlens_k, total_sequence_length, cos_cache,
# sin_cache, then what this rewrite refuses when given.
REFUSED_INPUTS = {9: "position_ids", 10: "attention_bias", 11: "head_sink"}


def expand_grouped_attention(graph: gs.Graph, strict: bool = True) -> bool:
    """Write every GroupQueryAttention node out in plain ops (ir/graph.py expand_each); whether there was one."""
    return expand_each(graph, ("GroupQueryAttention",), _expand, strict)


def _expand(graph: gs.Graph, node: gs.Node) -> None:
    where = f"node '{node.name}' (GroupQueryAttention)"
    query, key, value, past_key, past_value, seqlens = (optional_input(node, i) for i in range(6))
    cos, sin = optional_input(node, 7), optional_input(node, 8)
    refused = [name for index, name in REFUSED_INPUTS.items() if optional_input(node, index) is not None]
    if node.attrs.get("smooth_softmax", 0) or refused:
        raise LrpError(f"{where}: {', '.join(refused) or 'smooth_softmax'} is not supported")
    heads, kv_heads = node.attrs["num_heads"], node.attrs["kv_num_heads"]
    hidden = query.shape[2] if query.shape is not None and len(query.shape) == 3 else None
    packed = key is None
    size = hidden // (heads + 2 * kv_heads if packed else heads) if isinstance(hidden, int) else None
    if not isinstance(size, int) or query.dtype is None:
        raise LrpError(f"{where}: needs a query of known type and static hidden size")
    ops = Ops(graph, graph.opset, np.dtype(query.dtype))
    ops.scope = node.name
    if packed:
        query, key, value = ops("Split", query, ops.ints([heads * size, kv_heads * size, kv_heads * size]),
                                axis=2, outputs=3)
    q, k, v = (ops("Reshape", t, ops.ints([0, 0, h, size])) for t, h in
               ((query, heads), (key, kv_heads), (value, kv_heads)))  # [N, S, heads, size]
    past = ops.length(past_key, 2) if past_key is not None else ops.scalar(0, np.int64)
    queries_at = ops("Add", ops.arange(ops.length(q, 1)), past)  # [S]: query i at position past + i
    if node.attrs.get("do_rotary", 0):
        if cos is None or cos.shape is None:
            raise LrpError(f"{where}: do_rotary needs cos_cache and sin_cache")
        positions = ops.unsqueeze(queries_at, [0])
        q, k = (rotate(ops, t, size, cos, sin, positions, 2 * cos.shape[1], node.attrs.get("rotary_interleaved", 0))
                for t in (q, k))
    q, k, v = (ops("Transpose", t, perm=[0, 2, 1, 3]) for t in (q, k, v))  # [N, heads, S, size]
    present = with_cache(ops, (past_key, past_value), (k, v))
    k, v = (repeat_heads(ops, t, (heads, kv_heads), size) for t in present)
    scale = node.attrs.get("scale", 0.0) or 1.0 / np.sqrt(size)
    scores = softcapped(ops, scaled_scores(ops, q, k, scale), node.attrs.get("softcap", 0.0))
    probabilities = ops("Softmax", ops("Add", scores, _bias(ops, seqlens, queries_at, present[0],
                                                             node.attrs.get("local_window_size", -1))), axis=-1)
    y = merge_heads(ops, ops("MatMul", probabilities, v))
    ops.stand_in(node, [y, *present])


def _bias(ops: Ops, seqlens: Tensor, queries_at: Tensor, keys: Tensor, window: int) -> Tensor:
    """0 where query i (at position `queries_at` [S], past + i) may read key j, -inf elsewhere, [N, 1, S, past + S]:
    j <= past + i (causal), j <= seqlens_k of its sample (the keys of a right-padded prompt), and within the window."""
    keys_at = ops.arange(ops.length(keys, 2))  # [L]
    left = window - 1 if window > 0 else -1
    allowed = positions_allowed(ops, ops.unsqueeze(queries_at, [1]), keys_at, True, left, -1)  # [S, L]
    last = ops("Cast", seqlens, to=onnx.TensorProto.INT64)  # [N]
    valid = ops("Not", ops("Greater", ops.unsqueeze(keys_at, [0]), ops.unsqueeze(last, [1])))  # [N, L]
    allowed = ops("And", ops.unsqueeze(allowed, [0]), ops.unsqueeze(valid, [1]))  # [N, S, L]
    return ops.unsqueeze(ops("Where", allowed, ops.scalar(0.0), ops.scalar(-np.inf)), [1])

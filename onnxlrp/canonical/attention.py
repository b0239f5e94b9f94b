"""ONNX's Attention op (opset 23 to 25) written out in plain ops, so that the MatMul, Softmax and Add emitters give
it AttnLRP's or CP-LRP's rules: heads split and repeated (grouped-query), the KV cache before the new keys and values
(the present outputs), soft-capping, the mask, the causal order and sliding windows counted from the cache's end."""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..errors import LrpError
from ..ir.graph import optional_input
from ..ir.ops import Ops, Tensor


# Attention (opset 23+): what this rewrite refuses when present, by input and output position.
REFUSED_INPUTS = {6: "nonpad_kv_seqlen"}
REFUSED_OUTPUTS = {3: "qk_matmul_output"}


def expand_attention(graph: gs.Graph) -> bool:
    """Write every Attention node out as its definition in plain ops (ONNX's reference: Q K^T times the scale,
    plus the mask and the causal bias, Softmax, times V), so that the MatMul, Softmax and Add emitters give it
    AttnLRP's or CP-LRP's rules. Returns whether there was one."""
    nodes = [n for n in graph.nodes if n.op == "Attention"]
    for node in nodes:
        _expand_attention(graph, node)
    return bool(nodes)


def _attention_refusal(graph: gs.Graph, node: gs.Node) -> str | None:
    """What of an Attention node the rewrite does not write out (nonpad_kv_seqlen, the scores as an output, a
    past key without a past value), or None."""
    outputs = {id(t) for t in graph.outputs}
    used = [name for index, name in REFUSED_OUTPUTS.items() if index < len(node.outputs)
            and (node.outputs[index].outputs or id(node.outputs[index]) in outputs)]
    given = [name for index, name in REFUSED_INPUTS.items() if optional_input(node, index) is not None]
    if (optional_input(node, 4) is None) != (optional_input(node, 5) is None):
        given.append("past_key without past_value (or the other way round)")
    if used or given:
        return ", ".join(given + [f"output {name}" for name in used])
    if any(t.shape is None or len(t.shape) != len(node.inputs[0].shape or []) for t in node.inputs[:3]) or \
            len(node.inputs[0].shape or []) not in (3, 4):
        return "inputs of unknown or different ranks (3 or 4 needed)"
    return None


def _expand_attention(graph: gs.Graph, node: gs.Node) -> None:
    where = f"node '{node.name}' (Attention)"
    refused = _attention_refusal(graph, node)
    if refused:
        raise LrpError(f"{where}: {refused} is not supported")
    q, k, v = node.inputs[:3]
    mask, past_key, past_value = (optional_input(node, index) for index in (3, 4, 5))
    ops = Ops(graph, graph.opset, np.dtype(q.dtype))
    ops.scope = node.name
    split = len(q.shape) == 3  # [N, S, heads * size]: split into heads, and merge them again at the end
    heads = (node.attrs.get("q_num_heads"), node.attrs.get("kv_num_heads")) if split else (q.shape[1], k.shape[1])
    sizes = [_head_size(t, h if split else None) for t, h in ((q, heads[0]), (k, heads[1]), (v, heads[1]))]
    lengths = [t.shape[1 if split else 2] for t in (q, k)]
    if not all(isinstance(n, int) and n > 0 for n in list(heads) + sizes) or heads[0] % heads[1]:
        raise LrpError(f"{where}: needs static head counts and head sizes (query heads a multiple of key heads)")
    if split:
        q, k, v = (split_heads(ops, t, h) for t, h in ((q, heads[0]), (k, heads[1]), (v, heads[1])))
    present = with_cache(ops, (past_key, past_value), (k, v))
    k, v = (repeat_heads(ops, t, heads, size) for t, size in zip(present, sizes[1:]))
    scale = node.attrs.get("scale", 1.0 / np.sqrt(sizes[0]))
    scores = softcapped(ops, scaled_scores(ops, q, k, scale), node.attrs.get("softcap", 0.0))
    windows = (node.attrs.get("left_window_size", -1), node.attrs.get("right_window_size", -1))
    bias = _attention_bias(ops, mask, node.attrs.get("is_causal", 0), windows, lengths, q, past_key, k, where)
    probabilities = _softmax(ops, scores if bias is None else ops("Add", scores, bias), node.attrs)
    if bias is not None and (mask is not None or windows != (-1, -1)):  # a row with every key masked: 0, not NaN
        masked = ops("Equal", ops("ReduceMax", bias, ops.ints([-1]), keepdims=1), ops.scalar(-np.inf))
        probabilities = ops("Where", masked, ops.scalar(0.0), probabilities)
    y = ops("MatMul", probabilities, v)
    if split:
        y = merge_heads(ops, y)
    ops.stand_in(node, [y, *present])


def with_cache(ops: Ops, caches: tuple[Tensor | None, Tensor | None], new: tuple[Tensor, Tensor]
               ) -> list[Tensor]:
    """The present keys and values [N, heads, past + S, size]: the KV cache (None: none) before the new ones."""
    return [ops("Concat", cache, t, axis=2) if cache is not None else t for cache, t in zip(caches, new)]


def softcapped(ops: Ops, scores: Tensor, cap: float) -> Tensor:
    """Soft-capping of attention scores (Gemma 2's), cap tanh(scores / cap), before the mask; the scores as they
    are for cap 0. The walk sees one SoftCap (canonical/patterns.py), whose relevance follows x times its gradient
    as LXT's does."""
    return ops("Mul", ops("Tanh", ops("Div", scores, ops.scalar(cap))), ops.scalar(cap)) if cap else scores


def positions_allowed(ops: Ops, queries_at: Tensor, keys_at: Tensor, causal: bool, left: int, right: int
                      ) -> Tensor | None:
    """Where query position p (queries_at [S, 1]) may read key position j (keys_at [L]): j <= p when causal,
    p - left <= j and j <= p + right for a sliding window (-1: that side unbounded); None when all may."""
    conditions = []
    if causal:
        conditions.append(ops("Not", ops("Greater", keys_at, queries_at)))
    if left >= 0:
        conditions.append(ops("Not", ops("Greater", ops("Sub", queries_at, keys_at), ops.scalar(left, np.int64))))
    if right >= 0:
        conditions.append(ops("Not", ops("Greater", ops("Sub", keys_at, queries_at), ops.scalar(right, np.int64))))
    allowed = conditions[0] if conditions else None
    for condition in conditions[1:]:
        allowed = ops("And", allowed, condition)
    return allowed


def _head_size(tensor: gs.Tensor, heads: int | None) -> int | None:
    """The size of one head: the last axis of a 4D input, the last axis over the head count of a 3D one."""
    last = tensor.shape[-1]
    if not isinstance(last, int) or (heads is not None and (not heads or last % heads)):
        return None
    return last // heads if heads is not None else last


def split_heads(ops: Ops, tensor: Tensor, heads: int) -> Tensor:
    """[N, S, heads * size] -> [N, heads, S, size]."""
    return ops("Transpose", ops("Reshape", tensor, ops.ints([0, 0, heads, -1])), perm=[0, 2, 1, 3])


def merge_heads(ops: Ops, tensor: Tensor) -> Tensor:
    """[N, heads, S, size] -> [N, S, heads * size]: split_heads undone."""
    return ops("Reshape", ops("Transpose", tensor, perm=[0, 2, 1, 3]), ops.ints([0, 0, -1]))


def scaled_scores(ops: Ops, q: Tensor, k: Tensor, scale: float) -> Tensor:
    """The attention scores Q K^T times `scale`, [N, heads, S, L]."""
    return ops("Mul", ops("MatMul", q, ops("Transpose", k, perm=[0, 1, 3, 2])), ops.scalar(scale))


def repeat_heads(ops: Ops, tensor: Tensor, heads: tuple[int, int], size: int) -> Tensor:
    """Grouped-query attention: each of the key/value heads repeated in place ([h0, h0, h1, h1, ...]) until there
    are as many as query heads (`heads`: query and key/value head counts)."""
    if heads[0] == heads[1]:
        return tensor
    times = heads[0] // heads[1]
    copies = ops("Expand", ops("Unsqueeze", tensor, ops.ints([2])), ops.ints([1, 1, times, 1, 1]))
    return ops("Reshape", copies, ops.ints([0, heads[0], -1, size]))


def _attention_bias(ops: Ops, mask: Tensor | None, causal: int, windows: tuple[int, int], lengths: list, q: Tensor,
                    past_key: Tensor | None, keys: Tensor, where: str) -> Tensor | None:
    """The additive bias of the scores: the mask (a boolean one as 0 / -inf) plus -inf where the causal order or
    the sliding window forbids a key; None when there is neither. Query i sits at position past + i (after the KV
    cache `past_key`), key j at j of the keys with the cache (`keys`)."""
    terms = []
    if mask is not None:
        if past_key is None and mask.shape is not None and isinstance(mask.shape[-1], int) and \
                mask.shape[-1] != lengths[1]:
            raise LrpError(f"{where}: an attn_mask shorter than the key sequence is not supported")
        is_bool = mask.dtype is not None and np.dtype(mask.dtype) == np.bool_
        terms.append(ops("Where", mask, ops.scalar(0.0), ops.scalar(-np.inf)) if is_bool else mask)
    static = past_key is None and windows == (-1, -1) and all(isinstance(n, int) for n in lengths)
    if causal and static:  # the plain causal mask, a constant
        above = np.triu(np.ones(lengths, dtype=bool), k=1)
        terms.append(ops.const(np.where(above, -np.inf, 0.0)))
    elif causal or windows != (-1, -1):
        terms.append(order_bias(ops, q, past_key, keys, bool(causal), windows))
    return ops("Add", *terms) if len(terms) == 2 else (terms[0] if terms else None)


def order_bias(ops: Ops, q: Tensor, past_key: Tensor | None, keys: Tensor, causal: bool, windows: tuple[int, int]
               ) -> Tensor:
    """0 where query i (at position past + i, after the KV cache `past_key`) may read key j of `keys` by the causal
    order and the sliding window (positions_allowed), -inf elsewhere, [S, L]."""
    steps = ops.arange(ops.length(q, 2))
    past = ops.length(past_key, 2) if past_key is not None else ops.scalar(0, np.int64)
    keys_at = ops.arange(ops.length(keys, 2))
    allowed = positions_allowed(ops, ops.unsqueeze(ops("Add", steps, past), [1]), keys_at, causal, *windows)
    return ops("Where", allowed, ops.scalar(0.0), ops.scalar(-np.inf))


def _softmax(ops: Ops, scores: Tensor, attrs: dict) -> Tensor:
    """Softmax over the keys, in `softmax_precision` when it names another float type (cast there and back)."""
    precision = attrs.get("softmax_precision")
    if precision is None or onnx.helper.tensor_dtype_to_np_dtype(precision) == ops.dtype:
        return ops("Softmax", scores, axis=-1)
    back = onnx.helper.np_dtype_to_tensor_dtype(ops.dtype)
    return ops("Cast", ops("Softmax", ops("Cast", scores, to=precision), axis=-1), to=back)

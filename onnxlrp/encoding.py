"""Integer inputs one-hot encoded inside the graph (OneHot, or Equal against a range of values): the relevance of
the encoding is summed over the encoded values, so that each input position gets one relevance."""
from __future__ import annotations

from typing import Sequence

import onnx_graphsurgeon as gs

from .graph import constant
from .ops import Tensor
from .registry import Context, Unsupported, computed, family

ENCODINGS = ("OneHot", "Equal")
# Ops between an integer input and its encoding that keep each value where it is.
PLACING = ("Unsqueeze", "Reshape", "Squeeze", "Flatten", "Cast")


def encoded(tensor: Tensor) -> bool:
    """Whether a tensor is a one-hot encoding (the output of OneHot or Equal)."""
    return isinstance(tensor, gs.Variable) and bool(tensor.inputs) and tensor.inputs[0].op in ENCODINGS


def one_hot_encoded(tensor: Tensor, depth: int = 4) -> bool:
    """Whether the graph one-hot encodes the tensor (after at most `depth` reshaping or casting ops)."""
    return any(_encodes(consumer, tensor) or (depth > 0 and consumer.op in PLACING
                                              and one_hot_encoded(consumer.outputs[0], depth - 1))
               for consumer in tensor.outputs)


def _encodes(node: gs.Node, tensor: Tensor) -> bool:
    """OneHot, or Equal against a constant range of values; an Equal against one value (DistilBERT's
    `attention_mask == 0`) is a test, not an encoding."""
    if node.op != "Equal":
        return node.op in ENCODINGS
    values = constant(next((t for t in node.inputs if t is not tensor), tensor))
    return values is not None and values.size > 1


@family("one-hot encoding", ENCODINGS, ("pass",))
def emit_encoding(ctx: Context, node: gs.Node, relevance: Sequence[Tensor | None]) -> list[Tensor | None]:
    """Each encoded position's relevance is the sum over the values it was compared with."""
    output = node.outputs[0]
    if node.op == "OneHot":
        rank = len(output.shape) if output.shape is not None else None
        if rank is None:
            raise Unsupported("OneHot needs a known output rank")
        axis = node.attrs.get("axis", -1) % rank
        return [ctx.ops.reduce_sum(relevance[0], [axis], keepdims=False), None, None]
    flags = [computed(t) for t in node.inputs]
    if flags.count(True) != 1:
        raise Unsupported("Equal of two computed tensors is not a one-hot encoding")
    source = node.inputs[flags.index(True)]
    if source.shape is None or output.shape is None:
        raise Unsupported("a one-hot encoding needs known ranks")
    rank = len(output.shape)
    aligned = [1] * (rank - len(source.shape)) + list(source.shape)
    axes = [a for a in range(rank) if aligned[a] == 1 and output.shape[a] != 1]
    lower = ctx.ops.reduce_sum(relevance[0], axes) if axes else relevance[0]
    if len(source.shape) < rank:
        lower = ctx.ops.reshape_like(lower, source)
    return [lower if flag else None for flag in flags]

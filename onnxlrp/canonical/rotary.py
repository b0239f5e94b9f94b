"""Rotary position embeddings as single ops (ONNX's RotaryEmbedding of opset 23, ONNX Runtime's com.microsoft
RotaryEmbedding that its GenAI model builder writes) written out in plain ops, as torch's exporters write them:
halves (or even and odd features) times the cos and sin tables, which are constants of the data path (they are
read at the position ids), so that the Mul, Sub, Add, Slice and Concat emitters pass relevance through them."""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ..errors import LrpError
from ..ir.graph import expand_each, optional_input, replace
from ..ir.ops import Ops, Tensor

# Where each form keeps its inputs: (input, cos_cache, sin_cache, position_ids) by index.
INPUTS = {"": (0, 1, 2, 3), "com.microsoft": (0, 2, 3, 1)}


def expand_rotary(graph: gs.Graph, strict: bool = True) -> bool:
    """Write every RotaryEmbedding node out in plain ops (ir/graph.py expand_each). Returns whether there was one."""
    return expand_each(graph, ("RotaryEmbedding",), _expand, strict)


def _expand(graph: gs.Graph, node: gs.Node) -> None:
    where = f"node '{node.name}' (RotaryEmbedding)"
    domain = node.domain if node.domain in INPUTS else ""
    x, cos, sin, positions = (optional_input(node, i) for i in INPUTS[domain])
    if node.attrs.get("is_packed_batching", 0) or node.attrs.get("scale", 1.0) != 1.0:
        raise LrpError(f"{where}: packed batches and a scale other than 1 are not supported")
    if x.shape is None or len(x.shape) not in (3, 4) or x.dtype is None:
        raise LrpError(f"{where}: needs an input of known type and rank 3 or 4")
    ops = Ops(graph, graph.opset, np.dtype(x.dtype))
    ops.scope = node.name
    heads = node.attrs.get("num_heads", 0)
    if len(x.shape) == 4:  # [N, heads, S, size] -> [N, S, heads, size]
        size, split = x.shape[3], ops("Transpose", x, perm=[0, 2, 1, 3])
    else:
        size = x.shape[2] // heads if heads and isinstance(x.shape[2], int) else None
        split = ops("Reshape", x, ops.ints([0, 0, heads, -1]))
    rotated = node.attrs.get("rotary_embedding_dim", 0) or size
    if not isinstance(size, int) or not isinstance(rotated, int) or rotated % 2:
        raise LrpError(f"{where}: needs a static head size (and num_heads for an input of rank 3)")
    if positions is not None and positions.shape is not None and len(positions.shape) == 1:  # an offset
        steps = ops.arange(ops.length(x, 1 if len(x.shape) == 3 else 2))
        positions = ops.unsqueeze(ops("Add", steps, positions), [0])
    turned = rotate(ops, split, size, cos, sin, positions, rotated, node.attrs.get("interleaved", 0))
    y = ops("Transpose", turned, perm=[0, 2, 1, 3]) if len(x.shape) == 4 else \
        ops("Reshape", turned, ops("Shape", x))
    output = node.outputs[0]
    node.outputs.clear()
    node.inputs.clear()
    replace(y.inputs[0].outputs, [output])


def rotate(ops: Ops, x: Tensor, size: int, cos: Tensor, sin: Tensor, positions: Tensor | None, rotated: int,
           interleaved: int) -> Tensor:
    """x [N, S, heads, size] with its first `rotated` features turned by the angles of the tables (read at
    `positions` [N or 1, S], or [N, S, rotated / 2] already): the definition of RotaryEmbedding in plain ops."""
    if positions is not None:
        cos, sin = (ops("Gather", table, positions, axis=0) for table in (cos, sin))
    cos, sin = (ops.unsqueeze(table, [2]) for table in (cos, sin))  # [N, S, 1, rotated / 2]
    half = rotated // 2
    first, second = (_features(ops, x, start, half, interleaved) for start in (0, 1))
    real = ops("Sub", ops("Mul", cos, first), ops("Mul", sin, second))
    imaginary = ops("Add", ops("Mul", sin, first), ops("Mul", cos, second))
    if interleaved:
        pairs = ops("Concat", ops.unsqueeze(real, [4]), ops.unsqueeze(imaginary, [4]), axis=4)
        turned = ops("Reshape", pairs, ops.ints([0, 0, 0, rotated]))
    else:
        turned = ops("Concat", real, imaginary, axis=3)
    if rotated < size:
        turned = ops("Concat", turned, ops.slice(x, [rotated], [size], [3]), axis=3)
    return turned


def _features(ops: Ops, x: Tensor, which: int, half: int, interleaved: int) -> Tensor:
    """The first (`which` 0) or second half of the rotated features, or their even or odd ones when interleaved."""
    if interleaved:
        return ops("Slice", x, ops.ints([which]), ops.ints([2 * half]), ops.ints([3]), ops.ints([2]))
    return ops.slice(x, [which * half], [(which + 1) * half], [3])

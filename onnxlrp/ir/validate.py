"""Structural checks of a source model that onnx.load does not make: each problem is one line for the user
instead of an error deep inside graph import or a silently wrong tensor."""
from __future__ import annotations

import math

import onnx

from ..errors import LrpError

# Element counts per data type live in typed fields of these names when a tensor has no raw data.
TYPED_FIELDS = ("float_data", "int32_data", "int64_data", "double_data", "uint64_data")
COMPLEX = (onnx.TensorProto.COMPLEX64, onnx.TensorProto.COMPLEX128)
LISTED = 5
# Types of fewer than 8 bits, packed into bytes (int4 weights, low bits first).
PACKED_BITS = {onnx.TensorProto.INT4: 4, onnx.TensorProto.UINT4: 4, onnx.TensorProto.FLOAT4E2M1: 4,
               onnx.TensorProto.INT2: 2, onnx.TensorProto.UINT2: 2}


def node_label(node: onnx.NodeProto) -> str:
    """How messages name a node: its name, or its first output when it has none."""
    return node.name or (node.output[0] if node.output else node.op_type)


def check_model_structure(model: onnx.ModelProto, source: str) -> None:
    """Raise an LrpError naming the first structural problem: IR version, opset, tensor data, single writers,
    cycles."""
    _check_versions(model, source)
    tensors = list(model.graph.initializer) + [a.t for n in model.graph.node for a in n.attribute
                                              if a.type == onnx.AttributeProto.TENSOR]
    for tensor in tensors:
        _check_tensor_data(tensor, source)
    _check_single_writers(model.graph, source)
    _check_acyclic(model.graph, source)


def _check_versions(model: onnx.ModelProto, source: str) -> None:
    if not 3 <= model.ir_version <= onnx.IR_VERSION:
        raise LrpError(f"{source}: unknown IR version {model.ir_version} (onnx {onnx.__version__} reads "
                       f"3 to {onnx.IR_VERSION})")
    if not any(o.domain in ("", "ai.onnx") for o in model.opset_import):
        domains = ", ".join(repr(o.domain) for o in model.opset_import) or "none"
        raise LrpError(f"{source}: no opset import for the default ONNX domain (imports: {domains})")


def _check_tensor_data(tensor: onnx.TensorProto, source: str) -> None:
    """The stored data has exactly the size the tensor's shape and type need (truncated files, bad lengths)."""
    if tensor.data_type in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED):
        return
    count = math.prod(tensor.dims)
    if tensor.data_location == onnx.TensorProto.EXTERNAL and not tensor.raw_data:
        return  # not loaded (load_external_data=False): onnx reads it later and checks the file itself
    try:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except (KeyError, TypeError, ValueError):
        return  # types numpy has no fixed size for (4-bit and 8-bit floats): left to onnx
    if tensor.raw_data or tensor.data_location == onnx.TensorProto.EXTERNAL:
        bits = PACKED_BITS.get(tensor.data_type, 8 * itemsize)
        found, needed, unit = len(tensor.raw_data), -(-count * bits // 8), "bytes"
    else:
        filled = [f for f in TYPED_FIELDS if len(getattr(tensor, f))]
        if not filled or tensor.data_type in COMPLEX or itemsize < 4:
            return
        found, needed, unit = len(getattr(tensor, filled[0])), count, "values"
    if found != needed:
        shape = "x".join(map(str, tensor.dims)) or "scalar"
        kind = "truncated" if found < needed else "oversized"
        raise LrpError(f"{source}: tensor '{tensor.name}' ({shape}, {onnx.TensorProto.DataType.Name(tensor.data_type)})"
                       f" has {found} {unit} of data but needs {needed} ({kind} data)")


def _check_single_writers(graph: onnx.GraphProto, source: str) -> None:
    """Every tensor has one source: one node output, a graph input or an initializer."""
    writers = {name: "the graph input" for name in (v.name for v in graph.input)}
    writers.update((t.name, "an initializer") for t in graph.initializer if t.name not in writers)
    for node in graph.node:
        for name in node.output:
            if not name:
                continue
            if name in writers:
                raise LrpError(f"{source}: tensor '{name}' is written twice (by {writers[name]} and by node "
                               f"'{node_label(node)}')")
            writers[name] = f"node '{node_label(node)}'"


def _check_acyclic(graph: onnx.GraphProto, source: str) -> None:
    """No node depends on its own output (Kahn's algorithm over the node order's dependencies)."""
    producer = {name: index for index, node in enumerate(graph.node) for name in node.output if name}
    waiting = [0] * len(graph.node)
    readers: list[list[int]] = [[] for _ in graph.node]
    for index, node in enumerate(graph.node):
        for name in set(node.input):
            if name in producer:
                waiting[index] += 1
                readers[producer[name]].append(index)
    ready = [i for i, count in enumerate(waiting) if count == 0]
    done = 0
    while ready:
        index = ready.pop()
        done += 1
        for reader in readers[index]:
            waiting[reader] -= 1
            if waiting[reader] == 0:
                ready.append(reader)
    if done < len(graph.node):
        stuck = [node_label(graph.node[i]) for i, count in enumerate(waiting) if count]
        more = f" and {len(stuck) - LISTED} more" if len(stuck) > LISTED else ""
        raise LrpError(f"{source}: the graph has a cycle through node(s) "
                       f"{', '.join(repr(s) for s in stuck[:LISTED])}{more}")

"""A float16 copy of a built model, for GPU deployment: float32 weights and constants become float16, the
graph's float32 inputs and outputs keep their type behind Casts (callers feed and read float32 as before)."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..errors import LrpError

# Inputs that ONNX requires in float32 whatever the data type (Resize and Upsample scales).
FLOAT32_ONLY = {("Resize", 2), ("Upsample", 1)}


def to_float16(model: onnx.ModelProto, prefix: str = "") -> onnx.ModelProto:
    """Return a copy of `model` that computes in float16 between a Cast at each float32 input and output. With a
    `prefix`, only the nodes and initializers whose names start with it (the relevance of a quantized model's float
    twin): the model's own nodes keep their types and outputs. ai.onnx.ml operators (scikit-learn's models) take no
    float16: such a model is refused in one line."""
    classic = next((node for node in model.graph.node if node.domain == "ai.onnx.ml"
                    and node.name.startswith(prefix)), None)
    if classic is not None:
        raise LrpError(f"--dtype float16: node '{classic.name}' ({classic.op_type}) is an ai.onnx.ml operator, "
                       f"which computes in float32 only; build this model in float32")
    half = onnx.ModelProto()
    half.CopyFrom(model)
    graph = half.graph
    converted = [node for node in graph.node if node.name.startswith(prefix)]
    kept = {node.input[i] for node in graph.node for op, i in FLOAT32_ONLY
            if node.op_type == op and len(node.input) > i}
    for index, tensor in enumerate(graph.initializer):
        if tensor.data_type == TensorProto.FLOAT and tensor.name not in kept and tensor.name.startswith(prefix):
            graph.initializer[index].CopyFrom(numpy_helper.from_array(_half(numpy_helper.to_array(tensor)),
                                                                      tensor.name))
    for node in converted:
        if node.op_type == "ConstantOfShape" and not node.attribute:  # float32 zeros by default
            node.attribute.append(helper.make_attribute("value", numpy_helper.from_array(np.zeros(1, np.float16))))
        for attribute in node.attribute:
            if node.op_type == "Cast" and attribute.name == "to" and attribute.i == TensorProto.FLOAT:
                attribute.i = TensorProto.FLOAT16
            elif attribute.type == onnx.AttributeProto.TENSOR and attribute.t.data_type == TensorProto.FLOAT:
                attribute.t.CopyFrom(numpy_helper.from_array(_half(numpy_helper.to_array(attribute.t)),
                                                             attribute.t.name))
    del graph.value_info[:]  # inferred again by the runtime, in the new types
    casts_in = []
    initializers = {t.name for t in graph.initializer}
    for value in graph.input:
        if value.type.tensor_type.elem_type != TensorProto.FLOAT or value.name in initializers:
            continue
        inner = f"{value.name}/float16"
        _rename_uses(converted, value.name, inner)
        casts_in.append(helper.make_node("Cast", [value.name], [inner], name=f"{prefix}{inner}/cast",
                                         to=TensorProto.FLOAT16))
    produced = {name for node in converted for name in node.output}
    for value in graph.output:
        if value.type.tensor_type.elem_type != TensorProto.FLOAT or value.name not in produced:
            continue
        inner = f"{value.name}/float16"
        for node in converted:
            node.output[:] = [inner if name == value.name else name for name in node.output]
        _rename_uses(converted, value.name, inner)
        graph.node.append(helper.make_node("Cast", [inner], [value.name], name=f"{prefix}{inner}/cast",
                                           to=TensorProto.FLOAT))
    nodes = casts_in + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    return half


def _half(values: np.ndarray) -> np.ndarray:
    """float16 values; finite float32 values beyond its range (masks of the float32 minimum) become its extremes,
    not infinities (then 0 * mask would be NaN where a mask is off)."""
    limit = np.finfo(np.float16).max
    return np.where(np.isfinite(values), np.clip(values, -limit, limit), values).astype(np.float16)


def _rename_uses(nodes, old: str, new: str) -> None:
    for node in nodes:
        node.input[:] = [new if name == old else name for name in node.input]

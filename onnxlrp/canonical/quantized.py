"""Quantized models. QDQ models are explained on a float twin of their graph (weights dequantized at build
time, activations still quantized and dequantized), while the model's own nodes keep computing its outputs:
ONNX Runtime fuses their Q/DQ pairs into integer kernels, so the twin cannot stand in for them bit for bit.
Operators that compute in integers (QLinearConv, ConvInteger, ...) are refused with the reason. (The relevance
walk passes relevance through the activations' Q/DQ pairs: see lrp/emitters/routing.py.)"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..errors import LrpError
from ..ir.graph import constant

QDQ = ("QuantizeLinear", "DequantizeLinear")
INTEGER_OPS = ("QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger", "QGemm", "QLinearAdd",
               "QLinearMul", "QLinearAveragePool", "QLinearGlobalAveragePool", "QLinearConcat", "QLinearSigmoid",
               "QLinearLeakyRelu", "QLinearSoftmax", "DynamicQuantizeLinear")
TWIN = "lrp/twin/"


def fold_dequantized_weights(graph: gs.Graph) -> None:
    """Replace every DequantizeLinear of constants (quantized weights and biases, per tensor or per channel
    along any axis) by its float value, computed as ONNX Runtime does: (x - zero_point) * scale in float32."""
    for node in [n for n in graph.nodes if n.op == "DequantizeLinear"]:
        values = [constant(t) for t in node.inputs if t.name]
        if len(values) < 2 or any(v is None for v in values):
            continue
        quantized, scale = values[0], values[1]
        zero_point = values[2] if len(values) > 2 else np.zeros((), quantized.dtype)
        if node.attrs.get("block_size", 0):
            continue  # blocked quantization stays in the graph
        if scale.size > 1:  # per channel along `axis`
            axis = node.attrs.get("axis", 1) % quantized.ndim
            along = [-1 if a == axis else 1 for a in range(quantized.ndim)]
            scale, zero_point = scale.reshape(along), zero_point.reshape(along)
        shifted = quantized.astype(np.int64) - zero_point.astype(np.int64)
        output = node.outputs[0]
        output.to_constant((shifted.astype(scale.dtype) * scale).astype(scale.dtype))
        output.inputs.clear()
        node.outputs.clear()
        node.inputs.clear()
    graph.cleanup()


def refuse_integer_arithmetic(model: onnx.ModelProto, source: str) -> None:
    """One line naming the first operator that computes in integers (no float twin of it is built)."""
    node = next((n for n in model.graph.node if n.op_type in INTEGER_OPS), None)
    if node is not None:
        raise LrpError(f"{source}: node '{node.name}' ({node.op_type}) computes in integers, which onnxlrp does not "
                       f"explain; quantize the float model in QDQ format instead (onnxruntime.quantization."
                       f"quantize_static with quant_format=QuantFormat.QDQ)")


def is_quantized(model: onnx.ModelProto) -> bool:
    """Whether the model quantizes anything (then its own nodes must keep computing its outputs)."""
    return any(node.op_type in QDQ for node in model.graph.node)


def twin_names(built: onnx.ModelProto, kept: Sequence[str]) -> Callable[[str], str]:
    """The name a tensor of the built twin has in the merged model: prefixed `lrp/twin/`, except graph inputs and
    the `kept` outputs, which are shared."""
    shared = {v.name for v in built.graph.input} | set(kept)
    return lambda name: name if not name or name in shared else TWIN + name


def with_original_forward(original: onnx.ModelProto, built: onnx.ModelProto, kept: Sequence[str]) -> onnx.ModelProto:
    """The original model's nodes and outputs, plus the built twin under the names of `twin_names`, of which only
    the outputs named in `kept` (relevance) are added."""
    renamed = twin_names(built, kept)
    merged = onnx.ModelProto()
    merged.CopyFrom(built)
    graph = merged.graph
    for node in graph.node:
        node.name = TWIN + node.name
        node.input[:] = [renamed(n) for n in node.input]
        node.output[:] = [renamed(n) for n in node.output]
    for tensor in graph.initializer:
        tensor.name = renamed(tensor.name)
    del graph.value_info[:]
    twin_nodes = list(graph.node)
    twin_outputs = [v for v in graph.output if v.name in kept]
    del graph.node[:], graph.output[:]
    graph.node.extend(list(original.graph.node) + twin_nodes)
    graph.output.extend(list(original.graph.output) + twin_outputs)
    graph.initializer.extend(original.graph.initializer)
    graph.value_info.extend(original.graph.value_info)
    versions = {o.domain: o.version for o in merged.opset_import}
    for opset in original.opset_import:
        if opset.domain not in versions:
            merged.opset_import.append(opset)
    return merged

"""Quantized models. QDQ models are explained on a float twin of their graph (weights dequantized at build
time, activations still quantized and dequantized), while the model's own nodes keep computing its outputs:
ONNX Runtime fuses their Q/DQ pairs into integer kernels, so the twin cannot stand in for them bit for bit.
Operators that compute in integers (QLinearConv, ConvInteger, ...) are refused with the reason."""
from __future__ import annotations

from typing import Sequence

import onnx

from .errors import LrpError
from .ops import Tensor
from .registry import Context, family

QDQ = ("QuantizeLinear", "DequantizeLinear")
INTEGER_OPS = ("QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger", "QGemm", "QLinearAdd",
               "QLinearMul", "QLinearAveragePool", "QLinearGlobalAveragePool", "QLinearConcat", "QLinearSigmoid",
               "QLinearLeakyRelu", "QLinearSoftmax", "DynamicQuantizeLinear")
TWIN = "lrp/twin/"


@family("quantize", QDQ, ("pass",))
def emit_quantize(ctx: Context, node, relevance: Sequence[Tensor | None]) -> list[Tensor | None]:
    """Quantizing and dequantizing an activation changes its values by rounding only: relevance passes."""
    return [relevance[0]] + [None] * (len(node.inputs) - 1)


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


def with_original_forward(original: onnx.ModelProto, built: onnx.ModelProto, kept: Sequence[str]) -> onnx.ModelProto:
    """The original model's nodes and outputs, plus the built twin under names prefixed `lrp/twin/`, of which
    only the outputs named in `kept` (relevance) are added. Graph inputs and `kept` names are shared."""
    shared = {v.name for v in built.graph.input} | set(kept)
    rename = {}

    def renamed(name: str) -> str:
        return name if not name or name in shared else rename.setdefault(name, TWIN + name)

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

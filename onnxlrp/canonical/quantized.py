"""Quantized and half-precision models are explained on their float twin, while the model's own nodes keep computing
its outputs bit for bit (`with_original_forward`).

The twin is the model in float32 without rounding: every DequantizeLinear of constants folded (per tensor, per
channel, blocked, 4-bit), every QuantizeLinear of an activation reduced to the saturation it applies (a Clip to the
range its type can hold: the quantizer folds a ReLU into that range, so dropping the pair would drop the ReLU), its
DequantizeLinear to the identity, each operator that computes in integers rewritten by `REWRITES` into its float
operator on dequantized operands, and float16 computed in float32. LRP divides by pre-activations, which rounding
sets to exactly 0 in places: on the rounded model the relevance explodes (issue 18)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..errors import LrpError
from ..ir.names import Names, proto_names
from ..ir.validate import node_label

TWIN = "lrp/twin/"
DOMAINS = ("", "ai.onnx", "com.microsoft")
HALF = (TensorProto.FLOAT16, TensorProto.BFLOAT16)
TYPE_ATTRIBUTES = ("to", "dtype", "output_dtype")  # attributes that name an element type
# Ops whose output type does not follow their inputs': an integer input held in float leaves their outputs alone.
TYPED_OUTPUTS = ("Shape", "Size", "Cast", "ArgMax", "ArgMin", "NonZero", "Equal", "Greater", "Less", "GreaterOrEqual",
                 "LessOrEqual", "Not", "And", "Or", "Xor", "IsNaN", "IsInf")
# Ops that only move elements (their data input first): they commute with a per-tensor dequantization.
MOVES = ("Gather", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Slice", "Expand", "Identity")


class Twin:
    """The float twin being written: its nodes so far, the model's constants, and the model's integer tensors that
    the twin holds as their float (dequantized) values."""

    def __init__(self, model: onnx.ModelProto, source: str):
        self.source = source
        graph = model.graph
        self.initializers = {t.name: t for t in graph.initializer}
        self.constant_nodes = {n.output[0]: n for n in graph.node if n.op_type == "Constant" and n.output}
        self.producers = {name: n for n in graph.node for name in n.output}
        self.values: dict[str, np.ndarray] = {}
        self.floated: set[str] = set()
        self.unit: set[str] = set()  # floated tensors whose quantization the twin fixes to scale 1, zero point 0
        self.dequantized: dict[tuple, str] = {}  # (tensor, scale, zero point, axis, block size) -> its float tensor
        self.nodes: list[onnx.NodeProto] = []
        self.added: list[onnx.TensorProto] = []
        self.names = Names(proto_names(graph))

    def value(self, name: str) -> np.ndarray | None:
        """The value of a constant tensor (initializer, Constant node or one the twin added), or None."""
        if not name:
            return None
        if name not in self.values:
            if name in self.initializers:
                self.values[name] = numpy_helper.to_array(self.initializers[name])
            elif name in self.constant_nodes:
                attribute = next((a for a in self.constant_nodes[name].attribute if a.name == "value"), None)
                if attribute is None:
                    return None
                self.values[name] = numpy_helper.to_array(attribute.t)
            else:
                return None
        return self.values[name]

    def constant(self, name: str, values: np.ndarray, exact: bool = False) -> str:
        """Add a constant to the twin under `name` (made unique unless `exact`: a name the twin no longer computes),
        and return its name."""
        name = name if exact else self.names.fresh(name)
        values = np.asarray(values, order="C")  # not ascontiguousarray: it makes a 0-d array 1-d
        self.values[name] = values
        self.added.append(numpy_helper.from_array(values, name))
        return name

    def emit(self, op: str, inputs: Sequence[str], outputs: Sequence[str], name: str | onnx.NodeProto,
             domain: str = "", attributes: Sequence[onnx.AttributeProto] = (), **attrs) -> None:
        """Add a node; named after `name`, or exactly as the node it stands for (composites match node names)."""
        name = name.name if isinstance(name, onnx.NodeProto) and name.name else self.names.fresh(
            node_label(name) if isinstance(name, onnx.NodeProto) else name)
        node = helper.make_node(op, list(inputs), list(outputs), name=name, domain=domain, **attrs)
        node.attribute.extend(attributes)
        self.nodes.append(node)

    def refuse(self, node: onnx.NodeProto, why: str) -> LrpError:
        return LrpError(f"{self.source}: node '{node_label(node)}' ({node.op_type}) {why}")

    def float_of(self, node: onnx.NodeProto, name: str, scale: str | None, zero_point: str | None, axis: int = 1,
                 block_size: int = 0, into: str | None = None) -> str:
        """The name of a float tensor holding the dequantized value of the integer tensor `name`; scale None: the
        integer itself less its zero point (ConvInteger, MatMulInteger), defined only where the twin fixed the
        scale to 1 (after DynamicQuantizeLinear)."""
        if name in self.floated:
            if scale is None and name not in self.unit:
                raise self.refuse(node, f"reads '{name}' without the scale it was quantized with")
            return name
        key = (name, scale, zero_point, axis, block_size)
        if key in self.dequantized:
            return self.dequantized[key]
        values = self.value(name)
        if values is not None:
            scale_values = np.ones((), np.float32) if scale is None else self.value(scale)
            zero = self.value(zero_point) if zero_point else np.zeros((), values.dtype)
            if scale_values is None or zero is None:
                raise self.refuse(node, "dequantizes a constant with a computed scale or zero point")
            folded = dequantize(values, scale_values, zero, axis, block_size)
            self.dequantized[key] = self.constant(into or f"{name}/dequantized", folded, exact=into is not None)
            return self.dequantized[key]
        moved = self._moved(node, name, scale, zero_point)
        if moved is None:
            if scale is None:
                raise self.refuse(node, f"reads '{name}' without the scale it was quantized with")
            moved = into or self.names.fresh(f"{name}/dequantized")  # an integer input of the model
            self.emit("DequantizeLinear", [name, scale] + ([zero_point] if zero_point else []), [moved],
                      f"{node_label(node)}/dequantize", axis=axis)
        self.dequantized[key] = moved
        return moved

    def _moved(self, node: onnx.NodeProto, name: str, scale: str | None, zero_point: str | None) -> str | None:
        """An element-moving op (Gather of an embedding table ...) of an integer constant, per tensor: the same op of
        the dequantized constant (so that the relevance walk sees a lookup of a float table)."""
        producer = self.producers.get(name)
        scale_values = self.value(scale) if scale else None
        if producer is None or producer.op_type not in MOVES or scale_values is None or scale_values.size != 1:
            return None
        source = producer.input[0]
        data = self.float_of(node, source, scale, zero_point) if self.value(source) is not None else \
            self._moved(node, source, scale, zero_point)
        if data is None:
            return None
        output = self.names.fresh(f"{name}/dequantized")
        self.emit(producer.op_type, [data] + list(producer.input[1:]), [output], f"{node_label(producer)}/float",
                  attributes=producer.attribute)
        return output

    def saturate(self, node: onnx.NodeProto, value: str, scale: str, zero_point: str, output: str,
                 quantized_type: int | None = None) -> None:
        """Clip `value` into `output` at the range that quantizing with (scale, zero point) keeps (the identity where
        scale or zero point are computed or not one number)."""
        scale_values = self.value(scale)
        zero = self.value(zero_point) if zero_point else None
        kind = zero.dtype if zero is not None else helper.tensor_dtype_to_np_dtype(quantized_type or TensorProto.UINT8)
        if scale_values is None or scale_values.size != 1 or (zero_point and (zero is None or zero.size != 1)):
            self.emit("Identity", [value], [output], f"{node_label(node)}/twin")
            return
        low, high = quantized_range(kind)
        offset = float(zero.reshape(())) if zero is not None else 0.0
        scale_value = scale_values.reshape(()).astype(np.float32)
        bounds = [self.constant(f"{output}/{end}", np.asarray((limit - offset) * scale_value, np.float32))
                  for end, limit in (("low", low), ("high", high))]
        self.emit("Clip", [value] + bounds, [output], f"{node_label(node)}/saturation")
        self.floated.add(output)


def quantized_range(kind: np.dtype) -> tuple[float, float]:
    """The smallest and largest values a quantized type holds (integers of 2 to 32 bits, 8-bit floats)."""
    try:
        info = ml_dtypes.iinfo(kind)
    except (TypeError, ValueError):
        largest = float(ml_dtypes.finfo(kind).max)
        return -largest, largest
    return float(info.min), float(info.max)


def dequantize(values: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, axis: int = 1,
               block_size: int = 0) -> np.ndarray:
    """(values - zero_point) * scale as ONNX Runtime computes it (in the scale's type), with scale and zero point per
    tensor, per slice along `axis`, or per block of `block_size` along `axis`; always an array."""
    scale, zero_point = np.asarray(scale), np.asarray(zero_point)
    if values.ndim:
        scale, zero_point = (_along(p, values, axis % values.ndim, block_size) for p in (scale, zero_point))
    if _integral(values.dtype):
        shifted = (values.astype(np.int64) - zero_point.astype(np.int64)).astype(scale.dtype)
    else:  # 8-bit floats: no zero point
        shifted = values.astype(scale.dtype)
    return np.asarray(shifted * scale, dtype=scale.dtype)


def _along(parameter: np.ndarray, values: np.ndarray, axis: int, block_size: int) -> np.ndarray:
    """A scale or zero point broadcast against `values`: one number, one per slice along `axis`, or one per block."""
    if parameter.size == 1:
        return parameter.reshape(())
    if block_size:
        return np.repeat(parameter, block_size, axis).take(np.arange(values.shape[axis]), axis)
    return parameter.reshape([-1 if a == axis else 1 for a in range(values.ndim)])


def quantize(values: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, axis: int = 1) -> np.ndarray:
    """QuantizeLinear of a constant: round half to even, shift, saturate, in the zero point's type."""
    scale, zero_point = np.asarray(scale), np.asarray(zero_point)
    kind = zero_point.dtype
    if values.ndim:
        scale, zero_point = (_along(p, values, axis % values.ndim, 0) for p in (scale, zero_point))
    low, high = quantized_range(kind)
    rounded = np.rint(values.astype(np.float32) / scale) + zero_point.astype(np.float32)
    return np.asarray(np.clip(rounded, low, high)).astype(kind)


def _integral(kind: np.dtype) -> bool:
    try:
        ml_dtypes.iinfo(kind)
    except (TypeError, ValueError):
        return False
    return True


# The rewrites: each writes the float twin of one node of its op type.
Rewrite = Callable[[Twin, onnx.NodeProto], None]


def _attribute(node: onnx.NodeProto, name: str, default=None):
    found = next((a for a in node.attribute if a.name == name), None)
    return default if found is None else helper.get_attribute_value(found)


def _input(node: onnx.NodeProto, index: int) -> str:
    return node.input[index] if len(node.input) > index else ""


def quantize_linear(twin: Twin, node: onnx.NodeProto) -> None:
    """A constant is quantized at build time (its DequantizeLinear then folds); an activation is saturated."""
    data, scale, zero_point = node.input[0], node.input[1], _input(node, 2)
    axis = _attribute(node, "axis", 1)
    values = twin.value(data)
    if values is not None and twin.value(scale) is not None and (not zero_point or twin.value(zero_point) is not None)\
            and not _attribute(node, "block_size", 0):
        zero = twin.value(zero_point) if zero_point else np.zeros((), np.uint8)
        twin.constant(node.output[0], quantize(values, twin.value(scale), zero, axis), exact=True)
        return
    twin.saturate(node, data, scale, zero_point, node.output[0], _attribute(node, "output_dtype", 0) or None)


def dequantize_linear(twin: Twin, node: onnx.NodeProto) -> None:
    """A constant folds; an activation the twin holds in float passes; an integer input of the model is dequantized."""
    output = node.output[0]
    value = twin.float_of(node, node.input[0], node.input[1], _input(node, 2), _attribute(node, "axis", 1),
                          _attribute(node, "block_size", 0), into=output)
    if value != output:
        twin.emit("Identity", [value], [output], node)


def dynamic_quantize_linear(twin: Twin, node: onnx.NodeProto) -> None:
    """The twin keeps x in float with scale 1 and zero point 0: what reads (q - zero point) gets x, and what
    multiplies by the scale multiplies by 1."""
    quantized, scale, zero_point = node.output
    twin.emit("Identity", [node.input[0]], [quantized], node)
    twin.floated.add(quantized)
    twin.unit.add(quantized)
    twin.constant(scale, np.ones((), np.float32), exact=True)
    twin.constant(zero_point, np.zeros((), np.uint8), exact=True)


@dataclass(frozen=True)
class Integer:
    """An operator that computes in integers, as `op` on its dequantized operands. `operands`: per operand the
    input indices of value, scale (None: the integer less its zero point) and zero point; `axes(node)`: the axis of
    a per-slice scale per operand; `bias`: the index of an int32 bias quantized with the product of the operands'
    scales (times `alpha`); `output`: the indices of the output's scale and zero point (saturated), if any;
    `dropped`: attributes of quantization only."""
    op: str
    operands: Callable[[onnx.NodeProto], list[tuple[int, int | None, int]]]
    axes: Callable[[onnx.NodeProto], list[int]] = lambda node: [1, 1]
    bias: int | None = None
    output: tuple[int, int] | None = None
    dropped: tuple[str, ...] = ()
    refused: Callable[[onnx.NodeProto], str | None] = lambda node: None

    def __call__(self, twin: Twin, node: onnx.NodeProto) -> None:
        why = self.refused(node)
        if why:
            raise twin.refuse(node, why)
        operands = self.operands(node)
        axes = self.axes(node)
        inputs = [twin.float_of(node, node.input[v], _named(node, s), _input(node, z), axis)
                  for (v, s, z), axis in zip(operands, axes)]
        if self.bias is not None and _input(node, self.bias):
            inputs.append(self._bias(twin, node, operands))
        result = node.output[0]
        saturated = self.output is not None and _input(node, self.output[0])
        produced = twin.names.fresh(f"{result}/float") if saturated else result
        attributes = [a for a in node.attribute if a.name not in self.dropped]
        twin.emit(self.op, inputs, [produced], node, attributes=attributes)
        if saturated:
            twin.saturate(node, produced, node.input[self.output[0]], _input(node, self.output[1]), result)
        twin.floated.add(result)

    def _bias(self, twin: Twin, node: onnx.NodeProto, operands) -> str:
        """The int32 bias in float: its scale is the product of the operands' scales (and QGemm's alpha)."""
        bias = twin.value(node.input[self.bias])
        scales = [twin.value(node.input[s]) for _, s, _ in operands[:2]]
        if bias is None or any(s is None for s in scales):
            raise twin.refuse(node, "has a computed bias or scale")
        scale = np.asarray(scales[0].reshape(-1) * scales[1].reshape(-1) * _attribute(node, "alpha", 1.0),
                           np.float32)
        return twin.constant(f"{node.input[self.bias]}/dequantized",
                             dequantize(bias, scale, np.zeros((), bias.dtype), -1 if bias.ndim else 0))


def _named(node: onnx.NodeProto, index: int | None) -> str | None:
    return None if index is None else _input(node, index)


def _pairs(node: onnx.NodeProto) -> list[tuple[int, int, int]]:
    return [(0, 1, 2), (3, 4, 5)]


def _single(node: onnx.NodeProto) -> list[tuple[int, int, int]]:
    return [(0, 1, 2)]


def _zero_points(node: onnx.NodeProto) -> list[tuple[int, None, int]]:
    return [(0, None, 2), (1, None, 3)]


def _channels_last(node: onnx.NodeProto) -> str | None:
    return "computes channels last, which onnxlrp does not explain" if _attribute(node, "channels_last", 0) else None


def _softmax_axis(node: onnx.NodeProto) -> str | None:
    if _attribute(node, "opset", 13) < 13 and _attribute(node, "axis", -1) != -1:
        return "has the softmax of opset 12 over several axes, which onnxlrp does not explain"
    return None


def matmul_nbits(twin: Twin, node: onnx.NodeProto) -> None:
    """com.microsoft MatMulNBits: A times the weight its packed 2-, 4- or 8-bit blocks hold, plus its bias."""
    bits, block_size = _attribute(node, "bits", 4), _attribute(node, "block_size")
    rows, columns = _attribute(node, "K"), _attribute(node, "N")
    packed, scales = twin.value(node.input[1]), twin.value(node.input[2])
    zero_points, groups = twin.value(_input(node, 3)), twin.value(_input(node, 4))
    if packed is None or scales is None or (_input(node, 3) and zero_points is None) or \
            (_input(node, 4) and groups is None):
        raise twin.refuse(node, "has computed weights, scales or zero points")
    blocks = -(-rows // block_size)
    quantized = _unpacked(packed.reshape(columns, -1), bits)[:, :rows].astype(np.float32)
    scales = scales.reshape(columns, blocks)
    if zero_points is None:
        zero = np.full((columns, blocks), 2 ** (bits - 1), np.float32)
    elif zero_points.dtype == np.uint8:
        zero = _unpacked(zero_points.reshape(columns, -1), bits)[:, :blocks].astype(np.float32)
    else:
        zero = zero_points.reshape(columns, blocks).astype(np.float32)
    block = groups.astype(np.int64) if groups is not None else np.arange(rows) // block_size
    weight = ((quantized - zero[:, block]) * scales[:, block].astype(np.float32)).T.astype(scales.dtype)
    bias = _input(node, 5)
    product = twin.names.fresh(f"{node.output[0]}/product") if bias else node.output[0]
    twin.emit("MatMul", [node.input[0], twin.constant(f"{node.input[1]}/dequantized", weight)], [product], node)
    if bias:
        twin.emit("Add", [product, bias], [node.output[0]], f"{node_label(node)}/bias")


def gather_block_quantized(twin: Twin, node: onnx.NodeProto) -> None:
    """com.microsoft GatherBlockQuantized (a 4- or 8-bit embedding table, the GenAI builder's): a Gather from the
    table its blocks hold, dequantized (uint8 data; 4-bit values packed low bits first, zero point 2^(bits-1) by
    default; int4 and uint4 data as ONNX's types, zero point 0)."""
    bits, block_size = _attribute(node, "bits", 4), _attribute(node, "block_size", 128)
    data, scales, zero_points = (twin.value(_input(node, i)) for i in (0, 2, 3))
    if data is None or scales is None or (_input(node, 3) and zero_points is None):
        raise twin.refuse(node, "has a computed table, scales or zero points")
    axis = _attribute(node, "quantize_axis", 1) % data.ndim
    if data.ndim != 2 or axis != 1 or _attribute(node, "gather_axis", 0) != 0:
        raise twin.refuse(node, "is supported for a table of rank 2, gathered along axis 0, quantized along axis 1")
    packed = data.dtype == np.uint8 and bits < 8
    values = _unpacked(data, bits) if packed else data
    if zero_points is None:
        zero_points = np.full(scales.shape, 2 ** (bits - 1) if data.dtype == np.uint8 else 0, np.int64)
    elif packed:
        zero_points = _unpacked(zero_points, bits)[:, :scales.shape[1]]
    table = dequantize(values, scales, zero_points, axis=1, block_size=block_size)
    twin.emit("Gather", [twin.constant(f"{node.input[0]}/dequantized", table), node.input[1]], [node.output[0]],
              node, axis=0)


def _unpacked(packed: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned `bits`-bit values packed low bits first into the bytes of the last axis."""
    shifts = np.arange(0, 8, bits, dtype=np.uint8)
    values = (packed[..., None] >> shifts) & np.uint8((1 << bits) - 1)
    return values.reshape(*packed.shape[:-1], -1)


# The float twin of each op type that quantizes or computes in integers (ONNX and com.microsoft domains).
REWRITES: dict[str, Rewrite] = {
    "QuantizeLinear": quantize_linear,
    "DequantizeLinear": dequantize_linear,
    "DynamicQuantizeLinear": dynamic_quantize_linear,
    "QLinearConv": Integer("Conv", _pairs, lambda node: [1, 0], bias=8, output=(6, 7)),
    "QLinearMatMul": Integer("MatMul", _pairs, lambda node: [-2, -1], output=(6, 7)),
    "ConvInteger": Integer("Conv", _zero_points, lambda node: [1, 0]),
    "MatMulInteger": Integer("MatMul", _zero_points, lambda node: [-2, -1]),
    "QGemm": Integer("Gemm", _pairs, lambda node: [0, 0 if _attribute(node, "transB", 0) else 1], bias=6,
                     output=(7, 8)),
    "QLinearAdd": Integer("Add", _pairs, output=(6, 7)),
    "QLinearMul": Integer("Mul", _pairs, output=(6, 7)),
    "QLinearAveragePool": Integer("AveragePool", _single, output=(3, 4), dropped=("channels_last",),
                                  refused=_channels_last),
    "QLinearGlobalAveragePool": Integer("GlobalAveragePool", _single, output=(3, 4), dropped=("channels_last",),
                                        refused=_channels_last),
    "QLinearConcat": Integer("Concat", lambda node: [(i, i + 1, i + 2) for i in range(2, len(node.input), 3)],
                             lambda node: [1] * len(node.input), output=(0, 1)),
    "QLinearSigmoid": Integer("Sigmoid", _single, output=(3, 4)),
    "QLinearLeakyRelu": Integer("LeakyRelu", _single, output=(3, 4)),
    "QLinearSoftmax": Integer("Softmax", _single, output=(3, 4), dropped=("opset",), refused=_softmax_axis),
    "MatMulNBits": matmul_nbits,
    "GatherBlockQuantized": gather_block_quantized,
}


def _rewrite_of(node: onnx.NodeProto) -> Rewrite | None:
    return REWRITES.get(node.op_type) if node.domain in DOMAINS else None


def needs_twin(model: onnx.ModelProto) -> bool:
    """Whether the model quantizes anything or computes in half precision (then it is explained on its twin)."""
    graph = model.graph
    return any(_rewrite_of(n) is not None for n in graph.node) or any(
        t.data_type in HALF for t in graph.initializer) or any(
        v.type.tensor_type.elem_type in HALF for v in list(graph.input) + list(graph.output)) or any(
        (a.name in TYPE_ATTRIBUTES and a.type == onnx.AttributeProto.INT and a.i in HALF) or
        (a.type == onnx.AttributeProto.TENSOR and a.t.data_type in HALF) for n in graph.node for a in n.attribute)


def dequantized_twin(model: onnx.ModelProto, source: str) -> onnx.ModelProto | None:
    """The model's float twin (module docstring), a new model; None where the model is its own twin."""
    if not needs_twin(model):
        return None
    twin_model = onnx.ModelProto()
    twin_model.CopyFrom(model)
    graph = twin_model.graph
    in_float32(graph)
    twin = Twin(twin_model, source)
    for node in _data_flow_order(graph.node):  # converters write some Casts after their readers
        rewrite = _rewrite_of(node)
        if rewrite is not None:
            rewrite(twin, node)
            continue
        twin.nodes.append(node)
        if node.op_type not in TYPED_OUTPUTS and any(name in twin.floated for name in node.input):
            twin.floated.update(node.output)
    del graph.node[:]
    graph.node.extend(twin.nodes)
    for value in graph.output:
        if value.name in twin.floated:
            value.type.tensor_type.elem_type = TensorProto.FLOAT
    used = {name for node in graph.node for name in node.input} | {v.name for v in graph.output}
    kept = [t for t in [*graph.initializer, *twin.added] if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return twin_model


def _data_flow_order(nodes: Sequence[onnx.NodeProto]) -> list[onnx.NodeProto]:
    """The nodes with each after the nodes that compute its inputs, otherwise in their order."""
    producer = {name: index for index, node in enumerate(nodes) for name in node.output if name}
    waiting = [len({producer[n] for n in node.input if n in producer}) for node in nodes]
    readers: list[list[int]] = [[] for _ in nodes]
    for index, node in enumerate(nodes):
        for source in {producer[n] for n in node.input if n in producer}:
            readers[source].append(index)
    ready = [index for index in reversed(range(len(nodes))) if waiting[index] == 0]
    ordered = []
    while ready:
        index = ready.pop()
        ordered.append(nodes[index])
        for reader in sorted(readers[index], reverse=True):
            waiting[reader] -= 1
            if waiting[reader] == 0:
                ready.append(reader)
    return ordered if len(ordered) == len(nodes) else list(nodes)


def in_float32(graph: onnx.GraphProto) -> None:
    """float16 and bfloat16 become float32 everywhere in the graph (and its subgraphs): constants, declared inputs and
    outputs, Casts and other type attributes."""
    for index, tensor in enumerate(graph.initializer):
        if tensor.data_type in HALF:
            graph.initializer[index].CopyFrom(_float32(tensor))
    for value in list(graph.input) + list(graph.output):
        if value.type.tensor_type.elem_type in HALF:
            value.type.tensor_type.elem_type = TensorProto.FLOAT
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.name in TYPE_ATTRIBUTES and attribute.type == onnx.AttributeProto.INT and attribute.i in HALF:
                attribute.i = TensorProto.FLOAT
            elif attribute.type == onnx.AttributeProto.TENSOR and attribute.t.data_type in HALF:
                attribute.t.CopyFrom(_float32(attribute.t))
            elif attribute.type == onnx.AttributeProto.GRAPH:
                in_float32(attribute.g)
    del graph.value_info[:]


def _float32(tensor: onnx.TensorProto) -> onnx.TensorProto:
    return numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float32), tensor.name)


def with_original_forward(original: onnx.ModelProto, built: onnx.ModelProto
                          ) -> tuple[onnx.ModelProto, Callable[[str], str]]:
    """The original model's nodes and outputs, plus the built twin under names prefixed `lrp/twin/`, of which the
    outputs that the original lacks (relevance ...) are added under their own names. Graph inputs are shared (cast
    where the twin computes in another type). Also returns where the merged model holds each tensor of the twin."""
    originals = {v.name for v in original.graph.output}
    kept = {v.name for v in built.graph.output if v.name not in originals}
    inputs = {v.name: v for v in original.graph.input}
    shared = {v.name for v in built.graph.input if v.name not in inputs or _same_type(v, inputs[v.name])} | kept
    rename: dict[str, str] = {}

    def renamed(name: str) -> str:
        return name if not name or name in shared else rename.setdefault(name, TWIN + name)

    def located(name: str) -> str:  # where the merged model holds the value of a twin's tensor
        return name if name in inputs else renamed(name)

    merged = onnx.ModelProto()
    merged.CopyFrom(built)
    graph = merged.graph
    for node in graph.node:
        node.name = TWIN + node.name
        node.input[:] = [renamed(n) for n in node.input]
        node.output[:] = [renamed(n) for n in node.output]
    for tensor in graph.initializer:
        tensor.name = renamed(tensor.name)
    casts = [helper.make_node("Cast", [v.name], [renamed(v.name)], name=f"{TWIN}{v.name}/cast",
                              to=v.type.tensor_type.elem_type)
             for v in built.graph.input if v.name in inputs and v.name not in shared]
    del graph.value_info[:]
    twin_nodes = list(graph.node)
    twin_outputs = [v for v in graph.output if v.name in kept]
    twin_inputs = [v for v in graph.input if v.name not in inputs]
    del graph.node[:], graph.output[:], graph.input[:]
    graph.input.extend(list(original.graph.input) + twin_inputs)
    graph.node.extend(list(original.graph.node) + casts + twin_nodes)
    graph.output.extend(list(original.graph.output) + twin_outputs)
    graph.initializer.extend(original.graph.initializer)
    graph.value_info.extend(original.graph.value_info)
    versions = {o.domain: o.version for o in merged.opset_import}
    for opset in original.opset_import:
        if opset.domain not in versions:
            merged.opset_import.append(opset)
    return merged, located


def _same_type(value: onnx.ValueInfoProto, other: onnx.ValueInfoProto) -> bool:
    return value.type.tensor_type.elem_type == other.type.tensor_type.elem_type

"""Canonical passes: turn an exported model into the small, regular graph the relevance walk expects.
Each pass is a function of the graph that keeps the shapes it touches."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx.external_data_helper import uses_external_data

from ..errors import LrpError
from ..ir.files import first_line, read_external
from ..ir.graph import constant, is_bias, opset_of, replace, static
from ..ir.names import fresh_name, name_nodes
from ..ir.shapes import fold_batch_independent, infer_shapes, observe_shapes
from .attention import expand_attention
from .grouped import expand_grouped_attention
from .multihead import expand_multihead_attention
from .control import write_out
from .norms import expand_norms
from .rotary import expand_rotary
from .quantized import dequantized_twin, needs_twin
from .recurrent import write_out_recurrent

MIN_OPSET = 11
REMOVABLE = {"Identity", "Dropout"}


def canonicalize(model: onnx.ModelProto, source: str = "model", weights_folder: Path | None = None) -> gs.Graph:
    """Turn an exported model into the small, regular graph the relevance walk expects.

    A quantized or half-precision model becomes its float twin (quantized.py), constants become initializers and
    constant subgraphs are folded, control flow of constant condition or a known number of steps is written out as
    plain nodes (control.py), recurrent layers over their time steps (recurrent.py), Attention in plain ops,
    Identity/Dropout disappear, Gemm loses alpha/beta/transA/transB, a MatMul by a constant plus an Add of a constant
    becomes one Gemm, and pads are explicit. Shapes are inferred (and observed in ONNX Runtime where inference
    cannot follow) so that emitters can rely on static non-batch dimensions. `weights_folder`: where the external
    data files of a model read without its weights are (ir/files.py); the graph reads them straight from there.
    """
    if weights_folder is not None and reads_weights_early(model):
        onnx.load_external_data_for_model(model, str(weights_folder))
        weights_folder = None
    model = dequantized_twin(model, source) or model
    if opset_of(model) < MIN_OPSET:
        model = _converted(model, MIN_OPSET, source)
    graph = gs.import_onnx(model)
    _own_weights(graph, weights_folder)
    name_nodes(graph)
    _folded(graph)
    _without_static_control_flow(graph, source)
    if fold_batch_independent(graph):
        graph.cleanup()
        infer_shapes(graph)
    if observe_shapes(graph):  # what inference could not follow, read from one run; then fold what became static
        graph.fold_constants(error_ok=True, flatten_subgraphs=False)
        graph.cleanup().toposort()
        _without_static_control_flow(graph, source)
    if write_out_recurrent(graph, source):  # its cells' plain ops get their shapes from inference
        _folded(graph)
    _written_out(graph)
    for rewrite in (remove_identities, canonical_gemm, fuse_matmul_add, explicit_pads):
        rewrite(graph)  # each keeps the shapes it touches: no inference pass after them
    graph.cleanup().toposort()
    return graph


# Fused ops that are written out in plain ops (whose shapes inference then gives).
WRITTEN_OUT = (expand_norms, expand_rotary, expand_grouped_attention, expand_multihead_attention)


def _written_out(graph: gs.Graph) -> None:
    """Write fused ops out in rounds, shapes inferred after each: inference knows nothing of an ONNX Runtime op's
    outputs, so the ops after one (a GenAI model's next norm and attention) get their shapes once it is written
    out. What is left when no round makes progress is written out or refused with one line."""
    while any([expand(graph, strict=False) for expand in WRITTEN_OUT]):  # a list: every kind in each round
        graph.cleanup().toposort()
        infer_shapes(graph)
    if any([expand(graph) for expand in WRITTEN_OUT]) | expand_attention(graph):
        graph.cleanup().toposort()
        infer_shapes(graph)


def _converted(model: onnx.ModelProto, opset: int, source: str) -> onnx.ModelProto:
    """The model at a newer opset. The converter reads an IR 3 model's initializers as defaults of inputs, which
    exporters often leave unlisted: such a model is read as IR 4, where initializers stand alone."""
    if model.ir_version < 4:
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        copy.ir_version = 4
        model = copy
    try:
        return onnx.version_converter.convert_version(model, opset)
    except Exception as error:  # the converter raises several types
        raise LrpError(f"{source}: could not be converted from opset {opset_of(model)} to opset {opset}, the "
                       f"oldest the builder reads ({first_line(error)})") from None


def _folded(graph: gs.Graph) -> None:
    """Infer shapes, then fold constants. If nodes are inlined by control.py, not by graphsurgeon, whose inlining
    loses a branch output that the branch does not compute itself."""
    graph.cleanup().toposort()
    infer_shapes(graph)
    graph.fold_constants(error_ok=True, flatten_subgraphs=False)
    graph.cleanup().toposort()


def _without_static_control_flow(graph: gs.Graph, source: str) -> None:
    """Write out control flow until none is left that can be: each round may make more conditions and trip
    counts constant."""
    while write_out(graph, source):
        _folded(graph)


def reads_weights_early(model: onnx.ModelProto) -> bool:
    """Whether canonicalising the model reads its weights in the proto (a twin is made of the proto, an opset
    conversion rewrites it): those weights must be loaded first."""
    return needs_twin(model) or opset_of(model) < MIN_OPSET


def _own_weights(graph: gs.Graph, weights_folder: Path | None) -> None:
    """Load every constant into an array of the graph's own, so that the graph no longer refers to the source
    model's tensors (which lets the source's memory go once the caller lets go of it). Constant nodes' values and
    other tensor attributes count too: one tensor of the source left unread keeps the whole source alive."""
    _load_constants(graph, weights_folder)
    graph.import_domains = [onnx.OperatorSetIdProto(domain=o.domain, version=o.version) for o in graph.import_domains]


def _load_constants(graph: gs.Graph, weights_folder: Path | None) -> None:
    """Read the values of the graph's constants and tensor attributes, in its subgraphs too (those stored in
    external data files straight from `weights_folder`)."""
    attributes = [value for node in graph.nodes for value in node.attrs.values()]
    for value in [*graph.tensors().values(), *attributes]:
        if isinstance(value, gs.Constant):
            stored = getattr(value._values, "tensor", None)  # graphsurgeon's LazyValues hold the source's tensor
            if weights_folder is not None and stored is not None and uses_external_data(stored):
                value.values, value.data_location = read_external(stored, weights_folder), None
            value.values  # noqa: B018  (graphsurgeon loads lazy values on first access)
        elif isinstance(value, gs.Graph):
            _load_constants(value, weights_folder)


def _bypass(graph: gs.Graph, node: gs.Node) -> None:
    """Let every consumer of the node's single output read the node's first input instead."""
    source, output = node.inputs[0], node.outputs[0]
    for consumer in list(output.outputs):
        replace(consumer.inputs, [source if t is output else t for t in consumer.inputs])
    node.outputs.clear()



def remove_identities(graph: gs.Graph) -> None:
    """Drop Identity and inference Dropout nodes whose output is not a graph output."""
    outputs = set(id(t) for t in graph.outputs)
    for node in graph.nodes:
        if node.op in REMOVABLE and id(node.outputs[0]) not in outputs:
            if len(node.outputs) > 1 and node.outputs[1].outputs:
                continue  # a Dropout mask that something reads
            _bypass(graph, node)


def canonical_gemm(graph: gs.Graph) -> None:
    """Rewrite Gemm as y = A @ B + C (B given as B^T with transB = 1) with constant B, a per-feature bias C,
    alpha = beta = 1 and no transA. The weight keeps its layout: no copy of a large matrix."""
    for node in [n for n in graph.nodes if n.op == "Gemm"]:
        weight = constant(node.inputs[1])
        if weight is None or constant(node.inputs[0]) is not None:
            continue  # left for the emitter to refuse with the node's name
        transposed = bool(node.attrs.get("transB", 0))
        out_features = weight.shape[0 if transposed else 1]
        alpha, beta = node.attrs.get("alpha", 1.0), node.attrs.get("beta", 1.0)
        inputs = [node.inputs[0], node.inputs[1] if alpha == 1 else _constant_like(
            graph, node.inputs[1], weight.astype(np.float64) * alpha, "weight")]
        if len(node.inputs) > 2 and node.inputs[2].name:
            bias = constant(node.inputs[2])
            if bias is None or not is_bias(bias, out_features):
                continue  # a computed or per-sample C: the emitter refuses the node
            bias = np.broadcast_to(bias.reshape(-1) * np.float64(beta), (out_features,))
            inputs.append(_constant_like(graph, node.inputs[2], bias, "bias"))
        if node.attrs.get("transA", 0):
            shape = node.inputs[0].shape
            name = fresh_name(graph, f"{node.name}/transA")
            swapped = gs.Variable(name, dtype=node.inputs[0].dtype,
                                  shape=list(shape)[::-1] if shape is not None else None)
            graph.nodes.append(gs.Node("Transpose", name, {"perm": [1, 0]},
                                       [node.inputs[0]], [swapped]))
            inputs[0] = swapped
        replace(node.inputs, inputs)
        node.attrs = {"transB": 1} if transposed else {}


def fuse_matmul_add(graph: gs.Graph) -> None:
    """A rank-2 MatMul by a constant (plus an Add of a constant) becomes one Gemm: one linear layer."""
    for node in [n for n in graph.nodes if n.op == "MatMul"]:
        data, weight = node.inputs
        if constant(weight) is None or weight.values.ndim != 2 or data.shape is None or len(data.shape) != 2:
            continue
        output = node.outputs[0]
        inputs = [data, weight]
        add = output.outputs[0] if len(output.outputs) == 1 else None
        if add is not None and add.op == "Add" and output not in graph.outputs:
            other = next(t for t in add.inputs if t is not output) if add.inputs.count(output) == 1 else None
            if other is not None and constant(other) is not None and is_bias(other.values, weight.shape[1]):
                bias = np.broadcast_to(other.values.reshape(-1), (weight.shape[1],))
                inputs.append(_constant_like(graph, other, bias, "bias"))
                replace(node.outputs, [add.outputs[0]])
                add.outputs.clear()
                add.inputs.clear()
        node.op = "Gemm"
        replace(node.inputs, inputs)


def _constant_like(graph: gs.Graph, template: gs.Tensor, values: np.ndarray, suffix: str) -> gs.Constant:
    """A new constant of the template's type: the template may be shared by other nodes and stays as it is."""
    dtype = template.values.dtype if isinstance(template, gs.Constant) else np.float32
    return gs.Constant(fresh_name(graph, f"{template.name}/{suffix}"), np.ascontiguousarray(values, dtype=dtype))


def explicit_pads(graph: gs.Graph) -> None:
    """Replace auto_pad by explicit pads, and ConvTranspose's output_shape by pads plus output_padding."""
    for node in graph.nodes:
        if node.op not in ("Conv", "ConvTranspose", "MaxPool", "AveragePool"):
            continue
        auto_pad = node.attrs.get("auto_pad", "NOTSET")
        if isinstance(auto_pad, bytes):
            auto_pad = auto_pad.decode()
        if auto_pad == "NOTSET" and "output_shape" not in node.attrs:
            continue
        spatial = _spatial_shape(node.inputs[0])
        if spatial is None:
            raise LrpError(f"node '{node.name}' ({node.op}): auto_pad needs static spatial input dimensions")
        kernel = _kernel_shape(node)
        rank = len(spatial)
        strides = node.attrs.get("strides", [1] * rank)
        dilations = node.attrs.get("dilations", [1] * rank)
        effective = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]
        if node.op == "ConvTranspose":
            pads, output_padding = _transpose_pads(node, spatial, strides, effective, auto_pad)
            node.attrs["output_padding"] = output_padding
            node.attrs.pop("output_shape", None)
        elif auto_pad == "VALID":
            pads = [0] * (2 * rank)
        else:
            totals = [max((-(-n // s) - 1) * s + e - n, 0) for n, s, e in zip(spatial, strides, effective)]
            pads = _split_pads(totals, auto_pad)
        node.attrs["pads"] = pads
        node.attrs.pop("auto_pad", None)


def _transpose_pads(node, spatial, strides, effective, auto_pad):
    rank = len(spatial)
    padding = list(node.attrs.get("output_padding", [0] * rank))
    full = [(n - 1) * s + e + p for n, s, e, p in zip(spatial, strides, effective, padding)]
    if "output_shape" in node.attrs:
        wanted = list(node.attrs["output_shape"])[-rank:]
    elif auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        wanted = [n * s for n, s in zip(spatial, strides)]
    elif auto_pad == "VALID":
        wanted = full
    else:
        return list(node.attrs.get("pads", [0] * 2 * rank)), padding
    totals = [f - w for f, w in zip(full, wanted)]
    if any(t < 0 for t in totals):
        # A larger output than the kernel covers: the extra goes into output_padding.
        padding = [p - min(t, 0) for p, t in zip(padding, totals)]
        totals = [max(t, 0) for t in totals]
    # As ONNX Runtime splits it: the larger half of odd padding at the start only for SAME_UPPER.
    begin_big = auto_pad == "SAME_UPPER"
    pads = [(t + 1) // 2 if begin_big else t // 2 for t in totals]
    return pads + [t - b for t, b in zip(totals, pads)], padding


def _split_pads(totals, auto_pad):
    begins = [t // 2 if auto_pad == "SAME_UPPER" else t - t // 2 for t in totals]
    return begins + [t - b for t, b in zip(totals, begins)]


def _kernel_shape(node: gs.Node) -> list[int]:
    if "kernel_shape" in node.attrs:
        return list(node.attrs["kernel_shape"])
    return list(node.inputs[1].shape[2:])


def _spatial_shape(tensor: gs.Tensor) -> list[int] | None:
    """The static spatial dimensions of an N, C, ... tensor, or None."""
    return list(tensor.shape[2:]) if static(tensor.shape, 2) else None

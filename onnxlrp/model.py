"""Loading, canonicalising and saving models: everything before and after the relevance walk."""
from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort

from .errors import LrpError

logging.getLogger("onnx_graphsurgeon").setLevel(logging.ERROR)
gs.logger.G_LOGGER.severity = gs.logger.G_LOGGER.ERROR

MIN_OPSET = 11
# Constants with more elements than this stay out of shape inference (only their shape matters there).
LIGHT_LIMIT = 4096
REMOVABLE = {"Identity", "Dropout"}
# Protobuf's limit for one file; larger models keep their weights in an external data file.
MAX_SINGLE_FILE = 2**31 - 2**24


def load(path: str | Path) -> onnx.ModelProto:
    """Read an ONNX model (external data included) or raise an LrpError saying why not."""
    path = Path(path)
    if not path.is_file():
        raise LrpError(f"{path}: no such file")
    try:
        model = onnx.load(str(path))
    except Exception as error:  # protobuf and external-data errors have no common type
        raise LrpError(f"{path}: not a readable ONNX model ({_first_line(error)})") from None
    if not model.graph.node or not model.opset_import:
        raise LrpError(f"{path}: not an ONNX model (no graph nodes or no opset)")
    return model


def opset_of(model: onnx.ModelProto) -> int:
    """The version of the default ONNX domain the model uses."""
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def canonicalize(model: onnx.ModelProto) -> gs.Graph:
    """Turn an exported model into the small, regular graph the relevance walk expects.

    Constants become initializers and constant subgraphs are folded, Identity/Dropout disappear, Gemm loses
    alpha/beta/transA/transB, a MatMul by a constant plus an Add of a constant becomes one Gemm, and pads are
    explicit. Shapes are inferred afterwards so that emitters can rely on static non-batch dimensions.
    """
    if opset_of(model) < MIN_OPSET:
        model = onnx.version_converter.convert_version(model, MIN_OPSET)
    graph = gs.import_onnx(model)
    infer_shapes(graph)
    graph.fold_constants(error_ok=True)
    graph.cleanup().toposort()
    if _fold_batch_independent(graph):
        graph.cleanup()
        infer_shapes(graph)
    for rewrite in (_remove_identities, _canonical_gemm, _fuse_matmul_add, _explicit_pads):
        rewrite(graph)  # each keeps the shapes it touches: no inference pass after them
    graph.cleanup().toposort()
    return graph


def _fold_batch_independent(graph: gs.Graph) -> bool:
    """Fold the tensors computed from shapes alone (torch's chunk sizes, split points) that come out the same for
    batch sizes 1 and 2: with a symbolic batch size, constant folding cannot see that they are constant.

    The values are observed by running the graph in ONNX Runtime on zero inputs. Returns whether any was folded.
    """
    dynamic = any(t.shape and not isinstance(t.shape[0], int) for t in graph.inputs)
    if not dynamic or any(not isinstance(d, int) for t in graph.inputs for d in t.shape[1:]):
        return False
    candidates = _shape_derived(graph)
    if not candidates:
        return False
    trial = graph.copy()
    tensors = trial.tensors()
    trial.outputs = [tensors[t.name] for t in candidates]
    blob = gs.export_onnx(trial.cleanup(), do_type_check=False).SerializeToString()
    session = ort.InferenceSession(blob, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    observed = [dict(zip(names, session.run(names, {t.name: np.zeros([batch] + list(t.shape[1:]), t.dtype)
                                                     for t in graph.inputs})))
                for batch in (1, 2)]
    folded = False
    for tensor in candidates:
        first, second = observed[0].get(tensor.name), observed[1].get(tensor.name)
        if first is not None and second is not None and np.array_equal(first, second):
            tensor.to_constant(first)
            tensor.inputs.clear()
            folded = True
    return folded


def _shape_derived(graph: gs.Graph) -> list[gs.Variable]:
    """Small tensors computed from Shape/Size outputs and constants only (the graph is in topological order)."""
    derived: set[str] = set()
    for node in graph.nodes:
        computed = [t for t in node.inputs if isinstance(t, gs.Variable)]
        if node.op in ("Shape", "Size") or (computed and all(t.name in derived for t in computed)):
            derived.update(t.name for t in node.outputs)
    return [t for t in graph.tensors().values() if t.name in derived and isinstance(t, gs.Variable)
            and t.shape is not None and len(t.shape) <= 1 and t not in graph.outputs]


def infer_shapes(graph: gs.Graph) -> None:
    """Give every variable of the graph its inferred shape and type.

    Inference runs on a copy whose large weights are graph inputs of the same shape, so that no weight is
    serialized: this is what keeps building large models fast. Dimensions after the first that stay unknown
    with a symbolic batch size (a Reshape to -1 of a computed shape) come from a second pass with batch 1.
    """
    light = graph.copy()
    stand_ins: dict[str, gs.Variable] = {}
    for node in light.nodes:
        for index, tensor in enumerate(node.inputs):
            if isinstance(tensor, gs.Constant) and int(np.prod(tensor.shape)) > LIGHT_LIMIT:
                if tensor.name not in stand_ins:
                    stand_ins[tensor.name] = gs.Variable(tensor.name, tensor.dtype, list(tensor.shape))
                node.inputs[index] = stand_ins[tensor.name]
    light.inputs.extend(stand_ins.values())
    exported = gs.export_onnx(light, do_type_check=False)
    tensors = graph.tensors()
    for name, dtype, shape in _inferred(exported):
        tensor = tensors.get(name)
        if isinstance(tensor, gs.Variable):
            tensor.dtype = dtype or tensor.dtype
            tensor.shape = shape if shape is not None else tensor.shape
    if not any(_unknown_after_batch(t) for t in tensors.values()):
        return
    for value in exported.graph.input:
        dims = value.type.tensor_type.shape.dim
        if value.name not in stand_ins and dims and not dims[0].HasField("dim_value"):
            dims[0].dim_value = 1
    for name, _, shape in _inferred(exported):
        tensor = tensors.get(name)
        if _unknown_after_batch(tensor) and shape is not None and len(shape) == len(tensor.shape):
            tensor.shape = tensor.shape[:1] + shape[1:]


def _unknown_after_batch(tensor: gs.Tensor | None) -> bool:
    return (isinstance(tensor, gs.Variable) and tensor.shape is not None
            and any(not isinstance(d, int) for d in tensor.shape[1:]))


def _inferred(model: onnx.ModelProto) -> list[tuple[str, np.dtype | None, list | None]]:
    """(name, type, shape) of every value that onnx's shape inference (with data propagation) can tell."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception as error:  # inference errors come as several exception types
        raise LrpError(f"shape inference failed on the model ({_first_line(error)})") from None
    found = []
    for info in list(inferred.graph.value_info) + list(inferred.graph.output):
        if info.type.HasField("tensor_type"):
            kind = info.type.tensor_type
            dtype = onnx.helper.tensor_dtype_to_np_dtype(kind.elem_type) if kind.elem_type else None
            shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                     for d in kind.shape.dim] if kind.HasField("shape") else None
            found.append((info.name, dtype, shape))
    return found


def save_atomic(model: onnx.ModelProto, path: str | Path) -> None:
    """Check the model, write it next to `path` under a temporary name, then move it into place."""
    path = Path(path)
    try:
        onnx.checker.check_model(model, full_check=False)
    except onnx.checker.ValidationError as error:
        raise LrpError(f"internal error: the built graph is invalid ({_first_line(error)})") from None
    temporary = None
    try:
        handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(handle)
        if model.ByteSize() > MAX_SINGLE_FILE:
            onnx.save(model, temporary, save_as_external_data=True, location=f"{path.name}.data")
        else:
            onnx.save(model, temporary)
        os.replace(temporary, path)
    except OSError as error:
        raise LrpError(f"{path}: cannot write the model ({error.strerror or error})") from None
    finally:
        if temporary and os.path.exists(temporary):
            os.unlink(temporary)


def ir_version_for(model: onnx.ModelProto, source_ir: int) -> int:
    """The source model's IR version (which its runtime loads), raised only as far as the opset requires.

    onnx stamps its newest IR version by default, which ONNX Runtime may not read yet.
    """
    opset = opset_of(model)
    return max(source_ir, min(ir for _, ir, ops, *_ in onnx.helper.VERSION_TABLE if ops >= opset))


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0][:300]


def constant(tensor: gs.Tensor) -> np.ndarray | None:
    """The value of a constant tensor (or None for a computed one)."""
    return tensor.values if isinstance(tensor, gs.Constant) else None


def replace(tensors: list, items: list) -> None:
    """Replace the contents of a node's input or output list (graphsurgeon's lists take no slice assignment)."""
    items = list(items)
    tensors.clear()
    tensors.extend(items)


def _bypass(graph: gs.Graph, node: gs.Node) -> None:
    """Let every consumer of the node's single output read the node's first input instead."""
    source, output = node.inputs[0], node.outputs[0]
    for consumer in list(output.outputs):
        replace(consumer.inputs, [source if t is output else t for t in consumer.inputs])
    node.outputs.clear()


def _remove_identities(graph: gs.Graph) -> None:
    """Drop Identity and inference Dropout nodes whose output is not a graph output."""
    outputs = set(id(t) for t in graph.outputs)
    for node in graph.nodes:
        if node.op in REMOVABLE and id(node.outputs[0]) not in outputs:
            if len(node.outputs) > 1 and node.outputs[1].outputs:
                continue  # a Dropout mask that something reads
            _bypass(graph, node)


def _canonical_gemm(graph: gs.Graph) -> None:
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
            node.inputs[1], weight.astype(np.float64) * alpha, "weight")]
        if len(node.inputs) > 2 and node.inputs[2].name:
            bias = constant(node.inputs[2])
            if bias is None or not _is_bias(bias, out_features):
                continue  # a computed or per-sample C: the emitter refuses the node
            bias = np.broadcast_to(bias.reshape(-1) * np.float64(beta), (out_features,))
            inputs.append(_constant_like(node.inputs[2], bias, "bias"))
        if node.attrs.get("transA", 0):
            shape = node.inputs[0].shape
            swapped = gs.Variable(f"{node.name}/transA", dtype=node.inputs[0].dtype,
                                  shape=list(shape)[::-1] if shape is not None else None)
            graph.nodes.append(gs.Node("Transpose", f"{node.name}/transA", {"perm": [1, 0]},
                                       [node.inputs[0]], [swapped]))
            inputs[0] = swapped
        replace(node.inputs, inputs)
        node.attrs = {"transB": 1} if transposed else {}


def _fuse_matmul_add(graph: gs.Graph) -> None:
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
            if other is not None and constant(other) is not None and _is_bias(other.values, weight.shape[1]):
                bias = np.broadcast_to(other.values.reshape(-1), (weight.shape[1],))
                inputs.append(_constant_like(other, bias, "bias"))
                replace(node.outputs, [add.outputs[0]])
                add.outputs.clear()
                add.inputs.clear()
        node.op = "Gemm"
        replace(node.inputs, inputs)


def _is_bias(values: np.ndarray, features: int) -> bool:
    """Whether an added constant is a per-output-feature bias of a dense layer."""
    return values.size in (1, features) and (values.ndim <= 1 or values.shape[:-1] == (1,) * (values.ndim - 1))


def _constant_like(template: gs.Tensor, values: np.ndarray, suffix: str) -> gs.Constant:
    dtype = template.values.dtype if isinstance(template, gs.Constant) else np.float32
    return gs.Constant(f"{template.name}/{suffix}", np.ascontiguousarray(values, dtype=dtype))


def _explicit_pads(graph: gs.Graph) -> None:
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
    shape = tensor.shape
    if shape is None or any(not isinstance(d, int) or d < 0 for d in shape[2:]):
        return None
    return list(shape[2:])

"""The relevance walk: from the explained logits back to the model input, one emitter call per node."""
from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from . import elementwise, encoding, linear, pooling, quantized, routing, softmax, transformer  # noqa: F401
from .datapath import data_path, explained_input
from .export import export_model
from .folding import fold_affine, fold_batchnorm
from .composite import Composite
from .errors import LrpError
from .canonical import canonicalize
from .graph import opset_of
from .io import ir_version_for
from .layers import LayerRelevance, expose, record
from .shapes import infer_shapes, parse_input_shape, require_static_input, with_input_shape
from .ops import Ops, Tensor
from .order import as_soon_as_ready
from .portable import separate_weight_views
from .registry import FAMILIES, Unsupported, computed, floating
from .registry import data_path as on_data_path
from .signs import nonnegative_tensors, unbounded_tensors
from .top import EXPLAIN, start, written_out_softmax
from .validate import check_model_structure
from .zeros import rectified_outputs, vanishing_relevance

TARGET, RELEVANCE, EMBEDDING_RELEVANCE = "target", "relevance", "relevance_embedding"
HEADS = ("Softmax", "LogSoftmax")


class Builder:
    """Holds what emitters may ask for: the op writer, the rule of each node, what is known of tensors' values."""

    def __init__(self, graph: gs.Graph, composite: Composite, ops: Ops, explained: gs.Variable | None = None):
        self.ops = ops
        self.composite = composite
        self._nonnegative = nonnegative_tensors(graph)
        self._unbounded = unbounded_tensors(graph, [explained.name] if explained is not None else [])
        self._rule = composite.assign(graph)
        # Tensors with no data path from the explained input are constants to the walk (None: every Variable).
        stopped = lambda node: softmax.stops(node, self.rule) or transformer.sigma_of_a_norm(node)  # noqa: E731
        self._data_path = data_path(graph, explained, stopped) if explained is not None else None
        with on_data_path(self._data_path):
            self._rectified = rectified_outputs(graph, vanishing_relevance(graph, self.rule))
        self.layers: list[LayerRelevance] = []  # the linear layers walked, from the output back to the input

    def rule(self, node: gs.Node) -> tuple[str, dict]:
        return self._rule(node)

    def nonnegative(self, tensor: Tensor) -> bool:
        return tensor.name in self._nonnegative

    def finite(self, tensor: Tensor) -> bool:
        return tensor.name not in self._unbounded

    def rectified(self, tensor: Tensor) -> Tensor | None:
        return self._rectified.get(tensor.name)

    def walk(self, graph: gs.Graph, top: Tensor, seed: Tensor, source: str) -> dict[str, list[Tensor]]:
        """Propagate `seed` from tensor `top` to every tensor it depends on; return the relevance that reached
        the graph's inputs (contributions per tensor name)."""
        with on_data_path(self._data_path):
            return self._walk(graph, top, seed, source)

    def _walk(self, graph: gs.Graph, top: Tensor, seed: Tensor, source: str) -> dict[str, list[Tensor]]:
        relevance: dict[str, list[Tensor]] = {top.name: [seed]}
        problems: dict[tuple[str, str], list[str]] = defaultdict(list)
        for node in list(reversed(graph.nodes)):
            if not any(computed(t) for t in node.inputs):
                continue  # a constant to the walk (or the lookup of the explained embedding)
            upper = [self.ops.add_all(relevance.pop(t.name)) if t.name in relevance else None for t in node.outputs]
            if all(r is None for r in upper):
                continue
            self.ops.scope = f"lrp/{node.name}"
            try:
                if node.op not in FAMILIES:
                    raise Unsupported("unsupported op type")
                lower = FAMILIES[node.op].emit(self, node, upper)
                if node.op in linear.LINEAR_OPS and linear.is_layer(node):
                    self.layers.append(LayerRelevance(node, self.rule(node)[0], upper[0], lower[0]))
            except Unsupported as reason:
                problems[(node.op, str(reason))].append(node.name)
                # Keep walking through the float inputs, so that every problem is reported at once.
                lower = [t if floating(t) else None for t in node.inputs]
            for tensor, contribution in zip(node.inputs, lower):
                if contribution is not None and computed(tensor):
                    relevance.setdefault(tensor.name, []).append(contribution)
        if problems:
            details = "; ".join(f"{op} ({', '.join(repr(n) for n in names)}): {reason}"
                                for (op, reason), names in problems.items())
            raise LrpError(f"{source}: cannot explain {sum(map(len, problems.values()))} node(s): {details}")
        return relevance


def build(model: onnx.ModelProto, composite: Composite, explain: str = "logit", output: str | None = None,
          source: str = "model", layer_relevance: bool = False, input_shape: str | None = None,
          target_default: bool = True) -> onnx.ModelProto:
    """Return a model that computes the original outputs plus `relevance` for the class given in `target`
    (and with `layer_relevance`, the relevance at the input of every linear layer: see layers.py).

    `input_shape` (`[NAME:]DIMS`, as on the command line) fixes the sizes a model input leaves open.
    `target` defaults to -1 (the predicted class) through an initializer; without `target_default` it is a plain
    required input, for runtimes that take an input with a default for a constant (OpenVINO, TensorRT)."""
    if explain not in EXPLAIN:
        raise LrpError(f"--explain must be one of {', '.join(EXPLAIN)} (got '{explain}')")
    check_model_structure(model, source)
    source_ir, source_opset = model.ir_version, opset_of(model)
    declared_outputs = {value.name: onnx.ValueInfoProto.FromString(value.SerializeToString())
                        for value in model.graph.output}
    metadata = {p.key: p.value for p in model.metadata_props}  # class labels and the like stay with the model
    if input_shape is not None:
        model = with_input_shape(model, parse_input_shape(input_shape), source)
    quantized.refuse_integer_arithmetic(model, source)
    original = model if quantized.is_quantized(model) else None  # its own nodes keep computing the outputs
    graph = canonicalize(_copy(model) if original is not None else model)
    del model  # the graph holds its own weights: the source's memory goes unless the caller keeps the model
    require_static_input(graph, source)
    fold_batchnorm(graph)
    fold_affine(graph)  # folded nodes hand their (inferred) output tensor to the linear node: shapes stay
    graph.cleanup().toposort()
    graph = _at_opset(graph, _needed_opset(graph, source_opset), source)
    taken = {t for t in graph.tensors()} & {TARGET, RELEVANCE, EMBEDDING_RELEVANCE}
    if taken:
        raise LrpError(f"{source}: the model already has a tensor named {', '.join(sorted(taken))}")
    x, ids = explained_input(graph, source)
    shown = _classifier_output(graph, output, source)
    logits = _logits(shown)
    classes = logits.shape[1] if logits.shape is not None and len(logits.shape) == 2 else None
    if not isinstance(classes, int):
        raise LrpError(f"{source}: output '{shown.name}' must have shape [N, C] with a static C")

    ops = Ops(graph, graph.opset, np.dtype(logits.dtype))
    target = gs.Variable(TARGET, dtype=np.int64, shape=[_batch(x)])
    builder = Builder(graph, composite, ops, x)
    relevance = builder.walk(graph, *start(builder, logits, target, classes, explain), source)
    if x.name not in relevance:
        raise LrpError(f"{source}: output '{shown.name}' does not depend on input '{x.name}'")
    total = ops.add_all(relevance[x.name])
    if ids is not None:  # token relevance: the sum over the embedding axis, and the embedding's own
        graph.outputs.append(gs.Variable(EMBEDDING_RELEVANCE, dtype=x.dtype, shape=x.shape))
        graph.nodes.append(gs.Node("Identity", ops.fresh("lrp/relevance_embedding"), inputs=[total],
                                   outputs=[graph.outputs[-1]]))
        total = ops.reduce_sum(total, [len(x.shape) - 1], keepdims=False)
    result = gs.Variable(RELEVANCE, dtype=x.dtype if floating(x) else ops.dtype,
                         shape=(ids if ids is not None else x).shape)
    graph.nodes.append(gs.Node("Identity", ops.fresh("lrp/relevance"), inputs=[total], outputs=[result]))
    graph.inputs.append(target)
    graph.outputs.append(result)
    layers = expose(graph, builder.layers[::-1]) if layer_relevance else None
    separate_weight_views(graph)
    as_soon_as_ready(graph)
    del builder, ops, relevance  # their caches hold weight arrays that export_model moves into the model
    built = export_model(graph)
    for value in built.graph.output:  # graphsurgeon loses non-tensor types (a ZipMap's sequence of maps)
        if value.name in declared_outputs:
            value.CopyFrom(declared_outputs[value.name])
    if target_default:
        batch = target.shape[0] if isinstance(target.shape[0], int) else 1  # the default must fit a static batch
        built.graph.initializer.append(onnx.numpy_helper.from_array(np.full(batch, -1, dtype=np.int64), TARGET))
    built.ir_version = ir_version_for(built, source_ir)
    if original is not None:  # the built graph is the float twin that explains the quantized model
        built = quantized.with_original_forward(original, built, [TARGET, RELEVANCE])
    if layers is not None:
        record(built, layers, explain, x.name, logits.name, RELEVANCE, TARGET)
    onnx.helper.set_model_props(built, {**metadata, **{p.key: p.value for p in built.metadata_props}})
    return built


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def _needed_opset(graph: gs.Graph, opset: int) -> int:
    return max([opset] + [FAMILIES[n.op].min_opset(n) for n in graph.nodes if n.op in FAMILIES])


def _at_opset(graph: gs.Graph, opset: int, source: str) -> gs.Graph:
    """Convert the graph to a newer opset when an emitter needs one (e.g. ScatterElements with reduction)."""
    if graph.opset >= opset:
        return graph
    try:
        converted = onnx.version_converter.convert_version(gs.export_onnx(graph, do_type_check=False), opset)
    except Exception as error:  # the converter raises several types
        raise LrpError(f"{source}: needs opset {opset} for its relevance ops and could not be converted "
                       f"from opset {graph.opset} ({str(error).splitlines()[0]})") from None
    graph = gs.import_onnx(converted)
    infer_shapes(graph)
    return graph


def _classifier_output(graph: gs.Graph, name: str | None, source: str) -> gs.Variable:
    """The output named `name`, or the first floating-point output of shape [N, C] (or input of a ZipMap)."""
    if name is not None:
        chosen = next((t for t in graph.outputs if t.name == name), None) or graph.tensors().get(name)
        if chosen is None:
            raise LrpError(f"{source}: no output named '{name}' (outputs: {', '.join(t.name for t in graph.outputs)})")
        if not isinstance(chosen, gs.Variable) or not floating(chosen) or len(chosen.shape or []) != 2:
            raise LrpError(f"{source}: tensor '{name}' is not a computed float tensor of shape [N, C]")
        return chosen
    # scikit-learn's converters hide the probabilities behind a ZipMap (a sequence of maps).
    zipped = [n.inputs[0] for n in graph.nodes if n.op == "ZipMap"]
    for tensor in list(graph.outputs) + zipped:
        if floating(tensor) and tensor.shape is not None and len(tensor.shape) == 2:
            return tensor
    raise LrpError(f"{source}: no floating-point output of shape [N, C] to explain")


def _logits(output: gs.Variable) -> gs.Variable:
    """The tensor before a trailing Softmax/LogSoftmax (also written out as Exp/ReduceSum/Div) and Identity, so
    that the logits are explained."""
    tensor = output
    while True:
        if tensor.inputs and tensor.inputs[0].op in HEADS + ("Identity",):
            tensor = tensor.inputs[0].inputs[0]
        elif (before := written_out_softmax(tensor)) is not None:
            tensor = before
        else:
            return tensor


def _batch(x: gs.Variable):
    return x.shape[0] if x.shape else "N"

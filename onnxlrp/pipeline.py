"""The one build that the API, the command line and `inspect` share: validate, canonicalise and fold the model,
collapse the declared patterns, walk the relevance graph, then put the model's own nodes back and export."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .canonical import quantized
from .canonical.classic import linear_models
from .canonical.folding import fold
from .canonical.passes import canonicalize
from .canonical.patterns import Collapsed, collapse
from .errors import LrpError
from .ir.export import export_model
from .ir.files import ir_version_for
from .ir.order import as_soon_as_ready
from .ir.portable import separate_weight_views
from .ir.shapes import infer_shapes, parse_input_shape, require_static_input, with_input_shape
from .ir.validate import check_model_structure
from .lrp.composite import Composite
from .lrp.emitters import FAMILIES
from .lrp.layers import expose, record
from .lrp.seed import EXPLAIN, RELEVANCE, TARGET
from .lrp.walk import explain as explain_graph


@dataclass
class Prepared:
    """The canonical graph the walk sees, what was folded into its linear layers (or what a classic model's linear
    model stands beside), and what stands collapsed."""
    graph: gs.Graph
    folded: dict[str, tuple[str, ...]]
    collapsed: Collapsed


def prepare(model: onnx.ModelProto, source: str) -> Prepared:
    """Canonicalise the model (a copy where it is quantized, whose own nodes keep computing the outputs), fold
    BatchNorm and affine constants into linear layers, convert to the opset the emitters need, collapse patterns,
    and add the twins of classic linear models (canonical/classic.py)."""
    graph = canonicalize(model)
    require_static_input(graph, source)
    folded = fold(graph)
    graph = _at_opset(graph, _needed_opset(graph, graph.opset), source)
    collapsed = collapse(graph)
    folded.update(linear_models(graph, collapsed))
    return Prepared(graph, folded, collapsed)


def build(model: onnx.ModelProto, composite: Composite, explain: str = "logit", output: str | None = None,
          source: str = "model", layer_relevance: bool = False, input_shape: str | None = None,
          target_default: bool = True) -> onnx.ModelProto:
    """Return a model that computes the original outputs plus `relevance` for the class given in `target`
    (and with `layer_relevance`, the relevance at the input of every linear layer: see lrp/layers.py).

    `input_shape` (`[NAME:]DIMS`, as on the command line) fixes the sizes a model input leaves open.
    `target` defaults to -1 (the predicted class) through an initializer; without `target_default` it is a plain
    required input, for runtimes that take an input with a default for a constant (OpenVINO, TensorRT)."""
    if explain not in EXPLAIN:
        raise LrpError(f"--explain must be one of {', '.join(EXPLAIN)} (got '{explain}')")
    check_model_structure(model, source)
    source_ir = model.ir_version
    declared_outputs = {value.name: onnx.ValueInfoProto.FromString(value.SerializeToString())
                        for value in model.graph.output}
    metadata = {p.key: p.value for p in model.metadata_props}  # class labels and the like stay with the model
    if input_shape is not None:
        model = with_input_shape(model, parse_input_shape(input_shape), source)
    quantized.refuse_integer_arithmetic(model, source)
    original = model if quantized.is_quantized(model) else None  # its own nodes keep computing the outputs
    prepared = prepare(_copy(model) if original is not None else model, source)
    del model  # the graph holds its own weights: the source's memory goes unless the caller keeps the model
    graph = prepared.graph
    explained = explain_graph(graph, composite, explain, output, source, prepared.collapsed.hidden())
    layers = expose(graph, explained.layers) if layer_relevance else None
    prepared.collapsed.restore()
    separate_weight_views(graph)
    as_soon_as_ready(graph)
    del prepared  # its graph is exported next: export_model moves the weight arrays into the model
    built = export_model(graph)
    for value in built.graph.output:  # graphsurgeon loses non-tensor types (a ZipMap's sequence of maps)
        if value.name in declared_outputs:
            value.CopyFrom(declared_outputs[value.name])
    if target_default:
        shape = explained.target.shape
        batch = shape[0] if isinstance(shape[0], int) else 1  # the default must fit a static batch
        built.graph.initializer.append(onnx.numpy_helper.from_array(np.full(batch, -1, dtype=np.int64), TARGET))
    built.ir_version = ir_version_for(built, source_ir)
    if original is not None:  # the built graph is the float twin that explains the quantized model
        built = quantized.with_original_forward(original, built, [TARGET, RELEVANCE])
    if layers is not None:
        record(built, layers, explain, explained.x.name, explained.logits.name, RELEVANCE, TARGET)
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

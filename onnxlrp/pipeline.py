"""The one build that the API, the command line and `inspect` share: validate, canonicalise and fold the model,
collapse the declared patterns, walk the relevance graph, then put the model's own nodes back and export."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .canonical import quantized
from .canonical.batch import batch_of_one, lacks_batch_axis
from .canonical.classic import linear_models
from .canonical.control import condition, either, runtime_choice, with_branch
from .canonical.folding import fold
from .canonical.passes import canonicalize
from .canonical.recurrent import has_recurrent, initial_states
from .canonical.patterns import Collapsed, collapse
from .errors import LrpError
from .ir.export import export_model
from .ir.files import first_line, ir_version_for
from .ir.order import as_soon_as_ready
from .ir.portable import separate_weight_views
from .ir.precision import to_float16
from .ir.runtime import optimized_for_cpu, require_loadable
from .ir.shapes import infer_shapes, parse_input_shape, require_static_input, with_input_shapes
from .ir.validate import check_model_structure
from .ir.weights import with_folded_weights
from .lrp.composite import Composite
from .lrp.emitters import FAMILIES
from .lrp.families import refuse_not_explained
from .lrp.layers import expose, record
from .lrp.seed import EXPLAIN, POSITION, RELEVANCE, TARGET, Recorded
from .lrp.walk import explain as explain_graph

# Runtimes `optimize_for` writes ONNX Runtime's optimised model for.
OPTIMIZED_FOR = ("cpu",)
# If nodes chosen at run time that a build explains (each doubles the built model).
MAX_CHOICES = 3


@dataclass
class Prepared:
    """The canonical graph the walk sees, what was folded into its linear layers (or what a classic model's linear
    model stands beside), and what stands collapsed."""
    graph: gs.Graph
    folded: dict[str, tuple[str, ...]]
    collapsed: Collapsed


def prepare(model: onnx.ModelProto, source: str) -> Prepared:
    """Canonicalise the model (its float twin where it is quantized or in half precision), fold BatchNorm and affine
    constants into linear layers, convert to the opset the emitters need, collapse patterns,
    and add the twins of classic linear models (canonical/classic.py)."""
    return _prepared(canonicalize(model, source), source)


def prepare_branches(model: onnx.ModelProto, source: str, taken: str = "") -> list[tuple[str, Prepared]]:
    """What `prepare` gives, once per way through the If nodes that choose their branch at run time, each with the
    branches it takes ("If 'a' then, If 'b' else"; "" when there is no such If)."""
    graph = canonicalize(model, source)
    choice = runtime_choice(graph)
    if choice is None:
        return [(taken, _prepared(graph, source))]
    before = f"{taken}, " if taken else ""
    return [way for branch in ("then", "else") for way in prepare_branches(
        with_branch(graph, choice, branch == "then"), source, f"{before}If '{choice.name}' {branch}")]


def _prepared(graph: gs.Graph, source: str) -> Prepared:
    require_static_input(graph, source)
    folded = fold(graph)
    graph = _at_opset(graph, _needed_opset(graph, graph.opset), source)
    collapsed = collapse(graph)
    folded.update(linear_models(graph, collapsed))
    return Prepared(graph, folded, collapsed)


def build(model: onnx.ModelProto, composite: Composite, explain: str = "logit", output: str | None = None,
          source: str = "model", layer_relevance: bool = False, input_shape: str | Sequence[str] | None = None,
          target_default: bool = True, dtype: str = "float32", position: int = -1,
          explain_input: str | None = None, fold_weights: bool = False, optimize_for: str | None = None,
          weights_folder: Path | None = None) -> onnx.ModelProto:
    """Return a model that computes the original outputs plus `relevance` for the class given in `target`
    (and with `layer_relevance`, the relevance at the input of every linear layer: see lrp/layers.py).

    `input_shape` (`[NAME:]DIMS` as on the command line, or a list of them, one per input) fixes the sizes that
    model inputs leave open. A model whose classifier output has rank 1 is built as a batch of one
    (canonical/batch.py). `target` defaults to -1 (the predicted class) through an initializer; without
    `target_default` it is a plain required input, for runtimes that take an input with a default for a constant
    (OpenVINO, TensorRT). `dtype="float16"` computes in half precision (only the relevance, for a model explained on
    its float twin). A model whose classifier output is a sequence of logits [N, T, V] (a language model's) gets
    the input `position` too, the position explained (default `position`: -1, the last token of each sample; see
    lrp/seed.py). `explain_input` names the model input to explain where the build would not guess (token ids
    looked up twice). `fold_weights` stores the modified weights computed (ir/weights.py): a larger file, a faster
    session start; `optimize_for="cpu"` returns ONNX Runtime's optimised model for this machine's CPU (ir/runtime.py),
    the fastest start. The result is loaded by ONNX Runtime before it is returned: a model that would not load is an
    LrpError. `weights_folder`: the folder of the external data files of a model read without its weights
    (ir/files.py load(path, read_weights=False)), which the graph then reads straight into its own arrays."""
    if explain not in EXPLAIN:
        raise LrpError(f"--explain must be one of {', '.join(EXPLAIN)} (got '{explain}')")
    if optimize_for not in (None, *OPTIMIZED_FOR):
        raise LrpError(f"--optimize-for must be one of {', '.join(OPTIMIZED_FOR)} (got '{optimize_for}')")
    check_model_structure(model, source)
    source_ir = model.ir_version
    declared_outputs = {value.name: onnx.ValueInfoProto.FromString(value.SerializeToString())
                        for value in model.graph.output}
    metadata = {p.key: p.value for p in model.metadata_props}  # class labels and the like stay with the model
    shapes = [input_shape] if isinstance(input_shape, str) else list(input_shape or [])
    model = with_input_shapes(model, [parse_input_shape(text) for text in shapes], source)
    unbatched = None
    if lacks_batch_axis(model, output):
        if layer_relevance:
            raise LrpError(f"{source}: --layer-relevance needs a model with a batch axis (its classifier output "
                           f"has rank 1)")
        model, unbatched = batch_of_one(model)
    twinned = _twinned(model)
    if weights_folder is not None and twinned:  # the model's own nodes, weights included, go into the built model
        onnx.load_external_data_for_model(model, str(weights_folder))
        weights_folder = None
    held = [model]  # _built takes the model out of the list, so that no frame here keeps the source's weights
    del model
    built = _built(held, composite, explain, output, source, layer_relevance, explain_input, weights_folder)
    if unbatched is not None:
        built = unbatched.restore(built)
    for value in built.graph.output:  # graphsurgeon loses non-tensor types (a ZipMap's sequence of maps)
        if value.name in declared_outputs:
            value.CopyFrom(declared_outputs[value.name])
    if target_default:
        dims = next(v for v in built.graph.input if v.name == TARGET).type.tensor_type.shape.dim
        batch = dims[0].dim_value if dims and dims[0].HasField("dim_value") else 1  # fits a static batch
        built.graph.initializer.append(onnx.numpy_helper.from_array(np.full(batch, -1, dtype=np.int64), TARGET))
        if any(value.name == POSITION for value in built.graph.input):
            built.graph.initializer.append(onnx.numpy_helper.from_array(np.array(position, np.int64), POSITION))
    built.ir_version = ir_version_for(built, source_ir)
    if dtype == "float16":
        built = to_float16(built, quantized.TWIN if twinned else "")
    onnx.helper.set_model_props(built, {**metadata, **{p.key: p.value for p in built.metadata_props}})
    if fold_weights:
        built = with_folded_weights(built, source)
    if optimize_for == "cpu":
        built = optimized_for_cpu(built, source)
    require_loadable(built, source)
    return built


def _built(held: list[onnx.ModelProto], composite: Composite, explain: str, output: str | None, source: str,
           layer_relevance: bool, explain_input: str | None, weights_folder: Path | None = None, choices: int = 0
           ) -> onnx.ModelProto:
    """The model (taken out of `held`, the caller's only reference) with `target` (no default yet) and
    `relevance`. An If whose condition depends on an input is explained branch by branch: the model is built with
    each branch taken, and the two joined under one If."""
    model = held.pop()
    refuse_not_explained(model, source)
    # A quantized model's twin, or written-out recurrent layers: the model's own nodes keep computing the outputs.
    original = model if _twinned(model) else None
    states = initial_states(model)
    graph = canonicalize(model, source, weights_folder)
    del model  # the graph holds its own weights: the source's memory goes unless the caller keeps the model
    choice = runtime_choice(graph)
    if choice is not None:
        if original is not None:
            raise LrpError(f"{source}: node '{choice.name}' (If) chooses its branch at run time, which is explained "
                           f"on models that are neither quantized nor in half precision")
        if choices == MAX_CHOICES or layer_relevance:
            raise LrpError(f"{source}: node '{choice.name}' (If) chooses its branch at run time, which is explained "
                           + ("without --layer-relevance" if layer_relevance else
                              f"for at most {MAX_CHOICES} such If nodes (each one doubles the built model)"))
        branches = [_built([with_branch(graph, choice, taken)], composite, explain, output, source, False,
                           explain_input, None, choices + 1) for taken in (True, False)]
        joined = either(condition(graph, choice), *branches)
        onnx.helper.set_model_props(joined, {**{p.key: p.value for p in branches[0].metadata_props},
                                             **{p.key: p.value for p in joined.metadata_props}})
        return joined
    prepared = _prepared(graph, source)
    graph = prepared.graph
    explained = explain_graph(graph, composite, explain, output, source, prepared.collapsed.hidden(), explain_input,
                             states)
    layers = expose(graph, explained.layers) if layer_relevance else None
    prepared.collapsed.restore()
    separate_weight_views(graph)
    as_soon_as_ready(graph)
    del prepared  # its graph is exported next: export_model moves the weight arrays into the model
    built = export_model(graph)
    named = _same
    if original is not None:  # the built graph is the twin that explains the model
        built, named = quantized.with_original_forward(original, built)
    if layers is not None:
        record(built, [{**layer, "upper": named(layer["upper"])} for layer in layers], explain,
               (explained.ids or explained.x).name, named(explained.logits.name), RELEVANCE, TARGET)
    Recorded(composite.name, explain, explained.head.output.name, named(explained.logits.name),
             explained.head.kind, explained.architecture).store(built)
    return built


def _twinned(model: onnx.ModelProto) -> bool:
    """Whether the model is explained on a twin beside its own nodes (quantized, half precision, recurrent)."""
    return quantized.needs_twin(model) or has_recurrent(model)


def _same(name: str) -> str:
    return name


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
                       f"from opset {graph.opset} ({first_line(error)})") from None
    graph = gs.import_onnx(converted)
    infer_shapes(graph)
    return graph

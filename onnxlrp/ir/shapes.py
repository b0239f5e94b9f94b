"""Shapes: what onnx's inference can tell, and shape arithmetic that is the same for every batch size."""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort

from ..errors import LrpError
from .files import first_line
from .graph import reads, static

# Constants with more elements than this stay out of shape inference (only their shape matters there).
LIGHT_LIMIT = 4096


def infer_shapes(graph: gs.Graph) -> None:
    """Give every variable of the graph its inferred shape and type.

    Inference runs on a copy whose large weights are graph inputs of the same shape, so that no weight is
    serialized: this is what keeps building large models fast. Dimensions after the first that stay unknown
    with a symbolic batch size (a Reshape to -1 of a computed shape) come from passes with batch 1 and 2, where
    they agree.
    """
    light, stand_ins = _light(graph.copy())
    exported = gs.export_onnx(light, do_type_check=False)
    tensors = graph.tensors()
    for name, dtype, shape in _inferred(exported):
        tensor = tensors.get(name)
        if isinstance(tensor, gs.Variable):
            tensor.dtype = dtype or tensor.dtype
            tensor.shape = shape if shape is not None else tensor.shape
    if not any(_unknown_after_batch(t) for t in tensors.values()):
        return
    batch_dims = [value.type.tensor_type.shape.dim[0] for value in exported.graph.input
                  if value.name not in stand_ins and value.type.tensor_type.shape.dim
                  and not value.type.tensor_type.shape.dim[0].HasField("dim_value")]
    at_batch = []
    for batch in (1, 2):  # a dimension is kept only where both agree (not the batch in a sequence-first layout)
        for dim in batch_dims:
            dim.dim_value = batch
        at_batch.append({name: shape for name, _, shape in _inferred(exported)})
    for name, shape in at_batch[0].items():
        tensor, other = tensors.get(name), at_batch[1].get(name)
        if _unknown_after_batch(tensor) and shape is not None and other is not None \
                and len(shape) == len(tensor.shape) == len(other):
            tensor.shape = tensor.shape[:1] + [a if a == b else d for a, b, d in
                                               zip(shape[1:], other[1:], tensor.shape[1:])]


def _light(graph: gs.Graph) -> tuple[gs.Graph, dict[str, np.ndarray]]:
    """The graph (a copy, changed in place) with its large constants turned into graph inputs of the same name,
    type and shape, and their values: exporting it serializes no weight."""
    stand_ins: dict[str, gs.Variable] = {}
    values: dict[str, np.ndarray] = {}
    for node in graph.nodes:
        for index, tensor in enumerate(node.inputs):
            if isinstance(tensor, gs.Constant) and int(np.prod(tensor.shape)) > LIGHT_LIMIT:
                if tensor.name not in stand_ins:
                    stand_ins[tensor.name] = gs.Variable(tensor.name, tensor.dtype, list(tensor.shape))
                    values[tensor.name] = tensor.values
                node.inputs[index] = stand_ins[tensor.name]
    graph.inputs.extend(stand_ins.values())
    return graph, values


def _trial_runs(graph: gs.Graph, wanted: list[gs.Variable], batches: tuple,
                keep: Callable = lambda value: value) -> list[dict[str, object]]:
    """`keep` of the values of `wanted` when the graph runs in ONNX Runtime on zero inputs, once per batch size
    (None: the inputs' own; each run's values are let go before the next). The weights are fed to the session,
    not serialized into it, and the session is not optimized: it runs once or twice, and for a large model both
    would take longer than the runs."""
    trial = graph.copy()
    tensors = trial.tensors()
    trial.outputs = [tensors[t.name] for t in wanted]
    inputs = list(graph.inputs)
    trial, weights = _light(trial.cleanup())
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    session = ort.InferenceSession(gs.export_onnx(trial, do_type_check=False).SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    fed = {i.name for i in session.get_inputs()}
    feeds = {name: value for name, value in weights.items() if name in fed}
    return [{name: keep(value) for name, value in zip(names, session.run(names, {**feeds, **{
        t.name: np.zeros(([batch or t.shape[0]] + list(t.shape[1:])) if t.shape else [], t.dtype) for t in inputs}}))}
        for batch in batches]


def _unknown_after_batch(tensor: gs.Tensor | None) -> bool:
    return isinstance(tensor, gs.Variable) and tensor.shape is not None and not static(tensor.shape)


def _inferred(model: onnx.ModelProto) -> list[tuple[str, np.dtype | None, list | None]]:
    """(name, type, shape) of every value that onnx's shape inference (with data propagation) can tell."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception as error:  # inference errors come as several exception types
        raise LrpError(f"shape inference failed on the model ({first_line(error)})") from None
    found = []
    for info in list(inferred.graph.value_info) + list(inferred.graph.output):
        if info.type.HasField("tensor_type"):
            kind = info.type.tensor_type
            dtype = onnx.helper.tensor_dtype_to_np_dtype(kind.elem_type) if kind.elem_type else None
            shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                     for d in kind.shape.dim] if kind.HasField("shape") else None
            found.append((info.name, dtype, shape))
    return found


def fold_batch_independent(graph: gs.Graph) -> bool:
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
    observed = _trial_runs(graph, candidates, (1, 2))
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


def parse_input_shape(text: str) -> tuple[str | None, list[int | str]]:
    """`[NAME:]DIMS` with comma-separated DIMS; a non-numeric dimension (`N`) stays symbolic."""
    name, _, dims = text.rpartition(":")
    parts = [d.strip() for d in dims.split(",")]
    if not dims.strip() or any(not p for p in parts) or any(p.isdigit() and int(p) == 0 for p in parts):
        raise LrpError(f"--input-shape '{text}': expected [NAME:]DIMS, comma-separated positive sizes or names "
                       f"(e.g. x:N,3,224,224)")
    return name or None, [int(p) if p.isdigit() else p for p in parts]


def with_input_shapes(model: onnx.ModelProto, specs: Sequence[tuple[str | None, list]], source: str
                      ) -> onnx.ModelProto:
    """A copy of the model whose inputs have the given shapes: each spec names its input (or, without a name, the
    first non-initializer input); an input given twice is refused."""
    weights = {t.name for t in model.graph.initializer}
    inputs = [v for v in model.graph.input if v.name not in weights]
    chosen = []
    for name, dims in specs:
        value = next((v for v in inputs if v.name == name), None) if name else (inputs[0] if inputs else None)
        if value is None:
            raise LrpError(f"{source}: --input-shape names no input '{name}' "
                           f"(inputs: {', '.join(v.name for v in inputs)})")
        if any(value.name == other.name for other, _ in chosen):
            raise LrpError(f"{source}: --input-shape is given twice for input '{value.name}'")
        _check_dims(value, dims, source)
        chosen.append((value, dims))
    if not chosen:
        return model
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for value, dims in chosen:
        _declare(next(v for v in copy.graph.input if v.name == value.name), dims)
    return copy


def _check_dims(value: onnx.ValueInfoProto, dims: list, source: str) -> None:
    declared = value.type.tensor_type.shape.dim
    if len(declared) and len(declared) != len(dims):
        raise LrpError(f"{source}: --input-shape gives {len(dims)} dimensions, input '{value.name}' has "
                       f"{len(declared)}")
    for index, (old, new) in enumerate(zip(declared, dims)):
        if old.HasField("dim_value") and old.dim_value > 0 and isinstance(new, int) and old.dim_value != new:
            raise LrpError(f"{source}: --input-shape gives size {new} to dimension {index} of input "
                           f"'{value.name}', which the model fixes at {old.dim_value}")


def _declare(value: onnx.ValueInfoProto, dims: list) -> None:
    value.type.tensor_type.shape.Clear()
    for size in dims:
        dim = value.type.tensor_type.shape.dim.add()
        if isinstance(size, int):
            dim.dim_value = size
        else:
            dim.dim_param = size


def _open(tensor: gs.Tensor) -> bool:
    """Whether a variable's shape is unknown, or unknown after the batch axis."""
    return isinstance(tensor, gs.Variable) and not static(tensor.shape)


def _feeding(tensor: gs.Tensor, inputs: Sequence[gs.Tensor]) -> list[gs.Tensor]:
    """The graph inputs that a tensor is computed from (through subgraphs' outer reads too), in input order."""
    seen: set[int] = set()
    stack = [tensor]
    while stack:
        current = stack.pop()
        if id(current) not in seen:
            seen.add(id(current))
            stack.extend(t for node in current.inputs for t in reads(node))
    return [t for t in inputs if id(t) in seen]


def require_static_input(graph: gs.Graph, source: str) -> None:
    """One clear line when convolutions or pooling need sizes that a model input leaves open, naming the input
    that feeds the node."""
    needing = [n for n in graph.nodes if n.op in SPATIAL_OPS and _open(n.inputs[0])]
    for node in needing:
        for tensor in _feeding(node.inputs[0], graph.inputs):
            if _open(tensor):
                shape = ",".join(str(d) if isinstance(d, int) else (d or "?") for d in (tensor.shape or ["?"]))
                raise LrpError(f"{source}: input '{tensor.name}' has open dimensions [{shape}] that node "
                               f"'{node.name}' ({node.op}) needs: give them with --input-shape "
                               f"{tensor.name}:DIMS (e.g. N,3,224,224)")


SPATIAL_OPS = ("Conv", "ConvTranspose", "MaxPool", "AveragePool")


def observe_shapes(graph: gs.Graph) -> bool:
    """Fill in the shapes that inference left open, or named with symbols of its own (two tensors of one batch
    size under different names), by running the graph once (twice with a symbolic batch size: at 1 and at 2) in
    ONNX Runtime with each such tensor as an output. A dimension that follows the batch size gets the input's
    batch symbol; one that is the same in both runs becomes that number.

    Needs static input sizes after the batch axis. Returns whether any shape was filled in.
    """
    symbols = {d for t in graph.inputs for d in (t.shape or []) if isinstance(d, str)}
    wanted = [t for t in graph.tensors().values() if isinstance(t, gs.Variable) and t.inputs and t not in graph.inputs
              and (_open(t) or any(isinstance(d, str) and d not in symbols for d in t.shape))]
    if not wanted or any(t.shape is None or any(not isinstance(d, int) for d in t.shape[1:])
                         for t in graph.inputs):
        return False
    symbolic = [t.shape[0] for t in graph.inputs if t.shape and not isinstance(t.shape[0], int)]
    batches = (1, 2) if symbolic else (None,)
    try:
        runs = _trial_runs(graph, wanted, batches, np.shape)
    except Exception:  # a model ONNX Runtime cannot run at these sizes keeps the inferred shapes
        return False
    filled = False
    for tensor in wanted:
        shapes = [r.get(tensor.name) for r in runs]
        if any(s is None for s in shapes) or len({len(s) for s in shapes}) != 1:
            continue
        dims = []
        for sizes in zip(*shapes):
            if len(set(sizes)) == 1:
                dims.append(int(sizes[0]))
            elif list(sizes) == list(batches):
                dims.append(symbolic[0])
            else:
                dims.append(None)
        tensor.shape = dims
        filled = True
    return filled

"""What the walk knows of tensors before they are computed, found in one pass over the graph each:

- the data path: the explained input (a float model input, an integer input that the graph one-hot encodes, or for
  token ids the output of their embedding lookup) and the tensors computed from it; everything else is a constant
  to the walk (initializers, shapes, masks or ids built from other inputs);
- signs: which tensors cannot be negative, so that rules drop the terms of their negative part;
- infinities: which may be infinite, so that products with a zero relevance are guarded;
- vanishing relevance: a tensor whose relevance is 0 wherever its value is 0. A layer whose output z feeds only a
  ReLU of that kind gets relevance only where z > 0, so its stabilized denominator z + epsilon sign0(z) may be
  ReLU(z) + epsilon, the ReLU the forward pass computes anyway: one Add in place of a comparison, a Where and an
  Add, and the same relevance; gamma's group of negative outputs gets none there and is left out.
"""
from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Callable, Collection, Iterator, Mapping

import numpy as np
import onnx_graphsurgeon as gs

from ..canonical.patterns import PLACING, SOFT_CAP, STOP_GRADIENT, encoded_input
from ..errors import LrpError
from ..ir.graph import constant, floating
from .families import Family
from .rules import Rule

NO_RELEVANCE = ("Shape", "Size", STOP_GRADIENT)  # outputs of a shape, or of a value the walk takes as constant
PAST = "past"  # inputs whose names start so hold a KV cache (optimum's past_key_values.*): never explained
# The names of the tensors on a data path from the explained input, while a walk runs (None: every Variable).
_DATA_PATH: ContextVar[Collection[str] | None] = ContextVar("data_path", default=None)


@contextmanager
def on_data_path(names: Collection[str]) -> Iterator[None]:
    """Within this block, only the tensors named in `names` count as computed."""
    token = _DATA_PATH.set(names)
    try:
        yield
    finally:
        _DATA_PATH.reset(token)


def computed(tensor: gs.Tensor | None) -> bool:
    """Whether a node input is computed from the explained input (a Variable on its data path), not a constant
    (an initializer, or a tensor such as a mask or a shape that no data path from the explained input reaches)."""
    names = _DATA_PATH.get()
    return isinstance(tensor, gs.Variable) and (names is None or tensor.name in names)


def explained_input(graph: gs.Graph, source: str, name: str | None = None
                    ) -> tuple[gs.Variable, gs.Variable | None]:
    """The tensor whose relevance is returned, and the integer model input it looks up (None for a float input):
    the input named `name`, else the first float input that is not 0-d nor a KV cache (`past_*`: a prompt is
    explained without history), else an integer input that the graph one-hot encodes or looks up.

    Token ids cannot carry relevance: the output of the Gather that reads them (through ops that only place them:
    Reshape, Squeeze, Cast ...) from a float embedding table is explained instead, the one with the largest table
    when several integer inputs are looked up; two inputs looked up in tables of one size are refused, for the user
    to name one with --explain-input.
    """
    if name is not None:
        return _named_input(graph, source, name)
    inputs = [t for t in graph.inputs if not t.name.startswith(PAST)]
    for tensor in inputs:
        if floating(tensor) and tensor.shape != []:  # a 0-d input is a setting (a sample rate), not the data
            return tensor, None
    for tensor in inputs:
        if encoded_input(graph, tensor):
            return tensor, None
    lookups = sorted(_lookups(inputs), key=lambda lookup: -lookup[0])
    if not lookups:
        raise LrpError(f"{source}: the model has no floating-point input to explain, nor an integer input that it "
                       f"one-hot encodes or looks up in a floating-point embedding table")
    rivals = [ids.name for rows, _, ids in lookups if rows == lookups[0][0]]
    if len(set(rivals)) > 1:
        raise LrpError(f"{source}: inputs {' and '.join(repr(n) for n in dict.fromkeys(rivals))} are both looked up "
                       f"in embedding tables of {lookups[0][0]} rows: name the one to explain with --explain-input "
                       f"NAME")
    _, embedding, ids = lookups[0]
    return embedding, ids


def _named_input(graph: gs.Graph, source: str, name: str) -> tuple[gs.Variable, gs.Variable | None]:
    """The input the user named with --explain-input (for token ids, the output of its largest lookup)."""
    tensor = next((t for t in graph.inputs if t.name == name), None)
    if tensor is None:
        raise LrpError(f"{source}: --explain-input: no model input named '{name}' (inputs: "
                       f"{', '.join(t.name for t in graph.inputs)})")
    if floating(tensor) or encoded_input(graph, tensor):
        return tensor, None
    lookups = _lookups([tensor])
    if not lookups:
        raise LrpError(f"{source}: --explain-input '{name}' is an integer input that the model neither one-hot "
                       f"encodes nor looks up in a floating-point embedding table")
    _, embedding, ids = max(lookups, key=lambda lookup: lookup[0])
    return embedding, ids


def _lookups(inputs: Collection[gs.Variable]) -> list[tuple[int, gs.Variable, gs.Variable]]:
    """(rows of the table, the lookup's output, the integer input) for each Gather from a constant float table
    at an input's values, reached through ops that only place them."""
    found = []
    for tensor in inputs:
        for indices in _placed(tensor):
            for node in indices.outputs:
                table = constant(node.inputs[0]) if node.op == "Gather" else None
                if table is not None and node.inputs[1] is indices and node.attrs.get("axis", 0) == 0 and \
                        np.issubdtype(table.dtype, np.floating):
                    found.append((table.shape[0], node.outputs[0], tensor))
    return found


def _placed(tensor: gs.Tensor, depth: int = 4) -> list[gs.Tensor]:
    """The tensor and those computed from it by ops that only place its values (Reshape, Squeeze, Cast ...)."""
    found = [tensor]
    for node in tensor.outputs if depth else []:
        if node.op in PLACING and node.inputs[0] is tensor:
            found.extend(_placed(node.outputs[0], depth - 1))
    return found


def data_path(graph: gs.Graph, explained: Collection[gs.Variable], stopped: Callable[[gs.Node], bool]) -> set[str]:
    """Names of the tensors whose values depend on the `explained` tensors through nodes that are not `stopped` (the
    graph is in topological order); a shape is not a value."""
    names = {t.name for t in explained}
    for node in graph.nodes:
        if node.op in NO_RELEVANCE or stopped(node):
            continue
        if any(isinstance(t, gs.Variable) and t.name in names for t in node.inputs):
            names.update(t.name for t in node.outputs)
    return names


ALWAYS = {"Relu", "Sigmoid", "HardSigmoid", "Softmax", "Abs", "Exp", "Softplus", "Shape", "Size"}
IF_ALL_INPUTS = {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "ReduceMean", "ReduceSum",
                 "ReduceMax", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Identity", "Dropout",
                 "Concat", "Slice", "Split", "Gather", "Pad", "Resize", "Upsample", "Add", "Mul", "Div", "Min",
                 "Tile", "Expand"}
IF_ANY_INPUT = {"Max"}
# Ops whose outputs are finite whatever their inputs.
BOUNDED = {"Softmax", "Sigmoid", "HardSigmoid", "Tanh", "Erf", "Sin", "Cos", "Softsign", SOFT_CAP}
# Share of a float type's largest value from which a constant counts as a mask value: two of them overflow a sum.
LARGE = 0.25
# Ops whose constant inputs are weights and biases (read once per build would be a pass over every weight), not masks.
WEIGHTED = {"Conv", "ConvTranspose", "Gemm", "MatMul"}
# Ops whose inputs after the first are shapes, indices or sizes, not data.
SHAPE_ARGUMENTS = {"Reshape", "Slice", "Gather", "Squeeze", "Unsqueeze", "Resize", "Upsample", "Tile", "Expand"}


def nonnegative_tensors(graph: gs.Graph) -> set[str]:
    """Names of the tensors that cannot hold negative values, found in one pass in topological order."""
    known: set[str] = set()

    def nonnegative(tensor: gs.Tensor | None) -> bool:
        if tensor is None or not tensor.name:
            return True  # an omitted optional input
        if isinstance(tensor, gs.Constant):
            return bool(np.all(tensor.values >= 0))
        return tensor.name in known

    for node in graph.nodes:
        data = node.inputs[:1] if node.op in SHAPE_ARGUMENTS else node.inputs
        if node.op == "Pad":
            data = [node.inputs[0]] + node.inputs[2:3]  # the data and the constant pad value
        if node.op == "Clip":
            low = node.inputs[1] if len(node.inputs) > 1 else None
            result = (low is not None and isinstance(low, gs.Constant) and float(low.values) >= 0) or \
                node.attrs.get("min", -1.0) >= 0
        elif node.op in ALWAYS:
            result = True
        elif node.op in IF_ALL_INPUTS:
            result = all(nonnegative(t) for t in data)
        elif node.op in IF_ANY_INPUT:
            result = any(nonnegative(t) for t in data if t.name)
        else:
            result = False
        if result:
            known.update(t.name for t in node.outputs[:1])
    return known


def unbounded_tensors(graph: gs.Graph, finite_inputs: Collection[str]) -> set[str]:
    """Names of the floating tensors that may hold infinities: masks of -inf or of a float's minimum (which a sum
    turns into -inf), inputs other than `finite_inputs`, and what is computed from them up to a bounded op."""
    unbounded = {t.name for t in graph.inputs if t.name not in finite_inputs and _floating(t)}

    def infinite(tensor: gs.Tensor | None) -> bool:
        if isinstance(tensor, gs.Constant):
            return _large(tensor.values)
        return tensor is not None and tensor.name in unbounded

    for node in graph.nodes:
        data = node.inputs[:1] if node.op in SHAPE_ARGUMENTS else node.inputs
        if node.op in WEIGHTED:
            data = [t for t in data if not isinstance(t, gs.Constant)]
        if node.op == "ConstantOfShape":
            value = node.attrs.get("value")
            result = value is not None and _large(getattr(value, "values", value))
        else:
            result = node.op not in BOUNDED and any(infinite(t) for t in data)
        if result:
            unbounded.update(t.name for t in node.outputs if _floating(t))
    return unbounded


def _large(values: np.ndarray) -> bool:
    values = np.asarray(values)
    if not np.issubdtype(values.dtype, np.floating) or values.size == 0:
        return False
    return bool(np.max(np.abs(values)) >= LARGE * np.finfo(values.dtype).max)


def _floating(tensor: gs.Tensor) -> bool:
    """Floating, or of a type not known (then it may be)."""
    return tensor.dtype is None or floating(tensor)


def vanishing_relevance(graph: gs.Graph, rule: Callable[[gs.Node], tuple[Rule, Mapping]],
                        families: Mapping[str, Family]) -> set[str]:
    """Names of the tensors whose relevance is 0 wherever they are 0, found in one pass from the outputs back
    (the graph's nodes in topological order; a graph output, seeded from outside, never counts)."""
    known: set[str] = set()
    outputs = {t.name for t in graph.outputs}

    def keeps(user: gs.Node) -> bool:
        family = families.get(user.op)
        if user.op in NO_RELEVANCE or family is None:
            return user.op in NO_RELEVANCE
        zeros = family.zeros(user, rule(user)[0])
        return zeros == "kept" or (zeros == "routed" and all(t.name in known for t in user.outputs))

    for node in reversed(graph.nodes):
        for tensor in node.outputs:
            if tensor.name not in outputs and tensor.outputs and all(keeps(user) for user in tensor.outputs):
                known.add(tensor.name)
    return known


def rectified_outputs(graph: gs.Graph, vanishing: set[str]) -> dict[str, gs.Variable]:
    """z -> ReLU(z) for the tensors z used only by a ReLU whose output's relevance vanishes with it."""
    outputs = {t.name for t in graph.outputs}
    return {node.inputs[0].name: node.outputs[0] for node in graph.nodes
            if node.op == "Relu" and node.outputs[0].name in vanishing and len(node.inputs[0].outputs) == 1
            and node.inputs[0].name not in outputs}

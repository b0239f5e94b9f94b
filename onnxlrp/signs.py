"""What is known of tensors' values before they are computed: which cannot be negative, so that rules can drop
the terms of their negative part, and which may be infinite, so that products with a zero relevance are guarded."""
from __future__ import annotations

from typing import Collection

import numpy as np
import onnx_graphsurgeon as gs

from .registry import floating

ALWAYS = {"Relu", "Sigmoid", "HardSigmoid", "Softmax", "Abs", "Exp", "Softplus", "Shape", "Size"}
IF_ALL_INPUTS = {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "ReduceMean", "ReduceSum",
                 "ReduceMax", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Identity", "Dropout",
                 "Concat", "Slice", "Split", "Gather", "Pad", "Resize", "Upsample", "Add", "Mul", "Div", "Min",
                 "Tile", "Expand"}
IF_ANY_INPUT = {"Max"}
# Ops whose outputs are finite whatever their inputs.
BOUNDED = {"Softmax", "Sigmoid", "HardSigmoid", "Tanh", "Erf", "Sin", "Cos", "Softsign"}
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

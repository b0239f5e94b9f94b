"""Which tensors are known to be non-negative, so that rules can drop the terms of their negative part."""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

ALWAYS = {"Relu", "Sigmoid", "HardSigmoid", "Softmax", "Abs", "Exp", "Softplus", "Shape", "Size"}
IF_ALL_INPUTS = {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "ReduceMean", "ReduceSum",
                 "ReduceMax", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Identity", "Dropout",
                 "Concat", "Slice", "Split", "Gather", "Pad", "Resize", "Upsample", "Add", "Mul", "Div", "Min",
                 "Tile", "Expand"}
IF_ANY_INPUT = {"Max"}
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

"""What is explained and what is constant: the explained input (a float model input, an integer input that the
graph one-hot encodes, or for token ids the output of their embedding lookup), and the tensors on a data path from
it. Everything else is a constant to the walk: initializers, shapes, and masks or ids built from other inputs."""
from __future__ import annotations

from typing import Callable

import numpy as np
import onnx_graphsurgeon as gs

from .encoding import one_hot_encoded
from .errors import LrpError
from .graph import constant
from .registry import floating

NO_RELEVANCE = ("Shape", "Size")  # their outputs depend on a tensor's shape, not on its values


def explained_input(graph: gs.Graph, source: str) -> tuple[gs.Variable, gs.Variable | None]:
    """The tensor whose relevance is returned, and the integer model input it looks up (None for a float input).

    Token ids cannot carry relevance: the output of the Gather that reads them from a float embedding table is
    explained instead (the one with the largest table when several integer inputs are looked up).
    """
    for tensor in graph.inputs:
        if floating(tensor):
            return tensor, None
    for tensor in graph.inputs:
        if one_hot_encoded(tensor):
            return tensor, None
    lookups = [(constant(node.inputs[0]).shape[0], node.outputs[0], tensor) for tensor in graph.inputs
               for node in tensor.outputs
               if node.op == "Gather" and node.inputs[1] is tensor and node.attrs.get("axis", 0) == 0
               and constant(node.inputs[0]) is not None and np.issubdtype(constant(node.inputs[0]).dtype, np.floating)]
    if not lookups:
        raise LrpError(f"{source}: the model has no floating-point input to explain, nor an integer input that it "
                       f"one-hot encodes or looks up in a floating-point embedding table")
    _, embedding, ids = max(lookups, key=lambda lookup: lookup[0])
    return embedding, ids


def data_path(graph: gs.Graph, explained: gs.Variable, stopped: Callable[[gs.Node], bool]) -> set[str]:
    """Names of the tensors whose values depend on `explained` through nodes that are not `stopped` (the graph is
    in topological order); a shape is not a value."""
    names = {explained.name}
    for node in graph.nodes:
        if node.op in NO_RELEVANCE or stopped(node):
            continue
        if any(isinstance(t, gs.Variable) and t.name in names for t in node.inputs):
            names.update(t.name for t in node.outputs)
    return names

"""Where relevance is known to vanish: a tensor whose relevance is 0 wherever its value is 0 (every use takes
the input times something, or routes relevance back from an output that has the same property).

A layer whose output z feeds only a ReLU of that kind gets relevance only where z > 0, so its stabilized
denominator z + epsilon sign0(z) may be ReLU(z) + epsilon, the ReLU the forward pass computes anyway: one Add in
place of a comparison, a Where and an Add, and the same relevance."""
from __future__ import annotations

from typing import Callable

import onnx_graphsurgeon as gs

from .registry import FAMILIES

# Ops whose outputs carry no relevance back (sizes).
NEUTRAL = {"Shape", "Size"}


def vanishing_relevance(graph: gs.Graph, rule: Callable[[gs.Node], tuple[str, dict]]) -> set[str]:
    """Names of the tensors whose relevance is 0 wherever they are 0, found in one pass from the outputs back
    (the graph's nodes in topological order; a graph output, seeded from outside, never counts)."""
    known: set[str] = set()
    outputs = {t.name for t in graph.outputs}

    def keeps(user: gs.Node) -> bool:
        family = FAMILIES.get(user.op)
        if user.op in NEUTRAL or family is None:
            return user.op in NEUTRAL
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

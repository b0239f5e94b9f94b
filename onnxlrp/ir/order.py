"""The order of nodes in the built model. ONNX Runtime's session creation grows quadratically with the number of
nodes that appear in the file long after their inputs are ready (measured in bench/deep_model.py: a 4,000-layer
MLP's LRP graph took 9 s instead of 2 s), and the relevance pass has many such nodes: the stabilised denominators
depend on forward tensors only. So each node is placed as soon as its inputs are computed."""
from __future__ import annotations

import onnx_graphsurgeon as gs


def as_soon_as_ready(graph: gs.Graph) -> None:
    """Reorder the graph's nodes depth-first: after a node, the last-added of its consumers that became ready
    (relevance nodes before the next forward node), so that no node waits in the file once its inputs exist."""
    if any(isinstance(value, gs.Graph) for node in graph.nodes for value in node.attrs.values()):
        return  # subgraphs read outer tensors that are not node inputs: keep the order graphsurgeon gave
    index = {id(node): position for position, node in enumerate(graph.nodes)}
    waiting = {id(node): len({id(t) for t in node.inputs if t.inputs and id(t.inputs[0]) in index})
               for node in graph.nodes}
    stack = [node for node in reversed(graph.nodes) if waiting[id(node)] == 0]
    ordered: list[gs.Node] = []
    while stack:
        node = stack.pop()
        ordered.append(node)
        consumers = {id(c): c for t in node.outputs for c in t.outputs if id(c) in index}
        for consumer in sorted(consumers.values(), key=lambda c: index[id(c)]):
            waiting[id(consumer)] -= 1
            if waiting[id(consumer)] == 0:
                stack.append(consumer)
    if len(ordered) == len(graph.nodes):  # else a cycle, which the checker reports
        graph.nodes = ordered

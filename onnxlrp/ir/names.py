"""Unique names for everything the builder adds to a graph, whatever names (empty, repeated, or equal to ours)
the source model uses: one allocator per graph, seeded with every node and tensor name already in it."""
from __future__ import annotations

import onnx_graphsurgeon as gs


class Names:
    """Hands out names that no node or tensor of the graph has, nor any name handed out before."""

    def __init__(self, taken: set[str]):
        self._taken = set(taken)
        self._next: dict[str, int] = {}

    def fresh(self, base: str) -> str:
        """`base` itself if it is free, else `base_1`, `base_2`, ..."""
        count = self._next.get(base, 0)
        name = base if count == 0 else f"{base}_{count}"
        while name in self._taken:
            count += 1
            name = f"{base}_{count}"
        self._next[base] = count + 1
        self._taken.add(name)
        return name


def names_of(graph: gs.Graph) -> Names:
    """The graph's allocator, made on first use from the names the graph holds at that moment."""
    allocator = graph.__dict__.get("_onnxlrp_names")
    if allocator is None:
        taken = {node.name for node in graph.nodes}
        taken.update(t.name for node in graph.nodes for t in list(node.inputs) + list(node.outputs))
        taken.update(t.name for t in list(graph.inputs) + list(graph.outputs))
        allocator = graph._onnxlrp_names = Names(taken)
    return allocator


def fresh_name(graph: gs.Graph, base: str) -> str:
    return names_of(graph).fresh(base)


def name_nodes(graph: gs.Graph) -> None:
    """Give every node without a name the name of its first output, so that messages and composites can name it,
    and number repeated names (ONNX Runtime refuses two nodes of one name): `n`, `n_1`, ..."""
    seen: set[str] = set()
    for node in graph.nodes:
        if not node.name:
            node.name = node.outputs[0].name if node.outputs and node.outputs[0].name else node.op
        if node.name in seen:
            node.name = fresh_name(graph, node.name)
        seen.add(node.name)

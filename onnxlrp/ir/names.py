"""Unique names for everything the builder adds to a graph, whatever names (empty, repeated, or equal to ours)
the source model uses: one allocator per graph, seeded with every node and tensor name already in it and in its
subgraphs."""
from __future__ import annotations

import onnx
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
        allocator = graph._onnxlrp_names = Names(_taken(graph))
    return allocator


def _taken(graph: gs.Graph) -> set[str]:
    """The names of the graph's nodes and tensors, and of those of its subgraphs (which ONNX does not let a name
    of the enclosing graph shadow)."""
    taken = {node.name for node in graph.nodes}
    taken.update(t.name for node in graph.nodes for t in list(node.inputs) + list(node.outputs))
    taken.update(t.name for t in list(graph.inputs) + list(graph.outputs))
    for node in graph.nodes:
        for subgraph in node.subgraphs():
            taken |= _taken(subgraph)
    return taken


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


def proto_names(graph: onnx.GraphProto) -> set[str]:
    """Every node and tensor name of a graph proto and of its subgraphs."""
    found = {v.name for v in list(graph.input) + list(graph.output) + list(graph.value_info)}
    found.update(t.name for t in graph.initializer)
    for node in graph.node:
        found.update([node.name, *node.input, *node.output])
        for subgraph in subgraph_protos(node):
            found |= proto_names(subgraph)
    found.discard("")
    return found


def renamed_graph(graph: onnx.GraphProto, renamed: dict[str, str]) -> onnx.GraphProto:
    """A copy of the graph proto with tensors renamed wherever they appear, subgraphs included."""
    copy = onnx.GraphProto()
    copy.CopyFrom(graph)

    def rename(g: onnx.GraphProto) -> None:
        for value in list(g.input) + list(g.output) + list(g.value_info) + list(g.initializer):
            value.name = renamed.get(value.name, value.name)
        for node in g.node:
            node.input[:] = [renamed.get(n, n) for n in node.input]
            node.output[:] = [renamed.get(n, n) for n in node.output]
            for subgraph in subgraph_protos(node):
                rename(subgraph)

    rename(copy)
    return copy


def subgraph_protos(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    """The graphs a node proto holds in its attributes (If branches, Loop and Scan bodies)."""
    return [g for a in node.attribute for g in list(a.graphs) + ([a.g] if a.HasField("g") else [])]

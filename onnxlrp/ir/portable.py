"""Graph forms that other runtimes than ONNX Runtime compute alike: one tensor per way a weight is read."""
from __future__ import annotations

import onnx_graphsurgeon as gs

from .names import fresh_name

WEIGHT_READERS = ("Gemm", "MatMul", "Conv", "ConvTranspose")


def layout(node: gs.Node) -> tuple[str, int]:
    """How `node` reads its weight (input 1): the op, and for Gemm whether it is transposed."""
    return node.op, int(node.attrs.get("transB", 0))


def separate_weight_views(graph: gs.Graph) -> None:
    """Give every further layout in which a weight is read (Gemm with and without transB, Conv and
    ConvTranspose) its own tensor, Neg(Neg(W)), before that layout's first reader.

    OpenVINO's CPU plugin (2026.4) computes wrong numbers when one tensor is the weight of layers that read it in
    different layouts (the forward pass and the transposed pass of a square Gemm, a Conv and a ConvTranspose with
    Cin == Cout). It folds Neg(Neg(W)) into a separate constant (Identity, Mul by 1 and Transpose pairs it
    removes instead); ONNX Runtime folds it when the session starts, and the file does not grow.
    """
    readers: dict[int, tuple[gs.Tensor, dict[tuple[str, int], list[gs.Node]]]] = {}
    for node in graph.nodes:
        if node.op in WEIGHT_READERS and len(node.inputs) > 1:
            weight = node.inputs[1]
            readers.setdefault(id(weight), (weight, {}))[1].setdefault(layout(node), []).append(node)
    for weight, layouts in readers.values():
        for depth, nodes in enumerate(list(layouts.values())[1:], start=1):
            view = weight
            chain = []
            for step in range(2 * depth):  # a chain of its own length per layout: no two views alike
                name = fresh_name(graph, f"lrp/view/{weight.name}")
                negated = gs.Variable(name, dtype=weight.dtype, shape=weight.shape)
                chain.append(gs.Node("Neg", name, inputs=[view], outputs=[negated]))
                view = negated
            first = graph.nodes.index(nodes[0])
            graph.nodes[first:first] = chain
            for node in nodes:
                node.inputs[1] = view

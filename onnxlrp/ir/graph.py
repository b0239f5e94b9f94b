"""Small helpers over graphsurgeon graphs that every stage uses."""
from __future__ import annotations

import logging
from typing import Callable, Collection

import numpy as np
import onnx
import onnx_graphsurgeon as gs

logging.getLogger("onnx_graphsurgeon").setLevel(logging.ERROR)
gs.logger.G_LOGGER.severity = gs.logger.G_LOGGER.ERROR


def opset_of(model: onnx.ModelProto) -> int:
    """The version of the default ONNX domain the model uses."""
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def static(shape, start: int = 1) -> bool:
    """Whether a shape is known with fixed sizes from axis `start` on (by default: every axis after the batch)."""
    return shape is not None and all(isinstance(d, int) and d >= 0 for d in shape[start:])


def optional_input(node: gs.Node, index: int) -> gs.Tensor | None:
    """A node's input at `index`, None where it is left out (absent or named "")."""
    return node.inputs[index] if index < len(node.inputs) and node.inputs[index].name else None


def features_known(tensor: gs.Tensor) -> bool:
    """Whether a tensor's type, rank and last dimension are known (what fused ops need to be written out)."""
    return tensor.dtype is not None and tensor.shape is not None and len(tensor.shape) > 0 and \
        isinstance(tensor.shape[-1], int)


def expand_each(graph: gs.Graph, op_types: Collection[str], expand: Callable[[gs.Graph, gs.Node], None],
                strict: bool = True) -> bool:
    """Write out every node of `op_types` with `expand` (`strict`: else only those whose first input's features
    are known, as a round of writing out fused ops needs). Returns whether there was one."""
    nodes = [n for n in graph.nodes if n.op in op_types and (strict or features_known(n.inputs[0]))]
    for node in nodes:
        expand(graph, node)
    return bool(nodes)


def constant(tensor: gs.Tensor) -> np.ndarray | None:
    """The value of a constant tensor (or None for a computed one)."""
    return tensor.values if isinstance(tensor, gs.Constant) else None


def scalar_constant(tensor: gs.Tensor | None) -> np.ndarray | None:
    """The value of a constant of one element, 0-d, or None (computed, absent or larger)."""
    values = constant(tensor) if tensor is not None and tensor.name else None
    return values.reshape(()) if values is not None and values.size == 1 else None


def replace(tensors: list, items: list) -> None:
    """Replace the contents of a node's input or output list (graphsurgeon's lists take no slice assignment)."""
    items = list(items)
    tensors.clear()
    tensors.extend(items)


def is_bias(values: np.ndarray, features: int) -> bool:
    """Whether an added constant is a per-output-feature bias of a dense layer."""
    return values.size in (1, features) and (values.ndim <= 1 or values.shape[:-1] == (1,) * (values.ndim - 1))


def floating(tensor: gs.Tensor | None) -> bool:
    """Whether a tensor is known to hold floating-point values (sequences and maps are not)."""
    try:
        return tensor is not None and tensor.dtype is not None and np.issubdtype(np.dtype(tensor.dtype), np.floating)
    except TypeError:
        return False


def outer_reads(node: gs.Node) -> list[gs.Variable]:
    """The variables of enclosing graphs that a node's subgraphs read (If branches, Loop and Scan bodies take them
    without listing them as inputs), in order of first use."""
    found: dict[int, gs.Variable] = {}

    def visit(graph: gs.Graph, defined: set[int]) -> None:
        defined = defined | {id(t) for t in graph.inputs} | {id(t) for n in graph.nodes for t in n.outputs}
        for inner in graph.nodes:
            for tensor in list(inner.inputs):
                if isinstance(tensor, gs.Variable) and tensor.name and id(tensor) not in defined:
                    found.setdefault(id(tensor), tensor)
            for subgraph in inner.subgraphs():
                visit(subgraph, defined)
        for tensor in graph.outputs:
            if isinstance(tensor, gs.Variable) and id(tensor) not in defined:
                found.setdefault(id(tensor), tensor)

    for subgraph in node.subgraphs():
        visit(subgraph, set())
    return list(found.values())


def reads(node: gs.Node) -> list[gs.Tensor]:
    """Every tensor a node's value depends on: its inputs and what its subgraphs read from enclosing graphs."""
    return list(node.inputs) + [t for t in outer_reads(node) if all(t is not i for i in node.inputs)]

"""Op families: which op types share an emitter and which rules they accept, and what an emitter may ask of the
walk. Families are plain data, collected explicitly in lrp/emitters/__init__.py (nothing registers on import)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable, Mapping, Protocol, Union

import onnx
import onnx_graphsurgeon as gs

from ..errors import LrpError
from ..ir.ops import Ops, Tensor

if TYPE_CHECKING:
    from .rules import Layer, Rule


# Op types that no rule explains, with why and what to use instead: refused before anything is built.
TREES = ("is a tree ensemble: piecewise constant (a sum of leaf values chosen by thresholds), not piecewise linear in "
         "the LRP sense, so no rule can share its output among the inputs; explain the original model with a tree "
         "method such as TreeSHAP (shap.TreeExplainer) instead")
NOT_EXPLAINED = {op_type: TREES for op_type in ("TreeEnsemble", "TreeEnsembleClassifier", "TreeEnsembleRegressor")}


def refuse_not_explained(model: onnx.ModelProto, source: str) -> None:
    """One line naming the first node of an op type in NOT_EXPLAINED, and why."""
    node = next((n for n in model.graph.node if n.op_type in NOT_EXPLAINED), None)
    if node is not None:
        raise LrpError(f"{source}: node '{node.name or node.output[0]}' ({node.op_type}) {NOT_EXPLAINED[node.op_type]}")


class Unsupported(Exception):
    """A node the emitter of its op type cannot explain (the walk collects these and reports them all)."""


class Context(Protocol):
    """What an emitter may ask of the walk."""
    ops: Ops

    def rule(self, node: gs.Node) -> tuple["Rule", Mapping[str, object]]: ...

    def nonnegative(self, tensor: Tensor) -> bool: ...

    def finite(self, tensor: Tensor) -> bool: ...

    def rectified(self, tensor: Tensor) -> Tensor | None: ...


# How a family describes one node to the skeleton (rules.propagate).
Describe = Callable[[Context, gs.Node], "Layer"]
# How a node's input relevance relates to the input's zeros, given the node and its rule: "kept" (the input times
# something, so 0 where the input is 0), "routed" (relevance only where an input element equals an output
# element: copies, and a maximum's winners) or None (neither).
Zeros = Callable[[gs.Node, "Rule"], Union[str, None]]


@dataclass(frozen=True)
class Family:
    """Op types that share an emitter. `rules[0]` is the default when no composite entry matches; `detachable`:
    a rule that detaches (CP-LRP's stop) makes the node's output a constant to the walk."""
    name: str
    op_types: tuple[str, ...]
    rules: tuple[str, ...]
    describe: Describe
    min_opset: Callable[[gs.Node], int] = lambda node: 0
    zeros: Zeros = lambda node, rule: None
    detachable: bool = False


def family(name: str, op_types: Iterable[str], rules: Iterable[str], min_opset: Callable[[gs.Node], int] | None = None,
           zeros: Zeros | str | None = None, detachable: bool = False) -> Callable[[Describe], Family]:
    """Turn the decorated function (node -> layer) into a Family (`zeros`: see Zeros; a string for every node)."""
    def declare(describe: Describe) -> Family:
        return Family(name, tuple(op_types), tuple(rules), describe, min_opset or (lambda node: 0),
                      zeros if callable(zeros) else (lambda node, rule: zeros), detachable)
    return declare


def by_op_type(families: Iterable[Family]) -> dict[str, Family]:
    """The families keyed by each op type they handle (an op type in two families is a mistake)."""
    table: dict[str, Family] = {}
    for entry in families:
        for op_type in entry.op_types:
            if op_type in table:
                raise ValueError(f"op type {op_type} is in families {table[op_type].name} and {entry.name}")
            table[op_type] = entry
    return table

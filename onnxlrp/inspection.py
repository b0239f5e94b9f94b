"""`onnxlrp inspect`: which rule, with which parameters, each node of a model gets; what was folded; what is
missing. The same passes as `build` run on the model, so the table shows the graph the relevance walk sees."""
from __future__ import annotations

from dataclasses import dataclass

import onnx
import onnx_graphsurgeon as gs

from . import builder  # noqa: F401  (registers the emitters)
from .canonical import canonicalize
from .composite import Composite
from .errors import LrpError
from .folding import AFFINE, fold_affine, fold_batchnorm
from .registry import FAMILIES
from .rules import RULES

UNSUPPORTED = "unsupported"


@dataclass(frozen=True)
class Row:
    """One node of the canonical graph: its rule and parameters, and the nodes folded into it."""
    node: str
    op_type: str
    folded: tuple[str, ...]
    rule: str
    params: dict


def rows(model: onnx.ModelProto, composite: Composite) -> list[Row]:
    """The table of `inspect`, in the graph's topological order."""
    graph = canonicalize(model)
    folded = _fold(graph)
    rule_of = composite.assign(graph)
    table = []
    for node in graph.nodes:
        if node.op not in FAMILIES:
            table.append(Row(node.name, node.op, folded.get(node.name, ()), UNSUPPORTED, {}))
            continue
        rule, params = rule_of(node)
        used = {k: params[k] for k in RULES[rule].params} if rule in RULES else {}
        table.append(Row(node.name, node.op, folded.get(node.name, ()), rule, {**used, **_fixed(rule)}))
    return table


def _fold(graph: gs.Graph) -> dict[str, tuple[str, ...]]:
    """Fold as `build` does; return, per linear node, the names of the nodes folded into it."""
    candidates = {id(n): n for n in graph.nodes if n.op in ("BatchNormalization",) + AFFINE}
    producers = {id(n): n.inputs[0].inputs[0] if n.inputs and n.inputs[0].inputs else None
                 for n in candidates.values()}
    for n in candidates.values():  # an affine constant may be either input
        if n.op != "BatchNormalization" and len(n.inputs) == 2 and n.inputs[1].inputs:
            producers[id(n)] = producers[id(n)] or n.inputs[1].inputs[0]
    fold_batchnorm(graph)
    fold_affine(graph)
    result: dict[str, list[str]] = {}
    for key, node in candidates.items():
        if not node.outputs and producers[key] is not None:  # _absorb empties a folded node
            target = producers[key]
            while not target.outputs:  # a chain: follow to the linear node that absorbed it
                target = producers[id(target)]
            result.setdefault(target.name, []).append(f"{node.name} ({node.op})")
    graph.cleanup().toposort()
    return {k: tuple(v) for k, v in result.items()}


def _fixed(rule: str) -> dict:
    return dict(RULES[rule].fixed) if rule in RULES else {}


def report(model: onnx.ModelProto, composite: Composite, source: str) -> str:
    """The table, then one line on whether `build` accepts the model (an emitter may still refuse a node of a
    supported op type, e.g. a MatMul of two computed tensors)."""
    try:
        builder.build(model, composite, source=source)
        verdict = f"build: every node is supported (composite {composite.name})"
    except LrpError as error:
        verdict = f"build: {error}"
    return table(rows(model, composite)) + "\n" + verdict


def table(rows_: list[Row]) -> str:
    """The rows as aligned text columns (a node without a name shows as #position)."""
    header = ("node", "op type", "folded into it", "rule", "parameters")
    lines = [(r.node or f"#{index}", r.op_type, ", ".join(r.folded) or "-", r.rule,
              " ".join(f"{k}={_number(v)}" for k, v in r.params.items()) or "-") for index, r in enumerate(rows_)]
    widths = [max(len(line[i]) for line in [header, *lines]) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in [header, *lines])


def _number(value) -> str:
    if isinstance(value, tuple):
        return ",".join(f"{v:g}" for v in value)
    return f"{value:g}"

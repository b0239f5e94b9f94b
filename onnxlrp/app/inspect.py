"""`onnxlrp inspect`: which rule, with which parameters, each node of a model gets; what was folded; what is
missing. The same preparation as `build` runs on the model, so the table shows the graph the relevance walk sees
(written-out constructs as their canonical node)."""
from __future__ import annotations

from dataclasses import dataclass

import onnx

from ..errors import LrpError
from ..lrp.composite import Composite
from ..lrp.emitters import FAMILIES
from ..pipeline import build, prepare

UNSUPPORTED = "unsupported"
TWINNED = "twin"  # a classic model's node that a twin (LinearModel, Centroids, Sub/Mul) stands beside for the walk


@dataclass(frozen=True)
class Row:
    """One node of the canonical graph: its rule and parameters, and the nodes folded into it."""
    node: str
    op_type: str
    folded: tuple[str, ...]
    rule: str
    params: dict


def rows(model: onnx.ModelProto, composite: Composite, source: str = "model") -> list[Row]:
    """The table of `inspect`, in the graph's topological order."""
    prepared = prepare(model, source)
    rule_of = composite.assign(prepared.graph)
    twinned = {entry for entries in prepared.folded.values() for entry in entries}
    table = []
    for node in prepared.graph.nodes:
        folded = prepared.folded.get(node.name, ())
        if node.op not in FAMILIES or f"{node.name} ({node.op})" in twinned:
            table.append(Row(node.name, node.op, folded, TWINNED if f"{node.name} ({node.op})" in twinned
                             else UNSUPPORTED, {}))
            continue
        rule, params = rule_of(node)
        used = {k: params[k] for k in rule.params}
        table.append(Row(node.name, node.op, folded, rule.name, {**used, **rule.fixed}))
    return table


def report(model: onnx.ModelProto, composite: Composite, source: str) -> str:
    """The table, then one line on whether `build` accepts the model (an emitter may still refuse a node of a
    supported op type, e.g. a MatMul of two computed tensors)."""
    try:
        build(model, composite, source=source)
        verdict = f"build: every node is supported (composite {composite.name})"
    except LrpError as error:
        verdict = f"build: {error}"
    return table(rows(model, composite, source)) + "\n" + verdict


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

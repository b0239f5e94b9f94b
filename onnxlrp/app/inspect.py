"""`onnxlrp inspect`: which rule, with which parameters, each node of a model gets; what was folded; what is
missing. The same preparation as `build` runs on the model, so the table shows the graph the relevance walk sees
(written-out constructs as their canonical node)."""
from __future__ import annotations

from dataclasses import dataclass

import onnx

from ..errors import LrpError
from ..lrp.composite import Composite
from ..lrp.emitters import FAMILIES
from ..lrp.walk import reached
from ..pipeline import Prepared, build, prepare, prepare_branches

UNSUPPORTED = "unsupported"
CONSTANT = "constant"  # no relevance reaches the node (shapes, a norm's sigma, masks): no rule is needed
SKIPPED = "skipped"  # the classifier's head (Softmax, LogSoftmax, Sigmoid): its input, the logits, is explained
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
    """The table of `inspect`, in the graph's topological order. Nodes that relevance does not reach are
    `constant` (every node is taken as reached when the model has no classifier output or input to explain)."""
    return _rows(prepare(model, source), composite, source)


def _rows(prepared: Prepared, composite: Composite, source: str = "model") -> list[Row]:
    rule_of = composite.assign(prepared.graph)
    try:
        found, head = reached(prepared.graph, composite, source=source, hidden=prepared.collapsed.hidden())
        skipped = {id(n) for n in head.skipped}
    except LrpError:  # build says why, in the verdict
        found, skipped = {id(n) for n in prepared.graph.nodes}, set()
    twinned = {entry for entries in prepared.folded.values() for entry in entries}
    table = []
    for node in prepared.graph.nodes:
        folded = prepared.folded.get(node.name, ())
        label = TWINNED if f"{node.name} ({node.op})" in twinned else SKIPPED if id(node) in skipped else \
            CONSTANT if id(node) not in found else UNSUPPORTED if node.op not in FAMILIES else None
        if label is not None:
            table.append(Row(node.name, node.op, folded, label, {}))
            continue
        rule, params = rule_of(node)
        used = {k: params[k] for k in rule.params}
        table.append(Row(node.name, node.op, folded, rule.name, {**used, **rule.fixed}))
    return table


def report(model: onnx.ModelProto, composite: Composite, source: str) -> str:
    """The table (one per way through the If nodes chosen at run time), then one line on whether `build` accepts
    the model (an emitter may still refuse a node of a supported op type, e.g. a MatMul of two computed tensors)."""
    try:
        build(model, composite, source=source)
        verdict = f"build: every node is supported (composite {composite.name})"
    except LrpError as error:
        verdict = f"build: {error}"
    tables = [(taken, table(_rows(prepared, composite, source))) for taken, prepared in prepare_branches(model, source)]
    return "\n\n".join(f"with {taken}:\n{text}" if taken else text for taken, text in tables) + "\n" + verdict


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

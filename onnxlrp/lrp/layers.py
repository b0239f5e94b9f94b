"""Relevance per linear layer (`--layer-relevance`): one extra output per layer with the relevance at its input,
and metadata that says, in data-flow order, which output and which internal tensors belong to which layer."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Sequence

import onnx
import onnx_graphsurgeon as gs

from ..errors import LrpError
from ..ir.ops import Tensor

PREFIX = "relevance/"
METADATA_KEY = "onnxlrp.layer_relevance"


@dataclass(frozen=True)
class LayerRelevance:
    """One linear layer as the walk met it: the relevance arriving at its output (`upper`) and the relevance it
    passed to its input (`lower`)."""
    node: gs.Node
    rule: str
    upper: Tensor
    lower: Tensor


def output_name(node: gs.Node, index: int, taken: set[str]) -> str:
    """`relevance/<node name>` with characters other than letters, digits and `_.-/:` replaced, made unique."""
    cleaned = re.sub(r"[^A-Za-z0-9_.\-/:]", "_", node.name).strip("/") or f"{node.op}_{index}"
    name, suffix = PREFIX + cleaned, 1
    while name in taken:
        suffix += 1
        name = f"{PREFIX}{cleaned}_{suffix}"
    taken.add(name)
    return name


def expose(graph: gs.Graph, layers: Sequence[LayerRelevance]) -> list[dict]:
    """Add an output per layer (data-flow order) and return what the metadata records of each."""
    taken = set(graph.tensors())
    records = []
    for index, layer in enumerate(layers):
        x = layer.node.inputs[0]
        result = gs.Variable(output_name(layer.node, index, taken), dtype=x.dtype, shape=x.shape)
        graph.nodes.append(gs.Node("Identity", f"lrp/layer_relevance_{index}", inputs=[layer.lower],
                                   outputs=[result]))
        graph.outputs.append(result)
        records.append({"node": layer.node.name, "op": layer.node.op, "rule": layer.rule, "output": result.name,
                        "upper": layer.upper.name})
    return records


def record(model: onnx.ModelProto, layers: list[dict], explain: str, explained_input: str, logits: str,
           relevance: str, target: str) -> None:
    """Store the layer list and the names `onnxlrp check` needs in the model's metadata_props."""
    entry = model.metadata_props.add()
    entry.key = METADATA_KEY
    entry.value = json.dumps({"explain": explain, "input": explained_input, "logits": logits,
                              "relevance": relevance, "target": target, "layers": layers})


def recorded(model: onnx.ModelProto, source: str) -> dict:
    """What `record` stored, or an error saying how to build a model that has it."""
    for entry in model.metadata_props:
        if entry.key == METADATA_KEY:
            return json.loads(entry.value)
    raise LrpError(f"{source}: no per-layer relevance recorded; build the model with `onnxlrp build "
                   f"--layer-relevance`")

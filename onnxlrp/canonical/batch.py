"""Models without a batch axis (input [T, F], output [C], as some audio and sequence models are exported) are built
as a batch of one: each input of rank 1 or more is declared with a leading axis of 1 that a Squeeze takes off before
the model's own nodes, and each output gets it back from an Unsqueeze. Once built, `BatchOfOne.restore` takes the
axis off again, so that the built model keeps the original inputs and outputs (`target` has shape [1], and
`relevance` the explained input's shape). A model has no batch axis when its classifier output has rank 1: the one
named, or else the first float output when no float output has rank 2."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from ..ir.graph import opset_of
from ..ir.names import Names, proto_names, renamed_graph

FLOATS = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16)


def _rank(value: onnx.ValueInfoProto) -> int | None:
    kind = value.type.tensor_type
    return len(kind.shape.dim) if value.type.HasField("tensor_type") and kind.HasField("shape") else None


def _floating(value: onnx.ValueInfoProto) -> bool:
    return value.type.HasField("tensor_type") and value.type.tensor_type.elem_type in FLOATS


def lacks_batch_axis(model: onnx.ModelProto, output: str | None) -> bool:
    """Whether the classifier output (`output`, or the first float output when none has rank 2) has rank 1."""
    outputs = [v for v in model.graph.output if _floating(v)]
    if output is not None:
        named = next((v for v in outputs if v.name == output), None)
        return named is not None and _rank(named) == 1
    return not any(_rank(v) == 2 for v in outputs) and bool(outputs) and _rank(outputs[0]) == 1


Declared = list[tuple[onnx.ValueInfoProto, onnx.ValueInfoProto]]  # pairs of a declaration and its replacement


@dataclass(frozen=True)
class BatchOfOne:
    """The declarations of the inputs and outputs that were given a leading axis of 1, as they were before."""
    inputs: tuple[onnx.ValueInfoProto, ...]
    outputs: tuple[onnx.ValueInfoProto, ...]

    def restore(self, built: onnx.ModelProto) -> onnx.ModelProto:
        """The built model with the leading axis taken off again: its inputs and outputs declared as before, and the
        outputs that the build added (`relevance` ...) without their first axis."""
        before = {v.name: v for v in self.inputs + self.outputs}
        inputs = [(v, before[v.name]) for v in built.graph.input if v.name in before]
        outputs = [(v, before[v.name] if v.name in before else _unbatched(v)) for v in built.graph.output]
        return _rewired(built, inputs, outputs, "batched", "Unsqueeze", "Squeeze")


def batch_of_one(model: onnx.ModelProto) -> tuple[onnx.ModelProto, BatchOfOne]:
    """The model with a leading axis of 1 on every input of rank 1 or more and on every tensor output."""
    weights = {t.name for t in model.graph.initializer}
    inputs = [v for v in model.graph.input if v.name not in weights and (_rank(v) or 0) >= 1]
    outputs = [v for v in model.graph.output if _rank(v) is not None]
    batched = _rewired(model, [(v, _batched(v)) for v in inputs], [(v, _batched(v)) for v in outputs], "unbatched",
                       "Squeeze", "Unsqueeze")
    return batched, BatchOfOne(tuple(_copy(v) for v in inputs), tuple(_copy(v) for v in outputs))


def _rewired(model: onnx.ModelProto, inputs: Declared, outputs: Declared, suffix: str, on_input: str,
             on_output: str) -> onnx.ModelProto:
    """A copy of the model with inputs and outputs declared anew, an `on_input` node (Squeeze or Unsqueeze of axis
    0) between each input and the nodes that read it, and an `on_output` node between the node that computes each
    output and the output (the tensors in between are named NAME/`suffix`)."""
    names = Names(proto_names(model.graph))
    inner = {old.name: names.fresh(f"{old.name}/{suffix}") for old, _ in inputs + outputs}
    graph = renamed_graph(model.graph, inner)
    declared = {inner[old.name]: new for old, new in inputs + outputs}
    for value in list(graph.input) + list(graph.output):
        if value.name in declared:
            value.CopyFrom(declared[value.name])
    axes = []
    if opset_of(model) >= 13:  # axes became an input in opset 13
        axes = [names.fresh("batch_axis")]
        graph.initializer.append(onnx.numpy_helper.from_array(np.array([0], np.int64), axes[0]))
    nodes = [_axis_node(on_input, old.name, inner[old.name], axes, names) for old, _ in inputs] + list(graph.node) + \
        [_axis_node(on_output, inner[old.name], old.name, axes, names) for old, _ in outputs]
    del graph.node[:]
    graph.node.extend(nodes)
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    copy.graph.CopyFrom(graph)
    return copy


def _axis_node(op: str, source: str, result: str, axes: list[str], names: Names) -> onnx.NodeProto:
    attrs = {} if axes else {"axes": [0]}
    return onnx.helper.make_node(op, [source, *axes], [result], name=names.fresh(f"{result}/{op}"), **attrs)


def _copy(value: onnx.ValueInfoProto) -> onnx.ValueInfoProto:
    copy = onnx.ValueInfoProto()
    copy.CopyFrom(value)
    return copy


def _batched(value: onnx.ValueInfoProto) -> onnx.ValueInfoProto:
    """The declaration with a leading axis of 1."""
    copy = _copy(value)
    dims = list(value.type.tensor_type.shape.dim)
    copy.type.tensor_type.shape.ClearField("dim")
    copy.type.tensor_type.shape.dim.add().dim_value = 1
    copy.type.tensor_type.shape.dim.extend(dims)
    return copy


def _unbatched(value: onnx.ValueInfoProto) -> onnx.ValueInfoProto:
    """The declaration without its leading axis."""
    copy = _copy(value)
    dims = list(value.type.tensor_type.shape.dim)[1:]
    copy.type.tensor_type.shape.ClearField("dim")
    copy.type.tensor_type.shape.dim.extend(dims)
    return copy

"""Control flow written out as plain nodes, so that the relevance walk sees one graph: an If whose condition is a
constant at build time becomes the nodes of the branch it takes, and a Loop or a Scan that runs a number of steps
known at build time becomes that many copies of its body (a Loop whose condition counts its steps is run once, at
build time, to count them: `counted_steps`). A Loop whose number of steps depends on the data is refused with one
line. An If whose condition depends on an input stays: the pipeline builds the model once with
each branch taken (`with_branch`) and joins the two built models under one If (`either`), so that the branch taken
at run time is explained."""
from __future__ import annotations

from typing import Callable

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort

from ..errors import LrpError
from ..ir.files import ir_version_for
from ..ir.graph import constant, scalar_constant
from ..ir.names import Names, fresh_name, proto_names, renamed_graph
from ..ir.ops import Ops

# A Loop or Scan of more steps than this is refused: its written-out graph would be too large to build.
MAX_STEPS = 1024
BRANCHES = {True: "then_branch", False: "else_branch"}


class _Copy:
    """Copies of a subgraph's nodes for an enclosing graph under fresh names: the tensors the subgraph defines get
    copies, `bound` ones (its inputs) are replaced, and tensors of enclosing graphs and constants stay themselves."""

    def __init__(self, graph: gs.Graph, prefix: str, bound: dict[int, gs.Tensor]):
        self.graph, self.prefix, self.mapped = graph, prefix, dict(bound)
        self.outer = graph.tensors()

    def tensor(self, tensor: gs.Tensor) -> gs.Tensor:
        """The copy of a tensor the subgraph defines, else the enclosing graph's tensor of that name (graphsurgeon
        gives a subgraph output that is an outer tensor an object of its own)."""
        if id(tensor) in self.mapped:
            return self.mapped[id(tensor)]
        return self.outer.get(tensor.name, tensor) if isinstance(tensor, gs.Variable) and tensor.name else tensor

    def define(self, tensor: gs.Tensor) -> gs.Variable:
        copy = gs.Variable(fresh_name(self.graph, f"{self.prefix}/{tensor.name}") if tensor.name else "",
                           dtype=tensor.dtype, shape=list(tensor.shape) if tensor.shape is not None else None)
        self.mapped[id(tensor)] = copy
        return copy

    def node(self, node: gs.Node) -> gs.Node:
        inputs = [self.tensor(t) for t in node.inputs]
        attrs = {k: self.subgraph(v) if isinstance(v, gs.Graph) else v for k, v in node.attrs.items()}
        label = node.name or (node.outputs[0].name if node.outputs else node.op)
        return gs.Node(node.op, fresh_name(self.graph, f"{self.prefix}/{label}"), attrs, inputs,
                       [self.define(t) for t in node.outputs], domain=node.domain)

    def subgraph(self, graph: gs.Graph) -> gs.Graph:
        inputs = [self.define(t) for t in graph.inputs]
        nodes = [self.node(n) for n in graph.nodes]
        return gs.Graph(nodes, inputs, [self.tensor(t) for t in graph.outputs],
                        name=fresh_name(self.graph, f"{self.prefix}/{graph.name}"), opset=graph.opset)

    def body(self, graph: gs.Graph) -> list[gs.Tensor]:
        """Append copies of the subgraph's nodes to the enclosing graph; return what stands for its outputs."""
        self.graph.nodes.extend(self.node(n) for n in graph.nodes)
        return [self.tensor(t) for t in graph.outputs]


def rebind(graph: gs.Graph, node: gs.Node, results: list[gs.Tensor]) -> None:
    """Let `results` compute the node's outputs (through Identity nodes, which a later pass removes); drop the
    node."""
    outputs = list(node.outputs)
    node.inputs.clear()
    node.outputs.clear()
    graph.nodes.remove(node)
    for output, result in zip(outputs, results):
        if output.name:
            graph.nodes.append(gs.Node("Identity", fresh_name(graph, f"{node.name}/{output.name}"), inputs=[result],
                                       outputs=[output]))


def _refuse(source: str, node: gs.Node, reason: str) -> LrpError:
    return LrpError(f"{source}: node '{node.name}' ({node.op}): {reason}; only a {node.op} of a number of steps "
                    f"known at build time is written out (at most {MAX_STEPS})")


def inline_if(graph: gs.Graph, node: gs.Node, source: str) -> bool:
    """An If whose condition is a constant becomes the nodes of the branch it takes."""
    condition = scalar_constant(node.inputs[0])
    if condition is None:
        return False
    branch = node.attrs[BRANCHES[bool(condition)]]
    rebind(graph, node, _Copy(graph, node.name, {}).body(branch))
    return True


def unroll_loop(graph: gs.Graph, node: gs.Node, source: str) -> bool:
    """A Loop with a constant trip count whose condition stays true becomes one copy of its body per step, the scan
    outputs stacked on a new first axis."""
    body = node.attrs["body"]
    count, keep_going, *initial = node.inputs
    steps = scalar_constant(count)
    if steps is None:
        raise _refuse(source, node, f"its trip count '{count.name}' is not known at build time" if count.name
                      else "it has no trip count")
    if keep_going.name and scalar_constant(keep_going) is None:
        raise _refuse(source, node, f"its first condition '{keep_going.name}' is computed from the data")
    stays = body.outputs[0]
    steps = int(steps) if not keep_going.name or bool(scalar_constant(keep_going)) else 0
    if not (stays is body.inputs[1] or _passes(stays, body.inputs[1]) or (scalar_constant(stays) is not None and
                                                                          bool(scalar_constant(stays)))):
        counted = counted_steps(graph, node, min(steps, MAX_STEPS + 1))
        if counted is None:
            raise _refuse(source, node, f"it stops on a condition '{stays.name}' computed at each step from the data")
        steps = counted
    scanned = len(body.outputs) - 1 - len(initial)
    if steps > MAX_STEPS or (steps == 0 and scanned):
        raise _refuse(source, node, f"it runs {steps} steps")
    ops = _ops(graph, node)
    values, stacks = list(initial), [[] for _ in range(scanned)]
    for step in range(steps):
        bound = {id(body.inputs[0]): ops.scalar(step, np.int64), id(body.inputs[1]): ops.scalar(True, np.bool_)}
        bound.update((id(t), v) for t, v in zip(body.inputs[2:], values))
        _, *results = _Copy(graph, f"{node.name}/{step}", bound).body(body)
        values = results[:len(initial)]
        for stack, value in zip(stacks, results[len(initial):]):
            stack.append(value)
    rebind(graph, node, values + [stacked(ops, stack, 0) for stack in stacks])
    return True


def counted_steps(graph: gs.Graph, node: gs.Node, most: int) -> int | None:
    """The number of steps (at most `most`) of a Loop whose condition is computed at each step from the iteration
    number, loop-carried counters and constants only (tf2onnx's while loops: i < T and j < n), found by running once,
    in ONNX Runtime, a copy of the Loop that keeps only what its condition needs; None where the data reaches it."""
    body = node.attrs["body"]
    producers = {id(t): n for n in body.nodes for t in n.outputs}
    positions = {id(t): k for k, t in enumerate(body.inputs)}
    nodes, carried, seen, pending = set(), set(), set(), [body.outputs[0]]
    while pending:
        tensor = pending.pop()
        if id(tensor) in seen or not tensor.name:
            continue
        seen.add(id(tensor))
        if id(tensor) in producers:
            producer = producers[id(tensor)]
            if any(isinstance(v, gs.Graph) for v in producer.attrs.values()):
                return None
            nodes.add(id(producer))
            pending.extend(producer.inputs)
        elif positions.get(id(tensor), 0) >= 2:  # a loop-carried value: its initial value and its update
            k = positions[id(tensor)] - 2
            if k >= len(node.inputs) - 2 or constant(node.inputs[2 + k]) is None:
                return None
            carried.add(k)
            pending.append(body.outputs[1 + k])
        elif id(tensor) not in positions and not isinstance(tensor, gs.Constant):
            return None  # a tensor of the enclosing graph that is computed
    kept = sorted(carried)
    number = body.inputs[0]
    scanned = gs.Variable(f"{number.name}/counted", dtype=np.int64, shape=list(number.shape or []))
    counter = gs.Node("Identity", f"{number.name}/counted", inputs=[number], outputs=[scanned])
    trial = gs.Graph([n for n in body.nodes if id(n) in nodes] + [counter],
                     body.inputs[:2] + [body.inputs[2 + k] for k in kept],
                     [body.outputs[0]] + [body.outputs[1 + k] for k in kept] + [scanned], opset=body.opset)
    steps = gs.Variable("steps", dtype=np.int64)
    finals = [gs.Variable(f"final{k}", dtype=body.outputs[1 + k].dtype) for k in kept]
    loop = gs.Node("Loop", "counted", {"body": trial},
                   [gs.Constant("most", np.array(most, np.int64)), node.inputs[1]] + [node.inputs[2 + k] for k in kept],
                   finals + [steps])
    model = gs.export_onnx(gs.Graph([loop], [], [steps], opset=graph.opset), do_type_check=False)
    model.ir_version = ir_version_for(model, 3)  # onnx stamps a newer one than ONNX Runtime may read
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return len(session.run(None, {})[0])


def unroll_scan(graph: gs.Graph, node: gs.Node, source: str) -> bool:
    """A Scan over sequences of a length known at build time becomes one copy of its body per element, each reading
    its slices (Gather) and its scan outputs stacked (Concat) along their axes, in their directions."""
    body = node.attrs["body"]
    count = node.attrs["num_scan_inputs"]
    initial, sequences = node.inputs[:len(node.inputs) - count], node.inputs[len(node.inputs) - count:]
    scanned = len(body.outputs) - len(initial)
    in_axes = [_axis(a, t) for a, t in zip(node.attrs.get("scan_input_axes", [0] * count), sequences)]
    in_reversed = node.attrs.get("scan_input_directions", [0] * count)
    lengths = {t.shape[a] if a is not None and t.shape is not None else None for t, a in zip(sequences, in_axes)}
    length = lengths.pop() if len(lengths) == 1 else None
    if not isinstance(length, int):
        raise _refuse(source, node, "the length of its sequences is not known at build time (give the input's "
                                    "sizes with --input-shape)")
    if length > MAX_STEPS or (length == 0 and scanned):
        raise _refuse(source, node, f"it runs {length} steps")
    ops = _ops(graph, node)
    values, stacks = list(initial), [[] for _ in range(scanned)]
    for step in range(length):
        slices = [ops("Gather", t, ops.scalar(length - 1 - step if back else step, np.int64), axis=a)
                  for t, a, back in zip(sequences, in_axes, in_reversed)]
        bound = {id(t): v for t, v in zip(body.inputs, values + slices)}
        results = _Copy(graph, f"{node.name}/{step}", bound).body(body)
        values = results[:len(initial)]
        for stack, value in zip(stacks, results[len(initial):]):
            stack.append(value)
    out_axes = node.attrs.get("scan_output_axes", [0] * scanned)
    out_reversed = node.attrs.get("scan_output_directions", [0] * scanned)
    outputs = []
    for stack, axis, back in zip(stacks, out_axes, out_reversed):
        rank = len(stack[0].shape) + 1 if stack[0].shape is not None else None
        if axis < 0 and rank is None:
            raise _refuse(source, node, "the rank of its scan outputs is not known at build time")
        outputs.append(stacked(ops, stack[::-1] if back else stack, axis % rank if axis < 0 else axis))
    rebind(graph, node, values + outputs)
    return True


def _passes(tensor: gs.Tensor, source: gs.Tensor) -> bool:
    """Whether `tensor` is `source` passed on by Identity nodes."""
    while tensor.inputs and tensor.inputs[0].op == "Identity":
        tensor = tensor.inputs[0].inputs[0]
    return tensor is source


def _axis(axis: int, tensor: gs.Tensor) -> int | None:
    if axis >= 0:
        return axis
    return axis % len(tensor.shape) if tensor.shape is not None else None


def _ops(graph: gs.Graph, node: gs.Node) -> Ops:
    ops = Ops(graph, graph.opset)
    ops.scope = node.name
    return ops


def stacked(ops: Ops, values: list[gs.Tensor], axis: int) -> gs.Tensor:
    """The values stacked along a new axis."""
    return ops("Concat", *[ops.unsqueeze(v, [axis]) for v in values], axis=axis)


UNROLL: dict[str, Callable[[gs.Graph, gs.Node, str], bool]] = {"Loop": unroll_loop, "Scan": unroll_scan}


def write_out(graph: gs.Graph, source: str) -> bool:
    """One round: inline the If nodes of constant condition or, when there are none, unroll every Loop and Scan
    that can be (a later round, after constant folding, may know more), refusing them only when none can be.
    Subgraphs are written out when their node is. Returns whether any node was written out."""
    if any([inline_if(graph, node, source) for node in list(graph.nodes) if node.op == "If"]):
        return True
    refusals, unrolled = [], False
    for node in [n for n in graph.nodes if n.op in UNROLL]:
        try:
            unrolled = UNROLL[node.op](graph, node, source) or unrolled
        except LrpError as refusal:
            refusals.append(refusal)
    if refusals and not unrolled:
        raise refusals[0]
    return unrolled


def runtime_choice(graph: gs.Graph) -> gs.Node | None:
    """The first If that chooses its branch at run time (the others are written out by now), or None."""
    return next((node for node in graph.nodes if node.op == "If"), None)


def with_branch(graph: gs.Graph, choice: gs.Node, taken: bool) -> onnx.ModelProto:
    """The model with the If `choice` replaced by the nodes of the branch `taken`."""
    copy = graph.copy()
    node = next(n for n in copy.nodes if n.name == choice.name)
    rebind(copy, node, _Copy(copy, node.name, {}).body(node.attrs[BRANCHES[taken]]))
    return gs.export_onnx(copy.cleanup().toposort(), do_type_check=False)


def condition(graph: gs.Graph, choice: gs.Node) -> onnx.ModelProto:
    """The part of the model that computes the condition of the If `choice`."""
    copy = graph.copy()
    copy.outputs = [copy.tensors()[choice.inputs[0].name]]
    return gs.export_onnx(copy.cleanup().toposort(), do_type_check=False)


def either(deciding: onnx.ModelProto, then: onnx.ModelProto, otherwise: onnx.ModelProto) -> onnx.ModelProto:
    """One model that runs `then` where the condition `deciding` computes is true and `otherwise` where it is false:
    both built models become the branches of one If (same inputs and outputs); the weights they share are stored
    once, outside, and the condition's tensors are renamed so that no name of a branch is shadowed."""
    names = Names(proto_names(then.graph) | proto_names(otherwise.graph) | proto_names(deciding.graph))
    inputs = {value.name for value in deciding.graph.input}
    renamed = {name: names.fresh(f"choice/{name}") for name in proto_names(deciding.graph) - inputs}
    decide = renamed_graph(deciding.graph, renamed)
    shared = _shared_weights(then.graph, otherwise.graph)
    branches = [_branch(model.graph, shared, names, label) for model, label in ((then, "then"), (otherwise, "else"))]
    chosen = deciding.graph.output[0].name
    choose = onnx.helper.make_node("If", [renamed.get(chosen, chosen)], [o.name for o in then.graph.output],
                                   name=names.fresh("choice/If"), then_branch=branches[0], else_branch=branches[1])
    graph = onnx.helper.make_graph(list(decide.node) + [choose], then.graph.name, list(then.graph.input),
                                   list(then.graph.output), list(decide.initializer) + list(shared.values()))
    joined = onnx.ModelProto()
    joined.CopyFrom(then)
    joined.graph.CopyFrom(graph)
    versions: dict[str, int] = {}
    for opset in list(then.opset_import) + list(otherwise.opset_import):
        versions[opset.domain] = max(versions.get(opset.domain, 0), opset.version)
    del joined.opset_import[:]
    joined.opset_import.extend(onnx.helper.make_opsetid(domain, version) for domain, version in versions.items())
    return joined


def _shared_weights(first: onnx.GraphProto, second: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    """The initializers both graphs hold under one name with the same contents."""
    others = {t.name: t for t in second.initializer}
    return {t.name: t for t in first.initializer
            if t.name in others and t.SerializeToString() == others[t.name].SerializeToString()}


def _branch(graph: onnx.GraphProto, shared: dict[str, onnx.TensorProto], names: Names, label: str
            ) -> onnx.GraphProto:
    """A built model's graph as a branch: its inputs read from the enclosing graph, the shared weights left out, its
    outputs renamed (a branch may not define the name of the If's output)."""
    branch = renamed_graph(graph, {o.name: names.fresh(f"{label}/{o.name}") for o in graph.output})
    del branch.input[:]
    kept = [t for t in branch.initializer if t.name not in shared and t.name not in {v.name for v in graph.input}]
    del branch.initializer[:]
    branch.initializer.extend(kept)
    branch.name = label
    return branch

"""Declared patterns: every construct that exporters write out in plain ops and that the relevance walk must see as
one layer (a softmax, a head's log-softmax, the sigma of a norm, a dense layer's bias Add, an activation x * f(x),
a one-hot encoding) is a `Pattern`: the op type where the construct ends and a `match` that finds it there.

`collapse` replaces each match by one canonical node in the `onnxlrp.canonical` domain, so that emitters only see
canonical ops; `Collapsed.restore` puts the exporter's own nodes back once the relevance graph is complete, so the
model's forward computation stays as exported, bit for bit. A match covers nodes whose outputs nothing else reads.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import onnx_graphsurgeon as gs

from ..ir.graph import constant, is_bias, scalar_constant

CANONICAL = "onnxlrp.canonical"
# Canonical op types (besides Softmax, LogSoftmax, MatMul and OneHot, which keep the meaning of the ONNX op).
STOP_GRADIENT = "StopGradient"  # a value the walk treats as a constant (LXT's stop-gradient)
ACTIVATION = "Activation"  # an elementwise x * f(x) written out (SiLU, GELU)
SOFT_CAP = "SoftCap"  # cap * tanh(x / cap), attribute `cap`: Gemma 2's soft-capping of scores and logits
# How far up a chain of elementwise ops the gate of an activation x * f(x) is searched for x.
ACTIVATION_DEPTH = 8
ELEMENTWISE = ("Add", "Sub", "Mul", "Div", "Pow", "Sqrt", "Reciprocal", "Neg", "Abs", "Exp", "Log", "Erf", "Tanh",
               "Sigmoid", "HardSigmoid", "Relu", "LeakyRelu", "PRelu", "Elu", "Selu", "Celu", "Gelu", "HardSwish",
               "Mish", "Softplus", "Softsign", "ThresholdedRelu", "Clip", "Min", "Max", "Cast", "Sin", "Cos",
               "QuantizeLinear", "DequantizeLinear")
# Ops whose output is an elementwise nonlinearity of their one computed input (a gate in a gated product).
GATES = ("Sigmoid", "HardSigmoid")
ACTIVATION_OPS = GATES + ("Relu", "Gelu", "Tanh", "Elu", "Selu", "Softplus", "Mish", "HardSwish", "Erf", ACTIVATION)
MEANS = ("ReduceMean", "GlobalAveragePool")  # tf2onnx writes a mean over the last axis as GlobalAveragePool
EPSILONS = ("Add", "Max")  # var + eps, or max(var, eps)
# Ops between an integer input and its encoding that keep each value where it is.
PLACING = ("Unsqueeze", "Reshape", "Squeeze", "Flatten", "Cast")


@dataclass
class Match:
    """What a pattern found: the nodes it covers (in graph order) and the canonical node that stands for them."""
    covered: list[gs.Node]
    op: str
    inputs: list[gs.Tensor]
    output: gs.Variable
    attrs: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Pattern:
    """A construct that ends in a node of type `anchor`; `match` returns it, or None. `outermost`: anchors are tried
    from the graph's end, so that a construct is matched whole before a part of it that matches too (GELU's
    tanh form x * (1 + tanh(c (x + 0.044715 x * x * x))) holds x * (x * x), itself of the form x * f(x))."""
    name: str
    anchor: str
    match: Callable[[gs.Node], Match | None]
    outermost: bool = False


def made_by(tensor: gs.Tensor | None, *ops: str) -> gs.Node | None:
    """The node of one of `ops` that computes the tensor, or None."""
    node = tensor.inputs[0] if isinstance(tensor, gs.Variable) and tensor.inputs else None
    return node if node is not None and node.op in ops else None


def _axes(node: gs.Node) -> list[int] | None:
    """The constant axes of a reduction (input or attribute), None if not constant."""
    if len(node.inputs) > 1:
        values = constant(node.inputs[1])
        return None if values is None else [int(a) for a in np.atleast_1d(values)]
    return node.attrs.get("axes")


def _normalized(axes: Sequence[int] | None, tensor: gs.Tensor) -> list[int] | None:
    if not axes or tensor.shape is None:
        return None
    return sorted(a % len(tensor.shape) for a in axes)


def _unshifted(z: gs.Tensor, covered: list[gs.Node]) -> gs.Tensor:
    """z before a subtraction of its maximum (z - ReduceMax(z)), which the softmax does not change."""
    shift = made_by(z, "Sub")
    peak = made_by(shift.inputs[1], "ReduceMax") if shift is not None else None
    if peak is None or peak.inputs[0] is not shift.inputs[0]:
        return z
    covered[:0] = [peak, shift]
    return shift.inputs[0]


def softmax(divide: gs.Node) -> Match | None:
    """Exp(z) / ReduceSum(Exp(z)) over constant axes (keepdims), z possibly shifted by its maximum."""
    e, total = divide.inputs
    exp, reduction = made_by(e, "Exp"), made_by(total, "ReduceSum")
    if exp is None or reduction is None or reduction.inputs[0] is not e or not reduction.attrs.get("keepdims", 1):
        return None
    covered = [exp, reduction, divide]
    z = _unshifted(exp.inputs[0], covered)
    axes = _normalized(_axes(reduction), z)
    return Match(covered, "Softmax", [z], divide.outputs[0], {"axes": axes}) if axes else None


def log_softmax(subtract: gs.Node) -> Match | None:
    """t - Log(ReduceSum(Exp(t))), t possibly z shifted by its maximum (a classifier's log-softmax head)."""
    log = made_by(subtract.inputs[1], "Log")
    reduction = made_by(log.inputs[0], "ReduceSum") if log is not None else None
    exp = made_by(reduction.inputs[0], "Exp") if reduction is not None else None
    if exp is None or exp.inputs[0] is not subtract.inputs[0]:
        return None
    covered = [exp, reduction, log, subtract]
    z = _unshifted(subtract.inputs[0], covered)
    return Match(covered, "LogSoftmax", [z], subtract.outputs[0], {"axes": _normalized(_axes(reduction), z)})


def _mean_of(tensor: gs.Tensor | None) -> gs.Tensor | None:
    """What `tensor` is the mean of: a ReduceMean (or tf2onnx's GlobalAveragePool), or a ReduceSum times or divided
    by a scalar constant (jax2tf's mean); None if it is no mean."""
    mean = made_by(tensor, *MEANS)
    if mean is not None:
        return mean.inputs[0]
    scaled = made_by(tensor, "Mul", "Div")
    if scaled is None or constant(scaled.inputs[1]) is None or constant(scaled.inputs[1]).size != 1:
        return None
    total = made_by(scaled.inputs[0], "ReduceSum")
    return total.inputs[0] if total is not None else None


def _square_of(tensor: gs.Tensor | None) -> gs.Tensor | None:
    """What `tensor` is the square of (d * d or d ^ 2), None if it is no square."""
    square = made_by(tensor, "Mul", "Pow")
    if square is None:
        return None
    exponent = constant(square.inputs[1]) if square.op == "Pow" else None
    if (square.op == "Mul" and square.inputs[0] is square.inputs[1]) or \
            (exponent is not None and exponent.size == 1 and float(exponent.reshape(())) == 2.0):
        return square.inputs[0]
    return None


def _variance(tensor: gs.Tensor) -> bool:
    """Whether `tensor` is a variance or mean square: mean(d ^ 2), or mean(x ^ 2) - mean(x) ^ 2 (flax's LayerNorm)."""
    if _square_of(_mean_of(tensor)) is not None:
        return True
    difference = made_by(tensor, "Sub")
    if difference is None:
        return False
    x = _square_of(_mean_of(difference.inputs[0]))
    return x is not None and x is _mean_of(_square_of(difference.inputs[1]))


def sigma_of_a_norm(root: gs.Node) -> Match | None:
    """Sqrt(variance + eps), eps added or taken as a floor (also max(0, variance) first, as flax clips it): a
    constant to the walk (LXT's stop-gradient), so that whatever divides or multiplies by sigma or 1 / sigma
    (torch's Div, tf2onnx's Reciprocal and Mul, RMSNorm) passes relevance. See `_variance` for its forms."""
    tensor = root.inputs[0]
    while (bound := made_by(tensor, *EPSILONS)) is not None:
        variables = [t for t in bound.inputs if constant(t) is None]
        if len(variables) != 1:
            return None
        tensor = variables[0]
    return Match([root], STOP_GRADIENT, [root.inputs[0]], root.outputs[0]) if _variance(tensor) else None


def dense_bias(product: gs.Node) -> Match | None:
    """MatMul by a constant matrix and the Add of a per-feature constant that alone reads it: one dense layer
    MatMul(x, W, b), where no Gemm can carry the bias (inputs of rank 3 or more)."""
    weight = constant(product.inputs[1])
    users = product.outputs[0].outputs
    if weight is None or weight.ndim != 2 or len(users) != 1 or users[0].op != "Add" or \
            users[0].inputs.count(product.outputs[0]) != 1:
        return None
    add = users[0]
    bias = next(t for t in add.inputs if t is not product.outputs[0])
    if constant(bias) is None or not is_bias(bias.values, weight.shape[1]):
        return None
    return Match([product, add], "MatMul", [product.inputs[0], product.inputs[1], bias], add.outputs[0])


def activation(product: gs.Node) -> Match | None:
    """signal * gate where the gate is a function of the signal alone (or of a tensor the signal only scales) within
    a few ops: one elementwise activation such as x * sigmoid(x) or 0.5 * x * (1 + erf(x / sqrt 2))."""
    a, b = product.inputs
    if not all(isinstance(t, gs.Variable) for t in (a, b)):
        return None
    for signal, gate in ((a, b), (b, a)):
        chain: list[gs.Node] = []
        root = signal
        while True:
            nodes = _function_of(gate, root, ACTIVATION_DEPTH)
            if nodes is not None:
                covered = [n for n in _in_graph_order(product, nodes | set(map(id, chain)) | {id(product)})]
                return Match(covered, ACTIVATION, [root], product.outputs[0])
            scaling = _scaling(root)
            if scaling is None or len(chain) >= ACTIVATION_DEPTH:
                break
            chain.append(scaling)
            root = next(t for t in scaling.inputs if isinstance(t, gs.Variable))
    return None


def _scaling(tensor: gs.Tensor) -> gs.Node | None:
    """The Mul or Div by a constant that computes `tensor` from one variable (its numerator), or None."""
    node = made_by(tensor, "Mul", "Div")
    if node is None:
        return None
    variables = [t for t in node.inputs if isinstance(t, gs.Variable)]
    if len(variables) != 1 or (node.op == "Div" and variables[0] is not node.inputs[0]):
        return None
    return node


def _function_of(tensor: gs.Tensor, source: gs.Tensor, depth: int) -> set[int] | None:
    """The ids of the nodes between `source` and `tensor` if every variable on the way up from `tensor` leads to
    `source` within `depth` elementwise ops, else None."""
    if depth == 0 or not tensor.inputs or tensor.inputs[0].op not in ELEMENTWISE:
        return None
    node = tensor.inputs[0]
    variables = [t for t in node.inputs if isinstance(t, gs.Variable)]
    if not variables:
        return None
    found = {id(node)}
    for variable in variables:
        if variable is source:
            continue
        above = _function_of(variable, source, depth - 1)
        if above is None:
            return None
        found |= above
    return found


def _in_graph_order(last: gs.Node, ids: set[int]) -> list[gs.Node]:
    """The nodes with these ids, found above `last`, in an order where producers come first."""
    nodes: dict[int, gs.Node] = {}
    stack = [last]
    while stack:
        node = stack.pop()
        if id(node) in ids and id(node) not in nodes:
            nodes[id(node)] = node
            stack.extend(t.inputs[0] for t in node.inputs if t.inputs)
    ordered: list[gs.Node] = []
    placed: set[int] = set()
    while len(ordered) < len(nodes):
        for node in nodes.values():
            ready = all(not t.inputs or id(t.inputs[0]) not in nodes or id(t.inputs[0]) in placed for t in node.inputs)
            if id(node) not in placed and ready:
                ordered.append(node)
                placed.add(id(node))
    return ordered


def is_activation(tensor: gs.Tensor, computed: Callable[[gs.Tensor], bool]) -> bool:
    """Whether a tensor is an activation's output: an activation op (Activation: x * f(x) written out), or a
    constant multiple of one (`computed` tells the walk's constants)."""
    producer = tensor.inputs[0] if tensor.inputs else None
    if producer is None or producer.op in ACTIVATION_OPS:
        return producer is not None
    sources = [t for t in producer.inputs if computed(t)]
    return producer.op in ("Mul", "Div") and len(sources) == 1 and is_activation(sources[0], computed)


def soft_cap(product: gs.Node) -> Match | None:
    """tanh(x / cap) * cap, or tanh(x * (1 / cap)) * cap, for one scalar constant cap (Gemma 2 caps its attention
    scores and final logits so): one layer, whose relevance is not that of the Tanh of an activation
    (lrp/emitters/routing.py)."""
    outer = _times_scalar(product)
    tanh = made_by(outer[0], "Tanh") if outer is not None else None
    inner = _times_scalar(tanh.inputs[0].inputs[0]) if tanh is not None and tanh.inputs[0].inputs else None
    if inner is None or outer[1] == 0 or not np.isclose(inner[1] * outer[1], 1.0, rtol=1e-6, atol=0.0):
        return None
    return Match([tanh.inputs[0].inputs[0], tanh, product], SOFT_CAP, [inner[0]], product.outputs[0],
                 {"cap": outer[1]})


def _times_scalar(node: gs.Node) -> tuple[gs.Tensor, float] | None:
    """(x, k) where the Mul or Div `node` computes x * k (x / d: k = 1 / d) for a scalar constant k, or None."""
    if node.op not in ("Mul", "Div") or len(node.inputs) != 2:
        return None
    values = [constant(t) for t in node.inputs]
    scalars = [None if v is None else float(v) for v in map(scalar_constant, node.inputs)]
    if node.op == "Div":
        return (node.inputs[0], 1.0 / scalars[1]) if values[0] is None and scalars[1] else None
    side = next((i for i in (1, 0) if scalars[i] is not None and values[1 - i] is None), None)
    return None if side is None else (node.inputs[1 - side], scalars[side])


def one_hot(encoding: gs.Node) -> Match | None:
    """OneHot, or Equal of a tensor against a constant range of values (an Equal against one value, DistilBERT's
    `attention_mask == 0`, is a test, not an encoding), either side possibly broadcast by an Expand first (jax2tf's
    `ids[..., None] == iota`), with the Cast to float that follows it: the relevance of the encoding is summed over
    the encoded values (attrs `axes`, `keepdims`), so that each position gets one."""
    output = encoding.outputs[0]
    if output.shape is None:
        return None
    rank = len(output.shape)
    covered: list[gs.Node] = []
    if encoding.op == "OneHot":
        source, axes, keepdims = encoding.inputs[0], [encoding.attrs.get("axis", -1) % rank], 0
    else:
        sides = [_unbroadcast(t, covered) for t in encoding.inputs]
        variables = [t for t in sides if constant(t) is None]
        values = [constant(t) for t in sides if constant(t) is not None]
        if len(variables) != 1 or len(values) != 1 or values[0].size <= 1 or variables[0].shape is None:
            return None
        source = variables[0]
        aligned = [1] * (rank - len(source.shape)) + list(source.shape)
        axes, keepdims = [a for a in range(rank) if aligned[a] == 1 and output.shape[a] != 1], 1
    covered.append(encoding)
    cast = output.outputs[0] if len(output.outputs) == 1 and output.outputs[0].op == "Cast" else None
    if cast is not None:
        covered.append(cast)
        output = cast.outputs[0]
    return Match(covered, "OneHot", [source], output, {"axes": axes, "keepdims": keepdims,
                                                        "encodes": _placed_from(source)})


def _unbroadcast(tensor: gs.Tensor, covered: list[gs.Node]) -> gs.Tensor:
    """The tensor before an Expand that broadcasts it (added to `covered`), or the tensor itself."""
    expand = made_by(tensor, "Expand")
    if expand is None:
        return tensor
    covered.append(expand)
    return expand.inputs[0]


def _placed_from(tensor: gs.Tensor) -> str:
    """The tensor an encoded tensor comes from through ops that only place values (Unsqueeze, Cast ...)."""
    for _ in range(4):
        producer = made_by(tensor, *PLACING)
        if producer is None:
            break
        tensor = producer.inputs[0]
    return tensor.name


def encoded_input(graph: gs.Graph, tensor: gs.Tensor) -> bool:
    """Whether the (collapsed) graph one-hot encodes the tensor."""
    return any(n.domain == CANONICAL and n.op == "OneHot" and n.attrs["encodes"] == tensor.name for n in graph.nodes)


# In order: a softmax's Div before the activation search could take its Exp for a gate of something.
PATTERNS = (
    Pattern("softmax written out", "Div", softmax),
    Pattern("log-softmax written out", "Sub", log_softmax),
    Pattern("sigma of a norm", "Sqrt", sigma_of_a_norm),
    Pattern("dense layer with its bias", "MatMul", dense_bias),
    Pattern("soft-capping", "Mul", soft_cap),
    Pattern("activation written out", "Mul", activation, outermost=True),
    Pattern("one-hot encoding", "OneHot", one_hot),
    Pattern("one-hot encoding", "Equal", one_hot),
)


@dataclass
class Collapsed:
    """The canonical nodes that stand in the graph for matches, with what they replaced."""
    graph: gs.Graph
    replaced: list[tuple[gs.Node, list[tuple[gs.Node, list, list]]]] = field(default_factory=list)

    def restore(self) -> None:
        """Put the covered nodes back in place of each canonical node, with their own inputs and outputs."""
        position = {id(node): index for index, node in enumerate(self.graph.nodes)}
        swaps = {}
        for canonical, covered in self.replaced:
            canonical.inputs.clear()
            canonical.outputs.clear()
            for node, inputs, outputs in covered:
                node.inputs.extend(inputs)
                node.outputs.extend(outputs)
            swaps[position[id(canonical)]] = [node for node, _, _ in covered]
        self.graph.nodes = [n for index, node in enumerate(self.graph.nodes)
                            for n in swaps.get(index, [node])]
        self.replaced.clear()

    def stand_in(self, canonical: gs.Node, nodes: list[tuple[gs.Node, list, list]]) -> None:
        """Let a canonical node in the graph stand for plain nodes not in it (node, its inputs, its outputs; in graph
        order, from the canonical node's inputs to its outputs) that `restore` puts in its place: a twin that only
        the walk reads."""
        self.replaced.append((canonical, nodes))

    def hidden(self) -> dict[str, gs.Tensor]:
        """The tensors that only the covered nodes read or write, by name (a user may name one)."""
        return {t.name: t for _, covered in self.replaced for _, inputs, outputs in covered for t in inputs + outputs}


def collapse(graph: gs.Graph, patterns: Sequence[Pattern] = PATTERNS) -> Collapsed:
    """Replace every match of `patterns` (in order) by its canonical node; keeps the graph's topological order."""
    collapsed = Collapsed(graph)
    outputs = {id(t) for t in graph.outputs}
    for pattern in patterns:
        anchors = [n for n in graph.nodes if n.op == pattern.anchor and n.domain != CANONICAL]
        for node in anchors[::-1] if pattern.outermost else anchors:
            if not node.outputs:
                continue  # covered by an earlier match
            match = pattern.match(node)
            if match is not None and _self_contained(match, outputs):
                collapsed.replaced.append(_replace(graph, node, match))
    graph.nodes = [n for n in graph.nodes if n.outputs or n.domain == CANONICAL]
    return collapsed


def _self_contained(match: Match, graph_outputs: set[int]) -> bool:
    """Whether nothing outside the match reads what its nodes compute, except its output."""
    inside = {id(n) for n in match.covered}
    return len(inside) == len(match.covered) and all(
        tensor is match.output or (id(tensor) not in graph_outputs and all(id(u) in inside for u in tensor.outputs))
        for node in match.covered for tensor in node.outputs)


def _replace(graph: gs.Graph, anchor: gs.Node, match: Match) -> tuple[gs.Node, list[tuple[gs.Node, list, list]]]:
    covered = [(node, list(node.inputs), list(node.outputs)) for node in match.covered]
    for node in match.covered:
        node.inputs.clear()
        node.outputs.clear()
    canonical = gs.Node(match.op, anchor.name, match.attrs, list(match.inputs), [match.output], domain=CANONICAL)
    index = next(i for i, node in enumerate(graph.nodes) if node is match.covered[-1])
    graph.nodes[index] = canonical
    return canonical, covered

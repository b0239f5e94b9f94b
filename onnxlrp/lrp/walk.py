"""The relevance walk: from the explained logits back to the model input, one layer per node through the rule
skeleton, and the graph's new input `target` and outputs `relevance` (docs/lrp.md §5)."""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np
import onnx_graphsurgeon as gs

from ..canonical.classic import head_of
from ..canonical.patterns import STOP_GRADIENT
from ..errors import LrpError
from ..ir.graph import floating
from ..ir.ops import Ops, Tensor
from .composite import Composite
from .emitters import FAMILIES
from .emitters.linear import Linear
from .facts import (computed, data_path, explained_input, nonnegative_tensors, on_data_path, rectified_outputs,
                    unbounded_tensors, vanishing_relevance)
from .families import Unsupported
from .layers import LayerRelevance
from .pairs import Pairs, second_order
from .pairs import expose as expose_pairs
from .rules import Rule, propagate
from .seed import (EMBEDDING_RELEVANCE, POSITION, RELEVANCE, RELEVANCE_PAIRS, STATE_RELEVANCE, TARGET, start,
                   start_at_position)

# Trailing ops skipped so that the logits are explained: softmax heads and the sigmoid of binary and multi-label
# heads (written-out softmaxes are collapsed into Softmax and LogSoftmax: canonical/patterns.py).
HEADS = ("Softmax", "LogSoftmax", "Sigmoid")
# Ops that mark a transformer (attention, norms whose sigma is a constant), to suggest its presets.
TRANSFORMER_OPS = ("Softmax", "LayerNormalization", "Attention", "Einsum", STOP_GRADIENT)
# The integer input [N, T] that marks a text's tokens (1) and its padding (0), as Hugging Face names it.
ATTENTION_MASK = "attention_mask"


class Walk:
    """Holds what emitters may ask for: the op writer, the rule of each node, what is known of tensors' values."""

    def __init__(self, graph: gs.Graph, composite: Composite, ops: Ops, explained: gs.Variable | None = None,
                 states: Sequence[gs.Variable] = ()):
        self.ops = ops
        self.composite = composite
        sources = [explained, *states] if explained is not None else []
        self._nonnegative = nonnegative_tensors(graph)
        self._unbounded = unbounded_tensors(graph, [t.name for t in sources])
        self._rule = composite.assign(graph)
        # Tensors with no data path from the explained input (or a recurrent initial state given as an input) are
        # constants to the walk (None: every Variable).
        self._data_path = data_path(graph, sources, self.detached) if explained is not None else None
        with on_data_path(self._data_path):
            self._rectified = rectified_outputs(graph, vanishing_relevance(graph, self.rule, FAMILIES))
        self.layers: list[LayerRelevance] = []  # the linear layers walked, from the output back to the input
        self.pairs: list[Pairs] = []  # the products under the rule `pairs` (lrp/pairs.py)

    def rule(self, node: gs.Node) -> tuple[Rule, dict]:
        return self._rule(node)

    def detached(self, node: gs.Node) -> bool:
        """Whether a node's output is a constant to the walk under its rule (CP-LRP's attention weights)."""
        return detaches(node, self.rule)

    def nonnegative(self, tensor: Tensor) -> bool:
        return tensor.name in self._nonnegative

    def finite(self, tensor: Tensor) -> bool:
        return tensor.name not in self._unbounded

    def rectified(self, tensor: Tensor) -> Tensor | None:
        return self._rectified.get(tensor.name)

    def walk(self, graph: gs.Graph, top: Tensor, seed: Tensor, source: str) -> dict[str, list[Tensor]]:
        """Propagate `seed` from tensor `top` to every tensor it depends on; return the relevance that reached
        the graph's inputs (contributions per tensor name)."""
        with on_data_path(self._data_path):
            return self._walk(graph, top, seed, source)

    def _walk(self, graph: gs.Graph, top: Tensor, seed: Tensor, source: str) -> dict[str, list[Tensor]]:
        relevance: dict[str, list[Tensor]] = {top.name: [seed]}
        problems: dict[tuple[str, str], list[str]] = defaultdict(list)
        for node in list(reversed(graph.nodes)):
            if not any(computed(t) for t in node.inputs):
                continue  # a constant to the walk (or the lookup of the explained embedding)
            upper = [self.ops.add_all(relevance.pop(t.name)) if t.name in relevance else None for t in node.outputs]
            if all(r is None for r in upper):
                continue
            self.ops.scope = f"lrp/{node.name}"
            try:
                if node.op not in FAMILIES:
                    raise Unsupported("unsupported op type")
                layer = FAMILIES[node.op].describe(self, node)
                lower = propagate(self, node, layer, upper)
                if isinstance(layer, Linear):
                    self.layers.append(LayerRelevance(node, self.rule(node)[0].name, upper[0], lower[0]))
                if self.rule(node)[0].second_order:
                    self.pairs.append(second_order(self, node, upper[0]))
            except Unsupported as reason:
                problems[(node.op, str(reason))].append(node.name)
                # Keep walking through the float inputs, so that every problem is reported at once.
                lower = [t if floating(t) else None for t in node.inputs]
            for tensor, contribution in zip(node.inputs, lower):
                if contribution is not None and computed(tensor):
                    relevance.setdefault(tensor.name, []).append(contribution)
        if problems:
            details = "; ".join(f"{op} ({', '.join(repr(n) for n in names)}): {reason}"
                                for (op, reason), names in problems.items())
            raise LrpError(f"{source}: cannot explain {sum(map(len, problems.values()))} node(s): {details}")
        return relevance


def detaches(node: gs.Node, rule: Callable[[gs.Node], tuple[Rule, dict]]) -> bool:
    """Whether a node's output is a constant to the walk under its rule (CP-LRP's attention weights)."""
    family = FAMILIES.get(node.op)
    return family is not None and family.detachable and rule(node)[0].detaches


@dataclass(frozen=True)
class Head:
    """The classifier output shown, the logits explained, and the trailing nodes skipped between them."""
    output: gs.Variable
    logits: gs.Variable
    skipped: tuple[gs.Node, ...]
    label: gs.Variable | None = None  # a classic model's label output, whose class labels are `classes`
    classes: np.ndarray | None = None

    @property
    def kind(self) -> str | None:
        """The head skipped (Softmax, LogSoftmax, Sigmoid), None when the output is the logits."""
        return next((n.op for n in self.skipped if n.op in HEADS), None)


@dataclass
class Explained:
    """What `explain` added to a graph: the explained input, the head (logits), the linear layers it walked, and
    whether the model looks like a transformer or a CNN (for the presets suggested to its users)."""
    x: gs.Variable
    head: Head
    target: gs.Variable
    layers: list[LayerRelevance]
    architecture: str
    ids: gs.Variable | None = None  # the token ids that `x` (an embedding lookup) is read at, for text models

    @property
    def logits(self) -> gs.Variable:
        return self.head.logits


def explain(graph: gs.Graph, composite: Composite, explain: str, output: str | None, source: str,
            hidden: Mapping[str, gs.Tensor] = {}, explain_input: str | None = None, states: Sequence[str] = ()
            ) -> Explained:
    """Add the input `target` and the output `relevance` (and `relevance_embedding` for token ids, `relevance_pairs`
    for a product under the rule `pairs`) to a canonical graph: the walk from the explained logit back to the
    explained input (`explain_input`, or the one found). `hidden`: tensors of the model that canonical nodes stand
    for (canonical/patterns.py), which `output` may name. A sequence of logits [N, T, V] (a language model's) also
    gets the input `position` (seed.py). `states`: the inputs that recurrent layers read as their initial state,
    whose relevance is the output `relevance_NAME` each."""
    given = [t for t in graph.inputs if t.name in states and floating(t)]
    added = {TARGET, RELEVANCE, EMBEDDING_RELEVANCE, RELEVANCE_PAIRS, POSITION,
             *(STATE_RELEVANCE.format(t.name) for t in given)}
    taken = {t for t in graph.tensors()} & added
    if taken:
        raise LrpError(f"{source}: the model already has a tensor named {', '.join(sorted(taken))}")
    x, ids = explained_input(graph, source, explain_input)
    head = classifier(graph, output, source, hidden)
    shown, logits = head.output, head.logits
    if explain == "logodds" and head.kind == "Sigmoid":
        raise LrpError(f"{source}: --explain logodds: a sigmoid head's logit is already its log-odds; use --explain "
                       "logit")
    architecture = architecture_of(graph, head)
    classes = logits.shape[-1] if logits.shape is not None and len(logits.shape) in (2, 3) else None
    if not isinstance(classes, int):
        raise LrpError(f"{source}: output '{shown.name}' must have shape [N, C] (or [N, T, C]) with a static C")
    ops = Ops(graph, graph.opset, np.dtype(logits.dtype))
    target = gs.Variable(TARGET, dtype=np.int64, shape=[x.shape[0] if x.shape else "N"])
    given = [t for t in given if t is not x]
    walk = Walk(graph, composite, ops, x, given)
    label = (head.label, head.classes) if head.label is not None else None
    mask = next((t for t in graph.inputs if t.name == ATTENTION_MASK and not floating(t)), None)
    position = gs.Variable(POSITION, dtype=np.int64, shape=[]) if len(logits.shape) == 3 else None
    seed = start(walk, logits, target, classes, explain, label) if position is None else \
        start_at_position(walk, logits, target, position, classes, explain, mask)
    relevance = walk.walk(graph, *seed, source)
    if x.name not in relevance:
        raise LrpError(f"{source}: output '{shown.name}' does not depend on input '{x.name}'")
    total = ops.add_all(relevance[x.name])
    if ids is not None:  # token relevance: the sum over the embedding axis, and the embedding's own
        graph.outputs.append(gs.Variable(EMBEDDING_RELEVANCE, dtype=x.dtype, shape=x.shape))
        graph.nodes.append(gs.Node("Identity", ops.fresh("lrp/relevance_embedding"), inputs=[total],
                                   outputs=[graph.outputs[-1]]))
        total = ops.reduce_sum(total, [len(x.shape) - 1], keepdims=False)
        if x.inputs[0].inputs[1] is not ids:  # looked up at the ids reshaped (GPT-2's export): one per token
            total = ops("Reshape", total, ops("Shape", ids))
    result = gs.Variable(RELEVANCE, dtype=x.dtype if floating(x) else ops.dtype,
                         shape=(ids if ids is not None else x).shape)
    graph.nodes.append(gs.Node("Identity", ops.fresh("lrp/relevance"), inputs=[total], outputs=[result]))
    graph.inputs.extend([target] if position is None else [target, position])
    graph.outputs.append(result)
    for state in given:  # an initial state's share, which a constant state keeps as a bias does
        share = gs.Variable(STATE_RELEVANCE.format(state.name), dtype=state.dtype, shape=state.shape)
        reached_state = ops.add_all(relevance[state.name]) if state.name in relevance else \
            ops("Mul", state, ops.scalar(0.0))
        graph.nodes.append(gs.Node("Identity", ops.fresh("lrp/relevance_state"), inputs=[reached_state],
                                   outputs=[share]))
        graph.outputs.append(share)
    if walk.pairs:
        expose_pairs(graph, ops, walk.pairs, source)
    return Explained(x, head, target, walk.layers[::-1], architecture, ids)


def classifier(graph: gs.Graph, output: str | None, source: str, hidden: Mapping[str, gs.Tensor] = {}) -> Head:
    """The classifier output (`output`, or the first float [N, C] output) and the logits before its head (for a
    classic model, the scores of its linear model: canonical/classic.py)."""
    shown = _classifier_output(graph, output, source, hidden)
    classic = head_of(graph, shown)
    if classic is not None:
        return Head(shown, classic.scores, (), classic.label, classic.classes)
    tensor, skipped = shown, []
    while tensor.inputs and tensor.inputs[0].op in HEADS + ("Identity",):
        skipped.insert(0, tensor.inputs[0])
        tensor = tensor.inputs[0].inputs[0]
    return Head(shown, tensor, tuple(skipped))


def architecture_of(graph: gs.Graph, head: Head) -> str:
    """"transformer" when attention or a norm's constant sigma is found outside the head (a MatMul of two computed
    tensors included), else "cnn"."""
    skipped = {id(n) for n in head.skipped}
    attention = any(id(n) not in skipped and (n.op in TRANSFORMER_OPS or (
        n.op == "MatMul" and all(isinstance(t, gs.Variable) and t.inputs for t in n.inputs[:2])))
        for n in graph.nodes)
    return "transformer" if attention else "cnn"


def reached(graph: gs.Graph, composite: Composite, output: str | None = None, source: str = "model",
            hidden: Mapping[str, gs.Tensor] = {}) -> tuple[set[int], Head]:
    """The ids of the nodes that relevance reaches from the explained logits (those the walk gives a rule; the
    others, such as shapes and a norm's sigma, are constants to it), and the head skipped above them."""
    x, _ = explained_input(graph, source)
    head = classifier(graph, output, source, hidden)
    rule = composite.assign(graph)
    names, found = {head.logits.name}, set()
    with on_data_path(data_path(graph, [x], lambda node: detaches(node, rule))):
        for node in reversed(graph.nodes):
            if any(t.name in names for t in node.outputs) and any(computed(t) for t in node.inputs):
                found.add(id(node))
                names.update(t.name for t in node.inputs if computed(t))
    return found, head


def _classifier_output(graph: gs.Graph, name: str | None, source: str, hidden: Mapping[str, gs.Tensor]
                       ) -> gs.Variable:
    """The output named `name`, or the first floating-point output of shape [N, C] (or input of a ZipMap), else
    the first of shape [N, T, C] (a language model's logits)."""
    if name is not None:
        chosen = next((t for t in graph.outputs if t.name == name), None) or graph.tensors().get(name)
        if chosen is None and name in hidden:
            raise LrpError(f"{source}: tensor '{name}' is not a computed float tensor of shape [N, C] that the walk "
                           f"sees (it lies inside a written-out softmax, norm or activation)")
        if chosen is None:
            raise LrpError(f"{source}: --classifier-output: no tensor named '{name}' in the graph (it takes any "
                           f"float tensor of shape [N, C]; outputs: {', '.join(t.name for t in graph.outputs)})")
        if not isinstance(chosen, gs.Variable) or not (_matrix(chosen) or _sequence(chosen) or
                                                       head_of(graph, chosen) is not None):
            raise LrpError(f"{source}: tensor '{name}' is not a computed float tensor of shape [N, C] or [N, T, C]")
        return chosen
    # scikit-learn's converters hide the probabilities behind a ZipMap (a sequence of maps) of a [N, C] input,
    # whose shape inference may not know (after ai.onnx.ml ops).
    for tensor in graph.outputs:
        if _matrix(tensor):
            return tensor
    zipped = [n.inputs[0] for n in graph.nodes if n.op == "ZipMap"]
    if zipped:
        return zipped[0]
    sequences = [t for t in graph.outputs if _sequence(t)]
    if sequences:
        return sequences[0]
    raise LrpError(f"{source}: no floating-point output of shape [N, C] or [N, T, C] to explain")


def _matrix(tensor: gs.Tensor) -> bool:
    """Whether a tensor is known to be a float tensor of rank 2."""
    return floating(tensor) and tensor.shape is not None and len(tensor.shape) == 2


def _sequence(tensor: gs.Tensor) -> bool:
    """Whether a tensor is known to be a float tensor of rank 3 (one row of logits per position)."""
    return floating(tensor) and tensor.shape is not None and len(tensor.shape) == 3


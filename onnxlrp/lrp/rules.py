"""LRP rules as data, and the one four-step skeleton (docs/lrp.md §1) that turns a rule into graph ops.

A rule is a list of groups; a group is a list of terms that share one denominator. A term is one modified
forward pass of the layer: which input it reads, how it changes the weight and the bias, and its sign.

    z = sum_t sign_t * forward(input_t, weight_t, bias_t)      # step 1, per group
    s = R / stab(z)                                             # step 2
    c = backward(s, weight_t)                                   # step 3: the layer's input-gradient
    R_lower = sum_groups scale * sum_t sign_t * input_t * c     # step 4

A rule without groups (pass, wta) routes relevance by the layer's own gradient, R_lower = J^T R: for layers that
copy or select elements, steps 2 and 4 cancel (a * J^T (R / z) = J^T R), as Zennit's Pass leaves the gradient as
it is. Every emitter describes its node as a layer (lrp/emitters/) and `propagate` applies the node's rule to it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence, Union

import numpy as np
import onnx_graphsurgeon as gs

from ..errors import LrpError
from ..ir.ops import Ops, Tensor, other_factor
from .families import Context, Unsupported

Coefficient = Union[float, Callable[[Mapping[str, float]], float]]


@dataclass(frozen=True)
class Modifier:
    """A modified parameter `same * p + positive * p+` (p: a weight or a bias), computed in the graph from the
    model's own parameter; `kind` names the two that are not of that form ("ones", "square")."""
    same: Coefficient = 1.0
    positive: Coefficient = 0.0
    kind: str = "linear"

    def coefficients(self, params: Mapping[str, float]) -> tuple[float, float]:
        return tuple(float(c(params) if callable(c) else c) for c in (self.same, self.positive))


SAME = Modifier()
POSITIVE = Modifier(0.0, 1.0)
NEGATIVE = Modifier(1.0, -1.0)  # p- = p - p+
GAMMA_UP = Modifier(1.0, lambda p: p["gamma"])  # p + gamma p+
GAMMA_DOWN = Modifier(lambda p: 1 + p["gamma"], lambda p: -p["gamma"])  # p + gamma p- = (1 + gamma) p - gamma p+
ONES = Modifier(kind="ones")
SQUARE = Modifier(kind="square")
QUARTER_SQUARE = Modifier(0.25, kind="square")  # p^2 / 4: the midpoint rule's root term (below)


@dataclass(frozen=True)
class Term:
    """One modified forward pass. `input`: x, pos (x+), neg (x-), ones, low or high; bias None drops it."""
    input: str
    weight: Modifier = SAME
    bias: Modifier | None = SAME
    sign: int = 1


@dataclass(frozen=True)
class Group:
    """Terms sharing a denominator. `gate` keeps relevance only where the layer's own output is > 0 (pos)
    or < 0 (neg); `z_sign` is the known sign of the denominator; `scale` is a number or a parameter name
    ("-beta": minus that parameter)."""
    terms: tuple[Term, ...]
    scale: str | float = 1.0
    gate: str | None = None
    z_sign: int | None = None

    @property
    def sign(self) -> int | None:
        """The sign of the denominator where relevance is kept (a gate fixes it: z > 0 implies z_pos > 0)."""
        return {"pos": 1, "neg": -1}.get(self.gate, self.z_sign)


@dataclass(frozen=True)
class Rule:
    """A rule: its groups of modified forward passes (none: relevance follows the layer's gradient), the parameter
    that stabilizes its denominators, the parameters it reads and those it fixes. `absorbs`: a constant added to
    one computed tensor keeps its share of the relevance (false for `norm`, where it passes it on unchanged);
    `detaches`: gates and attention weights are constants (CP-LRP), so a product with one is linear in the other
    factor and nothing reaches what computed them. `second_order`: a product also gets the relevance of pairs of
    its factors' input features (lrp/pairs.py)."""
    name: str
    groups: tuple[Group, ...] = ()
    stabilizer: str = "stabilizer"  # the parameter used as epsilon of the stabilizer
    params: tuple[str, ...] = ()
    fixed: Mapping[str, float] = field(default_factory=dict)
    absorbs: bool = True
    detaches: bool = False
    second_order: bool = False

    @property
    def routes(self) -> bool:
        """Whether relevance follows the layer's gradient unchanged (no denominator: pass, wta)."""
        return not self.groups

    @property
    def plain(self) -> bool:
        """Whether the rule is one group of the unmodified layer (epsilon, zero, norm ...): z is the layer's output."""
        return self.groups == (Group((PLAIN,)),)

    @property
    def keeps_zeros(self) -> bool:
        """Whether the lower relevance is the input times something (every term reads x, x+ or x-), so 0 where
        the input is 0; flat, w-square and zbox's bounds give relevance to inputs that are 0."""
        return all(term.input in ("x", "pos", "neg") for group in self.groups for term in group.terms)


PLAIN = Term("x")
ONE_GROUP = (Group((PLAIN,)),)
RULES: dict[str, Rule] = {rule.name: rule for rule in (
    Rule("epsilon", ONE_GROUP, stabilizer="epsilon", params=("epsilon", "epsilon_scale")),
    Rule("zero", ONE_GROUP, stabilizer="epsilon", fixed={"epsilon": 0.0, "epsilon_scale": 0.0}),
    Rule("norm", ONE_GROUP, params=("stabilizer",), absorbs=False),
    Rule("zplus", (Group((Term("pos", POSITIVE, POSITIVE), Term("neg", NEGATIVE, None)), z_sign=1),),
         params=("stabilizer",)),
    Rule("alpha_beta", (
        Group((Term("pos", POSITIVE, POSITIVE), Term("neg", NEGATIVE, None)), scale="alpha", z_sign=1),
        Group((Term("pos", NEGATIVE, NEGATIVE), Term("neg", POSITIVE, None)), scale="-beta", z_sign=-1),
    ), params=("alpha", "beta", "stabilizer")),
    Rule("gamma", (
        Group((Term("pos", GAMMA_UP, GAMMA_UP), Term("neg", GAMMA_DOWN, None)), gate="pos"),
        Group((Term("pos", GAMMA_DOWN, GAMMA_DOWN), Term("neg", GAMMA_UP, None)), gate="neg"),
    ), params=("gamma", "stabilizer")),
    Rule("zbox", (Group((Term("x", SAME, None), Term("low", POSITIVE, None, -1),
                         Term("high", NEGATIVE, None, -1))),), params=("low", "high", "stabilizer")),
    Rule("flat", (Group((Term("ones", ONES, None),), z_sign=1),), params=("stabilizer",)),
    Rule("wsquare", (Group((Term("ones", SQUARE, SQUARE),), z_sign=1),), params=("stabilizer",)),
    # Relevance follows the gradient: shape-preserving and routing layers, and MaxPool's winner-take-all.
    Rule("pass"),
    Rule("wta"),
    # Arithmetic (docs/attnlrp.md §3): constants keep their share; under `stop` gates are constants too.
    Rule("absorb", ONE_GROUP, params=("stabilizer",)),
    Rule("stop", ONE_GROUP, params=("stabilizer",), detaches=True),
    # AttnLRP's softmax rule (Prop. 3.1) is exact: no stabilizer.
    Rule("softmax", ONE_GROUP, fixed={"stabilizer": 0.0}),
    # NEON's midpoint rule for a k-means model (Kauffmann et al. 2022, docs/rules.md): on the discriminant between
    # clusters c and k, scores 2 mu . x - |mu|^2, each input keeps (x_i - m_i) w_i of z, m the midpoint of the two
    # centroids: the pass on x without bias less the pass on ones with w^2 / 4 (w m = (w_c^2 - w_k^2) / 4).
    Rule("midpoint", (Group((Term("x", SAME, None), Term("ones", QUARTER_SQUARE, None, -1))),),
         params=("stiffness", "stabilizer")),
    # One-class DTD's min-pooling (Kauffmann et al. 2020): relevance follows the gradient of a soft-min whose
    # stiffness is `stiffness` times the pooling's own, min-take-most.
    Rule("minpool", params=("stiffness",)),
    # Pairwise matching (Montavon et al. 2019, section 10.4): a product of two ReLU'd projections keeps today's
    # product rule and adds relevance_pairs, the plain rule on the bilinear layer of the outer product (lrp/pairs.py).
    Rule("pairs", ONE_GROUP, stabilizer="epsilon", params=("epsilon",), second_order=True),
)}

DEFAULTS = {"epsilon": 1e-6, "stabilizer": 1e-6, "gamma": 0.25, "alpha": 2.0, "beta": 1.0, "low": 0.0, "high": 1.0,
            "epsilon_scale": 0.0, "stiffness": 1.0}
VECTOR_PARAMS = ("low", "high")
NONNEGATIVE_PARAMS = ("epsilon", "stabilizer", "gamma", "alpha", "beta", "epsilon_scale", "stiffness")


def parse_value(key: str, value: object, where: str) -> float | tuple[float, ...]:
    """One rule parameter, checked on its own: a finite number (epsilon, stabilizer, gamma, alpha and beta also
    >= 0), or for low/high also a list of per-channel numbers (or "a,b,c")."""
    if isinstance(value, str):
        try:
            value = [float(v) for v in value.split(",")]
        except ValueError:
            raise LrpError(f"{where}: {key} must be a number or comma-separated numbers (got '{value}')") from None
        value = value[0] if len(value) == 1 else value
    numbers = (int, float)
    if (isinstance(value, (list, tuple)) and key in VECTOR_PARAMS and value
            and all(isinstance(v, numbers) and not isinstance(v, bool) for v in value)):
        return tuple(_checked(key, v, where) for v in value)
    if isinstance(value, numbers) and not isinstance(value, bool):
        return _checked(key, value, where)
    raise LrpError(f"{where}: {key} must be a number" + (" or a list of numbers" if key in VECTOR_PARAMS else ""))


def _checked(key: str, value: int | float, where: str) -> float:
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise LrpError(f"{where}: {key} must be a finite number (got {value if abs(number) != math.inf else number})")
    if number < 0 and key in NONNEGATIVE_PARAMS:
        needs = "alpha_beta needs alpha, beta >= 0" if key in ("alpha", "beta") else f"{key} must be >= 0"
        raise LrpError(f"{where}: {needs} (got {key}={number:g})")
    return number


def check_params(rule: str, params: Mapping[str, object], where: str) -> None:
    """Reject parameter values that make a rule meaningless together (each value was checked by `parse_value`),
    naming where they came from."""
    used = RULES[rule].params
    if "alpha" in used and abs(params["alpha"] - params["beta"] - 1) > 1e-9:
        raise LrpError(f"{where}: alpha_beta needs alpha - beta = 1 and alpha, beta >= 0 "
                       f"(got alpha={params['alpha']}, beta={params['beta']})")
    if "low" not in used:
        return
    sizes = [np.size(params[key]) for key in VECTOR_PARAMS]
    if min(sizes) > 1 and sizes[0] != sizes[1]:
        raise LrpError(f"{where}: low and high (--low/--high) give {sizes[0]} and {sizes[1]} values: give 1 value "
                       "or one per channel to each, the same number")
    if np.any(np.asarray(params["low"]) > np.asarray(params["high"])):
        raise LrpError(f"{where}: zbox needs low <= high")


class Layer:
    """A node as the skeleton sees it. Emitters describe each node as one of the kinds below; `propagate` applies
    the node's rule to it."""

    def passes(self, rule: Rule) -> bool:
        """Whether relevance follows the layer's gradient unchanged under `rule` (then `route` gives it)."""
        return rule.routes

    def route(self, ops: Ops, rule: Rule, relevance: Sequence[Tensor | None]) -> list[Tensor | None]:
        """J^T R per node input, from the relevance of each node output (`rule` may say how R is shared)."""
        raise Unsupported("this layer has no gradient to route relevance by")


class OfNode:
    """A layer that is one node of the graph: x is its first input, z its first output."""
    node: gs.Node

    @property
    def x(self) -> Tensor:
        return self.node.inputs[0]

    @property
    def output(self) -> Tensor:
        return self.node.outputs[0]

    @property
    def arity(self) -> int:
        return len(self.node.inputs)


class Routing(Layer):
    """A layer that moves relevance (copies, selections, elementwise activations): every rule is its gradient."""

    def passes(self, rule: Rule) -> bool:
        return True


class Weighted(Layer):
    """One computed input `x` (the node's first) and parameters the rule modifies (None where it has none): linear
    layers and pooling. `output` is z, the unmodified layer's output; `forward` and `backward` (its input-gradient)
    take (modified) parameter tensors."""
    x: Tensor
    output: Tensor
    arity: int = 1  # the node's number of inputs

    def parameters(self) -> tuple[Tensor | None, Tensor | None]:
        return None, None

    def forward(self, ops: Ops, x: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
        raise NotImplementedError

    def backward(self, ops: Ops, s: Tensor, weight: Tensor | None) -> Tensor:
        raise NotImplementedError

    def constant_input(self, ops: Ops, values: np.ndarray) -> Tensor:
        raise Unsupported("this layer has no weights for rules with constant inputs")


class Shared(Layer):
    """Computed inputs that share one denominator, the layer's output z (sums, products of two tensors, a norm, the
    softmax): c = backward(R / stab(z)) per input, R_i = inputs_i * c_i, summed by `fit` over the axes along which
    input i was broadcast."""
    inputs: Sequence[Tensor | None]  # None for inputs that get no relevance
    output: Tensor
    stabilizer: str | None = None  # the parameter that stabilizes z, where not the rule's own

    def backward(self, ops: Ops, s: Tensor) -> list[Tensor | None]:
        raise NotImplementedError

    def exact_backward(self, ops: Ops, relevance: Tensor) -> list[Tensor | None] | None:
        """backward(R / z) in closed form, where z is a factor of the layer's gradient (the softmax), else None."""
        return None

    def fit(self, ops: Ops, index: int, relevance: Tensor) -> Tensor:
        return relevance


def propagate(ctx: Context, node: gs.Node, layer: Layer, relevance: Sequence[Tensor | None]) -> list[Tensor | None]:
    """Apply the node's rule to its layer (one relevance per node output, one result per node input)."""
    rule, params = ctx.rule(node)
    if layer.passes(rule):
        return layer.route(ctx.ops, rule, relevance)
    params = {**params, **rule.fixed}
    if isinstance(layer, Weighted):
        lower = _weighted(ctx.ops, layer, relevance[0], rule, params, ctx.nonnegative(layer.x),
                          ctx.rectified(layer.output))
        return [lower] + [None] * (layer.arity - 1)
    return _shared(ctx, layer, relevance[0], params[layer.stabilizer or rule.stabilizer])


def _shared(ctx: Context, layer: Shared, relevance: Tensor, epsilon: float) -> list[Tensor | None]:
    """The four steps with the layer's own output as the denominator (step 1 is the forward pass)."""
    ops = ctx.ops
    gradients = layer.exact_backward(ops, relevance) if epsilon == 0 else None
    if gradients is None:
        s = ops.divide_stabilized(relevance, layer.output, epsilon, rectified=ctx.rectified(layer.output))
        gradients = layer.backward(ops, s)
    return [layer.fit(ops, index, times(ctx, a, c)) if a is not None and c is not None else None
            for index, (a, c) in enumerate(zip(layer.inputs, gradients))]


def times(ctx: Context, a: Tensor, c: Tensor) -> Tensor:
    """a * c, and 0 where c is 0 if `a` may be infinite (scores masked with -inf before a softmax)."""
    product = ctx.ops("Mul", a, c)
    return product if ctx.finite(a) else ctx.ops.zero_where_zero(c, product)


def _weighted(ops: Ops, layer: Weighted, relevance: Tensor, rule: Rule, params: Mapping[str, object],
              nonnegative: bool, rectified: Tensor | None) -> Tensor:
    """The groups of `rule` on one layer with one computed input, terms that vanish left out.
    `rectified`: ReLU(output) where the relevance is 0 wherever output <= 0 (see Ops.divide_stabilized)."""
    x, output = layer.x, layer.output
    inputs = _inputs(ops, layer, x, params, nonnegative, rule)
    live = [(group, [t for t in group.terms if inputs[t.input] is not None]) for group in rule.groups]
    live = [(group, terms) for group, terms in live if terms and _scale(group.scale, params) != 0]
    modified = _modifier_cache(ops, params)
    if all(_reads_x(layer, terms, inputs, x) for _, terms in live):
        return _on_x(ops, layer, x, output, relevance, rule, params, live, modified, rectified)
    epsilon = params[rule.stabilizer]
    weight, bias = layer.parameters()
    contributions = []
    for group, terms in live:
        if rectified is not None and group.gate == "neg":
            continue  # relevance only where z > 0: none for a group kept where z < 0
        scale = _scale(group.scale, params)
        weights = [modified(weight, t.weight) for t in terms]
        z = ops.add_all([_signed(ops, t.sign, layer.forward(ops, inputs[t.input], w, modified(bias, t.bias)))
                         for t, w in zip(terms, weights)])
        stabilizer = _scaled(ops, z, output, epsilon, params, rule)
        s = _gated(ops, group, output, ops.divide_stabilized(relevance, z, stabilizer, group.sign))
        parts = []
        for term, w in zip(terms, weights):
            c = layer.backward(ops, s, w)
            parts.append(_signed(ops, term.sign, c if term.input == "ones" else ops("Mul", inputs[term.input], c)))
        total = ops.add_all(parts)
        contributions.append(total if scale == 1 else ops("Mul", total, ops.scalar(scale)))
    return ops.add_all(contributions)


def _on_x(ops: Ops, layer: Weighted, x: Tensor, output: Tensor, relevance: Tensor, rule: Rule, params,
          live, modified, rectified: Tensor | None) -> Tensor:
    """Rules whose terms all read x and modify weight and bias alike (a W + b W+): each group's denominator is
    A z + B z+, with z the layer's own output and z+ = forward(x, W+, b+), and each group has one transposed pass
    of its own weight, scale * (A W + B W+). With the forward, that is 2 passes (epsilon), 3 (z+) or 4 (gamma,
    alpha-beta); the weights are constants of the graph, so combining them costs nothing per run.

    z+ is computed once as c z+ + e, c the first group's B and e its signed stabilizer (in the bias), which every
    group's denominator reuses when the groups mirror each other (gamma, alpha-beta): then no stabilizer op."""
    epsilon = params[rule.stabilizer]
    weight, bias = layer.parameters()
    basis = [(group, _scale(group.scale, params), *_sum_coefficients(terms, params)) for group, terms in live]
    c, sign = next(((b, group.sign) for group, _, _, b in basis if b != 0), (0.0, None))
    folded = c != 0 and sign is not None and all(
        b == 0 or group.sign is not None and group.sign * c == sign * b for group, _, _, b in basis)
    positive_part = None
    if c != 0:
        shift = sign * epsilon if folded else 0.0
        positive_bias = modified(bias, Modifier(0.0, c))
        if shift and bias is None:
            folded, shift = False, 0.0  # no bias to carry the stabilizer: each group adds it
        if shift:
            positive_bias = ops("Add", positive_bias, ops.scalar(shift))
        positive_part = layer.forward(ops, x, modified(weight, Modifier(0.0, c)), positive_bias)

    def backward(s: Tensor, scale: float, a: float, b: float) -> Tensor:
        if weight is None:
            gradient = layer.backward(ops, s, None)
            return gradient if scale == 1 else ops("Mul", gradient, ops.scalar(scale))
        return layer.backward(ops, s, modified(weight, Modifier(scale * a, scale * b)))

    mirrored = _mirrored(basis, c) if folded and epsilon > 0 else None
    if mirrored:
        # Gamma: z + t where z > 0 and -(A z - t) where z < 0 are one LeakyRelu of z plus t (t = c z+ + e > 0).
        (up, up_scale, up_a, up_b), (down, down_scale, down_a, down_b) = mirrored
        if rectified is not None:
            # Relevance only where z > 0: the down group gets none and the up gate keeps all. Its denominator
            # z + t is ReLU(z) + t there, and > 0 everywhere, so no gate is needed against 0/0: one pass fewer.
            q = ops("Div", relevance, ops("Add", rectified, positive_part))
            return ops("Mul", x, backward(q, up_scale, up_a, up_b))
        q = ops("Div", relevance, ops("Add", ops("LeakyRelu", output, alpha=-down_a), positive_part))
        q_up = _gated(ops, up, output, q)
        # A relevance computed as z * c is 0 where z is, so where z < 0 q is what the up gate leaves: one Sub.
        q_down = ops("Sub", q, q_up) if other_factor(relevance, output) is not None else _gated(ops, down, output, q)
        parts = [backward(q_up, up_scale, up_a, up_b), backward(q_down, -down_scale, down_a, down_b)]
        return ops("Mul", x, ops.add_all(parts))
    parts = []
    for group, scale, a, b in basis:
        z = _combine(ops, [(a, output), (b / c if b else 0.0, positive_part)])
        if folded and b != 0 and epsilon > 0:
            if a != 0:  # z - z+ (alpha-beta) may cancel to 0 or the wrong sign in float: clamp to the known sign
                z = ops("Min" if group.sign < 0 else "Max", z, ops.scalar(group.sign * epsilon))
            s = ops("Div", relevance, z)
        else:
            s = ops.divide_stabilized(relevance, z, _scaled(ops, z, output, epsilon, params, rule), group.sign,
                                      rectified if z is output else None)
        parts.append(backward(_gated(ops, group, output, s), scale, a, b))
    return ops("Mul", x, ops.add_all(parts))


def _mirrored(basis, c: float):
    """The (pos, neg) pair of gated groups whose denominators are z + t and A z - t, t = c z+ + e, if so."""
    gates = {item[0].gate: item for item in basis}
    if len(basis) != 2 or set(gates) != {"pos", "neg"}:
        return None
    up, down = gates["pos"], gates["neg"]
    if up[2] == 1 and up[3] == c and down[3] == -c and down[2] > 0:
        return up, down
    return None


def _reads_x(layer: Weighted, terms: list[Term], inputs: dict[str, Tensor | None], x: Tensor) -> bool:
    """Whether every term reads x itself and modifies weight and bias alike (linearly in p and p+)."""
    weight, bias = layer.parameters()
    return all(inputs[t.input] is x and t.weight.kind == "linear" and t.sign == 1
               and (t.bias == t.weight or (t.bias is None and bias is None))
               and (weight is not None or t.weight == SAME) for t in terms)


def _sum_coefficients(terms: list[Term], params) -> tuple[float, float]:
    pairs = [t.weight.coefficients(params) for t in terms]
    return sum(a for a, _ in pairs), sum(b for _, b in pairs)


def _gated(ops: Ops, group: Group, output: Tensor, s: Tensor) -> Tensor:
    """Keep s only where the layer's output has the group's gate sign (after the division: 0/0 cannot leak)."""
    if not group.gate:
        return s
    kept = ops("Greater" if group.gate == "pos" else "Less", output, ops.scalar(0.0))
    return ops("Where", kept, s, ops.scalar(0.0))


def _combine(ops: Ops, terms: list[tuple[float, Tensor | None]]) -> Tensor | None:
    """sum of coefficient * tensor with the fewest ops (no Mul for 1, a Sub for -1); None when all vanish."""
    terms = sorted(((c, t) for c, t in terms if c != 0 and t is not None), key=lambda ct: ct[0] < 0)
    if not terms:
        return None
    coefficient, total = terms[0]
    total = total if coefficient == 1 else ops("Mul", total, ops.scalar(coefficient))
    for coefficient, tensor in terms[1:]:
        if coefficient == -1:
            total = ops("Sub", total, tensor)
        else:
            total = ops("Add", total, tensor if coefficient == 1 else ops("Mul", tensor, ops.scalar(coefficient)))
    return total


def _inputs(ops: Ops, layer: Weighted, x: Tensor, params, nonnegative: bool, rule: Rule) -> dict[str, Tensor | None]:
    """The inputs the rule's terms read; x- is None when x is known to be non-negative."""
    used = {t.input for g in rule.groups for t in g.terms}
    inputs: dict[str, Tensor | None] = {"x": x}
    if "pos" in used:
        inputs["pos"] = x if nonnegative else ops.positive(x)
        inputs["neg"] = None if nonnegative else ops.negative(x)
    for name in used & {"ones", "low", "high"}:
        value = 1.0 if name == "ones" else params[name]
        inputs[name] = layer.constant_input(ops, np.asarray(value, dtype=np.float64))
    return inputs


def _modifier_cache(ops: Ops, params) -> Callable[[Tensor | None, Modifier | None], Tensor | None]:
    """Modified parameters as graph ops on the model's own parameter (ONNX Runtime folds them once, when the
    session starts, so the file stores no copies), made once per (tensor, modification)."""
    cache: dict[tuple, Tensor] = {}

    def modified(tensor, modifier):
        if tensor is None or modifier is None:
            return None
        key = (tensor.name, modifier.kind, modifier.coefficients(params))
        if key not in cache:
            cache[key] = _modify(ops, tensor, modifier, params)
        return cache[key]
    return modified


def _modify(ops: Ops, tensor: Tensor, modifier: Modifier, params) -> Tensor:
    if modifier.kind == "ones":
        return ops("Expand", ops.scalar(1.0), ops.ints(tensor.shape))
    if modifier.kind == "square":
        scale = modifier.coefficients(params)[0]
        squared = ops("Mul", tensor, tensor)
        return squared if scale == 1 else ops("Mul", squared, ops.scalar(scale))
    same, positive = modifier.coefficients(params)
    if (same, positive) == (1.0, -1.0):
        return ops.negative(tensor)
    return _combine(ops, [(same, tensor), (positive, ops.positive(tensor) if positive else None)])


def _scaled(ops: Ops, z: Tensor, output: Tensor, epsilon: float, params, rule: Rule) -> float | Tensor:
    """The stabilizer's epsilon; with `epsilon_scale` (epsilon rule) plus that many times the root mean square of z
    over the non-batch axes of each sample, computed in the graph (Zennit's `Stabilizer(norm_scale=True)`)."""
    scale = params.get("epsilon_scale", 0.0) if "epsilon_scale" in rule.params else 0.0
    if not scale:
        return epsilon
    if output.shape is None:
        raise Unsupported("epsilon_scale needs the rank of the layer's output")
    return ops.scaled_epsilon(z, len(output.shape), epsilon, scale)


def _scale(scale: str | float, params) -> float:
    if isinstance(scale, str):
        return -params[scale[1:]] if scale.startswith("-") else params[scale]
    return scale


def _signed(ops: Ops, sign: int, tensor: Tensor) -> Tensor:
    return tensor if sign == 1 else ops("Neg", tensor)

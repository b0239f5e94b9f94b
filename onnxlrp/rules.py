"""LRP rules as data, and the one four-step skeleton (LRP.md §1) that turns a rule into graph ops.

A rule is a list of groups; a group is a list of terms that share one denominator. A term is one modified
forward pass of the layer: which input it reads, how it changes the weight and the bias, and its sign.

    z = sum_t sign_t * forward(input_t, weight_t, bias_t)      # per group
    s = R / stab(z)
    R_lower = sum_groups scale * sum_t sign_t * input_t * backward(s, weight_t)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Protocol, Union

import numpy as np

from .errors import LrpError
from .ops import Ops, Tensor
from .registry import Unsupported

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
    """A rule for layers that have a forward and a backward (input-gradient) pass."""
    name: str
    groups: tuple[Group, ...]
    stabilizer: str = "stabilizer"  # the parameter used as epsilon of the stabilizer
    params: tuple[str, ...] = ()
    fixed: Mapping[str, float] = field(default_factory=dict)

    @property
    def keeps_zeros(self) -> bool:
        """Whether the lower relevance is the input times something (every term reads x, x+ or x-), so 0 where
        the input is 0; flat, w-square and zbox's bounds give relevance to inputs that are 0."""
        return all(term.input in ("x", "pos", "neg") for group in self.groups for term in group.terms)


PLAIN = Term("x")
RULES: dict[str, Rule] = {rule.name: rule for rule in (
    Rule("epsilon", (Group((PLAIN,)),), stabilizer="epsilon", params=("epsilon", "epsilon_scale")),
    Rule("zero", (Group((PLAIN,)),), stabilizer="epsilon", fixed={"epsilon": 0.0, "epsilon_scale": 0.0}),
    Rule("norm", (Group((PLAIN,)),), params=("stabilizer",)),
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
)}

DEFAULTS = {"epsilon": 1e-6, "stabilizer": 1e-6, "gamma": 0.25, "alpha": 2.0, "beta": 1.0, "low": 0.0, "high": 1.0,
            "epsilon_scale": 0.0}


def check_params(rule: str, params: Mapping[str, object], where: str) -> None:
    """Reject parameter values that make a rule meaningless, naming where they came from."""
    if rule == "alpha_beta":
        alpha, beta = params["alpha"], params["beta"]
        if alpha < 0 or beta < 0 or abs(alpha - beta - 1) > 1e-9:
            raise LrpError(f"{where}: alpha_beta needs alpha - beta = 1 and alpha, beta >= 0 "
                           f"(got alpha={alpha}, beta={beta})")
    if rule == "gamma" and params["gamma"] < 0:
        raise LrpError(f"{where}: gamma must be >= 0 (got {params['gamma']})")
    for name in ("epsilon", "stabilizer", "epsilon_scale"):
        if name in RULES[rule].params and params[name] < 0:
            raise LrpError(f"{where}: {name} must be >= 0 (got {params[name]})")
    if rule == "zbox" and np.any(np.asarray(params["low"]) > np.asarray(params["high"])):
        raise LrpError(f"{where}: zbox needs low <= high")


class Layer(Protocol):
    """What the skeleton needs of a layer: its parameters as graph tensors (None where it has none), a forward
    pass and its input-gradient, both taking (modified) parameter tensors."""

    def parameters(self) -> tuple[Tensor | None, Tensor | None]: ...

    def forward(self, ops: Ops, x: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor: ...

    def backward(self, ops: Ops, s: Tensor, weight: Tensor | None) -> Tensor: ...

    def constant_input(self, ops: Ops, values: np.ndarray) -> Tensor: ...


def propagate(ops: Ops, layer: Layer, x: Tensor, output: Tensor, relevance: Tensor, rule: Rule,
              params: Mapping[str, object], nonnegative: bool, rectified: Tensor | None = None) -> Tensor:
    """Apply `rule` to one layer: the four steps of LRP.md §1, once per group, terms that vanish left out.
    `rectified`: ReLU(output) where the relevance is 0 wherever output <= 0 (see Ops.divide_stabilized)."""
    params = {**params, **rule.fixed}
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


def _on_x(ops: Ops, layer: Layer, x: Tensor, output: Tensor, relevance: Tensor, rule: Rule, params,
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
        q = ops("Div", relevance, ops("Add", ops("LeakyRelu", output, alpha=-down_a), positive_part))
        parts = [backward(_gated(ops, up, output, q), up_scale, up_a, up_b),
                 backward(_gated(ops, down, output, q), -down_scale, down_a, down_b)]
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


def _reads_x(layer: Layer, terms: list[Term], inputs: dict[str, Tensor | None], x: Tensor) -> bool:
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


def _inputs(ops: Ops, layer: Layer, x: Tensor, params, nonnegative: bool, rule: Rule) -> dict[str, Tensor | None]:
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
        key = (tensor.name, modifier.kind, modifier.coefficients(params) if modifier.kind == "linear" else None)
        if key not in cache:
            cache[key] = _modify(ops, tensor, modifier, params)
        return cache[key]
    return modified


def _modify(ops: Ops, tensor: Tensor, modifier: Modifier, params) -> Tensor:
    if modifier.kind == "ones":
        return ops("Expand", ops.scalar(1.0), ops.ints(tensor.shape))
    if modifier.kind == "square":
        return ops("Mul", tensor, tensor)
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

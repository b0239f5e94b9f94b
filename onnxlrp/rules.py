"""LRP rules as data, and the one four-step skeleton (LRP.md §1) that turns a rule into graph ops.

A rule is a list of groups; a group is a list of terms that share one denominator. A term is one modified
forward pass of the layer: which input it reads, how it changes the weight and the bias, and its sign.

    z = sum_t sign_t * forward(input_t, weight_t, bias_t)      # per group
    s = R / stab(z)
    R_lower = sum_groups scale * sum_t sign_t * input_t * backward(s, weight_t)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Protocol

import numpy as np
import onnx_graphsurgeon as gs

from .errors import LrpError
from .ops import Ops, Tensor
from .registry import Unsupported

Modifier = Callable[[np.ndarray, Mapping[str, float]], np.ndarray]


def same(w, p):
    return w


def positive(w, p):
    return np.maximum(w, 0)


def negative(w, p):
    return np.minimum(w, 0)


def gamma_up(w, p):
    return w + p["gamma"] * np.maximum(w, 0)


def gamma_down(w, p):
    return w + p["gamma"] * np.minimum(w, 0)


def ones(w, p):
    return np.ones_like(w)


def square(w, p):
    return w ** 2


@dataclass(frozen=True)
class Term:
    """One modified forward pass. `input`: x, pos (x+), neg (x-), ones, low or high; bias None drops it."""
    input: str
    weight: Modifier = same
    bias: Modifier | None = same
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


@dataclass(frozen=True)
class Rule:
    """A rule for layers that have a forward and a backward (input-gradient) pass."""
    name: str
    groups: tuple[Group, ...]
    stabilizer: str = "stabilizer"  # the parameter used as epsilon of the stabilizer
    params: tuple[str, ...] = ()
    fixed: Mapping[str, float] = field(default_factory=dict)


PLAIN = Term("x")
RULES: dict[str, Rule] = {rule.name: rule for rule in (
    Rule("epsilon", (Group((PLAIN,)),), stabilizer="epsilon", params=("epsilon", "epsilon_scale")),
    Rule("zero", (Group((PLAIN,)),), stabilizer="epsilon", fixed={"epsilon": 0.0, "epsilon_scale": 0.0}),
    Rule("norm", (Group((PLAIN,)),), params=("stabilizer",)),
    Rule("zplus", (Group((Term("pos", positive, positive), Term("neg", negative, None)), z_sign=1),),
         params=("stabilizer",)),
    Rule("alpha_beta", (
        Group((Term("pos", positive, positive), Term("neg", negative, None)), scale="alpha", z_sign=1),
        Group((Term("pos", negative, negative), Term("neg", positive, None)), scale="-beta", z_sign=-1),
    ), params=("alpha", "beta", "stabilizer")),
    Rule("gamma", (
        Group((Term("pos", gamma_up, gamma_up), Term("neg", gamma_down, None)), gate="pos"),
        Group((Term("pos", gamma_down, gamma_down), Term("neg", gamma_up, None)), gate="neg"),
    ), params=("gamma", "stabilizer")),
    Rule("zbox", (Group((Term("x", same, None), Term("low", positive, None, -1),
                         Term("high", negative, None, -1))),), params=("low", "high", "stabilizer")),
    Rule("flat", (Group((Term("ones", ones, None),), z_sign=1),), params=("stabilizer",)),
    Rule("wsquare", (Group((Term("ones", square, square),), z_sign=1),), params=("stabilizer",)),
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
    """What the skeleton needs of a layer: its parameters, a forward pass and its input-gradient."""
    weight: np.ndarray | None
    bias: np.ndarray | None

    def forward(self, ops: Ops, x: Tensor, weight: np.ndarray | None, bias: np.ndarray | None) -> Tensor: ...

    def backward(self, ops: Ops, s: Tensor, weight: np.ndarray | None) -> Tensor: ...

    def constant_input(self, ops: Ops, values: np.ndarray) -> Tensor: ...


def propagate(ops: Ops, layer: Layer, x: Tensor, output: Tensor, relevance: Tensor, rule: Rule,
              params: Mapping[str, object], nonnegative: bool) -> Tensor:
    """Apply `rule` to one layer: the four steps of LRP.md §1, once per group, terms that vanish left out."""
    params = {**params, **rule.fixed}
    inputs = _inputs(ops, layer, x, params, nonnegative, rule)
    epsilon = params[rule.stabilizer]
    modified = _modifier_cache(params)
    contributions = []
    for group in rule.groups:
        scale = _scale(group.scale, params)
        terms = [t for t in group.terms if inputs[t.input] is not None]
        if scale == 0 or not terms:
            continue
        weights = [modified(layer.weight, t.weight) for t in terms]
        if terms == [PLAIN]:
            z = output  # the forward pass's own pre-activation
        else:
            z = ops.add_all([_signed(ops, t.sign, layer.forward(ops, inputs[t.input], w,
                                                                modified(layer.bias, t.bias)))
                             for t, w in zip(terms, weights)])
        upper = relevance
        if group.gate:
            kept = ops("Greater" if group.gate == "pos" else "Less", output, ops.scalar(0.0))
            upper = ops("Where", kept, relevance, ops.scalar(0.0))
        s = ops.divide_stabilized(upper, z, _scaled(ops, z, output, epsilon, params, rule), group.z_sign)
        parts = []
        for term, weight in zip(terms, weights):
            c = layer.backward(ops, s, weight)
            parts.append(_signed(ops, term.sign, c if term.input == "ones" else ops("Mul", inputs[term.input], c)))
        total = ops.add_all(parts)
        contributions.append(total if scale == 1 else ops("Mul", total, ops.scalar(scale)))
    return ops.add_all(contributions)


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


def _modifier_cache(params) -> Callable[[np.ndarray | None, Modifier | None], np.ndarray | None]:
    """Modify parameters once per (array, modifier), so groups that share a modified weight share its constant."""
    cache: dict[tuple[int, Modifier], np.ndarray] = {}

    def modified(values, modifier):
        if values is None or modifier is None:
            return None
        key = (id(values), modifier)
        if key not in cache:
            cache[key] = modifier(values, params)
        return cache[key]
    return modified


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

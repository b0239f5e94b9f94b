"""A user's stabilizer (and epsilon) reaches every rule's denominator with the sign docs/lrp.md §2 gives it.

The defaults (1e-6) hardly change a relevance map, so a stabilizer that is ignored, replaced by the default or
added with the wrong sign passes every parity test. Here it is large (0.1) on small Conv/Relu/MaxPool/Gemm chains
whose pre-activations are of order one, and the built graph is compared, layer by layer, with the float64 numpy
LRP of tests/lrp_numpy.py. The first layer reads an input of mixed sign (every a- term counts); the layers after
a ReLU read a non-negative input, where onnxlrp drops the a- terms and folds the stabilizer into the modified bias.
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

import onnxlrp
from conftest import make_model, onnxlrp_cli, relative_error, run
from lrp_numpy import lrp_chain

LARGE = 0.1
# float32 graph against float64 numpy: measured at most 2.3e-7 per layer (every case below), so 1e-6; the large
# stabilizer moves the relevance by 6e-2 to 1.1 (relative L2), five orders of magnitude above it.
TOLERANCE = 1e-6
LINEAR = ("conv0", "conv1", "dense")
TARGET = np.array([-1, 2, 0, 4])
# Per channel zbox bounds for the two input channels; the input is drawn inside them.
LOW, HIGH = (-1.5, -0.5), (1.0, 2.0)


def chain(rng, bias: bool = True, rectified_input: bool = False) -> onnx.ModelProto:
    """[Relu ->] Conv 3x3 (pads 1) -> Relu -> Conv 3x3 (pads 1) -> Relu -> MaxPool 2 -> Flatten -> Gemm (transB)."""
    init = {"w0": rng.normal(size=(4, 2, 3, 3)) / 3, "w1": rng.normal(size=(4, 4, 3, 3)) / 5,
            "wd": rng.normal(size=(5, 4 * 3 * 3)) / 4}
    if bias:
        init.update(b0=rng.normal(size=4) * 0.3, b1=rng.normal(size=4) * 0.3, bd=rng.normal(size=5) * 0.3)
    b = (lambda name: [name]) if bias else (lambda name: [])
    first = "r_in" if rectified_input else "input"
    nodes = [helper.make_node("Relu", ["input"], ["r_in"], name="relu_in")] if rectified_input else []
    nodes += [
        helper.make_node("Conv", [first, "w0"] + b("b0"), ["c0"], name="conv0", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c0"], ["r0"], name="relu0"),
        helper.make_node("Conv", ["r0", "w1"] + b("b1"), ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("MaxPool", ["r1"], ["p1"], name="pool1", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["p1"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "wd"] + b("bd"), ["logits"], name="dense", transB=1),
    ]
    return make_model(nodes, [1, 2, 6, 6], [1, 5], init)


def box_input(rng) -> np.ndarray:
    """Mixed sign, inside the per-channel box [LOW, HIGH] (so zbox's denominators are >= 0 as the rule assumes)."""
    low, high = (np.array(v).reshape(1, 2, 1, 1) for v in (LOW, HIGH))
    return (low + (high - low) * rng.uniform(size=(len(TARGET), 2, 6, 6))).astype(np.float32)


# case: (composite, overrides beside stabilizer and epsilon, numpy rule per linear layer (conv0, conv1, dense)).
GAMMA, ALPHA_BETA = ("gamma", {"gamma": 0.25}), ("alpha_beta", {"alpha": 2.0, "beta": 1.0})
CASES = {
    "gamma": ("gamma", {}, [GAMMA] * 3),
    "zplus": ("zplus", {}, [("zplus", {})] * 3),
    "alpha_beta": ("alpha2_beta1", {}, [ALPHA_BETA] * 3),
    "zbox": ("epsilon_gamma_box", {"low": -1.5, "high": 2.0},
             [("zbox", {"low": -1.5, "high": 2.0}), GAMMA, ("epsilon", {})]),
    "zbox_per_channel": ("epsilon_gamma_box", {"low": LOW, "high": HIGH},
                         [("zbox", {"low": LOW, "high": HIGH}), GAMMA, ("epsilon", {})]),
    "flat": ("epsilon_plus_flat", {}, [("flat", {}), ("zplus", {}), ("epsilon", {})]),
    "alpha_beta_flat": ("epsilon_alpha2_beta1_flat", {}, [("flat", {}), ALPHA_BETA, ("epsilon", {})]),
    "epsilon": ("epsilon", {}, [("epsilon", {})] * 3),
}


def numpy_rules(rules, stabilizer: float, epsilon: float) -> dict:
    per_layer = {name: (rule, {**params, "stabilizer": stabilizer, "epsilon": epsilon})
                 for name, (rule, params) in zip(LINEAR, rules)}
    return {**per_layer, "pool1": ("wta", {})}


def layer_outputs(model: onnx.ModelProto, x: np.ndarray) -> dict[str, np.ndarray]:
    names = [f"relevance/{name}" for name in LINEAR]
    return dict(zip(LINEAR, run(model, {"input": x, "target": TARGET}, names)))


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("case", CASES)
def test_large_stabilizer_matches_numpy_layer_by_layer(case, bias):
    """Every linear layer's lower relevance (`layer_relevance`), not only the input's: a stabilizer lost in one
    layer of three would be diluted in the input relevance. zbox and the flat first layer read no a- terms."""
    rng = np.random.default_rng(7)
    source = chain(rng, bias)
    x = box_input(rng)
    composite, overrides, rules = CASES[case]
    built = onnxlrp.build(source, composite, layer_relevance=True, stabilizer=LARGE, epsilon=LARGE, **overrides)
    found = layer_outputs(built, x)
    _, expected, per_layer = lrp_chain(source, x, TARGET, numpy_rules(rules, LARGE, LARGE))
    _, default, default_layers = lrp_chain(source, x, TARGET, numpy_rules(rules, 1e-6, 1e-6))
    # The large stabilizer really changes the result, in every layer (so matching to TOLERANCE means it is used).
    assert relative_error(default, expected) > 1e-2
    for name in LINEAR:
        assert relative_error(default_layers[name], per_layer[name]) > 1e-3, name
        assert relative_error(found[name], per_layer[name]) < TOLERANCE, name


@pytest.mark.parametrize("case", ["gamma", "zplus", "alpha_beta"])
def test_large_stabilizer_on_a_non_negative_first_layer(case):
    """A ReLU on the input: every linear layer reads a non-negative input, so onnxlrp drops all a- terms and
    puts the (signed) stabilizer into the modified bias of every layer; numpy computes the full formula."""
    rng = np.random.default_rng(11)
    source = chain(rng, bias=True, rectified_input=True)
    x = rng.normal(size=(len(TARGET), 2, 6, 6)).astype(np.float32)
    composite, overrides, rules = CASES[case]
    built = onnxlrp.build(source, composite, layer_relevance=True, stabilizer=LARGE, **overrides)
    found = layer_outputs(built, x)
    _, expected, per_layer = lrp_chain(source, x, TARGET, numpy_rules(rules, LARGE, 1e-6))
    _, default, _ = lrp_chain(source, x, TARGET, numpy_rules(rules, 1e-6, 1e-6))
    assert relative_error(default, expected) > 1e-2
    for name in LINEAR:
        assert relative_error(found[name], per_layer[name]) < TOLERANCE, name


def test_stabilizer_from_a_composite_file_through_the_command(tmp_path):
    """`[params] stabilizer` of a TOML composite, built by `onnxlrp build` in a fresh process: w-square first,
    alpha-beta on the other convolution, gamma on the dense layer; epsilon is not set and stays 1e-6."""
    rng = np.random.default_rng(5)
    source = chain(rng)
    onnx.save(source, tmp_path / "chain.onnx")
    (tmp_path / "mine.toml").write_text(
        f'[params]\nstabilizer = {LARGE}\ngamma = 0.5\n\n'
        '[[layers]]\nfirst_linear = true\nrule = "wsquare"\n\n'
        '[[layers]]\nop_types = ["Conv"]\nrule = "alpha_beta"\n\n'
        '[[layers]]\nop_types = ["Gemm"]\nrule = "gamma"\n')
    result = onnxlrp_cli("build", tmp_path / "chain.onnx", "-o", tmp_path / "out.onnx",
                         "--composite", tmp_path / "mine.toml")
    assert result.returncode == 0, result.stderr
    x = box_input(rng)
    relevance = run(onnx.load(tmp_path / "out.onnx"), {"input": x, "target": TARGET}, ["relevance"])[0]
    rules = [("wsquare", {}), ALPHA_BETA, ("gamma", {"gamma": 0.5})]
    _, expected, _ = lrp_chain(source, x, TARGET, numpy_rules(rules, LARGE, 1e-6))
    _, default, _ = lrp_chain(source, x, TARGET, numpy_rules(rules, 1e-6, 1e-6))
    assert relative_error(default, expected) > 1e-2
    assert relative_error(relevance, expected) < TOLERANCE


def test_explainer_passes_the_stabilizer_on():
    """`Explainer(plain model, stabilizer=...)` builds with it: compared with numpy, not with `build`."""
    rng = np.random.default_rng(3)
    source = chain(rng)
    x = box_input(rng)
    _, relevance = onnxlrp.Explainer(source, composite="zplus", stabilizer=LARGE).explain(x, TARGET)
    _, expected, _ = lrp_chain(source, x, TARGET, numpy_rules([("zplus", {})] * 3, LARGE, 1e-6))
    assert relative_error(relevance, expected) < TOLERANCE


def test_alpha_beta_where_a_layer_has_no_negative_part():
    """Non-negative input, weights and bias: alpha-beta's negative part is exactly 0, and onnxlrp computes it
    as z - (z+ + stabilizer), which float32 rounds to 0 (or a wrong sign) when z is large. The denominator must
    keep the stabilizer's sign (numpy: 0 + 1e-6, and the terms it divides are 0): finite, numpy's relevance."""
    rng = np.random.default_rng(0)
    init = {"w0": np.abs(rng.normal(size=(4, 3, 3, 3))), "b0": np.abs(rng.normal(size=4)),
            "wd": rng.normal(size=(3, 4 * 4 * 4)) / 4, "bd": rng.normal(size=3) * 0.1}
    nodes = [helper.make_node("Relu", ["input"], ["r"], name="relu_in"),
             helper.make_node("Conv", ["r", "w0", "b0"], ["c0"], name="conv0", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c0"], ["r0"], name="relu0"),
             helper.make_node("Flatten", ["r0"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "wd", "bd"], ["logits"], name="dense", transB=1)]
    source = make_model(nodes, [1, 3, 4, 4], [1, 3], init)
    x = (rng.uniform(size=(8, 3, 4, 4)) * 100).astype(np.float32)  # pre-activations of order 1e3
    target = np.full(8, -1)
    relevance = run(onnxlrp.build(source, "alpha2_beta1"), {"input": x, "target": target}, ["relevance"])[0]
    assert np.all(np.isfinite(relevance))
    _, expected, _ = lrp_chain(source, x, target, {name: ALPHA_BETA for name in ("conv0", "dense")})
    assert relative_error(relevance, expected) < TOLERANCE  # measured 2e-7

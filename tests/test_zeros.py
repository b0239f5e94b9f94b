"""Denominators of layers whose output feeds only a ReLU are ReLU(z) + epsilon where relevance reaches the ReLU
only where it is non-zero (zeros.py), and the relevance stays that of z + epsilon sign0(z) (numpy, float64)."""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
import pytest
from onnx import helper

import onnxlrp
from conftest import make_model, run
from lrp_numpy import Conv, lrp_chain
from onnxlrp.lrp.walk import Walk as Builder
from onnxlrp.ir.ops import Ops

EPSILON = 0.1  # large enough that a denominator of -epsilon where +epsilon belongs would show


def chain(rng):
    """conv0, ReLU, 2x2 MaxPool, conv1, ReLU, Flatten, dense; conv0's bias leaves whole windows at 0."""
    init = {"w0": rng.normal(size=(3, 2, 3, 3)), "b0": np.array([-4.0, 0.5, -0.5]),
            "w1": rng.normal(size=(4, 3, 3, 3)), "b1": rng.normal(size=4),
            "wd": rng.normal(size=(3, 4 * 3 * 3)), "bd": rng.normal(size=3)}
    nodes = [helper.make_node("Conv", ["input", "w0", "b0"], ["z0"], name="conv0", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["z0"], ["a0"], name="relu0"),
             helper.make_node("MaxPool", ["a0"], ["p0"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Conv", ["p0", "w1", "b1"], ["z1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["z1"], ["a1"], name="relu1"),
             helper.make_node("Flatten", ["a1"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "wd", "bd"], ["logits"], name="dense", transB=1)]
    return make_model(nodes, [1, 2, 6, 6], [1, 3], init)


def rectified(model, composite: onnxlrp.Composite) -> set[str]:
    """The tensors whose ReLU the builder uses as their denominator."""
    graph = gs.import_onnx(model)
    builder = Builder(graph, composite, Ops(graph, graph.opset), graph.inputs[0])
    return {name for name, tensor in graph.tensors().items() if builder.rectified(tensor) is not None}


@pytest.mark.parametrize("conv1_rule", ["epsilon", "zbox"])
def test_relu_denominators_keep_the_relevance(rng, tmp_path, conv1_rule):
    """Under epsilon everywhere both convolutions' outputs feed a ReLU whose relevance vanishes with it (through
    the MaxPool's winners); zbox on conv1 gives relevance to inputs that are 0, so conv0 keeps its sign."""
    source = chain(rng)
    path = tmp_path / "composite.toml"
    path.write_text(f'[params]\nepsilon = {EPSILON}\nlow = -1.0\nhigh = 1.0\n\n'
                    f'[[layers]]\nnames = ["conv1"]\nrule = "{conv1_rule}"\n\n'
                    '[[layers]]\nop_types = ["Conv", "Gemm"]\nrule = "epsilon"\n')
    composite = onnxlrp.load_composite(str(path))
    assert rectified(source, composite) == ({"z0", "z1"} if conv1_rule == "epsilon" else {"z1"})
    x = rng.normal(size=(2, 2, 6, 6)).astype(np.float32)
    target = np.array([0, 2])
    params = {"epsilon": EPSILON, "low": -1.0, "high": 1.0}
    rules = {"conv0": ("epsilon", params), "conv1": (conv1_rule, params), "dense": ("epsilon", params),
             "pool": ("wta", {})}
    logits, expected, _ = lrp_chain(source, x, target, rules)
    assert (logits != 0).all() and np.any(np.maximum(x, 0).sum() > 0)
    relevance = run(onnxlrp.build(source, composite), {"input": x, "target": target}, ["relevance"])[0]
    np.testing.assert_allclose(relevance, expected, rtol=1e-4, atol=1e-6 * np.abs(expected).max())


def convolutions(model, layer: str) -> int:
    """The convolutions the relevance graph runs for `layer`: modified forward passes and transposed passes."""
    return sum(node.op_type in ("Conv", "ConvTranspose") for node in model.graph.node
               if node.name.startswith(f"lrp/{layer}/"))


@pytest.mark.parametrize("layer", ["conv0", "conv1"])
def test_gamma_on_a_relu_layer_leaves_out_the_group_of_negative_outputs(rng, tmp_path, layer):
    """Gamma keeps relevance where z > 0 through W + gamma W+ and where z < 0 through W + gamma W-; a layer whose
    output feeds only such a ReLU gets relevance only where z > 0, so the second group is left out: conv1 (a
    non-negative input: z+ and one transposed pass, 2 convolutions where both groups took 3) and conv0 (x of both
    signs: the group's two forward and two transposed passes, 4 where both took 8). The relevance is the numpy
    reference's, which keeps both groups."""
    source = chain(rng)
    path = tmp_path / "composite.toml"
    path.write_text(f'[params]\nepsilon = {EPSILON}\ngamma = 0.25\nstabilizer = {EPSILON}\n\n'
                    f'[[layers]]\nnames = ["{layer}"]\nrule = "gamma"\n\n'
                    '[[layers]]\nop_types = ["Conv", "Gemm"]\nrule = "epsilon"\n')
    x = rng.normal(size=(2, 2, 6, 6)).astype(np.float32)
    target = np.array([1, 2])
    params = {"epsilon": EPSILON, "gamma": 0.25, "stabilizer": EPSILON}
    rules = {"conv0": ("epsilon", params), "conv1": ("epsilon", params), "dense": ("epsilon", params),
             "pool": ("wta", {}), layer: ("gamma", params)}
    _, expected, _ = lrp_chain(source, x, target, rules)
    built = onnxlrp.build(source, onnxlrp.load_composite(str(path)))
    assert convolutions(built, layer) == {"conv0": 4, "conv1": 2}[layer]
    relevance = run(built, {"input": x, "target": target}, ["relevance"])[0]
    np.testing.assert_allclose(relevance, expected, rtol=1e-4, atol=1e-6 * np.abs(expected).max())


def test_a_relevance_of_z_times_c_needs_no_sign_of_z(rng):
    """conv0 feeds conv1 directly, so conv0's relevance is z0 * c (conv1's input times its transposed pass), and
    z0 c / (z0 + epsilon sign0(z0)) is computed as c |z0| / (|z0| + epsilon): no comparison and Where for the
    sign, and the relevance of the numpy reference, whose z0 takes both signs."""
    init = {"w0": rng.normal(size=(3, 2, 3, 3)), "b0": rng.normal(size=3),
            "w1": rng.normal(size=(4, 3, 3, 3)), "b1": rng.normal(size=4),
            "wd": rng.normal(size=(3, 4 * 6 * 6)), "bd": rng.normal(size=3)}
    nodes = [helper.make_node("Conv", ["input", "w0", "b0"], ["z0"], name="conv0", pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["z0", "w1", "b1"], ["z1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["z1"], ["a1"], name="relu1"),
             helper.make_node("Flatten", ["a1"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "wd", "bd"], ["logits"], name="dense", transB=1)]
    source = make_model(nodes, [1, 2, 6, 6], [1, 3], init)
    built = onnxlrp.build(source, "epsilon", epsilon=EPSILON)
    ops = [node.op_type for node in built.graph.node if node.name.startswith("lrp/conv0/")]
    assert "Abs" in ops and "Where" not in ops
    x = rng.normal(size=(2, 2, 6, 6)).astype(np.float32)
    target = np.array([0, 2])
    params = {"epsilon": EPSILON}
    z0 = Conv(init["w0"], init["b0"], 1).forward(x.astype(np.float64))
    assert (z0 < -EPSILON).any() and (z0 > EPSILON).any()
    rules = {name: ("epsilon", params) for name in ("conv0", "conv1", "dense")}
    _, expected, _ = lrp_chain(source, x, target, rules)
    relevance = run(built, {"input": x, "target": target}, ["relevance"])[0]
    np.testing.assert_allclose(relevance, expected, rtol=1e-4, atol=1e-6 * np.abs(expected).max())


def test_gamma_on_a_relevance_of_z_times_c_gates_once(rng, tmp_path):
    """conv1 (gamma, a non-negative input) feeds conv2 directly, so its relevance is z1 * c and 0 where z1 is 0:
    the part for z1 < 0 is q less the part for z1 > 0 (a Sub), one gate fewer; the numpy reference gates both."""
    init = {"w0": rng.normal(size=(3, 2, 3, 3)), "b0": rng.normal(size=3),
            "w1": rng.normal(size=(4, 3, 3, 3)), "b1": rng.normal(size=4),
            "w2": rng.normal(size=(4, 4, 3, 3)), "b2": rng.normal(size=4),
            "wd": rng.normal(size=(3, 4 * 6 * 6)), "bd": rng.normal(size=3)}
    nodes = [helper.make_node("Conv", ["input", "w0", "b0"], ["z0"], name="conv0", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["z0"], ["a0"], name="relu0"),
             helper.make_node("Conv", ["a0", "w1", "b1"], ["z1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["z1", "w2", "b2"], ["z2"], name="conv2", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["z2"], ["a2"], name="relu2"),
             helper.make_node("Flatten", ["a2"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "wd", "bd"], ["logits"], name="dense", transB=1)]
    source = make_model(nodes, [1, 2, 6, 6], [1, 3], init)
    path = tmp_path / "composite.toml"
    path.write_text(f'[params]\nepsilon = {EPSILON}\ngamma = 0.25\nstabilizer = {EPSILON}\n\n'
                    '[[layers]]\nnames = ["conv1"]\nrule = "gamma"\n\n'
                    '[[layers]]\nop_types = ["Conv", "Gemm"]\nrule = "epsilon"\n')
    built = onnxlrp.build(source, onnxlrp.load_composite(str(path)))
    ops = [node.op_type for node in built.graph.node if node.name.startswith("lrp/conv1/")]
    assert ops.count("Where") == 1 and "Sub" in ops and "Less" not in ops
    x = rng.normal(size=(2, 2, 6, 6)).astype(np.float32)
    target = np.array([2, 0])
    params = {"epsilon": EPSILON, "gamma": 0.25, "stabilizer": EPSILON}
    rules = {"conv0": ("epsilon", params), "conv1": ("gamma", params), "conv2": ("epsilon", params),
             "dense": ("epsilon", params)}
    _, expected, _ = lrp_chain(source, x, target, rules)
    relevance = run(built, {"input": x, "target": target}, ["relevance"])[0]
    np.testing.assert_allclose(relevance, expected, rtol=1e-4, atol=1e-6 * np.abs(expected).max())

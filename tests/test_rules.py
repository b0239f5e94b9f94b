"""Properties of the rules (docs/lrp.md §7) on small graphs built here with numpy weights."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

import onnxlrp
from conftest import explain, finite_difference_gradient, make_model, relative_error, run


def relu_mlp(rng, bias: bool):
    sizes = [12, 16, 10, 4]
    nodes, init, previous = [], {}, "input"
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        init[f"w{i}"] = rng.normal(size=(n_in, n_out)) / np.sqrt(n_in)
        inputs = [previous, f"w{i}"]
        if bias:
            init[f"b{i}"] = rng.normal(size=n_out) * 0.1
            inputs.append(f"b{i}")
        last = i == len(sizes) - 2
        out = "logits" if last else f"z{i}"
        nodes.append(helper.make_node("Gemm", inputs, [out], name=f"dense{i}"))
        if not last:
            nodes.append(helper.make_node("Relu", [out], [f"a{i}"], name=f"relu{i}"))
            previous = f"a{i}"
    return make_model(nodes, [1, sizes[0]], [1, sizes[-1]], init)


def relu_cnn(rng, bias: bool, opset: int = 17):
    """Conv (stride 2, asymmetric pads), overlapping MaxPool, AveragePool, 1-D flatten and a dense head."""
    init = {"w0": rng.normal(size=(4, 2, 3, 3)) / 3, "w1": rng.normal(size=(6, 4, 3, 3)) / 6,
            "wd": rng.normal(size=(6 * 2 * 2, 3)) / 5}
    if bias:
        init.update(b0=rng.normal(size=4) * 0.1, b1=rng.normal(size=6) * 0.1, bd=rng.normal(size=3) * 0.1)
    b = (lambda name: [name]) if bias else (lambda name: [])
    nodes = [
        helper.make_node("Conv", ["input", "w0"] + b("b0"), ["c0"], name="conv0", pads=[1, 1, 0, 0], strides=[2, 2]),
        helper.make_node("Relu", ["c0"], ["r0"], name="relu0"),
        helper.make_node("MaxPool", ["r0"], ["p0"], name="pool0", kernel_shape=[3, 3], strides=[1, 1], pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["p0", "w1"] + b("b1"), ["c1"], name="conv1", auto_pad="SAME_UPPER", kernel_shape=[3, 3]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("AveragePool", ["r1"], ["p1"], name="pool1", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["p1"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "wd"] + b("bd"), ["logits"], name="dense"),
    ]
    return make_model(nodes, [1, 2, 9, 8], [1, 3], init, opset=opset)


NETS = {"mlp": (relu_mlp, [12]), "cnn": (relu_cnn, [2, 9, 8])}


@pytest.mark.parametrize("net", NETS)
def test_zero_rule_conserves_the_logit_without_biases(net, rng):
    factory, shape = NETS[net]
    model = explain(factory(rng, bias=False), "zero")
    x = rng.normal(size=[5, *shape]).astype(np.float32)
    target = np.array([0, 1, 2, 1, -1])
    logits, relevance = run(model, {"input": x, "target": target})
    chosen = np.where(target < 0, logits.argmax(1), target)
    explained = logits[np.arange(5), chosen]
    # 1e-5 of the logits' scale: float32 sums, and pooling's `norm` keeps its 1e-6 stabilizer.
    np.testing.assert_allclose(relevance.reshape(5, -1).sum(1), explained, rtol=0, atol=1e-5 * np.abs(logits).max())


@pytest.mark.parametrize("net", NETS)
def test_uniform_zero_is_gradient_times_input(net, rng):
    """Checked against a finite-difference gradient of the original model (biases included)."""
    factory, shape = NETS[net]
    source = factory(rng, bias=True)
    x = rng.normal(size=[1, *shape]).astype(np.float32)
    _, relevance = run(explain(source, "zero"), {"input": x, "target": np.array([1])})
    assert relative_error(relevance, x * finite_difference_gradient(source, x, 1)) < 1e-3


def test_alpha1_beta0_equals_zplus(rng):
    source = relu_cnn(rng, bias=True)
    x = rng.normal(size=[2, 2, 9, 8]).astype(np.float32)
    _, zplus = run(explain(source, "zplus"), {"input": x})
    _, alpha_beta = run(explain(source, "alpha2_beta1", alpha=1.0, beta=0.0), {"input": x})
    assert relative_error(alpha_beta, zplus) < 1e-6


def test_zero_inputs_get_zero_relevance(rng):
    x = rng.normal(size=[3, 12]).astype(np.float32)
    x[:, [2, 7]] = 0
    _, relevance = run(explain(relu_mlp(rng, bias=True), "epsilon"), {"input": x})
    assert np.all(relevance[:, [2, 7]] == 0) and np.all(relevance[:, [0, 1]] != 0)


def test_epsilon_reuses_the_forward_pre_activation(rng):
    source = relu_mlp(rng, bias=True)
    model = explain(source, "epsilon")
    # One forward Gemm and one input-gradient Gemm per layer: no recomputed forward pass.
    assert [n.op_type for n in model.graph.node].count("Gemm") == 2 * 3


def test_negative_parts_are_dropped_after_relu(rng):
    """z+ needs x- only where the input may be negative: the first layer, not after a ReLU."""
    model = explain(relu_cnn(rng, bias=True), "zplus")
    scopes = {n.name.split("/")[1] for n in model.graph.node if n.op_type == "Min"}
    assert scopes == {"conv0"}


def test_larger_epsilon_absorbs_more_relevance(rng):
    source = relu_mlp(rng, bias=False)
    x = rng.normal(size=[4, 12]).astype(np.float32)
    totals = [np.abs(run(explain(source, "epsilon", epsilon=e), {"input": x})[1]).sum() for e in (1e-6, 1.0)]
    assert totals[1] < 0.9 * totals[0]


def test_flat_spreads_relevance_uniformly_over_a_dense_input(rng):
    source = relu_mlp(rng, bias=True)
    x = rng.normal(size=[2, 12]).astype(np.float32)
    logits, relevance = run(explain(source, "epsilon_plus_flat"), {"input": x})
    # The first layer is dense and flat: every input feature gets the same share.
    np.testing.assert_allclose(relevance, np.repeat(relevance[:, :1], 12, axis=1), rtol=1e-5)


def single_dense(rng):
    init = {"w": rng.normal(size=(6, 3)), "b": rng.normal(size=3)}
    return make_model([helper.make_node("Gemm", ["input", "w", "b"], ["logits"], name="dense")], [1, 6], [1, 3],
                      init), init


def test_wsquare_and_flat_on_a_dense_layer(rng, tmp_path):
    source, init = single_dense(rng)
    x = rng.normal(size=[2, 6]).astype(np.float32)
    logits = run(source, {"input": x})[0]
    target = np.array([0, 2])
    explained = logits[np.arange(2), target][:, None]
    squares = init["w"] ** 2
    expected = {"wsquare": explained * (squares / (squares.sum(0) + init["b"] ** 2))[:, target].T,
                "flat": np.repeat(explained / 6, 6, axis=1)}
    for rule, values in expected.items():
        path = tmp_path / f"{rule}.toml"
        path.write_text(f'[[layers]]\nop_types = ["Gemm"]\nrule = "{rule}"\n')
        _, relevance = run(explain(source, str(path)), {"input": x, "target": target})
        np.testing.assert_allclose(relevance, values, rtol=1e-5, atol=1e-7)


def stabilized(z, epsilon):
    return z + epsilon * np.where(z >= 0, 1.0, -1.0)


def numpy_epsilon_lrp_logodds(model, x, target, epsilon=1e-6):
    """docs/lrp.md §5 written out in float64 numpy for a Gemm/Relu chain: pairwise differences on the last layer."""
    weights = {t.name: onnx.numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    layers = [(weights[n.input[1]], weights[n.input[2]]) for n in model.graph.node if n.op_type == "Gemm"]
    activations = [x.astype(np.float64)]
    for w, b in layers[:-1]:
        activations.append(np.maximum(activations[-1] @ w + b, 0))
    w, b = layers[-1]
    logits = activations[-1] @ w + b
    relevance_rows = []
    for n, c in enumerate(target):
        a = activations[-1][n]
        others = [k for k in range(w.shape[1]) if k != c]
        w_pairs, b_pairs = w[:, [c]] - w[:, others], b[c] - b[others]
        z = a @ w_pairs + b_pairs
        softmin = np.exp(-z - (-z).max()) / np.exp(-z - (-z).max()).sum()
        relevance = a * (w_pairs @ (z * softmin / stabilized(z, epsilon)))
        for (w_low, b_low), a_low in zip(reversed(layers[:-1]), reversed(activations[:-1])):
            z_low = a_low[n] @ w_low + b_low
            relevance = a_low[n] * (w_low @ (relevance / stabilized(z_low, epsilon)))
        relevance_rows.append(relevance)
    return np.array(relevance_rows), logits


def test_logodds_matches_the_pairwise_formula(rng):
    source = relu_mlp(rng, bias=True)
    x = rng.normal(size=[4, 12]).astype(np.float32)
    target = np.array([0, 3, 1, 2])
    model = explain(source, "epsilon", explain="logodds")
    _, relevance = run(model, {"input": x, "target": target})
    expected, _ = numpy_epsilon_lrp_logodds(source, x, target)
    assert relative_error(relevance, expected) < 1e-4


def test_logodds_refuses_a_top_layer_rule_it_cannot_express(rng):
    with pytest.raises(onnxlrp.LrpError, match="logodds supports the epsilon or zero rule"):
        explain(relu_mlp(rng, bias=True), "zplus", explain="logodds")


def test_max_pool_as_sum_pooling_when_the_composite_says_norm(rng, tmp_path):
    init = {"w": rng.normal(size=(2 * 2 * 2, 3))}
    nodes = [helper.make_node("MaxPool", ["input"], ["p"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "w"], ["logits"], name="dense")]
    source = make_model(nodes, [1, 2, 4, 4], [1, 3], init)
    composite = tmp_path / "norm_pool.toml"
    composite.write_text('[[layers]]\nop_types = ["MaxPool"]\nrule = "norm"\n\n'
                         '[[layers]]\nop_types = ["Gemm"]\nrule = "zero"\n')
    x = rng.uniform(0.1, 1.0, size=[1, 2, 4, 4]).astype(np.float32)
    logits, relevance = run(explain(source, str(composite)), {"input": x})
    c = logits.argmax()
    pooled = x.reshape(2, 2, 2, 2, 2).max(axis=(2, 4))
    upper = (pooled.reshape(-1) * init["w"][:, c]).reshape(2, 2, 2)  # LRP-0 on the dense layer
    sums = x.reshape(2, 2, 2, 2, 2).sum(axis=(2, 4))
    share = np.repeat(np.repeat(upper / sums, 2, axis=1), 2, axis=2)
    np.testing.assert_allclose(relevance[0], x[0] * share, rtol=1e-4, atol=1e-7)
    # The default, winner-take-all, gives each window's relevance to its maximum only.
    _, winners = run(explain(source, "zero"), {"input": x})
    assert np.count_nonzero(winners) == 8
    np.testing.assert_allclose(winners.sum(), relevance.sum(), rtol=1e-5)


def test_max_pool_that_already_outputs_its_indices(rng):
    """The dynamo exporter may keep MaxPool's Indices output; the winner-take-all rule reads it."""
    plain = relu_cnn(np.random.default_rng(3), bias=True)
    with_indices = relu_cnn(np.random.default_rng(3), bias=True)
    pool = next(n for n in with_indices.graph.node if n.op_type == "MaxPool")
    pool.output.append("pool_indices")
    x = rng.normal(size=[2, 2, 9, 8]).astype(np.float32)
    np.testing.assert_array_equal(run(explain(with_indices, "epsilon_plus"), {"input": x})[1],
                                  run(explain(plain, "epsilon_plus"), {"input": x})[1])

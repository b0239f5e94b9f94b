"""Canonicalisation and BatchNorm folding: the built model computes the same outputs, and uniform LRP-0 on it
equals gradient x input of the original model (an independent check of every emitter's backward pass)."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import onnxlrp
from conftest import explain, finite_difference_gradient, make_model, relative_error, run


def constant_node(name, values):
    return helper.make_node("Constant", [], [name], name=f"const_{name}",
                            value=numpy_helper.from_array(np.asarray(values, dtype=np.float32)))


def batchnorm(rng, name, channels, init):
    for part, values in (("scale", rng.uniform(0.5, 1.5, channels)), ("bias", rng.normal(size=channels) * 0.1),
                         ("mean", rng.normal(size=channels) * 0.1), ("var", rng.uniform(0.5, 1.5, channels))):
        init[f"{name}_{part}"] = values
    return [f"{name}_{p}" for p in ("scale", "bias", "mean", "var")]


def dense_idioms(rng):
    """transA/transB/alpha/beta, weights from Constant nodes, Identity, Dropout, MatMul+Add, Softmax head."""
    w0 = rng.normal(size=(16, 12)) / 4  # stored transposed: transB = 1
    nodes = [
        constant_node("w0", w0), constant_node("c0", rng.normal(size=(1, 16)) * 0.1),
        helper.make_node("Transpose", ["input"], ["xt"], name="transpose", perm=[1, 0]),
        helper.make_node("Gemm", ["xt", "w0", "c0"], ["z0"], name="gemm", transA=1, transB=1, alpha=0.7, beta=1.5),
        helper.make_node("BatchNormalization", ["z0"] + batchnorm(rng, "bn", 16, init := {}), ["n0"], name="bn"),
        helper.make_node("Relu", ["n0"], ["a0"], name="relu"),
        helper.make_node("Identity", ["a0"], ["i0"], name="identity"),
        helper.make_node("Dropout", ["i0"], ["d0"], name="dropout"),
        helper.make_node("MatMul", ["d0", "w1"], ["m1"], name="matmul"),
        helper.make_node("Add", ["m1", "b1"], ["logits"], name="add"),
        helper.make_node("Softmax", ["logits"], ["probs"], name="softmax", axis=1),
    ]
    init.update(w1=rng.normal(size=(16, 5)) / 4, b1=rng.normal(size=5) * 0.1)
    return make_model(nodes, [1, 12], [1, 5], init, output="probs")


def conv_idioms(rng):
    """Conv1d with auto_pad, depthwise conv + BN, ConvTranspose with output_shape + BN, global pooling."""
    init = {"w0": rng.normal(size=(4, 2, 3)) / 3, "b0": rng.normal(size=4) * 0.1,
            "wd": rng.normal(size=(4, 1, 3)) / 2,
            "wf": rng.normal(size=(6, 3)) / 2}
    nodes = [
        helper.make_node("Conv", ["input", "w0", "b0"], ["c0"], name="conv", auto_pad="SAME_LOWER", strides=[2]),
        helper.make_node("Relu", ["c0"], ["r0"], name="relu0"),
        helper.make_node("Conv", ["r0", "wd"], ["c1"], name="depthwise", group=4, pads=[1, 1]),
        helper.make_node("BatchNormalization", ["c1"] + batchnorm(rng, "bn1", 4, init), ["n1"], name="bn1"),
        helper.make_node("Relu", ["n1"], ["r1"], name="relu1"),
        helper.make_node("ConvTranspose", ["r1", "wt"], ["t2"], name="deconv", group=2, strides=[2],
                         output_shape=[13]),
        helper.make_node("BatchNormalization", ["t2"] + batchnorm(rng, "bn2", 6, init), ["n2"], name="bn2"),
        helper.make_node("Relu", ["n2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "wf"], ["logits"], name="head"),
    ]
    init["wt"] = rng.normal(size=(4, 3, 3)) / 3  # grouped: 2 groups of 2 -> 3 channels
    return make_model(nodes, [1, 2, 11], [1, 3], init)


def conv3d(rng):
    init = {"w0": rng.normal(size=(3, 1, 2, 3, 3)) / 3, "w1": rng.normal(size=(3 * 2 * 2 * 2, 2)) / 3}
    nodes = [
        helper.make_node("Conv", ["input", "w0"], ["c0"], name="conv3d", strides=[1, 2, 2], dilations=[1, 1, 2]),
        helper.make_node("Relu", ["c0"], ["r0"], name="relu"),
        helper.make_node("MaxPool", ["r0"], ["p0"], name="pool", kernel_shape=[2, 2, 2], strides=[2, 2, 2],
                         ceil_mode=1),
        helper.make_node("Constant", [], ["shape"], name="shape", value=numpy_helper.from_array(np.array([-1, 24]))),
        helper.make_node("Reshape", ["p0", "shape"], ["f"], name="reshape"),
        helper.make_node("Gemm", ["f", "w1"], ["logits"], name="head"),
    ]
    return make_model(nodes, [1, 1, 4, 7, 9], [1, 2], init)


IDIOMS = {"dense": (dense_idioms, [12], "probs"), "conv": (conv_idioms, [2, 11], "logits"),
          "conv3d": (conv3d, [1, 4, 7, 9], "logits")}


@pytest.mark.parametrize("idiom", IDIOMS)
def test_outputs_kept_and_zero_rule_is_gradient_times_input(idiom, rng):
    factory, shape, output = IDIOMS[idiom]
    source = factory(rng)
    x = rng.normal(size=[1, *shape]).astype(np.float32)
    model = explain(source, "zero")
    expected = run(source, {"input": x})[0]
    produced, relevance = run(model, {"input": x, "target": np.array([1])}, [output, "relevance"])
    np.testing.assert_allclose(produced, expected, rtol=1e-5, atol=1e-6)
    # The explained tensor is the logits, before the Softmax.
    logits_output = "logits" if idiom != "dense" else None
    if idiom == "dense":
        probe = onnx.ModelProto()
        probe.CopyFrom(source)
        probe.graph.output[0].name = "logits"
        probe.graph.node.pop()  # drop the Softmax: explain what the built model explains
        source = probe
    gradient = finite_difference_gradient(source, x, 1, output=logits_output)
    assert relative_error(relevance, x * gradient) < 1e-3


def test_batchnorm_is_folded(rng):
    model = explain(conv_idioms(rng), "epsilon")
    assert "BatchNormalization" not in {n.op_type for n in model.graph.node}


def test_unfoldable_batchnorm_passes_relevance(rng):
    init = {"w": rng.normal(size=(3, 4)) / 2}
    nodes = [helper.make_node("BatchNormalization", ["input"] + batchnorm(rng, "bn", 3, init), ["n"], name="bn"),
             helper.make_node("Gemm", ["n", "w"], ["logits"], name="dense")]
    source = make_model(nodes, [1, 3], [1, 4], init)
    x = rng.normal(size=[2, 3]).astype(np.float32)
    _, relevance = run(explain(source, "zero"), {"input": x})
    normalized = run(make_model(nodes[:1], [1, 3], [1, 3], init, output="n"), {"input": x})[0]
    logits = run(source, {"input": x})[0]
    # LRP-0 on the dense layer, then `pass` through the BatchNormalization.
    expected = normalized * init["w"][:, logits.argmax(1)].T
    np.testing.assert_allclose(relevance, expected, rtol=1e-5, atol=1e-6)


def test_external_data_model(tmp_path, rng):
    from test_rules import relu_mlp
    source = relu_mlp(rng, bias=True)
    path = tmp_path / "external.onnx"
    onnx.save(onnx.ModelProto.FromString(source.SerializeToString()), str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location="external.data", size_threshold=0)
    assert (tmp_path / "external.data").stat().st_size > 0
    x = rng.normal(size=[2, 12]).astype(np.float32)
    from_file = run(explain(onnxlrp.load(path), "epsilon"), {"input": x})[1]
    in_memory = run(explain(source, "epsilon"), {"input": x})[1]
    np.testing.assert_array_equal(from_file, in_memory)


def test_old_opset_with_overlapping_max_pool_is_converted(rng):
    """Overlapping MaxPool windows need ScatterElements with reduction (opset 16): older models are converted."""
    from test_rules import relu_cnn
    modern = relu_cnn(np.random.default_rng(1), bias=True)
    old = relu_cnn(np.random.default_rng(1), bias=True, opset=11)
    x = rng.normal(size=[2, 2, 9, 8]).astype(np.float32)
    built = explain(old, "epsilon_plus")
    assert built.opset_import[0].version == 16
    np.testing.assert_allclose(run(built, {"input": x})[1], run(explain(modern, "epsilon_plus"), {"input": x})[1],
                               rtol=1e-6, atol=1e-9)


def decomposed_activation(kind: str, z: str, out: str) -> list:
    """Activations as exporters write them out: x * f(x)."""
    if kind == "gelu":  # torch: x * 0.5 * (1 + erf(x / sqrt(2)))
        return [helper.make_node("Div", [z, "sqrt2"], [f"{z}_d"]), helper.make_node("Erf", [f"{z}_d"], [f"{z}_e"]),
                helper.make_node("Add", [f"{z}_e", "one"], [f"{z}_a"]),
                helper.make_node("Mul", [z, f"{z}_a"], [f"{z}_m"], name="gelu_product"),
                helper.make_node("Mul", [f"{z}_m", "half"], [out])]
    if kind == "silu":
        return [helper.make_node("Sigmoid", [z], [f"{z}_s"]), helper.make_node("Mul", [z, f"{z}_s"], [out])]
    if kind == "mish":  # x * tanh(softplus(x))
        return [helper.make_node("Softplus", [z], [f"{z}_p"]), helper.make_node("Tanh", [f"{z}_p"], [f"{z}_t"]),
                helper.make_node("Mul", [z, f"{z}_t"], [out])]
    return [helper.make_node("Add", [z, "three"], [f"{z}_p"]),  # hardswish: x * clip(x + 3, 0, 6) / 6
            helper.make_node("Clip", [f"{z}_p", "zero", "six"], [f"{z}_c"]),
            helper.make_node("Mul", [f"{z}_c", z], [f"{z}_m"]), helper.make_node("Div", [f"{z}_m", "six"], [out])]


@pytest.mark.parametrize("kind,function", [
    ("gelu", lambda z: z * 0.5 * (1 + np.vectorize(__import__("math").erf)(z / np.sqrt(2)))),
    ("silu", lambda z: z / (1 + np.exp(-z))),
    ("mish", lambda z: z * np.tanh(np.log1p(np.exp(z)))),
    ("hardswish", lambda z: z * np.clip(z + 3, 0, 6) / 6)])
def test_decomposed_activations_pass_relevance(kind, function, rng):
    init = {"w1": rng.normal(size=(5, 7)), "w2": rng.normal(size=(7, 3)), "sqrt2": np.sqrt(2.0), "one": 1.0,
            "half": 0.5, "three": 3.0, "zero": 0.0, "six": 6.0}
    nodes = [helper.make_node("Gemm", ["input", "w1"], ["z1"], name="dense1"),
             *decomposed_activation(kind, "z1", "a1"),
             helper.make_node("Gemm", ["a1", "w2"], ["logits"], name="dense2")]
    source = make_model(nodes, [1, 5], [1, 3], init)
    x = rng.normal(size=[2, 5]).astype(np.float32)
    logits, relevance = run(explain(source, "zero"), {"input": x})
    z1 = x.astype(np.float64) @ init["w1"]
    hidden = function(z1) * init["w2"][:, logits.argmax(1)].T  # LRP-0 on dense2, seeded with the logit
    expected = x * ((hidden / z1) @ init["w1"].T)  # the activation passes; LRP-0 on dense1
    np.testing.assert_allclose(relevance, expected, rtol=1e-4, atol=1e-6)


def test_routing_ops_send_relevance_back_where_it_came_from(rng):
    """Pad, Slice, Split, Gather (a repeated index) and Concat are linear: LRP-0 is gradient x input."""
    ints = {"pads": [0, 0, 1, 0, 0, 2], "starts": [1], "ends": [8], "axes": [2], "split": [3, 4],
            "indices": [0, 3, 3]}
    nodes = [helper.make_node("Constant", [], [k], name=k, value=numpy_helper.from_array(np.array(v, np.int64)))
             for k, v in ints.items()]
    nodes += [helper.make_node("Pad", ["input", "pads"], ["padded"], name="pad"),
              helper.make_node("Slice", ["padded", "starts", "ends", "axes"], ["sliced"], name="slice"),
              helper.make_node("Split", ["sliced", "split"], ["left", "right"], name="split", axis=2),
              helper.make_node("Gather", ["right", "indices"], ["gathered"], name="gather", axis=2),
              helper.make_node("Concat", ["left", "gathered"], ["joined"], name="concat", axis=1),
              helper.make_node("Flatten", ["joined"], ["flat"], name="flatten"),
              helper.make_node("Gemm", ["flat", "w"], ["logits"], name="head")]
    source = make_model(nodes, [1, 2, 6], [1, 3], {"w": rng.normal(size=(12, 3))})
    x = rng.normal(size=[1, 2, 6]).astype(np.float32)
    _, relevance = run(explain(source, "zero"), {"input": x, "target": np.array([2])})
    expected = x * finite_difference_gradient(source, x, 2)
    assert relative_error(relevance, expected) < 1e-3
    assert relevance[0, :, 3].any() and not relevance[0, :, 4:].any()  # x[..., 4:] is never gathered

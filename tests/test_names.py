"""Names the builder creates are unique whatever names the source model uses (empty, repeated, or equal to the
ones onnxlrp generates), and shared weights stay shared: a property test over random small ReLU nets."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from hypothesis import HealthCheck, given, settings, strategies as st
from onnx import TensorProto, helper, numpy_helper

import onnxlrp
from conftest import explain, run

# Names onnxlrp generates (or would, for nodes named as below): a source model may use them for its own tensors.
TRICKY_TENSORS = ["lrp/scalar", "lrp/top/ArgMax", "lrp/top/Mul", "lrp/top/Equal", "lrp/relevance", "lrp/n/Div",
                  "lrp/n/Where", "lrp/n/Gemm", "lrp/n/Equal", "lrp//Div", "lrp/top/const", "lrp/top/ints",
                  "/folded_weight", "/folded_bias", "n/folded_weight", "n/folded_bias", "w0/weight", "w0/bias",
                  "n/transA", "/transA", "n/indices", "/indices", "lrp/top/Unsqueeze", "lrp/scalar_1"]
NODE_NAMES = ["", "", "n", "n", "lrp", "lrp/top", "lrp/n/Div", "w0"]
COMPOSITES = ["zero", "epsilon_plus_flat", "epsilon_gamma_box", "epsilon_alpha2_beta1"]


class Net:
    """A random graph under construction: tensors get tricky names in turn, nodes names from NODE_NAMES."""

    def __init__(self, draw, bias_free: bool):
        self.draw, self.bias_free = draw, bias_free
        self.names = draw(st.permutations(TRICKY_TENSORS))
        self.nodes, self.init = [], {}
        self.rng = np.random.default_rng(draw(st.integers(0, 2**16)))

    def tensor(self) -> str:
        return self.names.pop() if self.names else f"t{len(self.nodes)}_{len(self.init)}"

    def node(self, op, inputs, outputs=None, **attrs) -> str:
        outputs = outputs or [self.tensor()]
        self.nodes.append(helper.make_node(op, inputs, outputs, name=self.draw(st.sampled_from(NODE_NAMES)), **attrs))
        return outputs[0]

    def weight(self, values) -> str:
        name = self.tensor()
        self.init[name] = np.asarray(values, dtype=np.float32)
        return name

    def batchnorm_or_scale(self, x: str, channels: int, spatial: int) -> str:
        kind = self.draw(st.sampled_from(["none", "bn", "mul"]))
        rng = self.rng
        if kind == "bn":
            zero_if_free = 0.0 if self.bias_free else 1.0
            params = [self.weight(rng.uniform(0.5, 1.5, channels)),
                      self.weight(rng.normal(size=channels) * 0.1 * zero_if_free),
                      self.weight(rng.normal(size=channels) * 0.1 * zero_if_free),
                      self.weight(rng.uniform(0.5, 1.5, channels))]
            return self.node("BatchNormalization", [x] + params)
        if kind == "mul":
            return self.node("Mul", [x, self.weight(rng.uniform(0.5, 1.5, (channels,) + (1,) * spatial))])
        return x


@st.composite
def dense_net(draw, bias_free: bool) -> onnx.ModelProto:
    """Gemm (random alpha, transB, bias with beta) or MatMul layers, one weight shared by several of them."""
    net = Net(draw, bias_free)
    width, classes, depth = draw(st.integers(3, 6)), draw(st.integers(2, 4)), draw(st.integers(1, 3))
    shared = net.weight(net.rng.normal(size=(width, width)) / np.sqrt(width))
    x = "input"
    for _ in range(depth):
        weight = shared if draw(st.booleans()) else net.weight(net.rng.normal(size=(width, width)) / np.sqrt(width))
        if draw(st.booleans()):
            inputs = [x, weight]
            if not bias_free and draw(st.booleans()):
                inputs.append(net.weight(net.rng.normal(size=width) * 0.1))
            x = net.node("Gemm", inputs, alpha=draw(st.sampled_from([1.0, 0.5, 2.0])),
                         beta=draw(st.sampled_from([1.0, 0.5])), transB=int(draw(st.booleans())))
        else:
            x = net.node("MatMul", [x, weight])
        x = net.node("Relu", [net.batchnorm_or_scale(x, width, 0)])
    net.node("Gemm", [x, net.weight(net.rng.normal(size=(width, classes)))], ["logits"],
             alpha=draw(st.sampled_from([1.0, 0.5])))
    return model_of(net, [width], classes)


@st.composite
def conv_net(draw, bias_free: bool) -> onnx.ModelProto:
    """3x3 convolutions (one kernel shared by several), BatchNorm or channel scaling, max or average pooling."""
    net = Net(draw, bias_free)
    channels, classes, depth = draw(st.integers(2, 3)), draw(st.integers(2, 3)), draw(st.integers(1, 3))
    shared = net.weight(net.rng.normal(size=(channels, channels, 3, 3)) / 3)
    x = net.node("Conv", ["input", net.weight(net.rng.normal(size=(channels, 2, 3, 3)) / 3)], pads=[1, 1, 1, 1])
    x = net.node("Relu", [x])
    for _ in range(depth - 1):
        weight = shared if draw(st.booleans()) else net.weight(net.rng.normal(size=(channels, channels, 3, 3)) / 3)
        inputs = [x, weight] + ([] if bias_free else [net.weight(net.rng.normal(size=channels) * 0.1)])
        x = net.node("Relu", [net.batchnorm_or_scale(net.node("Conv", inputs, pads=[1, 1, 1, 1]), channels, 2)])
    if draw(st.booleans()):
        outputs = [net.tensor()] + ([net.tensor()] if draw(st.booleans()) else [])
        x = net.node("MaxPool", [x], outputs, kernel_shape=[2, 2], strides=[2, 2])
    x = net.node("Flatten", [net.node("GlobalAveragePool", [x])])
    net.node("Gemm", [x, net.weight(net.rng.normal(size=(classes, channels)))], ["logits"], transB=1)
    return model_of(net, [2, 6, 6], classes)


def model_of(net: Net, input_shape: list[int], classes: int) -> onnx.ModelProto:
    graph = helper.make_graph(net.nodes, "random",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", *input_shape])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])],
                              [numpy_helper.from_array(v, k) for k, v in net.init.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def nets(bias_free: bool):
    return st.one_of(dense_net(bias_free), conv_net(bias_free))


def sample(model: onnx.ModelProto, seed: int = 0) -> np.ndarray:
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:]]
    return np.random.default_rng(seed).normal(size=[3] + dims).astype(np.float32)


PROPERTY = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(model=nets(bias_free=False), composite=st.sampled_from(COMPOSITES))
def test_built_model_keeps_the_original_outputs(model, composite):
    x = sample(model)
    anonymous = onnx.ModelProto()
    anonymous.CopyFrom(model)
    for node in anonymous.graph.node:  # ONNX Runtime refuses repeated node names
        node.name = ""
    expected = run(anonymous, {"input": x})[0]
    built = explain(model, composite)
    names = [n.name for n in built.graph.node if n.name] + [t.name for t in built.graph.initializer]
    outputs = [o for n in built.graph.node for o in n.output]
    assert len(set(outputs)) == len(outputs) and len(set(t.name for t in built.graph.initializer)) == len(
        built.graph.initializer), "a tensor name is written twice"
    assert names  # every node is named (unnamed ones after their first output)
    assert all(n.name for n in built.graph.node)
    logits, relevance = run(built, {"input": x}, ["logits", "relevance"])
    assert np.linalg.norm(logits - expected) <= 1e-6 * np.linalg.norm(expected)
    assert np.all(np.isfinite(relevance))


@PROPERTY
@given(model=nets(bias_free=True), seed=st.integers(0, 100))
def test_bias_free_relu_nets_conserve_relevance_under_zero(model, seed):
    x = sample(model, seed)
    built = explain(model, "zero")
    logits, relevance = run(built, {"input": x}, ["logits", "relevance"])
    chosen = logits.max(axis=1)
    totals = relevance.reshape(len(x), -1).sum(axis=1)
    np.testing.assert_allclose(totals, chosen, rtol=1e-4, atol=1e-5 * np.abs(logits).max())


def test_one_weight_shared_by_two_gemms_with_different_alpha():
    """The case that used to change the logits: both scaled copies of `w` were named `w/weight`."""
    w = np.arange(16, dtype=np.float32).reshape(4, 4) / 10
    nodes = [helper.make_node("Gemm", ["input", "w"], ["h"], alpha=0.5),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Gemm", ["r", "w"], ["logits"], alpha=2.0)]
    graph = helper.make_graph(nodes, "shared", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])],
                              [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    x = np.linspace(-1, 1, 8, dtype=np.float32).reshape(2, 4)
    built = explain(model, "zero")
    np.testing.assert_allclose(run(built, {"input": x})[0], np.maximum(x @ w * 0.5, 0) @ w * 2, rtol=1e-6)
    named = {n.name: n.output[0] for n in built.graph.node}
    assert all(named[name] == name for name in ("h", "r", "logits"))  # unnamed nodes: named by their output
    scaled = {t.name: numpy_helper.to_array(t) for t in built.graph.initializer if t.name.startswith("w/weight")}
    assert len(scaled) == 2 and sorted(float(v[0, 1] / w[0, 1]) for v in scaled.values()) == [0.5, 2.0]

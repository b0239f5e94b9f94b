"""Control flow, models without a batch axis and 0-d inputs (issue 18): each fixture of fixtures/control_flow/
(made by fixtures/make_control_flow.py) keeps its outputs and gets the relevance of its twin written without the
construct, to 1e-6 relative; data-dependent loops are refused with one line."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxlrp
from conftest import FIXTURES, onnxlrp_cli, relative_error, run

HERE = FIXTURES / "control_flow"
PRESETS = ("epsilon_plus_flat", "epsilon_gamma_box")
TWIN = 1e-6  # relative L2 between a fixture's relevance and its twin's (measured: 0)
# Relative error of sum(relevance) against the logit, LRP-0 without biases (measured: 5.1e-6 at most, in the RNNs,
# whose Adds of two computed tensors have a stabilizer).
CONSERVED = 2e-5


def load(name: str) -> onnx.ModelProto:
    return onnx.load(str(HERE / f"{name}.onnx"))


def built(model: onnx.ModelProto, preset: str, **options) -> onnx.ModelProto:
    return onnxlrp.build(model, onnxlrp.load_composite(preset), **options)


def assert_like_twin(name: str, twin: str, feeds: dict, preset: str, twin_feeds: dict | None = None,
                     target: np.ndarray | None = None) -> np.ndarray:
    """The fixture's built model gives the source model's outputs and its twin's relevance; returns the relevance."""
    source = load(name)
    extra = {} if target is None else {"target": target}
    names = [o.name for o in source.graph.output]
    *outputs, relevance = run(built(source, preset), {**feeds, **extra}, names + ["relevance"])
    for produced, expected in zip(outputs, run(source, feeds)):
        np.testing.assert_allclose(produced, expected, rtol=1e-6, atol=1e-6)
    expected = run(built(load(twin), preset), {**(twin_feeds or feeds), **extra}, ["relevance"])[0]
    assert relevance.shape == expected.reshape(relevance.shape).shape
    assert relative_error(relevance, expected.reshape(relevance.shape)) < TWIN, preset
    return relevance


def without_biases(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy with every 1-D float initializer (the biases), in subgraphs too, set to 0."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)

    def zero(graph: onnx.GraphProto) -> None:
        for tensor in graph.initializer:
            if tensor.data_type == TensorProto.FLOAT and len(tensor.dims) == 1:
                tensor.CopyFrom(numpy_helper.from_array(np.zeros(tensor.dims, np.float32), tensor.name))
        for node in graph.node:
            for attribute in node.attribute:
                if attribute.HasField("g"):
                    zero(attribute.g)

    zero(copy.graph)
    return copy


def assert_conserved(name: str, feeds: dict) -> None:
    """LRP-0 without biases: the relevance of each sample sums to its explained logit (docs/lrp.md §7)."""
    model = without_biases(load(name))
    logits, relevance = run(built(model, "zero"), feeds, ["logits", "relevance"])
    logits = logits.reshape(-1, logits.shape[-1])
    totals = relevance.reshape(len(logits), -1).sum(1)
    np.testing.assert_allclose(totals, logits.max(1), rtol=CONSERVED, atol=1e-6)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(18)


def floats(rng, *shape) -> np.ndarray:
    return rng.normal(size=shape).astype(np.float32)


@pytest.mark.parametrize("preset", PRESETS)
def test_an_if_of_constant_condition_is_its_branch(rng, preset):
    """The condition (`x` has 2 channels) folds to true: the CNN in the then-branch is explained."""
    assert_like_twin("if_constant", "if_constant_twin", {"x": floats(rng, 2, 2, 8, 8)}, preset)


@pytest.mark.parametrize("preset", PRESETS)
def test_an_if_on_an_input_explains_the_branch_taken(rng, preset):
    """A sample rate chooses the head at run time: both branches are built under one If."""
    model = built(load("if_rate"), preset)
    assert [n.op_type for n in model.graph.node].count("If") == 1
    x = floats(rng, 3, 16)
    for rate, twin in ((44100.0, "then"), (8000.0, "else")):
        feeds = {"rate": np.array(rate, np.float32), "x": x}
        relevance = assert_like_twin("if_rate", f"if_rate_twin_{twin}", feeds, preset)
        assert relevance.shape == x.shape


@pytest.mark.parametrize("preset", PRESETS)
def test_a_two_stage_head_explains_the_stage_that_decided(rng, preset):
    """The first head is kept when its softmax is confident (x scaled by 3 here), else the second head answers."""
    x = floats(rng, 1, 10)
    for scale, twin in ((3.0, "then"), (0.1, "else")):
        assert_like_twin("two_stage", f"two_stage_twin_{twin}", {"x": x * scale}, preset)


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("name", ["loop_rnn", "scan_rnn"])
def test_loops_of_known_steps_are_unrolled(rng, name, preset):
    """A Loop (with an If on the step number in its body) and a Scan over 5 time steps."""
    assert_like_twin(name, f"{name}_twin", {"x": floats(rng, 3, 5, 6)}, preset)


def test_relevance_is_conserved_through_control_flow(rng):
    for rate in (44100.0, 8000.0):
        assert_conserved("if_rate", {"rate": np.array(rate, np.float32), "x": floats(rng, 2, 16)})
    for name in ("loop_rnn", "scan_rnn"):
        assert_conserved(name, {"x": floats(rng, 2, 5, 6)})
    assert_conserved("no_batch", {"x": floats(rng, 16, 6)})


@pytest.mark.parametrize("name, reason", [
    ("loop_dynamic", "it stops on a condition 'again_out' computed at each step from the data"),
    ("loop_steps", "its trip count 'steps' is not known at build time")])
def test_data_dependent_loops_are_refused(name, reason):
    with pytest.raises(onnxlrp.LrpError) as refused:
        onnxlrp.build(load(name), "epsilon", source=f"{name}.onnx")
    message = str(refused.value)
    assert message.startswith(f"{name}.onnx: node 'h_last' (Loop): {reason};") and "\n" not in message


@pytest.mark.parametrize("preset", PRESETS)
def test_a_model_without_batch_axis_is_built_as_a_batch_of_one(rng, preset):
    """Input [16, 6], output [4]: the built model keeps that signature, `target` has shape [1], `relevance` the
    input's; the relevance is that of the same network with a batch axis."""
    x = floats(rng, 16, 6)
    for target in (None, np.array([2])):
        relevance = assert_like_twin("no_batch", "no_batch_twin", {"x": x}, preset, {"x": x[None]}, target)
        assert relevance.shape == x.shape
    model = built(load("no_batch"), preset)
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in list(model.graph.input) + list(model.graph.output)}
    assert shapes == {"x": [16, 6], "target": [1], "logits": [4], "relevance": [16, 6]}


def test_a_0d_input_is_a_setting_not_the_explained_input(rng):
    """A 0-d float input listed first (a gain) is fed as it is; the real input is explained."""
    x = floats(rng, 2, 10)
    relevance = assert_like_twin("scalar_input", "scalar_input_twin", {"gain": np.array(0.5, np.float32), "x": x},
                                 "epsilon_plus_flat", {"x": x})
    assert relevance.shape == x.shape


def opset7_cnn(listed: bool) -> onnx.ModelProto:
    """An opset-7, IR-3 CNN whose initializers are listed as inputs or (as some exporters write them) not."""
    rng = np.random.default_rng(7)
    weights = [numpy_helper.from_array(v, k) for k, v in (("w1", floats(rng, 4, 3, 3, 3)), ("w2", floats(rng, 36, 5)),
                                                          ("b2", floats(rng, 5)))]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Flatten", ["p"], ["f"]), helper.make_node("Gemm", ["f", "w2", "b2"], ["logits"])]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 6, 6])]
    inputs += [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in weights] if listed else []
    graph = helper.make_graph(nodes, "opset7", inputs, [helper.make_tensor_value_info("logits", TensorProto.FLOAT,
                                                                                      [1, 5])], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 7)])
    model.ir_version = 3
    return model


def test_an_opset_7_model_with_unlisted_initializers_builds(rng):
    x = floats(rng, 1, 3, 6, 6)
    relevance = {listed: run(built(opset7_cnn(listed), "epsilon"), {"x": x}, ["relevance"])[0] for listed in (0, 1)}
    assert relative_error(relevance[0], relevance[1]) < TWIN


def two_open_inputs() -> onnx.ModelProto:
    """`extra` [N, K] (first) and `image` [N, 3, H, W], both open; only `image` feeds the convolution."""
    rng = np.random.default_rng(5)
    nodes = [helper.make_node("Conv", ["image", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]), helper.make_node("GlobalAveragePool", ["r"], ["g"]),
             helper.make_node("Flatten", ["g"], ["f"]), helper.make_node("Gemm", ["f", "d"], ["scores"]),
             helper.make_node("ReduceSum", ["extra"], ["total"], axes=[1], keepdims=1),
             helper.make_node("Add", ["scores", "total"], ["logits"])]
    graph = helper.make_graph(nodes, "two", [helper.make_tensor_value_info("extra", TensorProto.FLOAT, ["N", "K"]),
                                             helper.make_tensor_value_info("image", TensorProto.FLOAT,
                                                                           ["N", 3, "H", "W"])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])],
                              [numpy_helper.from_array(floats(rng, 4, 3, 3, 3), "w"),
                               numpy_helper.from_array(floats(rng, 4, 4), "d")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])
    model.ir_version = 7
    return model


def test_input_shape_once_per_input(tmp_path, rng):
    model = two_open_inputs()
    with pytest.raises(onnxlrp.LrpError, match="input 'image' has open dimensions .N,3,H,W. that node 'conv'"):
        built(model, "epsilon")
    shapes = ["extra:N,2", "image:N,3,8,8"]
    feeds = {"extra": floats(rng, 2, 2), "image": floats(rng, 2, 3, 8, 8)}
    logits, relevance = run(built(model, "epsilon", input_shape=shapes), feeds, ["logits", "relevance"])
    np.testing.assert_allclose(logits, run(model, feeds)[0], rtol=1e-6, atol=1e-6)
    assert relevance.shape == (2, 2)
    for twice in (["image:N,3,8,8", "image:N,3,8,8"], ["N,2", "extra:N,2"]):
        with pytest.raises(onnxlrp.LrpError, match="--input-shape is given twice for input '(image|extra)'"):
            built(model, "epsilon", input_shape=twice)
    path = tmp_path / "two.onnx"
    onnx.save(model, str(path))
    result = onnxlrp_cli("build", path, "-o", tmp_path / "out.onnx", *[a for s in shapes for a in ("--input-shape", s)])
    assert result.returncode == 0, result.stderr

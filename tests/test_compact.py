"""The built graph stays small and near the floor of passes: modified weights computed in the graph, one modified
forward and two transposed passes per layer, stride-1 transposed passes as Conv; and its float16 copy."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import onnxlrp
from onnxlrp.ir.precision import to_float16
from conftest import FIXTURES, explain, finite_difference_gradient, make_model, relative_error, run
from test_rules import relu_cnn


@pytest.mark.parametrize("composite", onnxlrp.preset_names())
def test_built_file_is_at_most_five_percent_larger_than_the_model(composite):
    """Modified weights (W+, W + gamma W+, ...) are ops on the model's own weights, not stored copies; what remains
    is the relevance graph's nodes (a few KB)."""
    path = FIXTURES / "vgg_ts.onnx"
    built = explain(onnxlrp.load(path), composite)
    assert built.ByteSize() <= 1.05 * path.stat().st_size
    stored = sum(np.prod(t.dims) for t in built.graph.initializer)
    assert stored <= 1.01 * sum(np.prod(t.dims) for t in onnxlrp.load(path).graph.initializer)


# Convolutions (by op type) in the relevance graph of the second Conv of relu_cnn, whose input is non-negative:
# a modified forward (z+ and its stabilizer) and one transposed pass per weight that the rule needs. Its output
# feeds a ReLU, so gamma's group of negative outputs gets no relevance and needs no pass (tests/test_zeros.py).
PASSES = {"epsilon": 1, "zplus": 2, "gamma": 2, "alpha2_beta1": 3}


@pytest.mark.parametrize("composite", PASSES)
def test_passes_per_layer_on_a_non_negative_input(composite, rng):
    model = explain(relu_cnn(rng, bias=True), composite)
    layer = [n.op_type for n in model.graph.node if n.name.startswith("lrp") and "/conv1/" in n.name]
    assert layer.count("Conv") + layer.count("ConvTranspose") == PASSES[composite]
    # The transposed passes of this stride-1 layer are Conv with the flipped weight, not ConvTranspose.
    assert "ConvTranspose" not in layer
    if composite in ("zplus", "alpha2_beta1"):  # denominators of known sign: the stabilizer is in z+'s bias
        assert "Where" not in layer


def stride1_convolutions(rng, group: int, dilation: int, pads: list[int]):
    channels = 4
    init = {"w": rng.normal(size=(channels, channels // group, 3, 3)) / 3, "b": rng.normal(size=channels) * 0.1,
            "wd": rng.normal(size=(channels * 25, 3)) / 5}
    nodes = [helper.make_node("Conv", ["input", "w", "b"], ["c"], name="conv", group=group, pads=pads,
                              dilations=[dilation, dilation]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Flatten", ["r"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "wd"], ["logits"], name="dense")]
    height = 5 + 2 * dilation - pads[0] - pads[2]
    width = 5 + 2 * dilation - pads[1] - pads[3]
    return make_model(nodes, [1, channels, height, width], [1, 3], init)


@pytest.mark.parametrize("group,dilation,pads", [(1, 1, [1, 1, 1, 1]), (2, 1, [0, 1, 1, 0]), (4, 2, [2, 1, 0, 1]),
                                                 (1, 2, [0, 0, 0, 0])])
def test_flipped_transposed_pass_is_the_input_gradient(group, dilation, pads, rng):
    """Grouped, depthwise, dilated, asymmetrically padded stride-1 convolutions: LRP-0 is gradient x input."""
    source = stride1_convolutions(rng, group, dilation, pads)
    x = rng.normal(size=[1, *[d.dim_value for d in source.graph.input[0].type.tensor_type.shape.dim[1:]]])
    x = x.astype(np.float32)
    model = explain(source, "zero")
    assert [n.op_type for n in model.graph.node if n.name.startswith("lrp") and "/conv/" in n.name].count("Conv") == 1
    _, relevance = run(model, {"input": x, "target": np.array([2])})
    assert relative_error(relevance, x * finite_difference_gradient(source, x, 2)) < 1e-3


def test_float16_copy_keeps_float32_inputs_and_outputs_and_stays_close():
    """ONNX Runtime's CPU provider runs most float16 nodes through inserted casts: this measures the float16
    storage of weights and intermediate tensors, not float16 arithmetic (which the GPU does)."""
    data = np.load(FIXTURES / "vgg.npz")
    built = explain(onnxlrp.load(FIXTURES / "vgg_ts.onnx"), "epsilon_plus_flat")
    half = to_float16(built)
    onnx.checker.check_model(half)
    assert all(t.data_type != TensorProto.FLOAT for t in half.graph.initializer)
    assert [v.type.tensor_type.elem_type for v in half.graph.output] == [TensorProto.FLOAT] * 2
    feeds = {"input": data["input"], "target": data["target"]}
    full = run(built, feeds, ["relevance"])[0]
    reduced = run(half, feeds, ["relevance"])[0]
    assert reduced.dtype == np.float32
    assert relative_error(reduced, full) < 2e-2


def test_float16_copy_of_a_masked_text_model():
    """BERT's mask is the float32 minimum times (1 - mask): in float16 it becomes float16's minimum, not -inf,
    so that unmasked tokens are not 0 * -inf (NaN) and the logits and relevance stay those of float32."""
    data = np.load(FIXTURES / "transformers" / "references.npz")
    built = onnxlrp.build(FIXTURES / "transformers" / "bert_op17.onnx", "attnlrp")
    feeds = {"input_ids": data["input_ids"], "attention_mask": data["attention_mask"], "target": data["targets"]}
    outputs = ["logits", "relevance"]
    full, reduced = run(built, feeds, outputs), run(to_float16(built), feeds, outputs)
    assert data["attention_mask"].min() == 0
    for a, b in zip(reduced, full):
        assert relative_error(a, b) < 2e-2


def test_alpha_beta_where_the_negative_part_is_zero(rng, tmp_path):
    """With non-negative weights and input, z- = z - z+ is 0 but its float difference may round to exactly 0
    (large z+); the denominator keeps its sign, and alpha-beta(2, 1) gives twice z+."""
    init = {"w": rng.uniform(0.5, 1.0, size=(2, 2, 3, 3)), "b": np.zeros(2), "wd": rng.normal(size=(2 * 9, 3))}
    nodes = [helper.make_node("Relu", ["input"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "w", "b"], ["c"], name="conv"),
             helper.make_node("Flatten", ["c"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "wd"], ["logits"], name="dense")]
    source = make_model(nodes, [1, 2, 5, 5], [1, 3], init)
    x = rng.uniform(50, 100, size=[2, 2, 5, 5]).astype(np.float32)
    relevance = {}
    for rule in ("alpha_beta", "zplus"):
        path = tmp_path / f"{rule}.toml"
        path.write_text(f'[[layers]]\nop_types = ["Conv"]\nrule = "{rule}"\n\n[[layers]]\nop_types = ["Gemm"]\n'
                        'rule = "epsilon"\n')
        relevance[rule] = run(explain(source, str(path)), {"input": x})[1]
    assert np.all(np.isfinite(relevance["alpha_beta"]))
    assert relative_error(relevance["alpha_beta"], 2 * relevance["zplus"]) < 1e-5

"""The forms of a convolution's transposed pass (ir/ops.py `transposed_conv`): every form that applies gives the
ConvTranspose's input-gradient, and a built model with the chosen forms gives the relevance of one built with
ConvTranspose for every strided layer."""
from __future__ import annotations

import sys

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest

import onnxlrp
import onnxlrp.pipeline
from onnxlrp.ir import ops as writer
from onnxlrp.ir.ops import Geometry, Ops
from conftest import FIXTURES, relative_error, run

sys.path.insert(0, str(FIXTURES))
from seeded import materialize  # noqa: E402

# (channels in, out, group, kernel, stride, dilation, pads [top, left, bottom, right], input side)
LAYERS = [
    (4, 6, 1, 3, 2, 1, [1, 1, 1, 1], 9),      # 3x3 stride 2 on an odd side: the last phase is sliced off
    (4, 6, 1, 3, 2, 1, [1, 1, 1, 1], 8),
    (3, 5, 1, 7, 2, 1, [3, 3, 3, 3], 12),     # a ResNet stem
    (6, 4, 1, 1, 2, 1, [0, 0, 0, 0], 8),      # a ResNet downsample: one phase has taps, spread out with zeros
    (4, 4, 2, 3, 2, 1, [1, 0, 0, 1], 9),      # grouped, asymmetric pads
    (4, 4, 4, 3, 2, 1, [1, 1, 1, 1], 10),     # depthwise
    (3, 4, 1, 2, 3, 1, [0, 0, 0, 0], 9),      # kernel < stride: phases no tap reaches
    (3, 4, 1, 5, 3, 1, [2, 1, 2, 2], 11),
    (3, 4, 1, 3, 2, 2, [2, 2, 2, 2], 9),      # dilated: ConvTranspose or the spread-out input, no phases
    (4, 6, 1, 3, 1, 1, [1, 1, 1, 1], 7),      # stride 1: the flipped Conv
]


def transposed_pass(layer: tuple, form: str) -> tuple[np.ndarray, list[str]]:
    """The transposed pass of one Conv layer in `form` on a fixed s, and the forms that apply to the layer."""
    cin, cout, group, kernel, stride, dilation, pads, side = layer
    out_side = [(side + pads[i] + pads[i + 2] - dilation * (kernel - 1) - 1) // stride + 1 for i in (0, 1)]
    rng = np.random.default_rng(0)
    weight = rng.normal(size=[cout, cin // group, kernel, kernel]).astype(np.float32)
    s = gs.Variable("s", np.float32, [2, cout, *out_side])
    graph = gs.Graph(inputs=[s], opset=17)
    ops = Ops(graph, 17)
    attrs = {"strides": [stride] * 2, "dilations": [dilation] * 2, "pads": pads, "group": group}
    geometry = Geometry([side] * 2, out_side, [kernel] * 2, [stride] * 2, [dilation] * 2, pads, group)
    result = ops.transposed_conv(s, gs.Constant("w", weight), attrs, [side] * 2, out_side, [kernel] * 2,
                                 weight.shape, form=form)
    result.dtype, result.shape = np.float32, [2, cin, side, side]
    graph.outputs = [result]
    model = gs.export_onnx(graph.cleanup().toposort())
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    values = rng.normal(size=[2, cout, *out_side]).astype(np.float32)
    return run(model, {"s": values})[0], geometry.forms()


@pytest.mark.parametrize("layer", LAYERS)
def test_every_form_is_the_input_gradient_of_conv_transpose(layer):
    expected, forms = transposed_pass(layer, "convtranspose")
    assert expected.shape[2:] == (layer[-1], layer[-1])
    assert ("phases" in forms) == (layer[4] > 1 and layer[5] == 1)
    assert ("conv" in forms) == (layer[4] == 1)
    assert ("dilated" in forms) == (layer[4] > 1)  # every strided layer here: the loop below checks it
    for form in set(forms) - {"convtranspose"}:
        assert relative_error(transposed_pass(layer, form)[0], expected) < 1e-6, form


def test_a_form_that_does_not_apply_is_refused():
    with pytest.raises(ValueError, match="phases"):
        transposed_pass(LAYERS[-2], "phases")


def resnet18() -> onnx.ModelProto:
    return materialize(onnx.load(str(FIXTURES / "zoo" / "resnet18.onnx")))


@pytest.fixture(scope="module")
def resnet():
    return resnet18()


@pytest.mark.parametrize("composite", ["epsilon", "epsilon_plus_flat", "epsilon_gamma_box"])
def test_chosen_forms_give_the_relevance_of_conv_transpose(composite, resnet, monkeypatch):
    """ResNet-18 at 64x64: its three 3x3 stride-2 layers (on 16x16, 8x8, 4x4) run as phases, its stem and 1x1
    downsamples as ConvTranspose, its stride-1 layers as flipped Convs. Each of the three has one transposed pass
    under gamma too: their outputs feed a ReLU, so gamma's group of negative outputs gets no relevance."""
    chosen = onnxlrp.build(resnet, composite, low=-3.0, high=3.0)
    ops = [n.op_type for n in chosen.graph.node]
    assert ops.count("DepthToSpace") == 3 and ops.count("ConvTranspose") > 0
    monkeypatch.setattr(writer, "transposed_form", lambda g: "conv" if "conv" in g.forms() else "convtranspose")
    baseline = onnxlrp.build(resnet, composite, low=-3.0, high=3.0)
    assert "DepthToSpace" not in [n.op_type for n in baseline.graph.node]
    x = np.random.default_rng(0).normal(size=[2, 3, 64, 64]).astype(np.float32)
    expected = run(baseline, {"input": x})
    actual = run(chosen, {"input": x})
    for a, e in zip(actual, expected):
        assert relative_error(a, e) < 1e-6

"""Forms for other runtimes: `target` without a default, one tensor per weight layout, ONNX Runtime's mobile
(.ort) format."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import onnxlrp
from onnxlrp.ir.portable import WEIGHT_READERS
from conftest import FIXTURES, onnxlrp_cli as onnxlrp_command, relative_error, run


def weight_layouts(model: onnx.ModelProto) -> dict[str, set[tuple[str, int]]]:
    """Per tensor read as a weight, the layouts it is read in."""
    found: dict[str, set] = {}
    for node in model.graph.node:
        if node.op_type in WEIGHT_READERS and len(node.input) > 1:
            attrs = {a.name: a.i for a in node.attribute}
            found.setdefault(node.input[1], set()).add((node.op_type, int(attrs.get("transB", 0))))
    return found


def test_target_without_default_is_a_required_input(tmp_path):
    data = np.load(FIXTURES / "cnn.npz")
    out = tmp_path / "cnn_lrp.onnx"
    result = onnxlrp_command("build", FIXTURES / "cnn_ts.onnx", "-o", out, "--no-target-default")
    assert result.returncode == 0, result.stderr
    required = onnx.load(str(out))
    assert "target" not in {t.name for t in required.graph.initializer}
    assert "target" in {i.name for i in required.graph.input}
    with pytest.raises(Exception, match="target"):
        run(required, {"input": data["input"]})
    defaulted = onnxlrp.build(FIXTURES / "cnn_ts.onnx")
    predicted = run(defaulted, {"input": data["input"]})[1]
    chosen = np.array([-1, 2, 0], dtype=np.int64)
    expected = run(defaulted, {"input": data["input"], "target": chosen})[1]
    assert relative_error(run(required, {"input": data["input"], "target": chosen})[1], expected) < 1e-6
    assert relative_error(expected[:1], predicted[:1]) < 1e-6 and relative_error(expected, predicted) > 1e-2


@pytest.mark.parametrize("name, composite, shared", [("mlp_ts", "epsilon", True), ("mlp_ts", "alpha2_beta1", True),
                                                     ("cnn_ts", "epsilon_gamma_box", True), ("vgg_ts", "gamma", False)])
def test_each_weight_is_read_in_one_layout(name, composite, shared):
    """OpenVINO miscomputes a tensor read as a weight in two layouts (see portable.py). Dense layers' transposed
    passes (and strided convolutions') read their own views; the VGG fixture's stride-1 convolutions read flipped
    weights anyway."""
    built = onnxlrp.build(FIXTURES / f"{name}.onnx", composite)
    assert not {tensor: layouts for tensor, layouts in weight_layouts(built).items() if len(layouts) > 1}
    views = [n for n in built.graph.node if n.op_type == "Neg" and n.name.startswith("lrp/view/")]
    assert bool(views) == shared


@pytest.mark.parametrize("name, composite", [("cnn_ts", "epsilon_plus_flat"), ("vgg_ts", "epsilon_gamma_box")])
def test_ort_format_gives_the_same_relevance(tmp_path, name, composite):
    """The built model converts with onnxruntime's convert_onnx_models_to_ort and runs from the .ort file."""
    data = np.load(FIXTURES / f"{name.split('_')[0]}.npz")
    built = onnxlrp.build(FIXTURES / f"{name}.onnx", composite, low=tuple(np.atleast_1d(data["low"]).tolist()),
                           high=tuple(np.atleast_1d(data["high"]).tolist()))
    onnx.save(built, str(tmp_path / "model.onnx"))
    converted = subprocess.run([sys.executable, "-m", "onnxruntime.tools.convert_onnx_models_to_ort",
                                str(tmp_path / "model.onnx"), "--output_dir", str(tmp_path / "ort")],
                               capture_output=True, text=True)
    assert converted.returncode == 0, converted.stderr
    options = ort.SessionOptions()
    options.log_severity_level = 3
    mobile = ort.InferenceSession(str(tmp_path / "ort" / "model.ort"), options, providers=["CPUExecutionProvider"])
    feeds = {"input": data["input"], "target": data["target"]}
    logits, relevance = mobile.run(["logits", "relevance"], feeds)
    expected_logits, expected = run(built, feeds, ["logits", "relevance"])
    assert relative_error(logits, expected_logits) < 1e-6
    assert relative_error(relevance, expected) < 1e-5
    assert relative_error(relevance, data[f"relevance/{composite}"]) < 1e-4


def test_web_demo_model_is_the_digits_model_built_without_target_default():
    """web/ ships a built copy: it must stay what `onnxlrp build fixtures/digits/digits.onnx --no-target-default`
    writes today (same relevance), with `target` required."""
    shipped = onnx.load(str(FIXTURES.parent / "web" / "digits_epsilon_plus_flat.onnx"))
    assert "target" not in {t.name for t in shipped.graph.initializer}
    fresh = onnxlrp.build(FIXTURES / "digits" / "digits.onnx", "epsilon_plus_flat", target_default=False)
    x = np.load(FIXTURES / "digits" / "test.npz")["images"][:16, None].astype(np.float32) / 255
    feeds = {"input": x, "target": np.full(len(x), -1, dtype=np.int64)}
    assert relative_error(run(shipped, feeds)[1], run(fresh, feeds)[1]) < 1e-6

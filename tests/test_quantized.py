"""Quantized models (issue 7): QDQ models made by ONNX Runtime's quantize_static from the fixture CNN
(fixtures/make_quantized.py). Their outputs stay bit-identical; operators that compute in integers are refused."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxlrp
from conftest import FIXTURES, run
from test_exported import assert_builds_everywhere

QUANTIZED = FIXTURES / "quantized"
IMAGES = np.load(FIXTURES / "cnn.npz")["input"].astype(np.float32)


@pytest.mark.parametrize("name", ["cnn_qdq", "cnn_qdq_channel"])
def test_qdq_models_keep_their_outputs_bit_for_bit(name):
    source = onnx.load(str(QUANTIZED / f"{name}.onnx"))
    found = assert_builds_everywhere(source, {"input": IMAGES}, exact=True)
    # The explanation is the float model's, up to quantization.
    float_model = onnxlrp.build(onnx.load(str(FIXTURES / "cnn_ts.onnx")), onnxlrp.load_composite("epsilon_plus"))
    reference = run(float_model, {"input": IMAGES})[1]
    # Measured 0.9986 (per tensor) and 0.9987 (per channel): 1 - correlation 1.4e-3, kept below 5e-3.
    assert np.corrcoef(found["epsilon_plus"].ravel(), reference.ravel())[0, 1] > 0.995


@pytest.mark.parametrize("name,op", [("cnn_qoperator", "QLinearConv"), ("cnn_dynamic", "DynamicQuantizeLinear")])
def test_integer_operators_are_refused_in_one_line(name, op):
    with pytest.raises(onnxlrp.LrpError, match=f"\\({op}\\) computes in integers.*QDQ format") as error:
        onnxlrp.build(onnx.load(str(QUANTIZED / f"{name}.onnx")), onnxlrp.load_composite("epsilon"))
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("axis,scale_shape", [(None, ()), (0, (4,)), (1, (3,))])
def test_dequantized_weights_fold_as_onnx_runtime_computes_them(axis, scale_shape):
    import onnx_graphsurgeon as gs
    from onnxlrp.canonical.quantized import fold_dequantized_weights
    rng = np.random.default_rng(3)
    weights = {"q": rng.integers(-128, 127, size=(4, 3, 2), dtype=np.int8),
               "scale": rng.uniform(0.001, 0.1, size=scale_shape).astype(np.float32),
               "zero": rng.integers(-5, 5, size=scale_shape, dtype=np.int8)}
    attrs = {} if axis is None else {"axis": axis}
    graph = helper.make_graph([helper.make_node("DequantizeLinear", ["q", "scale", "zero"], ["w"], **attrs),
                               helper.make_node("Add", ["input", "w"], ["y"])], "dq",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, [4, 3, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 3, 2])],
                              [numpy_helper.from_array(v, k) for k, v in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    zeros = np.zeros((4, 3, 2), np.float32)
    expected = run(model, {"input": zeros})[0]
    imported = gs.import_onnx(model)
    fold_dequantized_weights(imported)
    assert "DequantizeLinear" not in {n.op for n in imported.nodes}
    np.testing.assert_array_equal(imported.tensors()["w"].values, expected)

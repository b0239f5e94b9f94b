"""`onnxlrp inspect`: the rule table of a model, folded BatchNorms, unsupported ops; it writes nothing."""
from __future__ import annotations


import numpy as np
import onnx
from onnx import helper

from conftest import FIXTURES, make_model, onnxlrp_cli
import onnxlrp
from onnxlrp.app import inspect as inspection



def test_rows_show_folding_rules_and_parameters():
    rows = inspection.rows(onnxlrp.load(FIXTURES / "cnn_ts.onnx"),
                           onnxlrp.load_composite("epsilon_gamma_box").with_params({"gamma": 0.5}))
    by_name = {row.node: row for row in rows}
    assert [r.op_type for r in rows].count("BatchNormalization") == 0  # both folded away
    assert by_name["/0/Conv"].folded == ("/1/BatchNormalization (BatchNormalization)",)
    assert by_name["/0/Conv"].rule == "zbox" and by_name["/0/Conv"].params == {"low": 0.0, "high": 1.0,
                                                                               "stabilizer": 1e-6}
    assert by_name["/4/Conv"].folded == ("/5/BatchNormalization (BatchNormalization)",)
    assert by_name["/4/Conv"].rule == "gamma" and by_name["/4/Conv"].params["gamma"] == 0.5
    assert by_name["/14/Gemm"].rule == "epsilon" and by_name["/14/Gemm"].params == {"epsilon": 1e-6, "epsilon_scale": 0.0}
    assert by_name["/3/MaxPool"].rule == "wta" and by_name["/2/Relu"].rule == "pass"
    assert by_name["/7/AveragePool"].rule == "norm"


def test_zero_rule_shows_its_fixed_epsilon():
    rows = inspection.rows(onnxlrp.load(FIXTURES / "mlp_ts.onnx"), onnxlrp.load_composite("zero"))
    assert rows[0].rule == "zero" and rows[0].params == {"epsilon": 0.0, "epsilon_scale": 0.0}


def test_command_prints_the_table_and_writes_nothing(tmp_path):
    result = onnxlrp_cli("inspect", FIXTURES / "digits" / "digits.onnx", "--composite", "epsilon_plus", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    lines = result.stdout.strip().splitlines()
    assert lines[0].split() == ["node", "op", "type", "folded", "into", "it", "rule", "parameters"]
    assert lines[1].split() == ["/0/Conv", "Conv", "-", "zplus", "stabilizer=1e-06"]
    assert lines[-2].split() == ["/12/Gemm", "Gemm", "-", "epsilon", "epsilon=1e-06", "epsilon_scale=0"]
    assert lines[-1] == "build: every node is supported (composite epsilon_plus)"
    assert len(lines) == 1 + 12 + 1
    assert list(tmp_path.iterdir()) == []


def test_unsupported_ops_are_listed(tmp_path):
    weight = np.random.default_rng(0).normal(size=(4, 3))
    nodes = [helper.make_node("Gemm", ["input", "w"], ["g"]), helper.make_node("Sin", ["g"], ["logits"])]
    path = tmp_path / "sin.onnx"
    onnx.save(make_model(nodes, ["N", 4], ["N", 3], {"w": weight}), str(path))
    result = onnxlrp_cli("inspect", path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[2].split() == ["logits", "Sin", "-", "unsupported", "-"]  # unnamed: named by its output
    assert lines[-1].startswith(f"build: {path}: cannot explain 1 node(s): Sin")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sin.onnx"]


def test_errors_are_one_line(tmp_path):
    for args, fragment in (((tmp_path / "missing.onnx",), "no such file"),
                           ((FIXTURES / "mlp_ts.onnx", "--composite", "nonsense"), "unknown composite 'nonsense'")):
        result = onnxlrp_cli("inspect", *args)
        assert result.returncode != 0 and len(result.stderr.strip().splitlines()) == 1
        assert fragment in result.stderr and result.stdout == ""


def test_nodes_that_no_relevance_reaches_are_constants_and_the_verdict_agrees():
    """Shapes, a LayerNorm's sigma (StopGradient) and the Pow of its variance get no relevance: `constant`, never
    `unsupported` when the build accepts the model (the ViT fixture exported by TorchScript at opset 14)."""
    model = onnxlrp.load(FIXTURES / "transformers" / "vit_op14.onnx")
    composite = onnxlrp.load_composite("attnlrp")
    rows = inspection.rows(model, composite)
    assert not [r for r in rows if r.rule == inspection.UNSUPPORTED]
    for op in ("Shape", "StopGradient", "Pow"):
        assert {r.rule for r in rows if r.op_type == op} == {inspection.CONSTANT}, op
    assert {r.rule for r in rows if r.op_type == "Softmax"} == {"softmax"}  # attention, not a head
    assert inspection.report(model, composite, "vit").splitlines()[-1] == \
        "build: every node is supported (composite attnlrp)"


def test_a_head_is_skipped():
    weight = np.random.default_rng(0).normal(size=(4, 3))
    nodes = [helper.make_node("Gemm", ["input", "w"], ["g"], name="dense"),
             helper.make_node("Sigmoid", ["g"], ["probabilities"], name="head"),
             helper.make_node("Shape", ["g"], ["shape"], name="shape")]
    model = make_model(nodes, ["N", 4], ["N", 3], {"w": weight}, output="probabilities")
    model.graph.output.append(helper.make_tensor_value_info("shape", onnx.TensorProto.INT64, [2]))
    assert [(r.node, r.rule) for r in inspection.rows(model, onnxlrp.load_composite("epsilon"))] == \
        [("dense", "epsilon"), ("head", inspection.SKIPPED), ("shape", inspection.CONSTANT)]

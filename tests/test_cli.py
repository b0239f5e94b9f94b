"""The command line as a user runs it: outputs, options, and one clear line for every error."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

from conftest import FIXTURES, assert_one_line_error, make_model, onnxlrp_cli as onnxlrp, relative_error, run




def test_build_writes_a_model_that_matches_zennit(tmp_path):
    data = np.load(FIXTURES / "cnn.npz")
    low, high = (",".join(f"{v:.17g}" for v in data[k]) for k in ("low", "high"))
    out = tmp_path / "cnn_lrp.onnx"
    result = onnxlrp("build", FIXTURES / "cnn_ts.onnx", "-o", out, "--composite", "epsilon_gamma_box",
                     f"--low={low}", f"--high={high}")
    assert result.returncode == 0, result.stderr
    model = onnx.load(str(out))
    _, relevance = run(model, {"input": data["input"], "target": data["target"]})
    assert relative_error(relevance, data["relevance/epsilon_gamma_box"]) < 1e-4


def test_command_line_parameters_override_the_composite(tmp_path):
    x = np.load(FIXTURES / "mlp.npz")["input"]
    composite = tmp_path / "mine.toml"
    composite.write_text('[params]\nepsilon = 0.5\n\n[[layers]]\nop_types = ["Gemm"]\nrule = "epsilon"\n'
                         'epsilon = 0.5\n')
    outputs = {}
    for label, extra in (("file", []), ("override", ["--epsilon", "1e-6"]), ("preset", [])):
        chosen = "epsilon" if label == "preset" else composite
        out = tmp_path / f"{label}.onnx"
        assert onnxlrp("build", FIXTURES / "mlp_ts.onnx", "-o", out, "--composite", chosen, *extra).returncode == 0
        outputs[label] = run(onnx.load(str(out)), {"input": x})[1]
    np.testing.assert_array_equal(outputs["override"], outputs["preset"])
    assert relative_error(outputs["file"], outputs["preset"]) > 1e-3


def test_a_composite_file_picks_rules_by_node_name(tmp_path):
    x = np.load(FIXTURES / "mlp.npz")["input"]
    first = onnx.load(str(FIXTURES / "mlp_ts.onnx")).graph.node
    first_gemm = next(n.name for n in first if n.op_type == "Gemm")
    composite = tmp_path / "named.toml"
    composite.write_text(f'[[layers]]\nnames = ["{first_gemm}"]\nrule = "flat"\n\n'
                         '[[layers]]\nop_types = ["Gemm"]\nrule = "epsilon"\n')
    named, preset = tmp_path / "named.onnx", tmp_path / "preset.onnx"
    assert onnxlrp("build", FIXTURES / "mlp_ts.onnx", "-o", named, "--composite", composite).returncode == 0
    assert onnxlrp("build", FIXTURES / "mlp_ts.onnx", "-o", preset, "--composite", "epsilon_plus_flat").returncode == 0
    np.testing.assert_array_equal(run(onnx.load(str(named)), {"input": x})[1],
                                  run(onnx.load(str(preset)), {"input": x})[1])


def unsupported_model(tmp_path) -> Path:
    nodes = [helper.make_node("Sin", ["input"], ["n"], name="sin_a"),
             helper.make_node("Gemm", ["n", "w"], ["h"], name="dense"),
             helper.make_node("Sin", ["h"], ["h2"], name="sin_b"),
             helper.make_node("Hardmax", ["h2"], ["logits"], name="hard")]
    model = make_model(nodes, [1, 4], [1, 3], {"w": np.ones((4, 3))})
    path = tmp_path / "unsupported.onnx"
    onnx.save(model, str(path))
    return path


def test_unsupported_ops_are_all_listed_and_nothing_is_written(tmp_path):
    out = tmp_path / "out.onnx"
    out.write_text("keep me")
    result = onnxlrp("build", unsupported_model(tmp_path), "-o", out)
    assert_one_line_error(result, "unsupported.onnx", "Sin ('sin_b', 'sin_a')", "Hardmax ('hard')",
                          "unsupported op type")
    assert out.read_text() == "keep me"


@pytest.mark.parametrize("content,fragment", [(b"hello, not a model\n", "not"), (b"\x00\x01\x02garbage", "not")])
def test_files_that_are_not_onnx(tmp_path, content, fragment):
    path = tmp_path / "bad.onnx"
    path.write_bytes(content)
    assert_one_line_error(onnxlrp("build", path, "-o", tmp_path / "out.onnx"), "bad.onnx", "ONNX model")
    assert not (tmp_path / "out.onnx").exists()


def test_missing_file(tmp_path):
    assert_one_line_error(onnxlrp("build", tmp_path / "nope.onnx", "-o", tmp_path / "o.onnx"), "nope.onnx",
                          "no such file")


def test_output_equal_to_input_is_refused(tmp_path):
    source = tmp_path / "model.onnx"
    source.write_bytes((FIXTURES / "mlp_ts.onnx").read_bytes())
    before = source.read_bytes()
    assert_one_line_error(onnxlrp("build", source, "-o", source), "output path is the input")
    assert source.read_bytes() == before


@pytest.mark.parametrize("args,fragments", [
    (["--composite", "epsilon_alpha2_beta1", "--alpha", "3", "--beta", "1"], ["alpha - beta = 1", "alpha=3"]),
    (["--composite", "alpha2_beta1", "--alpha", "0.5", "--beta", "-0.5"], ["alpha, beta >= 0"]),
    (["--composite", "no_such_composite"], ["unknown composite 'no_such_composite'", "epsilon_plus_flat"]),
    (["--composite", "gamma", "--gamma", "-1"], ["gamma must be >= 0"]),
    (["--low", "a,b"], ["--low", "comma-separated numbers"]),
    (["--explain", "softmax"], ["'softmax' is not one of"]),
    (["--epsilon", "tiny"], ["--epsilon", "not a valid float"]),
])
def test_bad_options(tmp_path, args, fragments):
    result = onnxlrp("build", FIXTURES / "mlp_ts.onnx", "-o", tmp_path / "out.onnx", *args)
    assert_one_line_error(result, *fragments)
    assert not (tmp_path / "out.onnx").exists()


def test_bad_composite_files(tmp_path):
    cases = {"typo.toml": ('[[layers]]\nop_types = ["Conv"]\nrule = "epsilom"\n', "unknown rule 'epsilom'"),
             "param.toml": ('[params]\nepsilom = 1\n', "unknown parameter 'epsilom'"),
             "misfit.toml": ('[[layers]]\nop_types = ["Relu"]\nrule = "zplus"\n', "does not apply to Relu"),
             "broken.toml": ('[[layers]\n', "not valid TOML")}
    for file, (text, fragment) in cases.items():
        (tmp_path / file).write_text(text)
        result = onnxlrp("build", FIXTURES / "mlp_ts.onnx", "-o", tmp_path / "out.onnx", "--composite", tmp_path / file)
        assert_one_line_error(result, file, fragment)


def test_classifier_output_picks_the_explained_output(tmp_path):
    rng = np.random.default_rng(5)
    init = {"w_aux": rng.normal(size=(6, 4)), "w": rng.normal(size=(6, 3))}
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["input", "w_aux"], ["aux"], name="aux_head"),
         helper.make_node("Gemm", ["input", "w"], ["logits"], name="head")], "two_heads",
        [helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, ["N", 6])],
        [helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, ["N", k]) for n, k in (("aux", 4), ("logits", 3))],
        [onnx.numpy_helper.from_array(v.astype(np.float32), k) for k, v in init.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "two_heads.onnx"
    onnx.save(model, str(path))
    x = rng.normal(size=(2, 6)).astype(np.float32)
    relevance = {}
    for label, extra in (("default", []), ("chosen", ["--classifier-output", "logits"])):
        out = tmp_path / f"{label}.onnx"
        assert onnxlrp("build", path, "-o", out, "--composite", "zero", *extra).returncode == 0
        relevance[label] = run(onnx.load(str(out)), {"input": x, "target": np.array([0, 1])}, ["relevance"])[0]
    for label, weight in (("default", init["w_aux"]), ("chosen", init["w"])):  # LRP-0 of one dense layer
        np.testing.assert_allclose(relevance[label], x * weight[:, [0, 1]].T, rtol=1e-5, atol=1e-6)
    assert_one_line_error(onnxlrp("build", path, "-o", tmp_path / "x.onnx", "--classifier-output", "nope"),
                          "no tensor named 'nope' in the graph", "any float tensor", "aux, logits")

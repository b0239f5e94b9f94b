"""--layer-relevance: one output per linear layer with the relevance at its input, and `onnxlrp check`."""
from __future__ import annotations

import json
import sys
from unittest import mock

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from click.testing import CliRunner
from onnx import helper
from PIL import Image

import onnxlrp
from conftest import FIXTURES, make_model, onnxlrp_cli, relative_error, run, session
from lrp_numpy import lrp_chain
from onnxlrp.app.check import check
from onnxlrp.app.cli import cli, main
from onnxlrp.lrp.layers import METADATA_KEY, output_name
from test_montavon import VGG, build_vgg, conv_dense, montavon_rules
from test_rules import relu_cnn, relu_mlp

VGG_LAYERS = ["/0/Conv", "/2/Conv", "/5/Conv", "/7/Conv", "/11/Gemm", "/14/Gemm"]


def test_layer_outputs_equal_each_layers_lower_relevance():
    model = build_vgg("montavon2019", layer_relevance=True)
    names = [f"relevance{layer}" for layer in VGG_LAYERS]
    assert [o.name for o in model.graph.output] == ["logits", "relevance"] + names
    outputs = run(model, {"input": VGG["input"], "target": VGG["target"]}, ["relevance"] + names)
    _, expected, per_layer = lrp_chain(onnx.load(FIXTURES / "vgg_ts.onnx"), VGG["input"], VGG["target"],
                                       montavon_rules("norm"))
    for layer, actual in zip(VGG_LAYERS, outputs[1:]):
        assert actual.shape == per_layer[layer].shape
        assert relative_error(actual, per_layer[layer]) < 1e-4, layer
    np.testing.assert_array_equal(outputs[0], outputs[1])  # the first layer's lower relevance is the input's
    recorded = json.loads(next(p.value for p in model.metadata_props if p.key == METADATA_KEY))
    assert [(r["node"], r["rule"]) for r in recorded["layers"]] == list(zip(
        VGG_LAYERS, ["zbox", "gamma", "gamma", "epsilon", "zero", "zero"]))


def test_off_by_default():
    model = build_vgg("montavon2019")
    assert [o.name for o in model.graph.output] == ["logits", "relevance"]
    assert not any(p.key == METADATA_KEY for p in model.metadata_props)


@pytest.mark.parametrize("factory,shape", [(relu_mlp, [12]), (relu_cnn, [2, 9, 8])])
def test_every_layer_conserves_the_logit_under_uniform_zero_without_biases(factory, shape, rng):
    source = factory(rng, bias=False)
    model = onnxlrp.build(source, onnxlrp.load_composite("zero"), layer_relevance=True)
    layer_names = [o.name for o in model.graph.output][2:]
    assert len(layer_names) == sum(n.op_type in ("Gemm", "Conv") for n in source.graph.node)
    x = rng.normal(size=[4, *shape]).astype(np.float32)
    logits, *layers = run(model, {"input": x, "target": np.array([0, 1, 2, -1])}, ["logits"] + layer_names)
    chosen = np.where(np.array([0, 1, 2, -1]) < 0, logits.argmax(1), [0, 1, 2, -1])
    explained = logits[np.arange(4), chosen]
    for name, relevance in zip(layer_names, layers):
        np.testing.assert_allclose(relevance.reshape(4, -1).sum(1), explained, rtol=0,
                                   atol=1e-5 * np.abs(logits).max(), err_msg=name)


def test_output_names_are_sanitized_and_unique():
    taken = {"relevance/a_b"}
    nodes = [gs.Node("Conv", "/a b"), gs.Node("Conv", "a#b"), gs.Node("Gemm", ""), gs.Node("Gemm", "/x/Gemm")]
    assert [output_name(n, i, taken) for i, n in enumerate(nodes)] == \
        ["relevance/a_b_2", "relevance/a_b_3", "relevance/Gemm_2", "relevance/x/Gemm"]


def test_layers_with_clashing_names_get_distinct_outputs(rng):
    init = {"w0": rng.normal(size=(6, 6)), "w1": rng.normal(size=(6, 3))}
    nodes = [helper.make_node("Gemm", ["input", "w0"], ["h"], name="layer 1"),
             helper.make_node("Relu", ["h"], ["a"], name="relu"),
             helper.make_node("Gemm", ["a", "w1"], ["logits"], name="layer_1")]
    model = onnxlrp.build(make_model(nodes, [1, 6], [1, 3], init), onnxlrp.load_composite("zero"),
                          layer_relevance=True)
    assert [o.name for o in model.graph.output][2:] == ["relevance/layer_1", "relevance/layer_1_2"]
    onnx.checker.check_model(model, full_check=True)


def table(report: str) -> dict[str, list[str]]:
    """The rows of a one-sample report (after its title and header lines), by layer name."""
    return {line.split()[0]: line.split()[1:] for line in report.splitlines()[2:] if not line.startswith("  input")}


def built_file(tmp_path, rng, explain="logit", layer_relevance=True):
    source = conv_dense(rng)
    chosen = onnxlrp.load_composite("epsilon").with_params({"epsilon": 0.1})
    path = tmp_path / "lrp.onnx"
    onnxlrp.save_atomic(onnxlrp.build(source, chosen, explain=explain, layer_relevance=layer_relevance), path)
    return source, path


def test_check_reports_sums_absorbed_and_negative_shares(tmp_path, rng):
    source, path = built_file(tmp_path, rng)
    x = rng.normal(size=(1, 2, 6, 6)).astype(np.float32)
    np.save(tmp_path / "x.npy", x[0])  # without the batch axis
    report = check(str(path), str(tmp_path / "x.npy"), target=3)
    rules = {name: ("epsilon", {"epsilon": 0.1}) for name in ("conv0", "conv1", "dense")}
    logits, relevance, lower = lrp_chain(source, x, np.array([3]), rules)
    assert report.splitlines()[0] == f"sample 0: class 3 (--target), logit {logits[0, 3]:.6g}"
    rows = table(report)
    assert list(rows) == ["conv0", "conv1", "dense"]
    upper = {"dense": logits[0, 3], "conv1": lower["dense"].sum(), "conv0": lower["conv1"].sum()}
    for name in ("conv0", "conv1", "dense"):
        op, rule, total, absorbed, negative = rows[name]
        assert rule == "epsilon"
        np.testing.assert_allclose(float(total), lower[name].sum(), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(float(absorbed), upper[name] - lower[name].sum(), rtol=1e-3, atol=1e-5)
        share = -np.minimum(lower[name], 0).sum() / np.abs(lower[name]).sum()
        assert negative == f"{share:.1%}"
    last = report.splitlines()[-1].split()
    assert last[:2] == ["input", "relevance"] and last[5:7] == ["logit", f"{logits[0, 3]:.6g}"]
    np.testing.assert_allclose(float(last[2]), relevance.sum(), rtol=1e-4)
    np.testing.assert_allclose(float(last[7].strip("(%)")), 100 * relevance.sum() / logits[0, 3], rtol=1e-3)


def test_check_without_input_uses_a_deterministic_random_input(tmp_path, rng):
    _, path = built_file(tmp_path, rng)
    first, second = check(str(path)), check(str(path))
    assert first == second
    assert first.splitlines()[0] == "no --input: a deterministic random input (standard normal, seed 0) of shape " \
                                    "[1, 2, 6, 6]"
    assert "(predicted)" in first.splitlines()[1]


def test_check_reads_an_image_resized_to_the_model(tmp_path, rng):
    source = make_model([helper.make_node("Conv", ["input", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
                         helper.make_node("Flatten", ["c"], ["f"], name="flatten"),
                         helper.make_node("Gemm", ["f", "d"], ["logits"], name="dense")],
                        [1, 3, 4, 5], [1, 2], {"w": rng.normal(size=(2, 3, 3, 3)), "d": rng.normal(size=(40, 2))})
    path = tmp_path / "lrp.onnx"
    onnxlrp.save_atomic(onnxlrp.build(source, onnxlrp.load_composite("zero"), layer_relevance=True), path)
    pixels = (rng.random((8, 10, 3)) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "image.png")
    report = check(str(path), str(tmp_path / "image.png"))
    x = np.asarray(Image.fromarray(pixels).resize((5, 4), Image.BILINEAR), dtype=np.float32).transpose(2, 0, 1) / 255
    logits, = run(source, {"input": x[None]})
    assert report.splitlines()[0].endswith(f"logit {logits[0].max():.6g}")
    # Bias-free LRP-0: the input's relevance is the logit.
    assert report.splitlines()[-1].endswith("(100.0%)")


PREPROCESSING = ["size", "normalize", "mean", "std", "scale", "channels", "layout", "resize"]


def test_check_and_explain_take_the_same_preprocessing_options():
    def declared(command: str) -> list[tuple]:
        return [(p.name, p.opts, p.default, p.help, getattr(p.type, "choices", None))
                for p in cli.commands[command].params if p.name in PREPROCESSING]
    assert [row[0] for row in declared("check")] == PREPROCESSING
    assert declared("check") == declared("explain")


def test_check_and_explain_give_a_picture_the_same_model_input(tmp_path):
    """A picture wider than the model (covered and centre-cropped) and a non-default mean and std, through both
    commands on the digits model: the same logit and input relevance."""
    digits = FIXTURES / "digits"
    built = tmp_path / "digits_layers.onnx"
    onnxlrp.save_atomic(onnxlrp.build(digits / "digits.onnx", layer_relevance=True), built)
    picture = tmp_path / "wide.pgm"
    Image.open(digits / "samples" / "three.png").resize((28, 20), Image.Resampling.BILINEAR).save(picture)
    options = ["--mean", "0.1", "--std", "0.9"]
    checked = onnxlrp_cli("check", built, "--input", picture, *options)
    explained = onnxlrp_cli("explain", digits / "digits_epsilon_plus_flat.onnx", picture, "-o", tmp_path / "out",
                            *options)
    assert checked.returncode == 0 and explained.returncode == 0, checked.stderr + explained.stderr
    report = checked.stdout.splitlines()
    line = explained.stdout.strip()
    predicted = int(line.split("predicted ")[1].split()[0])
    assert report[0].startswith(f"sample 0: class {predicted} (predicted), logit ")
    np.testing.assert_allclose(float(report[0].split()[-1]), float(line.split("logit ")[1].split(",")[0]),
                               rtol=1e-5)
    np.testing.assert_allclose(float(report[-1].split()[2]), float(line.split("relevance sum ")[1]), rtol=1e-5)


def test_check_reads_a_ppm_normalized_for_imagenet(tmp_path):
    source = onnx.load(FIXTURES / "cnn_ts.onnx")  # [N, 3, 16, 16]
    built = tmp_path / "cnn_layers.onnx"
    onnxlrp.save_atomic(onnxlrp.build(source, layer_relevance=True), built)
    wide = np.random.default_rng(4).integers(0, 256, size=(16, 24, 3), dtype=np.uint8)
    Image.fromarray(wide).save(tmp_path / "wide.ppm")
    result = onnxlrp_cli("check", built, "--input", tmp_path / "wide.ppm", "--normalize", "imagenet")
    assert result.returncode == 0, result.stderr
    centre = wide[:, 4:20].astype(np.float64) / 255  # the shorter side fits: only the centre is kept
    x = ((centre - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]).transpose(2, 0, 1)[None].astype(np.float32)
    logits, = run(source, {"input": x})
    title = result.stdout.splitlines()[0]
    assert title.startswith(f"sample 0: class {logits[0].argmax()} (predicted), logit ")
    np.testing.assert_allclose(float(title.split()[-1]), logits[0].max(), rtol=1e-5)


def test_check_logodds_compares_with_the_log_odds(tmp_path, rng):
    _, path = built_file(tmp_path, rng, explain="logodds")
    x = rng.normal(size=(2, 2, 6, 6)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    report = check(str(path), str(tmp_path / "x.npy"))
    logits, = session(onnx.load(path)).run(["logits"], {"input": x})
    for sample in range(2):
        c = logits[sample].argmax()
        odds = np.exp(logits[sample, c].astype(np.float64)) / np.exp(np.delete(logits[sample], c)).sum()
        title = report.splitlines()[5 * sample]
        assert title.startswith(f"sample {sample}: class {c} (predicted), log-odds ")
        np.testing.assert_allclose(float(title.split()[-1]), np.log(odds), rtol=1e-5)
    # The last dense layer is replaced by the pairwise differences: the table starts below it.
    assert list(table("\n".join(report.splitlines()[:5]))) == ["conv0", "conv1"]


def invoke(*args: str) -> int:
    """The exit code of `onnxlrp ARGS` run in this process (its stderr goes to capsys)."""
    with mock.patch.object(sys, "argv", ["onnxlrp", *args]):
        with pytest.raises(SystemExit) as exited:
            main()
    return exited.value.code


@pytest.mark.parametrize("problem,fragment", [
    ("no metadata", "no per-layer relevance recorded; build the model with `onnxlrp build --layer-relevance`"),
    ("bad npy", "bad.npy: not a readable .npy array"),
    ("wrong shape", "shape [3, 3] is neither one sample nor a batch of the model input 'input' [?, 2, 6, 6]"),
    ("bad target", "--target 7: the model has 5 classes"),
    ("picture for two channels", "does not take pictures"),
    ("normalize and mean", "--normalize sets --mean and --std"),
])
def test_check_errors_are_one_line(tmp_path, rng, capsys, problem, fragment):
    _, path = built_file(tmp_path, rng, layer_relevance=problem != "no metadata")
    (tmp_path / "bad.npy").write_bytes(b"not numpy")
    np.save(tmp_path / "small.npy", np.zeros((3, 3), dtype=np.float32))
    Image.fromarray(np.zeros((6, 6, 3), dtype=np.uint8)).save(tmp_path / "rgb.png")
    args = {"no metadata": [], "bad npy": ["--input", str(tmp_path / "bad.npy")],
            "wrong shape": ["--input", str(tmp_path / "small.npy")], "bad target": ["--target", "7"],
            "picture for two channels": ["--input", str(tmp_path / "rgb.png")],
            "normalize and mean": ["--normalize", "imagenet", "--mean", "0"]}[problem]
    assert invoke("check", str(path), *args) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and fragment in err


def test_build_option_and_check_command(tmp_path, rng):
    source = tmp_path / "m.onnx"
    onnx.save(conv_dense(rng), source)
    out = tmp_path / "out.onnx"
    runner = CliRunner()
    result = runner.invoke(cli, ["build", str(source), "-o", str(out), "--composite", "montavon2019",
                                 "--layer-relevance"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(cli, ["check", str(out)])
    assert result.exit_code == 0, result.output
    rows = table("\n".join(result.output.splitlines()[1:]))
    assert [(name, row[1]) for name, row in rows.items()] == [("conv0", "zbox"), ("conv1", "gamma"),
                                                                 ("dense", "zero")]


def test_check_shows_positive_biases_absorbing_relevance_under_zplus(tmp_path, rng):
    """The chapter's warning case: large positive biases take most relevance under z+; in a chain the absorbed
    amounts and the input's total add up to the logit."""
    source = conv_dense(rng)
    for initializer in source.graph.initializer:
        if initializer.name.startswith("b"):
            values = np.abs(onnx.numpy_helper.to_array(initializer)) * 10 + 1
            initializer.CopyFrom(onnx.numpy_helper.from_array(values.astype(np.float32), initializer.name))
    path = tmp_path / "lrp.onnx"
    onnxlrp.save_atomic(onnxlrp.build(source, onnxlrp.load_composite("zplus"), layer_relevance=True), path)
    report = check(str(path))
    logit = float(report.splitlines()[1].split()[-1])
    absorbed = [float(row[3]) for row in table("\n".join(report.splitlines()[1:])).values()]
    total = float(report.splitlines()[-1].split()[2])
    np.testing.assert_allclose(total + sum(absorbed), logit, rtol=1e-4)
    assert min(absorbed) > 0 and sum(absorbed) > 0.5 * logit
    assert all(row[4] == "0.0%" for row in table("\n".join(report.splitlines()[1:])).values())  # z+: none negative


def test_check_on_a_quantized_model(tmp_path):
    """QDQ models are explained on a float twin whose tensors are renamed: the recorded names follow them."""
    path = tmp_path / "qdq_layers.onnx"
    onnxlrp.save_atomic(onnxlrp.build(FIXTURES / "quantized" / "cnn_qdq.onnx", layer_relevance=True), path)
    report = check(str(path)).splitlines()
    assert list(table("\n".join(report[1:]))) == ["/0/Conv", "/4/Conv", "/8/Conv", "/10/Conv", "/14/Gemm"]
    x = np.random.default_rng(0).standard_normal((1, 3, 16, 16)).astype(np.float32)  # check's own input
    relevance, = run(onnx.load(path), {"input": x}, ["relevance"])
    np.testing.assert_allclose(float(report[-1].split()[2]), relevance.sum(), rtol=1e-5)


def test_check_on_a_text_model(tmp_path):
    """The token ids are the input (the explained tensor is their embedding lookup); the attention mask is 1."""
    path = tmp_path / "bert_layers.onnx"
    onnxlrp.save_atomic(onnxlrp.build(FIXTURES / "transformers" / "bert_op17.onnx", "attnlrp", layer_relevance=True),
                        path)
    ids = np.array([[2, 17, 33, 8, 41, 0, 0, 0]])
    np.save(tmp_path / "ids.npy", ids)
    report = check(str(path), str(tmp_path / "ids.npy")).splitlines()
    logits, relevance = run(onnx.load(path), {"input_ids": ids, "attention_mask": np.ones_like(ids)},
                            ["logits", "relevance"])
    assert report[0] == "other inputs: attention_mask = 1"
    assert report[1] == f"sample 0: class {logits[0].argmax()} (predicted), logit {logits[0].max():.6g}"
    assert len(table("\n".join(report[1:]))) == 14  # 2 layers x 6 MatMuls, the pooler and the classifier
    np.testing.assert_allclose(float(report[-1].split()[2]), relevance.sum(), rtol=1e-5)
    with pytest.raises(onnxlrp.LrpError, match="input 'input_ids' has dynamic dimensions .*give --input"):
        check(str(path))


def test_check_draws_token_ids_below_the_vocabulary(tmp_path, rng):
    table_, dense = rng.normal(size=(10, 3)), rng.normal(size=(3, 2))
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["embedded"], name="lookup"),
         helper.make_node("ReduceMean", ["embedded"], ["pooled"], axes=[1], keepdims=0),
         helper.make_node("Gemm", ["pooled", "dense"], ["logits"], name="head")], "text",
        [helper.make_tensor_value_info("ids", onnx.TensorProto.INT64, [1, 4])],
        [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, [1, 2])],
        [onnx.numpy_helper.from_array(v.astype(np.float32), k) for k, v in (("table", table_), ("dense", dense))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    built = onnxlrp.build(model, "zero", layer_relevance=True)
    onnxlrp.save_atomic(built, tmp_path / "text.onnx")
    report = check(str(tmp_path / "text.onnx")).splitlines()
    ids = np.random.default_rng(0).integers(0, 10, size=(1, 4))
    assert report[0] == "no --input: a deterministic random input (token ids, uniform, seed 0) of shape [1, 4]"
    logits, relevance = run(built, {"ids": ids}, ["logits", "relevance"])
    assert report[1].endswith(f"logit {logits[0].max():.6g}")
    np.testing.assert_allclose(float(report[-1].split()[2]), relevance.sum(), rtol=1e-5)

"""Hostile or careless input: every case ends as one line on stderr naming the problem, and nothing is written
(issue 8: parameters, composite files, invalid models, names printed safely)."""
from __future__ import annotations

import sys

import numpy as np
import onnx
import pytest
from onnx import helper

from conftest import FIXTURES, make_model
from onnxlrp.app import cli
from onnxlrp.ir import interrupts


def build_in_process(capsys, monkeypatch, *args) -> str:
    """Run `onnxlrp build ARGS` in this process (as the console script does) and return its one error line."""
    monkeypatch.setattr(sys, "argv", ["onnxlrp", "build", *map(str, args)])
    monkeypatch.setattr(interrupts, "install", lambda: None)  # keep pytest's own Ctrl-C handling
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    assert exit_.value.code != 0
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("onnxlrp: error: "), lines
    assert "internal error" not in lines[0] and "Traceback" not in lines[0]
    return lines[0]


def assert_fails(capsys, monkeypatch, tmp_path, model, *args_and_fragments) -> str:
    args = [a for a in args_and_fragments if not isinstance(a, Fragment)]
    out = tmp_path / "out.onnx"
    line = build_in_process(capsys, monkeypatch, model, "-o", out, *args)
    for fragment in args_and_fragments:
        if isinstance(fragment, Fragment):
            assert fragment in line, line
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    return line


class Fragment(str):
    """Text the error line must contain (other positional arguments are passed to the command)."""


MLP = FIXTURES / "mlp_ts.onnx"
CNN = FIXTURES / "cnn_ts.onnx"


@pytest.mark.parametrize("option", ["--epsilon", "--gamma", "--alpha", "--beta"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_parameters_are_refused(capsys, monkeypatch, tmp_path, option, value):
    assert_fails(capsys, monkeypatch, tmp_path, MLP, f"{option}={value}", Fragment(option),
                 Fragment("must be a finite number"))


@pytest.mark.parametrize("option,fragment", [("--epsilon=-1e-3", "epsilon must be >= 0 (got epsilon=-0.001)"),
                                             ("--gamma=-0.5", "gamma must be >= 0"),
                                             ("--alpha=-1", "alpha, beta >= 0"),
                                             ("--beta=-2", "alpha, beta >= 0"),
                                             ("--low=0,nan", "low must be a finite number")])
def test_negative_parameters_are_refused(capsys, monkeypatch, tmp_path, option, fragment):
    assert_fails(capsys, monkeypatch, tmp_path, MLP, option, Fragment(fragment))


@pytest.mark.parametrize("text,fragments", [
    ("[params]\nstabilizer = nan\n", ["[params]", "stabilizer must be a finite number"]),
    ("[params]\nepsilon = -inf\n", ["[params]", "epsilon must be a finite number"]),
    ("[params]\nepsilon = 1e400\n", ["[params]", "epsilon must be a finite number"]),
    ("[params]\ngamma = 1" + "0" * 400 + "\n", ["[params]", "gamma must be a finite number"]),
    ("[params]\nstabilizer = -1e-6\n", ["[params]", "stabilizer must be >= 0"]),
    ('[[layers]]\nop_types = ["Gemm"]\nrule = "epsilon"\nepsilon = -0.1\n', ["entry 1", "epsilon must be >= 0"]),
    ('[[layers]]\nop_types = ["Gemm"]\nrule = "gamma"\ngamma = nan\n', ["entry 1", "gamma must be a finite"]),
    ("layers = 5\n", ["layers must be a list"]),
    ("params = 5\n", ["[params] must be a table"]),
    ("layers = [5]\n", ["entry 1 needs a 'rule'"]),
    ("[[layers]]\nrule = 5\n", ["entry 1", "unknown rule '5'"]),
    ('[[layers]]\nrule = "epsilon"\nnames = "dense"\n', ["entry 1", "names must be a list of strings"]),
    ('[[layers]]\nrule = "epsilon"\nepsilon = "big"\n', ["entry 1", "epsilon must be a number"]),
    ('[[layers]]\nrule = "epsilon"\nepsilon = true\n', ["entry 1", "epsilon must be a number"]),
    ('[params]\nlow = []\n', ["[params]", "low must be a number"]),
])
def test_composite_files_with_bad_values(capsys, monkeypatch, tmp_path, text, fragments):
    path = tmp_path / "mine.toml"
    path.write_text(text)
    assert_fails(capsys, monkeypatch, tmp_path, MLP, "--composite", path, Fragment("mine.toml"),
                 *map(Fragment, fragments))


def test_composite_files_that_cannot_be_read(capsys, monkeypatch, tmp_path):
    latin = tmp_path / "latin.toml"
    latin.write_bytes('description = "caf\u00e9"\n'.encode("latin-1"))
    assert_fails(capsys, monkeypatch, tmp_path, MLP, "--composite", latin, Fragment("latin.toml"),
                 Fragment("not UTF-8"))
    folder = tmp_path / "folder.toml"
    folder.mkdir()
    assert_fails(capsys, monkeypatch, tmp_path, MLP, "--composite", folder, Fragment("folder.toml"),
                 Fragment("is a folder"))
    folder.rmdir()


def test_a_preset_name_stays_the_preset_when_a_folder_has_its_name(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "epsilon").mkdir()
    monkeypatch.setattr(sys, "argv", ["onnxlrp", "build", str(MLP), "-o", "out.onnx", "--composite", "epsilon"])
    monkeypatch.setattr(interrupts, "install", lambda: None)
    cli.main()
    assert "composite epsilon" in capsys.readouterr().out and (tmp_path / "out.onnx").is_file()
    (tmp_path / "other").mkdir()
    assert_fails(capsys, monkeypatch, tmp_path / "other", MLP, "--composite", "other", Fragment("is a folder"))


def test_bounds_with_a_wrong_number_of_channels(capsys, monkeypatch, tmp_path):
    # cnn_ts.onnx's first convolution reads 3 channels.
    assert_fails(capsys, monkeypatch, tmp_path, CNN, "--composite", "epsilon_gamma_box", "--low=0,0",
                 Fragment("--low/--high"), Fragment("give 2 values"), Fragment("3 channels: give 1 value or 3"))
    # A dense first layer: one value or one per input feature.
    box = tmp_path / "box.toml"
    box.write_text('[[layers]]\nfirst_linear = true\nrule = "zbox"\n')
    assert_fails(capsys, monkeypatch, tmp_path, MLP, "--composite", box, "--high=1,2,3", Fragment("give 3 values"))


@pytest.mark.parametrize("source", ["command line", "composite"])
def test_bounds_of_different_lengths(capsys, monkeypatch, tmp_path, source):
    if source == "command line":
        args = ["--composite", "epsilon_gamma_box", "--low=0,0", "--high=1,1,1"]
    else:
        box = tmp_path / "box.toml"
        box.write_text('extends = "epsilon_gamma_box"\n[params]\nlow = [0.0, 0.0]\nhigh = [1.0, 1.0, 1.0]\n')
        args = ["--composite", box]
    assert_fails(capsys, monkeypatch, tmp_path, CNN, *args,
                 Fragment("low and high (--low/--high) give 2 and 3 values: give 1 value or one per channel"))


def small_model() -> onnx.ModelProto:
    nodes = [helper.make_node("Gemm", ["input", "w"], ["h"], name="dense"), helper.make_node("Relu", ["h"], ["logits"])]
    return make_model(nodes, [1, 4], [1, 3], {"w": np.arange(12).reshape(4, 3)})


def broken_models(tmp_path):
    """(file, fragments of the error) for each kind of invalid model."""
    cases = []

    def case(name, model, *fragments, **save):
        path = tmp_path / f"{name}.onnx"
        onnx.save(model, str(path), **save)
        cases.append((path, fragments))
        return path

    model = small_model()
    model.graph.node[0].input[0] = "logits"
    case("cycle", model, "cycle through node(s) 'dense', 'logits'")  # the unnamed Relu: named by its output
    model = small_model()
    model.graph.node.append(helper.make_node("Relu", ["input"], ["h"]))
    case("twice", model, "tensor 'h' is written twice", "'dense'", "node 'h'")
    model = small_model()
    del model.opset_import[:]
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    case("no_opset", model, "no opset import for the default ONNX domain")
    model = small_model()
    model.ir_version = 99
    case("ir", model, "unknown IR version 99")
    model = small_model()
    model.graph.initializer[0].raw_data = model.graph.initializer[0].raw_data[:20]
    case("short", model, "tensor 'w'", "has 20 bytes of data but needs 48")
    truncated = case("truncated", small_model(), "tensor 'w'", "48", "20", save_as_external_data=True,
                     location="truncated.data", size_threshold=0)
    (tmp_path / "truncated.data").write_bytes((tmp_path / "truncated.data").read_bytes()[:20])
    oversized = case("oversized", small_model(), "tensor 'w'", "has 64 bytes of data but needs 48",
                     save_as_external_data=True, location="oversized.data", size_threshold=0)
    with open(tmp_path / "oversized.data", "ab") as data:
        data.write(bytes(16))
    model = onnx.load(str(oversized), load_external_data=False)
    next(e for e in model.graph.initializer[0].external_data if e.key == "length").value = "64"
    onnx.save(model, str(oversized))
    assert truncated.exists()
    return cases


def test_invalid_models_are_one_line_each(capsys, monkeypatch, tmp_path):
    for path, fragments in broken_models(tmp_path):
        before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
        assert_fails(capsys, monkeypatch, tmp_path, path, Fragment(path.name), *map(Fragment, fragments))
        assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_names_from_the_model_are_printed_escaped(capsys, monkeypatch, tmp_path):
    evil = "norm\x1b[2J\x1b]0;owned\x07\r\nline\u202etxt\x9b1m"
    nodes = [helper.make_node("Sin", ["input"], ["n"], name=evil),  # an op type onnxlrp does not explain
             helper.make_node("Gemm", ["n", "w"], ["logits"], name="dense")]
    path = tmp_path / "evil.onnx"
    onnx.save(make_model(nodes, [1, 4], [1, 3], {"w": np.ones((4, 3))}), str(path))
    line = assert_fails(capsys, monkeypatch, tmp_path, path, Fragment("Sin"))
    assert "norm\\x1b[2J\\x1b]0;owned\\x07\\r\\nline\\u202etxt\\x9b1m" in line
    assert not any(ord(c) < 32 or 0x7f <= ord(c) < 0xa0 or c == "\u202e" for c in line)

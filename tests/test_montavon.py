"""The montavon2019 preset, the scaled epsilon, composites that extend a preset, and layer selection by depth."""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import helper

import onnxlrp
from conftest import FIXTURES, make_model, relative_error, run
from lrp_numpy import lrp_chain

VGG = np.load(FIXTURES / "vgg.npz")
BOUNDS = {k: tuple(np.atleast_1d(VGG[k]).tolist()) for k in ("low", "high")}
WTA = 'extends = "montavon2019"\n\n[[layers]]\nop_types = ["MaxPool"]\nrule = "wta"\n'


def montavon_rules(pool: str, bounds=BOUNDS) -> dict:
    """The preset's rules for the VGG fixture (4 convolutions: zB, then ceil(3/2) = 2 gamma and 1 epsilon)."""
    return {"/0/Conv": ("zbox", bounds), "/2/Conv": ("gamma", {"gamma": 0.25}), "/5/Conv": ("gamma", {"gamma": 0.25}),
            "/7/Conv": ("epsilon", {"epsilon": 0.0, "epsilon_scale": 0.25}), "/11/Gemm": ("zero", {}),
            "/14/Gemm": ("zero", {}), "/4/MaxPool": (pool, {}), "/9/MaxPool": (pool, {})}


def build_vgg(composite: str, model_file: str = "vgg_ts.onnx", **options) -> onnx.ModelProto:
    chosen = onnxlrp.load_composite(composite).with_params(BOUNDS)
    return onnxlrp.build(onnxlrp.load(FIXTURES / model_file), chosen, **options)


@pytest.mark.parametrize("model_file", ["vgg_ts.onnx", "vgg_dynamo.onnx"])
def test_montavon2019_with_winner_take_all_matches_zennit(model_file, tmp_path):
    path = tmp_path / "wta.toml"
    path.write_text(WTA)
    relevance, = run(build_vgg(str(path), model_file), {"input": VGG["input"], "target": VGG["target"]},
                     ["relevance"])
    reference = np.load(FIXTURES / "montavon2019.npz")["relevance/montavon2019_wta"]
    assert relative_error(relevance, reference) < 2e-6  # measured 4.4e-7 (both exports)


def test_numpy_reference_agrees_with_zennit():
    """The numpy reference that checks the sum-pooling preset is itself checked against Zennit (MaxPool wta)."""
    model = onnx.load(FIXTURES / "vgg_ts.onnx")
    _, relevance, _ = lrp_chain(model, VGG["input"], VGG["target"], montavon_rules("wta"))
    reference = np.load(FIXTURES / "montavon2019.npz")["relevance/montavon2019_wta"]
    assert relative_error(relevance, reference) < 1e-7  # measured 2.5e-8


def test_montavon2019_preset_matches_numpy():
    """The unmodified preset: MaxPool as sum pooling (`norm`), as the overview chapter does."""
    logits, relevance = run(build_vgg("montavon2019"), {"input": VGG["input"], "target": VGG["target"]},
                            ["logits", "relevance"])
    expected_logits, expected, _ = lrp_chain(onnx.load(FIXTURES / "vgg_ts.onnx"), VGG["input"], VGG["target"],
                                             montavon_rules("norm"))
    np.testing.assert_allclose(logits, expected_logits, rtol=1e-4, atol=1e-6)
    assert relative_error(relevance, expected) < 2e-6  # measured 5.4e-7
    # Sum pooling really differs from winner-take-all here (the test would not notice a wrong pooling rule).
    _, winner, _ = lrp_chain(onnx.load(FIXTURES / "vgg_ts.onnx"), VGG["input"], VGG["target"], montavon_rules("wta"))
    assert relative_error(winner, expected) > 0.1


def conv_dense(rng) -> onnx.ModelProto:
    """Conv (bias) -> Relu -> Conv (bias) -> Relu -> Flatten -> Gemm (transB, bias): a chain lrp_numpy reads."""
    init = {"w0": rng.normal(size=(4, 2, 3, 3)) / 3, "b0": rng.normal(size=4) * 0.3,
            "w1": rng.normal(size=(3, 4, 3, 3)) / 4, "b1": rng.normal(size=3) * 0.3,
            "wd": rng.normal(size=(5, 3 * 6 * 6)) / 8, "bd": rng.normal(size=5) * 0.3}
    nodes = [
        helper.make_node("Conv", ["input", "w0", "b0"], ["c0"], name="conv0", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c0"], ["r0"], name="relu0"),
        helper.make_node("Conv", ["r0", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Flatten", ["r1"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "wd", "bd"], ["logits"], name="dense", transB=1),
    ]
    return make_model(nodes, [1, 2, 6, 6], [1, 5], init)


@pytest.mark.parametrize("epsilon,scale", [(0.0, 0.25), (0.01, 0.5), (0.05, 0.0)])
def test_scaled_epsilon_formula(epsilon, scale, rng):
    """epsilon + scale * RMS of z over each sample's non-batch axes, on Conv and Gemm, against numpy."""
    model = conv_dense(rng)
    x = rng.normal(size=(3, 2, 6, 6)).astype(np.float32)
    target = np.array([-1, 1, 4])
    chosen = onnxlrp.load_composite("epsilon").with_params({"epsilon": epsilon, "epsilon_scale": scale})
    _, relevance = run(onnxlrp.build(model, chosen), {"input": x, "target": target})
    params = {"epsilon": epsilon, "epsilon_scale": scale}
    rules = {name: ("epsilon", params) for name in ("conv0", "conv1", "dense")}
    _, expected, _ = lrp_chain(model, x, target, rules)
    assert relative_error(relevance, expected) < 1e-5
    if scale:  # the scaled part matters: without it the result is clearly different
        _, plain, _ = lrp_chain(model, x, target, {n: ("epsilon", {"epsilon": epsilon}) for n in rules})
        assert relative_error(plain, expected) > 1e-2


def test_scaled_epsilon_on_the_command_line(tmp_path, rng):
    from click.testing import CliRunner
    from onnxlrp.app.cli import cli
    source = tmp_path / "m.onnx"
    onnx.save(conv_dense(rng), source)
    out = tmp_path / "out.onnx"
    result = CliRunner().invoke(cli, ["build", str(source), "-o", str(out), "--composite", "epsilon",
                                      "--epsilon", "0", "--epsilon-scale", "0.3"])
    assert result.exit_code == 0, result.output
    x = rng.normal(size=(2, 2, 6, 6)).astype(np.float32)
    _, relevance = run(onnx.load(out), {"input": x})
    params = {"epsilon": 0.0, "epsilon_scale": 0.3}
    _, expected, _ = lrp_chain(onnx.load(source), x, np.array([-1, -1]),
                               {n: ("epsilon", params) for n in ("conv0", "conv1", "dense")})
    assert relative_error(relevance, expected) < 1e-5


def test_logodds_refuses_a_scaled_epsilon_on_the_last_layer(rng):
    chosen = onnxlrp.load_composite("epsilon").with_params({"epsilon_scale": 0.25})
    with pytest.raises(onnxlrp.LrpError, match="logodds does not support epsilon_scale on the last layer 'dense'"):
        onnxlrp.build(conv_dense(rng), chosen, explain="logodds")


def test_negative_epsilon_scale_is_refused():
    with pytest.raises(onnxlrp.LrpError, match="epsilon_scale must be >= 0"):
        onnxlrp.load_composite("montavon2019").with_params({"epsilon_scale": -0.1})


def chain(ops: list[str]) -> list[gs.Node]:
    """Nodes named <op><i> in data-flow order (rule selection only looks at names, op types and order)."""
    return [gs.Node(op, f"{op.lower()}{i}") for i, op in enumerate(ops)]


def rules_of(composite: onnxlrp.Composite, nodes: list[gs.Node]) -> list[tuple[str, str]]:
    first = next(n for n in nodes if n.op in ("Conv", "Gemm"))
    return [(n.name, composite.rule_for(n, first, nodes)[0].name) for n in nodes]


VGG16 = (["Conv"] * 2 + ["MaxPool"] + ["Conv"] * 2 + ["MaxPool"] + ["Conv"] * 3 + ["MaxPool"] + ["Conv"] * 3
         + ["MaxPool"] + ["Conv"] * 3 + ["MaxPool"] + ["Gemm"] * 3)


def test_montavon2019_splits_vgg16_as_the_chapter():
    """conv1_1 zB, conv1_2 to conv3_3 gamma, conv4_1 to conv5_3 epsilon, dense LRP-0, MaxPool sum pooling."""
    nodes = chain(VGG16)
    rules = [rule for _, rule in rules_of(onnxlrp.load_composite("montavon2019"), nodes)]
    convs = [rule for rule, node in zip(rules, nodes) if node.op == "Conv"]
    assert convs == ["zbox"] + ["gamma"] * 6 + ["epsilon"] * 6
    assert [r for r, n in zip(rules, nodes) if n.op == "Gemm"] == ["zero"] * 3
    assert {r for r, n in zip(rules, nodes) if n.op == "MaxPool"} == {"norm"}
    params = onnxlrp.load_composite("montavon2019").rule_for(nodes[-5], nodes[0], nodes)[1]
    assert (params["epsilon"], params["epsilon_scale"]) == (0.0, 0.25)


@pytest.mark.parametrize("convs,gammas", [(2, 1), (3, 1), (4, 2), (5, 2), (8, 4)])
def test_montavon2019_gives_gamma_to_the_first_half_rounded_up(convs, gammas):
    nodes = chain(["Conv"] * convs + ["Gemm"])
    rules = [rule for _, rule in rules_of(onnxlrp.load_composite("montavon2019"), nodes)]
    remaining = convs - 1
    assert gammas == -(-remaining // 2)
    assert rules == ["zbox"] + ["gamma"] * gammas + ["epsilon"] * (remaining - gammas) + ["zero"]


def composite_file(tmp_path, text: str, name: str = "mine.toml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_extends_takes_the_preset_and_matches_own_entries_first(tmp_path):
    composite = onnxlrp.load_composite(composite_file(tmp_path, '''
extends = "montavon2019"
[params]
gamma = 0.5
[[layers]]
op_types = ["Conv"]
depth = [0.5, 1]
first_linear = false
rule = "zplus"
'''))
    nodes = chain(["Conv"] * 5 + ["MaxPool", "Gemm"])
    assert [r for _, r in rules_of(composite, nodes)] == ["zbox", "gamma", "gamma", "zplus", "zplus", "norm", "zero"]
    assert composite.rule_for(nodes[1], nodes[0], nodes)[1]["gamma"] == 0.5  # own params override
    assert composite.rule_for(nodes[0], nodes[0], nodes)[1]["low"] == 0.0  # the preset's params stay


def test_index_selects_positions_among_the_selected_layers(tmp_path):
    composite = onnxlrp.load_composite(composite_file(tmp_path, '''
[[layers]]
index = [1, 2]
rule = "gamma"
[[layers]]
op_types = ["Conv"]
index = -1
rule = "zplus"
[[layers]]
rule = "zero"
op_types = ["Conv", "Gemm"]
'''))
    nodes = chain(["Conv", "MaxPool", "Conv", "Conv", "Conv", "Gemm"])
    # Without op_types, index counts the linear layers (conv2 and conv3 are positions 1 and 2; the MaxPool is
    # not one and keeps its default); with op_types, it counts those (-1: conv4, the last Conv).
    assert [r for _, r in rules_of(composite, nodes)] == ["zero", "wta", "gamma", "gamma", "zplus", "zero"]


def test_depth_in_thirds(tmp_path):
    composite = onnxlrp.load_composite(composite_file(tmp_path, '''
[[layers]]
depth = [0, 0.3333333333333333]
rule = "flat"
[[layers]]
depth = [0.3333333333333333, 0.6666666666666666]
rule = "gamma"
[[layers]]
depth = [0.6666666666666666, 1]
rule = "zero"
'''))
    nodes = chain(["Conv"] * 6)
    assert [r for _, r in rules_of(composite, nodes)] == ["flat", "flat", "gamma", "gamma", "zero", "zero"]


def test_a_file_can_extend_another_file(tmp_path):
    composite_file(tmp_path, 'extends = "montavon2019"\n[params]\ngamma = 0.75\n', "base.toml")
    composite = onnxlrp.load_composite(composite_file(tmp_path, 'extends = "base.toml"\n[params]\nstabilizer = 0.01\n'))
    nodes = chain(["Conv"] * 3)
    params = composite.rule_for(nodes[1], nodes[0], nodes)[1]
    assert (params["gamma"], params["stabilizer"]) == (0.75, 0.01)


@pytest.mark.parametrize("text,fragment", [
    ('extends = "nonesuch"\n', "unknown composite 'nonesuch'"),
    ('extends = 3\n', "extends must be a preset name or a file path"),
    ('extends = "mine.toml"\n', "in a circle"),
    ('[[layers]]\nrule = "zero"\ndepth = [0.5, 0.2]\n', "depth must be a list [low, high]"),
    ('[[layers]]\nrule = "zero"\ndepth = [0, 2]\n', "depth must be a list [low, high]"),
    ('[[layers]]\nrule = "zero"\nindex = [1.5, 2]\n', "index must be an integer"),
    ('[[layers]]\nrule = "zero"\nindex = "1"\n', "index must be an integer"),
])
def test_bad_extends_and_selection(tmp_path, text, fragment):
    with pytest.raises(onnxlrp.LrpError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        onnxlrp.load_composite(composite_file(tmp_path, text))


def test_circular_extends_between_two_files(tmp_path):
    composite_file(tmp_path, 'extends = "b.toml"\n', "a.toml")
    composite_file(tmp_path, 'extends = "a.toml"\n', "b.toml")
    with pytest.raises(onnxlrp.LrpError, match="in a circle"):
        onnxlrp.load_composite(str(tmp_path / "a.toml"))


def test_the_readme_example_of_extends(tmp_path):
    """The extending file in README's "Your own composite" does what the text says."""
    readme = (FIXTURES.parent / "README.md").read_text()
    example = next(block for block in readme.split("```toml\n")[1:] if block.startswith('extends = "montavon2019"'))
    composite = onnxlrp.load_composite(composite_file(tmp_path, example.split("```")[0]))
    nodes = chain(["Conv"] * 7 + ["MaxPool", "Gemm"])
    assert [r for _, r in rules_of(composite, nodes)] == \
        ["zbox", "gamma", "gamma", "epsilon", "epsilon", "epsilon", "epsilon", "wta", "zero"]

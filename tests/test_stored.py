"""Built models that store what a session would compute when it starts: `--fold-weights` (the modified weights)
and `--optimize-for cpu` (ONNX Runtime's optimised model); both give the default build's outputs and relevance."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

import onnxlrp
from conftest import FIXTURES, onnxlrp_cli, relative_error, run

FEEDS = [np.load(FIXTURES / "vgg.npz")["target"][:2], np.array([-1, 3], dtype=np.int64)]


def assert_same_outputs(built: onnx.ModelProto, default: onnx.ModelProto) -> None:
    data = np.load(FIXTURES / "vgg.npz")
    for target in FEEDS:
        feeds = {"input": data["input"][:2], "target": target}
        for a, e in zip(run(built, feeds), run(default, feeds)):
            assert relative_error(a, e) < 1e-6


@pytest.fixture(scope="module")
def vgg():
    return onnxlrp.load(FIXTURES / "vgg_ts.onnx")


@pytest.mark.parametrize("composite", ["epsilon_plus_flat", "epsilon_gamma_box"])
def test_fold_weights_stores_the_modified_weights_and_changes_no_output(composite, vgg):
    default = onnxlrp.build(vgg, composite)
    folded = onnxlrp.build(vgg, composite, fold_weights=True)
    # No node computes a tensor from weights alone any more; the modified weights are stored.
    initializers = {t.name for t in folded.graph.initializer}
    assert not [n.name for n in folded.graph.node if n.input and all(i in initializers for i in n.input if i)
                and n.input[0] != "target"]
    assert folded.ByteSize() > 1.5 * default.ByteSize()
    assert_same_outputs(folded, default)


def test_cli_fold_weights_writes_the_folded_model(tmp_path):
    out = tmp_path / "folded.onnx"
    result = onnxlrp_cli("build", str(FIXTURES / "cnn_ts.onnx"), "-o", str(out), "--composite", "epsilon_plus_flat",
                         "--fold-weights")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folded.onnx"]  # no temporary file left
    written = onnx.load(str(out))
    expected = onnxlrp.build(FIXTURES / "cnn_ts.onnx", "epsilon_plus_flat", fold_weights=True)
    assert [n.op_type for n in written.graph.node] == [n.op_type for n in expected.graph.node]
    assert out.stat().st_size > 1.5 * (FIXTURES / "cnn_ts.onnx").stat().st_size


@pytest.mark.parametrize("composite", ["epsilon", "epsilon_gamma_box"])
def test_optimize_for_cpu_is_onnx_runtimes_optimised_model(composite, vgg):
    default = onnxlrp.build(vgg, composite)
    optimized = onnxlrp.build(vgg, composite, optimize_for="cpu")
    domains = {n.domain for n in optimized.graph.node}
    assert "com.microsoft.nchwc" in domains  # convolutions in the blocked layout, their weights reordered
    assert {p.key for p in optimized.metadata_props} == {p.key for p in default.metadata_props}
    assert_same_outputs(optimized, default)


def test_cli_optimize_for_cpu_writes_atomically_with_its_weights_beside(tmp_path):
    """The weights go to OUT.data, which ONNX Runtime maps into memory when a session starts."""
    out = tmp_path / "optimized.onnx"
    result = onnxlrp_cli("build", FIXTURES / "vgg_ts.onnx", "-o", out, "--optimize-for", "cpu")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["optimized.onnx", "optimized.onnx.data"]
    assert out.stat().st_size < 0.2 * (FIXTURES / "vgg_ts.onnx").stat().st_size
    written = onnx.load(str(out))
    assert "com.microsoft.nchwc" in {n.domain for n in written.graph.node}
    assert_same_outputs(written, onnxlrp.build(FIXTURES / "vgg_ts.onnx", "epsilon_plus_flat"))
    refused = onnxlrp_cli("build", FIXTURES / "cnn_ts.onnx", "-o", tmp_path / "other.onnx", "--optimize-for", "tpu")
    assert refused.returncode != 0 and "tpu" in refused.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["optimized.onnx", "optimized.onnx.data"]


def test_optimize_for_an_unknown_runtime_is_an_error(vgg):
    with pytest.raises(onnxlrp.LrpError, match="--optimize-for must be one of cpu"):
        onnxlrp.build(vgg, "epsilon", optimize_for="cuda")

"""Files: the user's umask, long output names, models with an external data file (written as models over 2 GB
are, with a small threshold), the input's files never touched, and signals that leave nothing behind."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import onnxlrp
from onnxlrp.ir import files as io
from conftest import FIXTURES, explain, onnxlrp_cli

MLP = FIXTURES / "mlp_ts.onnx"
VGG = FIXTURES / "vgg_ts.onnx"


def leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def outputs(path, x) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x})


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_the_model_is_written_with_the_users_umask(tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        onnxlrp.save_atomic(explain(onnx.load(str(MLP))), tmp_path / "out.onnx")
    finally:
        os.umask(previous)
    assert (tmp_path / "out.onnx").stat().st_mode & 0o777 == mode


def test_a_long_output_name(tmp_path):
    out = tmp_path / ("m" * 250 + ".onnx")[-250:]
    onnxlrp.save_atomic(explain(onnx.load(str(MLP))), out)
    assert out.is_file() and not leftovers(tmp_path)


def test_external_data_above_the_size_limit(tmp_path, monkeypatch):
    """The branch models over 2 GB take (the limit lowered): OUT and OUT.data, same outputs, rebuilds grow nothing."""
    x = np.load(FIXTURES / "mlp.npz")["input"]
    onnxlrp.save_atomic(explain(onnx.load(str(MLP))), tmp_path / "single.onnx")
    monkeypatch.setattr(io, "MAX_SINGLE_FILE", 1000)
    out = tmp_path / "big.onnx"
    sizes = []
    for _ in range(2):
        onnxlrp.save_atomic(explain(onnx.load(str(MLP))), out)
        sizes.append(((tmp_path / "big.onnx.data").stat().st_size, out.stat().st_size))
    assert sizes[0] == sizes[1] and sizes[0][0] > sizes[0][1]
    assert not leftovers(tmp_path)
    for expected, actual in zip(outputs(tmp_path / "single.onnx", x), outputs(out, x)):
        np.testing.assert_array_equal(expected, actual)
    locations = {e.value for t in onnx.load(str(out), load_external_data=False).graph.initializer
                 for e in t.external_data if e.key == "location"}
    assert locations == {"big.onnx.data"}


def test_the_inputs_files_are_never_replaced(tmp_path, monkeypatch):
    """An input whose data file has the name the output's data file would get, and an output named like it."""
    source = tmp_path / "source.onnx"
    onnx.save(onnx.load(str(MLP)), str(source), save_as_external_data=True, location="out.onnx.data",
              size_threshold=0)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    monkeypatch.setattr(io, "MAX_SINGLE_FILE", 1000)
    built = explain(onnxlrp.load(source))
    for out in ("out.onnx", "out.onnx.data"):
        with pytest.raises(onnxlrp.LrpError, match="out.onnx.data, a file of the input model"):
            onnxlrp.save_atomic(built, tmp_path / out)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def handlers_installed(pid: int) -> bool:
    """Whether the process catches SIGTERM, which Python does not by default: onnxlrp's handlers are in place."""
    try:
        with open(f"/proc/{pid}/status") as status:
            caught = next(int(line.split()[1], 16) for line in status if line.startswith("SigCgt:"))
    except (OSError, StopIteration):
        return False
    return bool(caught & (1 << (signal.SIGTERM - 1)))


def run_and_signal(args, number, delay, cwd, after_install: bool) -> subprocess.CompletedProcess:
    process = subprocess.Popen([sys.executable, *args], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    while after_install and not handlers_installed(process.pid) and process.poll() is None:
        time.sleep(0.002)
    time.sleep(delay)
    process.send_signal(number)
    out, err = process.communicate(timeout=60)
    return subprocess.CompletedProcess(args, process.returncode, out, err)


@pytest.mark.parametrize("number", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_while_the_files_are_written_removes_them(tmp_path, number):
    script = ("import sys, time; from pathlib import Path; from onnxlrp.ir import interrupts; interrupts.install()\n"
              "with interrupts.temporary_files(Path('.'), 2):\n"
              "    print('written', flush=True); time.sleep(30)\n")
    process = subprocess.Popen([sys.executable, "-c", script], cwd=tmp_path, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    assert process.stdout.readline() == "written\n" and len(leftovers(tmp_path)) == 2
    process.send_signal(number)
    _, err = process.communicate(timeout=30)
    assert process.returncode == 128 + number and err == "onnxlrp: error: interrupted\n"
    assert not leftovers(tmp_path)


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads signal masks from Linux's /proc")
@pytest.mark.parametrize("number,delay", [(signal.SIGTERM, 0.0), (signal.SIGTERM, 0.05), (signal.SIGINT, 0.0),
                                          (signal.SIGINT, 0.2), (signal.SIGTERM, 0.5), (signal.SIGINT, 0.9),
                                          (signal.SIGINT, 1.2)])
def test_a_signal_at_any_moment_of_a_build(tmp_path, number, delay):
    """From start-up (the imports) to the write: no traceback, no temporary file, no output or a complete one.

    SIGTERM is sent `delay` after the start; SIGINT `delay` after onnxlrp installed its handlers (the first tenth
    of a second is Python's own start-up, where Ctrl-C raises KeyboardInterrupt before any onnxlrp code runs).
    """
    after_install = number == signal.SIGINT
    result = run_and_signal(["-m", "onnxlrp", "build", VGG, "-o", "out.onnx"], number, delay, tmp_path,
                            after_install)
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) <= 1, result.stderr
    assert not leftovers(tmp_path)
    if (tmp_path / "out.onnx").exists():  # written before the signal came (it may come during Python's exit)
        onnx.checker.check_model(str(tmp_path / "out.onnx"))
    else:
        assert result.returncode in (128 + number, -number)  # -number: killed before the handlers were in place
        assert result.stderr in ("", "onnxlrp: error: interrupted\n")


def test_the_model_is_serialized_tensor_by_tensor_to_the_same_proto(tmp_path):
    built = explain(onnx.load(str(VGG)), "epsilon_plus_flat")
    onnxlrp.save_atomic(built, tmp_path / "out.onnx")
    assert onnx.load(str(tmp_path / "out.onnx")) == built
    assert (tmp_path / "out.onnx").stat().st_size == built.ByteSize()


def test_a_model_read_from_a_file_is_let_go_during_the_build(monkeypatch):
    """`onnxlrp.build(path)` keeps no reference to the model it read once the graph holds its own weights (before,
    api.build and pipeline.build held it to the end: the source's weights stayed in memory beside the built model's).
    The count is taken when the built model is exported: the test's list and getrefcount's argument."""
    from onnxlrp import api, pipeline
    read, counts = [], []
    monkeypatch.setattr(api, "load", lambda path, **options: read.append(io.load(path, **options)) or read[-1])
    export = pipeline.export_model
    monkeypatch.setattr(pipeline, "export_model",
                        lambda graph: counts.append(sys.getrefcount(read[0])) or export(graph))
    built = onnxlrp.build(FIXTURES / "llm" / "qwen2_op17.onnx", "attnlrp")
    assert counts == [2] and any(value.name == "relevance" for value in built.graph.output)


def test_external_weights_are_read_straight_into_the_graph(tmp_path, monkeypatch):
    """A model whose weights are in an external data file: `onnxlrp.build(path)` and `onnxlrp build` read them into
    the graph's arrays, never into the model read (which would hold them beside the graph's until the end), and
    build what the model read with its weights builds."""
    from onnxlrp import api
    source = tmp_path / "source.onnx"
    onnx.save(onnx.load(str(MLP)), str(source), save_as_external_data=True, location="source.onnx.data",
              size_threshold=0)
    read = []
    monkeypatch.setattr(api, "load", lambda path, **options: read.append(io.load(path, **options)) or read[-1])
    built = onnxlrp.build(source, "epsilon")
    stored = [t for t in read[0].graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert len(stored) >= 4 and not any(t.raw_data for t in stored)
    onnxlrp.save_atomic(built, tmp_path / "api.onnx")
    onnxlrp.save_atomic(onnxlrp.build(onnx.load(str(source)), "epsilon"), tmp_path / "loaded.onnx")
    assert onnxlrp_cli("build", source, "-o", tmp_path / "cli.onnx", "--composite", "epsilon").returncode == 0
    x = np.load(FIXTURES / "mlp.npz")["input"]
    for name in ("api", "cli"):
        for expected, actual in zip(outputs(tmp_path / "loaded.onnx", x), outputs(tmp_path / f"{name}.onnx", x)):
            np.testing.assert_array_equal(expected, actual)


def test_the_canonical_graph_reads_every_tensor_of_the_source():
    """No constant of the canonical graph is left lazily reading the source (Qwen2's Constant nodes and its
    ConstantOfShape's value included): one sub-message left keeps the whole source model in memory."""
    import onnx_graphsurgeon as gs
    from onnx_graphsurgeon.ir.tensor import LazyValues
    from onnxlrp.canonical.passes import canonicalize
    graph = canonicalize(onnx.load(str(FIXTURES / "llm" / "qwen2_op17.onnx")), "qwen2")
    values = [*graph.tensors().values(), *(value for node in graph.nodes for value in node.attrs.values())]
    constants = [value for value in values if isinstance(value, gs.Constant)]
    assert any(node.op == "ConstantOfShape" for node in graph.nodes) and len(constants) > 100
    assert [c.name for c in constants if isinstance(c._values, LazyValues)] == []

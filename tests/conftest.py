"""Shared helpers: building small ONNX graphs with numpy weights, and running models in ONNX Runtime (CPU)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxlrp

ort.set_default_logger_severity(3)
FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
MANIFEST = json.loads((FIXTURES / "manifest.json").read_text())


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def run(model: onnx.ModelProto, feeds: dict, outputs=None) -> list[np.ndarray]:
    return session(model).run(outputs, feeds)


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


def explain(model: onnx.ModelProto, composite: str = "epsilon", explain: str = "logit", **params) -> onnx.ModelProto:
    return onnxlrp.build(model, onnxlrp.load_composite(composite).with_params(params), explain=explain)


def assert_padded_text(model: onnx.ModelProto, references: dict, expected_alone: np.ndarray) -> None:
    """A padded batch of two texts (`references`: input_ids, attention_mask, targets): relevance per token is the
    embedding relevance summed, padded tokens get exactly 0, and the padded text's tokens get the relevance of the
    text run alone, which is `expected_alone` (the reference's)."""
    ids, mask, targets = references["input_ids"], references["attention_mask"], references["targets"]
    token, embedding = run(model, {"input_ids": ids, "attention_mask": mask, "target": targets},
                           ["relevance", "relevance_embedding"])
    assert token.shape == ids.shape
    np.testing.assert_allclose(token, embedding.sum(-1), rtol=1e-5, atol=1e-7)
    length = int(mask[1].sum())
    assert np.all(embedding[1, length:] == 0) and np.all(token[1, length:] == 0)
    assert np.all(embedding[1, :length] != 0) and np.all(token[1, :length] != 0)
    alone = run(model, {"input_ids": ids[1:, :length], "attention_mask": mask[1:, :length], "target": targets[1:]},
                ["relevance_embedding"])[0]
    assert relative_error(embedding[1:, :length], alone) < 1e-5
    assert relative_error(alone[0], expected_alone[:length]) < 1e-4


def make_model(nodes, input_shape, output_shape, initializers=(), opset=17, output="logits") -> onnx.ModelProto:
    """A float32 model with input `input` of `input_shape` (first dim symbolic) and one output."""
    graph = helper.make_graph(
        nodes, "test",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", *input_shape[1:]])],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, ["N", *output_shape[1:]])],
        [numpy_helper.from_array(np.asarray(v, dtype=np.float32), k) for k, v in dict(initializers).items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def finite_difference_gradient(model: onnx.ModelProto, x: np.ndarray, target: int, step: float = 1e-2,
                               output: str | None = None) -> np.ndarray:
    """d logit[target] / d x for one sample, by forward differences (exact for piecewise-linear nets)."""
    names = [output] if output else None
    base = run(model, {"input": x}, names)[0][0, target]
    shifted = x + step * np.eye(x.size, dtype=np.float32).reshape(x.size, *x.shape[1:])
    return ((run(model, {"input": shifted}, names)[0][:, target] - base) / step).reshape(x.shape)


def onnxlrp_cli(*args, **options) -> subprocess.CompletedProcess:
    """The command as a user runs it, in a fresh process (options: cwd, env)."""
    return subprocess.run([sys.executable, "-m", "onnxlrp", *map(str, args)], capture_output=True, text=True,
                          **options)


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    """A failed command: one line on stderr naming the problem, no traceback."""
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("onnxlrp: error: ") and "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]

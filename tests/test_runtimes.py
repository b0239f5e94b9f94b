"""Opt-in (`pytest -m runtimes`, needs `pip install -e '.[runtimes]'`): built models run in OpenVINO (CPU, float32
inference) with ONNX Runtime's relevance, the class chosen through the required `target` input."""
from __future__ import annotations

import sys

import numpy as np
import onnx
import pytest

import onnxlrp
from conftest import FIXTURES, relative_error, run

sys.path.insert(0, str(FIXTURES))
from seeded import materialize  # noqa: E402

pytestmark = pytest.mark.runtimes
# (model, preset); the last two only with epsilon_plus_flat: gamma on their seeded weights is ill-conditioned in
# float32 (ONNX Runtime's own relevance moves by 3e-4 between its optimisation levels).
ZOO = [(name, composite) for name in ("resnet18", "mobilenet_v2", "squeezenet1_1", "densenet121")
       for composite in ("epsilon_plus_flat", "epsilon_gamma_box")] + \
      [("shufflenet_v2_x0_5", "epsilon_plus_flat"), ("mobilenet_v3_small", "epsilon_plus_flat")]
TOLERANCE = 1e-4


def openvino_run(model: onnx.ModelProto, feeds: dict) -> dict[str, np.ndarray]:
    import openvino as ov  # the `runtimes` extra: imported here, so that deselected runs need none
    core = ov.Core()
    compiled = core.compile_model(core.read_model(model.SerializeToString(), b""), "CPU",
                                  {"INFERENCE_PRECISION_HINT": "f32"})
    results = compiled(feeds)
    return {name: results[output] for output in compiled.outputs for name in output.get_names()}


def assert_same_as_onnxruntime(built: onnx.ModelProto, x: np.ndarray, target: np.ndarray) -> None:
    feeds = {"input": x, "target": target}
    logits, relevance = run(built, feeds, ["logits", "relevance"])
    got = openvino_run(built, feeds)
    assert relative_error(got["logits"], logits) < TOLERANCE
    assert relative_error(got["relevance"], relevance) < TOLERANCE


@pytest.mark.parametrize("composite", onnxlrp.preset_names())
@pytest.mark.parametrize("name", ["mlp", "cnn", "vgg"])
def test_fixtures_match_onnxruntime(name, composite):
    data = np.load(FIXTURES / f"{name}.npz")
    params = {k: tuple(np.atleast_1d(data[k]).tolist()) for k in ("low", "high")}
    built = onnxlrp.build(FIXTURES / f"{name}_ts.onnx", composite, target_default=False, **params)
    assert "target" in {i.name for i in built.graph.input} - {t.name for t in built.graph.initializer}
    target = np.array([1, -1, 0], dtype=np.int64)[:len(data["input"])]
    assert_same_as_onnxruntime(built, data["input"], target)


@pytest.mark.parametrize("name, composite", ZOO)
def test_zoo_matches_onnxruntime(name, composite):
    model = materialize(onnxlrp.load(FIXTURES / "zoo" / f"{name}.onnx"))
    built = onnxlrp.build(model, composite, target_default=False)
    x = np.random.default_rng(0).normal(size=(2, 3, 64, 64)).astype(np.float32)
    assert_same_as_onnxruntime(built, x, np.array([7, -1], dtype=np.int64))


def test_target_selects_the_class():
    data = np.load(FIXTURES / "cnn.npz")
    built = onnxlrp.build(FIXTURES / "cnn_ts.onnx", "epsilon_plus_flat", target_default=False)
    x = data["input"][:1]
    maps = [openvino_run(built, {"input": x, "target": np.array([c], dtype=np.int64)})["relevance"]
            for c in range(3)]
    for c, relevance in enumerate(maps):
        expected = run(built, {"input": x, "target": np.array([c], dtype=np.int64)}, ["relevance"])[0]
        assert relative_error(relevance, expected) < TOLERANCE
    assert relative_error(maps[0], maps[1]) > 0.1 and relative_error(maps[1], maps[2]) > 0.1

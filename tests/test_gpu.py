"""On a GPU machine only (opt-in: `pytest -m gpu`, with onnxruntime-gpu): the built graphs run on the CUDA
provider with the CPU's relevance, and `Explainer(device="cuda")` really runs there."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

import onnxlrp
from conftest import FIXTURES, MANIFEST, explain, relative_error
from onnxlrp.api import CUDA_OPTIONS

pytestmark = pytest.mark.gpu
PRESETS = ("epsilon", "epsilon_plus_flat", "epsilon_gamma_box", "epsilon_alpha2_beta1", "montavon2019")


def run_on(model, provider: str, feeds: dict) -> tuple[list[np.ndarray], str]:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    chosen = (provider, CUDA_OPTIONS) if provider == "CUDAExecutionProvider" else provider
    session = ort.InferenceSession(model.SerializeToString(), options, providers=[chosen, "CPUExecutionProvider"])
    return session.run(None, feeds), session.get_providers()[0]


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("name", sorted(MANIFEST))
def test_cuda_relevance_equals_the_cpu_relevance(name, preset):
    data = np.load(FIXTURES / f"{name}.npz")
    built = explain(onnxlrp.load(FIXTURES / MANIFEST[name]["models"][0]), preset)
    feeds = {"input": data["input"], "target": data["target"]}
    cpu, _ = run_on(built, "CPUExecutionProvider", feeds)
    cuda, provider = run_on(built, "CUDAExecutionProvider", feeds)
    assert provider == "CUDAExecutionProvider"
    assert relative_error(cuda[0], cpu[0]) < 1e-5
    assert relative_error(cuda[1], cpu[1]) < 1e-4


def test_explainer_runs_on_cuda():
    x = np.load(FIXTURES / "vgg.npz")["input"]
    on_gpu = onnxlrp.Explainer(FIXTURES / "vgg_ts.onnx", device="cuda")
    assert on_gpu.session.get_providers()[0] == "CUDAExecutionProvider"
    logits, relevance = on_gpu.explain(x)
    cpu_logits, cpu_relevance = onnxlrp.Explainer(FIXTURES / "vgg_ts.onnx").explain(x)
    assert relative_error(logits, cpu_logits) < 1e-5 and relative_error(relevance, cpu_relevance) < 1e-4

"""Every CNN family and exporter: torchvision architectures (fixtures/zoo, weights drawn from a seed), the
dynamo and older TorchScript exporters, Keras through tf2onnx, scikit-learn through skl2onnx; torchvision's
transformers and ConvNeXt."""
from __future__ import annotations

import functools
import json
import sys

import numpy as np
import onnx
import pytest
from onnx import helper

import onnxlrp
import onnxlrp.pipeline
from conftest import FIXTURES, explain, make_model, relative_error, run, session

sys.path.insert(0, str(FIXTURES))
from seeded import materialize  # noqa: E402

ZOO = FIXTURES / "zoo"
MANIFEST = json.loads((ZOO / "manifest.json").read_text())
MODELS = {**MANIFEST["families"], **MANIFEST["variants"]}
TRANSFORMERS = MANIFEST["transformers"]
IMAGENET_BOUNDS = {k: tuple(v) for k, v in MANIFEST["bounds"].items()}
# Every preset keeps the sum of relevance within two orders of magnitude of the logit. Rules whose denominators
# are sums of non-negative terms only absorb relevance (biases, stabilizer), never amplify it; the epsilon and
# alpha-beta presets may legitimately do both (alpha2_beta1 gives ~40x on EfficientNetV2's linear bottlenecks).
ABSORBING = ("epsilon_plus", "epsilon_plus_flat", "epsilon_gamma_box", "zplus", "gamma")
# CI time (2 cores): the transformer presets run on one CNN family, MaxViT (a 10k-node built graph, 10 to 25 s a
# preset) on the transformer presets and the default; every other pair runs. All pairs passed when run by hand.
TRANSFORMER_PRESETS = ("attnlrp", "cp_lrp", "cp_lrp_gamma")
EVERY_PRESET_CNN = "resnet18"
MAXVIT_PRESETS = TRANSFORMER_PRESETS + ("epsilon_plus_flat",)


@pytest.fixture(autouse=True)
def no_load_check(monkeypatch):
    """Every model built here is run in ONNX Runtime by the test itself, which checks that it loads: the build's own
    load check would start a second session per build (measured: 19 s per preset over the CNN families, DenseNet-121
    4.4 s of it): an estimated 5 to 7 minutes of CI time."""
    monkeypatch.setattr(onnxlrp.pipeline, "require_loadable", lambda model, source: None)


@functools.lru_cache(maxsize=2)
def zoo_model(file: str) -> onnx.ModelProto:
    return materialize(onnxlrp.load(ZOO / file))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_family_builds_with_every_preset(name):
    info = MODELS[name]
    model = zoo_model(info["file"])
    x = np.random.default_rng(0).normal(size=(1, 3, info["side"], info["side"])).astype(np.float32)
    for composite in onnxlrp.preset_names():
        if composite in TRANSFORMER_PRESETS and name != EVERY_PRESET_CNN:
            continue
        built = explain(model, composite, **IMAGENET_BOUNDS)
        logits, relevance = run(built, {"input": x}, ["logits", "relevance"])
        explained = logits.max()
        assert relevance.shape == x.shape
        assert np.all(np.isfinite(relevance)) and np.abs(relevance).sum() > 0, composite
        ratio = relevance.sum() / explained
        assert 0.01 < abs(ratio) < 100, f"{composite}: sum of relevance / logit = {ratio:.3g}"
        if composite in ABSORBING:
            assert 0.01 < ratio < 1.1, f"{composite}: sum of relevance / logit = {ratio:.3g}"


@functools.lru_cache(maxsize=1)
def transformer_case(name: str) -> tuple[onnx.ModelProto, np.ndarray, np.ndarray]:
    """The model with its drawn weights, one input and the model's own logits for it."""
    info = TRANSFORMERS[name]
    model = materialize(onnxlrp.load(ZOO / info["file"]))
    x = np.random.default_rng(0).normal(size=(1, 3, info["side"], info["side"])).astype(np.float32)
    return model, x, run(model, {"input": x})[0]


@pytest.mark.parametrize("name, composite", [  # the preset varies fastest: one model in memory at a time
    (name, composite) for name in sorted(TRANSFORMERS) for composite in onnxlrp.preset_names()
    if name != "maxvit_t" or composite in MAXVIT_PRESETS])
def test_transformers_build_with_every_preset(name, composite):
    """torchvision's ViT-B/16, Swin-T (shifted windows: rolls as Slice/Concat, window partitions, an attention
    mask computed from shapes), MaxViT-T (Einsum, depthwise convolutions, squeeze-excitation, relative-position
    biases) and ConvNeXt-T (LayerNorm over channels last, layer scale): the logits stay the model's, the relevance
    is finite and not zero. ConvNeXt has no softmax and its biases are small: under attnlrp it conserves."""
    model, x, expected = transformer_case(name)
    logits, relevance = run(explain(model, composite, **IMAGENET_BOUNDS), {"input": x}, ["logits", "relevance"])
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    assert relevance.shape == x.shape
    assert np.all(np.isfinite(relevance)) and np.abs(relevance).sum() > 0
    if name == "convnext_tiny" and composite == "attnlrp":
        assert relevance.sum() == pytest.approx(logits.max(), rel=1e-2)


# Relative L2 error of the relevance against Zennit's, per model and preset: 3 to 4 times what was measured with
# ONNX Runtime 1.32's CPU provider (in the comments, in the order of the keys).
ZENNIT_TOLERANCE = {
    # 4.2e-7, 2.4e-7, 3.2e-7
    "densenet121": {"epsilon_plus_flat": 1.5e-6, "epsilon_gamma_box": 1e-6, "epsilon_alpha2_beta1": 1e-6},
    # 2.6e-6, 2.6e-6, 1.6e-5
    "mobilenet_v2": {"epsilon_plus_flat": 1e-5, "epsilon_gamma_box": 1e-5, "epsilon_alpha2_beta1": 5e-5},
    # 6.1e-7, 1.2e-6, 3.2e-6
    "resnet18": {"epsilon_plus_flat": 2e-6, "epsilon_gamma_box": 4e-6, "epsilon_alpha2_beta1": 1e-5},
    # 5.6e-6, 1.0e-5, 2.8e-5
    "resnet50": {"epsilon_plus_flat": 2e-5, "epsilon_gamma_box": 4e-5, "epsilon_alpha2_beta1": 1e-4},
}


@pytest.mark.parametrize("composite", ["epsilon_plus_flat", "epsilon_gamma_box", "epsilon_alpha2_beta1"])
@pytest.mark.parametrize("name", sorted(MANIFEST["parity"]))
def test_zoo_matches_zennit(name, composite):
    """ResNets with Zennit's ResNetCanonizer; DenseNet-121 and MobileNetV2 with the fixture script's
    canonizers (residual sums and pooling as modules, BatchNorm merged where it follows a convolution)."""
    info = MANIFEST["parity"][name]
    data = np.load(ZOO / info["references"])
    built = explain(zoo_model(info["file"]), composite, **IMAGENET_BOUNDS)
    logits, relevance = run(built, {"input": data["input"], "target": data["target"]}, ["logits", "relevance"])
    np.testing.assert_allclose(logits, data["logits"], rtol=1e-4, atol=1e-4 * np.abs(data["logits"]).max())
    assert relative_error(relevance, data[f"relevance/{composite}"]) < ZENNIT_TOLERANCE[name][composite]


@pytest.mark.parametrize("variant", ["resnet18_opset11", "resnet18_opset13"])
def test_older_opsets_give_the_same_relevance(variant):
    """The same ResNet-18 (same initializer names, so the same weights) exported at opsets 11, 13 and 17."""
    x = np.random.default_rng(1).normal(size=(2, 3, 64, 64)).astype(np.float32)
    reference = run(explain(zoo_model("resnet18.onnx"), "epsilon_plus_flat"), {"input": x})[1]
    old = zoo_model(MODELS[variant]["file"])
    built = explain(old, "epsilon_plus_flat")
    # Overlapping max pooling needs ScatterElements with reduction: opset 16 at least.
    assert built.opset_import[0].version == max(16, old.opset_import[0].version)
    assert relative_error(run(built, {"input": x})[1], reference) < 1e-5


def test_keras_and_torch_twins_give_the_same_relevance():
    """One network and its weights, built in Keras (tf2onnx: NHWC input, Transpose pairs, BatchNorm as Mul/Add,
    MatMul+Add, Softmax) and in torch: the same relevance up to the input layout."""
    twins = FIXTURES / "twins"
    data = np.load(twins / "keras_cnn.npz")
    keras, torch = (onnxlrp.load(twins / f"{name}.onnx") for name in ("keras_cnn", "torch_cnn"))
    x, target = data["input"], np.array([-1, 2, 5])
    for composite in onnxlrp.preset_names():
        built_keras, built_torch = explain(keras, composite), explain(torch, composite)
        probabilities, from_keras = run(built_keras, {"input": x.transpose(0, 2, 3, 1), "target": target})
        from_torch = run(built_torch, {"input": x, "target": target})[1]
        np.testing.assert_allclose(probabilities, data["probabilities"], rtol=1e-4, atol=1e-6)
        # Measured 1.4e-7 to 3.6e-7 (cp_lrp_gamma) over the presets.
        assert relative_error(from_keras.transpose(0, 3, 1, 2), from_torch) < 1.5e-6, composite


def test_sklearn_mlp_explains_its_logits():
    """MLPClassifier through skl2onnx: the ZipMap and label outputs are kept, the logits before the Softmax
    are explained; LRP-0 equals gradient x input of the network written out in numpy."""
    data = np.load(ZOO / "sklearn_mlp.npz")
    x = data["input"]
    built = explain(onnxlrp.load(ZOO / "sklearn_mlp.onnx"), "zero")
    labels, probabilities, relevance = session(built).run(None, {"X": x})
    activations, gradients = x.astype(np.float64), []
    for i in range(3):
        pre = activations @ data[f"coefs_{i}"] + data[f"intercepts_{i}"]
        gradients.append(pre > 0)
        activations = np.maximum(pre, 0) if i < 2 else pre
    chosen = activations.argmax(1)
    np.testing.assert_array_equal(labels, chosen)
    np.testing.assert_allclose([p[int(c)] for p, c in zip(probabilities, chosen)],
                               data["probabilities"][np.arange(len(x)), chosen], rtol=1e-5)
    expected = []
    for n, c in enumerate(chosen):
        upstream = data["coefs_2"][:, c] * gradients[1][n]
        upstream = data["coefs_1"] @ upstream * gradients[0][n]
        expected.append(x[n] * (data["coefs_0"] @ upstream))
    assert relative_error(relevance, np.array(expected)) < 1e-5


def test_unsupported_ops_are_refused_by_name():
    """Every node that cannot be explained is named at once (LayerNorm and attention are supported: see
    test_transformers.py)."""
    nodes = [helper.make_node("Sin", ["input"], ["grown"], name="grow"),
             helper.make_node("Erf", ["grown"], ["product"], name="product"),
             helper.make_node("Gemm", ["product", "w"], ["logits"], name="head")]
    model = make_model(nodes, [1, 8], [1, 3], {"w": np.ones((8, 3))}, opset=17)
    with pytest.raises(onnxlrp.LrpError) as error:
        explain(model, "epsilon")
    message = str(error.value)
    assert "Erf ('product'): unsupported op type" in message
    assert "Sin ('grow'): unsupported op type" in message

"""The Python API: onnxlrp.build from a path with rule parameters, Explainer, heatmap colours."""
from __future__ import annotations

import threading

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from PIL import Image

from conftest import FIXTURES, run
import onnxlrp
from onnxlrp import api

DIGITS = FIXTURES / "digits"
SAMPLES = sorted((DIGITS / "samples").glob("*.png"))


def pictures() -> np.ndarray:
    return np.stack([np.asarray(Image.open(p), dtype=np.float32)[None] / 255 for p in SAMPLES])


def test_build_from_a_path_with_rule_parameters_equals_the_composite_route():
    friendly = onnxlrp.build(DIGITS / "digits.onnx", "epsilon", epsilon=0.25)
    explicit = onnxlrp.build(onnxlrp.load(DIGITS / "digits.onnx"),
                             onnxlrp.load_composite("epsilon").with_params({"epsilon": 0.25}), explain="logit")
    x = pictures()
    for actual, expected in zip(run(friendly, {"input": x}), run(explicit, {"input": x})):
        np.testing.assert_array_equal(actual, expected)
    small = run(onnxlrp.build(DIGITS / "digits.onnx", "epsilon"), {"input": x})[1]
    assert not np.allclose(small, run(friendly, {"input": x})[1])  # the parameter reached the graph
    assert {p.key: p.value for p in friendly.metadata_props}["labels"].startswith('["zero"')


def test_build_rejects_unknown_parameters():
    with pytest.raises(onnxlrp.LrpError, match="unknown rule parameter.*epsilom"):
        onnxlrp.build(DIGITS / "digits.onnx", epsilom=0.1)


def test_explainer_on_built_and_plain_models_agree_with_onnx_runtime():
    x = pictures()
    built = onnxlrp.Explainer(DIGITS / "digits_epsilon_plus_flat.onnx")
    plain = onnxlrp.Explainer(onnx.load(str(DIGITS / "digits.onnx")))  # built first, default composite
    assert built.labels == plain.labels == ["zero", "one", "two", "three", "four", "five", "six", "seven",
                                            "eight", "nine"]
    assert built.classes == 10 and built.input_shape[1:] == [1, 16, 16]
    logits, relevance = built.explain(x)
    expected_logits, expected = run(onnx.load(str(DIGITS / "digits_epsilon_plus_flat.onnx")), {"input": x})
    np.testing.assert_array_equal(logits, expected_logits)
    np.testing.assert_array_equal(relevance, expected)
    np.testing.assert_allclose(plain.explain(x)[1], expected, rtol=1e-5, atol=1e-6)
    targets = np.arange(10)[::-1].copy()
    _, chosen = built.explain(x, targets)
    _, wanted = run(built.model, {"input": x, "target": targets})
    np.testing.assert_array_equal(chosen, wanted)
    _, three = built.explain(x, 3)
    np.testing.assert_array_equal(three, run(built.model, {"input": x, "target": np.full(10, 3)})[1])


def test_stream_reads_the_next_batch_while_this_one_is_explained():
    x = pictures()
    built = onnxlrp.Explainer(DIGITS / "digits_epsilon_plus_flat.onnx")
    second_asked = threading.Event()

    def batches():
        yield x[:4]
        second_asked.set()
        yield x[4:]

    found = []
    for explanation in built.stream(batches(), 3):
        if not found:  # a reader that waited for this loop would not have asked for the second batch yet
            assert second_asked.wait(timeout=10)
        found.append(explanation.relevance)
    np.testing.assert_array_equal(np.concatenate(found), built.explain(x, 3)[1])
    assert built.rate.samples == len(x) and built.rate.seconds > 0


def test_explainer_composite_for_plain_models():
    x = pictures()[:2]
    explainer = onnxlrp.Explainer(DIGITS / "digits.onnx", composite="zplus", stabilizer=1e-3)
    expected = run(onnxlrp.build(DIGITS / "digits.onnx", "zplus", stabilizer=1e-3), {"input": x})[1]
    np.testing.assert_allclose(explainer.explain(x)[1], expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("x,target,message", [
    (np.zeros((1, 1, 8, 8)), None, r"shape \[1, 1, 8, 8\] does not fit the model input 'input' \[\?, 1, 16, 16\]"),
    (np.zeros((1, 16, 16)), None, "does not fit"),
    (np.zeros((2, 1, 16, 16)), 10, "class 10 is out of range"),
    (np.zeros((2, 1, 16, 16)), [1, 2, 3], "one class per sample"),
])
def test_explainer_errors(x, target, message):
    explainer = onnxlrp.Explainer(DIGITS / "digits_epsilon_plus_flat.onnx")
    with pytest.raises(onnxlrp.LrpError, match=message):
        explainer.explain(x, target)


def test_no_onnx_runtime_warning_reaches_api_users(capfd):
    ort.set_default_logger_severity(2)  # as a user's process has it: warnings shown
    try:
        onnxlrp.Explainer(DIGITS / "digits_epsilon_plus_flat.onnx").explain(pictures()[:1])
        captured = capfd.readouterr()
        assert captured.err == "" and captured.out == ""
        # the warning exists: a plain session on the same model logs it
        ort.InferenceSession(str(DIGITS / "digits_epsilon_plus_flat.onnx"), providers=["CPUExecutionProvider"])
        assert "target" in capfd.readouterr().err
    finally:
        ort.set_default_logger_severity(3)


def test_cuda_without_a_provider(monkeypatch):
    monkeypatch.setattr(api.ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with pytest.raises(onnxlrp.LrpError, match="no CUDA provider"):
        onnxlrp.Explainer(DIGITS / "digits_epsilon_plus_flat.onnx", device="cuda")
    with pytest.raises(onnxlrp.LrpError, match="device must be one of cpu, cuda"):
        onnxlrp.Explainer(DIGITS / "digits_epsilon_plus_flat.onnx", device="tpu")


@pytest.mark.parametrize("props,labels", [
    ({"labels": '["a", "b", "c"]'}, ["a", "b", "c"]),
    ({"classes": "a, b ,c"}, ["a", "b", "c"]),
    ({"id2label": '{"2": "c", "0": "a", "1": "b"}'}, ["a", "b", "c"]),
    ({"labels": '["a", "b"]'}, None),  # a count that does not match the classes is not used
    ({"author": "x"}, None),
])
def test_labels_from_metadata(props, labels):
    model = onnx.ModelProto()
    onnx.helper.set_model_props(model, props)
    assert api.metadata_labels(model, 3) == labels


RELEVANCE = np.array([[[-2.0, -1.0, 0.0, 1.0, 4.0]]])  # [C=1, H=1, W=5]


@pytest.mark.parametrize("cmap,lowest,centre,highest", [
    ("bwr", (0, 0, 255), (255, 255, 255), (255, 0, 0)),
    ("coldnhot", (0, 255, 255), (0, 0, 0), (255, 255, 255)),
    ("seismic", (0, 0, 208), (208, 208, 208), (208, 0, 0)),
    ("gray", (0, 0, 0), (128, 128, 128), (255, 255, 255)),
])
def test_heatmap_colours_are_symmetric_around_zero(cmap, lowest, centre, highest):
    picture = onnxlrp.heatmap(RELEVANCE, cmap=cmap)
    assert picture.dtype == np.uint8 and picture.shape == (1, 5, 3)
    assert tuple(picture[0, 2]) == centre  # zero relevance
    assert tuple(picture[0, 4]) == highest  # the largest magnitude is the end of the scale
    table = api_table(cmap)
    assert tuple(table[0]) == lowest
    np.testing.assert_array_equal(picture[0, 0], table[round((1 - 0.5) * 127.5)])  # -2 of 4: a quarter in


def api_table(cmap: str) -> np.ndarray:
    from onnxlrp.app.heatmaps import lookup_table
    return lookup_table(cmap)


def test_heatmap_sums_channels_and_overlays():
    rng = np.random.default_rng(0)
    relevance = rng.normal(size=(3, 4, 6))
    np.testing.assert_array_equal(onnxlrp.heatmap(relevance), onnxlrp.heatmap(relevance.sum(0)))
    np.testing.assert_array_equal(onnxlrp.heatmap(relevance.transpose(1, 2, 0), channel_axis=-1),
                                  onnxlrp.heatmap(relevance.sum(0)))
    image = rng.integers(0, 256, size=(4, 6, 3), dtype=np.uint8)
    flat = np.zeros((4, 6))
    flat[1, 2] = -3.0
    blended = onnxlrp.heatmap(flat, image=image)
    gray = np.asarray(Image.fromarray(image).convert("L"))
    keep = flat == 0
    np.testing.assert_array_equal(blended[keep], np.repeat(gray[keep][:, None], 3, 1))  # no relevance: the image
    assert tuple(blended[1, 2]) == (0, 0, 255)  # the strongest relevance: the colour alone
    assert onnxlrp.heatmap(np.zeros((2, 2))).tolist() == [[[255, 255, 255]] * 2] * 2  # nothing: all centre


def test_heatmap_errors():
    with pytest.raises(onnxlrp.LrpError, match="unknown colormap 'jet'"):
        onnxlrp.heatmap(np.ones((2, 2)), cmap="jet")
    with pytest.raises(onnxlrp.LrpError, match="not one sample"):
        onnxlrp.heatmap(np.ones((1, 1, 2, 2)))


def test_explainer_refuses_build_options_for_a_built_model():
    with pytest.raises(onnxlrp.LrpError, match="already computes relevance"):
        onnxlrp.Explainer(DIGITS / "digits_epsilon_plus_flat.onnx", composite="zero")
    with pytest.raises(onnxlrp.LrpError, match="already computes relevance"):
        onnxlrp.Explainer(DIGITS / "digits_epsilon_plus_flat.onnx", epsilon=0.1)

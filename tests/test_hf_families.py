"""More transformer families and exporters (issue 9, item 5): Hugging Face DeiT (with distillation token and teacher
head), DistilBERT, RoBERTa and Swin (shifted windows, relative position bias) exported by torch's TorchScript
exporter at opsets 14 and 17 and by its dynamo exporter, and a Keras vision transformer converted by tf2onnx, all
against LXT 2.1's rules in float64 (fixtures/make_hf_families.py, fixtures/make_keras_transformer.py)."""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import onnxlrp
from conftest import FIXTURES, assert_padded_text, make_model, relative_error, run

HF = FIXTURES / "transformers" / "hf"
KERAS = FIXTURES / "transformers" / "keras"
REFERENCES = dict(np.load(HF / "references.npz"))
KERAS_REFERENCES = dict(np.load(KERAS / "references.npz"))
COMPOSITES = ("attnlrp", "cp_lrp")
TEXT = ("distilbert", "roberta")
EXPORTS = [(family, export) for family in ("deit", "swin", "distilbert", "roberta")
           for export in ("op14", "op17", "dynamo") if (HF / f"{family}_{export}.onnx").exists()]


@lru_cache(maxsize=None)
def source(family: str, export: str) -> onnx.ModelProto:
    return onnx.load(HF / f"{family}_{export}.onnx")


@lru_cache(maxsize=None)
def built(family: str, export: str, composite: str) -> onnx.ModelProto:
    return onnxlrp.build(source(family, export), onnxlrp.load_composite(composite))


def feeds(family: str) -> dict[str, np.ndarray]:
    if family in TEXT:
        return {"input_ids": REFERENCES["input_ids"], "attention_mask": REFERENCES["attention_mask"]}
    return {"pixel_values": REFERENCES["pixel_values_16" if family == "deit" else "pixel_values_32"]}


def test_every_family_has_its_exports():
    assert {f for f, _ in EXPORTS} == {"deit", "swin", "distilbert", "roberta"}
    assert sum(e == "dynamo" for _, e in EXPORTS) == 4  # Swin's pools with an as_strided Gather (scattered back)


@pytest.mark.parametrize("composite", COMPOSITES)
@pytest.mark.parametrize("family,export", EXPORTS)
def test_parity_with_lxt(family, export, composite):
    """Per pixel (DeiT, Swin) or per token and embedding feature (DistilBERT, RoBERTa) against LXT's rules in
    float64; the original logits are unchanged."""
    name = "relevance_embedding" if family in TEXT else "relevance"
    logits, actual = run(built(family, export, composite), {**feeds(family), "target": REFERENCES["targets"]},
                         ["logits", name])
    expected = REFERENCES[f"{family}_{composite}"][:2]
    assert actual.shape == expected.shape
    assert relative_error(actual, expected) < 1e-4
    original = run(source(family, export), feeds(family))[0]
    assert relative_error(logits, original) < 1e-6
    assert 0.05 < np.abs(original).max() < 20


@pytest.mark.parametrize("composite", COMPOSITES)
@pytest.mark.parametrize("family", TEXT)
def test_padded_text(family, composite):
    """Padded tokens get exactly 0, and the padded text's tokens the relevance of the text alone (LXT's too);
    RoBERTa's position ids, computed from the token ids, are constants."""
    assert_padded_text(built(family, "op17", composite), REFERENCES, REFERENCES[f"{family}_{composite}"][2])


@lru_cache(maxsize=None)
def keras_built(opset: int, composite: str) -> onnx.ModelProto:
    return onnxlrp.build(onnx.load(KERAS / f"vit_op{opset}.onnx"), onnxlrp.load_composite(composite))


@pytest.mark.parametrize("composite", COMPOSITES)
@pytest.mark.parametrize("opset", (14, 17))
def test_keras_through_tf2onnx(opset, composite):
    """tf2onnx writes Keras' LayerNormalization as x * s + (beta - mean * s), s = gamma / sqrt(var + eps) (Sqrt,
    Reciprocal, means as GlobalAveragePool): sigma is a constant. Against the same weights in TensorFlow with
    LXT's rules (float64); the logits are Keras'."""
    feed = {"pixel_values": KERAS_REFERENCES["pixel_values"], "target": KERAS_REFERENCES["targets"]}
    logits, actual = run(keras_built(opset, composite), feed, ["head", "relevance"])
    assert relative_error(actual, KERAS_REFERENCES[f"vit_{composite}"]) < 1e-4
    np.testing.assert_allclose(logits, KERAS_REFERENCES["logits"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("composite", COMPOSITES)
def test_keras_opsets_14_and_17_agree(composite):
    feed = {"pixel_values": KERAS_REFERENCES["pixel_values"], "target": KERAS_REFERENCES["targets"]}
    r14, r17 = (run(keras_built(opset, composite), feed, ["relevance"])[0] for opset in (14, 17))
    assert relative_error(r14, r17) < 1e-5


def _layer_norm_tf2onnx_form(rng, floor: bool) -> onnx.ModelProto:
    """y = x * s + (beta - mean * s), s = gamma / sqrt(mean((x - mean)^2) + eps) (or max(var, eps))."""
    w, b = 1 + 0.1 * rng.standard_normal(6), 0.1 * rng.standard_normal(6)
    return make_model([
        helper.make_node("ReduceMean", ["input"], ["mean"], axes=[-1]),
        helper.make_node("Sub", ["input", "mean"], ["centered"]),
        helper.make_node("Mul", ["centered", "centered"], ["squared"]),
        helper.make_node("ReduceMean", ["squared"], ["variance"], axes=[-1]),
        helper.make_node("Max" if floor else "Add", ["variance", "eps"], ["shifted"]),
        helper.make_node("Sqrt", ["shifted"], ["sigma"]), helper.make_node("Reciprocal", ["sigma"], ["inverse"]),
        helper.make_node("Mul", ["inverse", "w"], ["s"]),
        helper.make_node("Mul", ["mean", "s"], ["shift"]), helper.make_node("Sub", ["b", "shift"], ["offset"]),
        helper.make_node("Mul", ["input", "s"], ["scaled"]),
        helper.make_node("Add", ["scaled", "offset"], ["logits"])], (2, 6), (2, 6),
        {"w": w, "b": b, "eps": np.array(1e-5)}, opset=14)


@pytest.mark.parametrize("floor", (False, True))
def test_layer_norm_reciprocal_form_equals_the_op(rng, floor):
    x = rng.standard_normal((2, 6)).astype(np.float32)
    written = _layer_norm_tf2onnx_form(rng, floor)
    w, b = (onnx.numpy_helper.to_array(t) for t in written.graph.initializer[:2])
    fused = make_model([helper.make_node("LayerNormalization", ["input", "w", "b"], ["logits"], epsilon=1e-5)],
                       (2, 6), (2, 6), {"w": w, "b": b})
    target = np.array([1, 4])
    for composite in COMPOSITES:
        expected = run(onnxlrp.build(fused, onnxlrp.load_composite(composite)), {"input": x, "target": target},
                       ["relevance"])[0]
        actual = run(onnxlrp.build(written, onnxlrp.load_composite(composite)), {"input": x, "target": target},
                     ["relevance"])[0]
        np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-6)


def test_an_equal_against_one_value_is_not_a_one_hot_encoding(rng):
    """DistilBERT's `attention_mask == 0` feeds a Where: the explained input is the token ids' embedding lookup,
    not the mask."""
    table = rng.standard_normal((10, 4)).astype(np.float32)
    graph = helper.make_graph([
        helper.make_node("Gather", ["table", "ids"], ["embedded"]),
        helper.make_node("Equal", ["mask", "zero"], ["masked"]),
        helper.make_node("Unsqueeze", ["masked", "last"], ["masked3"]),
        helper.make_node("Where", ["masked3", "floor", "embedded"], ["kept"]),
        helper.make_node("ReduceSum", ["kept", "tokens"], ["logits"], keepdims=0)], "masked",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 3]),
         helper.make_tensor_value_info("mask", TensorProto.INT64, ["N", 3])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])],
        [onnx.numpy_helper.from_array(table, "table"), onnx.numpy_helper.from_array(np.array(0), "zero"),
         onnx.numpy_helper.from_array(np.array([2]), "last"), onnx.numpy_helper.from_array(np.array([1]), "tokens"),
         onnx.numpy_helper.from_array(np.array(0, np.float32), "floor")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    ids, mask = np.array([[1, 2, 3]]), np.array([[1, 1, 0]])
    token = run(onnxlrp.build(model, onnxlrp.load_composite("attnlrp")),
                {"ids": ids, "mask": mask, "target": np.array([0])}, ["relevance"])[0]
    np.testing.assert_allclose(token, [[table[1, 0], table[2, 0], 0]], rtol=1e-6)

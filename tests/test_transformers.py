"""Transformers (docs/attnlrp.md): parity with LXT 2.1 on tiny Hugging Face ViT and BERT exports, opset independence,
CP-LRP's stop at the queries and keys, conservation, padded text, and each transformer emitter against numpy."""
from __future__ import annotations

import json
from functools import lru_cache

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import onnxlrp
from conftest import FIXTURES, assert_padded_text, make_model, relative_error, run
from onnxlrp.lrp.layers import METADATA_KEY

TRANSFORMERS = FIXTURES / "transformers"
REFERENCES = dict(np.load(TRANSFORMERS / "references.npz"))
OPSETS = (14, 17)
COMPOSITES = ("attnlrp", "cp_lrp")


@lru_cache(maxsize=None)
def built(model: str, opset: int, composite: str, layer_relevance: bool = False) -> onnx.ModelProto:
    source = onnx.load(TRANSFORMERS / f"{model}_op{opset}.onnx")
    return onnxlrp.build(source, onnxlrp.load_composite(composite), layer_relevance=layer_relevance)


def feeds(model: str) -> dict[str, np.ndarray]:
    if model == "vit":
        return {"pixel_values": REFERENCES["pixel_values"], "target": REFERENCES["targets"]}
    if model == "convnext":
        return {"pixel_values": REFERENCES["pixel_values_32"], "target": REFERENCES["targets"]}
    return {"input_ids": REFERENCES["input_ids"], "attention_mask": REFERENCES["attention_mask"],
            "target": REFERENCES["targets"]}


def relevance(model: str, opset: int, composite: str) -> np.ndarray:
    """The input relevance: per pixel (ViT), per token and embedding feature (BERT)."""
    name = "relevance_embedding" if model == "bert" else "relevance"
    return run(built(model, opset, composite), feeds(model), [name])[0]


@pytest.mark.parametrize("opset", OPSETS)
@pytest.mark.parametrize("composite", COMPOSITES)
@pytest.mark.parametrize("model", ("vit", "bert", "convnext"))
def test_parity_with_lxt(model, composite, opset):
    # ConvNeXt has no attention: one reference for both; BERT's third row is the padded text alone.
    expected = REFERENCES[f"{model}_{'attnlrp' if model == 'convnext' else composite}"][:2]
    actual = relevance(model, opset, composite)
    assert actual.shape == expected.shape
    assert relative_error(actual, expected) < 1e-4


@pytest.mark.parametrize("composite", COMPOSITES)
@pytest.mark.parametrize("model", ("vit", "bert", "convnext"))
def test_opsets_14_and_17_agree(model, composite):
    assert relative_error(relevance(model, 14, composite), relevance(model, 17, composite)) < 1e-5


@pytest.mark.parametrize("model", ("vit", "bert"))
def test_cp_lrp_sends_nothing_into_queries_and_keys(model):
    """Under cp_lrp the query and key projections are never reached (their relevance is exactly zero); under
    attnlrp they are, and their relevance is not zero."""
    walked = {}
    for composite in COMPOSITES:
        model_lrp = built(model, 17, composite, layer_relevance=True)
        layers = json.loads(next(p.value for p in model_lrp.metadata_props if p.key == METADATA_KEY))["layers"]
        outputs = run(model_lrp, feeds(model), [layer["output"] for layer in layers])
        walked[composite] = {layer["node"]: np.abs(r).sum() for layer, r in zip(layers, outputs)}
    projections = [n for n in walked["attnlrp"] if "/query/" in n or "/key/" in n]
    assert len(projections) == 4 and all(walked["attnlrp"][n] > 0 for n in projections)
    assert not set(projections) & set(walked["cp_lrp"])
    assert sum("/value/" in n for n in walked["cp_lrp"]) == 2


@pytest.mark.parametrize("composite", COMPOSITES)
def test_padded_text(composite):
    """Padded tokens get exactly 0; the padded text's tokens get the relevance of the text alone (the BERT exports
    have a dynamic sequence length), which is also LXT's."""
    assert_padded_text(built("bert", 17, composite), REFERENCES, REFERENCES[f"bert_{composite}"][2])


def test_text_model_keeps_its_inputs_and_outputs():
    model = built("bert", 17, "attnlrp")
    assert [i.name for i in model.graph.input] == ["input_ids", "attention_mask", "target"]
    assert [o.name for o in model.graph.output] == ["logits", "relevance_embedding", "relevance"]
    original = run(onnx.load(TRANSFORMERS / "bert_op17.onnx"),
                   {k: v for k, v in feeds("bert").items() if k != "target"})[0]
    np.testing.assert_array_equal(run(model, feeds("bert"), ["logits"])[0], original)


# Small graphs: each emitter against numpy.

def _build(model: onnx.ModelProto, composite: str = "attnlrp") -> onnx.ModelProto:
    return onnxlrp.build(model, onnxlrp.load_composite(composite))


def _relevance(model: onnx.ModelProto, x: np.ndarray, target: np.ndarray, composite: str = "attnlrp"):
    logits, result = run(_build(model, composite), {"input": x, "target": target}, ["logits", "relevance"])
    return logits, result


def _seed(logits: np.ndarray, target: np.ndarray) -> np.ndarray:
    return np.eye(logits.shape[1])[target] * logits


def _const(name: str, values) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(values)))


def test_layer_normalization_closed_form_and_written_out(rng):
    x = rng.standard_normal((2, 6)).astype(np.float32)
    w, b = 1 + 0.1 * rng.standard_normal(6), 0.1 * rng.standard_normal(6)
    fused = make_model([helper.make_node("LayerNormalization", ["input", "w", "b"], ["logits"], epsilon=1e-5)],
                       (2, 6), (2, 6), {"w": w, "b": b})
    written = make_model([
        helper.make_node("ReduceMean", ["input"], ["mean"], axes=[-1]),
        helper.make_node("Sub", ["input", "mean"], ["centered"]),
        helper.make_node("Pow", ["centered", "two"], ["squared"]),
        helper.make_node("ReduceMean", ["squared"], ["variance"], axes=[-1]),
        helper.make_node("Add", ["variance", "eps"], ["shifted"]),
        helper.make_node("Sqrt", ["shifted"], ["sigma"]),
        helper.make_node("Div", ["centered", "sigma"], ["normed"]),
        helper.make_node("Mul", ["normed", "w"], ["scaled"]),
        helper.make_node("Add", ["scaled", "b"], ["logits"])], (2, 6), (2, 6),
        {"w": w, "b": b, "two": np.array(2.0), "eps": np.array(1e-5)}, opset=14)
    target = np.array([1, 4])
    logits, actual = _relevance(fused, x, target)
    x64, y = x.astype(np.float64), logits.astype(np.float64)
    sigma = np.sqrt(x64.var(-1, keepdims=True) + 1e-5)
    u = w * _seed(y, target) / y
    expected = x64 * (u - u.mean(-1, keepdims=True)) / sigma
    assert relative_error(actual, expected) < 1e-5
    assert relative_error(_relevance(written, x, target)[1], expected) < 1e-5


def test_softmax_rule_with_a_mask(rng):
    """R_z = z * (R_s - s * sum(R_s)); the mask and a bias (constant addends) keep their share; masked positions
    (-inf, also after the bias) get 0."""
    x = rng.standard_normal((2, 5)).astype(np.float32)
    mask, bias = np.array([0, 0, 0, 0, -np.inf]), rng.standard_normal(5)
    scale = 1 + rng.random(5)
    model = make_model([helper.make_node("Add", ["input", "mask"], ["masked"]),
                        helper.make_node("Add", ["masked", "bias"], ["z"]),
                        helper.make_node("Softmax", ["z"], ["s"], axis=-1),
                        helper.make_node("Mul", ["s", "scale"], ["logits"])], (2, 5), (2, 5),
                       {"mask": mask, "scale": scale, "bias": bias})
    target = np.array([0, 2])
    logits, actual = _relevance(model, x, target)
    z = x.astype(np.float64) + mask + bias
    s = np.exp(z - z.max(-1, keepdims=True))
    s /= s.sum(-1, keepdims=True)
    r_s = _seed(logits.astype(np.float64), target)
    gradient = r_s - s * r_s.sum(-1, keepdims=True)
    expected = x * gradient  # = x / (x + mask + bias) * (z * gradient)
    assert np.all(actual[:, 4] == 0)
    assert relative_error(actual, expected) < 1e-5


@pytest.mark.parametrize("max_subtracted", (True, False))
def test_softmax_written_out_equals_the_op(rng, max_subtracted):
    """ReduceMax, Sub, Exp, ReduceSum, Div (the max subtraction optional) gets the softmax rule, as the op does."""
    x = rng.standard_normal((2, 5)).astype(np.float32)
    mask, scale = np.array([0, 0, 0, -np.inf, 0]), 1 + rng.random(5)
    shifted = [helper.make_node("ReduceMax", ["z"], ["peak"], axes=[1]), helper.make_node("Sub", ["z", "peak"], ["u"])]
    model = make_model([helper.make_node("Add", ["input", "mask"], ["z"])] + (shifted if max_subtracted else []) + [
        helper.make_node("Exp", ["u" if max_subtracted else "z"], ["e"]),
        helper.make_node("ReduceSum", ["e", "axes"], ["total"]), helper.make_node("Div", ["e", "total"], ["s"]),
        helper.make_node("Mul", ["s", "scale"], ["logits"])], (2, 5), (2, 5),
        {"mask": mask, "scale": scale, "axes": [1]})
    _as_int64(model, "axes")
    fused = make_model([helper.make_node("Add", ["input", "mask"], ["z"]),
                        helper.make_node("Softmax", ["z"], ["s"], axis=1),
                        helper.make_node("Mul", ["s", "scale"], ["logits"])], (2, 5), (2, 5),
                       {"mask": mask, "scale": scale})
    target = np.array([1, 4])
    written, expected = _relevance(model, x, target)[1], _relevance(fused, x, target)[1]
    assert np.all(written[:, 3] == 0)
    np.testing.assert_allclose(written, expected, rtol=1e-5, atol=1e-7)


def _bilinear(rng):
    wa, wb = rng.standard_normal((4, 4)), rng.standard_normal((4, 4))
    model = make_model([helper.make_node("MatMul", ["input", "wa"], ["a"]),
                        helper.make_node("MatMul", ["input", "wb"], ["b"]),
                        helper.make_node("Transpose", ["b"], ["bt"], perm=[0, 2, 1]),
                        helper.make_node("MatMul", ["a", "bt"], ["c"]),
                        helper.make_node("Reshape", ["c", "shape"], ["logits"])], (2, 3, 4), (2, 9),
                       {"wa": wa, "wb": wb, "shape": np.array([0, -1])})
    _as_int64(model, "shape")
    return model, wa, wb


def _as_int64(model: onnx.ModelProto, *names: str) -> None:
    """`make_model` stores float32 initializers: make the named ones int64 (shapes, axes, indices)."""
    for tensor in model.graph.initializer:
        if tensor.name in names:
            tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.int64), tensor.name))


def test_matmul_of_two_computed_tensors_uniform_rule(rng):
    model, wa, wb = _bilinear(rng)
    x = rng.standard_normal((2, 3, 4)).astype(np.float32)
    target = np.array([4, 7])
    logits, actual = _relevance(model, x, target)
    x64 = x.astype(np.float64)
    a, b = x64 @ wa, x64 @ wb
    c = a @ b.transpose(0, 2, 1)
    s = _seed(c.reshape(2, 9), target).reshape(2, 3, 3) / c
    r_a, r_b = 0.5 * a * (s @ b), 0.5 * b * (s.transpose(0, 2, 1) @ a)
    expected = x64 * ((r_a / a) @ wa.T + (r_b / b) @ wb.T)
    assert relative_error(actual, expected) < 1e-5
    # No biases, no constant addends, no softmax: the relevance is conserved exactly.
    np.testing.assert_allclose(actual.sum((1, 2)), logits[np.arange(2), target], rtol=1e-5)


def test_transformer_block_without_biases_conserves(rng):
    """LayerNorm without bias, a bilinear product, erf-GELU, a residual sum, a mean over tokens and a classifier
    without bias: sum of the input relevance = the explained logit, for both composites."""
    hidden = 4
    weights = {name: rng.standard_normal((hidden, hidden)) / 2 for name in ("wq", "wk", "w1", "w2")}
    weights.update(ln=1 + 0.1 * rng.standard_normal(hidden), cls=rng.standard_normal((hidden, 3)),
                   root2=np.array(np.sqrt(2)), one=np.array(1.0), half=np.array(0.5))
    model = make_model([
        helper.make_node("LayerNormalization", ["input", "ln"], ["h"], axis=-1),
        helper.make_node("MatMul", ["h", "wq"], ["q"]), helper.make_node("MatMul", ["h", "wk"], ["k"]),
        helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q", "kt"], ["scores"]),
        helper.make_node("MatMul", ["scores", "h"], ["mixed"]),
        helper.make_node("MatMul", ["mixed", "w1"], ["u"]),
        helper.make_node("Div", ["u", "root2"], ["scaled"]), helper.make_node("Erf", ["scaled"], ["erf"]),
        helper.make_node("Add", ["erf", "one"], ["phi"]), helper.make_node("Mul", ["u", "phi"], ["gelu2"]),
        helper.make_node("Mul", ["gelu2", "half"], ["gelu"]),
        helper.make_node("MatMul", ["gelu", "w2"], ["v"]),
        helper.make_node("Add", ["v", "input"], ["residual"]),
        helper.make_node("ReduceMean", ["residual"], ["pooled"], axes=[1], keepdims=0),
        helper.make_node("MatMul", ["pooled", "cls"], ["logits"])], (2, 5, hidden), (2, 3), weights)
    x = rng.standard_normal((2, 5, hidden)).astype(np.float32)
    target = np.array([0, 2])
    for composite in COMPOSITES:
        logits, actual = _relevance(model, x, target, composite)
        np.testing.assert_allclose(actual.sum((1, 2)), logits[np.arange(2), target], rtol=1e-4)


def test_gelu_tanh_form_is_one_activation(rng):
    """0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))): identity, R_x = R_y, not half to x."""
    model = make_model([
        helper.make_node("Pow", ["input", "three"], ["cube"]), helper.make_node("Mul", ["cube", "c"], ["cubed"]),
        helper.make_node("Add", ["input", "cubed"], ["inner"]), helper.make_node("Mul", ["inner", "k"], ["arg"]),
        helper.make_node("Tanh", ["arg"], ["t"]), helper.make_node("Add", ["t", "one"], ["phi"]),
        helper.make_node("Mul", ["input", "half"], ["halfx"]), helper.make_node("Mul", ["halfx", "phi"], ["logits"])],
        (2, 5), (2, 5), {"three": np.array(3.0), "c": np.array(0.044715), "k": np.array(np.sqrt(2 / np.pi)),
                         "one": np.array(1.0), "half": np.array(0.5)})
    x = rng.standard_normal((2, 5)).astype(np.float32) + 1
    target = np.array([1, 3])
    logits, actual = _relevance(model, x, target)
    np.testing.assert_allclose(actual, _seed(logits, target), rtol=1e-6)


@pytest.mark.parametrize("composite", COMPOSITES)
def test_gated_product(rng, composite):
    """tanh(x Wg) * (x Wu): half each under attnlrp; under cp_lrp the gate is a constant and x Wu gets all."""
    wg, wu = rng.standard_normal((4, 4)), rng.standard_normal((4, 4))
    model = make_model([helper.make_node("MatMul", ["input", "wg"], ["g"]), helper.make_node("Tanh", ["g"], ["a"]),
                        helper.make_node("MatMul", ["input", "wu"], ["u"]),
                        helper.make_node("Mul", ["a", "u"], ["logits"])], (2, 4), (2, 4), {"wg": wg, "wu": wu})
    x = rng.standard_normal((2, 4)).astype(np.float32)
    target = np.array([0, 3])
    logits, actual = _relevance(model, x, target, composite)
    x64 = x.astype(np.float64)
    g, u = x64 @ wg, x64 @ wu
    r = _seed(np.tanh(g) * u, target)
    share = 0.5 if composite == "attnlrp" else 1.0
    expected = x64 * ((share * r / u) @ wu.T) + (x64 * ((0.5 * r / g) @ wg.T) if composite == "attnlrp" else 0)
    assert relative_error(actual, expected) < 1e-5


def test_broadcasting_expand_and_where(rng):
    """Expand sums the copies' relevance; Where routes each element to its source; a broadcast computed operand
    of an Add gets the sum over the broadcast axis."""
    model = make_model([
        helper.make_node("Expand", ["input", "shape"], ["copies"]),
        helper.make_node("ReduceMean", ["copies"], ["mean"], axes=[1]),
        helper.make_node("Add", ["copies", "mean"], ["summed"]),
        helper.make_node("Mul", ["summed", "two"], ["doubled"]),
        helper.make_node("Where", ["condition", "summed", "doubled"], ["chosen"]),
        helper.make_node("Reshape", ["chosen", "flat"], ["logits"])], (2, 1, 3), (2, 12),
        {"two": np.array(2.0), "shape": np.array([1, 4, 3]), "flat": np.array([0, -1]),
         "condition": rng.random((4, 3)) > 0.5})
    _as_int64(model, "shape", "flat")
    for tensor in model.graph.initializer:
        if tensor.name == "condition":
            tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor).astype(bool), tensor.name))
    x = rng.standard_normal((2, 1, 3)).astype(np.float32)
    target = np.array([5, 10])
    logits, actual = _relevance(model, x, target)
    x64 = x.astype(np.float64)
    copies = np.broadcast_to(x64, (2, 4, 3))
    summed = copies + copies.mean(1, keepdims=True)  # = 2 * copies
    r_summed = _seed(logits.astype(np.float64), target).reshape(2, 4, 3)  # Where and Mul by 2 route it all here
    g = r_summed / summed
    r_copies = copies * g + (copies * g.sum(1, keepdims=True)) / 4  # the direct share and the mean's share
    expected = r_copies.sum(1, keepdims=True)
    assert relative_error(actual, expected) < 1e-5


def test_cnn_presets_keep_constants_passing(rng):
    """Under a CNN preset an Add of a constant passes relevance; under attnlrp the constant keeps its share."""
    model = make_model([helper.make_node("Add", ["input", "c"], ["logits"])], (2, 3), (2, 3),
                       {"c": rng.standard_normal(3)})
    x = rng.standard_normal((2, 3)).astype(np.float32)
    target = np.array([0, 1])
    logits, passed = _relevance(model, x, target, "epsilon")
    np.testing.assert_allclose(passed, _seed(logits, target), rtol=1e-6)
    _, absorbed = _relevance(model, x, target)
    np.testing.assert_allclose(absorbed, x * _seed(logits, target) / logits, rtol=1e-5, atol=1e-7)


def test_presets_parse():
    for name in COMPOSITES:
        composite = onnxlrp.load_composite(name)
        assert composite.params["epsilon"] == 0 and composite.params["stabilizer"] == 0


def test_constant_times_computed_and_strided_slices(rng):
    """Mul(c, x) with the constant first passes relevance; a strided Slice (Swin's patch merging) returns each
    element's relevance to its place and zero elsewhere."""
    model = make_model([helper.make_node("Mul", ["c", "input"], ["scaled"]),
                        helper.make_node("Slice", ["scaled", "starts", "ends", "axes", "steps"], ["logits"])],
                       (2, 6), (2, 3), {"c": rng.standard_normal(6), "starts": [5], "ends": [-9], "axes": [1],
                                         "steps": [-2]})
    _as_int64(model, "starts", "ends", "axes", "steps")
    x = rng.standard_normal((2, 6)).astype(np.float32)
    target = np.array([0, 2])
    logits, actual = _relevance(model, x, target)
    expected = np.zeros((2, 6))
    expected[:, [5, 3, 1]] = _seed(logits, target)
    np.testing.assert_allclose(actual, expected, rtol=1e-6)


@pytest.mark.parametrize("model", ("vit", "bert"))
def test_every_preset_builds_on_a_transformer(model):
    """CNN presets use their rule on linear layers and the transformer rules elsewhere (constants pass): one preset
    per kind of first layer and linear rule (flat, zbox, gamma with scaled epsilon, zplus)."""
    for name in ("epsilon_plus_flat", "epsilon_gamma_box", "montavon2019", "zplus"):
        built_model = onnxlrp.build(onnx.load(TRANSFORMERS / f"{model}_op17.onnx"), onnxlrp.load_composite(name))
        result = run(built_model, feeds(model), ["relevance"])[0]
        assert np.isfinite(result).all() and np.abs(result).sum() > 0, name


def test_gather_along_a_first_axis_that_is_not_the_batch(rng):
    """torch's attention packs q, k and v along the first axis of a [3, N, ...] tensor and gathers them."""
    model = make_model([helper.make_node("Transpose", ["input"], ["packed"], perm=[1, 0, 2]),
                        helper.make_node("Gather", ["packed", "index"], ["logits"], axis=0)], (2, 3, 4), (2, 4),
                       {"index": np.array(1)})
    _as_int64(model, "index")
    x = rng.standard_normal((2, 3, 4)).astype(np.float32)
    target = np.array([0, 3])
    logits, actual = _relevance(model, x, target)
    expected = np.zeros((2, 3, 4))
    expected[:, 1] = _seed(logits, target)
    np.testing.assert_allclose(actual, expected, rtol=1e-6)


def test_rms_norm_written_out_is_the_identity(rng):
    """w * x * 1/sqrt(mean(x^2) + eps): the rsqrt factor is a function of x alone, so R_x = R_y (LXT's RMSNorm)."""
    model = make_model([
        helper.make_node("Mul", ["input", "input"], ["squared"]),
        helper.make_node("ReduceMean", ["squared"], ["mean"], axes=[-1]),
        helper.make_node("Add", ["mean", "eps"], ["shifted"]), helper.make_node("Sqrt", ["shifted"], ["rms"]),
        helper.make_node("Reciprocal", ["rms"], ["inverse"]), helper.make_node("Mul", ["input", "inverse"], ["normed"]),
        helper.make_node("Mul", ["w", "normed"], ["logits"])], (2, 6), (2, 6),
        {"eps": np.array(1e-6), "w": 1 + 0.1 * rng.standard_normal(6)})
    x = rng.standard_normal((2, 6)).astype(np.float32)
    target = np.array([2, 5])
    logits, actual = _relevance(model, x, target)
    np.testing.assert_allclose(actual, _seed(logits, target), rtol=1e-6)


def test_torchvision_vit_matches_lxts_own_map():
    """torchvision's VisionTransformer (torch's MultiheadAttention, sequence-first, q, k and v packed in one
    projection; dynamic batch) under cp_lrp against LXT's shipped cp_LRP map (computed for the first image)."""
    model = onnxlrp.build(onnx.load(TRANSFORMERS / "torchvision_vit_op17.onnx"), onnxlrp.load_composite("cp_lrp"))
    logits, actual = run(model, {"x": REFERENCES["pixel_values_32"], "target": REFERENCES["targets"]},
                         ["logits", "relevance"])
    assert 0.1 < np.abs(logits).max() < 20
    assert relative_error(actual[:1], REFERENCES["torchvision_vit_cp_lrp"]) < 1e-4


def test_static_batch_of_two_without_target():
    """A batch fixed at build time (--input-shape) gets a default `target` of that size: the predicted classes."""
    model = onnxlrp.build(onnx.load(TRANSFORMERS / "vit_op17.onnx"), onnxlrp.load_composite("attnlrp"),
                          input_shape="pixel_values:2,3,16,16")
    logits, actual = run(model, {"pixel_values": REFERENCES["pixel_values"]}, ["logits", "relevance"])
    expected = run(built("vit", 17, "attnlrp"), {"pixel_values": REFERENCES["pixel_values"],
                                                 "target": logits.argmax(1)}, ["relevance"])[0]
    assert relative_error(actual, expected) < 1e-6


@pytest.mark.parametrize("composite", COMPOSITES)
def test_dynamo_export(composite):
    """torch's dynamo exporter (opset 20: Gelu and LayerNormalization as ops, dynamic batch) gives LXT's relevance."""
    model = onnxlrp.build(onnx.load(TRANSFORMERS / "vit_dynamo.onnx"), onnxlrp.load_composite(composite))
    actual = run(model, feeds("vit"), ["relevance"])[0]
    assert relative_error(actual, REFERENCES[f"vit_{composite}"]) < 1e-4


def test_einsum_equals_its_matmul_form(rng):
    """Q K^T as an Einsum of two computed tensors gets the same relevance as MatMul with a Transpose."""
    weights = {"wq": rng.standard_normal((4, 4)), "wk": rng.standard_normal((4, 4)), "shape": [0, -1]}
    head = [helper.make_node("MatMul", ["input", "wq"], ["q"]), helper.make_node("MatMul", ["input", "wk"], ["k"])]
    tail = [helper.make_node("Reshape", ["scores", "shape"], ["logits"])]
    einsum = make_model(head + [helper.make_node("Einsum", ["q", "k"], ["scores"], equation="bqd,bkd->bqk")] + tail,
                        (2, 3, 4), (2, 9), weights, opset=14)
    matmul = make_model(head + [helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1]),
                                helper.make_node("MatMul", ["q", "kt"], ["scores"])] + tail, (2, 3, 4), (2, 9), weights)
    _as_int64(einsum, "shape")
    _as_int64(matmul, "shape")
    x = rng.standard_normal((2, 3, 4)).astype(np.float32)
    target = np.array([1, 8])
    for composite in COMPOSITES:
        np.testing.assert_allclose(_relevance(einsum, x, target, composite)[1],
                                   _relevance(matmul, x, target, composite)[1], rtol=1e-5, atol=1e-7)


# LXT's vision recipe: cp_lrp with Zennit's gamma (0.25 on Conv, 0.05 on dense layers), `cp_lrp_gamma`.

GAMMA_REFERENCES = dict(np.load(TRANSFORMERS / "gamma_references.npz"))
CP_LRP_GAMMA = "cp_lrp_gamma"  # by name, as a user picks it


@pytest.mark.parametrize("model", ("vit_op14", "vit_op17", "vit_dynamo"))
def test_cp_lrp_gamma_matches_lxts_vision_recipe(model):
    """Every projection of the Hugging Face ViT is an nn.Linear that Zennit hooks: the preset as it is. The dense
    layers' biases count in gamma's denominators, as in Zennit, also at rank 3 (MatMul, then Add of the bias)."""
    built_model = onnxlrp.build(onnx.load(TRANSFORMERS / f"{model}.onnx"), onnxlrp.load_composite(CP_LRP_GAMMA))
    actual = run(built_model, feeds("vit"), ["relevance"])[0]
    assert relative_error(actual, GAMMA_REFERENCES["vit_cp_lrp_gamma"]) < 1e-4


def test_cp_lrp_gamma_on_torchvisions_vit(tmp_path):
    """torch's MultiheadAttention projects with its parameters, not by calling nn.Linear, so Zennit never hooks
    them and LXT's recipe leaves them LRP-0: a composite that extends the preset says so by name."""
    own = tmp_path / "torchvision_vit.toml"
    own.write_text(f'extends = "{CP_LRP_GAMMA}"\n\n[[layers]]\nnames = ["*/self_attention/*"]\n'
                   'op_types = ["Gemm", "MatMul"]\nrule = "zero"\n')
    source = onnx.load(TRANSFORMERS / "torchvision_vit_op17.onnx")
    feed = {"x": REFERENCES["pixel_values_32"], "target": REFERENCES["targets"]}
    expected = GAMMA_REFERENCES["torchvision_vit_cp_lrp_gamma"]
    actual = run(onnxlrp.build(source, onnxlrp.load_composite(str(own))), feed, ["relevance"])[0]
    assert relative_error(actual, expected) < 1e-4
    preset = run(onnxlrp.build(source, onnxlrp.load_composite(CP_LRP_GAMMA)), feed, ["relevance"])[0]
    assert relative_error(preset, expected) > 0.1  # gamma on the attention projections too


def test_cp_lrp_gamma_extends_cp_lrp():
    composite = onnxlrp.load_composite(CP_LRP_GAMMA)
    base = onnxlrp.load_composite("cp_lrp")
    assert composite.entries[2:] == base.entries and composite.params == base.params
    assert [(e.rule, e.params["gamma"], e.params["stabilizer"]) for e in composite.entries[:2]] == \
        [("gamma", 0.25, 1e-6), ("gamma", 0.05, 1e-6)]


def test_bias_of_a_rank_3_dense_layer_counts_in_gamma(rng):
    """x @ W + b at rank 3 (MatMul, then Add) gets gamma with the bias in z, as the same layer at rank 2 (a Gemm)."""
    w, b = rng.standard_normal((4, 3)), rng.standard_normal(3)
    x = rng.standard_normal((2, 5, 4)).astype(np.float32)
    target = np.array([0, 2])
    composite = onnxlrp.load_composite(CP_LRP_GAMMA)
    rank3 = make_model([helper.make_node("MatMul", ["input", "w"], ["z"]), helper.make_node("Add", ["z", "b"], ["y"]),
                        helper.make_node("ReduceSum", ["y", "axes"], ["logits"], keepdims=0)], (2, 5, 4), (2, 3),
                       {"w": w, "b": b, "axes": [1]})
    _as_int64(rank3, "axes")
    rank2 = make_model([helper.make_node("Reshape", ["input", "flat"], ["rows"]),
                        helper.make_node("MatMul", ["rows", "w"], ["z"]), helper.make_node("Add", ["z", "b"], ["y"]),
                        helper.make_node("Reshape", ["y", "back"], ["tokens"]),
                        helper.make_node("ReduceSum", ["tokens", "axes"], ["logits"], keepdims=0)], (2, 5, 4), (2, 3),
                       {"w": w, "b": b, "axes": [1], "flat": [10, 4], "back": [2, 5, 3]})
    _as_int64(rank2, "axes", "flat", "back")
    results = [run(onnxlrp.build(m, composite), {"input": x, "target": target}, ["relevance"])[0]
               for m in (rank3, rank2)]
    np.testing.assert_allclose(results[0], results[1], rtol=1e-5, atol=1e-7)

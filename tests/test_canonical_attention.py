"""ONNX's Attention op (opsets 23 to 25: masks, causal order, softcap, sliding windows, a KV cache) written out in
plain ops (canonical.expand_attention): the model's outputs stay those of the op, its relevance is that of the same
attention written by hand with MatMul and Softmax, and a torch dynamo export of scaled_dot_product_attention gives
LXT's relevance."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxlrp
from conftest import FIXTURES, relative_error, run
from onnxlrp.canonical.attention import expand_attention
from onnxlrp.errors import LrpError

TOKENS, HIDDEN, CLASSES = 4, 8, 3
COMPOSITES = ("attnlrp", "cp_lrp")


def _projections(rng: np.random.Generator, kv_heads: int, heads: int) -> dict[str, np.ndarray]:
    kv = HIDDEN * kv_heads // heads
    return {"wq": rng.standard_normal((HIDDEN, HIDDEN)) / 3, "wk": rng.standard_normal((HIDDEN, kv)) / 3,
            "wv": rng.standard_normal((HIDDEN, kv)) / 3, "bq": 0.1 * rng.standard_normal(HIDDEN),
            "cls": rng.standard_normal((HIDDEN, CLASSES)), "axes": np.array([1])}


def _cases(rng: np.random.Generator) -> dict[str, dict]:
    """Attention's attributes, its mask, and the bias it adds to the scores (what the hand-written form adds)."""
    upper = np.triu(np.ones((TOKENS, TOKENS), dtype=bool), k=1)
    float_mask = np.where(rng.random((TOKENS, TOKENS)) < 0.3, -np.inf, rng.standard_normal((TOKENS, TOKENS)))
    float_mask[:, 0] = 0.0  # no row entirely masked
    bool_mask = rng.random((TOKENS, TOKENS)) < 0.7
    bool_mask[:, 0] = True
    zeros = np.zeros((TOKENS, TOKENS))
    return {
        "plain": dict(attrs={}, mask=None, bias=None),
        "scale_and_float_mask": dict(attrs={"scale": 0.3}, mask=float_mask, bias=float_mask),
        "bool_mask": dict(attrs={}, mask=bool_mask, bias=np.where(bool_mask, 0.0, -np.inf)),
        "causal": dict(attrs={"is_causal": 1}, mask=None, bias=np.where(upper, -np.inf, zeros)),
        "causal_and_bool_mask": dict(attrs={"is_causal": 1}, mask=bool_mask,
                                     bias=np.where(upper | ~bool_mask, -np.inf, zeros)),
        "grouped_query": dict(attrs={}, mask=None, bias=None, kv_heads=1),
        "softcap_causal": dict(attrs={"softcap": 1.5, "is_causal": 1}, mask=None, bias=np.where(upper, -np.inf, zeros)),
        "sliding_window": dict(attrs={"is_causal": 1, "left_window_size": 1}, mask=None, opset=25,
                               bias=np.where(upper | np.tril(np.ones((TOKENS, TOKENS), dtype=bool), k=-2), -np.inf,
                                             zeros)),
    }


def _models(case: dict, weights: dict, four_d: bool) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """The same classifier with an Attention node (3D inputs with head counts, or 4D inputs) and written by hand:
    projections, heads, Q K^T * scale + bias, Softmax, P V, heads merged, mean over tokens, a dense layer."""
    heads, kv_heads = 2, case.get("kv_heads", 2)
    size = HIDDEN // heads
    scale = case["attrs"].get("scale", 1 / np.sqrt(size))
    head = [helper.make_node("MatMul", ["input", "wq"], ["q0"]), helper.make_node("Add", ["q0", "bq"], ["q"]),
            helper.make_node("MatMul", ["input", "wk"], ["k"]), helper.make_node("MatMul", ["input", "wv"], ["v"])]
    split = lambda name, n: [helper.make_node("Reshape", [name, f"shape{n}"], [f"{name}r"]),  # noqa: E731
                             helper.make_node("Transpose", [f"{name}r"], [f"{name}4"], perm=[0, 2, 1, 3])]
    heads4 = split("q", heads) + split("k", kv_heads) + split("v", kv_heads)
    merge = [helper.make_node("Transpose", ["y4"], ["yt"], perm=[0, 2, 1, 3]),
             helper.make_node("Reshape", ["yt", "merged"], ["y"])]
    tail = [helper.make_node("ReduceMean", ["y", "axes"], ["pooled"], keepdims=0),
            helper.make_node("MatMul", ["pooled", "cls"], ["logits"])]
    shapes = {f"shape{n}": np.array([0, 0, n, -1]) for n in {heads, kv_heads}} | {"merged": np.array([0, 0, -1])}
    inputs = ["q4", "k4", "v4"] if four_d else ["q", "k", "v"]
    extra = {} if four_d else {"q_num_heads": heads, "kv_num_heads": kv_heads}
    attention = helper.make_node("Attention", inputs + (["mask"] if case["mask"] is not None else []),
                                 ["y4" if four_d else "y"], **case["attrs"], **extra)
    with_op = _model(head + (heads4 if four_d else []) + [attention] + (merge if four_d else []) + tail,
                     weights | (shapes if four_d else {}), {"mask": case["mask"]} if case["mask"] is not None else {},
                     case.get("opset", 23))
    by_hand = _model(head + heads4 + [
        helper.make_node("Transpose", ["k4"], ["kt"], perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", ["q4", "kt"], ["qk"]), helper.make_node("Mul", ["qk", "scale"], ["scaled"])] +
        ([helper.make_node("Div", ["scaled", "cap"], ["shrunk"]), helper.make_node("Tanh", ["shrunk"], ["bent"]),
          helper.make_node("Mul", ["bent", "cap"], ["scores"])] if "softcap" in case["attrs"] else
         [helper.make_node("Identity", ["scaled"], ["scores"])]) +
        ([helper.make_node("Add", ["scores", "bias"], ["biased"])] if case["bias"] is not None else []) + [
        helper.make_node("Softmax", ["biased" if case["bias"] is not None else "scores"], ["p"], axis=-1),
        helper.make_node("MatMul", ["p", "v4"], ["y4"])] + merge + tail,
        weights | shapes | {"scale": np.array(scale), "cap": np.array(case["attrs"].get("softcap", 1.0))} |
        ({"bias": case["bias"]} if case["bias"] is not None else {}))
    return with_op, by_hand


def _model(nodes: list, floats: dict, masks: dict | None = None, opset: int = 23) -> onnx.ModelProto:
    ints = ("axes", "merged", "shape1", "shape2")
    initializers = [numpy_helper.from_array(np.asarray(v, np.int64 if k in ints else np.float32), k)
                    for k, v in floats.items()]
    initializers += [numpy_helper.from_array(v if v.dtype == bool else v.astype(np.float32), k)
                     for k, v in (masks or {}).items()]  # a boolean mask stays boolean
    graph = helper.make_graph(nodes, "attention",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", TOKENS, HIDDEN])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", CLASSES])],
                              initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10 if opset < 25 else 11
    onnx.checker.check_model(model)
    return model


CASES = _cases(np.random.default_rng(0))


def run_op(model: onnx.ModelProto, feeds: dict, names: list[str] | None = None) -> list[np.ndarray]:
    """The Attention model's outputs: ONNX Runtime's, or onnx's reference for opset 25's windows (which ONNX
    Runtime 1.31 does not know)."""
    if model.opset_import[0].version < 25:
        return run(model, feeds, names)
    from onnx.reference import ReferenceEvaluator
    return ReferenceEvaluator(model).run(names, feeds)


@pytest.mark.parametrize("four_d", (False, True), ids=("3d", "4d"))
@pytest.mark.parametrize("case", CASES)
def test_attention_written_out(rng, case, four_d):
    """Built with attnlrp and cp_lrp: the logits are the Attention op's (ONNX Runtime), the relevance that of the
    hand-written attention."""
    with_op, by_hand = _models(CASES[case], _projections(rng, CASES[case].get("kv_heads", 2), 2), four_d)
    x = rng.standard_normal((2, TOKENS, HIDDEN)).astype(np.float32)
    feeds = {"input": x, "target": np.array([0, 2])}
    original = run_op(with_op, {"input": x})[0]
    np.testing.assert_allclose(run(by_hand, {"input": x})[0], original, rtol=1e-5, atol=1e-6)
    for composite in COMPOSITES:
        logits, actual = run(onnxlrp.build(with_op, onnxlrp.load_composite(composite)), feeds, ["logits", "relevance"])
        expected = run(onnxlrp.build(by_hand, onnxlrp.load_composite(composite)), feeds, ["relevance"])[0]
        np.testing.assert_allclose(logits, original, rtol=1e-5, atol=1e-6)
        assert np.abs(actual).sum() > 0
        assert relative_error(actual, expected) < 1e-6, composite


def test_expand_attention_leaves_no_attention(rng):
    with_op, _ = _models(CASES["causal"], _projections(rng, 2, 2), four_d=False)
    graph = onnxlrp.canonical.passes.canonicalize(with_op)
    assert not any(n.op == "Attention" for n in graph.nodes) and any(n.op == "Softmax" for n in graph.nodes)
    assert not expand_attention(graph)


def _with_cache(model: onnx.ModelProto) -> onnx.ModelProto:
    """The 4D model with a KV cache: inputs past_key and past_value [N, 2, P, 4], outputs present_key and
    present_value."""
    cached = onnx.ModelProto()
    cached.CopyFrom(model)
    node = next(n for n in cached.graph.node if n.op_type == "Attention")
    node.input.extend([""] * (4 - len(node.input)) + ["past_key", "past_value"])
    node.output.extend(["present_key", "present_value"])
    for name in ("past_key", "past_value"):
        cached.graph.input.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", 2, "P", 4]))
    for name in ("present_key", "present_value"):
        cached.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", 2, "PT", 4]))
    return cached


@pytest.mark.parametrize("case", ("causal", "sliding_window"))
def test_attention_with_a_kv_cache(rng, case):
    """Attention with past_key and past_value: with a past of 2 positions the built model's logits and presents
    are the op's (causal order and window counted from the cache's end); with an empty past its relevance is that of
    the model without a cache (the past is never explained)."""
    with_op, by_hand = _models(CASES[case], _projections(rng, 2, 2), four_d=True)
    cached = _with_cache(with_op)
    x = rng.standard_normal((2, TOKENS, HIDDEN)).astype(np.float32)
    past = {name: rng.standard_normal((2, 2, 2, 4)).astype(np.float32) for name in ("past_key", "past_value")}
    empty = {name: np.zeros((2, 2, 0, 4), np.float32) for name in past}
    names = ["logits", "present_key", "present_value"]
    for composite in COMPOSITES:
        built = onnxlrp.build(cached, onnxlrp.load_composite(composite))
        for given in (past, empty):
            for expected, actual in zip(run_op(cached, {"input": x, **given}, names),
                                        run(built, {"input": x, **given}, names)):
                np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-6)
        actual = run(built, {"input": x, **empty, "target": np.array([1, 0])}, ["relevance"])[0]
        expected = run(onnxlrp.build(by_hand, onnxlrp.load_composite(composite)),
                       {"input": x, "target": np.array([1, 0])}, ["relevance"])[0]
        assert np.abs(actual).sum() > 0 and relative_error(actual, expected) < 1e-6, composite


@pytest.mark.parametrize("change, fragment", [
    (lambda node: node.input.extend(["", "", "", "lengths"]), "nonpad_kv_seqlen"),
    (lambda node: node.input.extend(["", "past"]), "past_key without past_value"),
    (lambda node: node.output.extend(["", "", "scores"]), "output qk_matmul_output"),
])
def test_attention_refusals_are_one_line(rng, change, fragment):
    with_op, _ = _models(CASES["plain"], _projections(rng, 2, 2), four_d=True)
    with_op.opset_import[0].version = 24
    node = next(n for n in with_op.graph.node if n.op_type == "Attention")
    change(node)
    if "past" in node.input:
        with_op.graph.input.append(helper.make_tensor_value_info("past", TensorProto.FLOAT, ["N", 2, 1, 4]))
    if "lengths" in node.input:
        with_op.graph.input.append(helper.make_tensor_value_info("lengths", TensorProto.INT64, ["N"]))
    if "scores" in node.output:
        with_op.graph.output.append(helper.make_tensor_value_info("scores", TensorProto.FLOAT, None))
    with pytest.raises(LrpError) as error:
        onnxlrp.build(with_op, onnxlrp.load_composite("attnlrp"))
    message = str(error.value)
    assert "\n" not in message and "(Attention)" in message and fragment in message and "not supported" in message


TRANSFORMERS = FIXTURES / "transformers"


@pytest.mark.parametrize("composite", COMPOSITES)
def test_dynamo_export_with_attention_op_matches_lxt(composite):
    """The tiny Hugging Face ViT with sdpa attention, exported by torch's dynamo exporter at opset 23 (one Attention
    node per layer), against LXT's relevance for it."""
    source = onnx.load(TRANSFORMERS / "vit_attention_op23.onnx")
    assert sum(n.op_type == "Attention" for n in source.graph.node) == 2
    references = dict(np.load(TRANSFORMERS / "references.npz"))
    expected = np.load(TRANSFORMERS / "attention_references.npz")[f"vit_{composite}"]
    feeds = {"pixel_values": references["pixel_values"], "target": references["targets"]}
    logits, actual = run(onnxlrp.build(source, onnxlrp.load_composite(composite)), feeds, ["logits", "relevance"])
    np.testing.assert_allclose(logits, run(source, {"pixel_values": feeds["pixel_values"]})[0], rtol=1e-5, atol=1e-6)
    assert relative_error(actual, expected) < 1e-4

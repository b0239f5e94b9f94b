"""Decoder language models (issue 19): tiny Llama, Qwen2 (grouped-query heads), Gemma 3 (tied embeddings, q/k
norms), GPT-2, Gemma 2 (soft-capped scores and logits, sliding-window layers) and Qwen3 (q/k norms) with random
weights, exported by torch's TorchScript exporter with the logits [N, T, V] as output and a dynamic batch and
sequence length, explained at a position against LXT 2.1 in float64 (fixtures/make_llms.py)."""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

import onnxlrp
from conftest import FIXTURES, assert_one_line_error, onnxlrp_cli, relative_error, run

LLM = FIXTURES / "llm"
REFERENCES = dict(np.load(LLM / "references.npz"))
FAMILIES = ("llama", "qwen2", "gemma3", "gpt2")
COMPOSITES = ("attnlrp", "cp_lrp")
PADDINGS = ("none", "right", "left")
EXPORTS = ("op17", "dynamo")  # torch's TorchScript exporter at opset 17, its dynamo exporter (opset 20)
# Gemma 2 (soft-capping, a sliding window of 4 on every other layer) and Qwen3 by both exporters; Gemma 3 with a
# sliding window of 4 (its weights, LXT's relevance 15-23% away from that of its window of 64) by TorchScript.
PARITY = [(family, composite, export) for family in FAMILIES + ("gemma2", "qwen3") for composite in COMPOSITES
          for export in EXPORTS] + [("gemma3_window", composite, "op17") for composite in COMPOSITES]
# How far back the explained token reads where windows limit it: two sliding layers of 4 keys, 3 positions each.
REACH = {"gemma3_window": 6}


@lru_cache(maxsize=None)
def source(family: str, export: str = "op17") -> onnx.ModelProto:
    return onnx.load(LLM / f"{family}_{export}.onnx")


@lru_cache(maxsize=None)
def built(family: str, composite: str, export: str = "op17") -> onnx.ModelProto:
    return onnxlrp.build(source(family, export), composite)


def feeds(padding: str) -> dict[str, np.ndarray]:
    return {name: REFERENCES[f"{padding}_{name}"] for name in ("input_ids", "attention_mask")}


@pytest.mark.parametrize("family,composite,export", PARITY)
def test_parity_with_lxt(family, composite, export):
    """The next token after each prompt (position -1, its arg-max logit), per token and embedding feature, for
    prompts unpadded, right padded and left padded; padded tokens, and tokens before a sliding window's reach, get
    exactly 0; the logits are the original's."""
    expected = REFERENCES[f"{family}_{composite}"]
    model, original = built(family, composite, export), source(family, export)
    for padding, wanted in zip(PADDINGS, expected):
        logits, token, embedding = run(model, feeds(padding), ["logits", "relevance", "relevance_embedding"])
        mask = feeds(padding)["attention_mask"]
        assert embedding.shape == wanted.shape and token.shape == mask.shape
        assert relative_error(embedding, wanted) < 1e-4, padding
        np.testing.assert_allclose(token, embedding.sum(-1), rtol=1e-5, atol=1e-6)
        assert np.all(token[mask == 0] == 0) and np.all(embedding[mask == 0] == 0)
        last = mask.shape[1] - 1 - np.argmax(mask[:, ::-1], axis=1)
        reached = (mask == 1) & (last[:, None] - np.arange(mask.shape[1]) <= REACH.get(family, mask.shape[1]))
        assert np.all(token[reached] != 0) and np.all(token[~reached] == 0)
        np.testing.assert_array_equal(unoptimized(model, feeds(padding)), unoptimized(original, feeds(padding)))
        assert relative_error(logits, run(original, feeds(padding))[0]) < 1e-6


def unoptimized(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """The logits as the graph computes them: ONNX Runtime's fusions differ once the relevance graph reads the
    model's intermediate tensors (GPT-2's differ by 3e-6 under cp_lrp), so outputs are compared bit for bit
    without them."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options).run(["logits"], feeds)[0]


def _lookup_model(norm: list[onnx.NodeProto], opset: int, domains: tuple = ()) -> onnx.ModelProto:
    """ids [N, T] -> embedding (table 11 x 8) -> `norm` (from 'x' to 'y') -> a dense layer to 5 logits per position."""
    rng = np.random.default_rng(0)
    weights = [helper.make_tensor(name, TensorProto.FLOAT, values.shape, values.ravel()) for name, values in (
        ("table", rng.standard_normal((11, 8)).astype(np.float32)),
        ("scale", (1 + 0.1 * rng.standard_normal(8)).astype(np.float32)),
        ("dense", rng.standard_normal((8, 5)).astype(np.float32)))]
    nodes = [helper.make_node("Gather", ["table", "input_ids"], ["x"]), *norm,
             helper.make_node("MatMul", ["y", "dense"], ["logits"])]
    graph = helper.make_graph(nodes, "lm", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["N", 6])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 6, 5])], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset),
                                                     *(helper.make_opsetid(d, 1) for d in domains)])
    model.ir_version = 10
    return model


WRITTEN_OUT = [helper.make_node("Pow", ["x", "two"], ["square"]),
               helper.make_node("ReduceMean", ["square"], ["variance"], axes=[-1]),
               helper.make_node("Add", ["variance", "eps"], ["shifted"]),
               helper.make_node("Sqrt", ["shifted"], ["sigma"]),
               helper.make_node("Div", ["x", "sigma"], ["normed"]),
               helper.make_node("Mul", ["normed", "scale"], ["y"])]
CONSTANTS = [helper.make_node("Constant", [], [name], value=onnx.numpy_helper.from_array(np.array(value, np.float32)))
             for name, value in (("two", 2.0), ("eps", 1e-5))]


@pytest.mark.parametrize("op,inputs,opset,domain", [
    ("SimplifiedLayerNormalization", ["x", "scale"], 17, ""), ("RMSNormalization", ["x", "scale"], 23, ""),
    ("SkipSimplifiedLayerNormalization", ["x", "x", "scale"], 17, "com.microsoft")])
def test_rms_norm_ops_as_written_out(op, inputs, opset, domain):
    """ONNX Runtime's SimplifiedLayerNormalization and SkipSimplifiedLayerNormalization (of x + x here, which the
    norm maps where it maps x) and opset 23's RMSNormalization give the relevance of the same norm written out
    (sigma a constant): the last token's relevance, as no bias absorbs any, sums to the logit."""
    ids = np.array([[1, 4, 2, 9, 3, 7], [5, 5, 0, 10, 8, 6]])
    attrs = {} if domain else {"axis": -1}
    fused = _lookup_model([helper.make_node(op, inputs, ["y"], epsilon=1e-5, domain=domain, **attrs)], opset,
                          domains=(domain,) if domain else ())
    plain = _lookup_model(CONSTANTS + WRITTEN_OUT, 17)
    (logits, relevance), (plain_logits, expected) = (
        run(onnxlrp.build(model, "attnlrp"), {"input_ids": ids}, ["logits", "relevance"]) for model in (fused, plain))
    np.testing.assert_allclose(logits, plain_logits, rtol=1e-5, atol=1e-5)
    assert relative_error(relevance, expected) < 1e-5  # the skip form's eps meets 4 mean(x^2), not mean(x^2)
    assert relevance.shape == ids.shape and np.abs(relevance[:, :-1]).sum() == 0  # causal-free: only the last
    np.testing.assert_allclose(relevance.sum(1), logits[:, -1].max(1), rtol=1e-5)


def _two_lookups(rows: tuple[int, int]) -> onnx.ModelProto:
    """Two integer inputs, each looked up in a table of its own (`rows` rows), summed, then a dense layer."""
    rng = np.random.default_rng(1)
    weights = [helper.make_tensor(name, TensorProto.FLOAT, values.shape, values.ravel()) for name, values in (
        ("words", rng.standard_normal((rows[0], 4)).astype(np.float32)),
        ("places", rng.standard_normal((rows[1], 4)).astype(np.float32)),
        ("dense", rng.standard_normal((4, 3)).astype(np.float32)))]
    nodes = [helper.make_node("Gather", ["words", "input_ids"], ["w"]),
             helper.make_node("Reshape", ["other_ids", "shape"], ["flat"]),
             helper.make_node("Gather", ["places", "flat"], ["p"]),
             helper.make_node("Add", ["w", "p"], ["x"]),
             helper.make_node("MatMul", ["x", "dense"], ["logits"])]
    weights.append(helper.make_tensor("shape", TensorProto.INT64, [2], [0, -1]))
    inputs = [helper.make_tensor_value_info(name, TensorProto.INT64, ["N", 5]) for name in ("input_ids", "other_ids")]
    graph = helper.make_graph(nodes, "two", inputs, [helper.make_tensor_value_info("logits", TensorProto.FLOAT,
                                                                                   ["N", 5, 3])], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_two_lookups_of_one_size_are_not_guessed():
    """Two inputs looked up in tables of one size: one line asking for --explain-input; named, each is explained
    (the one reshaped before its lookup too), and the relevance of the two sums to the logit."""
    with pytest.raises(onnxlrp.LrpError, match=r"inputs 'input_ids' and 'other_ids' are both looked up in embedding "
                                               r"tables of 7 rows: name the one to explain with --explain-input NAME"):
        onnxlrp.build(_two_lookups((7, 7)), "attnlrp")
    feeds = {"input_ids": np.array([[1, 2, 3, 4, 5]]), "other_ids": np.array([[0, 1, 2, 3, 6]])}
    parts = [run(onnxlrp.build(_two_lookups((7, 7)), "attnlrp", explain_input=name), feeds, ["logits", "relevance"])
             for name in feeds]
    logit = parts[0][0][0, -1].max()
    assert parts[0][1].shape == parts[1][1].shape == (1, 5)
    np.testing.assert_allclose(parts[0][1].sum() + parts[1][1].sum(), logit, rtol=1e-5)
    # A larger table is the one explained, without asking (BERT's token ids beside its position ids).
    larger, named = (run(onnxlrp.build(_two_lookups((9, 7)), "attnlrp", explain_input=name), feeds, ["relevance"])[0]
                     for name in (None, "input_ids"))
    np.testing.assert_array_equal(larger, named)
    with pytest.raises(onnxlrp.LrpError, match="--explain-input: no model input named 'ids'"):
        onnxlrp.build(_two_lookups((7, 7)), "attnlrp", explain_input="ids")


@pytest.mark.parametrize("family", FAMILIES)
def test_position_and_open_length(family):
    """`position` (fed at run time; counted from the start when >= 0) explains that position: the same relevance
    as the prompt cut after it explained at its end (the models are causal), 0 after it; and a built model takes
    prompts of any length (the fixtures' sequence length is open)."""
    model = built(family, "attnlrp")
    full = feeds("none")
    at_three = run(model, {**full, "position": np.array(3)}, ["relevance_embedding"])[0]
    cut = {name: values[:, :4] for name, values in full.items()}
    alone = run(model, cut, ["relevance_embedding"])[0]
    np.testing.assert_array_equal(unoptimized(model, cut), unoptimized(source(family), cut))
    assert relative_error(at_three[:, :4], alone) < 1e-5
    assert np.all(at_three[:, 4:] == 0)
    from_end = run(model, {**full, "position": np.array(-5)}, ["relevance_embedding"])[0]
    np.testing.assert_array_equal(from_end, at_three)


def test_kv_cache_inputs_are_never_explained():
    """Llama exported with a KV cache as optimum does (past_key_values.* inputs, present.* outputs): the tokens
    are explained, not the cache; fed a past of length 0 it gives the relevance of the model without a cache;
    with a past the outputs are the original's, and position -1 is still the prompt's last token."""
    with_past = onnx.load(LLM / "llama_past_op17.onnx")
    model = onnxlrp.build(with_past, "attnlrp")
    names = [value.name for value in with_past.graph.output]
    empty = {f"past_key_values.{i}.{kind}": np.zeros((2, 2, 0, 8), np.float32) for i in range(2)
             for kind in ("key", "value")}
    for padding in PADDINGS:
        relevance = run(model, {**feeds(padding), **empty}, ["relevance_embedding"])[0]
        expected = run(built("llama", "attnlrp"), feeds(padding), ["relevance_embedding"])[0]
        assert relative_error(relevance, expected) < 1e-6
    past = {name: np.random.default_rng(2).standard_normal(values.shape[:2] + (3, 8)).astype(np.float32)
            for name, values in empty.items()}
    mask = np.concatenate([np.ones((2, 3), np.int64), feeds("right")["attention_mask"]], axis=1)
    cached = {**feeds("right"), "attention_mask": mask, **past}
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    original, explained = (ort.InferenceSession(m.SerializeToString(), options).run(names, cached)
                           for m in (with_past, model))
    for a, b in zip(original, explained):
        np.testing.assert_array_equal(a, b)
    at_end, at_four = (run(model, {**cached, "position": np.array(p)}, ["relevance"])[0] for p in (-1, 4))
    np.testing.assert_array_equal(at_end[1], at_four[1])  # the second prompt is 5 tokens long
    assert np.all(at_end[1, 5:] == 0) and np.all(at_end[1, :5] != 0)


def _rotary_model(domain: str, interleaved: int, rotated: int) -> onnx.ModelProto:
    """x [N, 6, 16] (2 heads of 8) -> RotaryEmbedding at position ids -> a dense layer to 5 logits per position."""
    rng = np.random.default_rng(3)
    angles = np.arange(16)[:, None] * rng.uniform(0.1, 1.0, (rotated or 8) // 2)[None]
    weights = [helper.make_tensor(name, TensorProto.FLOAT, values.shape, values.ravel()) for name, values in (
        ("cos_cache", np.cos(angles).astype(np.float32)), ("sin_cache", np.sin(angles).astype(np.float32)),
        ("dense", rng.standard_normal((16, 5)).astype(np.float32)))]
    order = ["x", "position_ids", "cos_cache", "sin_cache"] if domain else \
        ["x", "cos_cache", "sin_cache", "position_ids"]
    nodes = [helper.make_node("RotaryEmbedding", order, ["y"], domain=domain, num_heads=2, interleaved=interleaved,
                              rotary_embedding_dim=rotated),
             helper.make_node("MatMul", ["y", "dense"], ["logits"])]
    graph = helper.make_graph(nodes, "rotary", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6, 16]),
                                                helper.make_tensor_value_info("position_ids", TensorProto.INT64,
                                                                              ["N", 6])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 6, 5])], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23 if not domain else 17),
                                                     *([helper.make_opsetid(domain, 1)] if domain else [])])
    model.ir_version = 10
    return model


@pytest.mark.parametrize("domain,interleaved,rotated", [("", 0, 0), ("", 1, 4), ("com.microsoft", 0, 0),
                                                        ("com.microsoft", 1, 0)])
def test_rotary_embedding_ops(domain, interleaved, rotated):
    """RotaryEmbedding (opset 23, com.microsoft) is linear in x with the cos and sin tables constants: its logits
    are ORT's, and LRP-0 through it is x times the gradient of the explained logit, read here from the model run
    on every basis vector of x."""
    model = _rotary_model(domain, interleaved, rotated)
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 6, 16)).astype(np.float32)
    positions = np.array([np.arange(6), np.arange(3, 9)])
    logits, relevance = run(onnxlrp.build(model, "attnlrp"), {"x": x, "position_ids": positions},
                            ["logits", "relevance"])
    np.testing.assert_allclose(logits, run(model, {"x": x, "position_ids": positions})[0], rtol=1e-5, atol=1e-5)
    basis = np.eye(6 * 16, dtype=np.float32).reshape(-1, 6, 16)
    for sample in range(2):
        target = logits[sample, -1].argmax()
        gradient = run(model, {"x": basis, "position_ids": np.repeat(positions[sample:sample + 1], len(basis), 0)}
                       )[0][:, -1, target].reshape(6, 16)
        np.testing.assert_allclose(relevance[sample], x[sample] * gradient, rtol=1e-4, atol=1e-6)


def test_command_line_fixed_length_and_position(tmp_path):
    """`onnxlrp build --input-shape` (a fixed length) and `--position 3` (the built model's default): the relevance
    of the open-length build fed position 3; two lookups of one size are one line on the command line."""
    out = tmp_path / "llama_lrp.onnx"
    done = onnxlrp_cli("build", LLM / "llama_op17.onnx", "-o", out, "--composite", "attnlrp", "--position", "3",
                       "--input-shape", "input_ids:N,8", "--input-shape", "attention_mask:N,8")
    assert done.returncode == 0, done.stderr
    fixed = run(onnx.load(out), feeds("left"), ["relevance"])[0]
    expected = run(built("llama", "attnlrp"), {**feeds("left"), "position": np.array(3)}, ["relevance"])[0]
    assert relative_error(fixed, expected) < 1e-6 and np.all(fixed[:, 4:] == 0)
    onnx.save(_two_lookups((7, 7)), tmp_path / "two.onnx")
    assert_one_line_error(onnxlrp_cli("build", tmp_path / "two.onnx", "-o", tmp_path / "two_lrp.onnx"),
                          "both looked up", "--explain-input NAME")
    assert onnxlrp_cli("build", tmp_path / "two.onnx", "-o", tmp_path / "two_lrp.onnx", "--explain-input",
                       "other_ids").returncode == 0


def _attention_model(op: str, rotary: int = 0, window: int = -1, softcap: float = 0.0) -> onnx.ModelProto:
    """x [N, 6, 16] -> query (4 heads of 16), key and value (2 heads) projections -> ONNX Runtime's
    GroupQueryAttention (seqlens_k and total_sequence_length from the attention mask, as the GenAI builder writes
    them) or ONNX's Attention (opset 23, is_causal) -> a dense layer to 5 logits per position."""
    rng = np.random.default_rng(5)
    angles = np.arange(16)[:, None] * rng.uniform(0.1, 1.0, 8)[None]
    arrays = {"wq": rng.standard_normal((16, 64)), "wk": rng.standard_normal((16, 32)),
              "wv": rng.standard_normal((16, 32)), "wo": rng.standard_normal((64, 5)), "cos_cache": np.cos(angles),
              "sin_cache": np.sin(angles)}
    weights = [onnx.numpy_helper.from_array(values.astype(np.float32), name) for name, values in arrays.items()]
    weights += [onnx.numpy_helper.from_array(np.array(v, np.int64), name) for name, v in (("one", 1), ("axis", [1]))]
    nodes = [helper.make_node("MatMul", ["x", f"w{name}"], [name]) for name in "qkv"]
    if op == "MultiHeadAttention":  # 4 heads of 16 for the keys and values too
        nodes[1:] = [helper.make_node("MatMul", ["x", "wq"], [name]) for name in "kv"]
        nodes.append(helper.make_node(op, ["q", "k", "v", "", "attention_mask"], ["y"], domain="com.microsoft",
                                      num_heads=4, unidirectional=1))
    elif op == "GroupQueryAttention":
        nodes += [helper.make_node("ReduceSum", ["attention_mask", "axis"], ["lengths"], keepdims=0),
                  helper.make_node("Sub", ["lengths", "one"], ["last"]),
                  helper.make_node("Cast", ["last"], ["seqlens_k"], to=TensorProto.INT32),
                  helper.make_node("Shape", ["attention_mask"], ["shape"]),
                  helper.make_node("Gather", ["shape", "one"], ["total"]),
                  helper.make_node("Cast", ["total"], ["total_sequence_length"], to=TensorProto.INT32),
                  helper.make_node(op, ["q", "k", "v", "", "", "seqlens_k", "total_sequence_length", "cos_cache",
                                        "sin_cache"], ["y"], domain="com.microsoft", num_heads=4, kv_num_heads=2,
                                   do_rotary=rotary, local_window_size=window, softcap=softcap)]
    else:
        nodes.append(helper.make_node(op, ["q", "k", "v"], ["y"], is_causal=1, q_num_heads=4, kv_num_heads=2))
    nodes.append(helper.make_node("MatMul", ["y", "wo"], ["logits"]))
    grouped = op != "Attention"
    mask = TensorProto.INT32 if op == "MultiHeadAttention" else TensorProto.INT64
    graph = helper.make_graph(nodes, "attention", [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6, 16]),
        *([helper.make_tensor_value_info("attention_mask", mask, ["N", 6])] if grouped else [])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 6, 5])], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17 if grouped else 23),
                                                     *([helper.make_opsetid("com.microsoft", 1)] if grouped else [])])
    model.ir_version = 10
    return model


@pytest.mark.parametrize("rotary,window,softcap", [(0, -1, 0.0), (1, -1, 0.0), (1, 3, 0.0), (1, -1, 5.0)])
def test_group_query_attention(rotary, window, softcap):
    """GroupQueryAttention written out: ONNX Runtime's logits (prompts unpadded and right padded, a sliding window
    of 3 keys, Gemma 2's soft-capping of the scores at 5); under cp_lrp, which has nothing to absorb relevance
    here, the relevance sums to the logit and stays on the prompt (within the window); without rotary, attnlrp
    gives what it gives ONNX's Attention op of the same heads (tested against LXT), and with soft-capping
    (a SoftCap, whose relevance follows its gradient as in LXT: tested on Gemma 2) a finite relevance on every
    token."""
    model = _attention_model("GroupQueryAttention", rotary, window, softcap)
    x = np.random.default_rng(6).standard_normal((2, 6, 16)).astype(np.float32)
    mask = np.array([[1] * 6, [1] * 4 + [0] * 2])
    feeds = {"x": x, "attention_mask": mask}
    logits, relevance = run(onnxlrp.build(model, "cp_lrp"), feeds, ["logits", "relevance"])
    # At the tokens (ONNX Runtime's window at padded positions is not the causal one: their outputs are unused).
    np.testing.assert_allclose(logits[mask == 1], run(model, feeds)[0][mask == 1], rtol=1e-4, atol=1e-4)
    explained = [logits[0, 5].max(), logits[1, 3].max()]
    np.testing.assert_allclose(relevance.sum((1, 2)), explained, rtol=1e-4)
    for sample, last in enumerate((5, 3)):  # the explained token reads the values of the tokens in its window
        read = np.arange(6) > last - window if window > 0 else np.arange(6) >= 0
        reached = read & (np.arange(6) <= last)
        assert np.all(relevance[sample, reached] != 0) and np.all(relevance[sample, ~reached] == 0)
    if softcap:
        capped = run(onnxlrp.build(model, "attnlrp"), feeds, ["relevance"])[0]
        assert np.all(np.isfinite(capped)) and np.all(capped[0] != 0)
    if not rotary:
        grouped = run(onnxlrp.build(model, "attnlrp"), {"x": x, "attention_mask": np.ones_like(mask)},
                      ["relevance"])[0]
        plain = run(onnxlrp.build(_attention_model("Attention"), "attnlrp"), {"x": x}, ["relevance"])[0]
        assert relative_error(grouped, plain) < 1e-5


def _soft_capped(scaling: onnx.NodeProto) -> onnx.ModelProto:
    """x [N, 4] -> a dense layer to 3 -> Relu (so that no scaling folds into the layer) -> `scaling` (from 'r' to
    'u') -> Tanh -> times the cap, 2."""
    rng = np.random.default_rng(10)
    weights = [onnx.numpy_helper.from_array(v, name) for name, v in (
        ("dense", rng.standard_normal((4, 3)).astype(np.float32)), ("cap", np.array(2.0, np.float32)),
        ("inverse", np.array(0.5, np.float32)))]
    nodes = [helper.make_node("MatMul", ["x", "dense"], ["z"]), helper.make_node("Relu", ["z"], ["r"]), scaling,
             helper.make_node("Tanh", ["u"], ["t"]), helper.make_node("Mul", ["cap", "t"], ["logits"])]
    graph = helper.make_graph(nodes, "capped", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_soft_capping_follows_its_gradient():
    """cap * tanh(x / cap), the division also written as a product by 1 / cap: under attnlrp the relevance is x
    times the gradient of the logit (LRP-0 on the dense layer, the Relu's identity rule), as LXT gives on Gemma 2's
    scores and logits; an activation's Tanh would pass the capped logit instead."""
    x = np.random.default_rng(11).standard_normal((6, 4)).astype(np.float32) * 3
    dense = onnx.numpy_helper.to_array(_soft_capped(helper.make_node("Div", ["r", "cap"], ["u"])).graph.initializer[0])
    for scaling in (helper.make_node("Div", ["r", "cap"], ["u"]), helper.make_node("Mul", ["inverse", "r"], ["u"])):
        logits, relevance = run(onnxlrp.build(_soft_capped(scaling), "attnlrp"), {"x": x}, ["logits", "relevance"])
        target = logits.argmax(1)
        z = (x @ dense)[np.arange(len(x)), target]
        slope = (1 - np.tanh(np.maximum(z, 0) / 2.0) ** 2) * (z > 0)
        np.testing.assert_allclose(relevance, x * dense[:, target].T * slope[:, None], rtol=1e-5, atol=1e-6)


def _quantized_table_model(table: onnx.NodeProto, weights: list[onnx.TensorProto]) -> onnx.ModelProto:
    """ids [N, 5] -> `table` (to 'x' [N, 5, 32]) -> a dense layer to 3 logits per position."""
    dense = np.random.default_rng(8).standard_normal((32, 3)).astype(np.float32)
    graph = helper.make_graph([table, helper.make_node("MatMul", ["x", "dense"], ["logits"])], "quantized",
                              [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["N", 5])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 5, 3])],
                              [*weights, onnx.numpy_helper.from_array(dense, "dense")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                     helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    return model


@pytest.mark.parametrize("zero_points", (False, True))
def test_gather_block_quantized_embedding(zero_points):
    """A 4-bit embedding table (com.microsoft GatherBlockQuantized, packed in uint8, blocks of 16) is explained
    on its float twin: the relevance of the same model with the table that ONNX Runtime's kernel dequantizes;
    the logits are the quantized model's own."""
    rng = np.random.default_rng(9)
    weights = [onnx.numpy_helper.from_array(rng.integers(0, 256, (10, 16), dtype=np.uint8), "table"),  # 10 x 32
               onnx.numpy_helper.from_array(rng.uniform(0.05, 0.2, (10, 2)).astype(np.float32), "scales")]
    if zero_points:
        weights.append(onnx.numpy_helper.from_array(rng.integers(0, 256, (10, 1), dtype=np.uint8), "zero_points"))
    lookup = helper.make_node("GatherBlockQuantized", ["table", "input_ids", "scales"] + ["zero_points"] * zero_points,
                              ["x"], domain="com.microsoft", bits=4, block_size=16, gather_axis=0, quantize_axis=1)
    quantized = _quantized_table_model(lookup, weights)
    ids = np.array([[1, 4, 2, 9, 3], [0, 5, 5, 8, 7]])
    reading = onnx.ModelProto.FromString(quantized.SerializeToString())
    reading.graph.output.append(helper.make_tensor_value_info("x", TensorProto.FLOAT, None))
    table = run(reading, {"input_ids": np.arange(10)[:, None].repeat(5, 1)}, ["x"])[0][:, 0]
    plain = _quantized_table_model(helper.make_node("Gather", ["float_table", "input_ids"], ["x"]),
                                   [onnx.numpy_helper.from_array(table, "float_table")])
    (logits, relevance), (plain_logits, expected) = (
        run(onnxlrp.build(model, "attnlrp"), {"input_ids": ids}, ["logits", "relevance_embedding"])
        for model in (quantized, plain))
    np.testing.assert_array_equal(logits, run(quantized, {"input_ids": ids})[0])
    np.testing.assert_allclose(logits, plain_logits, rtol=1e-6, atol=1e-6)
    assert relative_error(relevance, expected) < 1e-6 and np.abs(expected[:, -1]).sum() > 0


def test_multihead_attention():
    """MultiHeadAttention (com.microsoft, unidirectional, a key padding mask) written out: ONNX Runtime's logits;
    under attnlrp, what ONNX's Attention op of the same heads gives (is_causal; the mask all ones here)."""
    model = _attention_model("MultiHeadAttention")
    x = np.random.default_rng(7).standard_normal((2, 6, 16)).astype(np.float32)
    mask = np.array([[1] * 6, [1] * 4 + [0] * 2], np.int32)
    logits = run(onnxlrp.build(model, "attnlrp"), {"x": x, "attention_mask": mask}, ["logits"])[0]
    np.testing.assert_allclose(logits, run(model, {"x": x, "attention_mask": mask})[0], rtol=1e-4, atol=1e-4)
    heads = _attention_model("Attention")
    for tensor in heads.graph.initializer:  # the same key and value projections as the query's
        if tensor.name in ("wk", "wv"):
            tensor.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(next(
                t for t in heads.graph.initializer if t.name == "wq")), tensor.name))
    for node in heads.graph.node:
        if node.op_type == "Attention":
            node.attribute.remove(next(a for a in node.attribute if a.name == "kv_num_heads"))
            node.attribute.append(helper.make_attribute("kv_num_heads", 4))
    relevance = run(onnxlrp.build(model, "attnlrp"), {"x": x, "attention_mask": np.ones_like(mask)},
                    ["relevance"])[0]
    expected = run(onnxlrp.build(heads, "attnlrp"), {"x": x}, ["relevance"])[0]
    assert relative_error(relevance, expected) < 1e-5


@pytest.mark.parametrize("composite", COMPOSITES)
@pytest.mark.parametrize("family", ("mistral", "phi3"))
def test_families_without_a_reference(family, composite):
    """Mistral (a sliding window) and Phi3 (fused query-key-value and gate-up projections, split) build; their
    logits are the original's, and the relevance is finite, non-zero on the prompt's tokens and 0 on padding."""
    model, original = onnxlrp.build(source(family), composite), source(family)
    for padding in PADDINGS:
        mask = feeds(padding)["attention_mask"]
        token = run(model, feeds(padding), ["relevance"])[0]
        np.testing.assert_array_equal(unoptimized(model, feeds(padding)), unoptimized(original, feeds(padding)))
        assert np.all(np.isfinite(token)) and np.all(token[mask == 1] != 0) and np.all(token[mask == 0] == 0)


def test_genai_builder_form():
    """Llama as ONNX Runtime GenAI's model builder writes it (SimplifiedLayerNormalization,
    SkipSimplifiedLayerNormalization, GroupQueryAttention with do_rotary, past_key_values.* inputs; heads of 16,
    as its kernels need), from the weights of a torch Llama: the relevance of LXT on that Llama, for prompts
    unpadded and right padded (GroupQueryAttention's padding) fed an empty past; the fused ops are written out in
    plain ops, so the logits and presents are ONNX Runtime's to float32 rounding."""
    model = onnx.load(LLM / "llama_genai.onnx")
    empty = {f"past_key_values.{i}.{kind}": np.zeros((2, 2, 0, 16), np.float32) for i in range(2)
             for kind in ("key", "value")}
    names = [value.name for value in model.graph.output]
    for composite in COMPOSITES:
        explained = onnxlrp.build(model, composite)
        for padding, wanted in zip(PADDINGS[:2], REFERENCES[f"llama_genai_{composite}"]):
            outputs = run(explained, {**feeds(padding), **empty}, names + ["relevance_embedding"])
            assert relative_error(outputs[-1], wanted) < 1e-4
            tokens = feeds(padding)["attention_mask"] == 1
            original = run(model, {**feeds(padding), **empty})
            assert relative_error(outputs[0][tokens], original[0][tokens]) < 1e-5
            for ours, theirs in zip(outputs[1:-1], original[1:]):
                assert relative_error(ours[:, :, :5], theirs[:, :, :5]) < 1e-5  # the keys of both prompts' tokens


def test_opset23_ops():
    """Llama with torch's default attention exported by dynamo at opset 23: ONNX's Attention, RMSNormalization and
    RotaryEmbedding ops, written out in plain ops, match LXT; the built model's logits are those of the TorchScript
    export at the tokens (ONNX Runtime 1.31 refuses the export's own RotaryEmbedding nodes)."""
    model = onnx.load(LLM / "llama_opset23.onnx")
    assert {"Attention", "RMSNormalization", "RotaryEmbedding"} <= {node.op_type for node in model.graph.node}
    for composite in COMPOSITES:
        explained = onnxlrp.build(model, composite)
        for padding, wanted in zip(PADDINGS, REFERENCES[f"llama_{composite}"]):
            logits, relevance = run(explained, feeds(padding), ["logits", "relevance_embedding"])
            assert relative_error(relevance, wanted) < 1e-4
            tokens = feeds(padding)["attention_mask"] == 1
            assert relative_error(logits[tokens], run(source("llama"), feeds(padding))[0][tokens]) < 1e-6

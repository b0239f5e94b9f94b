"""Language models from the real exporters (issue 19 item 5, fixtures/make_llm_exports.py): make_llms.py's tiny
Llama, Qwen2, Gemma 3 and GPT-2 exported by optimum-onnx (with and without a KV cache), and a Llama and a Qwen2 by
ONNX Runtime GenAI's model builder (fp32 and int4), explained against LXT 2.1 in float64."""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

import onnxlrp
from conftest import FIXTURES, relative_error, run

LLM = FIXTURES / "llm"
REFERENCES = dict(np.load(LLM / "references.npz"))  # the torch models that optimum exported
EXPORTS = dict(np.load(LLM / "exports.npz"))  # the GenAI builder's models (heads of 16)
COMPOSITES = ("attnlrp", "cp_lrp")
PADDINGS = ("none", "right", "left")


@lru_cache(maxsize=None)
def source(name: str) -> onnx.ModelProto:
    return onnx.load(LLM / f"{name}.onnx")


def feeds(model: onnx.ModelProto, padding: str) -> dict[str, np.ndarray]:
    """The prompts of make_llms.py, position ids 0..T-1 where the model asks for them (the references' positions,
    left padded too), and a past of length 0 (heads and size from the input's shape; the builder's size is 16)."""
    data = {name: REFERENCES[f"{padding}_{name}"] for name in ("input_ids", "attention_mask")}
    batch, length = data["input_ids"].shape
    for value in model.graph.input:
        dims = [d.dim_value if d.HasField("dim_value") else None for d in value.type.tensor_type.shape.dim]
        if value.name.startswith("past"):
            data[value.name] = np.zeros((batch, dims[1], 0, dims[3] or 16), np.float32)
        elif value.name == "position_ids":
            data[value.name] = np.broadcast_to(np.arange(length), (batch, length)).copy()
    return data


def unoptimized(model: onnx.ModelProto, data: dict[str, np.ndarray]) -> np.ndarray:
    """The logits as the graph computes them, without ONNX Runtime's fusions (see tests/test_llm.py)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options).run(["logits"], data)[0]


@pytest.mark.parametrize("export", ("optimum", "optimum_past"))
@pytest.mark.parametrize("family", ("llama", "qwen2", "gemma3", "gpt2"))
def test_optimum_parity_with_lxt(family, export):
    """optimum-onnx's export (text-generation, and text-generation-with-past fed a past of length 0), under both
    presets, for prompts unpadded, right padded and left padded: the relevance per token and embedding feature is
    LXT's on the torch model, padded tokens get exactly 0, and the logits are the export's bit for bit, with a past
    of 3 positions too."""
    original = source(f"{family}_{export}")
    for composite in COMPOSITES:
        model = onnxlrp.build(original, composite)
        for padding, wanted in zip(PADDINGS, REFERENCES[f"{family}_{composite}"]):
            data = feeds(original, padding)
            token, embedding = run(model, data, ["relevance", "relevance_embedding"])
            mask = data["attention_mask"]
            assert relative_error(embedding, wanted) < 1e-4, (composite, padding)
            np.testing.assert_allclose(token, embedding.sum(-1), rtol=1e-5, atol=1e-6)
            assert np.all(token[mask == 0] == 0) and np.all(token[mask == 1] != 0)
            np.testing.assert_array_equal(unoptimized(model, data), unoptimized(original, data))
        if export == "optimum_past":
            with_past(original, model)


def with_past(original: onnx.ModelProto, model: onnx.ModelProto) -> None:
    """Fed a past of 3 positions (the mask covering it, positions counted from its end), the built model's logits
    and presents are the export's bit for bit (without ONNX Runtime's fusions)."""
    data = feeds(original, "right")
    past = {name: np.random.default_rng(2).standard_normal(value.shape[:2] + (3, value.shape[3])).astype(np.float32)
            for name, value in data.items() if name.startswith("past")}
    assert past, "the export takes no past"
    data = {**data, **past, "attention_mask": np.concatenate([np.ones((2, 3), np.int64), data["attention_mask"]], 1)}
    if "position_ids" in data:
        data["position_ids"] = data["position_ids"] + 3
    names = [value.name for value in original.graph.output]
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    ours, theirs = (ort.InferenceSession(m.SerializeToString(), options).run(names, data) for m in (model, original))
    for name, a, b in zip(names, ours, theirs):
        np.testing.assert_array_equal(a, b, err_msg=name)


@pytest.mark.parametrize("family", ("llama", "qwen2"))
def test_genai_builder_parity_with_lxt(family):
    """The GenAI builder's fp32 export (packed QKV projection, GroupQueryAttention with do_rotary, its
    SimplifiedLayerNormalization ops), fed a past of length 0, under both presets, unpadded and right padded (its
    attention reads the mask as lengths: it takes no left padding): LXT's relevance; the fused ops are written
    out in plain ops, so the logits are ONNX Runtime's to float32 rounding at the prompts' tokens."""
    original = source(f"{family}_genai_fp32")
    for composite in COMPOSITES:
        model = onnxlrp.build(original, composite)
        for padding, wanted in zip(PADDINGS[:2], EXPORTS[f"{family}_builder_{composite}"]):
            data = feeds(original, padding)
            logits, embedding = run(model, data, ["logits", "relevance_embedding"])
            tokens = data["attention_mask"] == 1
            assert relative_error(embedding, wanted) < 1e-4, (composite, padding)
            assert np.all(embedding[~tokens] == 0)
            assert relative_error(logits[tokens], run(original, data)[0][tokens]) < 1e-5


def float_twin(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with each MatMulNBits replaced by a MatMul with the weight ONNX Runtime dequantizes (its node run
    on the identity, in float: accuracy_level 0), independently of onnxlrp's twin."""
    twin = onnx.ModelProto()
    twin.CopyFrom(model)
    constants = {tensor.name: tensor for tensor in twin.graph.initializer}
    nodes = []
    for node in twin.graph.node:
        if node.op_type != "MatMulNBits":
            nodes.append(node)
            continue
        attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute if a.name != "accuracy_level"}
        weights = [constants[name] for name in node.input[1:4] if name]
        alone = helper.make_model(helper.make_graph(
            [helper.make_node("MatMulNBits", ["eye", *node.input[1:4]], ["w"], domain="com.microsoft", **attributes)],
            "dequantize", [helper.make_tensor_value_info("eye", onnx.TensorProto.FLOAT, None)],
            [helper.make_tensor_value_info("w", onnx.TensorProto.FLOAT, None)], weights),
            opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)], ir_version=10)
        weight = run(alone, {"eye": np.eye(attributes["K"], dtype=np.float32)})[0]
        twin.graph.initializer.append(numpy_helper.from_array(weight, f"{node.name}/dequantized"))
        bias = node.input[5] if len(node.input) > 5 else ""
        product = f"{node.output[0]}/product" if bias else node.output[0]
        nodes.append(helper.make_node("MatMul", [node.input[0], f"{node.name}/dequantized"], [product]))
        if bias:
            nodes.append(helper.make_node("Add", [product, bias], [node.output[0]]))
    twin.graph.ClearField("node")
    twin.graph.node.extend(nodes)
    return twin


@pytest.mark.parametrize("family", ("llama", "qwen2"))
def test_genai_int4_on_its_float_twin(family):
    """The GenAI builder's int4 export (MatMulNBits, block size 32, the LM head too): the relevance is that of its
    float twin built alike, under both presets, unpadded and right padded; the logits are the export's bit for
    bit."""
    original = source(f"{family}_genai_int4")
    assert "MatMulNBits" in {node.op_type for node in original.graph.node}
    twin = float_twin(original)
    for composite in COMPOSITES:
        model, expected = onnxlrp.build(original, composite), onnxlrp.build(twin, composite)
        for padding in PADDINGS[:2]:
            data = feeds(original, padding)
            relevance = run(model, data, ["relevance_embedding"])[0]
            assert relative_error(relevance, run(expected, data, ["relevance_embedding"])[0]) < 1e-5
            assert np.all(relevance[data["attention_mask"] == 0] == 0)
            np.testing.assert_array_equal(unoptimized(model, data), unoptimized(original, data))

"""Declared patterns (canonical/patterns.py): written-out constructs reach the walk as one canonical node each, and
the built model computes its outputs with the exporter's own nodes, bit for bit."""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxlrp
from conftest import relative_error
from onnxlrp.canonical.passes import canonicalize
from onnxlrp.canonical.patterns import CANONICAL, collapse


def written_out(rng, as_ops: bool = False) -> onnx.ModelProto:
    """[N, 4, 6] tokens: a MatMul and its bias Add, GELU as 0.5 * x * (1 + erf(x / sqrt 2)), SiLU as x * sigmoid(x),
    a softmax over the tokens written out with its maximum subtracted, a mean over tokens and a dense head.
    `as_ops`: the same model with ONNX's Gelu and Softmax ops (opset 20)."""
    init = {"w": rng.normal(size=(6, 6)).astype(np.float32), "b": rng.normal(size=(1, 1, 6)).astype(np.float32),
            "root2": np.array(np.sqrt(2), np.float32), "one": np.array(1, np.float32),
            "half": np.array(0.5, np.float32), "axis": np.array([1], np.int64),
            "head": rng.normal(size=(6, 3)).astype(np.float32), "hb": rng.normal(size=3).astype(np.float32)}
    nodes = [helper.make_node("MatMul", ["x", "w"], ["mm"], name="proj"),
             helper.make_node("Add", ["mm", "b"], ["h"], name="bias"),
             helper.make_node("Div", ["h", "root2"], ["scaled"]), helper.make_node("Erf", ["scaled"], ["erf"]),
             helper.make_node("Add", ["erf", "one"], ["shift"]), helper.make_node("Mul", ["h", "shift"], ["xs"]),
             helper.make_node("Mul", ["xs", "half"], ["gelu"], name="gelu"),
             helper.make_node("Sigmoid", ["gelu"], ["sig"]),
             helper.make_node("Mul", ["gelu", "sig"], ["silu"], name="silu"),
             helper.make_node("ReduceMax", ["silu", "axis"], ["peak"], keepdims=1),
             helper.make_node("Sub", ["silu", "peak"], ["centered"]), helper.make_node("Exp", ["centered"], ["e"]),
             helper.make_node("ReduceSum", ["e", "axis"], ["total"], keepdims=1),
             helper.make_node("Div", ["e", "total"], ["weights"], name="softmax"),
             helper.make_node("Mul", ["weights", "silu"], ["pooled_in"], name="attend"),
             helper.make_node("ReduceSum", ["pooled_in", "axis"], ["pooled"], keepdims=0),
             helper.make_node("Gemm", ["pooled", "head", "hb"], ["logits"], name="head")]
    if as_ops:
        gelu = next(i for i, n in enumerate(nodes) if n.name == "gelu")
        nodes[2:gelu + 1] = [helper.make_node("Gelu", ["h"], ["gelu"], name="gelu")]
        first = next(i for i, n in enumerate(nodes) if n.op_type == "ReduceMax")
        last = next(i for i, n in enumerate(nodes) if n.name == "softmax")
        nodes[first:last + 1] = [helper.make_node("Softmax", ["silu"], ["weights"], name="softmax", axis=1)]
    graph = helper.make_graph(nodes, "written_out",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 6])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])],
                              [numpy_helper.from_array(v, k) for k, v in init.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    model.ir_version = 8
    return model


def unoptimized(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def test_each_construct_becomes_one_canonical_node(rng):
    graph = canonicalize(written_out(rng))
    collapsed = collapse(graph)
    canonical = sorted((n.name, n.op) for n in graph.nodes if n.domain == CANONICAL)
    # GELU's x * (1 + erf(x / sqrt 2)) is the activation; its 0.5 * stays a Mul by a constant.
    assert canonical == [("proj", "MatMul"), ("silu", "Activation"), ("softmax", "Softmax"), ("xs", "Activation")]
    assert next(n for n in graph.nodes if n.name == "softmax").attrs["axes"] == [1]
    before = sorted(n.op for n in gs.import_onnx(written_out(rng)).nodes)
    collapsed.restore()
    assert sorted(n.op for n in graph.nodes) == before and all(n.domain != CANONICAL for n in graph.nodes)


@pytest.mark.parametrize("composite", ["epsilon", "attnlrp", "cp_lrp"])
def test_the_built_model_keeps_the_exported_forward_bit_for_bit(rng, composite):
    source = written_out(rng)
    built = onnxlrp.build(source, composite)
    assert not any(n.domain == CANONICAL for n in built.graph.node)
    x = rng.normal(size=(3, 4, 6)).astype(np.float32)
    expected = unoptimized(source).run(["logits"], {"x": x})[0]
    logits, relevance = unoptimized(built).run(["logits", "relevance"], {"x": x})
    assert np.array_equal(logits, expected)
    assert relevance.shape == x.shape and np.all(np.isfinite(relevance)) and np.abs(relevance).sum() > 0


@pytest.mark.parametrize("composite", ["epsilon", "attnlrp", "cp_lrp"])
def test_written_out_constructs_explain_like_their_ops(composite):
    """Written-out GELU and softmax give the relevance of the same model with ONNX's Gelu and Softmax ops."""
    x = np.random.default_rng(1).normal(size=(2, 4, 6)).astype(np.float32)
    found = [unoptimized(onnxlrp.build(written_out(np.random.default_rng(0), as_ops), composite)).run(
        ["relevance"], {"x": x})[0] for as_ops in (False, True)]
    assert relative_error(found[0], found[1]) < 1e-5
    assert np.abs(found[0]).sum() > 0

"""What is known of tensors' values at build time: infinities from masks reach a softmax and no further, and
products with a zero relevance are guarded only where an operand may be infinite."""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
import pytest
from onnx import helper

import onnxlrp
from conftest import make_model, run
from onnxlrp.lrp.facts import unbounded_tensors


def masked_attention(mask_value: float):
    """Scores x x^T plus a constant mask (its last key masked), then a softmax over the keys, times x."""
    mask = np.zeros((1, 4, 4), np.float32)
    mask[..., -1] = mask_value
    nodes = [helper.make_node("Transpose", ["input"], ["xt"], perm=[0, 2, 1]),
             helper.make_node("MatMul", ["input", "xt"], ["scores"]),
             helper.make_node("Add", ["scores", "mask"], ["masked"]),
             helper.make_node("Add", ["masked", "mask"], ["twice"]),
             helper.make_node("Softmax", ["twice"], ["weights"], axis=-1),
             helper.make_node("MatMul", ["weights", "input"], ["mixed"]),
             helper.make_node("Add", ["mixed", "input"], ["residual"]),
             helper.make_node("ReduceMean", ["residual"], ["logits"], axes=[1], keepdims=0)]
    return make_model(nodes, [2, 4, 3], [2, 3], {"mask": mask}, opset=17)


@pytest.mark.parametrize("mask_value", [-np.inf, np.finfo(np.float32).min])
def test_masks_are_unbounded_up_to_the_softmax(mask_value):
    graph = gs.import_onnx(masked_attention(mask_value))
    assert unbounded_tensors(graph, ["input"]) == {"masked", "twice"}
    assert unbounded_tensors(graph, []) >= {"input", "masked", "twice", "logits"}


def test_finite_graphs_have_no_unbounded_tensors():
    graph = gs.import_onnx(masked_attention(-1e4))
    assert unbounded_tensors(graph, ["input"]) == set()


@pytest.mark.parametrize("mask_value", [-np.inf, np.finfo(np.float32).min])
def test_masked_keys_get_zero_relevance(rng, mask_value):
    """The mask's -inf (or the float minimum, doubled to -inf) meets a zero relevance at the masked key: the
    relevance is that of a finite mask that the softmax rounds to the same weights."""
    x = rng.normal(size=(2, 4, 3)).astype(np.float32)
    feeds = {"input": x, "target": np.array([0, 2])}
    masked = run(onnxlrp.build(masked_attention(mask_value), "attnlrp"), feeds, ["relevance"])[0]
    finite = run(onnxlrp.build(masked_attention(-1e4), "attnlrp"), feeds, ["relevance"])[0]
    assert np.abs(finite).sum() > 0
    np.testing.assert_allclose(masked, finite, rtol=1e-6, atol=1e-7)

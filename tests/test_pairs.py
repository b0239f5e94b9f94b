"""Pairwise matching (fixtures/make_pairs.py): a composite that gives the product of two ReLU'd projections the rule
`pairs` adds the output relevance_pairs [N, I, J], the second-order rule of Montavon et al. 2019 (section 10.4),
against a float64 numpy reference; without it the built model is today's."""
from __future__ import annotations

import functools

import numpy as np
import onnx
import pytest
from onnx import helper

import onnxlrp
from conftest import FIXTURES, session

PAIRS = FIXTURES / "pairs"
ARRAYS = np.load(PAIRS / "pairs.npz")
COMPOSITE = str(PAIRS / "pairs.toml")  # extends epsilon: epsilon = 1e-6 everywhere
EPSILON = 1e-6
FEEDS = {"x": ARRAYS["x"], "y": ARRAYS["y"]}


def stabilized(z: np.ndarray) -> np.ndarray:
    return z + EPSILON * np.where(z >= 0, 1.0, -1.0)


def second_order(target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """In float64: R_k at the product (the epsilon rule on the scores' Gemm, seeded with the target's logit), and
    R_ij = sum_k x_i y_j w_ik v_jk / stab(sum_ij x_i y_j w_ik v_jk) R_k [N, I, J]."""
    x, y, w, v, u, b = (ARRAYS[k].astype(np.float64) for k in ("x", "y", "W", "V", "U", "b"))
    p, q = x @ w, y @ v
    a = np.maximum(p, 0) * np.maximum(q, 0)
    logits = a @ u + b
    rows = np.arange(len(x))
    chosen = logits[rows, target]
    product = a * u[:, target].T * (chosen / stabilized(chosen))[:, None]
    pairs = np.einsum("ni,nj,ik,jk,nk->nij", x, y, w, v, product / stabilized(p * q))
    return product, pairs


@functools.cache
def built(composite: str = COMPOSITE, layer_relevance: bool = False) -> onnx.ModelProto:
    return onnxlrp.build(onnx.load(PAIRS / "matching.onnx"), onnxlrp.load_composite(composite),
                         layer_relevance=layer_relevance)


def run(model: onnx.ModelProto, outputs: list[str], target: int | None = None) -> list[np.ndarray]:
    extra = {} if target is None else {"target": np.full(len(ARRAYS["x"]), target, np.int64)}
    return session(model).run(outputs, {**FEEDS, **extra})


@pytest.mark.parametrize("target", [None, 0, 1, 2])
def test_relevance_pairs_is_the_second_order_rule(target):
    """To 1e-6 of the largest pair relevance (float32 against float64), for the predicted class and every class."""
    scores, result = run(built(), ["scores", "relevance_pairs"], target)
    classes = scores.argmax(1) if target is None else np.full(len(scores), target)
    expected = second_order(classes)[1]
    assert result.shape == (8, 6, 5) and np.count_nonzero(expected) > 100
    assert np.abs(result - expected).max() <= 1e-6 * np.abs(expected).max()


def test_relevance_pairs_conserves_the_relevance_at_the_product():
    """sum_ij R_ij = sum_k R_k, the relevance the scores' Gemm passes to the product (its --layer-relevance output),
    where that relevance is not 0; the numpy R_k agrees."""
    model = built(layer_relevance=True)
    scores, at_product, pairs = run(model, ["scores", "relevance/scores", "relevance_pairs"])
    np.testing.assert_allclose(at_product, second_order(scores.argmax(1))[0], rtol=1e-5, atol=1e-6)
    totals, expected = pairs.astype(np.float64).sum((1, 2)), at_product.astype(np.float64).sum(1)
    assert np.count_nonzero(expected) >= 6
    assert np.abs(totals - expected).max() <= 1e-5 * np.abs(expected).max()


def test_relevance_is_the_first_inputs_and_the_pairs_marginal():
    """`relevance` explains the first float input x; y is a constant to the walk, so the product passes all its
    relevance to x's factor. Summed over y's features, the pairs give the same relevance of x (under epsilon)."""
    relevance, pairs = run(built(), ["relevance", "relevance_pairs"])
    assert relevance.shape == ARRAYS["x"].shape
    assert np.abs(pairs.sum(2) - relevance).max() <= 1e-5 * np.abs(relevance).max()


@pytest.mark.parametrize("composite", ["epsilon", "epsilon_plus_flat"])
def test_presets_keep_todays_outputs(composite):
    """Without the rule `pairs` no relevance_pairs; with it, `relevance` is bit for bit what epsilon gives."""
    assert [o.name for o in built(composite).graph.output] == ["scores", "relevance"]
    assert [o.name for o in built().graph.output] == ["scores", "relevance", "relevance_pairs"]
    assert np.array_equal(run(built(), ["relevance"])[0], run(built("epsilon"), ["relevance"])[0])


def matching(**changes: str) -> onnx.ModelProto:
    """The matching model with some nodes' op types changed (name -> op type)."""
    model = onnx.load(PAIRS / "matching.onnx")
    for node in model.graph.node:
        node.op_type = changes.get(node.name, node.op_type)
    return model


@pytest.mark.parametrize("model, composite, message", [
    (matching(relu_y="Sigmoid"), COMPOSITE,
     "Mul ('match'): the pairs rule needs a Mul of two Relu(x @ W) of rank-2 tensors by constant matrices"),
    (matching(match="Add"), '[[layers]]\nnames = ["match"]\nrule = "pairs"\n',
     "Add ('match'): the pairs rule needs a Mul"),
])
def test_a_product_of_another_form_is_refused_in_one_line(model, composite, message, tmp_path):
    if not composite.endswith(".toml"):
        (tmp_path / "add.toml").write_text(composite)
        composite = str(tmp_path / "add.toml")
    with pytest.raises(onnxlrp.LrpError) as error:
        onnxlrp.build(model, onnxlrp.load_composite(composite))
    assert "\n" not in str(error.value) and message in str(error.value)


def test_projections_with_a_bias_are_refused():
    """The rule's denominator is the pairs' own sum (x W_k)(y V_k): a bias would take a share it does not give."""
    model = onnx.load(PAIRS / "matching.onnx")
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.ones(8, np.float32), "bias"))
    project = next(n for n in model.graph.node if n.name == "project_y")
    add = helper.make_node("Add", ["yV_unbiased", "bias"], ["yV"], name="bias_y")
    project.output[0] = "yV_unbiased"
    model.graph.node.insert(list(model.graph.node).index(project) + 1, add)
    with pytest.raises(onnxlrp.LrpError, match="without bias"):
        onnxlrp.build(model, onnxlrp.load_composite(COMPOSITE))


def test_the_rule_on_two_products_is_refused_in_one_line(tmp_path):
    """relevance_pairs is one output: a composite that gives `pairs` to two products that relevance reaches (here
    two matches of the same projections, summed) is refused."""
    model = onnx.load(PAIRS / "matching.onnx")
    match = next(n for n in model.graph.node if n.name == "match")
    match.output[0] = "first"
    at = list(model.graph.node).index(match) + 1
    model.graph.node.insert(at, helper.make_node("Mul", ["a", "b_"], ["second"], name="again"))
    model.graph.node.insert(at + 1, helper.make_node("Add", ["first", "second"], ["match"], name="both"))
    path = tmp_path / "two.toml"
    path.write_text('extends = "epsilon"\n[[layers]]\nop_types = ["Mul"]\nrule = "pairs"\n')
    with pytest.raises(onnxlrp.LrpError) as error:
        onnxlrp.build(model, onnxlrp.load_composite(str(path)))
    message = str(error.value)
    assert "\n" not in message and "rule 'pairs' is given to 2 products" in message and "'again'" in message

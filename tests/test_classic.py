"""Classic scikit-learn models through skl2onnx (fixtures/make_classic.py, and the trained examples of
fixtures/make_examples.py): the model's own outputs are kept bit for bit, and the relevance of class c is each
feature's exact contribution w_ci (x_i - reference_i) to the score of c, computed in numpy from the coefficients that
scikit-learn holds (docs/rules.md, Classic machine-learning models); k-means and one-class SVMs against NEON's and
One-class DTD's formulas."""
from __future__ import annotations

import functools

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import onnxlrp
from conftest import FIXTURES, session

CLASSIC, EXAMPLES = FIXTURES / "classic", FIXTURES / "examples"
# The references of both fixture folders (their keys differ).
REFERENCES = {**np.load(CLASSIC / "classic.npz"), **np.load(EXAMPLES / "examples.npz")}
# Model -> the inputs of its references.
MODELS = {"logistic_regression": "iris", "linear_svc": "iris", "calibrated_svc": "iris", "svc": "iris",
          "svc_binary": "iris", "svr": "iris3", "linear_regression": "iris3", "text_logistic_regression": "text",
          "wine_pipeline": "wine"}
# k-means model -> its inputs; one-class SVM -> the start of its references' keys.
KMEANS = {"kmeans": "iris", "digits_kmeans": "digits"}
ONE_CLASS = {"one_class_svm": "one_class", "digits_one_class": "digits_one_class"}
TRAINED = ("wine_pipeline", "digits_kmeans", "digits_one_class")  # fixtures/examples
CLASSIFIERS = [name for name in MODELS if name not in ("svr", "linear_regression")]
# Relevance against numpy, relative to the largest contribution (measured: 4e-7 at most, svr).
TOLERANCE = 1e-6


@functools.cache
def source(name: str) -> onnx.ModelProto:
    return onnx.load((EXAMPLES if name in TRAINED else CLASSIC) / f"{name}.onnx")


@functools.cache
def built(name: str, composite: str = "epsilon_plus_flat", stiffness: float | None = None) -> onnx.ModelProto:
    return onnxlrp.build(source(name), composite, stiffness=stiffness)


def feeds(name: str, **extra: np.ndarray) -> dict[str, np.ndarray]:
    return {source(name).graph.input[0].name: REFERENCES[MODELS[name]], **extra}


def shifted(name: str) -> np.ndarray:
    """(x - reference) * scale in float64: the input of the model's linear layer (after its Scaler)."""
    x = REFERENCES[MODELS[name]].astype(np.float64)
    return (x - REFERENCES[f"{name}/reference"]) * REFERENCES[f"{name}/scale"]


def contributions(name: str) -> np.ndarray:
    """w_ci (x_i - reference_i) for every sample, class and feature [N, C, F], from the committed coefficients."""
    return shifted(name)[:, None, :] * REFERENCES[f"{name}/weights"][None]


def scores(name: str) -> np.ndarray:
    return shifted(name) @ REFERENCES[f"{name}/weights"].T + REFERENCES[f"{name}/biases"]


def relevance(name: str, target: int | None = None, composite: str = "epsilon_plus_flat") -> np.ndarray:
    extra = {} if target is None else {"target": np.full(len(REFERENCES[MODELS[name]]), target, np.int64)}
    return session(built(name, composite)).run(["relevance"], feeds(name, **extra))[0]


def assert_close(actual: np.ndarray, expected: np.ndarray) -> None:
    assert np.abs(actual - expected).max() <= TOLERANCE * np.abs(expected).max()


@pytest.mark.parametrize("name", MODELS)
def test_the_models_own_outputs_are_kept_bit_for_bit(name):
    """Labels, probabilities and ZipMap's maps: the ai.onnx.ml nodes keep computing them."""
    expected = session(source(name)).run(None, feeds(name))
    outputs = session(built(name)).run(None, feeds(name))
    assert [o.name for o in built(name).graph.output] == [o.name for o in source(name).graph.output] + ["relevance"]
    for actual, wanted in zip(outputs, expected):
        if isinstance(wanted, list):  # ZipMap: one {class: probability} per sample
            assert actual == wanted
        else:
            assert actual.dtype == wanted.dtype and np.array_equal(actual, wanted)


@pytest.mark.parametrize("name", MODELS)
def test_relevance_is_each_features_contribution(name):
    """For every class: w_ci (x_i - reference_i), the reference the Scaler's offset (0 without one); the fixture
    script's own float64 references agree."""
    expected = contributions(name)
    np.testing.assert_allclose(expected, REFERENCES[f"{name}/relevance"], rtol=1e-12)
    for c in range(expected.shape[1]):
        assert_close(relevance(name, c), expected[:, c])


@pytest.mark.parametrize("name", MODELS)
def test_relevance_sums_to_the_score_less_its_intercept(name):
    expected = scores(name) - REFERENCES[f"{name}/biases"]
    for c in range(expected.shape[1]):
        total = relevance(name, c).astype(np.float64).sum(1)
        assert np.abs(total - expected[:, c]).max() <= TOLERANCE * np.abs(expected).max()


@pytest.mark.parametrize("name, output, tolerance", [("linear_svc", "probabilities", 1e-6), ("svr", "variable", 1e-3),
                                                     ("linear_regression", "variable", 1e-6)])
def test_the_numpy_scores_are_the_models(name, output, tolerance):
    """Where a model outputs its scores, they are the numpy scores of the committed coefficients, relative to the
    largest. The SVR's own float32 sum over its 79 support vectors is 1.6e-4 away (measured); the linear layer onnxlrp
    explains holds their sum in one weight, computed in float64 (4e-7 from numpy)."""
    computed = session(source(name)).run([output], feeds(name))[0]
    assert np.abs(computed - scores(name)).max() <= tolerance * np.abs(scores(name)).max()


@pytest.mark.parametrize("name", ["logistic_regression", "text_logistic_regression"])
def test_the_probabilities_are_the_softmax_of_the_numpy_scores(name):
    maps = session(source(name)).run(["output_probability"], feeds(name))[0]
    probabilities = np.array([[m[c] for c in sorted(m)] for m in maps])
    exponentials = np.exp(scores(name) - scores(name).max(1, keepdims=True))
    np.testing.assert_allclose(probabilities, exponentials / exponentials.sum(1, keepdims=True), atol=1e-6)


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_the_default_target_is_the_models_label(name):
    """A one-vs-one SVM votes and a calibrated model calibrates: the label is not always the highest score (on the
    ten iris samples the SVM's label is not its highest score for some), and the label is what is explained."""
    label = session(built(name)).run(None, feeds(name))[0]
    expected = contributions(name)[np.arange(len(label)), label]
    assert_close(relevance(name), expected)


def test_the_label_is_not_always_the_highest_score():
    label = session(source("svc")).run(None, feeds("svc"))[0]
    assert np.any(label != scores("svc").argmax(1))


def test_text_relevance_is_zero_for_absent_words():
    """TF-IDF features are sparse: a word that a sentence lacks gets no relevance."""
    x = REFERENCES["text"]
    result = relevance("text_logistic_regression")
    assert np.all(result[x == 0] == 0) and np.count_nonzero(result) == np.count_nonzero(x)


def test_a_composite_may_give_the_linear_model_another_rule(tmp_path):
    """The canonical op type LinearModel takes any linear rule: epsilon scales each contribution by z / (z + eps)."""
    path = tmp_path / "classic_epsilon.toml"
    path.write_text('[[layers]]\nop_types = ["LinearModel"]\nrule = "epsilon"\nepsilon = 1.0\n')
    model = onnxlrp.build(source("linear_svc"), str(path))
    label = session(model).run(None, feeds("linear_svc"))[0]
    z = scores("linear_svc")[np.arange(len(label)), label]
    share = z / (z + np.where(z >= 0, 1.0, -1.0))
    expected = contributions("linear_svc")[np.arange(len(label)), label] * share[:, None]
    assert_close(session(model).run(["relevance"], feeds("linear_svc"))[0], expected)


def test_a_constant_that_absorbs_makes_the_reference_zero():
    """Under attnlrp a constant addend keeps its share: the Scaler's Sub takes the offset's, the reference is 0."""
    x = REFERENCES["iris"].astype(np.float64)
    expected = x * REFERENCES["logistic_regression/scale"] * REFERENCES["logistic_regression/weights"][1]
    assert_close(relevance("logistic_regression", 1, "attnlrp"), expected)


def test_a_binary_linear_classifier_with_one_row_scores_class_zero_by_its_negation():
    weight, bias = np.array([0.5, -2.0, 1.5], np.float32), 0.25
    node = helper.make_node("LinearClassifier", ["X"], ["label", "scores"], name="classifier", domain="ai.onnx.ml",
                            coefficients=weight.tolist(), intercepts=[bias], classlabels_ints=[0, 1],
                            post_transform="LOGISTIC")
    graph = helper.make_graph([node], "binary", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 3])],
                              [helper.make_tensor_value_info("label", TensorProto.INT64, ["N"]),
                               helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", 2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 3)],
                              ir_version=8)
    x = np.random.default_rng(0).normal(size=(6, 3)).astype(np.float32)
    label, _, result = session(onnxlrp.build(model)).run(None, {"X": x})
    assert 0 < label.sum() < len(label)
    np.testing.assert_allclose(result, x * weight * np.where(label == 1, 1.0, -1.0)[:, None], rtol=1e-6)


def test_a_non_linear_svm_kernel_is_refused_in_one_line():
    with pytest.raises(onnxlrp.LrpError) as error:
        onnxlrp.build(onnx.load(CLASSIC / "svc_rbf.onnx"))
    message = str(error.value)
    assert "\n" not in message and "RBF kernel is not linear" in message and "SVMClassifier" in message


def test_log_odds_explain_the_linear_model_as_the_last_dense_layer():
    """--explain logodds (docs/lrp.md §5): the differences w_c - w_c' shared by softmin_c'(z_c - z_c')."""
    model = onnxlrp.build(source("logistic_regression"), explain="logodds")
    label, _, result = session(model).run(None, feeds("logistic_regression"))
    weights, z, rows = REFERENCES["logistic_regression/weights"], scores("logistic_regression"), np.arange(len(label))
    differences = z[rows, label][:, None] - z
    shares = np.where(np.eye(3, dtype=bool)[label], 0.0, np.exp(-differences))
    shares /= shares.sum(1, keepdims=True)
    expected = shifted("logistic_regression") * np.einsum("nk,nkf->nf", shares, weights[label][:, None] - weights[None])
    assert_close(result, expected)


def test_inspect_shows_the_twins():
    """The model's scorer and Scaler are `twin`: the walk explains the LinearModel and the Sub/Mul beside them."""
    from onnxlrp.app.inspect import rows
    table = {row.node: row for row in rows(source("logistic_regression"), onnxlrp.load_composite("epsilon_plus_flat"))}
    assert table["Scaler"].rule == table["LinearClassifier"].rule == "twin"
    assert table["LinearClassifier/scores"].op_type == "LinearModel" and table["LinearClassifier/scores"].rule == "zero"
    assert table["LinearClassifier/scores"].folded == ("LinearClassifier (LinearClassifier)",)
    assert table["Scaler/scale"].folded == ("Scaler (Scaler)",)


def neon_kmeans(name: str, x: np.ndarray, cluster: int, stiffness: float) -> tuple[np.ndarray, float]:
    """NEON for k-means in float64, as Kauffmann et al. write it (arXiv 1906.07633): the logit f_c = min_k h_k,
    h_k = w_k x + b_k = |x - mu_k|^2 - |x - mu_c|^2 over the competitors k; R_k = f_c softmin_k(beta h); the midpoint
    rule R_i = sum_k w_ki (x_i - m_ki) / h_k R_k, m_k = (mu_c + mu_k) / 2. Returns R and f_c."""
    centroids = REFERENCES[f"{name}/centroids"]
    others = [k for k in range(len(centroids)) if k != cluster]
    weights = 2 * (centroids[cluster] - centroids[others])
    biases = (centroids[others] ** 2).sum(1) - (centroids[cluster] ** 2).sum()
    h = weights @ x.astype(np.float64) + biases
    shares = np.exp(-stiffness * (h - h.min()))
    pooled = h.min() * shares / shares.sum()
    contributions = weights * (x - (centroids[cluster] + centroids[others]) / 2)
    return (contributions / contributions.sum(1, keepdims=True) * pooled[:, None]).sum(0), float(h.min())


@pytest.mark.parametrize("name", KMEANS)
def test_kmeans_keeps_its_outputs_bit_for_bit(name):
    x = REFERENCES[KMEANS[name]]
    expected = session(source(name)).run(None, {"X": x})
    actual = session(built(name)).run(None, {"X": x})
    assert all(np.array_equal(a, e) for a, e in zip(actual, expected))


@pytest.mark.parametrize("name", KMEANS)
@pytest.mark.parametrize("stiffness", [1.0, 3.0])
def test_kmeans_relevance_is_neons(name, stiffness):
    """The assigned cluster (the model's label) and others, to 1e-5 of the largest relevance (measured: 1.7e-6 over
    the 150 iris flowers, 9.0e-7 over 20 held-out digits, float32 against float64)."""
    x = REFERENCES[KMEANS[name]]
    model = session(built(name, stiffness=stiffness))
    label = model.run(None, {"X": x})[0]
    for target in [None, 0, 1, 2]:
        feeds = {"X": x} if target is None else {"X": x, "target": np.full(len(x), target, np.int64)}
        clusters = label if target is None else np.full(len(x), target)
        expected = np.array([neon_kmeans(name, row, c, stiffness)[0] for row, c in zip(x, clusters)])
        result = model.run(["relevance"], feeds)[0]
        assert np.abs(result - expected).max() <= 1e-5 * np.abs(expected).max()


@pytest.mark.parametrize("name", KMEANS)
def test_kmeans_logit_is_the_models_margin(name):
    """The paper's check: the neuralized logit, which the relevance sums to, is the model's own margin
    min_k d_k^2 - d_c^2 (from its distances output), positive for the assigned cluster; to 1e-5 of the largest."""
    x = REFERENCES[KMEANS[name]]
    label, distances, result = session(built(name)).run(None, {"X": x})
    squared = distances.astype(np.float64) ** 2
    margin = np.array([np.delete(d, c).min() - d[c] for d, c in zip(squared, label)])
    logit = np.array([neon_kmeans(name, row, c, 1.0)[1] for row, c in zip(x, label)])
    assert np.all(margin > 0)
    scale = np.abs(margin).max()  # the model's own float32 distances: 1.8e-5 from float64 at most (measured)
    assert np.abs(logit - margin).max() <= 1e-5 * scale
    assert np.abs(result.astype(np.float64).sum(1) - margin).max() <= 1e-5 * scale


def one_class_dtd(name: str, x: np.ndarray, stiffness: float) -> tuple[np.ndarray, float]:
    """One-class DTD in float64, as Kauffmann et al. write it (arXiv 1805.06230): the outlier score
    o = -log(sum_j a_j exp(-gamma d_j)) / gamma, a soft min-pooling over h_j = d_j - log(a_j) / gamma with
    d_j = |x - u_j|^2; R_j = o softmin_j(stiffness gamma h); R_i = sum_j (x_i - u_ji)^2 / d_j R_j. Returns R and o."""
    vectors, weights, gamma = (REFERENCES[f"{ONE_CLASS[name]}/{k}"] for k in ("vectors", "weights", "gamma"))
    distances = ((x.astype(np.float64) - vectors) ** 2).sum(1)
    h = distances - np.log(weights) / gamma
    score = h.min() - np.log(np.exp(-gamma * (h - h.min())).sum()) / gamma
    shares = np.exp(-stiffness * gamma * (h - h.min()))
    pooled = score * shares / shares.sum()
    return ((x - vectors) ** 2 / distances[:, None] * pooled[:, None]).sum(0), float(score)


@pytest.mark.parametrize("name", ONE_CLASS)
def test_one_class_svm_keeps_its_outputs_bit_for_bit(name):
    x = REFERENCES[f"{ONE_CLASS[name]}/inputs"]
    expected = session(source(name)).run(None, {"X": x})
    actual = session(built(name)).run(None, {"X": x})
    assert all(np.array_equal(a, e) for a, e in zip(actual, expected))


@pytest.mark.parametrize("name", ONE_CLASS)
@pytest.mark.parametrize("stiffness", [1.0, 2.0])
def test_one_class_svm_relevance_is_one_class_dtds(name, stiffness):
    """Inliers and outliers, to 1e-5 of the largest relevance (measured: 2.1e-6 on iris, 2.2e-7 on digits, float32
    against float64)."""
    x = REFERENCES[f"{ONE_CLASS[name]}/inputs"]
    result = session(built(name, stiffness=stiffness)).run(["relevance"], {"X": x})[0]
    expected = np.array([one_class_dtd(name, row, stiffness)[0] for row in x])
    assert np.abs(result - expected).max() <= 1e-5 * np.abs(expected).max()


@pytest.mark.parametrize("name", ONE_CLASS)
def test_one_class_svm_outlier_score_is_the_models(name):
    """The paper's check: the neuralized output, which the relevance sums to, is the model's own decision f
    (`scores`) as o = -log(f + rho) / gamma; outliers (label -1) are those above -log(rho) / gamma."""
    x = REFERENCES[f"{ONE_CLASS[name]}/inputs"]
    gamma, offset = (float(REFERENCES[f"{ONE_CLASS[name]}/{k}"]) for k in ("gamma", "offset"))
    label, decision, result = session(built(name)).run(None, {"X": x})
    own = -np.log(decision[:, 0].astype(np.float64) + offset) / gamma
    scores = np.array([one_class_dtd(name, row, 1.0)[1] for row in x])
    assert np.abs(scores - own).max() <= 1e-5 * np.abs(own).max()
    assert np.abs(result.astype(np.float64).sum(1) - own).max() <= 1e-5 * np.abs(own).max()
    assert np.array_equal(label.ravel() == -1, own > -np.log(offset) / gamma) and np.any(label == -1)


def test_float16_is_refused_in_one_line():
    """ai.onnx.ml operators take no float16, so a half-precision copy of a classic model would not load."""
    from onnxlrp.ir.precision import to_float16
    with pytest.raises(onnxlrp.LrpError) as error:
        to_float16(built("logistic_regression"))
    assert "\n" not in str(error.value) and "ai.onnx.ml" in str(error.value)

"""The trained recurrent example (issue 20 item 5; fixtures/make_lstm_example.py): a bias-free torch LSTM that finds
the pattern +2, -2, +2 in feature 0 of 20-step sequences, decoys of the same pattern in other features beside it.
Built under `epsilon` (the README's composite for recurrent nets), its relevance lies on the planted pattern."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

from conftest import FIXTURES, explain, relative_error, run

RECURRENT = FIXTURES / "recurrent"
EXAMPLE = np.load(RECURRENT / "example_lstm.npz")
WIDTH = 3  # steps of the pattern


@pytest.fixture(scope="module")
def original() -> onnx.ModelProto:
    return onnx.load(str(RECURRENT / "example_lstm.onnx"))


@pytest.fixture(scope="module")
def outputs(original) -> tuple[np.ndarray, np.ndarray]:
    """The built model's logits and relevance of the committed held-out sequences, each for its true class."""
    logits, relevance = run(explain(original, "epsilon"), {"x": EXAMPLE["x"], "target": EXAMPLE["labels"]},
                            ["logits", "relevance"])
    return logits, relevance


def positive_shares(relevance: np.ndarray, rows: np.ndarray, features: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Per sample, the share of its positive relevance on the pattern's steps of one feature."""
    positive = np.maximum(relevance, 0)
    return np.array([positive[n, s:s + WIDTH, f].sum() / positive[n].sum() for n, f, s in
                     zip(rows, features[rows], starts[rows])])


def test_outputs_are_the_models_own(original, outputs):
    assert np.array_equal(outputs[0], run(original, {"x": EXAMPLE["x"]})[0])
    np.testing.assert_allclose(outputs[0], EXAMPLE["logits"], rtol=1e-5, atol=1e-5)  # what torch computed


def test_predicts_the_committed_labels_at_the_committed_accuracy(outputs):
    predicted = outputs[0].argmax(1)
    assert np.array_equal(predicted, EXAMPLE["predicted"])
    assert (predicted == EXAMPLE["labels"]).mean() == EXAMPLE["sample_accuracy"] >= 0.99  # computed here, not read


def test_relevance_is_per_step_and_feature_and_matches_the_float64_reference(outputs):
    relevance = outputs[1]
    assert relevance.shape == EXAMPLE["x"].shape == (64, 20, 4)  # [N, T, F]
    assert relative_error(relevance.astype(np.float64), EXAMPLE["relevance"]) <= 1e-4


def test_relevance_total_is_the_logit(outputs):
    """No biases: the relevance total is the explained logit, less what epsilon = 1e-6 absorbs where a
    pre-activation is near 0 (1.4e-4 of it at most here, in the float64 reference too)."""
    logits, relevance = outputs
    explained = logits[np.arange(len(logits)), EXAMPLE["labels"]]
    np.testing.assert_allclose(relevance.sum((1, 2)), explained, rtol=1e-3)


def test_positive_relevance_lies_on_the_planted_pattern_not_on_the_decoy(outputs):
    """On correctly classified class-1 sequences, the 3 of 80 (step, feature) cells of the pattern hold 75 % of
    the positive relevance on average (at least 34 % in each); a decoy in another feature holds 0.25 %."""
    logits, relevance = outputs
    found = np.flatnonzero((EXAMPLE["labels"] == 1) & (logits.argmax(1) == 1))
    assert len(found) == 34
    planted = positive_shares(relevance, found, np.zeros(len(relevance), int), EXAMPLE["start"])
    assert planted.mean() > 0.7 and planted.min() > 0.3
    decoyed = found[EXAMPLE["decoy_feature"][found] >= 0]
    assert len(decoyed) == 21
    decoys = positive_shares(relevance, decoyed, EXAMPLE["decoy_feature"], EXAMPLE["decoy_start"])
    assert decoys.mean() < 0.01 and decoys.max() < 0.05

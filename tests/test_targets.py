"""The input `target` at run time: one class per sample or one for the whole batch, negative for the predicted
class; anything else makes ONNX Runtime fail with a message that names `target`."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

from conftest import FIXTURES, explain, run, session


@pytest.fixture(scope="module")
def mlp():
    model = explain(onnx.load(str(FIXTURES / "mlp_ts.onnx")), "epsilon")
    return session(model), np.load(FIXTURES / "mlp.npz")["input"]  # 3 samples, 5 classes


@pytest.mark.parametrize("target,fragment", [
    ([5, 0, 1], "target: each class must be below the number of classes, 5"),
    ([0, 2**40, 1], "target: each class must be below the number of classes, 5"),
    ([0, 1], "target: its length must be the batch size or 1"),
    ([0, 1, 2, 3], "target: its length must be the batch size or 1"),
])
def test_bad_targets_fail_naming_target(mlp, target, fragment):
    built, x = mlp
    with pytest.raises(Exception, match="target") as error:
        built.run(["relevance"], {"input": x, "target": np.array(target, dtype=np.int64)})
    assert fragment in str(error.value)


def test_a_batch_of_one_with_a_longer_target_fails(mlp):
    built, x = mlp
    with pytest.raises(Exception) as error:
        built.run(["relevance"], {"input": x[:1], "target": np.array([0, 1], dtype=np.int64)})
    assert "target: its length must be the batch size or 1" in str(error.value)


def test_length_one_applies_to_the_batch_and_negative_means_predicted(mlp):
    built, x = mlp
    each = [built.run(["relevance"], {"input": x[i:i + 1], "target": np.array([c], dtype=np.int64)})[0]
            for i, c in enumerate([2, 2, 2])]
    batch = built.run(["relevance"], {"input": x, "target": np.array([2], dtype=np.int64)})[0]
    np.testing.assert_allclose(batch, np.concatenate(each), rtol=1e-6, atol=1e-9)
    predicted = built.run(["logits"], {"input": x})[0].argmax(axis=1)
    minus_seven = built.run(["relevance"], {"input": x, "target": np.array([-7, -1, -2], dtype=np.int64)})[0]
    np.testing.assert_array_equal(minus_seven, built.run(["relevance"], {"input": x, "target": predicted})[0])

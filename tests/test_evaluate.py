"""Faithfulness (`onnxlrp evaluate`): Quantus's numbers reproduced, LRP beats a random order, the command's files."""
from __future__ import annotations

import csv
import re

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnxlrp import Explainer
from onnxlrp.app import evaluate as ev
from onnxlrp.errors import LrpError

from conftest import FIXTURES, assert_one_line_error, onnxlrp_cli as onnxlrp

REFERENCE = np.load(FIXTURES / "dataset" / "quantus_reference.npz")
MLP = FIXTURES / "clever_hans" / "model.onnx"
# fixtures/make_quantus_reference.py CASES: name -> (metric, features_in_step or (patch_size, regions), fill, softmax)
CASES = {
    "flipping_black": ("flipping", 16, "black", False),
    "flipping_mean": ("flipping", 16, "mean", False),
    "flipping_white": ("flipping", 8, "white", False),
    "flipping_zero": ("flipping", 32, "zero", False),
    "flipping_softmax": ("flipping", 16, "black", True),
    "region_black": ("region", (4, 16), "black", False),
    "region_mean_padded": ("region", (5, 10), "mean", False),
    "region_softmax": ("region", (3, 20), "black", True),
}


def float64_mlp(softmax: bool) -> ev.Predict:
    """The Clever Hans MLP in float64 numpy, as the reference script runs it in torch."""
    w = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in onnx.load(str(MLP)).graph.initializer}

    def predict(x: np.ndarray) -> np.ndarray:
        logits = np.maximum(x.reshape(len(x), -1).astype(np.float64) @ w["w1"] + w["b1"], 0) @ w["w2"] + w["b2"]
        if not softmax:
            return logits
        exp = np.exp(logits - logits.max(axis=1, keepdims=True))
        return exp / exp.sum(axis=1, keepdims=True)
    return predict


def curves(case: str, predict: ev.Predict) -> np.ndarray:
    kind, size, fill, _ = CASES[case]
    x, y, a = REFERENCE["x"], REFERENCE["y"], REFERENCE["a"]
    if kind == "flipping":
        return ev.pixel_flipping(predict, x, y, a, size, fill)
    return ev.region_perturbation(predict, x, y, a, *size, fill)


@pytest.mark.parametrize("case", CASES)
def test_curves_and_areas_equal_quantus(case):
    found = curves(case, float64_mlp(CASES[case][3]))
    np.testing.assert_allclose(found, REFERENCE[f"{case}_curve"], rtol=0, atol=1e-9)
    np.testing.assert_allclose(ev.auc(found), REFERENCE[f"{case}_auc"], rtol=0, atol=1e-9)


@pytest.mark.parametrize("case", ["flipping_mean", "region_mean_padded", "region_softmax"])
def test_the_onnx_runtime_forward_gives_quantus_numbers_to_float32(case):
    predict = ev.predictor(Explainer(MLP, composite="epsilon"), CASES[case][3], batch_size=5)
    found = curves(case, predict)
    scale = np.abs(REFERENCE[f"{case}_curve"]).max()
    np.testing.assert_allclose(found, REFERENCE[f"{case}_curve"], rtol=0, atol=2e-6 * scale)


def test_aopc_is_the_mean_drop_including_the_unperturbed_step():
    drops = np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 4.0]])
    np.testing.assert_allclose(ev.aopc(drops), [1.5, 1.0])
    np.testing.assert_allclose(ev.auc(drops), [4.0, 2.0])


def test_lrp_is_more_faithful_than_a_random_order_on_the_digits():
    data = np.load(FIXTURES / "digits" / "test.npz")
    x = data["images"][:90, None].astype(np.float32) / 255
    built = ev.explainers(FIXTURES / "digits" / "digits.onnx", ["epsilon_plus_flat"])
    results = {r.method: r for r in ev.evaluate(built, x, ["epsilon_plus_flat"], ev.Settings(patch_size=4))}
    assert set(results) == {"epsilon_plus_flat", ev.GRADIENT, ev.RANDOM}
    lrp, gradient, random = results["epsilon_plus_flat"], results[ev.GRADIENT], results[ev.RANDOM]
    # measured on 90 digits: region AOPC 14.7 (LRP), 16.3 (gradient x input), 9.6 (random)
    assert lrp.region_aopc > random.region_aopc + 3 and lrp.flipping_aopc > random.flipping_aopc + 3
    assert lrp.flipping_auc < random.flipping_auc and gradient.region_aopc > random.region_aopc
    assert lrp.start == random.start and len(lrp.flipping) == 16 and len(lrp.drops) == 16


def test_evaluate_command_writes_the_table_and_the_plot(tmp_path):
    data = np.load(FIXTURES / "clever_hans" / "test.npz")
    np.save(tmp_path / "digits.npy", data["images"][:24, None].astype(np.float32) / 255)
    result = onnxlrp("evaluate", MLP, tmp_path / "digits.npy", "-o", tmp_path / "out", "--composite", "epsilon",
                     "--composite", "epsilon_plus_flat", "--features-in-step", "32", "--fill", "mean")
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader((tmp_path / "out" / "faithfulness.csv").open()))
    assert [r["method"] for r in rows] == ["epsilon", "epsilon_plus_flat", ev.GRADIENT, ev.RANDOM]
    by_method = {r["method"]: float(r["region_aopc"]) for r in rows}
    assert by_method["epsilon"] > by_method[ev.RANDOM]
    assert (tmp_path / "out" / "faithfulness.png").read_bytes().startswith(b"\x89PNG")
    assert result.stdout.splitlines()[-1].startswith("wrote ")


@pytest.mark.parametrize("arguments, fragments", [
    (["--fill", "gray"], ["'gray' is not one of"]),
    (["--target", "12"], ["class 12 is out of range (the model has 10 classes"]),
    (["--workers", "2"], ["--workers applies to --engine ray only"]),
    (["--address", "localhost:6379"], ["--address applies to --engine ray only"]),
])
def test_evaluate_errors_are_one_line(tmp_path, arguments, fragments):
    np.save(tmp_path / "x.npy", np.zeros((2, 1, 16, 16), np.float32))
    result = onnxlrp("evaluate", MLP, tmp_path / "x.npy", "-o", tmp_path / "out", *arguments)
    assert_one_line_error(result, *fragments)
    assert not (tmp_path / "out").exists()


def test_evaluate_refuses_sizes_that_do_not_fit():
    x, y = REFERENCE["x"], REFERENCE["y"]
    predict = float64_mlp(False)
    with pytest.raises(LrpError, match=re.escape("--features-in-step 7: must divide the 256 input features")):
        ev.pixel_flipping(predict, x, y, x, 7)
    with pytest.raises(LrpError, match=re.escape("--patch-size 17: must be between 1 and the image size [16, 16]")):
        ev.region_perturbation(predict, x, y, x, 17)
    with pytest.raises(LrpError, match=re.escape("inputs of shape [8, 256] are not images [N, C, H, W]")):
        ev.region_perturbation(predict, x.reshape(8, -1), y, x.reshape(8, -1), 4)
    with pytest.raises(LrpError, match="unknown composite 'nope'"):
        ev.explainers(MLP, ["nope"])


def test_the_random_order_of_a_sample_does_not_depend_on_its_batch():
    whole = np.random.default_rng(5).random((10, 1, 4, 6))
    np.testing.assert_array_equal(ev.random_relevance(5, 0, (10, 1, 4, 6)), whole)
    np.testing.assert_array_equal(ev.random_relevance(5, 7, (3, 1, 4, 6)), whole[7:])


@pytest.fixture(scope="module")
def small_ray(request):
    """A local Ray of two CPUs and 100 MB of object store, shut down after the module's tests."""
    import ray
    ray.init(num_cpus=2, object_store_memory=100 * 2**20, include_dashboard=False, log_to_driver=False)
    request.addfinalizer(ray.shutdown)
    return ray.get_runtime_context().gcs_address


def test_evaluate_on_ray_workers_gives_the_in_process_numbers(small_ray, tmp_path):
    data = np.load(FIXTURES / "clever_hans" / "test.npz")
    np.save(tmp_path / "digits.npy", data["images"][:24, None].astype(np.float32) / 255)
    common = [MLP, tmp_path / "digits.npy", "--composite", "epsilon", "--features-in-step", "32", "--fill", "mean",
              "--patch-size", "4", "--regions", "12"]
    local = onnxlrp("evaluate", *common, "-o", tmp_path / "local")
    assert local.returncode == 0, local.stderr
    # 5 rows of up to 5 samples on two workers: the batches come back in any order, each sample's numbers the same
    remote = onnxlrp("evaluate", *common, "-o", tmp_path / "ray", "--engine", "ray", "--address", small_ray,
                     "--workers", "2", "--batch-size", "5")
    assert remote.returncode == 0, remote.stderr
    expected, found = ([list(csv.DictReader((tmp_path / out / "faithfulness.csv").open())) for out in ("local", "ray")])
    assert [r["method"] for r in found] == ["epsilon", ev.GRADIENT, ev.RANDOM] == [r["method"] for r in expected]
    for want, got in zip(expected, found):
        np.testing.assert_allclose([float(got[c]) for c in ev.COLUMNS[1:]], [float(want[c]) for c in ev.COLUMNS[1:]],
                                   rtol=0, atol=1e-9)
    assert (tmp_path / "ray" / "faithfulness.png").read_bytes().startswith(b"\x89PNG")

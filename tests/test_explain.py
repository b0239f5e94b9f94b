"""`onnxlrp explain` end to end on the committed digits example: files written, values read back, errors."""
from __future__ import annotations

import re

import os
import subprocess
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper
from PIL import Image

import conftest
from conftest import FIXTURES, make_model, onnxlrp_cli, run
import onnxlrp

DIGITS = FIXTURES / "digits"
BUILT = DIGITS / "digits_epsilon_plus_flat.onnx"
SAMPLES = sorted((DIGITS / "samples").glob("*.png"))
LABELS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    """As the command's other errors, and nothing on stdout: no input was reported as explained."""
    conftest.assert_one_line_error(result, *fragments)
    assert result.stdout == ""


def built_model() -> onnx.ModelProto:
    return onnx.load(str(BUILT))


def pictures() -> np.ndarray:
    """The sample PNGs as the model input: [10, 1, 16, 16], 0..1."""
    return np.stack([np.asarray(Image.open(p), dtype=np.float32)[None] / 255 for p in SAMPLES])


def test_committed_graph_is_what_build_gives_today():
    x = pictures()
    fresh = onnxlrp.build(DIGITS / "digits.onnx")
    expected = run(fresh, {"input": x})
    for actual, wanted in zip(run(built_model(), {"input": x}), expected):
        np.testing.assert_allclose(actual, wanted, rtol=1e-5, atol=1e-5)


def test_explain_folder_writes_relevance_and_heatmaps(tmp_path):
    out = tmp_path / "heatmaps"
    result = onnxlrp_cli("explain", BUILT, DIGITS / "samples", "-o", out)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # one batch: no progress bar, and no ONNX Runtime warning about `target`
    assert sorted(p.name for p in out.iterdir()) == sorted([f"{p.stem}.npy" for p in SAMPLES]
                                                           + [f"{p.stem}.png" for p in SAMPLES])
    logits, relevance = run(built_model(), {"input": pictures()})
    lines = result.stdout.strip().splitlines()
    assert len(lines) == len(SAMPLES)
    for k, (path, line) in enumerate(zip(SAMPLES, lines)):
        saved = np.load(out / f"{path.stem}.npy")
        assert saved.dtype == np.float32 and saved.shape == (1, 16, 16)
        np.testing.assert_allclose(saved, relevance[k], rtol=1e-5, atol=1e-6)
        picture = np.asarray(Image.open(out / f"{path.stem}.png"))
        assert picture.dtype == np.uint8 and picture.shape == (16, 16, 3)
        np.testing.assert_array_equal(picture, onnxlrp.heatmap(saved))
        predicted = int(logits[k].argmax())
        assert predicted == LABELS.index(path.stem)  # the example model gets every sample right
        assert line == (f"{path}: predicted {predicted} ({LABELS[predicted]}), explained {predicted} "
                        f"({LABELS[predicted]}), logit {logits[k, predicted]:.6g}, "
                        f"relevance sum {float(saved.sum(dtype=np.float64)):.6g}")


def test_npy_inputs_match_the_built_model_run_directly(tmp_path):
    x = pictures()
    np.save(tmp_path / "batch.npy", x[:3])
    np.save(tmp_path / "single.npy", x[7])  # one sample, no batch axis
    out = tmp_path / "out"
    result = onnxlrp_cli("explain", BUILT, tmp_path / "batch.npy", tmp_path / "single.npy", "-o", out,
                         "--target", 3, "--batch-size", 2, "--cmap", "coldnhot")
    assert result.returncode == 0, result.stderr
    assert "explaining" in result.stderr  # two batches: a progress bar on stderr, not on stdout
    assert re.search(r"^explained 4 input\(s\) in [0-9.e+-]+ s \([0-9.e+-]+ per second\)$", result.stderr, re.M)
    assert sorted(p.name for p in out.glob("*.npy")) == ["batch-0.npy", "batch-1.npy", "batch-2.npy", "single.npy"]
    target = np.full(4, 3, dtype=np.int64)
    logits, expected = run(built_model(), {"input": np.concatenate([x[:3], x[7:8]]), "target": target})
    for k, stem in enumerate(["batch-0", "batch-1", "batch-2", "single"]):
        saved = np.load(out / f"{stem}.npy")
        np.testing.assert_allclose(saved, expected[k], rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(np.asarray(Image.open(out / f"{stem}.png")),
                                      onnxlrp.heatmap(saved, cmap="coldnhot"))
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 4 and all("explained 3 (three)" in line for line in lines)
    assert lines[0].startswith(f"{tmp_path / 'batch.npy'} [batch-0]: ")
    assert f"logit {logits[3, 3]:.6g}," in lines[3]


def test_plain_model_composite_and_labels_file(tmp_path):
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(f"digit {d}" for d in range(10)) + "\n")
    result = onnxlrp_cli("explain", DIGITS / "digits.onnx", SAMPLES[0], "-o", tmp_path / "out",
                         "--composite", "zero", "--labels", labels)
    assert result.returncode == 0, result.stderr
    built = onnxlrp.build(DIGITS / "digits.onnx", "zero")
    _, expected = run(built, {"input": pictures()[:1]})
    np.testing.assert_allclose(np.load(tmp_path / "out" / f"{SAMPLES[0].stem}.npy"), expected[0], rtol=1e-5,
                               atol=1e-6)
    assert "predicted 8 (digit 8)" in result.stdout


def test_overlay_blends_over_the_picture(tmp_path):
    result = onnxlrp_cli("explain", BUILT, SAMPLES[0], "-o", tmp_path, "--overlay", "--cmap", "gray")
    assert result.returncode == 0, result.stderr
    relevance = np.load(tmp_path / f"{SAMPLES[0].stem}.npy")
    blended = np.asarray(Image.open(tmp_path / f"{SAMPLES[0].stem}.png"))
    np.testing.assert_array_equal(blended, onnxlrp.heatmap(relevance, "gray", image=np.asarray(Image.open(SAMPLES[0]))))
    plain = onnxlrp.heatmap(relevance, "gray")
    assert not np.array_equal(blended, plain)


def rgb_model(tmp_path: Path) -> Path:
    """cnn_ts (3 x 16 x 16, BatchNorm) built with the default composite."""
    path = tmp_path / "cnn_lrp.onnx"
    onnx.save(onnxlrp.build(FIXTURES / "cnn_ts.onnx"), str(path))
    return path


def test_images_are_resized_cropped_and_normalized(tmp_path):
    rng = np.random.default_rng(0)
    wide = rng.integers(0, 256, size=(16, 32, 3), dtype=np.uint8)  # shorter side fits: only the centre is kept
    Image.fromarray(wide).save(tmp_path / "wide.png")
    model = rgb_model(tmp_path)
    out = tmp_path / "out"
    result = onnxlrp_cli("explain", model, tmp_path / "wide.png", "-o", out, "--normalize", "imagenet",
                         "--channels", "bgr")
    assert result.returncode == 0, result.stderr
    centre = wide[:, 8:24, ::-1].astype(np.float64) / 255
    x = ((centre - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]).transpose(2, 0, 1)[None].astype(np.float32)
    _, expected = run(onnx.load(str(model)), {"input": x})
    np.testing.assert_allclose(np.load(out / "wide.npy"), expected[0], rtol=1e-4, atol=1e-6)


def test_dynamic_size_needs_size_option(tmp_path):
    model = built_model()  # the same graph, declared with a dynamic height and width
    for axis, name in ((2, "H"), (3, "W")):
        model.graph.input[0].type.tensor_type.shape.dim[axis].dim_param = name
    path = tmp_path / "dynamic.onnx"
    onnx.save(model, str(path))
    Image.fromarray(np.full((12, 20), 200, dtype=np.uint8)).save(tmp_path / "gray.png")
    assert_one_line_error(onnxlrp_cli("explain", path, tmp_path / "gray.png", "-o", tmp_path / "a"), "--size H,W")
    assert not (tmp_path / "a").exists()
    result = onnxlrp_cli("explain", path, tmp_path / "gray.png", "-o", tmp_path / "b", "--size", "16,16")
    assert result.returncode == 0, result.stderr
    _, expected = run(built_model(), {"input": np.full((1, 1, 16, 16), 200 / 255, dtype=np.float32)})
    np.testing.assert_allclose(np.load(tmp_path / "b" / "gray.npy"), expected[0], rtol=1e-5, atol=1e-6)
    assert np.asarray(Image.open(tmp_path / "b" / "gray.png")).shape == (16, 16, 3)


def test_nhwc_model_layout_from_its_input(tmp_path):
    weight = np.random.default_rng(2).normal(size=(5, 3, 3, 3))
    nodes = [helper.make_node("Transpose", ["input"], ["t"], perm=[0, 3, 1, 2]),
             helper.make_node("Conv", ["t", "w"], ["c"]), helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("GlobalAveragePool", ["r"], ["p"]), helper.make_node("Flatten", ["p"], ["logits"])]
    path = tmp_path / "nhwc.onnx"
    onnx.save(make_model(nodes, ["N", 8, 8, 3], ["N", 5], {"w": weight}), str(path))
    picture = np.random.default_rng(3).integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    Image.fromarray(picture).save(tmp_path / "p.png")
    result = onnxlrp_cli("explain", path, tmp_path / "p.png", "-o", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    _, expected = run(onnxlrp.build(onnx.load(str(path))), {"input": picture[None].astype(np.float32) / 255})
    saved = np.load(tmp_path / "out" / "p.npy")
    assert saved.shape == (8, 8, 3)
    np.testing.assert_allclose(saved, expected[0], rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out" / "p.png")),
                                  onnxlrp.heatmap(saved, channel_axis=-1))


@pytest.fixture
def broken(tmp_path) -> Path:
    path = tmp_path / "broken.png"
    path.write_bytes(b"not a picture")
    return path


def outputs_untouched(out: Path, before: set[str]) -> bool:
    return {p.name for p in out.iterdir()} == before if out.exists() else not before


ERRORS = {
    "unreadable image": (lambda t, b: [SAMPLES[0], b], ["broken.png", "not a readable image"]),
    "wrong array shape": (lambda t, b: [SAMPLES[0], t / "wrong.npy"], ["wrong.npy", "shape [1, 8, 8]",
                                                                      "[?, 1, 16, 16]"]),
    "class out of range": (lambda t, b: [SAMPLES[0], "--target", "10"], ["--target 10", "10 classes"]),
    "no such input": (lambda t, b: [t / "missing.png"], ["missing.png", "no such file"]),
    "stem collision": (lambda t, b: [SAMPLES[0], t / "eight.npy"], ["'eight'", "rename"]),
    "labels count": (lambda t, b: [SAMPLES[0], "--labels", t / "few.txt"], ["few.txt", "3 labels", "10 classes"]),
    "size mismatch": (lambda t, b: [SAMPLES[0], "--size", "8,8"], ["--size 8,8", "16 x 16"]),
    "mean count": (lambda t, b: [SAMPLES[0], "--mean", "0.1,0.2"], ["--mean", "2 values"]),
    "bad scale": (lambda t, b: [SAMPLES[0], "--scale", "1/0"], ["--scale"]),
    "normalize and mean": (lambda t, b: [SAMPLES[0], "--normalize", "imagenet", "--mean", "0"], ["--normalize"]),
    "composite for a built model": (lambda t, b: [SAMPLES[0], "--composite", "zero"], ["already computes relevance"]),
}


@pytest.mark.parametrize("case,existing", [(case, False) for case in ERRORS]
                         + [(case, True) for case in ("unreadable image", "wrong array shape", "class out of range")])
def test_errors_are_one_line_and_write_nothing(tmp_path, broken, case, existing):
    np.save(tmp_path / "wrong.npy", np.zeros((1, 8, 8), dtype=np.float32))
    np.save(tmp_path / "eight.npy", np.zeros((1, 16, 16), dtype=np.float32))
    (tmp_path / "few.txt").write_text("a\nb\nc\n")
    out = tmp_path / "out"
    if existing:
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    before = {p.name for p in out.iterdir()} if existing else set()
    arguments, fragments = ERRORS[case]
    inputs = arguments(tmp_path, broken)
    result = onnxlrp_cli("explain", BUILT, *inputs, "-o", out)
    assert_one_line_error(result, *fragments)
    assert outputs_untouched(out, before)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".onnxlrp-")]


def test_results_never_replace_an_input(tmp_path):
    picture = tmp_path / "eight.png"
    picture.write_bytes(SAMPLES[0].read_bytes())
    assert_one_line_error(onnxlrp_cli("explain", BUILT, tmp_path, "-o", tmp_path), "would replace an input")
    assert picture.read_bytes() == SAMPLES[0].read_bytes() and sorted(tmp_path.iterdir()) == [picture]


def test_pictures_for_a_model_without_pictures(tmp_path):
    model = tmp_path / "mlp_lrp.onnx"
    onnx.save(onnxlrp.build(FIXTURES / "mlp_ts.onnx"), str(model))
    assert_one_line_error(onnxlrp_cli("explain", model, SAMPLES[0], "-o", tmp_path / "out"),
                          "does not take pictures", "[?, 20]")
    np.save(tmp_path / "row.npy", np.linspace(-1, 1, 20, dtype=np.float32))
    result = onnxlrp_cli("explain", model, tmp_path / "row.npy", "-o", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    assert np.load(tmp_path / "out" / "row.npy").shape == (20,)
    assert np.asarray(Image.open(tmp_path / "out" / "row.png")).shape == (1, 20, 3)


def test_cuda_that_does_not_load_is_one_line(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # no GPU visible, whatever the machine has
    result = onnxlrp_cli("explain", BUILT, SAMPLES[0], "-o", tmp_path / "out", "--device", "cuda", env=env)
    assert_one_line_error(result, "--device cuda", "--device cpu")
    assert not (tmp_path / "out").exists()


def cancelling_bias(tmp_path: Path) -> tuple[Path, Path]:
    """One dense layer whose bias cancels almost all of class 0's logit: x = [1, 1, 0, 0] gives the logit 1/64,
    while LRP-0 gives the input x . w = 2 (the bias keeps its own share)."""
    nodes = [helper.make_node("Gemm", ["input", "w", "b"], ["logits"], name="dense")]
    weight = np.array([[1, 0], [1, 0], [0, 1], [0, 1]])
    model = onnxlrp.build(make_model(nodes, ["N", 4], ["N", 2], {"w": weight, "b": [-1.984375, 0]}), "zero",
                          layer_relevance=True)
    path = tmp_path / "bias_lrp.onnx"
    onnxlrp.save_atomic(model, path)
    np.save(tmp_path / "x.npy", np.array([1, 1, 0, 0], dtype=np.float32))
    return path, tmp_path / "x.npy"


def test_a_relevance_total_far_beyond_the_logit_is_a_warning(tmp_path):
    path, x = cancelling_bias(tmp_path)
    result = onnxlrp_cli("explain", path, x, "-o", tmp_path / "out")
    assert result.returncode == 0 and (tmp_path / "out" / "x.npy").is_file()
    assert result.stdout.strip().endswith("explained 0, logit 0.015625, relevance sum 2")
    assert result.stderr == (f"onnxlrp: warning: {path}: the relevance total is more than 100 times the explained "
                             "logit for 1 of 1 sample(s) (e.g. 2 against 0.015625) under composite zero: for a CNN try "
                             "epsilon_plus_flat or epsilon_gamma_box\n")
    checked = onnxlrp_cli("check", path, "--input", x)
    assert checked.returncode == 0 and checked.stdout.splitlines()[-1].endswith("(12800.0%)")
    assert checked.stderr == result.stderr


def test_the_warning_suggests_the_presets_of_the_architecture():
    from onnxlrp.lrp.seed import Recorded
    assert Recorded("zero", architecture="transformer").inflation([1.0, -300.0], [2.0, 2.0]) == (
        "the relevance total is more than 100 times the explained logit for 1 of 2 sample(s) (e.g. -300 against 2) "
        "under composite zero: for a transformer try attnlrp or cp_lrp")
    assert Recorded("attnlrp", "logodds", architecture="transformer").inflation([300.0], [2.0]).endswith(
        "the explained log-odds for 1 of 1 sample(s) (e.g. 300 against 2) under composite attnlrp: for a "
        "transformer try cp_lrp")
    assert Recorded().inflation([300.0], [2.0]).endswith(
        "under the composite it was built with: for a transformer try attnlrp or cp_lrp; for a CNN try "
        "epsilon_plus_flat or epsilon_gamma_box")
    assert Recorded("zero").inflation([200.0], [2.0]) is None  # 100 times is not more than 100 times


def fixed_batch_model(tmp_path: Path) -> Path:
    """The digits model as exporters often write it, with a batch of 1 fixed in its input and output, built."""
    model = onnx.load(str(DIGITS / "digits.onnx"))
    for value in (model.graph.input[0], model.graph.output[0]):
        value.type.tensor_type.shape.dim[0].dim_value = 1
    path = tmp_path / "fixed_lrp.onnx"
    onnxlrp.save_atomic(onnxlrp.build(model, layer_relevance=True), path)
    return path


def test_a_model_with_a_fixed_batch_of_one_runs_one_sample_at_a_time(tmp_path):
    path = fixed_batch_model(tmp_path)
    x = pictures()[:3]
    built = onnx.load(str(path))
    alone = [run(built, {"input": x[k:k + 1], "target": np.array([t])}) for k, t in enumerate([-1, 2, 5])]
    note = f"{path}: the model takes a fixed batch of 1: its inputs run one at a time"
    explainer = onnxlrp.Explainer(path)
    with pytest.warns(onnxlrp.LrpWarning, match=note) as caught:
        logits, relevance = explainer.explain(x, [-1, 2, 5])
        explainer.explain(x)  # said once
    assert len(caught) == 1
    np.testing.assert_array_equal(logits, np.concatenate([a[0] for a in alone]))
    np.testing.assert_array_equal(relevance, np.concatenate([a[1] for a in alone]))
    np.save(tmp_path / "three.npy", x)
    result = onnxlrp_cli("explain", path, *SAMPLES[:3], tmp_path / "three.npy", "-o", tmp_path / "out", "--target", 2)
    assert result.returncode == 0 and result.stderr == f"onnxlrp: warning: {note}\n"
    for k in range(3):
        np.testing.assert_array_equal(np.load(tmp_path / "out" / f"three-{k}.npy"),
                                      run(built, {"input": x[k:k + 1], "target": np.array([2])})[1][0])
    checked = onnxlrp_cli("check", path, "--input", tmp_path / "three.npy")
    assert checked.returncode == 0 and checked.stderr == result.stderr
    assert [line.split(",")[0] for line in checked.stdout.splitlines() if line.startswith("sample")] == \
        [f"sample {k}: class {int(a[0].argmax())} (predicted)" for k, a in enumerate(alone)]


def bands(height: int = 211, width: int = 512) -> np.ndarray:
    """A wide RGB picture (211 high, 512 wide) of three vertical bands: red, green, blue."""
    picture = np.zeros((height, width, 3), dtype=np.uint8)
    for k, (start, stop) in enumerate(((0, 100), (100, 412), (412, width))):
        picture[:, start:stop, k] = 255
    return picture


@pytest.mark.parametrize("mode", ["crop", "stretch", "pad"])
def test_resize_modes_give_the_expected_model_input(tmp_path, mode):
    """A 211 x 512 picture for the 16 x 16 RGB model: `crop` keeps the centre (the green band only), `stretch`
    all three bands over the full height, `pad` all three over 7 rows between black rows 0-3 and 11-15."""
    from onnxlrp.app.inputs import parse_options, preprocessing, read_image
    Image.fromarray(bands()).save(tmp_path / "wide.png")
    model_input = onnxlrp.Explainer(rgb_model(tmp_path)).input
    options = parse_options(resize=mode)
    x, _ = read_image(tmp_path / "wide.png", model_input, preprocessing(model_input, options))
    picture = Image.fromarray(bands())
    expected = {"crop": picture.resize((39, 16), Image.Resampling.BILINEAR).crop((11, 0, 27, 16)),
                "stretch": picture.resize((16, 16), Image.Resampling.BILINEAR)}
    padded = np.zeros((16, 16, 3), dtype=np.uint8)
    padded[4:11] = np.asarray(picture.resize((16, 7), Image.Resampling.BILINEAR))
    wanted = np.asarray(expected.get(mode, padded), dtype=np.float32) / 255
    np.testing.assert_allclose(x[0], wanted.transpose(2, 0, 1), atol=1e-7)
    channels = x[0].reshape(3, -1).max(axis=1) > 0.5  # which bands reach the model
    assert channels.tolist() == ([False, True, False] if mode == "crop" else [True, True, True])
    blank = np.all(x[0] == 0, axis=(0, 2))  # rows that are black
    assert np.flatnonzero(blank).tolist() == ([0, 1, 2, 3, 11, 12, 13, 14, 15] if mode == "pad" else [])


def test_resize_reaches_explain(tmp_path):
    Image.fromarray(bands()).save(tmp_path / "wide.png")
    model = rgb_model(tmp_path)
    result = onnxlrp_cli("explain", model, tmp_path / "wide.png", "-o", tmp_path / "out", "--resize", "pad")
    assert result.returncode == 0, result.stderr
    padded = np.zeros((16, 16, 3), dtype=np.uint8)
    padded[4:11] = np.asarray(Image.fromarray(bands()).resize((16, 7), Image.Resampling.BILINEAR))
    x = (padded.astype(np.float32) / 255).transpose(2, 0, 1)[None]
    _, expected = run(onnx.load(str(model)), {"input": x})
    np.testing.assert_allclose(np.load(tmp_path / "out" / "wide.npy"), expected[0], rtol=1e-5, atol=1e-7)
    assert_one_line_error(onnxlrp_cli("explain", model, tmp_path / "wide.png", "-o", tmp_path / "bad", "--resize",
                                      "squash"), "--resize", "squash")


def test_target_by_class_name(tmp_path):
    """`--target eight` is class 8 of the digits model (its labels are in its metadata): the same line and files."""
    from onnxlrp.app.explain import explain_inputs
    by_name = explain_inputs(str(BUILT), [str(SAMPLES[0])], str(tmp_path / "name"), target="eight")
    by_number = explain_inputs(str(BUILT), [str(SAMPLES[0])], str(tmp_path / "number"), target=8)
    assert by_name == by_number and "explained 8 (eight)" in by_name[0]
    relevance = [np.load(tmp_path / folder / f"{SAMPLES[0].stem}.npy") for folder in ("name", "number")]
    np.testing.assert_array_equal(*relevance)

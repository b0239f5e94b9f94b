"""Images per second of `explain --format parquet`: in this process, and with Ray Data at 1 and 2 workers, on a
local Ray and on a simulated two-node cluster (ray.cluster_utils.Cluster: two nodes of one CPU on this machine).

    python bench/dataset.py [--models digits,alexnet] [--count 48] [--modes local,local1,ray1,ray2,cluster1,cluster2]

Data: the 450 held-out digits as PNG files (fixtures/digits/test.npz) for the digits CNN, and `--count` seeded
random 224 x 224 RGB PNG pictures for AlexNet (fixtures/zoo/alexnet.onnx with its seeded weights, a 224 x 224
CNN). Every run writes fresh shards (64 digits or 8 pictures each) to a temporary folder. Reported per run: the
time Ray took to start (or to join the simulated cluster), started before the run, and the run's wall time with
the images per second it gives (the workers' start, which loads the model into each, included).
Needs the `dataset` extra.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "fixtures"))
from seeded import materialize  # noqa: E402

import onnxlrp  # noqa: E402
from onnxlrp.app.dataset import explain_dataset, local_engine, read_shards  # noqa: E402
from onnxlrp.app.engine import ray_engine  # noqa: E402
from onnxlrp.app.inputs import parse_options  # noqa: E402

SHARDS = {"digits": 64, "alexnet": 8}  # samples per shard: several shards per worker


def digits(folder: Path) -> tuple[Path, list[Path], dict]:
    """The digits CNN (built) and the held-out digits as PNGs."""
    images = np.load(ROOT / "fixtures" / "digits" / "test.npz")["images"]
    (folder / "digits").mkdir()
    for k, picture in enumerate(images):
        Image.fromarray(picture).save(folder / "digits" / f"{k:04d}.png")
    return ROOT / "fixtures" / "digits" / "digits_epsilon_plus_flat.onnx", [folder / "digits"], {}


def alexnet(folder: Path, count: int) -> tuple[Path, list[Path], dict]:
    """AlexNet (224 x 224, seeded weights, built with epsilon_plus_flat) and `count` random RGB pictures."""
    model = folder / "alexnet_lrp.onnx"
    onnxlrp.save_atomic(onnxlrp.build(materialize(onnxlrp.load(ROOT / "fixtures" / "zoo" / "alexnet.onnx"))), model)
    rng = np.random.default_rng(0)
    (folder / "pictures").mkdir()
    for k in range(count):
        Image.fromarray(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)).save(folder / "pictures" / f"{k:04d}.png")
    return model, [folder / "pictures"], {"normalize": "imagenet"}


def measure(model: Path, data: list[Path], options: dict, engine, out: Path, threads: int | None,
            shard: int) -> tuple[int, float]:
    """Samples explained and the wall time of the run."""
    start = time.perf_counter()
    summary = explain_dataset(str(model), [str(p) for p in data], str(out), engine, shard_size=shard,
                              options=parse_options(**options), threads=threads, progress=False)
    return summary.samples, time.perf_counter() - start


def start_ray(address: str | None) -> float:
    """Start (or join) Ray before the run, so that its start is timed apart; the engine then leaves it running."""
    import logging
    import ray
    start = time.perf_counter()
    ray.init(address=address, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
    return time.perf_counter() - start


def two_nodes():
    """A simulated cluster: two Ray nodes of one CPU each on this machine."""
    from ray.cluster_utils import Cluster
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    return cluster


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="digits,alexnet")
    parser.add_argument("--count", type=int, default=96, help="Pictures for AlexNet.")
    parser.add_argument("--modes", default="local,local1,ray1,ray2,cluster1,cluster2")
    args = parser.parse_args()
    modes = args.modes.split(",")
    labels = {"local": "in-process, ONNX Runtime's default threads", "local1": "in-process, 1 thread",
              "ray1": "Ray (local), 1 worker of 1 CPU", "ray2": "Ray (local), 2 workers of 1 CPU",
              "cluster1": "Ray, 2-node cluster, 1 worker", "cluster2": "Ray, 2-node cluster, 2 workers"}
    with tempfile.TemporaryDirectory() as temporary:
        folder = Path(temporary)
        for name in args.models.split(","):
            model, data, options = digits(folder) if name == "digits" else alexnet(folder, args.count)
            reference = None
            cluster = None
            try:
                for mode in modes:  # the cluster starts after the local Ray runs (which would join it)
                    if mode.startswith("cluster") and cluster is None:
                        cluster = two_nodes()
                    engine = local_engine if mode.startswith("local") else \
                        ray_engine(cluster.address if cluster else None, int(mode[-1]))
                    started = 0.0 if mode.startswith("local") else start_ray(cluster.address if cluster else None)
                    out = folder / f"{name}-{mode}"
                    count, wall = measure(model, data, options, engine, out, 1 if mode == "local1" else None,
                                          SHARDS[name])
                    if not mode.startswith("local"):
                        import ray
                        ray.shutdown()
                    relevance = read_shards(out)["relevance"]
                    reference = relevance if reference is None else reference
                    differs = float(np.abs(relevance - reference).max() / np.abs(reference).max())
                    print(f"{name:8s} {labels[mode]:45s} {count:4d} images  Ray start {started:5.1f} s  run "
                          f"{wall:6.1f} s  {count / wall:7.1f} images/s  (max |dR| / max |R| {differs:.1e})",
                          flush=True)
            finally:
                if cluster is not None:
                    import ray
                    ray.shutdown()
                    cluster.shutdown()


if __name__ == "__main__":
    main()

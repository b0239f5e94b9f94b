"""The Ray engine of `explain --engine ray`: the pending shards as a Ray dataset of one row per shard, explained by
`map_batches` over a pool of actors that each hold one ONNX Runtime session (on CPU, or a GPU each), their rows
streamed back to the driver, which writes them (dataset.py).

Ray Data restarts an actor that dies and runs its batch again, so a lost worker or node loses nothing. Ray is
imported only here, only when asked for.
"""
from __future__ import annotations

import json
import logging
from collections import defaultdict
from dataclasses import asdict, replace
from typing import Iterator

import numpy as np

from ..errors import LrpError
from ..ir import interrupts
from ..ir.files import first_line
from .dataset import Engine, Item, Job, explain_shard
from .extras import require


class ShardExplainer:
    """A Ray Data actor: one Explainer (one session) for its life, explaining a batch of shards at a time."""

    def __init__(self, job: Job):
        self.job = job
        self.explainer = job.explainer()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        parts = []
        for number, items in zip(batch["shard"], batch["items"]):
            rows = explain_shard(self.explainer, self.job, [Item(**item) for item in json.loads(items)])
            rows["shard"] = np.full(len(rows["id"]), int(number), np.int64)
            parts.append(rows)
        return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}


def ray_engine(address: str | None = None, workers: int = 1, gpus_per_worker: float = 0.0,
               cpus_per_worker: float = 1.0) -> Engine:
    """An engine that runs on the Ray cluster at `address` (None: a local Ray started for the run and stopped
    after it) with `workers` actors of `cpus_per_worker` CPUs and `gpus_per_worker` GPUs each."""
    ray = require("ray", "--engine ray")
    require("ray.data", "--engine ray")

    def run(job: Job, shards: dict[int, list[Item]], _: object) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        """Every worker opens its own session from the job (the driver's Explainer stays unused)."""
        if ray.is_initialized():  # a caller's own Ray (the tests', the benchmark's) stays as it is
            yield from _explain(ray, job, shards, workers, gpus_per_worker, cpus_per_worker)
            return
        _connect(ray, address)
        try:
            with interrupts.stopped_with(ray.shutdown):  # Ctrl-C: a local Ray's processes stop with the command
                yield from _explain(ray, job, shards, workers, gpus_per_worker, cpus_per_worker)
        finally:
            ray.shutdown()
    return run


def _connect(ray: object, address: str | None) -> None:
    try:
        ray.init(address=address, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False,
                 configure_logging=True)
    except (ConnectionError, RuntimeError, ValueError) as error:
        raise LrpError(f"--address {address}: cannot connect to a Ray cluster ({first_line(error)})"
                       if address else f"cannot start a local Ray ({first_line(error)})") from None


def _explain(ray: object, job: Job, shards: dict[int, list[Item]], workers: int, gpus: float,
             cpus: float) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """Stream the shards through the actor pool; yield each shard once all its rows are back."""
    available = ray.cluster_resources()
    if workers * cpus > available.get("CPU", 0) or workers * gpus > available.get("GPU", 0):
        raise LrpError(f"--workers {workers}: the Ray cluster has {available.get('CPU', 0):g} CPU(s) and "
                       f"{available.get('GPU', 0):g} GPU(s), fewer than {workers} worker(s) of {cpus:g} CPU(s) "
                       f"and {gpus:g} GPU(s) each")
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # the driver's own progress goes to stderr
    context.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    device = "cuda" if gpus > 0 else job.device
    threads = job.threads if job.threads is not None else max(1, int(cpus))
    worker_job = replace(job, device=device, threads=threads)
    rows = [{"shard": number, "items": json.dumps([asdict(item) for item in items])}
            for number, items in shards.items()]
    dataset = ray.data.from_items(rows, override_num_blocks=len(rows)).map_batches(
        ShardExplainer, fn_constructor_kwargs={"job": worker_job}, batch_size=1, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=cpus, num_gpus=gpus or None)
    waiting = {number: len(items) for number, items in shards.items()}
    buffers: dict[int, list[dict[str, np.ndarray]]] = defaultdict(list)
    for batch in _batches(ray, dataset):
        for number in np.unique(batch["shard"]):
            chosen = batch["shard"] == number
            buffers[int(number)].append({name: values[chosen] for name, values in batch.items()})
            waiting[int(number)] -= int(chosen.sum())
            if waiting[int(number)] == 0:
                parts = buffers.pop(int(number))
                yield int(number), {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
    if any(waiting.values()):
        raise LrpError(f"Ray returned incomplete shards {sorted(k for k, v in waiting.items() if v)}")


def _batches(ray: object, dataset: object) -> Iterator[dict[str, np.ndarray]]:
    """The dataset's blocks as they come back; a failure of Ray (not of a sample: those are rows) as one line."""
    try:
        yield from dataset.iter_batches(batch_size=None, batch_format="numpy")
    except ray.exceptions.RayError as error:
        cause = getattr(error, "__cause__", None) or error
        raise LrpError(f"Ray: {type(cause).__name__}: {first_line(cause)}") from None

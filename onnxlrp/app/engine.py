"""The Ray engine: `run_on_actors`, any picklable actor class over rows of a Ray dataset, called by `map_batches` on a
pool of actors that each hold their ONNX Runtime sessions (on CPU, or a GPU each), the output streamed back to the
driver; `explain --engine ray` runs the pending shards on it (one row per shard, written by dataset.py), `evaluate
--engine ray` the batches of samples (evaluate.py).

Ray Data restarts an actor that dies and runs its batch again, so a lost worker or node loses nothing. Ray is
imported only here, only when asked for.
"""
from __future__ import annotations

import json
import logging
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import asdict, replace
from typing import Callable, Iterator

import numpy as np

from ..errors import LrpError
from ..ir import interrupts
from ..ir.files import first_line
from .dataset import Engine, Item, Job, explain_shard
from .extras import joined, require

# An actor class, its constructor's arguments and the rows: the actors' output batches, in the order they come back.
Actors = Callable[[type, dict[str, object], list[dict[str, object]]], Iterator[dict[str, np.ndarray]]]


class ShardExplainer:
    """A Ray Data actor: one Explainer (one session) for its life, explaining a batch of shards at a time."""

    def __init__(self, job: Job, device: str | None, threads: int):
        self.job = replace(job, device=device or job.device, threads=threads if job.threads is None else job.threads)
        self.explainer = self.job.explainer()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        parts = []
        for number, items in zip(batch["shard"], batch["items"]):
            rows = explain_shard(self.explainer, self.job, [Item(**item) for item in json.loads(items)])
            rows["shard"] = np.full(len(rows["id"]), int(number), np.int64)
            parts.append(rows)
        return joined(parts)


def run_on_actors(address: str | None = None, workers: int = 1, gpus_per_worker: float = 0.0,
                  cpus_per_worker: float = 1.0) -> Actors:
    """Run `actor(**arguments, device=..., threads=...)` on `workers` Ray Data actors of `cpus_per_worker` CPUs and
    `gpus_per_worker` GPUs each (device "cuda" when they have GPUs, else None: the caller's choice; threads: their
    CPUs), one row per call, on the Ray cluster at `address` (None: a local Ray started for the run, stopped after)."""
    ray = require("ray", "--engine ray")
    require("ray.data", "--engine ray")

    def run(actor: type, arguments: dict[str, object], rows: list[dict[str, object]]
            ) -> Iterator[dict[str, np.ndarray]]:
        with _connected(ray, address):
            yield from _map_rows(ray, actor, arguments, rows, workers, gpus_per_worker, cpus_per_worker)
    return run


def ray_engine(address: str | None = None, workers: int = 1, gpus_per_worker: float = 0.0,
               cpus_per_worker: float = 1.0) -> Engine:
    """An engine that explains the shards on `run_on_actors`'s workers, one row per shard."""
    actors = run_on_actors(address, workers, gpus_per_worker, cpus_per_worker)

    def run(job: Job, shards: dict[int, list[Item]], _: object) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        """Every worker opens its own session from the job (the driver's Explainer stays unused); each shard is
        yielded once all its rows are back."""
        rows = [{"shard": number, "items": json.dumps([asdict(item) for item in items])}
                for number, items in shards.items()]
        waiting = {number: len(items) for number, items in shards.items()}
        buffers: dict[int, list[dict[str, np.ndarray]]] = defaultdict(list)
        for batch in actors(ShardExplainer, {"job": job}, rows):
            for number in np.unique(batch["shard"]):
                chosen = batch["shard"] == number
                buffers[int(number)].append({name: values[chosen] for name, values in batch.items()})
                waiting[int(number)] -= int(chosen.sum())
                if waiting[int(number)] == 0:
                    yield int(number), joined(buffers.pop(int(number)))
        if any(waiting.values()):
            raise LrpError(f"Ray returned incomplete shards {sorted(k for k, v in waiting.items() if v)}")
    return run


@contextmanager
def _connected(ray: object, address: str | None) -> Iterator[None]:
    """Ray for the run: a caller's own Ray (the tests', the benchmark's) stays as it is; otherwise connected (or
    started) now and shut down after, or on Ctrl-C (a local Ray's processes stop with the command)."""
    if ray.is_initialized():
        yield
        return
    try:
        ray.init(address=address, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False,
                 configure_logging=True)
    except (ConnectionError, RuntimeError, ValueError) as error:
        raise LrpError(f"--address {address}: cannot connect to a Ray cluster ({first_line(error)})"
                       if address else f"cannot start a local Ray ({first_line(error)})") from None
    try:
        with interrupts.stopped_with(ray.shutdown):
            yield
    finally:
        ray.shutdown()


def _map_rows(ray: object, actor: type, arguments: dict[str, object], rows: list[dict[str, object]], workers: int,
              gpus: float, cpus: float) -> Iterator[dict[str, np.ndarray]]:
    """The rows (one block each) through the actor pool, one row per call; a cluster too small is one line first."""
    available = ray.cluster_resources()
    if workers * cpus > available.get("CPU", 0) or workers * gpus > available.get("GPU", 0):
        raise LrpError(f"--workers {workers}: the Ray cluster has {available.get('CPU', 0):g} CPU(s) and "
                       f"{available.get('GPU', 0):g} GPU(s), fewer than {workers} worker(s) of {cpus:g} CPU(s) "
                       f"and {gpus:g} GPU(s) each")
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # the driver's own progress goes to stderr
    context.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    placement = {"device": "cuda" if gpus > 0 else None, "threads": max(1, int(cpus))}
    dataset = ray.data.from_items(rows, override_num_blocks=len(rows)).map_batches(
        actor, fn_constructor_kwargs={**arguments, **placement}, batch_size=1, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=cpus, num_gpus=gpus or None)
    try:
        yield from dataset.iter_batches(batch_size=None, batch_format="numpy")
    except ray.exceptions.RayError as error:  # a failure of Ray (not of a sample: those are rows) as one line
        cause = getattr(error, "__cause__", None) or error
        raise LrpError(f"Ray: {type(cause).__name__}: {first_line(cause)}") from None

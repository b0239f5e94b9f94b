"""Explaining a dataset: DATA (folders of images, .npy batches, Parquet files) as numbered samples, cut into shards
that are explained one at a time (in this process, or by the Ray workers of engine.py) and written to
OUT/shard-00000.parquet ... beside a manifest of the arguments, so that a run started again skips the shards
already written. A sample that cannot be read is a row of OUT/failures.csv, never a silently dropped sample.

Only the driver writes OUT: a shard's rows come back from whichever worker explained it.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Callable, Iterable, Iterator, Sequence

import click
import numpy as np
import onnx
from PIL import Image

from ..api import Explainer, ModelInput
from ..errors import LrpError, LrpWarning
from ..ir.files import first_line
from ..ir.interrupts import temporary_files
from .explain import check_output_folder, labelled_target
from .extras import require
from .heatmaps import heatmap
from .inputs import (ARRAY_SUFFIX, IMAGE_SUFFIXES, Options, Preprocessing, collect, is_array, preprocessing, read_array,
                     read_image)

PARQUET_SUFFIX = ".parquet"
MANIFEST = "manifest.json"
FAILURES = "failures.csv"
HEATMAPS = "heatmaps"
SHARD_PREFIX = "shard-"
FAILURES_KEY = b"onnxlrp.failures"  # the shard's unreadable samples, in its Parquet schema metadata
MANIFEST_VERSION = 1


def _arrow() -> tuple[ModuleType, ModuleType]:
    return require("pyarrow", "Parquet output"), require("pyarrow.parquet", "Parquet output")


@dataclass(frozen=True)
class Item:
    """One sample: its id (the file as given, and the row), the file it is read from (absolute: a worker's working
    folder may be another), where in that file (-1: the whole file, else the row of an .npy batch or of a Parquet
    file), its label (-1: none)."""
    id: str
    path: str
    index: int = -1
    label: int = -1


@dataclass(frozen=True)
class Failure:
    """A sample (or a whole file) that could not be read: its id, file and why."""
    id: str
    file: str
    reason: str


@dataclass(frozen=True)
class Columns:
    """Which Parquet columns hold the samples and the labels (None: found by type, and `label` if present)."""
    data: str | None = None
    label: str | None = None


@dataclass
class Plan:
    """Every sample of DATA in order, the files that could not be opened, and whether any sample has a label."""
    items: list[Item] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)

    @property
    def labelled(self) -> bool:
        return any(item.label >= 0 for item in self.items)


def collect_data(paths: Sequence[str], outdir: Path) -> list[Path]:
    """The files named, and the images, .npy and .parquet files under the folders named (recursively, sorted),
    leaving out OUT."""
    return collect(paths, IMAGE_SUFFIXES | {ARRAY_SUFFIX, PARQUET_SUFFIX}, "images, .npy or .parquet files", outdir)


def plan(files: Sequence[Path], model_input: ModelInput, prep: Preprocessing | None, columns: Columns) -> Plan:
    """Number the samples of every file without reading the pictures: .npy headers and Parquet metadata are read
    (a file that cannot be opened is a failure), and their shapes checked against the model (a mismatch stops)."""
    found = Plan()
    for path in files:
        if path.suffix.lower() == PARQUET_SUFFIX:
            _plan_parquet(path, model_input, prep, columns, found)
        elif is_array(path):
            _plan_array(path, model_input, found)
        elif prep is None:
            raise LrpError(f"{path}: the model input '{model_input.name}' {model_input.shape_text} does not take "
                           "pictures (give preprocessed .npy arrays or a Parquet column of arrays)")
        else:
            found.items.append(Item(str(path), str(path.absolute())))
    seen: set[str] = set()
    for item in found.items:
        if item.id in seen:
            raise LrpError(f"{item.id}: named twice among the inputs")
        seen.add(item.id)
    return found


def _plan_array(path: Path, model_input: ModelInput, found: Plan) -> None:
    try:
        shape = np.load(path, mmap_mode="r", allow_pickle=False).shape
    except (OSError, ValueError) as error:
        found.failures.append(Failure(str(path), str(path), f"not a readable .npy array ({first_line(error)})"))
        return
    sample = model_input.shape[1:]
    fits = lambda dims: len(dims) == len(sample) and all(  # noqa: E731
        not isinstance(d, int) or d == n for d, n in zip(sample, dims))
    if fits(shape):
        found.items.append(Item(str(path), str(path.absolute())))
    elif len(shape) == len(sample) + 1 and fits(shape[1:]):
        found.items += [Item(f"{path}[{i}]", str(path.absolute()), i) for i in range(shape[0])]
    else:
        raise LrpError(f"{path}: shape {list(shape)} is neither one sample nor a batch of the model input "
                       f"'{model_input.name}' {model_input.shape_text}")


def _plan_parquet(path: Path, model_input: ModelInput, prep: Preprocessing | None, columns: Columns,
                  found: Plan) -> None:
    _, pq = _arrow()
    try:
        table_file = pq.ParquetFile(path)
        schema = table_file.schema_arrow
        data, label = _data_column(path, schema, columns), _label_column(path, schema, columns)
        labels = (table_file.read(columns=[label]).column(0).to_pylist() if label
                  else [None] * table_file.metadata.num_rows)
        first = table_file.read_row_group(0, columns=[data]).column(0)[0] if table_file.metadata.num_rows else None
    except LrpError:
        raise
    except Exception as error:  # pyarrow's errors have no common type
        found.failures.append(Failure(str(path), str(path), f"not a readable Parquet file ({first_line(error)})"))
        return
    if first is not None and _is_binary(schema.field(data).type) and prep is None:
        raise LrpError(f"{path}: column '{data}' holds pictures, which the model input '{model_input.name}' "
                       f"{model_input.shape_text} does not take")
    if first is not None and not _is_binary(schema.field(data).type):
        _as_sample(first, model_input, f"{path}: column '{data}'")
    if any(v is not None and not (isinstance(v, int) and v >= 0) for v in labels):
        raise LrpError(f"{path}: the label column '{label}' must hold class numbers (0, 1, ...)")
    found.items += [Item(f"{path}[{i}]", str(path.absolute()), i, -1 if v is None else v)
                    for i, v in enumerate(labels)]


def _is_binary(kind: object) -> bool:
    pa, _ = _arrow()
    return pa.types.is_binary(kind) or pa.types.is_large_binary(kind)


def _data_column(path: Path, schema: object, columns: Columns) -> str:
    """The column of pictures (encoded bytes) or arrays (lists, tensors): the one named, or the only such one."""
    pa, _ = _arrow()
    if columns.data is not None:
        if columns.data not in schema.names:
            raise LrpError(f"{path}: no column '{columns.data}' (columns: {', '.join(schema.names)})")
        return columns.data
    fitting = [f.name for f in schema if _is_binary(f.type) or pa.types.is_list(f.type)
               or pa.types.is_fixed_size_list(f.type) or isinstance(f.type, pa.ExtensionType)]
    if len(fitting) != 1:
        raise LrpError(f"{path}: {'no' if not fitting else 'more than one'} column of pictures or arrays "
                       f"({', '.join(fitting) or ', '.join(schema.names)}); name it with --column")
    return fitting[0]


def _label_column(path: Path, schema: object, columns: Columns) -> str | None:
    if columns.label is not None and columns.label not in schema.names:
        raise LrpError(f"{path}: no label column '{columns.label}' (columns: {', '.join(schema.names)})")
    return columns.label or ("label" if "label" in schema.names else None)


def _as_sample(value: object, model_input: ModelInput, where: str) -> np.ndarray:
    """A Parquet cell (nested lists or a tensor) as a batch of one model input, reshaped to the input's sample
    shape when it holds as many numbers."""
    array = value.to_numpy() if hasattr(value, "to_numpy") else np.asarray(value.as_py())
    fixed = model_input.shape[1:]
    if all(isinstance(d, int) for d in fixed) and array.size == int(np.prod(fixed)) and array.shape != fixed:
        array = array.reshape(fixed)
    if not (np.issubdtype(array.dtype, np.number)):
        raise LrpError(f"{where}: not an array of numbers")
    return model_input.fit(array[None], where)


@dataclass(frozen=True)
class Job:
    """What every worker needs to explain a shard: the built model, how to read and preprocess the samples, the
    class to explain, the batch size, the pooling of the stored relevance and the heatmap colormap (None: no
    heatmaps). Picklable: it travels to Ray's workers."""
    model: bytes
    prep: Preprocessing | None
    columns: Columns
    target: int | None = None
    batch_size: int = 16
    pool: int = 1
    cmap: str | None = None
    device: str = "cpu"
    threads: int | None = None

    def explainer(self) -> Explainer:
        return Explainer(onnx.load_from_string(self.model), device=self.device, threads=self.threads)


def explain_shard(explainer: Explainer, job: Job, items: Sequence[Item]) -> dict[str, np.ndarray]:
    """The rows of one shard, one per item, in order: failed reads have an `error` and zeros elsewhere."""
    inputs, errors = read_items(items, explainer.input, job)
    good = [k for k, x in enumerate(inputs) if x is not None]
    shape = pooled_shape(explainer.input, job.prep, job.pool)
    rows = {"predicted": np.zeros(len(items), np.int64), "explained": np.zeros(len(items), np.int64),
            "logit": np.zeros(len(items), np.float64), "relevance_sum": np.zeros(len(items), np.float64),
            "value": np.zeros(len(items), np.float64), "relevance": np.zeros((len(items), *shape), np.float32),
            "heatmap": np.full(len(items), b"", dtype=object)}
    for start in range(0, len(good), job.batch_size):
        chosen = good[start:start + job.batch_size]
        found = explainer.explanation(np.concatenate([inputs[k] for k in chosen]), job.target)
        for j, k in enumerate(chosen):
            relevance = found.relevance[j]
            rows["predicted"][k] = int(np.argmax(found.output[j]))
            rows["explained"][k] = int(found.classes[j])
            rows["logit"][k] = float(found.output[j][found.classes[j]])
            rows["relevance_sum"][k] = float(relevance.sum(dtype=np.float64))
            rows["value"][k] = float(found.values[j])
            rows["relevance"][k] = pool(relevance, job.prep, job.pool)
            if job.cmap is not None:
                rows["heatmap"][k] = _png(heatmap(relevance, job.cmap, channel_axis=_channel_axis(job.prep)))
    rows["id"] = np.array([item.id for item in items], dtype=object)
    rows["label"] = np.array([item.label for item in items], dtype=np.int64)
    rows["error"] = np.array(errors, dtype=object)
    return rows


def read_items(items: Sequence[Item], model_input: ModelInput, job: Job) -> tuple[list[np.ndarray | None], list[str]]:
    """Each item as a batch of one model input, or None and the reason it could not be read."""
    inputs: list[np.ndarray | None] = []
    errors: list[str] = []
    rows: dict[str, Rows] = {}
    for item in items:
        try:
            if item.path.lower().endswith(PARQUET_SUFFIX) and item.path not in rows:
                rows[item.path] = Rows(item.path, [i.index for i in items if i.path == item.path], job.columns)
            inputs.append(_read(item, model_input, job, rows))
            errors.append("")
        except LrpError as error:
            inputs.append(None)
            errors.append(str(error))
    return inputs, errors


class Rows:
    """The rows of a Parquet file that a shard needs, read once: the row groups holding them, data column only."""

    def __init__(self, path: str, indices: Sequence[int], columns: Columns):
        _, pq = _arrow()
        try:
            table_file = pq.ParquetFile(path)
            column = _data_column(Path(path), table_file.schema_arrow, columns)
            starts = np.cumsum([0] + [table_file.metadata.row_group(g).num_rows
                                      for g in range(table_file.num_row_groups)])
            group_of = {i: int(np.searchsorted(starts, i, side="right")) - 1 for i in indices}
            groups = sorted(set(group_of.values()))
            self.values = table_file.read_row_groups(groups, columns=[column]).column(0)
        except LrpError:
            raise
        except Exception as error:  # pyarrow's errors have no common type
            raise LrpError(f"{path}: not a readable Parquet file ({first_line(error)})") from None
        first = dict(zip(groups, np.cumsum([0] + [int(starts[g + 1] - starts[g]) for g in groups])))
        self.position = {i: int(first[g]) + i - int(starts[g]) for i, g in group_of.items()}

    def __getitem__(self, index: int) -> object:
        return self.values[self.position[index]]


def _read(item: Item, model_input: ModelInput, job: Job, rows: dict[str, Rows]) -> np.ndarray:
    path = Path(item.path)
    if path.suffix.lower() == PARQUET_SUFFIX:
        return _read_row(item, model_input, job, rows[item.path])
    if is_array(path):
        return read_array(path, model_input, None if item.index < 0 else item.index)
    return read_image(path, model_input, job.prep)[0]


def _read_row(item: Item, model_input: ModelInput, job: Job, rows: Rows) -> np.ndarray:
    """One row of a Parquet file: encoded picture bytes (preprocessed as an image file) or an array."""
    value = rows[item.index]
    encoded = value.as_py() if _is_binary(value.type) else None
    if encoded is not None:
        return read_image(io.BytesIO(encoded), model_input, job.prep, item.id)[0]
    return _as_sample(value, model_input, item.id)


def _channel_axis(prep: Preprocessing | None) -> int:
    return 2 if prep is not None and prep.layout == "nhwc" else 0


def pooled_shape(model_input: ModelInput, prep: Preprocessing | None, factor: int) -> tuple[int, ...]:
    """The shape of one sample's stored relevance: the input's (picture sizes from the preprocessing), its picture
    axes divided by `factor` (rounded up)."""
    picture = dict(zip(_picture_axes(prep), prep.size)) if prep is not None else {}
    shape = tuple(d if isinstance(d, int) else picture.get(k) for k, d in enumerate(model_input.shape[1:]))
    if None in shape:
        raise LrpError(f"the model input '{model_input.name}' {model_input.shape_text} has sizes left open: the "
                       "Parquet shards need one shape for every sample")
    if factor == 1:
        return shape
    axes = _picture_axes(prep)
    return tuple(-(-d // factor) if k in axes else d for k, d in enumerate(shape))


def _picture_axes(prep: Preprocessing | None) -> tuple[int, int]:
    if prep is None:
        raise LrpError("--pool: the model input is not a picture")
    return (0, 1) if prep.layout == "nhwc" else (1, 2)


def pool(relevance: np.ndarray, prep: Preprocessing | None, factor: int) -> np.ndarray:
    """The relevance summed over `factor` x `factor` blocks of pixels (zeros pad the last blocks), so that its
    total is kept; channels are kept."""
    if factor == 1:
        return relevance
    axes = _picture_axes(prep)
    padding = [(0, -d % factor if k in axes else 0) for k, d in enumerate(relevance.shape)]
    padded = np.pad(relevance.astype(np.float64), padding)
    blocks: list[int] = []
    for k, d in enumerate(padded.shape):
        blocks += [d // factor, factor] if k in axes else [d]
    summed = padded.reshape(blocks).sum(axis=(axes[0] + 1, axes[1] + 2))
    return summed.astype(np.float32)


def _png(picture: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(picture).save(buffer, format="PNG")
    return buffer.getvalue()


# An engine explains the shards it is given and yields (shard number, its rows), in any order; it may use the
# driver's Explainer (the job's model, device and threads) or make its own from the job.
Engine = Callable[[Job, dict[int, list[Item]], Explainer], Iterator[tuple[int, dict[str, np.ndarray]]]]


def local_engine(job: Job, shards: dict[int, list[Item]],
                 explainer: Explainer) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """Explain the shards one after another in this process, with the driver's Explainer."""
    for number, items in shards.items():
        yield number, explain_shard(explainer, job, items)


@dataclass(frozen=True)
class Summary:
    """What a run did: samples explained in all (by this run and before), shards computed now and found written,
    and the samples or files that could not be read."""
    samples: int
    computed: int
    skipped: int
    failures: int

    def line(self, outdir: str) -> str:
        failed = f"{self.failures} failure(s) in {Path(outdir) / FAILURES}" if self.failures else "no failures"
        return (f"wrote {outdir}: {self.samples} sample(s) explained in {self.computed + self.skipped} shard(s) "
                f"({self.computed} computed, {self.skipped} already written), {failed}")


def explain_dataset(model: str, data: Sequence[str], outdir: str, engine: Engine = local_engine, *,
                    target: int | str | None = None, batch_size: int = 16, device: str = "cpu", cmap: str = "bwr",
                    heatmaps: bool = False, options: Options = Options(), composite: str | None = None,
                    columns: Columns = Columns(), shard_size: int = 256, pooling: int = 1,
                    threads: int | None = None, progress: bool = True) -> Summary:
    """Explain every sample of DATA into Parquet shards under `outdir` (see the module's docstring); the model and
    DATA are checked before any work, shards already written by a run with the same arguments are kept, and a line
    per shard written goes to stderr (`progress`)."""
    _arrow()
    explainer = Explainer(model, device=device, composite=composite, threads=threads)
    target = labelled_target(target, explainer.classes, explainer.labels)
    prep = preprocessing(explainer.input, options)
    out = Path(outdir)
    found = plan(collect_data(data, out), explainer.input, prep, columns)
    if not found.items:
        raise LrpError("no sample could be read: " + "; ".join(f"{f.file}: {f.reason}" for f in found.failures[:3]))
    pooled_shape(explainer.input, prep, pooling)  # fixed sizes, and pictures to pool
    job = Job(explainer.model.SerializeToString(), prep, columns, target, batch_size, pooling,
              cmap if heatmaps else None, device, threads)
    shards = {k: found.items[start:start + shard_size]
              for k, start in enumerate(range(0, len(found.items), shard_size))}
    _open_output(out, _manifest(job, found, shard_size, options, composite))
    pending = {k: items for k, items in shards.items() if not shard_path(out, k).is_file()}
    totals, values = [], []
    done = len(found.items) - sum(len(items) for items in pending.values())
    for number, rows in (engine(job, pending, explainer) if pending else ()):
        _write_shard(out, number, rows, found.labelled, heatmaps)
        ok = rows["error"] == ""
        totals += list(rows["relevance_sum"][ok])
        values += list(rows["value"][ok])
        done += len(rows["id"])
        if progress:
            click.echo(f"explaining: {done} of {len(found.items)} samples ({shard_path(out, number).name})",
                       err=True)
    failures = found.failures + [f for k in shards for f in shard_failures(out, k)]
    _write_failures(out, failures)
    inflation = explainer.recorded.inflation(totals, values)
    if inflation is not None:
        warnings.warn(f"{model}: {inflation}", LrpWarning)
    unread = len(failures) - len(found.failures)
    return Summary(len(found.items) - unread, len(pending), len(shards) - len(pending), len(failures))


def shard_path(outdir: Path, number: int) -> Path:
    return Path(outdir) / f"{SHARD_PREFIX}{number:05d}{PARQUET_SUFFIX}"


def _manifest(job: Job, found: Plan, shard_size: int, options: Options, composite: str | None) -> dict:
    """What decides the shards' contents: the built model, the samples in order, and every option that changes a
    value (not the engine, workers or batch size)."""
    ids = hashlib.sha256("\n".join(f"{i.id}\t{i.label}" for i in found.items).encode()).hexdigest()
    return {"version": MANIFEST_VERSION, "model": hashlib.sha256(job.model).hexdigest(), "composite": composite,
            "samples": len(found.items), "ids": ids, "shard_size": shard_size, "target": job.target,
            "pool": job.pool, "heatmaps": job.cmap, "options": asdict(options), "columns": asdict(job.columns)}


def _open_output(out: Path, manifest: dict) -> None:
    """Create OUT with its manifest, or check that the manifest there is this run's (then its shards are kept)."""
    check_output_folder(out)
    path = out / MANIFEST
    text = json.dumps(manifest, indent=1, sort_keys=True)
    if path.is_file():
        try:
            same = json.loads(path.read_text()) == json.loads(text)
        except (OSError, ValueError):
            same = False
        if not same:
            raise LrpError(f"{out}: holds the shards of a run with other arguments or data ({MANIFEST}); "
                           "choose another folder or empty it")
        return
    if out.is_dir() and any(out.glob(f"{SHARD_PREFIX}*{PARQUET_SUFFIX}")):
        raise LrpError(f"{out}: holds shards without a {MANIFEST}; choose another folder or empty it")
    out.mkdir(exist_ok=True)
    _write_atomic(path, text.encode())


def _write_atomic(path: Path, data: bytes) -> None:
    try:
        with temporary_files(path.parent, 1) as (temporary,):
            temporary.write_bytes(data)
            os.replace(temporary, path)
    except OSError as error:
        raise LrpError(f"{path}: cannot write ({error.strerror or error})") from None


def _write_shard(out: Path, number: int, rows: dict[str, np.ndarray], labelled: bool, heatmaps: bool) -> None:
    """The shard's explained rows as a Parquet file (its failures in the schema's metadata), written atomically
    after its heatmaps."""
    pa, pq = _arrow()
    ok = np.asarray(rows["error"] == "")
    ids = [str(i) for i in rows["id"][ok]]
    if heatmaps:
        (out / HEATMAPS).mkdir(exist_ok=True)
        for name, picture in zip(ids, rows["heatmap"][ok]):
            _write_atomic(out / HEATMAPS / heatmap_name(name), bytes(picture))
    relevance = np.ascontiguousarray(np.asarray(rows["relevance"])[ok], dtype=np.float32)
    arrays = {"id": pa.array(ids, pa.string()),
              "label": pa.array([None if v < 0 else int(v) for v in rows["label"][ok]], pa.int64()),
              "predicted": pa.array(rows["predicted"][ok], pa.int64()),
              "explained": pa.array(rows["explained"][ok], pa.int64()),
              "logit": pa.array(rows["logit"][ok], pa.float64()),
              "relevance_sum": pa.array(rows["relevance_sum"][ok], pa.float64()),
              "relevance": _tensors(relevance)}
    if not labelled:
        del arrays["label"]
    failures = [asdict(Failure(str(i), str(i), str(e))) for i, e in zip(rows["id"][~ok], rows["error"][~ok])]
    table = pa.table(arrays).replace_schema_metadata({FAILURES_KEY: json.dumps(failures).encode()})
    path = shard_path(out, number)
    try:
        with temporary_files(out, 1) as (temporary,):
            pq.write_table(table, temporary)
            os.replace(temporary, path)
    except OSError as error:
        raise LrpError(f"{path}: cannot write ({error.strerror or error})") from None


def _tensors(values: np.ndarray) -> object:
    """A float32 array [N, ...] as Arrow's fixed-shape tensor column (empty ones too)."""
    pa, _ = _arrow()
    storage = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), int(np.prod(values.shape[1:])))
    return pa.ExtensionArray.from_storage(pa.fixed_shape_tensor(pa.float32(), list(values.shape[1:])), storage)


def heatmap_name(sample_id: str) -> str:
    """The heatmap file of a sample: its id with every character but letters, digits and - as _, then .png."""
    return "".join(c if c.isalnum() or c == "-" else "_" for c in sample_id.lstrip("./")).strip("_") + ".png"


def shard_failures(outdir: Path, number: int) -> list[Failure]:
    """The samples of a written shard that could not be read."""
    _, pq = _arrow()
    metadata = pq.read_schema(shard_path(outdir, number)).metadata or {}
    return [Failure(**f) for f in json.loads(metadata.get(FAILURES_KEY, b"[]"))]


def _write_failures(out: Path, failures: Iterable[Failure]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["id", "file", "reason"])
    writer.writerows([f.id, f.file, f.reason] for f in failures)
    _write_atomic(out / FAILURES, buffer.getvalue().encode())


def read_shards(out_dir: str | Path) -> dict[str, np.ndarray]:
    """Every row of the shards in `out_dir`, in sample order, as columns: id (str), label (int64; only when the
    data had labels, -1 where a sample has none), predicted, explained (int64), logit, relevance_sum (float64),
    relevance (float32 [N, ...], pooled when the run pooled it)."""
    pa, pq = _arrow()
    paths = sorted(Path(out_dir).glob(f"{SHARD_PREFIX}[0-9]*{PARQUET_SUFFIX}"))
    if not paths:
        raise LrpError(f"{out_dir}: no shards ({SHARD_PREFIX}00000{PARQUET_SUFFIX} ...)")
    try:
        table = pa.concat_tables([pq.read_table(p) for p in paths])
    except Exception as error:  # pyarrow's errors have no common type
        raise LrpError(f"{out_dir}: cannot read the shards ({first_line(error)})") from None
    columns: dict[str, np.ndarray] = {}
    for name in table.column_names:
        column = table.column(name).combine_chunks()
        if name == "relevance":
            columns[name] = column.to_numpy_ndarray().astype(np.float32, copy=False)
        elif name == "id":
            columns[name] = np.array(column.to_pylist(), dtype=object)
        else:
            columns[name] = column.fill_null(-1).to_numpy(zero_copy_only=False)
    return columns

"""Prove that two checkouts of onnxlrp build the same models: every committed fixture under every preset.

Why: a refactoring that only moves code (files into packages, renamed modules) must not change a single built
model. This script builds every committed ONNX model under `fixtures/` (fixtures/*.onnx, zoo, transformers with
hf and keras, twins, quantized, digits; files that already are LRP graphs, with a `relevance` output, are
skipped) with every preset of `onnxlrp.preset_names()`, runs each built model in ONNX Runtime and records every
output (the model's own outputs, `relevance`, `relevance_embedding`, ...). Recording it once per checkout and
comparing the two recordings shows that the relevance and outputs agree (to 1e-7 relative by default), and that
a model + preset which one checkout refuses the other refuses with the same one-line message.

    python bench/compare_checkouts.py record CHECKOUT OUT.npz [--only SUBSTRING]
    python bench/compare_checkouts.py compare BEFORE.npz AFTER.npz [--tolerance 1e-7] [--only SUBSTRING]
    python bench/compare_checkouts.py BEFORE_CHECKOUT AFTER_CHECKOUT [--only SUBSTRING] [--tolerance 1e-7]

`record` builds each model in a fresh Python process with PYTHONPATH=CHECKOUT (one per model: ONNX Runtime keeps
memory from session to session, over 14 GB after MaxViT's 14 presets), and that process imports the checkout's
`onnxlrp` only: packages that CHECKOUT/pyproject.toml maps elsewhere (`onnxlrp.presets` = "rules") are imported from
the checkout, never from an installed (editable) copy, and every `onnxlrp` module loaded is checked to lie under
CHECKOUT. PYTHONHASHSEED is 0 in that process unless set by the caller, so that set iteration order is reproducible.
The models and their inputs do not come from the checkout: they are read from `--fixtures` (by default the fixtures/
next to this script), weights committed as seeds (fixtures/seeded.py) are drawn once, and each model's input is
drawn from a generator seeded by its file name:

* float inputs: standard normal, batch 2, other open dimensions 8 for token-like rank-2 inputs and 32 otherwise;
* integer inputs: `*mask*` ones with the second text padded after 5 tokens (as the text-model tests feed them),
  `*type*` zeros, anything else token ids in [3, vocabulary) where the vocabulary is the row count of the
  embedding table the ids index (50 if none is found); sequence length 8.

The inputs are stored too (preset `#input`), so that comparing two recordings also checks that both runs were
fed the same. ONNX Runtime runs on the CPU with one thread (bit-reproducible on one machine). The `target` input
keeps its default (the largest logit).

OUT.npz holds `model|preset|output` arrays (model: the path under fixtures/); a model + preset that fails to
build or to run holds `model|preset|error`, a one-line message as a string array. `compare` prints one line per
model and preset with the largest relative error ||after - before|| / ||before|| over its outputs (the largest
|after| where before is all zeros), flags errors above the tolerance, keys found in one recording only and
differing error messages, prints a summary and exits with status 1 when anything differs.

Needs only numpy, onnx and onnxruntime (and the checkouts' own dependencies).
"""
from __future__ import annotations

import argparse
import importlib.abc
import importlib.machinery
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
import tomllib
import zlib
from collections import defaultdict
from pathlib import Path
from types import ModuleType
from typing import Sequence

import numpy as np
import onnx
import onnxruntime as ort

HERE = Path(__file__).resolve().parent
DEFAULT_FIXTURES = HERE.parent / "fixtures"
SEP = "|"
INPUT = "#input"  # the preset slot under which a model's fed inputs are stored
ERROR = "error"  # the output slot of a model + preset that failed to build or to run
BATCH = 2
SEQUENCE = 8  # open dimensions of integer (token) inputs and of rank-2 float inputs
SPATIAL = 32  # other open dimensions of float inputs
PADDED_LENGTH = 5  # the second text of a batch is padded after this many tokens
FIRST_TOKEN = 3  # token ids start here: 0, 1 and 2 are special (padding, start, end) in most vocabularies
DEFAULT_VOCABULARY = 50
WORKER = "_record_worker"


# ---------------------------------------------------------------------------------------------------------------
# Models and inputs: from the fixtures only, never from a checkout's code.

def fixture_models(fixtures: Path, only: str | None) -> list[Path]:
    """Every committed *.onnx under `fixtures`, sorted, whose path contains `only` (if given)."""
    paths = sorted(p for p in fixtures.rglob("*.onnx") if p.is_file())
    return [p for p in paths if only is None or only in p.relative_to(fixtures).as_posix()]


def is_lrp_graph(model: onnx.ModelProto) -> bool:
    return any(output.name == "relevance" for output in model.graph.output)


def load_seeded(fixtures: Path) -> ModuleType:
    """fixtures/seeded.py (numpy and onnx only), which draws the weights that large fixtures leave out."""
    spec = importlib.util.spec_from_file_location("_fixtures_seeded", fixtures / "seeded.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def source_model(path: Path, seeded: ModuleType) -> tuple[onnx.ModelProto, bool]:
    """The model as committed, with its seeded weights drawn; and whether it had any."""
    model = onnx.load(str(path))
    if any(t.doc_string == seeded.MARK for t in model.graph.initializer):
        return seeded.materialize(model), True
    return model, False


def _vocabulary(model: onnx.ModelProto, name: str) -> int:
    """Rows of the table that a Gather indexes with graph input `name` (through Cast/Unsqueeze/Reshape too)."""
    shapes = {t.name: list(t.dims) for t in model.graph.initializer}
    reached = {name}
    for node in model.graph.node:  # nodes are in topological order
        if node.op_type in ("Cast", "Unsqueeze", "Reshape", "Flatten", "Squeeze") and node.input[0] in reached:
            reached.update(node.output)
        if node.op_type == "Gather" and len(node.input) == 2 and node.input[1] in reached \
                and node.input[0] in shapes and shapes[node.input[0]]:
            return int(shapes[node.input[0]][0])
    return DEFAULT_VOCABULARY


def model_inputs(model: onnx.ModelProto, key: str) -> dict[str, np.ndarray]:
    """A deterministic input for every graph input of the source model (seeded by the model's key)."""
    rng = np.random.default_rng(zlib.crc32(key.encode()))
    initializers = {t.name for t in model.graph.initializer}
    feeds: dict[str, np.ndarray] = {}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tensor = value.type.tensor_type
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type)
        integer = np.issubdtype(dtype, np.integer)
        dims = list(tensor.shape.dim)
        shape = []
        for axis, dim in enumerate(dims):
            if dim.HasField("dim_value") and dim.dim_value > 0:
                shape.append(dim.dim_value)
            elif axis == 0:
                shape.append(BATCH)
            else:
                shape.append(SEQUENCE if integer or len(dims) == 2 else SPATIAL)
        lowered = value.name.lower()
        if not integer:
            feeds[value.name] = rng.standard_normal(shape).astype(dtype)
        elif "mask" in lowered:
            mask = np.ones(shape, dtype)
            if len(shape) == 2 and shape[0] > 1 and shape[1] > PADDED_LENGTH:
                mask[1, PADDED_LENGTH:] = 0
            feeds[value.name] = mask
        elif "type" in lowered:
            feeds[value.name] = np.zeros(shape, dtype)
        else:
            high = _vocabulary(model, value.name)
            feeds[value.name] = rng.integers(min(FIRST_TOKEN, high - 1), high, shape).astype(dtype)
    return feeds


# ---------------------------------------------------------------------------------------------------------------
# The recording process: imports the checkout's onnxlrp and nothing else of it.

class _CheckoutFinder(importlib.abc.MetaPathFinder):
    """Imports the packages that the checkout's pyproject.toml maps to folders (package-dir) from those folders,
    ahead of any installed or editable copy of onnxlrp."""

    def __init__(self, mapping: dict[str, Path]):
        self.mapping = mapping

    def find_spec(self, fullname: str, path: Sequence[str] | None = None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        folder = self.mapping.get(fullname)
        if folder is None:
            return None
        init = folder / "__init__.py"
        if init.is_file():
            return importlib.util.spec_from_file_location(fullname, init, submodule_search_locations=[str(folder)])
        spec = importlib.machinery.ModuleSpec(fullname, None, is_package=True)
        spec.submodule_search_locations = [str(folder)]
        return spec


def _package_dirs(checkout: Path) -> dict[str, Path]:
    pyproject = checkout / "pyproject.toml"
    if not pyproject.is_file():
        return {}
    config = tomllib.loads(pyproject.read_text()).get("tool", {}).get("setuptools", {})
    return {name: (checkout / folder).resolve() for name, folder in config.get("package-dir", {}).items()
            if name}


def import_checkout(checkout: Path) -> ModuleType:
    """The checkout's onnxlrp (its presets included), or SystemExit if anything of it comes from elsewhere."""
    sys.meta_path.insert(0, _CheckoutFinder(_package_dirs(checkout)))
    import onnxlrp
    onnxlrp.preset_names()  # imports the presets package
    _check_modules(checkout)
    return onnxlrp


def _check_modules(checkout: Path) -> None:
    """Every loaded onnxlrp module lies under the checkout."""
    for name, module in sorted(sys.modules.items()):
        if name != "onnxlrp" and not name.startswith("onnxlrp."):
            continue
        locations = [getattr(module, "__file__", None)] + list(getattr(module, "__path__", []) or [])
        for location in filter(None, locations):
            if not Path(location).resolve().is_relative_to(checkout):
                raise SystemExit(f"record: {name} was imported from {location}, not from {checkout}")


def _session_options() -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    return options


def _as_array(value: object) -> np.ndarray:
    """An ONNX Runtime output as an array: a sequence of maps (scikit-learn's ZipMap) as rows of values by key."""
    if isinstance(value, np.ndarray):
        return value
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        return np.array([[row[k] for k in sorted(row)] for row in value])
    return np.asarray(value)


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


def record_worker(checkout: Path, out: Path, fixtures: Path, model_key: str) -> None:
    """Build and run one fixture under every preset with the checkout's onnxlrp; save its arrays to `out`."""
    ort.set_default_logger_severity(3)  # no optimizer warnings: one line per model and preset
    onnxlrp = import_checkout(checkout)
    if not Path(onnxlrp.__file__).resolve().is_relative_to(checkout):
        raise SystemExit(f"record: onnxlrp was imported from {onnxlrp.__file__}, not from {checkout}")
    options = _session_options()
    model, had_seeds = source_model(fixtures / model_key, load_seeded(fixtures))
    feeds = model_inputs(model, model_key)
    results = {SEP.join((model_key, INPUT, name)): array for name, array in feeds.items()}
    serialized = model.SerializeToString() if had_seeds else None
    del model
    os.chdir(fixtures)  # paths given to build (and named in its messages) are relative to fixtures/
    for preset in onnxlrp.preset_names():
        tick = time.perf_counter()
        stage = "build"
        try:
            if serialized is None:
                built = onnxlrp.build(model_key, preset)
            else:
                fresh = onnx.ModelProto()
                fresh.ParseFromString(serialized)
                built = onnxlrp.build(fresh, preset, source=model_key)
            stage = "run"
            session = ort.InferenceSession(built.SerializeToString(), options, providers=["CPUExecutionProvider"])
            names = [o.name for o in session.get_outputs()]
            outputs = session.run(names, feeds)
        except Exception as error:  # a refusal (LrpError) or a failure: recorded, compared as text
            message = f"{stage}: {_one_line(error)}"
            results[SEP.join((model_key, preset, ERROR))] = np.array(message)
            print(f"record: {model_key} {preset}: {message}", file=sys.stderr)
            continue
        for name, value in zip(names, outputs):
            results[SEP.join((model_key, preset, name))] = _as_array(value)
        print(f"record: {model_key} {preset}: {time.perf_counter() - tick:.1f} s", file=sys.stderr)
    _check_modules(checkout)
    np.savez(out, **results)


def record(checkout: Path, out: Path, fixtures: Path, only: str | None) -> int:
    """Record every fixture (whose path contains `only`) with the checkout into `out`: one fresh process per
    model, whose PYTHONPATH is the checkout (a process per model also bounds the memory a long run holds).
    Returns the number of models whose process failed (recorded as `model|#worker|error`)."""
    checkout, out, fixtures = checkout.resolve(), out.resolve(), fixtures.resolve()
    if not (checkout / "onnxlrp").is_dir() and not _package_dirs(checkout).get("onnxlrp"):
        raise SystemExit(f"record: {checkout} has no onnxlrp package")
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    env.setdefault("PYTHONHASHSEED", "0")
    started = time.perf_counter()
    results: dict[str, np.ndarray] = {}
    failed = 0
    print(f"record: {checkout} with fixtures from {fixtures}", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="compare_checkouts_") as folder:
        for path in fixture_models(fixtures, only):
            key = path.relative_to(fixtures).as_posix()
            if is_lrp_graph(onnx.load(str(path), load_external_data=False)):
                print(f"record: {key}: skipped (already an LRP graph)", file=sys.stderr)
                continue
            part = Path(folder) / "model.npz"
            command = [sys.executable, str(Path(__file__).resolve()), WORKER, str(checkout), str(part),
                       "--fixtures", str(fixtures), "--model", key]
            status = subprocess.run(command, env=env, cwd=folder).returncode
            if status or not part.is_file():
                failed += 1
                message = f"record process failed (exit status {status})"
                results[SEP.join((key, "#worker", ERROR))] = np.array(message)
                print(f"record: {key}: {message}", file=sys.stderr)
            else:
                with np.load(part) as arrays:
                    results.update({name: arrays[name] for name in arrays.files})
            part.unlink(missing_ok=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, **results)
    keys = [k.rsplit(SEP, 2) for k in results]
    pairs = {(m, p) for m, p, _ in keys if not p.startswith("#")}
    refusals = sum(o == ERROR and not p.startswith("#") for _, p, o in keys)
    print(f"record: {len(pairs)} model x preset pairs ({refusals} refused or failed), {failed} model processes "
          f"failed, in {time.perf_counter() - started:.0f} s -> {out}", file=sys.stderr)
    return failed


# ---------------------------------------------------------------------------------------------------------------
# Comparing two recordings.

def relative_error(after: np.ndarray, before: np.ndarray) -> float:
    """||after - before|| / ||before||, or max |after| where before is all zeros; inf if shapes differ."""
    if after.shape != before.shape or after.dtype.kind in "USO" or before.dtype.kind in "USO":
        return 0.0 if np.array_equal(after, before) else float("inf")
    if np.array_equal(after, before, equal_nan=True):
        return 0.0
    a, b = after.astype(np.float64), before.astype(np.float64)
    if not np.array_equal(np.isfinite(a), np.isfinite(b)) or np.any(a[~np.isfinite(a)] != b[~np.isfinite(b)]):
        return float("inf")
    finite = np.isfinite(b)
    a, b = a[finite], b[finite]
    norm = np.linalg.norm(b)
    return float(np.abs(a).max() if norm == 0 else np.linalg.norm(a - b) / norm)


def compare(before_path: Path, after_path: Path, tolerance: float, only: str | None = None) -> int:
    """Print one line per model and preset (whose model contains `only`, if given) and a summary; 1 if anything
    differs, else 0."""
    before, after = np.load(before_path), np.load(after_path)
    groups: dict[tuple[str, str], set[str]] = defaultdict(set)
    for key in set(before.files) | set(after.files):
        model, preset, output = key.rsplit(SEP, 2)
        if only is None or only in model:
            groups[model, preset].add(output)
    compared = inputs = over = refusals = 0
    worst, worst_at = 0.0, "-"
    for (model, preset), outputs in sorted(groups.items()):
        problems: list[str] = []
        largest = 0.0
        for output in sorted(outputs):
            key = SEP.join((model, preset, output))
            if key not in after.files or key not in before.files:
                problems.append(f"{output} only in {'before' if key in before.files else 'after'}")
                continue
            a, b = after[key], before[key]
            if output == ERROR:
                if str(a) != str(b):
                    problems.append(f"error differs: before '{b}', after '{a}'")
                continue
            error = relative_error(a, b)
            largest = max(largest, error)
            if not error <= tolerance:
                problems.append(f"{output} {error:.3g}")
        if preset == INPUT:
            inputs += 1
        else:
            compared += 1
            refusals += ERROR in outputs
        if largest > worst:
            worst, worst_at = largest, f"{model} {preset}"
        over += bool(problems)
        kind = "refused" if outputs == {ERROR} else f"{largest:.3g}"
        flag = "DIFFERS: " + "; ".join(problems) if problems else "ok"
        print(f"{model:45s} {preset:28s} {kind:>9s}  {flag}")
    print(f"summary: {compared} model x preset pairs ({refusals} refused) and {inputs} models' inputs compared, "
          f"{over} differ (tolerance {tolerance:g}); worst relative error {worst:.3g} at {worst_at}")
    return 1 if over else 0


# ---------------------------------------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="\n\n".join(__doc__.split("\n\n")[:3]),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="{record,compare,checkouts}")
    for name in ("record", WORKER):
        command = commands.add_parser(name, **({"help": "record one checkout"} if name == "record" else {}))
        command.add_argument("checkout", type=Path)
        command.add_argument("out", type=Path, help="the .npz file to write")
        if name == WORKER:
            command.add_argument("--model", required=True)
        else:
            command.add_argument("--only", help="only models whose path under fixtures/ contains this")
        command.add_argument("--fixtures", type=Path, default=DEFAULT_FIXTURES, help="default: %(default)s")
    command = commands.add_parser("compare", help="compare two recordings")
    command.add_argument("before", type=Path)
    command.add_argument("after", type=Path)
    command.add_argument("--tolerance", type=float, default=1e-7)
    command.add_argument("--only", help="only models whose path under fixtures/ contains this")
    command = commands.add_parser("checkouts", help="record two checkouts and compare (the default command)")
    command.add_argument("before", type=Path)
    command.add_argument("after", type=Path)
    command.add_argument("--only")
    command.add_argument("--fixtures", type=Path, default=DEFAULT_FIXTURES)
    command.add_argument("--tolerance", type=float, default=1e-7)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and not argv[0].startswith("-") and argv[0] not in ("record", "compare", "checkouts", WORKER):
        argv = ["checkouts"] + argv
    args = _parser().parse_args(argv)
    if args.command == WORKER:
        record_worker(args.checkout.resolve(), args.out.resolve(), args.fixtures.resolve(), args.model)
    elif args.command == "record":
        return 1 if record(args.checkout, args.out, args.fixtures, args.only) else 0
    elif args.command == "compare":
        return compare(args.before, args.after, args.tolerance, args.only)
    else:
        with tempfile.TemporaryDirectory(prefix="compare_checkouts_") as folder:
            before, after = Path(folder) / "before.npz", Path(folder) / "after.npz"
            failed = record(args.before, before, args.fixtures, args.only)
            failed += record(args.after, after, args.fixtures, args.only)
            return compare(before, after, args.tolerance) or (1 if failed else 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())

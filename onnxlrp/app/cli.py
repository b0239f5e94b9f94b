"""The `onnxlrp` command. Every failure ends as one line on stderr and a non-zero exit."""
from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import Callable, Sequence

import click

from ..api import DEVICES
from ..errors import LrpError, LrpWarning, printable
from ..ir import interrupts
from ..ir.files import load, save_atomic
from ..lrp.composite import load_composite
from ..lrp.rules import parse_value
from ..lrp.seed import EXPLAIN
from ..pipeline import build
from . import explain as explaining, inspect as inspection
from .heatmaps import CMAPS
from .inputs import NORMALIZE, RESIZE, parse_options
from .text import COLORS, explain_texts

FORMATS = ("files", "parquet")
ENGINES = ("local", "ray")


# How pictures become model inputs: the same options, parsed by inputs.parse_options, for `explain` and `check`.
PREPROCESSING = (
    click.option("--size", help="H,W the pictures are cropped to, when the model's input size is dynamic."),
    click.option("--normalize", type=click.Choice(sorted(NORMALIZE)), help="A preset --mean and --std."),
    click.option("--mean", help="Per-channel mean subtracted after scaling (comma-separated)."),
    click.option("--std", help="Per-channel standard deviation divided by after the mean (comma-separated)."),
    click.option("--scale", default="1/255", show_default=True, help="Factor applied to pixel values first."),
    click.option("--channels", type=click.Choice(("rgb", "bgr")), default="rgb", show_default=True),
    click.option("--layout", type=click.Choice(("nchw", "nhwc")), help="Input layout (default: from the model)."),
    click.option("--resize", type=click.Choice(tuple(RESIZE)), default="crop", show_default=True,
                 help="Pictures of another aspect ratio: cover and crop the centre, stretch, or fit and pad with "
                      "black."),
)


# Where the work runs, for `explain` (Parquet shards) and `evaluate` (batches of samples): see ray_options.
ENGINE = (
    click.option("--engine", type=click.Choice(ENGINES), default="local", show_default=True,
                 help="Where the work runs: in this process, or on Ray Data workers."),
    click.option("--address", help="Ray: the address of a running cluster (default: a local Ray for the run)."),
    click.option("--workers", type=click.IntRange(min=1),
                 help="Ray: how many workers (actors), each with its own ONNX Runtime sessions [default: 1]."),
    click.option("--cpus-per-worker", type=click.FloatRange(min=0, min_open=True),
                 help="Ray: CPUs each worker takes (and its ONNX Runtime threads) [default: 1]."),
    click.option("--gpus-per-worker", type=click.FloatRange(min=0),
                 help="Ray: GPUs each worker takes; above 0 the workers run on ONNX Runtime's CUDA provider "
                      "[default: 0]."),
)


# What only pictures take: the preprocessing above, the colormap and the overlay (refused with --text).
PICTURE_OPTIONS = ("size", "normalize", "mean", "std", "scale", "channels", "layout", "resize", "cmap", "overlay")


def preprocessing_options(command: Callable) -> Callable:
    """Add the preprocessing options to a command (which takes them as keyword arguments for parse_options)."""
    for option in reversed(PREPROCESSING):
        command = option(command)
    return command


def engine_options(command: Callable) -> Callable:
    """Add --engine and the Ray options to a command."""
    for option in reversed(ENGINE):
        command = option(command)
    return command


def ray_options(address: str | None, workers: int | None, cpus_per_worker: float | None,
                gpus_per_worker: float | None) -> dict[str, object]:
    """The Ray options by name, None where not given (for `_refuse`)."""
    return {"--address": address, "--workers": workers, "--cpus-per-worker": cpus_per_worker,
            "--gpus-per-worker": gpus_per_worker}


@click.group()
@click.version_option(package_name="onnxlrp")
def cli() -> None:
    """Turn ONNX classifiers into graphs that also compute their LRP relevance."""


@cli.command("build")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("-o", "--output", "out", required=True, type=click.Path(dir_okay=False),
              help="Where to write the model with the `relevance` output.")
@click.option("--composite", default="epsilon_plus_flat", show_default=True,
              help="A preset name or the path of a composite TOML file.")
@click.option("--epsilon", type=float, help="Epsilon of the epsilon rule.")
@click.option("--stabilizer", type=float, help="Epsilon of the stabilizer of every other rule (z+, gamma, norm ...).")
@click.option("--epsilon-scale", type=float,
              help="Adds this many times the root mean square of each layer's pre-activation to epsilon.")
@click.option("--gamma", type=float, help="Gamma of the gamma rule.")
@click.option("--alpha", type=float, help="Alpha of the alpha-beta rule.")
@click.option("--beta", type=float, help="Beta of the alpha-beta rule.")
@click.option("--low", help="Lowest input value of the zbox rule: a number or comma-separated per channel.")
@click.option("--high", help="Highest input value of the zbox rule: a number or comma-separated per channel.")
@click.option("--stiffness", type=float, help="Stiffness of the soft-min of a k-means logit over competitors, and "
                                             "(times gamma) of a one-class SVM's outlier score (NEON).")
@click.option("--explain", type=click.Choice(EXPLAIN), default="logit", show_default=True,
              help="What is explained: the target's logit, its log-odds, or a one-hot seed.")
@click.option("--classifier-output", help="Name of the model output to explain (default: first [N, C] output, "
                                           "else first [N, T, C]: a language model's logits).")
@click.option("--position", type=int, default=-1, show_default=True,
              help="For logits [N, T, V]: the position explained by default (the input `position` of the built "
                   "model); negative counts back from each sample's last token (-1: the next token after it).")
@click.option("--explain-input", help="Name of the model input to explain (default: found; token ids are explained "
                                      "at their embedding lookup).")
@click.option("--layer-relevance", is_flag=True,
              help="Add an output `relevance/<node>` with the relevance at the input of every linear layer.")
@click.option("--input-shape", multiple=True,
              help="[NAME:]DIMS, comma-separated sizes of a model input (a name such as N stays symbolic), for "
                   "inputs whose sizes the model leaves open; once per input.")
@click.option("--dtype", type=click.Choice(["float32", "float16"]), default="float32", show_default=True,
              help="float16: compute in half precision between float32 inputs and outputs (for GPUs).")
@click.option("--target-default/--no-target-default", default=True, show_default=True,
              help="Whether `target` may be left out (then -1: the predicted class). Without a default it is a "
                   "required input, for runtimes that take inputs with defaults for constants (OpenVINO, TensorRT).")
@click.option("--fold-weights", is_flag=True,
              help="Store the modified weights computed (a larger file) instead of computing them when a session "
                   "starts (a faster start).")
@click.option("--optimize-for", type=click.Choice(["cpu"]),
              help="Write ONNX Runtime's optimised model for this machine's CPU, its weights in OUT.data (the fastest "
                   "session start; the files are for ONNX Runtime on CPUs like this one).")
def build_command(model: str, out: str, composite: str, explain: str, classifier_output: str | None, position: int,
                  explain_input: str | None, layer_relevance: bool, input_shape: tuple[str, ...], dtype: str,
                  target_default: bool, fold_weights: bool, optimize_for: str | None, **rule_params) -> None:
    """Read MODEL, append the relevance graph, write it to OUT."""
    if Path(out).resolve() == Path(model).resolve():
        raise LrpError(f"{out}: the output path is the input model; choose another")
    if not Path(out).resolve().parent.is_dir():
        raise LrpError(f"{out}: the output folder does not exist")
    overrides = {k: parse_value(k, v, f"--{k}") for k, v in rule_params.items() if v is not None}
    chosen = load_composite(composite).with_params(overrides)
    built = build(load(model, read_weights=False), chosen, explain=explain, output=classifier_output, source=model,
                  layer_relevance=layer_relevance, input_shape=input_shape, target_default=target_default,
                  dtype=dtype, position=position, explain_input=explain_input, fold_weights=fold_weights,
                  optimize_for=optimize_for, weights_folder=Path(model).parent)
    save_atomic(built, out, external_data=optimize_for is not None)  # memory-mapped weights: a faster start
    click.echo(printable(f"wrote {out} (composite {chosen.name}, explains {explain})"))


@cli.command("check")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--input", "input_path", type=click.Path(dir_okay=False),
              help="An image, or a .npy array of one sample or a batch, read as `explain` reads its inputs "
                   "(default: a deterministic random input).")
@click.option("--target", type=int, help="The class to explain (default: the predicted class).")
@preprocessing_options
def check_command(model: str, input_path: str | None, target: int | None, **preprocess: str | None) -> None:
    """Run MODEL (built with --layer-relevance) and show, per linear layer, where relevance is lost."""
    from .check import check
    click.echo(check(model, input_path, target, parse_options(**preprocess)))


@cli.command("explain")
@click.argument("model", type=click.Path(dir_okay=False))
@click.argument("inputs", nargs=-1)
@click.option("-o", "--output", "outdir", required=True, type=click.Path(file_okay=False),
              help="Folder for STEM.npy (relevance) and STEM.png (heatmap) per input, STEM.html and STEM.json per "
                   "text, or the Parquet shards; created if missing.")
@click.option("--target", help="Class to explain for every input, by number or name (a token for a language model's "
                               "next token; default: each one's predicted class).")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--device", type=click.Choice(DEVICES), default="cpu", show_default=True,
              help="cuda only runs where ONNX Runtime's CUDA provider really loads.")
@click.option("--cmap", type=click.Choice(CMAPS), default="bwr", show_default=True, help="Heatmap colormap.")
@click.option("--overlay", is_flag=True, help="Blend the heatmap over the (preprocessed) picture.")
@preprocessing_options
@click.option("--labels", "labels_file", type=click.Path(dir_okay=False),
              help="Class names, one per line (default: from the model's metadata, if any).")
@click.option("--composite", help="Rules to build MODEL with, when it is a plain model (not built yet; default: "
                                  "epsilon_plus_flat, attnlrp for texts).")
@click.option("--text", "texts", multiple=True, help="A text to explain (instead of INPUT; repeat for several).")
@click.option("--text-file", "text_files", multiple=True, type=click.Path(dir_okay=False),
              help="A file of texts to explain, one per line (blank lines skipped; repeatable).")
@click.option("--tokenizer", type=click.Path(dir_okay=False),
              help="The model's tokenizer.json (Hugging Face tokenizers), for --text and --text-file.")
@click.option("--color", type=click.Choice(COLORS), default="auto", show_default=True,
              help="Colour the tokens of texts by relevance (auto: when stdout is a terminal).")
@click.option("--format", "output_format", type=click.Choice(FORMATS),
              help="files: STEM.npy and STEM.png per input; parquet: a dataset of Parquet shards (the default "
                   "with --engine ray or Parquet inputs).")
@engine_options
@click.option("--shard-size", type=click.IntRange(min=1),
              help="Parquet: samples per shard (the unit of work and of resuming) [default: 256].")
@click.option("--pool", type=click.IntRange(min=1),
              help="Parquet: store the relevance summed over POOL x POOL pixel blocks [default: 1].")
@click.option("--heatmaps", is_flag=True, help="Parquet: also write OUT/heatmaps/ID.png per sample.")
@click.option("--column", help="Parquet inputs: the column of pictures or arrays (default: the only such column).")
@click.option("--label-column", help="Parquet inputs: the column of labels (default: `label`, if present).")
def explain_command(model: str, inputs: tuple[str, ...], outdir: str, target: str | None, batch_size: int,
                    device: str, cmap: str, overlay: bool, labels_file: str | None, composite: str | None,
                    texts: tuple[str, ...], text_files: tuple[str, ...], tokenizer: str | None, color: str,
                    output_format: str | None, engine: str, address: str | None, workers: int | None,
                    cpus_per_worker: float | None, gpus_per_worker: float | None, shard_size: int | None,
                    pool: int | None, heatmaps: bool, column: str | None, label_column: str | None,
                    **preprocess: str | None) -> None:
    """Explain each INPUT (images, folders of them, .npy arrays, Parquet files), or texts, with MODEL; write
    relevance and heatmaps per input (pages for texts), or Parquet shards of a whole dataset."""
    options = parse_options(**preprocess)
    output_format = output_format or _default_format(engine, inputs)
    given = ray_options(address, workers, cpus_per_worker, gpus_per_worker)
    dataset_options = {"--engine ray": engine == "ray" or None, **given, "--shard-size": shard_size,
                       "--pool": pool, "--heatmaps": heatmaps or None, "--column": column,
                       "--label-column": label_column}
    if texts or text_files:
        _refuse({"--format parquet": output_format == "parquet" or None, **dataset_options}, "INPUT files")
        _refuse(_pictures(), "pictures")
        if inputs:
            raise LrpError("give INPUT files or --text/--text-file, not both")
        if tokenizer is None:
            raise LrpError("--text and --text-file need --tokenizer (the model's tokenizer.json)")
        colored = color == "always" or (color == "auto" and sys.stdout.isatty() and not os.environ.get("NO_COLOR"))
        for line in explain_texts(model, tokenizer, texts, text_files, outdir, target=target, batch_size=batch_size,
                                  device=device, labels_file=labels_file, composite=composite, color=colored):
            click.echo(line, color=colored)
        return
    if not inputs:
        raise LrpError("nothing to explain: give INPUT files, --text or --text-file")
    if tokenizer is not None:
        raise LrpError("--tokenizer is for --text and --text-file, not INPUT files")
    if output_format == "files":
        _refuse(dataset_options, "--format parquet")
        for line in explaining.explain_inputs(model, inputs, outdir, target=target, batch_size=batch_size,
                                              device=device, cmap=cmap, overlay=overlay, options=options,
                                              labels_file=labels_file, composite=composite):
            click.echo(line)
        return
    _refuse({"--overlay": overlay or None, "--labels": labels_file}, "--format files")
    if engine != "ray":
        _refuse(given, "--engine ray")
    from . import dataset
    chosen = dataset.local_engine
    if engine == "ray":
        from .engine import ray_engine
        chosen = ray_engine(address, workers or 1, gpus_per_worker or 0.0, cpus_per_worker or 1.0)
    summary = dataset.explain_dataset(model, inputs, outdir, chosen, target=target, batch_size=batch_size,
                                      device=device, cmap=cmap, heatmaps=heatmaps, options=options,
                                      composite=composite, columns=dataset.Columns(column, label_column),
                                      shard_size=shard_size or 256, pooling=pool or 1)
    click.echo(printable(summary.line(outdir)))


def _pictures() -> dict[str, object]:
    """The picture options given on the command line (colormap, overlay, preprocessing), which texts do not take."""
    context = click.get_current_context()
    return {parameter.opts[0]: True for parameter in context.command.params if parameter.name in PICTURE_OPTIONS
            and context.get_parameter_source(parameter.name) == click.core.ParameterSource.COMMANDLINE}


def _default_format(engine: str, inputs: Sequence[str]) -> str:
    """Parquet shards with Ray, and for Parquet inputs (a .parquet file, or a folder with .parquet files in it)."""
    parquet = any(Path(i).suffix.lower() == ".parquet" or Path(i).is_dir() and any(Path(i).glob("*.parquet"))
                  for i in inputs)
    return "parquet" if engine == "ray" or parquet else "files"


def _refuse(given: dict[str, object], where: str) -> None:
    """One line for the first option given (not None) that applies only `where`."""
    for name, value in given.items():
        if value is not None:
            raise LrpError(f"{name} applies to {where} only")


@cli.command("spray")
@click.argument("out", type=click.Path())
@click.option("-o", "--output", "report", required=True, type=click.Path(),
              help="The HTML report to write; the CSV of sample -> cluster goes beside it (REPORT's name, .csv).")
@click.option("--classes", help="Explained classes to analyse, comma-separated (default: every class with at least "
                                "4 samples).")
@click.option("--clusters", default="auto", show_default=True,
              help="'auto' (the largest eigengap) or the number of clusters.")
@click.option("--grid", type=int, default=8, show_default=True, help="Heatmaps are sum-pooled to GRID x GRID cells.")
@click.option("--neighbors", type=click.IntRange(min=1), default=10, show_default=True,
              help="Neighbours per sample in the affinity graph.")
def spray_command(out: str, report: str, classes: str | None, clusters: str, grid: int, neighbors: int) -> None:
    """Spectral relevance analysis (SpRAy) of the explanations in OUT (an .npz with `relevance` and `explained`,
    or a folder of explain's STEM.npy files): clusters of similar heatmaps per class, as an HTML report."""
    from . import extras, spray
    extras.check()
    arrays = spray.load(out)
    chosen = None if classes is None else _whole_numbers("--classes", classes)
    ids = arrays.get("id", arrays.get("ids"))
    result = spray.spray(arrays["relevance"], arrays["explained"], ids, arrays.get("inputs"), chosen, clusters, grid,
                         neighbors)
    for line in spray.write_report(result, report):
        click.echo(printable(line))


@cli.command("evaluate")
@click.argument("model", type=click.Path(dir_okay=False))
@click.argument("data", nargs=-1, required=True)
@click.option("-o", "--output", "outdir", required=True, type=click.Path(file_okay=False),
              help="Folder for faithfulness.csv and faithfulness.png; created if missing.")
@click.option("--composite", "composites", multiple=True,
              help="A composite to score (repeatable; default epsilon_plus_flat). MODEL must be a plain model.")
@click.option("--target", type=int, help="Class to explain for every input (default: each one's predicted class).")
@click.option("--features-in-step", type=click.IntRange(min=1),
              help="Pixel flipping: input features set per step (default: a 16th of them).")
@click.option("--patch-size", type=click.IntRange(min=1), default=8, show_default=True,
              help="Region perturbation: side of the square regions (Quantus's default).")
@click.option("--regions", type=click.IntRange(min=1), default=100, show_default=True,
              help="Region perturbation: how many regions are perturbed, most relevant first.")
@click.option("--fill", type=click.Choice(("black", "white", "mean", "zero")), default="black", show_default=True,
              help="What removed features become: the sample's minimum, maximum, mean (as Quantus), or 0.")
@click.option("--softmax", is_flag=True, help="Follow the softmax of the explained class, not its logit.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random order.")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True,
              help="Samples per forward run and per unit of work (a row on Ray).")
@engine_options
@preprocessing_options
def evaluate_command(model: str, data: tuple[str, ...], outdir: str, composites: tuple[str, ...],
                     target: int | None, features_in_step: int | None, patch_size: int, regions: int, fill: str,
                     softmax: bool, seed: int, batch_size: int, engine: str, address: str | None,
                     workers: int | None, cpus_per_worker: float | None, gpus_per_worker: float | None,
                     **preprocess: str | None) -> None:
    """Faithfulness of MODEL's explanations of DATA (images, folders of them, .npy arrays, read as `explain` reads
    them): pixel flipping and region perturbation per composite, against gradient x input and a random order;
    computed in this process or on Ray Data workers (--engine ray), the same numbers."""
    from . import evaluate as evaluation, extras
    extras.check()
    actors = None
    if engine == "ray":
        from .engine import run_on_actors
        actors = run_on_actors(address, workers or 1, gpus_per_worker or 0.0, cpus_per_worker or 1.0)
    else:
        _refuse(ray_options(address, workers, cpus_per_worker, gpus_per_worker), "--engine ray")
    chosen = list(composites) or ["epsilon_plus_flat"]
    explainers = evaluation.explainers(model, chosen)
    x = explaining.read_inputs(explainers[chosen[0]].input, data, parse_options(**preprocess))
    settings = evaluation.Settings(features_in_step, patch_size, regions, fill, softmax, seed, batch_size)
    results = evaluation.evaluate(explainers, x, chosen, settings, target, actors)
    title = f"{Path(model).name}: {len(x)} samples, fill {fill}, {'softmax' if softmax else 'logit'}"
    for line in evaluation.write(results, outdir, title):
        click.echo(printable(line))


def _whole_numbers(option: str, text: str) -> list[int]:
    """Comma-separated whole numbers, or one line naming the option."""
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise LrpError(f"{option} {text}: not comma-separated whole numbers") from None


@cli.command("inspect")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--composite", default="epsilon_plus_flat", show_default=True,
              help="A preset name or the path of a composite TOML file.")
def inspect_command(model: str, composite: str) -> None:
    """Show the rule and parameters each node of MODEL gets, folded BatchNorms, unsupported ops. Writes nothing."""
    click.echo(inspection.report(load(model), load_composite(composite), model))


def main() -> None:
    """Entry point: run the CLI, turning our errors and click's usage errors into one line on stderr, and our
    warnings into one line each."""
    interrupts.install()
    warnings.simplefilter("always", LrpWarning)
    warnings.showwarning = _warning(warnings.showwarning)
    import onnxruntime
    onnxruntime.set_default_logger_severity(3)  # constant folding's sessions would log optimizer notes
    try:
        cli.main(standalone_mode=False)
    except LrpError as error:
        sys.exit(_fail(str(error)))
    except click.exceptions.Abort:
        sys.exit(_fail("aborted"))
    except click.ClickException as error:
        sys.exit(_fail(error.format_message(), error.exit_code))
    except Exception as error:  # never a traceback for users; ONNXLRP_DEBUG=1 shows it
        if os.environ.get("ONNXLRP_DEBUG"):
            raise
        sys.exit(_fail(f"internal error: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"))


def _warning(other: Callable) -> Callable:
    """warnings.showwarning that prints an LrpWarning as one line on stderr (other warnings as Python does)."""
    def show(message, category, *rest) -> None:
        if issubclass(category, LrpWarning):
            click.echo(f"onnxlrp: warning: {printable(str(message).strip())}", err=True)
        else:
            other(message, category, *rest)
    return show


def _fail(message: str, code: int = 1) -> int:
    click.echo(f"onnxlrp: error: {printable(message.strip())}", err=True)
    return code


if __name__ == "__main__":
    main()

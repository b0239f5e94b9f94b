"""The `onnxlrp` command. Every failure ends as one line on stderr and a non-zero exit."""
from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import Callable

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


def preprocessing_options(command: Callable) -> Callable:
    """Add the preprocessing options to a command (which takes them as keyword arguments for parse_options)."""
    for option in reversed(PREPROCESSING):
        command = option(command)
    return command


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
@click.option("--explain", type=click.Choice(EXPLAIN), default="logit", show_default=True,
              help="What is explained: the target's logit, its log-odds, or a one-hot seed.")
@click.option("--classifier-output", help="Name of the model output to explain (default: first [N, C] output).")
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
def build_command(model: str, out: str, composite: str, explain: str, classifier_output: str | None,
                  layer_relevance: bool, input_shape: tuple[str, ...], dtype: str, target_default: bool,
                  fold_weights: bool, optimize_for: str | None, **rule_params) -> None:
    """Read MODEL, append the relevance graph, write it to OUT."""
    if Path(out).resolve() == Path(model).resolve():
        raise LrpError(f"{out}: the output path is the input model; choose another")
    if not Path(out).resolve().parent.is_dir():
        raise LrpError(f"{out}: the output folder does not exist")
    overrides = {k: parse_value(k, v, f"--{k}") for k, v in rule_params.items() if v is not None}
    chosen = load_composite(composite).with_params(overrides)
    built = build(load(model), chosen, explain=explain, output=classifier_output, source=model,
                  layer_relevance=layer_relevance, input_shape=input_shape, target_default=target_default,
                  dtype=dtype, fold_weights=fold_weights, optimize_for=optimize_for)
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
@click.argument("inputs", nargs=-1, required=True)
@click.option("-o", "--output", "outdir", required=True, type=click.Path(file_okay=False),
              help="Folder for STEM.npy (relevance) and STEM.png (heatmap) per input; created if missing.")
@click.option("--target", type=int, help="Class to explain for every input (default: each one's predicted class).")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--device", type=click.Choice(DEVICES), default="cpu", show_default=True,
              help="cuda only runs where ONNX Runtime's CUDA provider really loads.")
@click.option("--cmap", type=click.Choice(CMAPS), default="bwr", show_default=True, help="Heatmap colormap.")
@click.option("--overlay", is_flag=True, help="Blend the heatmap over the (preprocessed) picture.")
@preprocessing_options
@click.option("--labels", "labels_file", type=click.Path(dir_okay=False),
              help="Class names, one per line (default: from the model's metadata, if any).")
@click.option("--composite", help="Rules to build MODEL with, when it is a plain model (not built yet).")
def explain_command(model: str, inputs: tuple[str, ...], outdir: str, target: int | None, batch_size: int,
                    device: str, cmap: str, overlay: bool, labels_file: str | None, composite: str | None,
                    **preprocess: str | None) -> None:
    """Explain each INPUT (images, folders of them, .npy arrays) with MODEL; write relevance and heatmaps."""
    lines = explaining.explain_inputs(model, inputs, outdir, target=target, batch_size=batch_size, device=device,
                                      cmap=cmap, overlay=overlay, options=parse_options(**preprocess),
                                      labels_file=labels_file, composite=composite)
    for line in lines:
        click.echo(line)


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

"""The `onnxlrp` command. Every failure ends as one line on stderr and a non-zero exit."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from .builder import build
from .top import EXPLAIN
from .composite import load_composite, parse_value
from .errors import LrpError
from .io import load, save_atomic
from .precision import to_float16


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
@click.option("--gamma", type=float, help="Gamma of the gamma rule.")
@click.option("--alpha", type=float, help="Alpha of the alpha-beta rule.")
@click.option("--beta", type=float, help="Beta of the alpha-beta rule.")
@click.option("--low", help="Lowest input value of the zbox rule: a number or comma-separated per channel.")
@click.option("--high", help="Highest input value of the zbox rule: a number or comma-separated per channel.")
@click.option("--explain", type=click.Choice(EXPLAIN), default="logit", show_default=True,
              help="What is explained: the target's logit, its log-odds, or a one-hot seed.")
@click.option("--classifier-output", help="Name of the model output to explain (default: first [N, C] output).")
@click.option("--dtype", type=click.Choice(["float32", "float16"]), default="float32", show_default=True,
              help="float16: compute in half precision between float32 inputs and outputs (for GPUs).")
def build_command(model: str, out: str, composite: str, explain: str, classifier_output: str | None,
                  dtype: str, **rule_params) -> None:
    """Read MODEL, append the relevance graph, write it to OUT."""
    if Path(out).resolve() == Path(model).resolve():
        raise LrpError(f"{out}: the output path is the input model; choose another")
    if not Path(out).resolve().parent.is_dir():
        raise LrpError(f"{out}: the output folder does not exist")
    overrides = {k: parse_value(k, v, f"--{k}") for k, v in rule_params.items() if v is not None}
    chosen = load_composite(composite).with_params(overrides)
    built = build(load(model), chosen, explain=explain, output=classifier_output, source=model)
    if dtype == "float16":
        built = to_float16(built)
    save_atomic(built, out)
    click.echo(f"wrote {out} (composite {chosen.name}, explains {explain})")


def main() -> None:
    """Entry point: run the CLI, turning our errors and click's usage errors into one line on stderr."""
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


def _fail(message: str, code: int = 1) -> int:
    click.echo(f"onnxlrp: error: {' '.join(message.split())}", err=True)
    return code


if __name__ == "__main__":
    main()

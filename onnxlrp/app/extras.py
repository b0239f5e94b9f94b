"""What the dataset commands share: the optional `dataset` extra (Ray, pyarrow, scikit-learn, matplotlib), atomic
writes of reports, and matplotlib figures as PNG bytes."""
from __future__ import annotations

import importlib
import io
import os
from pathlib import Path
from types import ModuleType

import numpy as np

from ..errors import LrpError
from ..ir.interrupts import temporary_files, uninterrupted

INSTALL = "pip install 'onnxlrp[dataset]'"


def require(module: str, why: str = "this command") -> ModuleType:
    """Import a module of the `dataset` extra, or one line naming what needs it and the install command."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise LrpError(f"{module.split('.')[0]} is not installed: {why} needs the dataset extra ({INSTALL})") from None


def check() -> None:
    """Stop before any work when the extra is missing."""
    for module in ("sklearn", "matplotlib"):
        require(module)


def pyplot() -> ModuleType:
    """matplotlib's pyplot on the Agg backend (files only, no window)."""
    matplotlib = require("matplotlib")
    matplotlib.use("Agg")
    return require("matplotlib.pyplot")


def png(figure) -> bytes:
    """A matplotlib figure as PNG bytes; the figure is closed."""
    plt = pyplot()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()


def joined(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Batches of columns (the rows of actors, shards or workers) as one batch: each column concatenated."""
    return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}


def write_files(folder: Path, files: dict[str, bytes]) -> None:
    """Write the named files into `folder` under temporary names, then move them all into place at once: an error
    or a signal leaves none of them behind."""
    if not folder.is_dir():
        raise LrpError(f"{folder}: the output folder does not exist")
    try:
        with temporary_files(folder, len(files)) as temporary:
            for path, data in zip(temporary, files.values()):
                path.write_bytes(data)
            with uninterrupted():
                for path, name in zip(temporary, files):
                    os.replace(path, folder / name)
    except OSError as error:
        raise LrpError(f"{folder}: cannot write the report ({error.strerror or error})") from None

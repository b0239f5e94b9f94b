"""Reading and writing model files: one clear error when a file cannot be read, atomic writes."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import onnx

from .errors import LrpError
from .graph import opset_of
from .validate import check_model_structure

# Protobuf's limit for one file; larger models keep their weights in an external data file.
MAX_SINGLE_FILE = 2**31 - 2**24


def load(path: str | Path) -> onnx.ModelProto:
    """Read an ONNX model (external data included) or raise an LrpError saying why not."""
    path = Path(path)
    if not path.is_file():
        raise LrpError(f"{path}: no such file")
    try:
        model = onnx.load(str(path))
    except Exception as error:  # protobuf and external-data errors have no common type
        raise LrpError(f"{path}: not a readable ONNX model ({first_line(error)})") from None
    if not model.graph.node or not model.opset_import:
        raise LrpError(f"{path}: not an ONNX model (no graph nodes or no opset)")
    check_model_structure(model, str(path))
    return model


def save_atomic(model: onnx.ModelProto, path: str | Path) -> None:
    """Check the model, write it next to `path` under a temporary name, then move it into place."""
    path = Path(path)
    try:
        onnx.checker.check_model(model, full_check=False)
    except onnx.checker.ValidationError as error:
        raise LrpError(f"internal error: the built graph is invalid ({first_line(error)})") from None
    temporary = None
    try:
        handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(handle)
        if model.ByteSize() > MAX_SINGLE_FILE:
            onnx.save(model, temporary, save_as_external_data=True, location=f"{path.name}.data")
        else:
            onnx.save(model, temporary)
        os.replace(temporary, path)
    except OSError as error:
        raise LrpError(f"{path}: cannot write the model ({error.strerror or error})") from None
    finally:
        if temporary and os.path.exists(temporary):
            os.unlink(temporary)


def ir_version_for(model: onnx.ModelProto, source_ir: int) -> int:
    """The source model's IR version (which its runtime loads), raised only as far as the opset requires.

    onnx stamps its newest IR version by default, which ONNX Runtime may not read yet.
    """
    opset = opset_of(model)
    return max(source_ir, min(ir for _, ir, ops, *_ in onnx.helper.VERSION_TABLE if ops >= opset))


def first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0][:300]

"""Reading and writing model files: one clear error when a file cannot be read, atomic writes that never touch
the input's files, and models over 2 GB written with their weights in an external data file."""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper
from onnx.external_data_helper import ExternalDataInfo, _get_all_tensors, uses_external_data

from ..errors import LrpError
from .graph import opset_of
from .interrupts import temporary_files, uninterrupted
from .validate import check_model_structure

# Protobuf's limit for one file; larger models keep their weights in an external data file.
MAX_SINGLE_FILE = 2**31 - 2**24
# Tensors at least this large go to the external data file (when there is one), each at an aligned offset.
EXTERNAL_MIN_BYTES = 1024
ALIGNMENT = 4096
# The files every `load` read (device, inode): a model and its external data. `save_atomic` never replaces them.
_read_files: set[tuple[int, int]] = set()


def load(path: str | Path, read_weights: bool = True) -> onnx.ModelProto:
    """Read an ONNX model (external data included) or raise an LrpError saying why not. With `read_weights=False`
    the weights in external data files stay there (their files checked): a build reads them straight into its
    graph's arrays (`read_external`), so that they are never held twice, in the proto and in the graph."""
    path = Path(path)
    if not path.is_file():
        raise LrpError(f"{path}: no such file")
    try:
        model = onnx.load(str(path), load_external_data=False)
        data_files = {path.parent / ExternalDataInfo(t).location for t in _get_all_tensors(model)
                      if uses_external_data(t)}
        if read_weights:
            onnx.load_external_data_for_model(model, str(path.parent))
        else:
            for tensor in _get_all_tensors(model):
                if uses_external_data(tensor):
                    _external_span(tensor, path.parent)
    except Exception as error:  # protobuf and external-data errors have no common type
        raise LrpError(f"{path}: not a readable ONNX model ({first_line(error)})") from None
    _read_files.update(_identity(p) for p in {path} | data_files if p.is_file())
    if not model.graph.node or not model.opset_import:
        raise LrpError(f"{path}: not an ONNX model (no graph nodes or no opset)")
    check_model_structure(model, str(path))
    return model


# Types whose external bytes are the array's as numpy holds it (others, packed or exotic, are read by onnx).
PLAIN_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.INT8,
               onnx.TensorProto.INT16, onnx.TensorProto.INT32, onnx.TensorProto.INT64, onnx.TensorProto.UINT8,
               onnx.TensorProto.UINT16, onnx.TensorProto.UINT32, onnx.TensorProto.UINT64, onnx.TensorProto.BOOL}


def read_external(tensor: onnx.TensorProto, folder: Path) -> np.ndarray:
    """The values of a tensor stored in an external data file beside the model, read straight into an array (the
    tensor proto is left as it is: loading them into it would keep them as long as the whole model)."""
    if tensor.data_type not in PLAIN_TYPES:
        copy = onnx.TensorProto()
        copy.CopyFrom(tensor)
        onnx.load_external_data_for_tensor(copy, str(folder))
        return onnx.numpy_helper.to_array(copy)
    file, offset, length = _external_span(tensor, folder)
    dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
    with open(file, "rb") as data:
        data.seek(offset)
        values = np.fromfile(data, dtype=dtype.newbyteorder("<"), count=length // dtype.itemsize)
    return values.astype(dtype, copy=False).reshape(tuple(tensor.dims))


def _external_span(tensor: onnx.TensorProto, folder: Path) -> tuple[Path, int, int]:
    """Where a tensor's external bytes are (file, offset, length), checked: the file lies in `folder` (as onnx
    requires), holds them, and they are as many as the tensor's shape and type need."""
    info = ExternalDataInfo(tensor)
    location = Path(info.location)
    if location.is_absolute() or ".." in location.parts:
        raise ValueError(f"tensor '{tensor.name}': external data location '{info.location}' is outside the model's "
                         f"folder")
    file = folder / location
    size = file.stat().st_size  # a missing file raises FileNotFoundError, with its name
    offset = info.offset or 0
    length = info.length if info.length is not None else size - offset
    if tensor.data_type in PLAIN_TYPES:
        needed = value_bytes(tensor)
        if length != needed:
            raise ValueError(f"tensor '{tensor.name}' has {length} bytes of data but needs {needed}")
    if offset + length > size:
        raise ValueError(f"tensor '{tensor.name}' has {max(size - offset, 0)} bytes of data in {file.name} but "
                         f"needs {length} (a truncated file)")
    return file, offset, length


def value_bytes(tensor: onnx.TensorProto) -> int:
    """The bytes a tensor's values take, from its shape and type (reading its data would copy it)."""
    try:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except (KeyError, TypeError, ValueError):
        itemsize = 1
    return math.prod(tensor.dims) * itemsize


def refuse_input_files(path: str | Path) -> None:
    """Raise an LrpError if writing the model to `path` would replace a file that a model was read from."""
    path = Path(path)
    for target in (path, _data_path(path)):
        if target.is_file() and _identity(target) in _read_files:
            raise LrpError(f"{path}: writing it would replace {target.name}, a file of the input model; "
                           f"choose another output name")


def save_atomic(model: onnx.ModelProto, path: str | Path, external_data: bool = False) -> None:
    """Check the model, write it next to `path` under a temporary name, then move it into place.

    A model over 2 GB, or any with `external_data`, keeps its weights in `path` + ".data" (each at an aligned
    offset, which ONNX Runtime maps into memory instead of reading), written the same way and moved together with
    the model; its tensors are moved out of `model` into that file (the proto is left referring to the file).
    """
    path = Path(path)
    refuse_input_files(path)
    _check(_without_weights(model))
    large = external_data or sum(t.ByteSize() for t in model.graph.initializer) > MAX_SINGLE_FILE
    try:
        with temporary_files(path.parent, 2 if large else 1) as temporary:
            if large:
                _move_weights(model, temporary[1], _data_path(path).name)
            _write(model, temporary[0])
            with uninterrupted():  # the model and its data file move together or not at all
                if large:
                    os.replace(temporary[1], _data_path(path))
                os.replace(temporary[0], path)
    except OSError as error:
        raise LrpError(f"{path}: cannot write the model ({error.strerror or error})") from None


def _without_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """What the checker needs to see of the built model: its graph with empty initializers of the same names and
    types (checking the full proto would serialize it whole, which fails over 2 GB and doubles memory below)."""
    graph = model.graph
    light = onnx.GraphProto(name=graph.name, node=graph.node, input=graph.input, output=graph.output,
                            value_info=graph.value_info)
    for tensor in graph.initializer:
        light.initializer.add(name=tensor.name, data_type=tensor.data_type, dims=[0])  # no elements, no data
    return onnx.ModelProto(ir_version=model.ir_version, opset_import=model.opset_import, functions=model.functions,
                           graph=light)


def _check(model: onnx.ModelProto) -> None:
    try:
        onnx.checker.check_model(model, full_check=False)
    except onnx.checker.ValidationError as error:
        raise LrpError(f"internal error: the built graph is invalid ({first_line(error)})") from None


def _write(model: onnx.ModelProto, path: Path) -> None:
    """Serialize the model one initializer at a time (what SerializeToString would write, with the initializers
    last): a whole-model serialization would hold up to twice its size in memory besides the model itself."""
    graph = model.graph
    sizes = [tensor.ByteSize() for tensor in graph.initializer]
    rest = shell(graph, "initializer").SerializeToString()
    items = [_key(GRAPH_INITIALIZER) + _varint(size) for size in sizes]
    with open(path, "wb") as file:
        file.write(shell(model, "graph").SerializeToString())
        file.write(_key(MODEL_GRAPH) + _varint(len(rest) + sum(map(len, items)) + sum(sizes)))
        file.write(rest)
        for item, size, tensor in zip(items, sizes, graph.initializer):
            data = tensor.SerializeToString()
            if len(data) != size:
                raise OSError(f"tensor '{tensor.name}' serialized to {len(data)} bytes, not {size}")
            file.write(item)
            file.write(data)


MODEL_GRAPH = onnx.ModelProto.DESCRIPTOR.fields_by_name["graph"].number
GRAPH_INITIALIZER = onnx.GraphProto.DESCRIPTOR.fields_by_name["initializer"].number


def shell(message, left_out: str):
    """A copy of a message without one (large) field: a model without its graph, a graph without its weights."""
    copy = type(message)()
    for field, value in message.ListFields():
        if field.name == left_out:
            continue
        if field.is_repeated:
            getattr(copy, field.name).extend(value)
        elif field.type == field.TYPE_MESSAGE:
            getattr(copy, field.name).CopyFrom(value)
        else:
            setattr(copy, field.name, value)
    return copy


def _key(number: int) -> bytes:
    return _varint(number << 3 | 2)  # wire type 2: length-delimited


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _move_weights(model: onnx.ModelProto, data: Path, location: str) -> None:
    """Write each large tensor's bytes to the file `data` (which will be moved to `location`, beside the model)
    and make the tensor refer to them there."""
    with open(data, "wb") as file:
        for tensor in _get_all_tensors(model):
            if tensor.HasField("raw_data") and len(tensor.raw_data) >= EXTERNAL_MIN_BYTES:
                offset = file.tell() + -file.tell() % ALIGNMENT
                file.seek(offset)
                length = file.write(tensor.raw_data)
                tensor.ClearField("raw_data")
                tensor.data_location = onnx.TensorProto.EXTERNAL
                del tensor.external_data[:]
                for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
                    entry = tensor.external_data.add()
                    entry.key, entry.value = key, value


def _data_path(path: Path) -> Path:
    return path.with_name(f"{path.name}.data")


def _identity(path: Path) -> tuple[int, int]:
    status = path.stat()
    return status.st_dev, status.st_ino


def ir_version_for(model: onnx.ModelProto, source_ir: int) -> int:
    """The source model's IR version (which its runtime loads), raised only as far as the opset requires.

    onnx stamps its newest IR version by default, which ONNX Runtime may not read yet.
    """
    opset = opset_of(model)
    return max(source_ir, min(ir for _, ir, ops, *_ in onnx.helper.VERSION_TABLE if ops >= opset))


def first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0][:300]

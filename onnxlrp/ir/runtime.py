"""The check that ONNX Runtime loads a built model, made before the model is returned or written: a model that would
not load (types bound differently, a kernel missing on the CPU) is an error at build time, not a broken file."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, numpy_helper

from ..errors import LrpError
from .files import first_line, shell

# Tensors at least this large are handed to the session from memory instead of being serialized into it.
IN_MEMORY_MIN_BYTES = 1024
IN_MEMORY = "onnxlrp-in-memory"


def require_loadable(model: onnx.ModelProto, source: str) -> None:
    """Raise a one-line LrpError if ONNX Runtime's CPU provider does not load `model`. The session is made without
    graph optimisation, and the weights are handed to it as arrays over the model's own bytes (the model is not
    serialized with them), so the check costs little beside the build, also for large models."""
    light, names, values = _light(model)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    if names:
        options.add_external_initializers(names, values)
    try:
        ort.InferenceSession(light.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception as error:  # ONNX Runtime raises several types
        raise LrpError(f"{source}: the built model does not load in ONNX Runtime ({first_line(error)}); "
                       f"nothing was written (please report this with the model)") from None


def _light(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str], list[ort.OrtValue]]:
    """The model with its large initializers marked as external data, and those initializers as OrtValues."""
    graph = shell(model.graph, "initializer")
    names, values = [], []
    for tensor in model.graph.initializer:
        array = _view(tensor)
        if array is None:
            graph.initializer.append(tensor)
            continue
        stub = graph.initializer.add(name=tensor.name, data_type=tensor.data_type, dims=tensor.dims,
                                     data_location=TensorProto.EXTERNAL)
        for key, value in (("location", IN_MEMORY), ("offset", "0"), ("length", str(array.nbytes))):
            stub.external_data.add(key=key, value=value)
        names.append(tensor.name)
        values.append(ort.OrtValue.ortvalue_from_numpy(array))
    light = shell(model, "graph")
    light.graph.CopyFrom(graph)
    return light, names, values


def _view(tensor: onnx.TensorProto) -> np.ndarray | None:
    """A large tensor's values as an array of a type numpy holds natively, else None (kept in the model)."""
    if tensor.data_location == TensorProto.EXTERNAL or len(tensor.raw_data) < IN_MEMORY_MIN_BYTES:
        return None
    try:
        kind = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type))
    except (KeyError, TypeError, ValueError):
        return None
    if kind.kind not in "fiub" or kind.itemsize * int(np.prod(tensor.dims)) != len(tensor.raw_data):
        return None
    return numpy_helper.to_array(tensor)

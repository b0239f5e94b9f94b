"""The check that ONNX Runtime loads a built model, made before the model is returned or written: a model that would
not load (types bound differently, a kernel missing on the CPU) is an error at build time, not a broken file."""
from __future__ import annotations

import tempfile
from pathlib import Path

import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from ..errors import LrpError
from .files import MAX_SINGLE_FILE, first_line, shell, value_bytes

# Tensors at least this large stand in the checked model as graph inputs of their type and shape: ONNX Runtime checks
# the graph's types and shapes without their values (smaller ones, shapes and indices among them, keep theirs).
STAND_IN_MIN_BYTES = 2**20


def require_loadable(model: onnx.ModelProto, source: str) -> None:
    """Raise a one-line LrpError if ONNX Runtime's CPU provider does not load `model`. The session is made without
    graph optimisation or prepacking, and large weights are left out (see STAND_IN_MIN_BYTES), so that the check
    costs little beside the build, also for large models."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    options.add_session_config_entry("session.disable_prepacking", "1")
    try:
        ort.InferenceSession(_light(model).SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception as error:  # ONNX Runtime raises several types
        raise LrpError(f"{source}: the built model does not load in ONNX Runtime ({first_line(error)}); "
                       f"nothing was written (please report this with the model)") from None


def optimized_for_cpu(model: onnx.ModelProto, source: str) -> onnx.ModelProto:
    """ONNX Runtime's own optimised form of `model` (SessionOptions.optimized_model_filepath at the all level):
    modified weights folded, convolutions and their weights already in this CPU's blocked (NCHWc) layout, so that
    a session on it has little left to do when it starts. The file is for ONNX Runtime on CPUs like this one."""
    if sum(value_bytes(tensor) for tensor in model.graph.initializer) > MAX_SINGLE_FILE:
        raise LrpError(f"{source}: --optimize-for cpu: the built model is over 2 GB, which ONNX Runtime's optimised "
                       f"model file does not hold; build without it")
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "optimized.onnx"
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.optimized_model_filepath = str(path)
        try:
            ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        except Exception as error:  # ONNX Runtime raises several types
            raise LrpError(f"{source}: --optimize-for cpu: ONNX Runtime did not optimise the built model "
                           f"({first_line(error)})") from None
        return onnx.load(str(path))


def _light(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with its large initializers turned into graph inputs of the same name, type and shape."""
    graph = shell(model.graph, "initializer")
    for tensor in model.graph.initializer:
        if value_bytes(tensor) >= STAND_IN_MIN_BYTES or tensor.data_location == TensorProto.EXTERNAL:
            graph.input.append(helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))
        else:
            graph.initializer.append(tensor)
    light = shell(model, "graph")
    light.graph.CopyFrom(graph)
    return light

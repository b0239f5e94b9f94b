"""Export a graphsurgeon graph to a model without holding every weight twice: the graph is exported with
placeholder initializers, then each weight's bytes go into the model one at a time and the graph lets go of the
array. (graphsurgeon's export makes a TensorProto per weight and copies each into the graph: twice the weights.)"""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues

# Constants smaller than this are exported by graphsurgeon as they are.
PLACEHOLDER_MIN_BYTES = 4096


def export_model(graph: gs.Graph) -> onnx.ModelProto:
    """The graph as a model; its large numpy constants are moved into the model (the graph keeps placeholders)."""
    arrays: dict[str, np.ndarray] = {}
    for tensor in graph.tensors().values():
        values = tensor._values if isinstance(tensor, gs.Constant) else None
        if isinstance(values, np.ndarray) and values.dtype.kind in "biuf" and values.nbytes >= PLACEHOLDER_MIN_BYTES:
            arrays[tensor.name] = values
            tensor.values = LazyValues(_placeholder(tensor.name, values))
    del values
    model = gs.export_onnx(graph, do_type_check=False)
    for initializer in model.graph.initializer:
        values = arrays.pop(initializer.name, None)
        if values is not None:
            initializer.raw_data = np.ascontiguousarray(values, dtype=values.dtype.newbyteorder("<")).tobytes()
    return model


def _placeholder(name: str, values: np.ndarray) -> onnx.TensorProto:
    """An initializer with the constant's name, type and shape and no data yet."""
    return onnx.TensorProto(name=name, data_type=onnx.helper.np_dtype_to_tensor_dtype(values.dtype),
                            dims=values.shape)

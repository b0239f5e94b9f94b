"""Small helpers over graphsurgeon graphs that every stage uses."""
from __future__ import annotations

import logging

import numpy as np
import onnx
import onnx_graphsurgeon as gs

logging.getLogger("onnx_graphsurgeon").setLevel(logging.ERROR)
gs.logger.G_LOGGER.severity = gs.logger.G_LOGGER.ERROR


def opset_of(model: onnx.ModelProto) -> int:
    """The version of the default ONNX domain the model uses."""
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def constant(tensor: gs.Tensor) -> np.ndarray | None:
    """The value of a constant tensor (or None for a computed one)."""
    return tensor.values if isinstance(tensor, gs.Constant) else None


def replace(tensors: list, items: list) -> None:
    """Replace the contents of a node's input or output list (graphsurgeon's lists take no slice assignment)."""
    items = list(items)
    tensors.clear()
    tensors.extend(items)


def is_bias(values: np.ndarray, features: int) -> bool:
    """Whether an added constant is a per-output-feature bias of a dense layer."""
    return values.size in (1, features) and (values.ndim <= 1 or values.shape[:-1] == (1,) * (values.ndim - 1))


def bias_add(matmul: gs.Node) -> gs.Node | None:
    """The Add of a per-feature constant that alone reads the output of a MatMul by a constant matrix: that dense
    layer's bias, kept as its own node where no Gemm can carry it (inputs of rank 3 or more)."""
    weight = constant(matmul.inputs[1]) if matmul.op == "MatMul" else None
    users = matmul.outputs[0].outputs
    if weight is None or weight.ndim != 2 or len(users) != 1 or users[0].op != "Add" or \
            users[0].inputs.count(matmul.outputs[0]) != 1:
        return None
    values = constant(addend(users[0], matmul.outputs[0]))
    return users[0] if values is not None and is_bias(values, weight.shape[1]) else None


def addend(add: gs.Node, tensor: gs.Tensor) -> gs.Tensor:
    """The input of a two-input node that is not `tensor` (the bias of a bias Add)."""
    return next(t for t in add.inputs if t is not tensor)


def biased_matmul(add: gs.Node) -> gs.Node | None:
    """The MatMul whose bias `add` is (see `bias_add`), or None."""
    producers = [t.inputs[0] for t in add.inputs if t.inputs] if add.op == "Add" else []
    return next((p for p in producers if p.op == "MatMul" and bias_add(p) is add), None)

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


def static(shape, start: int = 1) -> bool:
    """Whether a shape is known with fixed sizes from axis `start` on (by default: every axis after the batch)."""
    return shape is not None and all(isinstance(d, int) and d >= 0 for d in shape[start:])


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


def floating(tensor: gs.Tensor | None) -> bool:
    """Whether a tensor is known to hold floating-point values (sequences and maps are not)."""
    try:
        return tensor is not None and tensor.dtype is not None and np.issubdtype(np.dtype(tensor.dtype), np.floating)
    except TypeError:
        return False

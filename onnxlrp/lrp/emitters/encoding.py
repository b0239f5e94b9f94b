"""Integer inputs one-hot encoded inside the graph (OneHot, or Equal against a range of values, as the canonical
OneHot of canonical/patterns.py): the relevance of the encoding is summed over the encoded values, so that each
input position gets one relevance."""
from __future__ import annotations

from typing import Sequence

import onnx_graphsurgeon as gs

from ...canonical.patterns import CANONICAL
from ...ir.ops import Ops, Tensor
from ..families import Unsupported
from .routing import routes


@routes("one-hot encoding", ("OneHot",))
def one_hot(ops: Ops, node: gs.Node, relevance: Sequence[Tensor | None]) -> list[Tensor | None]:
    """Each encoded position's relevance is the sum over the values it was compared with."""
    if node.domain != CANONICAL:
        raise Unsupported("OneHot needs a known output rank")
    source, axes = node.inputs[0], node.attrs["axes"]
    if source.shape is None:
        raise Unsupported("a one-hot encoding needs known ranks")
    lower = ops.reduce_sum(relevance[0], axes, keepdims=bool(node.attrs["keepdims"])) if axes else relevance[0]
    if node.attrs["keepdims"] and len(source.shape) < len(node.outputs[0].shape):
        lower = ops.reshape_like(lower, source)
    return [lower]


FAMILIES = (one_hot,)

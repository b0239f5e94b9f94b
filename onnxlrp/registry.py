"""The registry of op families: which op types an emitter handles and which rules it accepts."""
from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Callable, Collection, Iterator, Mapping, Protocol, Sequence, Union

import numpy as np
import onnx_graphsurgeon as gs

from .ops import Ops, Tensor


class Unsupported(Exception):
    """A node the emitter of its op type cannot explain (the builder collects these and reports them all)."""


class Context(Protocol):
    """What an emitter may ask of the builder."""
    ops: Ops

    def rule(self, node: gs.Node) -> tuple[str, Mapping[str, object]]: ...

    def nonnegative(self, tensor: Tensor) -> bool: ...

    def finite(self, tensor: Tensor) -> bool: ...

    def rectified(self, tensor: Tensor) -> Tensor | None: ...


Emit = Callable[[Context, gs.Node, Sequence[Tensor | None]], Sequence[Tensor | None]]
# How a node's input relevance relates to the input's zeros, given the node and its rule: "kept" (the input times
# something, so 0 where the input is 0), "routed" (relevance only where an input element equals an output
# element: copies, and a maximum's winners) or None (neither).
Zeros = Callable[[gs.Node, str], Union[str, None]]


@dataclass(frozen=True)
class Family:
    """Op types that share an emitter. `rules[0]` is the default when no composite entry matches."""
    name: str
    op_types: tuple[str, ...]
    rules: tuple[str, ...]
    emit: Emit
    min_opset: Callable[[gs.Node], int]
    zeros: Zeros


FAMILIES: dict[str, Family] = {}


def family(name: str, op_types: Sequence[str], rules: Sequence[str],
           min_opset: Callable[[gs.Node], int] | None = None, zeros: Zeros | str | None = None
           ) -> Callable[[Emit], Emit]:
    """Register the decorated function as the emitter of `op_types` (`zeros`: see Zeros; a string for all)."""
    def register(emit: Emit) -> Emit:
        entry = Family(name, tuple(op_types), tuple(rules), emit, min_opset or (lambda node: 0),
                       zeros if callable(zeros) else (lambda node, rule: zeros))
        for op_type in op_types:
            FAMILIES[op_type] = entry
        return emit
    return register


# The names of the tensors on a data path from the explained input, while a walk runs (None: every Variable).
_DATA_PATH: ContextVar[Collection[str] | None] = ContextVar("data_path", default=None)


@contextmanager
def data_path(names: Collection[str]) -> Iterator[None]:
    """Within this block, only the tensors named in `names` count as computed (see datapath.py)."""
    token = _DATA_PATH.set(names)
    try:
        yield
    finally:
        _DATA_PATH.reset(token)


def computed(tensor: Tensor | None) -> bool:
    """Whether a node input is computed from the explained input (a Variable on its data path), not a constant
    (an initializer, or a tensor such as a mask or a shape that no data path from the explained input reaches)."""
    names = _DATA_PATH.get()
    return isinstance(tensor, gs.Variable) and (names is None or tensor.name in names)


def floating(tensor: Tensor | None) -> bool:
    """Whether a tensor is known to hold floating-point values (sequences and maps are not)."""
    try:
        return tensor is not None and tensor.dtype is not None and np.issubdtype(np.dtype(tensor.dtype), np.floating)
    except TypeError:
        return False

"""Recurrent layers written out over their time steps: each LSTM, GRU and RNN node of a sequence length known at
build time becomes, per direction and step, the plain ops of its cell (a Gemm per gate on the step's input and the
previous state, Sigmoid gates, Tanh, the products of a gate and a signal, the sum into the cell), so that the walk
applies the signal-take-all rule of Arras et al. (docs/rules.md): the composite's rule on the linear maps, all of a
product's relevance to its signal, the sum into the cell split in proportion. Padded steps (`sequence_lens`) keep
the state through a Where, so their inputs get exactly 0. The pipeline keeps the model's own node for its outputs
(pipeline.py); the written-out cell only carries relevance. Anything but the cells' default activations is refused.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..errors import LrpError
from ..ir.graph import constant, optional_input
from ..ir.ops import Ops, Tensor
from .control import MAX_STEPS, rebind, stacked


@dataclass
class Weights:
    """One direction's parameters as ONNX orders them: W [blocks * H, F], R [blocks * H, H], the two biases; and
    the constants made of them, made once for all steps."""
    w: np.ndarray
    r: np.ndarray
    wb: np.ndarray
    rb: np.ndarray
    made: dict = field(default_factory=dict)

    def block(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        rows = slice(index * self.r.shape[1], (index + 1) * self.r.shape[1])
        return self.w[rows], self.r[rows], self.wb[rows], self.rb[rows]

    def constant(self, ops: Ops, key: tuple, make: Callable[[], np.ndarray]) -> gs.Constant:
        if key not in self.made:
            self.made[key] = ops.const(make())
        return self.made[key]


class Step:
    """Writes one cell step: `linear` is the map of a gate block on [x_t, h] (one Gemm, bias wb + rb, so that
    the composite's rule sees the one linear map of Arras et al.), h and c are None for a zero initial state."""

    def __init__(self, ops: Ops, weights: Weights, x: Tensor, attrs: dict):
        self.ops, self.weights, self.x, self.attrs = ops, weights, x, attrs

    def gemm(self, data: Tensor, key: tuple, weight: Callable[[], np.ndarray], bias: Callable[[], np.ndarray]
             ) -> Tensor:
        made = self.weights.constant
        return self.ops("Gemm", data, made(self.ops, key + ("w",), weight), made(self.ops, key + ("b",), bias),
                        transB=1)

    def linear(self, index: int, h: Tensor | None) -> Tensor:
        """W x + R h + wb + rb of gate block `index`, without R h where h is None."""
        w, r, wb, rb = self.weights.block(index)
        data = self.x if h is None else self.ops("Concat", self.x, h, axis=1)
        return self.gemm(data, (index, h is None), lambda: w if h is None else np.hstack([w, r]), lambda: wb + rb)


def lstm_step(step: Step, h: Tensor | None, c: Tensor | None) -> tuple[Tensor, Tensor]:
    """ONNX's gate order i, o, f, c: c_t = f * c + i * g, h_t = o * tanh(c_t)."""
    ops = step.ops
    i, o, f = (ops("Sigmoid", step.linear(k, h)) for k in range(3))
    g = ops("Tanh", step.linear(3, h))
    new_c = ops("Mul", i, g) if c is None else ops("Add", ops("Mul", f, c), ops("Mul", i, g))
    return ops("Mul", o, ops("Tanh", new_c)), new_c


def gru_step(step: Step, h: Tensor | None, c: None) -> tuple[Tensor, None]:
    """ONNX's gate order z, r, h: h_t = (1 - z) * n + z * h (1 - z is a gate too: lrp/emitters/arithmetic.py);
    n = tanh(W x + r * (R h + rb) + wb) (linear_before_reset) or tanh([W R] [x, r * h] + wb + rb)."""
    ops = step.ops
    z, r = (ops("Sigmoid", step.linear(k, h)) for k in range(2))
    w, recurrent, wb, rb = step.weights.block(2)
    if step.attrs.get("linear_before_reset", 0):
        signal = (step.weights.constant(ops, ("rb",), lambda: rb) if h is None
                  else step.gemm(h, ("R h",), lambda: recurrent, lambda: rb))
        n = ops("Tanh", ops("Add", step.gemm(step.x, ("W x",), lambda: w, lambda: wb), ops("Mul", r, signal)))
    else:
        n = ops("Tanh", step.linear(2, None if h is None else ops("Mul", r, h)))
    kept = ops("Mul", ops("Sub", ops.scalar(1.0), z), n)
    return (kept if h is None else ops("Add", kept, ops("Mul", z, h))), None


def rnn_step(step: Step, h: Tensor | None, c: None) -> tuple[Tensor, None]:
    """h_t = tanh(W x + R h + wb + rb)."""
    return step.ops("Tanh", step.linear(0, h)), None


@dataclass(frozen=True)
class Cell:
    """A recurrent op: its number of weight blocks (gates), default activations (per direction), the input index of
    its initial cell state (LSTM), and its step."""
    blocks: int
    activations: tuple[str, ...]
    step: Callable[[Step, Tensor | None, Tensor | None], tuple[Tensor, Tensor | None]]
    initial_c: int | None = None


CELLS = {"LSTM": Cell(4, ("Sigmoid", "Tanh", "Tanh"), lstm_step, initial_c=6),
         "GRU": Cell(3, ("Sigmoid", "Tanh"), gru_step),
         "RNN": Cell(1, ("Tanh",), rnn_step)}
DIRECTIONS = {"forward": (False,), "reverse": (True,), "bidirectional": (False, True)}
# Attributes that change the cell from what is written out, with the value that is written out.
UNSUPPORTED = {"clip": None, "activation_alpha": None, "activation_beta": None, "input_forget": 0}


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _refuse(source: str, node: gs.Node, reason: str) -> LrpError:
    return LrpError(f"{source}: node '{node.name}' ({node.op}): {reason}")


def _initial(ops: Ops, node: gs.Node, index: int | None, direction: int, axis: int) -> Tensor | None:
    """One direction's initial state as [N, H] (ONNX gives [directions, N, H], or [N, directions, H] in layout 1):
    None where it is absent or a constant zero."""
    tensor = optional_input(node, index) if index is not None else None
    if tensor is None:
        return None
    values = constant(tensor)
    if values is None:
        return ops("Gather", tensor, ops.scalar(direction, np.int64), axis=axis)
    values = np.take(values, direction, axis=axis)
    return ops.const(values) if np.any(values) else None


def _checked(node: gs.Node, cell: Cell, source: str) -> tuple[str, list[Weights]]:
    """The node's direction and per-direction weights; one line for what is not written out."""
    attrs = node.attrs
    for name, kept in UNSUPPORTED.items():
        if name in attrs and attrs[name] != kept:
            raise _refuse(source, node, f"attribute {name}={attrs[name]} is not explained (only the cell as "
                                        "Arras et al. define it)")
    direction = _text(attrs.get("direction", "forward"))
    if direction not in DIRECTIONS:
        raise _refuse(source, node, f"unknown direction '{direction}'")
    wanted = [a.lower() for a in cell.activations] * len(DIRECTIONS[direction])
    given = [_text(a).lower() for a in attrs.get("activations", wanted)]
    if given != wanted:
        raise _refuse(source, node, f"activations {', '.join(_text(a) for a in attrs['activations'])} are not "
                                    f"explained (only the default {', '.join(cell.activations)})")
    peepholes = optional_input(node, 7) if node.op == "LSTM" else None
    if peepholes is not None and (constant(peepholes) is None or np.any(constant(peepholes))):
        raise _refuse(source, node, "peephole connections (input P) are not explained")
    w, r = (constant(t) for t in node.inputs[1:3])
    if w is None or r is None:
        raise _refuse(source, node, "its weights W and R are computed, not constants")
    if w.shape[1] != cell.blocks * r.shape[2] or r.shape[1] != w.shape[1]:
        raise _refuse(source, node, f"its weights have shapes {list(w.shape)} and {list(r.shape)}, not "
                                    f"[D, {cell.blocks} H, F] and [D, {cell.blocks} H, H]")
    bias = optional_input(node, 3)
    b = constant(bias) if bias is not None else np.zeros((w.shape[0], 2 * w.shape[1]), w.dtype)
    if b is None:
        raise _refuse(source, node, "its bias B is computed, not a constant")
    wide = np.float64
    half = b.shape[1] // 2
    return direction, [Weights(w[d].astype(wide), r[d].astype(wide), b[d, :half].astype(wide),
                               b[d, half:].astype(wide)) for d in range(w.shape[0])]


def unroll_recurrent(graph: gs.Graph, node: gs.Node, source: str) -> None:
    """Write out one LSTM, GRU or RNN node (module docstring); its outputs Y, Y_h (and Y_c) keep their names."""
    cell = CELLS[node.op]
    direction, weights = _checked(node, cell, source)
    layout = node.attrs.get("layout", 0)
    x = node.inputs[0]
    time_axis = state_axis = 1 if layout else 0  # Y is [T, D, N, H] and Y_h [D, N, H], or [N, T, D, H] and [N, D, H]
    steps = x.shape[time_axis] if x.shape is not None and len(x.shape) == 3 else None
    if not isinstance(steps, int) or steps > MAX_STEPS:
        raise _refuse(source, node, f"its number of time steps ({steps}) must be known at build time (give the "
                                    f"input's sizes with --input-shape) and at most {MAX_STEPS}")
    ops = Ops(graph, graph.opset, np.dtype(x.dtype) if x.dtype is not None else np.dtype(np.float32))
    ops.scope = node.name
    lengths = optional_input(node, 4)
    valid = None  # per step, [N, 1]: whether each sequence reaches it (made once for both directions)
    if lengths is not None:
        lengths = ops.unsqueeze(ops("Cast", lengths, to=onnx.TensorProto.INT64), [1])
        valid = [ops("Less", ops.scalar(t, np.int64), lengths) for t in range(steps)]
    inputs = [ops("Gather", x, ops.scalar(t, np.int64), axis=time_axis) for t in range(steps)]
    outputs, finals, cells = [], [], []
    for index, backwards in enumerate(DIRECTIONS[direction]):
        h = _initial(ops, node, 5, index, state_axis)
        c = _initial(ops, node, cell.initial_c, index, state_axis)
        sequence: list[Tensor | None] = [None] * steps
        for t in (reversed(range(steps)) if backwards else range(steps)):
            new_h, new_c = cell.step(Step(ops, weights[index], inputs[t], node.attrs), h, c)
            if valid is not None:
                sequence[t] = ops("Where", valid[t], new_h, ops.scalar(0.0))
                new_h = ops("Where", valid[t], new_h, h if h is not None else ops.scalar(0.0))
                if new_c is not None:
                    new_c = ops("Where", valid[t], new_c, c if c is not None else ops.scalar(0.0))
            else:
                sequence[t] = new_h
            h, c = new_h, new_c
        outputs.append(ops.unsqueeze(stacked(ops, sequence, time_axis), [time_axis + 1]))
        finals.append(ops.unsqueeze(h, [state_axis]))
        cells.append(ops.unsqueeze(c, [state_axis]) if c is not None else None)
    results = [_joined(ops, outputs, time_axis + 1), _joined(ops, finals, state_axis)]
    if node.op == "LSTM":
        results.append(_joined(ops, cells, state_axis))
    rebind(graph, node, results[:len(node.outputs)])


def _joined(ops: Ops, parts: Sequence[Tensor], axis: int) -> Tensor:
    return parts[0] if len(parts) == 1 else ops("Concat", *parts, axis=axis)


def _is_cell(op: str, domain: str | None) -> bool:
    """Whether an op is ONNX's LSTM, GRU or RNN."""
    return op in CELLS and domain in (None, "", "ai.onnx")


def has_recurrent(model: onnx.ModelProto) -> bool:
    """Whether the model has a recurrent node to write out (its own nodes then keep computing its outputs)."""
    return any(_is_cell(node.op_type, node.domain) for node in model.graph.node)


def initial_states(model: onnx.ModelProto) -> list[str]:
    """The model inputs that a recurrent node reads as its initial state (initial_h, an LSTM's initial_c): the walk
    explains them beside the model input, and their relevance is an output too (lrp/walk.py)."""
    inputs = {v.name for v in model.graph.input} - {t.name for t in model.graph.initializer}
    found = [node.input[index] for node in model.graph.node
             if _is_cell(node.op_type, node.domain)
             for index in (5, CELLS[node.op_type].initial_c) if index is not None and index < len(node.input)]
    return list(dict.fromkeys(name for name in found if name in inputs))


def write_out_recurrent(graph: gs.Graph, source: str) -> bool:
    """Write out every recurrent node of the graph; returns whether there was one."""
    nodes = [node for node in graph.nodes if _is_cell(node.op, node.domain)]
    for node in nodes:
        unroll_recurrent(graph, node, source)
    return bool(nodes)

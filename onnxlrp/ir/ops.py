"""A small writer that appends ONNX ops to a graph: the vocabulary every emitter speaks."""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import onnx_graphsurgeon as gs

from .names import names_of

Tensor = gs.Tensor


def other_factor(product: Tensor, factor: Tensor) -> Tensor | None:
    """c where `product` is computed as factor * c (a Mul with `factor` as one input), else None."""
    producers = product.inputs if isinstance(product, gs.Variable) else []
    if len(producers) == 1 and producers[0].op == "Mul" and len(producers[0].inputs) == 2:
        a, b = producers[0].inputs
        return b if a is factor else a if b is factor else None
    return None


class Ops:
    """Appends nodes to a graph; calling it with an op type adds one node and returns its output(s).

    Constants are cached by value identity, so the weight a forward pass and its transpose share is stored once.
    """

    def __init__(self, graph: gs.Graph, opset: int, dtype: np.dtype = np.dtype(np.float32)):
        self.graph = graph
        self.opset = opset
        self.dtype = np.dtype(dtype)
        self.scope = "lrp"
        self._names = names_of(graph)
        self._arrays: dict[int, tuple[np.ndarray, gs.Constant]] = {}
        self._scalars: dict[tuple, gs.Constant] = {}

    def __call__(self, op: str, *inputs: Tensor, outputs: int = 1, **attrs) -> gs.Variable | list[gs.Variable]:
        name = self.fresh(f"{self.scope}/{op}")
        results = [gs.Variable(name if i == 0 else self.fresh(f"{name}:{i}")) for i in range(outputs)]
        self.graph.nodes.append(gs.Node(op, name, attrs, list(inputs), results))
        return results[0] if outputs == 1 else results

    def fresh(self, base: str) -> str:
        """A name no tensor or node of the graph has: `base` if free, else `base` with a number."""
        return self._names.fresh(base)

    def const(self, values: np.ndarray, dtype: np.dtype | None = None, key: object = None) -> gs.Constant:
        """A constant of the model's float type (or `dtype`), stored once per array (or per `key`, for a view
        such as a transpose that is made afresh each time)."""
        owner = values if key is None else key
        if id(owner) not in self._arrays:
            array = np.ascontiguousarray(values, dtype=dtype or self.dtype)
            self._arrays[id(owner)] = (owner, gs.Constant(self.fresh(f"{self.scope}/const"), array))
        return self._arrays[id(owner)][1]

    def scalar(self, value: float, dtype: np.dtype | None = None) -> gs.Constant:
        """A scalar constant, shared by all ops that use the same value and type."""
        dtype = np.dtype(dtype or self.dtype)
        key = (float(value), dtype.str)
        if key not in self._scalars:
            self._scalars[key] = gs.Constant(self.fresh("lrp/scalar"), np.array(value, dtype=dtype))
        return self._scalars[key]

    def ints(self, values: Sequence[int]) -> gs.Constant:
        return gs.Constant(self.fresh(f"{self.scope}/ints"), np.array(values, dtype=np.int64))

    # Opset-dependent forms.
    def reduce_sum(self, x: Tensor, axes: Sequence[int], keepdims: bool = True) -> gs.Variable:
        if self.opset >= 13:
            return self("ReduceSum", x, self.ints(axes), keepdims=int(keepdims))
        return self("ReduceSum", x, axes=list(axes), keepdims=int(keepdims))

    def reduce_mean(self, x: Tensor, axes: Sequence[int], keepdims: bool = True) -> gs.Variable:
        return self._reduce("ReduceMean", x, axes, keepdims)

    def reduce_min(self, x: Tensor, axes: Sequence[int], keepdims: bool = True) -> gs.Variable:
        return self._reduce("ReduceMin", x, axes, keepdims)

    def reduce_max(self, x: Tensor, axes: Sequence[int], keepdims: bool = True) -> gs.Variable:
        return self._reduce("ReduceMax", x, axes, keepdims)

    def _reduce(self, op: str, x: Tensor, axes: Sequence[int], keepdims: bool) -> gs.Variable:
        """A reduction whose axes became an input at opset 18."""
        if self.opset >= 18:
            return self(op, x, self.ints(axes), keepdims=int(keepdims))
        return self(op, x, axes=list(axes), keepdims=int(keepdims))

    def unsqueeze(self, x: Tensor, axes: Sequence[int]) -> gs.Variable:
        if self.opset >= 13:
            return self("Unsqueeze", x, self.ints(axes))
        return self("Unsqueeze", x, axes=list(axes))

    def slice(self, x: Tensor, starts: Sequence[int], ends: Sequence[int], axes: Sequence[int]) -> gs.Variable:
        return self("Slice", x, self.ints(starts), self.ints(ends), self.ints(axes))

    def length(self, x: Tensor, axis: int) -> gs.Variable:
        """The size of one axis of a tensor, computed (a scalar int64)."""
        return self("Gather", self("Shape", x), self.scalar(axis, np.int64), axis=0)

    def arange(self, n: Tensor) -> gs.Variable:
        """0, 1, ..., n - 1 (int64) for a computed scalar n."""
        return self("Range", self.scalar(0, np.int64), n, self.scalar(1, np.int64))

    def stand_in(self, node: gs.Node, values: Sequence[Tensor | None]) -> None:
        """Detach a node written out in plain ops and give its named outputs `values` (None: left unwritten), each
        through an Identity, since a value may be read on inside the written-out ops."""
        outputs = list(node.outputs)
        node.outputs.clear()
        node.inputs.clear()
        for output, value in zip(outputs, values):
            if output.name and value is not None:
                self.graph.nodes.append(gs.Node("Identity", self.fresh(f"{self.scope}/output"), inputs=[value],
                                                outputs=[output]))

    def reshape_like(self, x: Tensor, like: Tensor) -> gs.Variable:
        return self("Reshape", x, self("Shape", like))

    # Building blocks of the rules.
    def positive(self, x: Tensor) -> gs.Variable:
        return self("Relu", x)

    def negative(self, x: Tensor) -> gs.Variable:
        return self("Min", x, self.scalar(0.0))

    def add_all(self, terms: Sequence[Tensor]) -> Tensor:
        total = terms[0]
        for term in terms[1:]:
            total = self("Add", total, term)
        return total

    def scatter_flat(self, like: Tensor, indices: Tensor, values: Tensor, add: bool = True) -> gs.Variable:
        """`values` placed at the flat positions `indices` of a tensor of `like`'s shape, zeros elsewhere (added up
        where positions repeat, with `add`): the way back of a gather."""
        flat = self.ints([-1])
        zeros = self("ConstantOfShape", self("Shape", self("Reshape", like, flat)))
        reduction = {"reduction": "add"} if add else {}
        scattered = self("ScatterElements", zeros, self("Reshape", indices, flat), self("Reshape", values, flat),
                         axis=0, **reduction)
        return self.reshape_like(scattered, like)

    def zero_where_zero(self, tensor: Tensor, value: Tensor) -> gs.Variable:
        """`value`, with 0 where `tensor` is 0 (a product with it or a quotient by it, 0 * inf or 0 / 0, is NaN)."""
        zero = self.scalar(0.0)
        return self("Where", self("Equal", tensor, zero), zero, value)

    def divide_stabilized(self, numerator: Tensor, z: Tensor, epsilon: float | Tensor,
                          sign: int | None = None, rectified: Tensor | None = None) -> gs.Variable:
        """numerator / (z + epsilon * sign0(z)) with sign0(0) = +1; epsilon = 0 guards 0/0 to 0.

        `sign` is the known sign of z (+1 for z >= 0, -1 for z <= 0), which saves the sign computation.
        `rectified` is ReLU(z) where the numerator is 0 wherever z <= 0 (zeros.py): the denominator is then
        ReLU(z) + epsilon, the same quotient in one Add.
        `epsilon` may be a tensor (one value per sample, see `scaled_epsilon`); a zero denominator then gives 0.
        """
        if rectified is not None and not isinstance(epsilon, gs.Tensor) and epsilon > 0:
            return self("Div", numerator, self("Add", rectified, self.scalar(epsilon)))
        if isinstance(epsilon, gs.Tensor):
            shift = self("Where", self("Less", z, self.scalar(0.0)), self("Neg", epsilon), epsilon)
            denominator = self("Add", z, shift)
            return self.zero_where_zero(denominator, self("Div", numerator, denominator))
        if epsilon == 0:
            return self.zero_where_zero(z, self("Div", numerator, z))
        if sign is not None:
            return self("Div", numerator, self("Add", z, self.scalar(sign * epsilon)))
        factor = other_factor(numerator, z)
        if factor is not None:
            # z c / (z + epsilon sign0(z)) = c |z| / (|z| + epsilon), without the sign's Where and rounded alike
            # (the same magnitudes, each rounded once): the same quotient to the bit.
            magnitude = self("Abs", z)
            return self("Div", self("Mul", factor, magnitude), self("Add", magnitude, self.scalar(epsilon)))
        shift = self("Where", self("Less", z, self.scalar(0.0)), self.scalar(-epsilon), self.scalar(epsilon))
        return self("Div", numerator, self("Add", z, shift))

    def scaled_epsilon(self, z: Tensor, rank: int, epsilon: float, scale: float) -> gs.Variable:
        """epsilon + scale * sqrt(mean of z**2 over all non-batch axes), shaped [N, 1, ...] to broadcast over z."""
        rms = self("Sqrt", self.reduce_mean(self("Mul", z, z), list(range(1, rank))))
        scaled = self("Mul", rms, self.scalar(scale))
        return scaled if epsilon == 0 else self("Add", scaled, self.scalar(epsilon))

    def transposed_conv(self, s: Tensor, weight: Tensor, attrs: dict, in_spatial: Sequence[int],
                        out_spatial: Sequence[int], kernel: Sequence[int], shape: Sequence[int] | None = None,
                        form: str | None = None) -> gs.Variable:
        """The input-gradient of a Conv (or pooling window sum): a transposed pass that yields the input's shape.

        `form` (default: `transposed_form`'s choice) is `conv`, stride 1 only: a Conv with the flipped, transposed
        weight (`shape`: the weight's shape), which ONNX Runtime runs in the blocked layout of the forward
        convolutions; `phases`, 2-D strided without dilation: one stride-1 Conv per output phase interleaved by
        DepthToSpace; `dilated`: a stride-1 Conv over the input spread out with zeros; `convtranspose`, any
        layer. Symmetric pads go into the ConvTranspose itself; asymmetric pads (which CUDA would run on the
        CPU) and windows past the padded input (ceil_mode) use an unpadded ConvTranspose and a Slice.
        """
        rank = len(in_spatial)
        geometry = Geometry(list(in_spatial), list(out_spatial), list(kernel),
                            list(attrs.get("strides", [1] * rank)), list(attrs.get("dilations", [1] * rank)),
                            list(attrs.get("pads", [0] * 2 * rank)), attrs.get("group", 1))
        shape = list(shape if shape is not None else weight.shape)
        form = form or transposed_form(geometry)
        if form not in geometry.forms():
            raise ValueError(f"transposed form {form!r} does not apply; forms that do: {geometry.forms()}")
        return getattr(self, f"_transposed_{form}")(s, weight, geometry, shape)

    def _transposed_conv(self, s: Tensor, weight: Tensor, g: Geometry, shape: list[int]) -> gs.Variable:
        return self("Conv", s, self.flipped(weight, shape, g.group), pads=g.flipped_pads(), dilations=g.dilations,
                    group=g.group)

    def _transposed_convtranspose(self, s: Tensor, weight: Tensor, g: Geometry, shape: list[int]) -> gs.Variable:
        rank = len(g.inputs)
        common = dict(strides=g.strides, dilations=g.dilations, group=g.group)
        begins, ends, residual = g.pads[:rank], g.pads[rank:], g.residual()
        if begins == ends and all(r >= 0 for r in residual):
            return self("ConvTranspose", s, weight, pads=g.pads, output_padding=residual, **common)
        padding = [min(max(r, 0), st - 1) for r, st in zip(residual, g.strides)]
        result = self("ConvTranspose", s, weight, pads=[0] * 2 * rank, output_padding=padding, **common)
        return self.slice(result, begins, [b + n for b, n in zip(begins, g.inputs)], list(range(2, 2 + rank)))

    def _transposed_dilated(self, s: Tensor, weight: Tensor, g: Geometry, shape: list[int]) -> gs.Variable:
        """s spread out with stride - 1 zeros after each value, then a stride-1 Conv with the flipped weight."""
        rank = len(g.inputs)
        spread = self.spread(s, g.outputs, g.strides, [0] * rank)
        flipped_pads = g.flipped_pads()
        ends = [e - (st - 1) for e, st in zip(flipped_pads[rank:], g.strides)]
        result = self("Conv", spread, self.flipped(weight, shape, g.group), pads=flipped_pads[:rank] +
                      [max(e, 0) for e in ends], dilations=g.dilations, group=g.group)
        if min(ends) >= 0:
            return result
        return self.slice(result, [0] * rank, g.inputs, list(range(2, 2 + rank)))

    def _transposed_phases(self, s: Tensor, weight: Tensor, g: Geometry, shape: list[int]) -> gs.Variable:
        """Output phase (a, b) of the gradient, gradient[.., stride i + a, stride j + b], is a stride-1 Conv of s
        with the weight's taps that reach it (reversed); DepthToSpace interleaves the phases."""
        stride, swapped = g.strides[0], self.swapped(weight, shape, g.group)
        phases = g.phases()
        convolved = {}
        for key, axes in phases.items():
            if all(taps for *_, taps in axes):
                starts = [first + stride * (taps - 1) for first, _, taps in axes]
                ends = [first - 1 if first else -2**63 for first, _, _ in axes]
                kernel = self("Slice", swapped, self.ints(starts), self.ints(ends), self.ints([2, 3]),
                              self.ints([-stride, -stride]))
                pads = [begin for _, (begin, _), _ in axes] + [end for _, (_, end), _ in axes]
                convolved[key] = self("Conv", s, kernel, pads=pads, group=g.group)
        if len(convolved) == 1:  # one phase has taps (kernel <= stride): the others are zeros
            (key, single), = convolved.items()
            result = self.spread(single, g.phase_length(), g.strides, list(key))
        else:
            parts = [convolved.get(key) for key in phases]
            if any(part is None for part in parts):  # phases no tap reaches (kernel < stride in one axis)
                zeros = self("ConstantOfShape", self("Shape", convolved[next(iter(convolved))]),
                             value=gs.Constant(self.fresh("lrp/zero"), np.zeros(1, self.dtype)))
                parts = [zeros if part is None else part for part in parts]
            result = self("DepthToSpace", self("Concat", *parts, axis=1), blocksize=stride, mode="DCR")
        if all(stride * o == n for o, n in zip(g.phase_length(), g.inputs)):
            return result
        return self.slice(result, [0, 0], g.inputs, [2, 3])

    def spread(self, x: Tensor, lengths: Sequence[int], strides: Sequence[int], offsets: Sequence[int]
               ) -> gs.Variable:
        """x [N, C, *lengths] spread out to [N, C, *(stride * length)]: each value at stride * i + offset, zeros
        between (Reshape, Pad, Reshape)."""
        split = self("Reshape", x, self.ints([0, 0] + [d for n in lengths for d in (n, 1)]))
        pads = [0, 0] + [d for a in offsets for d in (0, a)] + [0, 0] + \
            [d for a, st in zip(offsets, strides) for d in (0, st - 1 - a)]
        return self("Reshape", self("Pad", split, self.ints(pads)),
                    self.ints([0, 0] + [n * st for n, st in zip(lengths, strides)]))

    def flipped(self, weight: Tensor, shape: Sequence[int], group: int) -> gs.Variable:
        """A Conv weight [out, in/group, *kernel] as the weight of its transposed Conv: [in, out/group, *kernel]
        with the kernel reversed (graph ops on the weight, folded when the session starts)."""
        swapped = self.swapped(weight, shape, group)
        axes = [a for a, k in enumerate(shape[2:], start=2) if k > 1]
        if not axes:
            return swapped
        return self("Slice", swapped, self.ints([-1] * len(axes)), self.ints([-2**63] * len(axes)), self.ints(axes),
                    self.ints([-1] * len(axes)))

    def swapped(self, weight: Tensor, shape: Sequence[int], group: int) -> Tensor:
        """A Conv weight [out, in/group, *kernel] with the channel axes swapped per group: [in, out/group, *kernel]."""
        out_channels, in_per_group, *kernel = shape
        spatial = list(range(2, 2 + len(kernel)))
        if group == 1:
            return self("Transpose", weight, perm=[1, 0] + spatial)
        if out_channels == group and in_per_group == 1:
            return weight  # depthwise: each group is a 1 x 1 matrix
        grouped = self("Reshape", weight, self.ints([group, out_channels // group, in_per_group] + kernel))
        return self("Reshape", self("Transpose", grouped, perm=[0, 2, 1] + [a + 1 for a in spatial]),
                    self.ints([group * in_per_group, out_channels // group] + kernel))


@dataclass
class Geometry:
    """A convolution's spatial sizes and attributes, as its transposed pass needs them."""
    inputs: list[int]
    outputs: list[int]
    kernel: list[int]
    strides: list[int]
    dilations: list[int]
    pads: list[int]
    group: int

    def residual(self) -> list[int]:
        """Input positions past the last window (per axis): the output padding of the ConvTranspose."""
        rank = len(self.inputs)
        return [n + b + e - ((o - 1) * st + (k - 1) * d + 1) for n, b, e, o, st, k, d in
                zip(self.inputs, self.pads[:rank], self.pads[rank:], self.outputs, self.strides, self.kernel,
                    self.dilations)]

    def flipped_pads(self) -> list[int]:
        """Pads of the stride-1 Conv with the flipped weight over s (spread out with zeros where strided)."""
        rank = len(self.inputs)
        reach = [(k - 1) * d for k, d in zip(self.kernel, self.dilations)]
        return [r - b for r, b in zip(reach, self.pads[:rank])] + \
            [r - e + extra for r, e, extra in zip(reach, self.pads[rank:], self.residual())]

    def phase_length(self) -> list[int]:
        return [-(-n // st) for n, st in zip(self.inputs, self.strides)]

    def phases(self) -> dict[tuple[int, ...], list[tuple[int, tuple[int, int], int]]]:
        """Per output phase (a, b): per axis its first tap, the pads of its Conv over s, and its number of taps.

        Gradient position stride * i + a receives the taps k = first + stride * t from s[i + q - t], q =
        (a + pad) // stride: a Conv with those taps reversed, padded by taps - 1 - q before."""
        rank = len(self.inputs)
        per_axis = []
        for n, o, k, st, b, length in zip(self.inputs, self.outputs, self.kernel, self.strides, self.pads[:rank],
                                          self.phase_length()):
            axis = []
            for a in range(st):
                first, shift = (a + b) % st, (a + b) // st
                taps = len(range(first, k, st))
                begin = taps - 1 - shift
                axis.append((first, (begin, length - o - begin + taps - 1), taps))
            per_axis.append(axis)
        return {key: [per_axis[i][a] for i, a in enumerate(key)] for key in itertools.product(
            *[range(st) for st in self.strides])}

    def forms(self) -> list[str]:
        """The transposed forms that compute this layer's input-gradient."""
        rank = len(self.inputs)
        forms = ["convtranspose"]
        strided = any(st > 1 for st in self.strides)
        if not strided and not any(self.residual()) and min(self.flipped_pads()) >= 0:
            forms.append("conv")
        if strided and min(self.flipped_pads()[:rank]) >= 0:
            forms.append("dilated")
        if strided and rank == 2 and len(set(self.strides)) == 1 and set(self.dilations) == {1}:
            used = [axes for axes in self.phases().values() if all(taps for *_, taps in axes)]
            if used and all(min(pad) >= 0 for axes in used for _, pad, _ in axes):
                forms.append("phases")
        return forms


def transposed_form(geometry: Geometry) -> str:
    """The fastest form of a transposed pass on ONNX Runtime's CPU provider that applies, as bench/transposed.py
    measured it on ResNet-50's layers: a Conv at stride 1; per-phase Convs where several phases have taps and
    each phase is at most 14 x 14 (a 3x3 stride-2 layer on 28 x 28 or less); ConvTranspose elsewhere (larger
    images, and 1x1 stride-2 layers, whose single phase must be spread out with zeros)."""
    forms = geometry.forms()
    if "conv" in forms:
        return "conv"
    phases = geometry.phases().values()
    if "phases" in forms and sum(all(taps for *_, taps in axes) for axes in phases) > 1 and \
            max(geometry.phase_length()) <= 14:
        return "phases"
    return "convtranspose"

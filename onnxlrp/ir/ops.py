"""A small writer that appends ONNX ops to a graph: the vocabulary every emitter speaks."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import onnx_graphsurgeon as gs

from .names import names_of

Tensor = gs.Tensor


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
        shift = self("Where", self("Less", z, self.scalar(0.0)), self.scalar(-epsilon), self.scalar(epsilon))
        return self("Div", numerator, self("Add", z, shift))

    def scaled_epsilon(self, z: Tensor, rank: int, epsilon: float, scale: float) -> gs.Variable:
        """epsilon + scale * sqrt(mean of z**2 over all non-batch axes), shaped [N, 1, ...] to broadcast over z."""
        rms = self("Sqrt", self.reduce_mean(self("Mul", z, z), list(range(1, rank))))
        scaled = self("Mul", rms, self.scalar(scale))
        return scaled if epsilon == 0 else self("Add", scaled, self.scalar(epsilon))

    def transposed_conv(self, s: Tensor, weight: Tensor, attrs: dict, in_spatial: Sequence[int],
                        out_spatial: Sequence[int], kernel: Sequence[int], shape: Sequence[int] | None = None
                        ) -> gs.Variable:
        """The input-gradient of a Conv (or pooling window sum): a ConvTranspose that yields the input's shape.

        With stride 1 it is a Conv with the flipped, transposed weight (`shape`: the weight's shape), which ONNX
        Runtime runs in the same blocked layout as the forward convolutions (no reorders, faster kernels).
        Symmetric pads go into the ConvTranspose itself; asymmetric pads (which CUDA would run on the CPU) and
        windows past the padded input (ceil_mode) use an unpadded ConvTranspose and a Slice.
        """
        rank = len(in_spatial)
        strides = list(attrs.get("strides", [1] * rank))
        dilations = list(attrs.get("dilations", [1] * rank))
        pads = list(attrs.get("pads", [0] * 2 * rank))
        begins, ends = pads[:rank], pads[rank:]
        full = [(o - 1) * st + (k - 1) * d + 1 for o, st, k, d in zip(out_spatial, strides, kernel, dilations)]
        residual = [n + b + e - f for n, b, e, f in zip(in_spatial, begins, ends, full)]
        common = dict(strides=strides, dilations=dilations, group=attrs.get("group", 1))
        flipped_pads = [(k - 1) * d - p for k, d, p in zip(kernel * 2, dilations * 2, pads)]
        shape = list(shape if shape is not None else weight.shape)
        if all(st == 1 for st in strides) and not any(residual) and min(flipped_pads) >= 0:
            return self("Conv", s, self.flipped(weight, shape, common["group"]), pads=flipped_pads,
                        dilations=dilations, group=common["group"])
        if begins == ends and all(r >= 0 for r in residual):
            return self("ConvTranspose", s, weight, pads=pads, output_padding=residual, **common)
        padding = [min(max(r, 0), st - 1) for r, st in zip(residual, strides)]
        result = self("ConvTranspose", s, weight, pads=[0] * 2 * rank, output_padding=padding, **common)
        axes = list(range(2, 2 + rank))
        return self.slice(result, begins, [b + n for b, n in zip(begins, in_spatial)], axes)

    def flipped(self, weight: Tensor, shape: Sequence[int], group: int) -> gs.Variable:
        """A Conv weight [out, in/group, *kernel] as the weight of its transposed Conv: [in, out/group, *kernel]
        with the kernel reversed (graph ops on the weight, folded when the session starts)."""
        out_channels, in_per_group, *kernel = shape
        spatial = list(range(2, 2 + len(kernel)))
        if group == 1:
            swapped = self("Transpose", weight, perm=[1, 0] + spatial)
        elif out_channels == group and in_per_group == 1:
            swapped = weight  # depthwise: each group is a 1 x 1 matrix
        else:
            grouped = self("Reshape", weight, self.ints([group, out_channels // group, in_per_group] + kernel))
            swapped = self("Reshape", self("Transpose", grouped, perm=[0, 2, 1] + [a + 1 for a in spatial]),
                           self.ints([group * in_per_group, out_channels // group] + kernel))
        axes = [a for a, k in zip(spatial, kernel) if k > 1]
        if not axes:
            return swapped
        return self("Slice", swapped, self.ints([-1] * len(axes)), self.ints([-2**63] * len(axes)), self.ints(axes),
                    self.ints([-1] * len(axes)))

"""An independent LRP in numpy (float64) for chains of Conv (stride 1, symmetric pads), Relu, MaxPool (stride = kernel),
Flatten and Gemm (biases optional), written from the formulas of docs/lrp.md, to check the graphs onnxlrp builds.
Rules: zero, epsilon (with epsilon_scale), gamma, zplus, alpha_beta, zbox, flat, wsquare; `stabilizer` in a rule's
params (default 1e-6) is the epsilon of every rule's stabilizer but the epsilon rule's. No term is dropped where
an input is known to be non-negative: the a- terms are computed and vanish."""
from __future__ import annotations

import numpy as np
import onnx
from numpy.lib.stride_tricks import sliding_window_view
from onnx import numpy_helper

STABILIZER = 1e-6


def sign0(z: np.ndarray) -> np.ndarray:
    return np.where(z < 0, -1.0, 1.0)


def stab(z: np.ndarray, epsilon) -> np.ndarray:
    return z + sign0(z) * epsilon


class Conv:
    def __init__(self, weight, bias, pad):
        self.weight, self.bias, self.pad = weight, bias, pad

    def forward(self, x, weight=None, bias=True):
        weight = self.weight if weight is None else weight
        p, k = self.pad, weight.shape[2]
        padded = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)))
        z = np.einsum("nchwij,ocij->nohw", sliding_window_view(padded, (k, k), axis=(2, 3)), weight)
        bias = self.bias if bias is True else bias
        return z if bias is None else z + bias[None, :, None, None]

    def backward(self, s, weight, shape):
        """The gradient of sum(s * forward(x)) with respect to x: each kernel tap scatters s back."""
        p, k = self.pad, weight.shape[2]
        n, c, h, w = shape
        out = np.zeros((n, c, h + 2 * p, w + 2 * p))
        for i in range(k):
            for j in range(k):
                out[:, :, i:i + s.shape[2], j:j + s.shape[3]] += np.einsum("nohw,oc->nchw", s, weight[:, :, i, j])
        return out[:, :, p:p + h, p:p + w]


class Dense:
    def __init__(self, weight, bias):  # weight [out, in] (Gemm with transB = 1)
        self.weight, self.bias = weight, bias

    def forward(self, x, weight=None, bias=True):
        weight = self.weight if weight is None else weight
        bias = self.bias if bias is True else bias
        return x @ weight.T if bias is None else x @ weight.T + bias

    def backward(self, s, weight, shape):
        return s @ weight


def lrp_linear(layer, a, relevance, rule: str, params: dict) -> np.ndarray:
    """R_lower for one linear layer under `rule` (docs/lrp.md §3), written out term by term."""
    w, b = layer.weight, layer.bias
    back = lambda s, weight: layer.backward(s, weight, a.shape)  # noqa: E731
    if rule in ("zero", "epsilon"):
        z = layer.forward(a)
        epsilon = 0.0 if rule == "zero" else params.get("epsilon", 0.0)
        scale = 0.0 if rule == "zero" else params.get("epsilon_scale", 0.0)
        epsilon = epsilon + scale * np.sqrt((z ** 2).reshape(len(z), -1).mean(1)).reshape((-1,) + (1,) * (z.ndim - 1))
        denominator = stab(z, epsilon)
        s = np.divide(relevance, denominator, out=np.zeros_like(z), where=denominator != 0)
        return a * back(s, w)
    epsilon = params.get("stabilizer", STABILIZER)
    if rule == "gamma":
        g = params.get("gamma", 0.25)
        up_w, down_w = w + g * np.maximum(w, 0), w + g * np.minimum(w, 0)
        up_b, down_b = (None, None) if b is None else (b + g * np.maximum(b, 0), b + g * np.minimum(b, 0))
        pos, neg = np.maximum(a, 0), np.minimum(a, 0)
        z = layer.forward(a)
        z_pos = layer.forward(pos, up_w, up_b) + layer.forward(neg, down_w, None)
        z_neg = layer.forward(pos, down_w, down_b) + layer.forward(neg, up_w, None)
        s_pos = (z > 0) * relevance / stab(z_pos, epsilon)
        s_neg = (z < 0) * relevance / stab(z_neg, epsilon)
        return pos * (back(s_pos, up_w) + back(s_neg, down_w)) + neg * (back(s_pos, down_w) + back(s_neg, up_w))
    if rule in ("zplus", "alpha_beta"):
        alpha, beta = (1.0, 0.0) if rule == "zplus" else (params.get("alpha", 2.0), params.get("beta", 1.0))
        pos, neg = np.maximum(a, 0), np.minimum(a, 0)
        w_pos, w_neg = np.maximum(w, 0), np.minimum(w, 0)
        b_pos, b_neg = (None, None) if b is None else (np.maximum(b, 0), np.minimum(b, 0))
        # Positive part: a+ w+ + a- w- and b+; negative part: a+ w- + a- w+ and b-.
        z_pos = layer.forward(pos, w_pos, b_pos) + layer.forward(neg, w_neg, None)
        z_neg = layer.forward(pos, w_neg, b_neg) + layer.forward(neg, w_pos, None)
        s_pos, s_neg = relevance / stab(z_pos, epsilon), relevance / stab(z_neg, epsilon)
        positive = pos * back(s_pos, w_pos) + neg * back(s_pos, w_neg)
        negative = pos * back(s_neg, w_neg) + neg * back(s_neg, w_pos)
        return alpha * positive - beta * negative
    if rule == "zbox":
        shape = (1, -1) + (1,) * (a.ndim - 2)
        low = np.broadcast_to(np.asarray(params["low"], dtype=np.float64).reshape(shape), a.shape)
        high = np.broadcast_to(np.asarray(params["high"], dtype=np.float64).reshape(shape), a.shape)
        w_pos, w_neg = np.maximum(w, 0), np.minimum(w, 0)
        z = layer.forward(a, w, None) - layer.forward(low, w_pos, None) - layer.forward(high, w_neg, None)
        s = relevance / stab(z, epsilon)
        return a * back(s, w) - low * back(s, w_pos) - high * back(s, w_neg)
    if rule in ("flat", "wsquare"):
        # The input replaced by ones; flat: weights by ones, no bias; w-square: weights and bias squared.
        ones = np.ones_like(a)
        weight, bias = (np.ones_like(w), None) if rule == "flat" else (w ** 2, None if b is None else b ** 2)
        s = relevance / stab(layer.forward(ones, weight, bias), epsilon)
        return back(s, weight)
    raise ValueError(rule)


def max_pool(a, k):
    n, c, h, w = a.shape
    return a.reshape(n, c, h // k, k, w // k, k)


def lrp_max_pool(a, relevance, k, rule, params=None):
    windows = max_pool(a, k)
    if rule == "norm":  # sum pooling: each input's share of its window's sum
        s = relevance / stab(windows.sum((3, 5)), (params or {}).get("stabilizer", STABILIZER))
        return (windows * s[:, :, :, None, :, None]).reshape(a.shape)
    flat = windows.transpose(0, 1, 2, 4, 3, 5).reshape(*relevance.shape, k * k)
    winner = np.eye(k * k)[flat.argmax(-1)] * relevance[..., None]
    return winner.reshape(*relevance.shape, k, k).transpose(0, 1, 2, 4, 3, 5).reshape(a.shape)


def lrp_chain(model: onnx.ModelProto, x: np.ndarray, target: np.ndarray, rules: dict[str, tuple[str, dict]]):
    """Forward the chain in float64, then propagate `one_hot(target) * logits` back with `rules` (node name ->
    (rule, params)). Returns the logits, the input relevance and the relevance at the input of each linear layer."""
    weights = {i.name: numpy_helper.to_array(i).astype(np.float64) for i in model.graph.initializer}
    layers, activations, a = [], [], x.astype(np.float64)
    bias = lambda node: weights[node.input[2]] if len(node.input) > 2 else None  # noqa: E731
    for node in model.graph.node:
        attrs = {at.name: onnx.helper.get_attribute_value(at) for at in node.attribute}
        activations.append(a)
        if node.op_type == "Conv":
            assert attrs.get("strides", [1, 1]) == [1, 1] and len(set(attrs.get("pads", [0]))) == 1
            layer = Conv(weights[node.input[1]], bias(node), attrs.get("pads", [0])[0])
        elif node.op_type == "Gemm":
            assert attrs.get("transB") == 1
            layer = Dense(weights[node.input[1]], bias(node))
        elif node.op_type == "MaxPool":
            assert attrs["kernel_shape"] == attrs["strides"]
            layer = ("MaxPool", attrs["kernel_shape"][0])
        elif node.op_type in ("Relu", "Flatten"):
            layer = (node.op_type,)
        else:
            raise ValueError(node.op_type)
        layers.append((node.name, layer))
        if isinstance(layer, (Conv, Dense)):
            a = layer.forward(a)
        elif layer[0] == "MaxPool":
            a = max_pool(a, layer[1]).max((3, 5))
        elif layer[0] == "Relu":
            a = np.maximum(a, 0)
        else:
            a = a.reshape(len(a), -1)
    logits = a
    chosen = np.where(target < 0, logits.argmax(1), target)
    relevance = np.eye(logits.shape[1])[chosen] * logits
    per_layer = {}
    for (name, layer), a in zip(reversed(layers), reversed(activations)):
        if isinstance(layer, (Conv, Dense)):
            relevance = lrp_linear(layer, a, relevance, *rules[name])
            per_layer[name] = relevance
        elif layer[0] == "MaxPool":
            relevance = lrp_max_pool(a, relevance, layer[1], *rules[name])
        elif layer[0] == "Flatten":
            relevance = relevance.reshape(a.shape)
    return logits, relevance, per_layer

"""Classic machine-learning models in ai.onnx.ml ops (scikit-learn through skl2onnx): the linear scorers
LinearClassifier, LinearRegressor, and SVMClassifier and SVMRegressor with a linear kernel, and the Scaler before them.

The model's own nodes keep computing its outputs, bit for bit. Beside them `linear_models` adds a twin in plain ops
that the walk explains: a Scaler becomes Sub and Mul by its constants, and the scorers that feed the same outputs
(one, or one per fold of a calibrated model) become one canonical `LinearModel` node, a dense layer whose output is
their mean score per class before any post-transform. What turns those scores into the model's outputs
(post_transform, Normalizer, calibration, votes, ZipMap) is a head: the walk starts below it (`head_of`), and a
negative target explains the class in the model's label output.

Two unsupervised models are neuralized the same way (NEON): a k-means model (skl2onnx's distances, ArgMin) gets a
`Centroids` dense layer whose score differences are the discriminants between clusters, and a one-class SVM (an
RBF SVMRegressor with positive weights) gets its distances to the support vectors in plain ops and an
`OutlierScore` soft min-pooling over them. docs/rules.md, "Classic machine-learning models", gives each model's
scores and the rules.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx_graphsurgeon as gs

from ..errors import LrpError
from ..ir.graph import constant, floating
from ..ir.names import fresh_name
from .patterns import CANONICAL, Collapsed, made_by

ML = "ai.onnx.ml"
LINEAR_MODEL = "LinearModel"  # canonical: a classic model's scores, x @ W + b (W stored [C, F]: Gemm's transB)
# Canonical: a k-means model's scores 2 mu_k . x - |mu_k|^2, which are |x|^2 less its squared distances: the
# differences of two are the linear discriminants between clusters (docs/rules.md, k-means).
CENTROIDS = "Centroids"
# Canonical: a one-class SVM's outlier score, the soft min-pooling of its squared distances to its support vectors
# (attrs: gamma and the log of their weights; docs/rules.md, one-class SVM).
OUTLIER_SCORE = "OutlierScore"
TWINS = (LINEAR_MODEL, CENTROIDS, OUTLIER_SCORE)
AXES_AS_INPUT = {"ReduceSum": 13, "ReduceMin": 18}  # the opset from which a reduction takes its axes as an input


@dataclass(frozen=True)
class Scores:
    """A scorer's scores per class (or target) as an affine function of its input, in float64: x @ weight + bias."""
    weight: np.ndarray  # [F, C]
    bias: np.ndarray  # [C]


def _floats(node: gs.Node, name: str, default: list[float] | None = None) -> np.ndarray:
    """A float attribute as a float64 array (the default where the node leaves it out)."""
    value = node.attrs.get(name, default)
    if value is None:
        raise LrpError(f"node '{node.name}' ({node.op}): has no attribute '{name}'")
    return np.asarray(value, dtype=np.float64).reshape(-1)


def _features(node: gs.Node, x: gs.Tensor) -> int:
    """F of the input [N, F] of a scorer (its twin's: a Scaler's output may have no inferred shape)."""
    shape = x.shape
    if shape is None or len(shape) != 2 or not isinstance(shape[1], int):
        raise LrpError(f"node '{node.name}' ({node.op}): needs an input of shape [N, F] with a static F")
    return shape[1]


def _classes(node: gs.Node) -> int:
    return len(node.attrs.get("classlabels_ints") or node.attrs.get("classlabels_strings") or [])


def _kernel(node: gs.Node) -> str:
    kernel = node.attrs.get("kernel_type", "LINEAR")
    return kernel.decode() if isinstance(kernel, bytes) else kernel


def _linear_kernel(node: gs.Node) -> None:
    kernel = _kernel(node)
    if kernel != "LINEAR":
        raise LrpError(f"node '{node.name}' ({node.op}): its {kernel} kernel is not linear; onnxlrp explains SVMs "
                       f"with a linear kernel, and one-class SVMs with an RBF kernel")


def _support_vectors(node: gs.Node, features: int) -> np.ndarray:
    """The support vectors [S, F] of an SVM with a linear kernel."""
    _linear_kernel(node)
    vectors = _floats(node, "support_vectors", [])
    if vectors.size == 0:
        raise LrpError(f"node '{node.name}' ({node.op}): an SVM without support vectors is not supported")
    return vectors.reshape(-1, features)


def linear_classifier(node: gs.Node, features: int) -> Scores:
    """One row of coefficients per class; a binary classifier with one row scores class 1 by it and class 0 by
    its negation (as ONNX Runtime does)."""
    weight = _floats(node, "coefficients").reshape(-1, features)
    bias = _floats(node, "intercepts", [0.0] * len(weight))
    if len(weight) == 1 and _classes(node) == 2:
        weight, bias = np.concatenate([-weight, weight]), np.concatenate([-bias, bias])
    return Scores(weight.T, bias)


def linear_regressor(node: gs.Node, features: int) -> Scores:
    """One row of coefficients per target."""
    weight = _floats(node, "coefficients").reshape(-1, features)
    return Scores(weight.T, _floats(node, "intercepts", [0.0] * len(weight)))


def svm_regressor(node: gs.Node, features: int) -> Scores:
    """sum_s coefficient_s <x, v_s> + rho: one target."""
    if node.attrs.get("one_class", 0):
        raise LrpError(f"node '{node.name}' ({node.op}): an SVMRegressor with one_class set is not supported")
    weight = _floats(node, "coefficients") @ _support_vectors(node, features)
    return Scores(weight[:, None], _floats(node, "rho")[:1])


def svm_classifier(node: gs.Node, features: int) -> Scores:
    """One-vs-one: the decision d_ij = sum_(s in i) a_(j-1),s <x, v_s> + sum_(s in j) a_i,s <x, v_s> + rho_ij of each
    pair i < j (ONNX Runtime's, positive for i), and the score of class c the sum of the decisions for c minus those
    against it, the confidence that scikit-learn adds to the votes."""
    vectors = _support_vectors(node, features)
    counts = [int(c) for c in node.attrs["vectors_per_class"]]
    classes = len(counts)
    coefficients = _floats(node, "coefficients").reshape(classes - 1, len(vectors))
    rho = _floats(node, "rho")
    starts = np.concatenate([[0], np.cumsum(counts)])
    weight, bias = np.zeros((vectors.shape[1], classes)), np.zeros(classes)
    pairs = [(i, j) for i in range(classes) for j in range(i + 1, classes)]
    for (i, j), offset in zip(pairs, rho):
        own, other = slice(starts[i], starts[i + 1]), slice(starts[j], starts[j + 1])
        decision = coefficients[j - 1, own] @ vectors[own] + coefficients[i, other] @ vectors[other]
        weight[:, i] += decision
        weight[:, j] -= decision
        bias[i] += offset
        bias[j] -= offset
    return Scores(weight, bias)


# The ai.onnx.ml ops whose scores are an affine function of their input [N, F]: (node, F) -> its scores.
SCORERS: dict[str, Callable[[gs.Node, int], Scores]] = {
    "LinearClassifier": linear_classifier,
    "LinearRegressor": linear_regressor,
    "SVMClassifier": svm_classifier,
    "SVMRegressor": svm_regressor,
}


def _float_type(x: gs.Tensor) -> np.dtype:
    """The type of a twin of x's computation: x's own where it is a float, else float32."""
    return np.dtype(x.dtype) if floating(x) else np.dtype(np.float32)


class _Plain:
    """Plain nodes built outside the graph, each as (node, inputs, outputs), for `Collapsed.stand_in` or the graph."""

    def __init__(self, graph: gs.Graph, base: str, dtype: np.dtype):
        self.graph, self.base, self.dtype = graph, base, dtype
        self.nodes: list[tuple[gs.Node, list, list]] = []

    def const(self, values: np.ndarray, dtype: np.dtype | None = None) -> gs.Constant:
        return gs.Constant(fresh_name(self.graph, f"{self.base}/const"), np.asarray(values, dtype=dtype or self.dtype))

    def __call__(self, op: str, *inputs: gs.Tensor, shape=None, axes: list[int] | None = None,
                 name: str | None = None, **attrs) -> gs.Variable:
        """A node's output; `name` (default: the base and op type) names the node and its output."""
        name = fresh_name(self.graph, f"{self.base}/{name or op}")
        inputs = list(inputs)
        if axes is not None and self.graph.opset >= AXES_AS_INPUT[op]:
            inputs.append(self.const(np.array(axes), np.dtype(np.int64)))
        elif axes is not None:
            attrs["axes"] = axes
        output = gs.Variable(name, dtype=self.dtype, shape=shape)
        self.nodes.append((gs.Node(op, name, attrs), inputs, [output]))
        return output

    def into_graph(self) -> None:
        """Connect the nodes and append them to the graph (twins that stay, unlike those a canonical node stands
        for)."""
        for node, inputs, outputs in self.nodes:
            node.inputs.extend(inputs)
            node.outputs.extend(outputs)
            self.graph.nodes.append(node)


def _scaler(graph: gs.Graph, node: gs.Node, x: gs.Tensor) -> gs.Variable:
    """Scaler: (x - offset) * scale, as Sub and Mul by constants of x's type."""
    plain = _Plain(graph, node.name, _float_type(x))
    shifted = plain("Sub", x, plain.const(_floats(node, "offset", [0.0])), shape=x.shape, name="offset")
    scaled = plain("Mul", shifted, plain.const(_floats(node, "scale", [1.0])), shape=x.shape, name="scale")
    plain.into_graph()
    return scaled


# The ai.onnx.ml ops before a scorer that have a twin in plain ops: (graph, node, twin of its input) -> its output.
TRANSFORMS: dict[str, Callable[[gs.Graph, gs.Node, gs.Tensor], gs.Variable]] = {"Scaler": _scaler}


def _twin(graph: gs.Graph, tensor: gs.Tensor, twins: dict[str, gs.Tensor], beside: dict[str, tuple[str, ...]]
          ) -> gs.Tensor:
    """The tensor in plain ops: through the twins of the transforms that compute it, else the tensor itself. The
    last node of each transform's twin is recorded in `beside` as standing beside it."""
    if tensor.name not in twins:
        producer = tensor.inputs[0] if tensor.inputs else None
        if producer is None or producer.domain != ML or producer.op not in TRANSFORMS:
            return tensor
        twin = TRANSFORMS[producer.op](graph, producer, _twin(graph, producer.inputs[0], twins, beside))
        beside[twin.inputs[0].name] = (f"{producer.name} ({producer.op})",)
        twins[tensor.name] = twin
    return twins[tensor.name]


def _reached(node: gs.Node, graph: gs.Graph) -> frozenset[str]:
    """The names of the graph outputs that a node's outputs flow into."""
    outputs = {t.name for t in graph.outputs}
    reached, stack, seen = set(), list(node.outputs), set()
    while stack:
        tensor = stack.pop()
        if tensor.name in seen:
            continue
        seen.add(tensor.name)
        reached |= {tensor.name} & outputs
        stack.extend(t for user in tensor.outputs for t in user.outputs)
    return frozenset(reached)


@dataclass(frozen=True)
class KMeans:
    """A k-means model found in a graph: its input, centroids [K, F] (float64), squared distances and the nodes that
    compute them and the cluster."""
    x: gs.Tensor
    centroids: np.ndarray
    distances: gs.Tensor
    nodes: tuple[gs.Node, ...]


def kmeans(argmin: gs.Node) -> KMeans | None:
    """skl2onnx's KMeans: the ArgMin over squared distances |x|^2 - 2 x mu^T + |mu|^2, written as ReduceSumSquare(x),
    Gemm(x, mu, alpha=-2) and two Adds; or None."""
    distances = argmin.inputs[0]
    outer = made_by(distances, "Add")
    if argmin.attrs.get("axis", 0) != 1 or outer is None:
        return None
    constants = [(constant(t), u) for t, u in (outer.inputs, outer.inputs[::-1])]
    norms, inner = next(((c, made_by(u, "Add")) for c, u in constants if c is not None), (None, None))
    if inner is None:
        return None
    made = {node.op: node for node in (made_by(t, "ReduceSumSquare", "Gemm") for t in inner.inputs)
            if node is not None}
    square, product = made.get("ReduceSumSquare"), made.get("Gemm")
    weight = constant(product.inputs[1]) if product is not None else None
    if square is None or weight is None or square.inputs[0] is not product.inputs[0]:
        return None
    transposed = weight if product.attrs.get("transB", 0) else weight.T
    centroids = transposed.astype(np.float64) * (-product.attrs.get("alpha", 1.0) / 2)
    shifted = product.inputs[2] if len(product.inputs) > 2 else None
    scaling = made_by(shifted, "Mul")
    zero = shifted is None or (scaling is not None and any(np.all(constant(t) == 0) for t in scaling.inputs
                                                            if constant(t) is not None))
    if not zero or not np.allclose(norms.reshape(-1), (centroids ** 2).sum(1), rtol=1e-5, atol=1e-6):
        return None
    nodes = (square,) + ((scaling,) if scaling is not None else ()) + (product, inner, outer, argmin)
    return KMeans(square.inputs[0], centroids, distances, nodes)


@dataclass(frozen=True)
class OneClass:
    """A one-class SVM: sum_j a_j exp(-gamma |x - u_j|^2) + rho with every a_j > 0 (float64)."""
    vectors: np.ndarray  # [J, F]
    weights: np.ndarray  # [J]
    gamma: float


def one_class(node: gs.Node, features: int) -> OneClass | None:
    """An SVMRegressor with an RBF kernel and positive coefficients (skl2onnx's OneClassSVM), or None."""
    if node.domain != ML or node.op != "SVMRegressor" or _kernel(node) != "RBF":
        return None
    weights = _floats(node, "coefficients")
    if not np.all(weights > 0) or node.attrs.get("one_class", 0):
        return None
    vectors = _floats(node, "support_vectors").reshape(-1, features)
    return OneClass(vectors, weights, float(_floats(node, "kernel_params")[0]))


def _stand_in(graph: gs.Graph, collapsed: Collapsed, op: str, name: str, x: gs.Tensor, weight: np.ndarray,
              bias: np.ndarray, scored: list[str], labels: list[int]) -> gs.Node:
    """Add a canonical dense layer x @ weight.T + bias (weight [C, F], float64) that `collapsed.restore` turns into
    a plain Gemm; `scored`: the model's tensors its scores stand for, `labels`: the class labels in score order."""
    dtype = _float_type(x)
    name = fresh_name(graph, name)
    output = gs.Variable(name, dtype=dtype, shape=[x.shape[0] if x.shape else "N", len(bias)])
    inputs = [x, gs.Constant(fresh_name(graph, f"{name}/weight"), weight.astype(dtype)),
              gs.Constant(fresh_name(graph, f"{name}/bias"), bias.astype(dtype))]
    canonical = gs.Node(op, name, {"scores_of": scored, "labels": labels}, inputs, [output], domain=CANONICAL)
    graph.nodes.append(canonical)
    collapsed.stand_in(canonical, [(gs.Node("Gemm", name, {"transB": 1}), list(inputs), [output])])
    return canonical


def _one_class_twin(graph: gs.Graph, collapsed: Collapsed, node: gs.Node, x: gs.Tensor, model: OneClass) -> gs.Node:
    """The squared distances d_j = sum_i (x_i - u_ji)^2 in plain ops that the walk reads (Reshape, Sub, Mul,
    ReduceSum), and an OutlierScore node that pools them: o = -log(sum_j a_j exp(-gamma d_j)) / gamma, restored as
    plain ops."""
    dtype = _float_type(x)
    batch, (count, features) = (x.shape[0] if x.shape else "N"), model.vectors.shape
    plain = _Plain(graph, f"{node.name}/distances", dtype)
    column = plain("Reshape", x, plain.const([0, 1, features], np.dtype(np.int64)), shape=[batch, 1, features])
    differences = plain("Sub", column, plain.const(model.vectors), shape=[batch, count, features])
    squares = plain("Mul", differences, differences, shape=[batch, count, features])
    distances = plain("ReduceSum", squares, shape=[batch, count], axes=[2], keepdims=0)
    plain.into_graph()
    pool = _Plain(graph, f"{node.name}/outlier_score", dtype)
    h = pool("Sub", distances, pool.const(np.log(model.weights) / model.gamma), shape=[batch, count])
    low = pool("ReduceMin", h, shape=[batch, 1], axes=[1], keepdims=1)
    exponent = pool("Mul", pool("Sub", h, low, shape=[batch, count]), pool.const(-model.gamma), shape=[batch, count])
    total = pool("ReduceSum", pool("Exp", exponent, shape=[batch, count]), shape=[batch, 1], axes=[1], keepdims=1)
    spread = pool("Mul", pool("Log", total, shape=[batch, 1]), pool.const(1 / model.gamma), shape=[batch, 1])
    score = pool("Sub", low, spread, shape=[batch, 1])
    attrs = {"scores_of": [t.name for t in node.outputs], "labels": [], "gamma": model.gamma,
             "log_weights": np.log(model.weights).tolist()}
    name = fresh_name(graph, f"{node.name}/outlier_score")
    canonical = gs.Node(OUTLIER_SCORE, name, attrs, [distances], [score], domain=CANONICAL)
    graph.nodes.append(canonical)
    collapsed.stand_in(canonical, pool.nodes)
    return canonical


def linear_models(graph: gs.Graph, collapsed: Collapsed) -> dict[str, tuple[str, ...]]:
    """Add the twin of every group of scorers that read one input and feed the same outputs: one LinearModel node
    with their mean weight and bias; of every one-class SVM, its distances and an OutlierScore node; and of every
    k-means model, a Centroids node. `collapsed.restore` puts plain ops in place of the canonical nodes. Returns, per
    twin node, the model's nodes it stands beside ("name (op)", for `inspect`)."""
    beside: dict[str, tuple[str, ...]] = {}
    groups: dict[tuple, list[gs.Node]] = {}
    twins: dict[str, gs.Tensor] = {}
    for node in list(graph.nodes):  # twins are appended as it goes
        x = _twin(graph, node.inputs[0], twins, beside) if node.domain == ML and node.op in SCORERS else None
        found = one_class(node, _features(node, x)) if x is not None and node.op == "SVMRegressor" else None
        if found is not None:
            canonical = _one_class_twin(graph, collapsed, node, x, found)
            beside[canonical.name] = (f"{node.name} ({node.op})",)
        elif x is not None:
            groups.setdefault((node.inputs[0].name, _reached(node, graph)), []).append(node)
    for scorers in groups.values():
        x = _twin(graph, scorers[0].inputs[0], twins, beside)
        scores = [SCORERS[node.op](node, _features(node, x)) for node in scorers]
        if len({s.bias.shape for s in scores}) != 1:
            raise LrpError(f"nodes {', '.join(repr(n.name) for n in scorers)}: feed one output with different numbers "
                           f"of classes")
        canonical = _stand_in(graph, collapsed, LINEAR_MODEL, f"{scorers[0].name}/scores", x,
                              np.mean([s.weight for s in scores], axis=0).T, np.mean([s.bias for s in scores], axis=0),
                              [t.name for node in scorers for t in node.outputs],
                              list(scorers[0].attrs.get("classlabels_ints", [])))
        beside[canonical.name] = tuple(f"{n.name} ({n.op})" for n in scorers)
    for argmin in [n for n in graph.nodes if n.op == "ArgMin"]:
        found = kmeans(argmin)
        if found is not None:
            mu = found.centroids
            canonical = _stand_in(graph, collapsed, CENTROIDS, f"{argmin.name}/centroids",
                                  _twin(graph, found.x, twins, beside), 2 * mu, -(mu ** 2).sum(1),
                                  [found.distances.name, argmin.outputs[0].name], list(range(len(mu))))
            beside[canonical.name] = tuple(f"{n.name} ({n.op})" for n in found.nodes)
    return beside


@dataclass(frozen=True)
class Head:
    """What a classic model's output is computed from: its linear model's scores, and the model's label output with
    the class labels in the order of the scores (None for a regressor, or labels that are not integers)."""
    scores: gs.Variable
    label: gs.Variable | None = None
    classes: np.ndarray | None = None


def head_of(graph: gs.Graph, tensor: gs.Tensor) -> Head | None:
    """The linear model whose scorers compute `tensor` (through any head), or None where no scorer does. A tensor
    that also depends on a model input otherwise than through those scores is refused."""
    models = {name: node for node in graph.nodes if node.domain == CANONICAL and node.op in TWINS
              for name in node.attrs["scores_of"]}
    if not models:
        return None
    inputs = {t.name for t in graph.inputs}
    found, direct, stack, seen = {}, [], [tensor], set()
    while stack:
        current = stack.pop()
        if current.name in seen or not isinstance(current, gs.Variable):
            continue
        seen.add(current.name)
        if current.name in models:
            found[models[current.name].name] = models[current.name]
        elif current.name in inputs:
            direct.append(current.name)
        elif current.inputs:
            stack.extend(current.inputs[0].inputs)
    if not found:
        return None
    if len(found) > 1 or direct:
        reason = f"input '{direct[0]}' otherwise than through" if direct else "several separate"
        raise LrpError(f"output '{tensor.name}' is computed from {reason} linear models' scores; onnxlrp explains the "
                       f"scores of one linear model")
    model = next(iter(found.values()))
    labels = model.attrs["labels"]
    label = next((t for t in graph.outputs if t.dtype is not None and np.issubdtype(np.dtype(t.dtype), np.integer)
                  and len(t.shape or [None]) == 1), None)
    if not labels or label is None:
        return Head(model.outputs[0])
    return Head(model.outputs[0], label, np.asarray(labels, dtype=np.dtype(label.dtype)))

"""What is explained (docs/lrp.md §5): the input `target` and its checks, the seed of the walk (the target's logit,
its log-odds or a one-hot), and the same choice of class on the numpy side for the API and `check`."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..canonical.classic import CENTROIDS
from ..errors import LrpError
from ..ir.ops import Ops, Tensor
from .composite import ARCHITECTURES, SUGGESTED
from .emitters import FAMILIES
from .emitters.linear import Dense
from .families import Context, Unsupported
from .rules import Weighted, propagate

EXPLAIN = ("logit", "logodds", "onehot")
LOGODDS_RULES = ("epsilon", "zero")
# The names the built model adds: the input `target`, the output `relevance` (and per token, the embedding's).
TARGET, RELEVANCE, EMBEDDING_RELEVANCE = "target", "relevance", "relevance_embedding"
RELEVANCE_PAIRS = "relevance_pairs"  # of a product under the rule `pairs` (lrp/pairs.py)
STATE_RELEVANCE = "relevance_{}"  # of a recurrent layer's initial state given as the model input named {}
# A language model's logits [N, T, V] are explained at one position: the input `position` (a default at build time).
POSITION = "position"
TARGET_CHECK = TARGET  # the start of the names of the nodes that check the input `target`
EXPLAINED_KEY = "onnxlrp.explained"  # the metadata key of `Explained`
# What the relevance is compared with, by seed: the value the walk starts from sums to it.
VALUES = {"logit": "logit", "logodds": "log-odds", "onehot": "one-hot seed"}
# A relevance total beyond this many times the explained value (in magnitude) is reported, with presets to try.
INFLATION = 100
# What a classifier output holds, by the head skipped above the logits (None: the output is the logits).
SHOWN = {None: "logit", "Softmax": "probability", "Sigmoid": "probability", "LogSoftmax": "log-probability"}


@dataclass(frozen=True)
class Recorded:
    """What a built model explains, stored in its metadata at build time so that `explain`, `check` and the API can
    name it: the composite, the seed (logit, logodds, onehot), the classifier output and the logits tensor behind
    its head, the head skipped, and the architecture ("transformer" or "cnn", for the presets to suggest).
    Models built before it was stored read as all None but `explain`."""
    composite: str | None = None
    explain: str = "logit"
    output: str | None = None
    logits: str | None = None
    head: str | None = None
    architecture: str | None = None

    @property
    def shown(self) -> str:
        """What the classifier output holds: a logit, a probability or a log-probability."""
        return SHOWN.get(self.head, "output")

    def inflation(self, totals: Sequence[float], values: Sequence[float]) -> str | None:
        """One line when the relevance total of some samples is more than INFLATION times the explained value,
        naming the composite and the presets that fit the architecture (both kinds when it is not recorded)."""
        inflated = [(t, v) for t, v in zip(totals, values) if abs(t) > INFLATION * abs(v)]
        if not inflated:
            return None
        total, value = max(inflated, key=lambda pair: abs(pair[0]) - INFLATION * abs(pair[1]))
        kinds = [self.architecture] if self.architecture in SUGGESTED else list(SUGGESTED)
        tries = "; ".join(f"for {ARCHITECTURES[kind]} try " + " or ".join(p for p in SUGGESTED[kind]
                                                                         if p != self.composite)
                          for kind in kinds)
        composite = f"composite {self.composite}" if self.composite else "the composite it was built with"
        return (f"the relevance total is more than {INFLATION} times the explained {VALUES[self.explain]} for "
                f"{len(inflated)} of {len(totals)} sample(s) (e.g. {total:.6g} against {value:.6g}) under "
                f"{composite}: {tries}")

    def store(self, model: onnx.ModelProto) -> None:
        onnx.helper.set_model_props(model, {**{p.key: p.value for p in model.metadata_props},
                                            EXPLAINED_KEY: json.dumps(asdict(self))})

    @classmethod
    def of(cls, model: onnx.ModelProto) -> "Recorded":
        stored = next((p.value for p in model.metadata_props if p.key == EXPLAINED_KEY), None)
        try:
            fields = json.loads(stored) if stored else {}
            return cls(**{k: v for k, v in fields.items() if k in cls.__dataclass_fields__})
        except (ValueError, TypeError):
            return cls()


def one_hot_target(ops: Ops, logits: Tensor, target: Tensor, classes: int,
                   label: tuple[Tensor, np.ndarray] | None = None) -> Tensor:
    """One-hot rows of the class to explain: `target`, or the predicted class where target < 0: the arg-max of the
    logits, or where the model has a label output (a classic model's), the position of its label in the class labels.

    A target of length 1 applies to the whole batch. Other lengths than N or 1, and classes >= C, make ONNX Runtime
    fail in nodes whose names (which its error message quotes) say what is wrong with `target`.
    """
    predicted = ops("ArgMax", logits if label is None else _label_rows(ops, *label), axis=1, keepdims=0)
    length = f"{TARGET_CHECK}: its length must be the batch size or 1"
    chosen = _named(ops, ops("Where", ops("Less", target, ops.scalar(0, np.int64)), predicted, target), length)
    labels = ops.const(np.arange(classes), dtype=np.dtype(np.int64))
    # The checks are a side branch that adds zero: their outputs' batch dimension is unknown to ONNX Runtime's
    # shape inference, and a relevance graph without the batch symbol N loads quadratically slower (bench/).
    exact = _named(ops, ops("Reshape", chosen, ops("Shape", predicted)), f"{length} (the batch size is 1 here)")
    in_range = _named(ops, ops("Gather", labels, exact),
                      f"{TARGET_CHECK}: each class must be below the number of classes, {classes}")
    zero = ops("Mul", ops.reduce_sum(in_range, [0], keepdims=False), ops.scalar(0, np.int64))
    chosen = ops("Add", chosen, zero)
    return ops("Cast", ops("Equal", ops.unsqueeze(chosen, [1]), labels),
               to=onnx.helper.np_dtype_to_tensor_dtype(ops.dtype))


def _label_rows(ops: Ops, label: Tensor, classes: np.ndarray) -> Tensor:
    """Rows of 1 at the position of each sample's label among the class labels, 0 elsewhere."""
    known = ops.const(classes, dtype=classes.dtype)
    return ops("Cast", ops("Equal", ops.unsqueeze(label, [1]), known), to=onnx.TensorProto.INT32)


def _named(ops: Ops, tensor: gs.Variable, name: str) -> gs.Variable:
    """Rename the node that computes `tensor` (ONNX Runtime's errors quote node names)."""
    tensor.inputs[0].name = ops.fresh(name)
    return tensor


def start(ctx: Context, logits: gs.Variable, target: Tensor, classes: int, explain: str,
          label: tuple[Tensor, np.ndarray] | None = None) -> tuple[Tensor, Tensor]:
    """The tensor where the walk starts and its relevance (`label`: see one_hot_target). A k-means model's logit
    is its cluster logit (`_cluster_logit`)."""
    ops = ctx.ops
    ops.scope = "lrp/top"
    hot = one_hot_target(ops, logits, target, classes, label)
    if explain == "onehot":
        return logits, hot
    if explain == "logit" and logits.inputs and logits.inputs[0].op == CENTROIDS:
        return _cluster_logit(ctx, logits, hot)
    if explain == "logit":
        return logits, ops("Mul", hot, logits)
    return _logodds(ctx, logits, hot)


def start_at_position(ctx: Context, logits: gs.Variable, target: Tensor, position: Tensor, classes: int,
                      explain: str, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """The seed of a sequence of logits [N, T, V] (a language model's): the target's logit (or a one-hot) at one
    position per sample, 0 elsewhere. A position >= 0 is an index; a negative one counts back from the end of each
    sample's tokens, which is the last position where the attention `mask` is 1 (without a mask, T - 1): -1 is
    the next token after the prompt, left or right padded. The mask may be longer than T (it covers a KV cache
    too): its positions are counted from its end."""
    if explain not in ("logit", "onehot"):
        raise LrpError(f"--explain {explain} explains a classifier output [N, C]; a sequence of logits [N, T, V] "
                       f"takes --explain logit or onehot")
    ops = ctx.ops
    ops.scope = "lrp/top"
    length = ops.length(logits, 1)
    steps = ops.arange(length)  # [T]
    end = length  # one past each sample's last token: T, or T - (M - (m + 1)) for the largest index m with mask 1
    if mask is not None:  # of a mask of length M
        masked = ops.length(mask, 1)
        marks = ops("Range", ops.scalar(1, np.int64), ops("Add", masked, ops.scalar(1, np.int64)),
                    ops.scalar(1, np.int64))
        filled = ops("Mul", ops("Cast", mask, to=onnx.TensorProto.INT64), marks)  # m + 1 where the mask is 1
        end = ops("Sub", ops("Add", length, ops.reduce_max(filled, [1], keepdims=False)), masked)
    counted = ops("Add", end, position)
    at = ops("Where", ops("Less", position, ops.scalar(0, np.int64)), counted, position)
    chosen = ops("Cast", ops("Equal", ops.unsqueeze(steps, [0]), ops.unsqueeze(at, [-1])),
                 to=onnx.helper.np_dtype_to_tensor_dtype(ops.dtype))  # [N or 1, T]
    chosen = ops.unsqueeze(chosen, [2])
    selected = ops.reduce_sum(ops("Mul", logits, chosen), [1], keepdims=False)  # [N, V]
    hot = ops("Mul", chosen, ops.unsqueeze(one_hot_target(ops, selected, target, classes), [1]))
    return logits, hot if explain == "onehot" else ops("Mul", hot, logits)


@dataclass
class Differences(Weighted):
    """The last dense layer as the differences z_c' = y_c - y_c' of each sample's class c (weights w_c - w_c',
    biases b_c - b_c'), computed from the layer's own parameters: its input-gradient is w_c * sum(s) - W s."""
    layer: Dense
    hot: Tensor
    output: Tensor

    @property
    def x(self) -> Tensor:
        return self.layer.x

    def parameters(self) -> tuple[Tensor, Tensor | None]:
        return self.layer.parameters()

    def forward(self, ops: Ops, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        scores = self.layer.forward(ops, x, weight, bias)
        return ops("Sub", ops.reduce_sum(ops("Mul", self.hot, scores), [1]), scores)

    def backward(self, ops: Ops, s: Tensor, weight: Tensor) -> Tensor:
        chosen_weight = self.layer.backward(ops, self.hot, weight)  # the row w_c of each sample
        return ops("Sub", ops("Mul", chosen_weight, ops.reduce_sum(s, [1])), self.layer.backward(ops, s, weight))

    def constant_input(self, ops: Ops, values: np.ndarray) -> Tensor:
        return self.layer.constant_input(ops, values)


def _last_dense(ctx: Context, logits: gs.Variable, what: str) -> tuple[gs.Node, Dense]:
    """The dense layer that computes the logits (a Gemm or MatMul, or a classic model's twin), or `what` needs one."""
    producer = logits.inputs[0] if logits.inputs else None
    family = FAMILIES.get(producer.op) if producer is not None else None
    try:
        layer = family.describe(ctx, producer) if family is not None else None
    except Unsupported:
        layer = None
    if not isinstance(layer, Dense):
        raise LrpError(f"{what} needs the logits to come straight from a dense layer (Gemm or MatMul, or a "
                       f"classic model's linear model)")
    return producer, layer


def _differences(ops: Ops, logits: Tensor, hot: Tensor) -> tuple[Tensor, Tensor]:
    """z_c' = y_c - y_c' (0 at c' = c), and where c' = c (boolean)."""
    chosen_logit = ops.reduce_sum(ops("Mul", hot, logits), [1])
    return ops("Sub", chosen_logit, logits), ops("Cast", hot, to=onnx.TensorProto.BOOL)


def _logodds(ctx: Context, logits: gs.Variable, hot: Tensor) -> tuple[Tensor, Tensor]:
    """Explain log(P(c) / (1 - P(c))) through the last dense layer, replaced by the differences
    z_c' = y_c - y_c' and a reverse log-sum-exp pooling that gives R_c' = z_c' * softmin_c'(z); the layer's rule
    (epsilon or zero) then runs on the differences, which needs no per-class weight copies."""
    producer, layer = _last_dense(ctx, logits, "--explain logodds")
    rule, params = ctx.rule(producer)
    if rule.name not in LOGODDS_RULES:
        raise LrpError(f"--explain logodds supports the {' or '.join(LOGODDS_RULES)} rule on the last layer "
                       f"'{producer.name}' (the composite gives it {rule.name})")
    if params.get("epsilon_scale") and "epsilon_scale" in rule.params:
        raise LrpError(f"--explain logodds does not support epsilon_scale on the last layer '{producer.name}'")
    ops = ctx.ops
    differences, own = _differences(ops, logits, hot)
    weights = ops("Softmax", ops("Where", own, ops.scalar(-np.inf), ops("Neg", differences)), axis=1)  # softmin
    pair_relevance = ops("Mul", differences, weights)
    lower = propagate(ctx, producer, Differences(layer, hot, differences), [pair_relevance])
    return layer.x, lower[0]


def _cluster_logit(ctx: Context, logits: gs.Variable, hot: Tensor) -> tuple[Tensor, Tensor]:
    """NEON for k-means (Kauffmann et al., arXiv 1906.07633): the logit of cluster c is f_c = min_k h_k over the
    competitors k, h_k = y_c - y_k = |x - mu_k|^2 - |x - mu_c|^2 the linear discriminant between c and k (> 0 for
    all k where x is in c). Min-take-most: R_k = f_c softmin_k(stiffness h), then the Centroids layer's rule
    (midpoint) on the discriminants."""
    producer, layer = _last_dense(ctx, logits, "a k-means model's logit")
    _, params = ctx.rule(producer)
    ops = ctx.ops
    differences, own = _differences(ops, logits, hot)
    logit = ops.reduce_min(ops("Where", own, ops.scalar(np.inf), differences), [1])
    exponents = ops("Where", own, ops.scalar(-np.inf), ops("Mul", differences, ops.scalar(-params["stiffness"])))
    pair_relevance = ops("Mul", ops("Softmax", exponents, axis=1), logit)
    lower = propagate(ctx, producer, Differences(layer, hot, differences), [pair_relevance])
    return layer.x, lower[0]


def chosen_classes(target: int | np.ndarray | None, batch: int, classes: int) -> np.ndarray:
    """The `target` to feed for a batch: one class per sample (negative: the predicted class), or an LrpError
    for a class out of range or a length that is neither 1 nor the batch."""
    chosen = np.full(batch, -1, dtype=np.int64) if target is None else np.asarray(target, dtype=np.int64)
    chosen = np.broadcast_to(chosen, (batch,)).copy() if chosen.ndim == 0 else chosen
    if chosen.shape != (batch,):
        raise LrpError(f"target: expected one class per sample ({batch}), got shape {list(chosen.shape)}")
    if np.any(chosen >= classes):
        raise LrpError(f"target: class {int(chosen.max())} is out of range (the model has "
                       f"{classes} classes, 0 to {classes - 1})")
    return chosen


def explained_value(mode: str, logits: np.ndarray, chosen: int) -> tuple[str, float]:
    """What the seed of the walk sums to for one sample: the logit, the log-odds or 1 (one-hot)."""
    if mode == "logodds":
        others = np.delete(logits.astype(np.float64), chosen)
        return VALUES[mode], float(logits[chosen] - np.log(np.exp(others - others.max()).sum()) - others.max())
    return VALUES[mode], 1.0 if mode == "onehot" else float(logits[chosen])

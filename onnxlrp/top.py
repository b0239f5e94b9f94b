"""The top layer (LRP.md §5): which class is explained and the relevance the walk starts from."""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .errors import LrpError
from .linear import Dense, linear_layer
from .ops import Ops, Tensor
from .registry import Context, Unsupported
from .rules import RULES

EXPLAIN = ("logit", "logodds", "onehot")
LOGODDS_RULES = ("epsilon", "zero")
TARGET_CHECK = "target"  # the start of the names of the nodes that check the input `target`


def _producer(tensor: Tensor, op: str) -> gs.Node | None:
    node = tensor.inputs[0] if isinstance(tensor, gs.Variable) and tensor.inputs else None
    return node if node is not None and node.op == op else None


def written_out_softmax(tensor: Tensor) -> Tensor | None:
    """The logits of a softmax (or log-softmax) that an exporter wrote out: Exp(t) / ReduceSum(Exp(t)), or
    t - Log(ReduceSum(Exp(t))), where t may be x - ReduceMax(x) (then x is returned). None if it is not one."""
    divide, subtract = _producer(tensor, "Div"), _producer(tensor, "Sub")
    logits = None
    if divide is not None:
        exp, total = (_producer(t, op) for t, op in zip(divide.inputs, ("Exp", "ReduceSum")))
        if exp is not None and total is not None and total.inputs[0] is divide.inputs[0]:
            logits = exp.inputs[0]
    elif subtract is not None:
        log = _producer(subtract.inputs[1], "Log")
        total = _producer(log.inputs[0], "ReduceSum") if log is not None else None
        exp = _producer(total.inputs[0], "Exp") if total is not None else None
        if exp is not None and exp.inputs[0] is subtract.inputs[0]:
            logits = subtract.inputs[0]
    shifted = _producer(logits, "Sub") if logits is not None else None
    if shifted is not None:
        peak = _producer(shifted.inputs[1], "ReduceMax")
        if peak is not None and peak.inputs[0] is shifted.inputs[0]:
            return shifted.inputs[0]
    return logits


def one_hot_target(ops: Ops, logits: Tensor, target: Tensor, classes: int) -> Tensor:
    """One-hot rows of the class to explain: `target`, or the predicted class where target < 0.

    A target of length 1 applies to the whole batch. Other lengths than N or 1, and classes >= C, make ONNX Runtime
    fail in nodes whose names (which its error message quotes) say what is wrong with `target`.
    """
    predicted = ops("ArgMax", logits, axis=1, keepdims=0)
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


def _named(ops: Ops, tensor: gs.Variable, name: str) -> gs.Variable:
    """Rename the node that computes `tensor` (ONNX Runtime's errors quote node names)."""
    tensor.inputs[0].name = ops.fresh(name)
    return tensor


def start(ctx: Context, logits: gs.Variable, target: Tensor, classes: int, explain: str) -> tuple[Tensor, Tensor]:
    """The tensor where the walk starts and its relevance."""
    ops = ctx.ops
    ops.scope = "lrp/top"
    hot = one_hot_target(ops, logits, target, classes)
    if explain == "onehot":
        return logits, hot
    if explain == "logit":
        return logits, ops("Mul", hot, logits)
    return _logodds(ctx, logits, hot)


def _logodds(ctx: Context, logits: gs.Variable, hot: Tensor) -> tuple[Tensor, Tensor]:
    """Explain log(P(c) / (1 - P(c))) through the last dense layer, replaced by the differences
    z_c' = y_c - y_c' and a reverse log-sum-exp pooling that gives R_c' = z_c' * softmin_c'(z).

    With the epsilon (or zero) rule on that layer, the rule over the weights w_c - w_c' is
    R = a * (w_c * sum(s) - W s), s = R_c' / stab(z_c'), which needs no per-class weight copies.
    """
    producer = logits.inputs[0] if logits.inputs else None
    try:
        layer = linear_layer(producer) if producer is not None else None
    except Unsupported:
        layer = None
    if not isinstance(layer, Dense):
        raise LrpError("--explain logodds needs the logits to come straight from a dense layer (Gemm or MatMul)")
    rule, params = ctx.rule(producer)
    if rule not in LOGODDS_RULES:
        raise LrpError(f"--explain logodds supports the {' or '.join(LOGODDS_RULES)} rule on the last layer "
                       f"'{producer.name}' (the composite gives it {rule})")
    if rule == "epsilon" and params.get("epsilon_scale"):
        raise LrpError(f"--explain logodds does not support epsilon_scale on the last layer '{producer.name}'")
    ops = ctx.ops
    chosen_logit = ops.reduce_sum(ops("Mul", hot, logits), [1])
    differences = ops("Sub", chosen_logit, logits)  # z_c' = y_c - y_c', 0 at c' = c
    exponents = ops("Where", ops("Cast", hot, to=onnx.TensorProto.BOOL), ops.scalar(-np.inf),
                    ops("Neg", differences))
    weights = ops("Softmax", exponents, axis=1)  # softmin over c' != c
    pair_relevance = ops("Mul", differences, weights)
    epsilon = {**params, **RULES[rule].fixed}["epsilon"]
    s = ops.divide_stabilized(pair_relevance, differences, epsilon)
    chosen_weight = layer.backward(ops, hot, layer.weight)  # the row w_c of each sample
    gradient = ops("Sub", ops("Mul", chosen_weight, ops.reduce_sum(s, [1])), layer.backward(ops, s, layer.weight))
    x = producer.inputs[0]
    return x, ops("Mul", x, gradient)

"""Recurrent nets (issue 20 item 1): LSTM, GRU and RNN layers from torch and Keras (tf2onnx), and written with
onnx.helper for what the exporters leave out (sequence_lens, direction reverse, linear_before_reset = 0, a constant
initial state), explained by the signal-take-all rule of Arras et al. (docs/rules.md). The references are float64
numpy implementations of the rule (fixtures/recurrent_reference.py, checked against Arras et al.'s published formulas
when the fixtures are made: fixtures/make_recurrent.py, make_recurrent_keras.py)."""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
from onnx import helper

from conftest import FIXTURES, explain, relative_error, run
from onnxlrp import load_composite
from onnxlrp.canonical.passes import canonicalize
from onnxlrp.canonical.quantized import TWIN
from onnxlrp.errors import LrpError
from onnxlrp.pipeline import build

RECURRENT = FIXTURES / "recurrent"
TORCH = np.load(RECURRENT / "reference.npz")
KERAS = np.load(RECURRENT / "keras.npz")
STATES = np.load(RECURRENT / "states.npz")
MODELS = {**{name: TORCH for name in ("lstm", "lstm_bidi2", "gru", "gru_bidi", "rnn_bidi2", "lstm_lens",
                                      "gru_reverse")},
          **{name: KERAS for name in ("keras_lstm", "keras_bidi", "keras_gru")}}
BUILT: dict[str, onnx.ModelProto] = {}


def built(name: str) -> onnx.ModelProto:
    if name not in BUILT:
        BUILT[name] = explain(onnx.load(str(RECURRENT / f"{name}.onnx")), "epsilon")
    return BUILT[name]


def feeds(name: str) -> dict[str, np.ndarray]:
    references = MODELS[name]
    given = {"x": references["x"]}
    if name == "lstm_lens":
        given["lens"] = references["lens"]
    return given


@pytest.mark.parametrize("name", list(MODELS))
def test_relevance_matches_the_float64_reference(name):
    references = MODELS[name]
    model = built(name)
    logits, relevance = run(model, {**feeds(name), "target": references["targets"]},
                            [model.graph.output[0].name, "relevance"])
    assert relevance.shape == references["x"].shape  # [N, T, F]
    assert relative_error(relevance.astype(np.float64), references[f"{name}/relevance"]) <= 1e-4
    np.testing.assert_allclose(logits, references[f"{name}/logits"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", list(MODELS))
def test_outputs_are_the_models_own(name):
    """The model's own recurrent nodes compute the outputs, bit for bit; only the relevance is written out (a Loop
    is written out as copies of its body, which compute what it computes)."""
    original = onnx.load(str(RECURRENT / f"{name}.onnx"))
    expected = run(original, feeds(name))
    actual = run(built(name), {**feeds(name), "target": MODELS[name]["targets"]},
                 [o.name for o in original.graph.output])
    for want, got in zip(expected, actual):
        assert np.array_equal(want, got)
    cells = [n.name for n in original.graph.node if n.op_type in ("LSTM", "GRU", "RNN")]
    assert cells == [n.name for n in built(name).graph.node if n.op_type in ("LSTM", "GRU", "RNN")]


def test_padded_steps_get_exactly_zero():
    lens = TORCH["lens"]
    relevance = run(built("lstm_lens"), {**feeds("lstm_lens"), "target": TORCH["targets"]}, ["relevance"])[0]
    for sample, length in enumerate(lens):
        assert np.all(relevance[sample, length:] == 0)
        assert np.all(relevance[sample, :length] != 0)


def with_attribute(name: str, **attrs) -> onnx.ModelProto:
    model = onnx.load(str(RECURRENT / f"{name}.onnx"))
    node = next(n for n in model.graph.node if n.op_type in ("LSTM", "GRU", "RNN"))
    node.attribute.extend(helper.make_attribute(key, value) for key, value in attrs.items())
    return model


@pytest.mark.parametrize("name, attrs, message", [
    ("lstm_lens", {"activations": ["Sigmoid", "Relu", "Tanh"] * 2},
     "model: node 'lstm' (LSTM): activations Sigmoid, Relu, Tanh, Sigmoid, Relu, Tanh are not explained (only the "
     "default Sigmoid, Tanh, Tanh)"),
    ("gru_reverse", {"clip": 3.0},
     "model: node 'gru' (GRU): attribute clip=3.0 is not explained (only the cell as Arras et al. define it)"),
])
def test_other_cells_are_refused_in_one_line(name, attrs, message):
    with pytest.raises(LrpError) as refusal:
        explain(with_attribute(name, **attrs), "epsilon")
    assert str(refusal.value) == message


def test_default_activations_named_are_explained():
    """activations that name the defaults (any case) are the default cell."""
    model = with_attribute("gru_reverse", activations=["sigmoid", "TANH"])
    relevance = run(explain(model, "epsilon"), {"x": TORCH["x"], "target": TORCH["targets"]}, ["relevance"])[0]
    assert relative_error(relevance.astype(np.float64), TORCH["gru_reverse/relevance"]) <= 1e-4


def test_batch_first_layout_is_written_out_as_the_same_cell():
    """lstm_lens with layout = 1 (x [N, T, F] and Y_h [N, D, H], no Transposes), which ONNX Runtime does not run:
    its written-out cells compute the reference's logits."""
    model = onnx.load(str(RECURRENT / "lstm_lens.onnx"))
    lstm = next(n for n in model.graph.node if n.op_type == "LSTM")
    lstm.input[0] = "x"
    lstm.attribute.append(helper.make_attribute("layout", 1))
    reshape = next(n for n in model.graph.node if n.op_type == "Reshape")
    reshape.input[0] = "Y_h"
    kept = [n for n in model.graph.node if n.op_type != "Transpose"]
    del model.graph.node[:]
    model.graph.node.extend(kept)
    written = gs.export_onnx(canonicalize(model))
    written.ir_version = model.ir_version
    assert not any(n.op_type == "LSTM" for n in written.graph.node)
    logits = run(written, feeds("lstm_lens"))[0]
    np.testing.assert_allclose(logits, TORCH["lstm_lens/logits"], rtol=1e-5, atol=1e-6)


def test_an_initial_state_given_as_input_leaves_the_relevance_of_x_as_it_was():
    """gru_reverse with its initial state as a model input: the relevance of x is the reference's, where the same
    state is a constant (whose share stays with it, as a bias's does), and the state's share is an output."""
    model = onnx.load(str(RECURRENT / "gru_reverse.onnx"))
    h0 = next(onnx.numpy_helper.to_array(t) for t in model.graph.initializer if t.name == "h0")
    kept = [n for n in model.graph.node if n.op_type != "Expand"]
    del model.graph.node[:]
    model.graph.node.extend(kept)
    model.graph.input.append(helper.make_tensor_value_info("initial_h", onnx.TensorProto.FLOAT, list(h0.shape[:1])
                                                           + [len(TORCH["x"]), h0.shape[2]]))
    state = np.broadcast_to(h0, (1, len(TORCH["x"]), h0.shape[2])).astype(np.float32)
    relevance, shared = run(explain(model, "epsilon"), {"x": TORCH["x"], "initial_h": state,
                                                       "target": TORCH["targets"]},
                            ["relevance", "relevance_initial_h"])
    assert relative_error(relevance.astype(np.float64), TORCH["gru_reverse/relevance"]) <= 1e-4
    assert shared.shape == state.shape and np.all(np.abs(shared).sum(axis=(0, 2)) > 1e-3)


@pytest.mark.parametrize("name, states", [("lstm_states", ("h0", "c0")), ("gru_states", ("h0_1", "h0_2"))])
def test_initial_states_given_as_inputs_get_the_references_relevance(name, states):
    """Initial states that are model inputs are explained beside x: each one's relevance is the output
    `relevance_<input>` of its shape, as the float64 reference gives it (fixtures/make_recurrent_states.py: a
    bidirectional LSTM with sequence_lens and h0, c0; two stacked GRUs with a state each)."""
    references = STATES
    model = explain(onnx.load(str(RECURRENT / f"{name}.onnx")), "epsilon")
    feeds = {"x": references["x"], **{state: references[f"{name}/{state}"] for state in states}}
    if name == "lstm_states":
        feeds["lens"] = references["lens"]
    names = ["logits", "relevance", *(f"relevance_{state}" for state in states)]
    logits, relevance, *shares = run(model, {**feeds, "target": references["targets"]}, names)
    np.testing.assert_allclose(logits, references[f"{name}/logits"], rtol=1e-4, atol=1e-5)
    assert relative_error(relevance.astype(np.float64), references[f"{name}/relevance"]) <= 1e-4
    for state, share in zip(states, shares):
        assert share.shape == feeds[state].shape
        assert relative_error(share.astype(np.float64), references[f"{name}/relevance_{state}"]) <= 1e-4


def test_float16_keeps_the_models_own_recurrent_nodes_in_float32():
    """ONNX Runtime 1.31's CPU provider crashes on written-out recurrent nets in float16 under ORT_ENABLE_ALL: the
    session here uses ORT_ENABLE_EXTENDED."""
    half = build(onnx.load(str(RECURRENT / "lstm.onnx")), load_composite("epsilon"), dtype="float16")
    lstm = next(n for n in half.graph.node if n.op_type == "LSTM")
    weights = {t.name: t.data_type for t in half.graph.initializer}
    assert all(weights[name] == onnx.TensorProto.FLOAT for name in lstm.input if name in weights)
    assert any(t.data_type == onnx.TensorProto.FLOAT16 and t.name.startswith(TWIN) for t in half.graph.initializer)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    session = ort.InferenceSession(half.SerializeToString(), options, providers=["CPUExecutionProvider"])
    logits, relevance = session.run(["logits", "relevance"], {"x": TORCH["x"], "target": TORCH["targets"]})
    assert np.array_equal(logits, run(onnx.load(str(RECURRENT / "lstm.onnx")), {"x": TORCH["x"]})[0])
    assert relative_error(relevance.astype(np.float64), TORCH["lstm/relevance"]) < 2e-2

"""Idioms of real exporters (issue 7): open input sizes and computed shapes, layout idioms, written-out heads and
one-hot encoded integer inputs. Every fixture builds under every preset with its outputs unchanged; uniform LRP-0
equals gradient x input where the model is piecewise linear."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxlrp
from conftest import relative_error, run, session

PRESETS = onnxlrp.preset_names()


def model_of(nodes, inputs, outputs, init, opset=13) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "exported", inputs, outputs,
                              [numpy_helper.from_array(np.asarray(v), k) for k, v in init.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 7 if opset < 19 else 9
    onnx.checker.check_model(model)
    return model


def floats(rng, *shape, scale=1.0):
    return (rng.normal(size=shape) * scale).astype(np.float32)


def computed_shape(source: str, divisors, out: str) -> list:
    """Shape(source) / divisors through float arithmetic, as torch exports chunk sizes."""
    return [helper.make_node("Shape", [source], [f"{out}_shape"]),
            helper.make_node("Cast", [f"{out}_shape"], [f"{out}_f"], to=TensorProto.FLOAT),
            helper.make_node("Div", [f"{out}_f", f"{out}_divisors"], [f"{out}_m"]),
            helper.make_node("Cast", [f"{out}_m"], [out], to=TensorProto.INT64)], \
        {f"{out}_divisors": np.asarray(divisors, np.float32)}


def dynamic_cnn(rng) -> onnx.ModelProto:
    """Input [N, 3, ?, ?]; the head flattens with a Reshape to a computed [N, -1] (opset 11)."""
    shape_nodes, init = computed_shape("pooled", [1, 1, 1, 1], "flat_shape")
    init.update(w0=floats(rng, 4, 3, 3, 3, scale=0.3), w1=floats(rng, 4 * 2 * 3, 5, scale=0.3),
                zero=np.array([0], np.int64), one=np.array([1], np.int64))
    nodes = [helper.make_node("Conv", ["input", "w0"], ["c0"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c0"], ["r0"], name="relu"),
             helper.make_node("MaxPool", ["r0"], ["pooled"], name="pool", kernel_shape=[4, 4], strides=[4, 4]),
             *shape_nodes,
             helper.make_node("Constant", [], ["minus_one"], value=numpy_helper.from_array(np.array([-1]))),
             helper.make_node("Slice", ["flat_shape", "zero", "one"], ["batch"]),
             helper.make_node("Concat", ["batch", "minus_one"], ["flat_target"], axis=0),
             helper.make_node("Reshape", ["pooled", "flat_target"], ["flat"], name="flatten"),
             helper.make_node("MatMul", ["flat", "w1"], ["logits"], name="head")]
    return model_of(nodes, [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, "H", "W"])],
                    [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 5])], init, opset=11)


def shufflenet_block(rng) -> onnx.ModelProto:
    """Batch fixed at 1: chunk along channels with computed split points, a branch, Concat, a channel shuffle
    written as Reshape/Transpose/Reshape with computed shapes."""
    half, init = computed_shape("c0", [1, 2, 1, 1], "half_shape")
    shuffle, more = computed_shape("joined", [1, 2, 1, 1], "groups_shape")
    init.update(more)
    init.update(w0=floats(rng, 8, 2, 3, 3, scale=0.3), wb=floats(rng, 4, 4, 1, 1, scale=0.5),
                w1=floats(rng, 8, 4, scale=0.3), two=np.array([2], np.int64), one=np.array([1], np.int64),
                zero=np.array([0], np.int64), big=np.array([2**62], np.int64),
                shuffled_shape=np.array([1, 8, 6, 6], np.int64))
    nodes = [helper.make_node("Conv", ["input", "w0"], ["c0"], name="conv", pads=[1, 1, 1, 1]),
             *half,
             helper.make_node("Slice", ["half_shape", "one", "two"], ["split_at"]),
             helper.make_node("Slice", ["c0", "zero", "split_at", "one"], ["left"], name="chunk_left"),
             helper.make_node("Slice", ["c0", "split_at", "big", "one"], ["right"], name="chunk_right"),
             helper.make_node("Conv", ["right", "wb"], ["b0"], name="branch"),
             helper.make_node("Relu", ["b0"], ["b1"], name="branch_relu"),
             helper.make_node("Concat", ["left", "b1"], ["joined"], name="concat", axis=1),
             *shuffle,
             helper.make_node("Constant", [], ["twos"], value=numpy_helper.from_array(np.array([2], np.int64))),
             helper.make_node("Concat", ["twos", "groups_shape"], ["five_d"], axis=0),
             helper.make_node("Slice", ["five_d", "zero", "big", "zero"], ["grouped_shape"]),
             helper.make_node("Reshape", ["joined", "grouped_shape"], ["grouped"], name="group"),
             helper.make_node("Transpose", ["grouped"], ["swapped"], name="swap", perm=[1, 0, 2, 3, 4]),
             helper.make_node("Reshape", ["swapped", "shuffled_shape"], ["shuffled"], name="ungroup"),
             helper.make_node("GlobalAveragePool", ["shuffled"], ["g"], name="gap"),
             helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "w1"], ["logits"], name="head")]
    return model_of(nodes, [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 2, 6, 6])],
                    [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 4])], init, opset=11)


def assert_builds_everywhere(source: onnx.ModelProto, feeds: dict, exact: bool = False, feed: str = "input",
                             **options) -> dict:
    """Build under every preset: original outputs unchanged, relevance finite, non-zero, of the shape of the input
    `feed`. Returns the relevance per preset."""
    expected = run(source, feeds)
    names = [o.name for o in source.graph.output]
    found = {}
    for preset in PRESETS:
        built = onnxlrp.build(source, onnxlrp.load_composite(preset), **options)
        *outputs, relevance = run(built, feeds, names + ["relevance"])
        for produced, wanted in zip(outputs, expected):
            if exact:
                np.testing.assert_array_equal(produced, wanted, err_msg=preset)
            else:
                np.testing.assert_allclose(produced, wanted, rtol=1e-5, atol=1e-6, err_msg=preset)
        assert relevance.shape == feeds[feed].shape, preset
        assert np.all(np.isfinite(relevance)) and np.any(relevance != 0), preset
        found[preset] = relevance
    return found


def assert_zero_is_gradient_times_input(source: onnx.ModelProto, x: np.ndarray, target: int, **options) -> None:
    built = onnxlrp.build(source, onnxlrp.load_composite("zero"), **options)
    relevance = run(built, {"input": x, "target": np.array([target])}, ["relevance"])[0]
    gradient = gradient_one_at_a_time(source, x, target)
    assert relative_error(relevance, x * gradient) < 1e-3


def gradient_one_at_a_time(source: onnx.ModelProto, x: np.ndarray, target: int, step: float = 1e-3) -> np.ndarray:
    """Central differences, one sample per run (also for models with a fixed batch of 1)."""
    model = session(source)
    logit = lambda value: model.run(None, {"input": value.reshape(x.shape)})[0][0, target]
    flat, eye = x.reshape(-1), np.eye(x.size, dtype=np.float32) * step
    return np.array([(logit(flat + e) - logit(flat - e)) / (2 * step) for e in eye]).reshape(x.shape)


def test_open_input_sizes_are_given_on_the_command_line(rng):
    source = dynamic_cnn(rng)
    x = floats(rng, 2, 3, 8, 12)
    assert_builds_everywhere(source, {"input": x}, input_shape="input:N,3,8,12")
    assert_zero_is_gradient_times_input(source, x[:1], 3, input_shape="N,3,8,12")
    with pytest.raises(onnxlrp.LrpError, match="input 'input' has open dimensions .N,3,H,W. .*--input-shape"):
        explain_plain(source)
    built = onnxlrp.build(source, onnxlrp.load_composite("zero"), input_shape="input:N,3,8,12")
    assert [d.dim_param or d.dim_value for d in built.graph.input[0].type.tensor_type.shape.dim] == ["N", 3, 8, 12]


def explain_plain(source: onnx.ModelProto, **options) -> onnx.ModelProto:
    return onnxlrp.build(source, onnxlrp.load_composite("epsilon"), **options)


@pytest.mark.parametrize("text,fragment", [("input:N,3,8", "gives 3 dimensions"), ("nope:N,3,8,8", "no input 'nope'"),
                                           ("input:N,3,,8", "expected [NAME:]DIMS"),
                                           ("input:N,4,8,8", "fixes at 3")])
def test_bad_input_shapes_name_the_problem(text, fragment, rng):
    with pytest.raises(onnxlrp.LrpError) as error:
        explain_plain(dynamic_cnn(rng), input_shape=text)
    assert fragment in str(error.value)


def test_fixed_batch_shufflenet_block_builds(rng):
    source = shufflenet_block(rng)
    x = floats(rng, 1, 2, 6, 6)
    assert_builds_everywhere(source, {"input": x})
    assert_zero_is_gradient_times_input(source, x, 2)


def test_observed_shapes_keep_the_batch_symbolic(rng):
    import onnx_graphsurgeon as gs
    from onnxlrp.ir.shapes import infer_shapes, observe_shapes, with_input_shapes
    graph = gs.import_onnx(with_input_shapes(dynamic_cnn(rng), [("input", ["N", 3, 8, 12])], "test"))
    infer_shapes(graph)
    flat = graph.tensors()["flat"]
    assert flat.shape is None or not isinstance(flat.shape[1], int)  # inference cannot follow the Reshape
    assert observe_shapes(graph)
    assert flat.shape == ["N", 24]


def test_shape_runs_feed_the_weights(rng, monkeypatch):
    """The ONNX Runtime runs that fold shape arithmetic and observe shapes get the large weights as feeds, not
    serialized into their models (each run took seconds on ViT-B/16); what they fold is the same."""
    nodes = [helper.make_node("MatMul", ["input", "w"], ["hidden"]), helper.make_node("Shape", ["hidden"], ["shape"]),
             helper.make_node("Slice", ["shape", "one", "two"], ["width"]),
             helper.make_node("Concat", ["minus_one", "width"], ["flat_shape"], axis=0),
             helper.make_node("Reshape", ["hidden", "flat_shape"], ["flat"]),
             helper.make_node("MatMul", ["flat", "w2"], ["logits"])]
    ints = {name: np.array([value], np.int64) for name, value in (("one", 1), ("two", 2), ("minus_one", -1))}
    model = model_of(nodes, [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 8])],
                     [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])],
                     {"w": floats(rng, 8, 1024), "w2": floats(rng, 1024, 3, scale=0.1), **ints})
    from onnxlrp import pipeline
    from onnxlrp.ir import shapes
    serialized, counting = [], [True]
    real, real_check = shapes.ort.InferenceSession, pipeline.require_loadable
    monkeypatch.setattr(shapes.ort, "InferenceSession", lambda blob, *args, **kwargs: (
        counting[0] and serialized.append(len(blob))) or real(blob, *args, **kwargs))

    def load_check(*args):  # the built model's load check is not a shape run
        counting[0] = False
        real_check(*args)
    monkeypatch.setattr(pipeline, "require_loadable", load_check)
    built = onnxlrp.build(model, "zero")
    monkeypatch.undo()
    assert serialized and max(serialized) < 4 * 1024, serialized
    assert not any(node.op_type == "Shape" for node in built.graph.node if node.output[0] == "shape")
    x = floats(rng, 2, 8)
    logits, relevance = run(built, {"input": x}, ["logits", "relevance"])
    np.testing.assert_allclose(relevance.sum(1), logits.max(1), rtol=1e-4)


def tf_port(rng, pad_mode: str = "reflect", opset: int = 13) -> onnx.ModelProto:
    """Layout idioms: Pad in reflect/edge mode, a bias and a BatchNorm written as Add/Mul/Add after a Conv, a
    Transpose to NHWC and a float Cast; GlobalMaxPool and ReduceMax; a Slice that keeps the whole batch."""
    ints = {"pads0": [0, 0, 1, 2, 0, 0, 1, 0], "pads1": [0, 0, 1, 0, 0, 0, 0, 1], "zero": [0],
            "end": [2**63 - 1], "axes": [2, 3]}
    init = {k: np.array(v, np.int64) for k, v in ints.items()}
    init.update(w0=floats(rng, 4, 3, 3, 3, scale=0.3), bias=floats(rng, 4, scale=0.1),
                scale=rng.uniform(0.5, 1.5, 4).astype(np.float32), shift=floats(rng, 1, 1, 1, 4, scale=0.1),
                w1=floats(rng, 6, 4, 2, 2, scale=0.3), w2=floats(rng, 12, 3, scale=0.3))
    nodes = [helper.make_node("Pad", ["input", "pads0"], ["p0"], name="pad0", mode=pad_mode),
             helper.make_node("Conv", ["p0", "w0"], ["c0"], name="conv0"),
             helper.make_node("Transpose", ["c0"], ["nhwc"], name="to_nhwc", perm=[0, 2, 3, 1]),
             helper.make_node("Cast", ["nhwc"], ["cast"], name="cast", to=TensorProto.FLOAT),
             helper.make_node("Add", ["cast", "bias"], ["biased"], name="bias"),
             helper.make_node("Mul", ["biased", "scale"], ["scaled"], name="bn_scale"),
             helper.make_node("Add", ["shift", "scaled"], ["shifted"], name="bn_shift"),
             helper.make_node("Relu", ["shifted"], ["r0"], name="relu0"),
             helper.make_node("Transpose", ["r0"], ["nchw"], name="to_nchw", perm=[0, 3, 1, 2]),
             helper.make_node("Pad", ["nchw", "pads1"], ["p1"], name="pad1", mode="edge"),
             helper.make_node("Conv", ["p1", "w1"], ["c1"], name="conv1"),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("GlobalMaxPool", ["r1"], ["gmp"], name="global_max"),
             helper.make_node("Flatten", ["gmp"], ["f0"], name="flatten"),
             helper.make_node("ReduceMax", ["r1", "axes"], ["f1"], name="reduce_max", keepdims=0) if opset >= 18 else
             helper.make_node("ReduceMax", ["r1"], ["f1"], name="reduce_max", axes=[2, 3], keepdims=0),
             helper.make_node("Concat", ["f0", "f1"], ["both"], name="concat", axis=1),
             helper.make_node("Slice", ["both", "zero", "end", "zero"], ["kept"], name="whole_batch"),
             helper.make_node("Gemm", ["kept", "w2"], ["logits"], name="head")]
    return model_of(nodes, [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 7, 8])],
                    [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])], init, opset)


@pytest.mark.parametrize("pad_mode", ["reflect", "edge", "wrap"])
def test_layout_idioms(pad_mode, rng):
    source = tf_port(rng, pad_mode, opset=19 if pad_mode == "wrap" else 13)  # wrap came with opset 19
    x = floats(rng, 2, 3, 7, 8)
    assert_builds_everywhere(source, {"input": x})
    assert_zero_is_gradient_times_input(source, x[:1], 1)
    built = onnxlrp.build(source, onnxlrp.load_composite("epsilon"))
    assert not {"bias", "bn_scale", "bn_shift"} & {n.name for n in built.graph.node}  # folded into conv0


def test_affine_folds_through_transpose_and_cast(rng):
    import onnx_graphsurgeon as gs
    from onnxlrp.canonical.folding import fold_affine
    from onnxlrp.ir.shapes import infer_shapes
    source = tf_port(rng)
    graph = gs.import_onnx(source)
    infer_shapes(graph)
    fold_affine(graph)
    graph.cleanup().toposort()
    folded = gs.export_onnx(graph)
    assert [n.op_type for n in folded.graph.node][:4] == ["Pad", "Conv", "Transpose", "Cast"]
    assert folded.graph.node[4].op_type == "Relu"
    x = floats(rng, 2, 3, 7, 8)
    np.testing.assert_allclose(run(folded, {"input": x})[0], run(source, {"input": x})[0], rtol=1e-5, atol=1e-6)


def softmax_head(rng, shifted: bool, log: bool = False) -> onnx.ModelProto:
    """Dense, ReLU, dense, then a softmax written out (optionally minus the row maximum, or as log-softmax)."""
    init = {"w0": floats(rng, 6, 8, scale=0.5), "w1": floats(rng, 8, 4, scale=0.5), "one": np.array([1], np.int64)}
    nodes = [helper.make_node("Gemm", ["input", "w0"], ["h"], name="dense0"),
             helper.make_node("Relu", ["h"], ["a"], name="relu"),
             helper.make_node("Gemm", ["a", "w1"], ["logits"], name="dense1")]
    t = "logits"
    if shifted:
        nodes += [helper.make_node("ReduceMax", ["logits"], ["peak"], axes=[1], keepdims=1),
                  helper.make_node("Sub", ["logits", "peak"], ["shifted"])]
        t = "shifted"
    nodes += [helper.make_node("Exp", [t], ["e"]), helper.make_node("ReduceSum", ["e", "one"], ["total"], keepdims=1)]
    if log:
        nodes += [helper.make_node("Log", ["total"], ["log_total"]),
                  helper.make_node("Sub", [t, "log_total"], ["probs"])]
    else:
        nodes += [helper.make_node("Div", ["e", "total"], ["probs"])]
    return model_of(nodes, [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 6])],
                    [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", 4])], init)


@pytest.mark.parametrize("shifted,log", [(False, False), (True, False), (True, True)])
def test_written_out_softmax_head_explains_the_logits(shifted, log, rng):
    source = softmax_head(rng, shifted, log)
    x = floats(rng, 3, 6)
    assert_builds_everywhere(source, {"input": x})
    relevance = run(explain_zero(source), {"input": x, "target": np.array([0, 1, 2])}, ["relevance"])[0]
    inside = explain_zero(source, output="logits")  # the logits named as an inner tensor
    np.testing.assert_allclose(run(inside, {"input": x, "target": np.array([0, 1, 2])}, ["relevance"])[0],
                               relevance, rtol=1e-6, atol=1e-7)
    w0, w1 = (numpy_helper.to_array(t) for t in source.graph.initializer[:2])
    # LRP-0 is gradient x input of the chosen logit (not of its probability): x_i sum_j w0_ij [h_j > 0] w1_jc
    expected = np.stack([x[n] * (w0 @ ((x[n] @ w0 > 0) * w1[:, c])) for n, c in enumerate([0, 1, 2])])
    np.testing.assert_allclose(relevance, expected, rtol=1e-4, atol=1e-6)


def explain_zero(source: onnx.ModelProto, **options) -> onnx.ModelProto:
    return onnxlrp.build(source, onnxlrp.load_composite("zero"), **options)


def test_classifier_output_must_be_a_float_matrix(rng):
    with pytest.raises(onnxlrp.LrpError, match="'one' is not a computed float tensor"):
        explain_zero(softmax_head(rng, False), output="one")


def one_hot_classifier(rng, kind: str) -> onnx.ModelProto:
    """Integer input [N, 5] (values 0..3) one-hot encoded inside the graph, then Conv1d over the positions."""
    init = {"values": np.arange(4, dtype=np.int64), "w0": floats(rng, 6, 4, 3, scale=0.5),
            "w1": floats(rng, 6 * 3, 3, scale=0.5), "depth": np.array(4, np.int64),
            "off_on": np.array([0, 1], np.float32), "flat": np.array([0, -1], np.int64)}
    if kind == "equal":
        encode = [helper.make_node("Unsqueeze", ["input"], ["ids"], axes=[2]),
                  helper.make_node("Equal", ["ids", "values"], ["hot"], name="encode"),
                  helper.make_node("Cast", ["hot"], ["encoded"], to=TensorProto.FLOAT)]
    else:
        encode = [helper.make_node("OneHot", ["input", "depth", "off_on"], ["encoded"], name="encode", axis=-1)]
    nodes = encode + [helper.make_node("Transpose", ["encoded"], ["channels"], perm=[0, 2, 1]),
                      helper.make_node("Conv", ["channels", "w0"], ["c0"], name="conv"),
                      helper.make_node("Relu", ["c0"], ["r0"]),
                      helper.make_node("Reshape", ["r0", "flat"], ["f"]),
                      helper.make_node("Gemm", ["f", "w1"], ["logits"], name="head")]
    return model_of(nodes, [helper.make_tensor_value_info("input", TensorProto.INT64, ["N", 5])],
                    [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])], init, opset=11)


@pytest.mark.parametrize("kind", ["equal", "onehot"])
def test_one_hot_encoded_integer_input_gets_relevance_per_position(kind, rng):
    source = one_hot_classifier(rng, kind)
    ids = rng.integers(0, 4, size=(3, 5))
    found = assert_builds_everywhere(source, {"input": ids})
    # LRP-0 per position is gradient x input on the one-hot encoding, summed over the encoded values.
    w0, w1 = (numpy_helper.to_array(t) for t in source.graph.initializer[1:3])
    targets = run(source, {"input": ids})[0].argmax(1)
    for n, target in enumerate(targets):
        hot = np.eye(4)[ids[n]].T  # [4 values, 5 positions]
        z = np.stack([np.sum(w0 * hot[None, :, k:k + 3], axis=(1, 2)) for k in range(3)], axis=1)
        upper = (z > 0) * w1[:, target].reshape(6, 3)
        gradient = np.zeros_like(hot)
        for k in range(3):
            gradient[:, k:k + 3] += np.einsum("o,oiw->iw", upper[:, k], w0)
        np.testing.assert_allclose(found["zero"][n], (hot * gradient).sum(0), rtol=1e-4, atol=1e-6)


def test_command_line_input_shape(tmp_path, rng):
    from conftest import assert_one_line_error, onnxlrp_cli as command
    path = tmp_path / "dynamic.onnx"
    onnx.save(dynamic_cnn(rng), str(path))
    assert_one_line_error(command("build", path, "-o", tmp_path / "out.onnx"), "input 'input' has open dimensions",
                          "--input-shape")
    assert not (tmp_path / "out.onnx").exists()
    result = command("build", path, "-o", tmp_path / "out.onnx", "--input-shape", "input:N,3,8,12")
    assert result.returncode == 0, result.stderr
    x = floats(rng, 2, 3, 8, 12)
    assert run(onnx.load(str(tmp_path / "out.onnx")), {"input": x}, ["relevance"])[0].shape == x.shape


TREE_REASON = ("is a tree ensemble: piecewise constant (a sum of leaf values chosen by thresholds), not piecewise "
               "linear in the LRP sense, so no rule can share its output among the inputs; explain the original model "
               "with a tree method such as TreeSHAP (shap.TreeExplainer) instead")


@pytest.mark.parametrize("name", ["forest", "boosting"])
def test_tree_ensembles_are_refused_with_the_reason(name, tmp_path):
    """scikit-learn's forests and boosting through skl2onnx (fixtures/make_trees.py): one line that says why and
    what to use instead, from build and from inspect's verdict."""
    from conftest import FIXTURES, assert_one_line_error, onnxlrp_cli as command
    path = FIXTURES / "trees" / f"{name}.onnx"
    expected = f"{path}: node 'TreeEnsembleClassifier' (TreeEnsembleClassifier) {TREE_REASON}"
    with pytest.raises(onnxlrp.LrpError) as error:
        onnxlrp.build(path)
    assert str(error.value) == expected
    assert_one_line_error(command("build", path, "-o", tmp_path / "out.onnx"), expected)
    from onnxlrp.app import inspect as inspection
    assert inspection.report(onnxlrp.load(path), onnxlrp.load_composite("epsilon"), str(path)).splitlines()[-1] == \
        f"build: {expected}"


def sigmoid_head(rng, classes: int) -> onnx.ModelProto:
    """Bias-free dense, ReLU, dense to `classes` logits, then a Sigmoid: a binary head ([N, 1]) or a multi-label
    one ([N, C] of independent probabilities)."""
    init = {"w0": floats(rng, 6, 8, scale=0.6), "w1": floats(rng, 8, classes, scale=0.6)}
    nodes = [helper.make_node("Gemm", ["input", "w0"], ["h"], name="dense0"),
             helper.make_node("Relu", ["h"], ["a"], name="relu"),
             helper.make_node("Gemm", ["a", "w1"], ["logits"], name="dense1"),
             helper.make_node("Sigmoid", ["logits"], ["probability"], name="head")]
    return model_of(nodes, [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 6])],
                    [helper.make_tensor_value_info("probability", TensorProto.FLOAT, ["N", classes])], init)


@pytest.mark.parametrize("classes", [1, 3])
@pytest.mark.parametrize("composite", ["zero", "epsilon"])
def test_sigmoid_head_explains_the_logit(classes, composite, rng):
    """The Sigmoid is skipped like a Softmax: on a bias-free net the relevance sums to the logit (not to the
    probability) and, under LRP-0, is gradient x input of the logit. A binary head's one class is 0."""
    source = sigmoid_head(rng, classes)
    x = floats(rng, 4, 6)
    targets = np.array([0, -1, 0, -1]) if classes == 1 else np.array([2, 0, 1, -1])
    built = onnxlrp.build(source, composite)
    probability, relevance = run(built, {"input": x, "target": targets}, ["probability", "relevance"])
    w0, w1 = (numpy_helper.to_array(t) for t in source.graph.initializer)
    logits = np.maximum(x @ w0, 0) @ w1
    np.testing.assert_allclose(probability, 1 / (1 + np.exp(-logits)), rtol=1e-5)
    chosen = np.where(targets < 0, logits.argmax(1), targets)
    explained = logits[np.arange(4), chosen]
    np.testing.assert_allclose(relevance.sum(1), explained, rtol=1e-4, atol=1e-6)
    if composite == "zero":
        gradient = np.stack([w0 @ ((x[n] @ w0 > 0) * w1[:, c]) for n, c in enumerate(chosen)])
        np.testing.assert_allclose(relevance, x * gradient, rtol=1e-4, atol=1e-6)
    if classes == 1:
        with pytest.raises(onnxlrp.LrpError, match="already its log-odds; use --explain logit"):
            onnxlrp.build(source, composite, explain="logodds")


def test_sigmoid_head_in_explain_and_check(tmp_path, rng):
    """`explain` prints the probability the model outputs and names it so; `check` the logit it explains."""
    from conftest import onnxlrp_cli as command
    from onnxlrp.app.check import check
    source = sigmoid_head(rng, 1)
    built = tmp_path / "binary_lrp.onnx"
    onnxlrp.save_atomic(onnxlrp.build(source, "zero", layer_relevance=True), built)
    x = floats(rng, 6)
    np.save(tmp_path / "x.npy", x)
    logit = float((np.maximum(x @ numpy_helper.to_array(source.graph.initializer[0]), 0)
                   @ numpy_helper.to_array(source.graph.initializer[1]))[0])
    result = command("explain", built, tmp_path / "x.npy", "-o", tmp_path / "out")
    assert result.returncode == 0 and result.stderr == "", result.stderr
    total = float(np.load(tmp_path / "out" / "x.npy").sum(dtype=np.float64))
    np.testing.assert_allclose(total, logit, rtol=1e-4)
    assert result.stdout.strip() == (f"{tmp_path / 'x.npy'}: predicted 0, explained 0, probability "
                                     f"{1 / (1 + np.exp(-logit)):.6g}, relevance sum {total:.6g}")
    inner = tmp_path / "inner_lrp.onnx"  # --classifier-output names the logits: explain prints a logit
    onnxlrp.save_atomic(onnxlrp.build(source, "zero", output="logits"), inner)
    line = command("explain", inner, tmp_path / "x.npy", "-o", tmp_path / "inner").stdout.strip()
    assert f"explained 0, logit {logit:.6g}, relevance sum" in line
    report = check(str(built), str(tmp_path / "x.npy")).splitlines()
    assert report[0] == f"sample 0: class 0 (predicted), logit {logit:.6g}"
    assert report[-1].endswith("(100.0%)")


def jax_form(name: str) -> onnx.ModelProto:
    """A model in the form jax2tf and tf2onnx write (fixtures/make_jax_forms.py)."""
    from conftest import FIXTURES
    return onnx.load(str(FIXTURES / "jax" / f"{name}.onnx"))


def test_jax_one_hot_of_two_broadcast_tensors(rng):
    """jax.nn.one_hot through jax2tf and tf2onnx: Equal(Expand(ids[..., None]), Expand(iota)) to a shape computed
    from the batch size, then Cast. Each position gets one relevance; LRP-0 is computed here in numpy."""
    source = jax_form("onehot")
    ids = rng.integers(0, 4, size=(3, 5)).astype(np.int32)
    found = assert_builds_everywhere(source, {"ids": ids}, feed="ids")
    w0, b0, w1 = (numpy_helper.to_array(t) for t in source.graph.initializer if t.name in ("w0", "b0", "w1"))
    hot = np.eye(4)[ids].reshape(3, 20)
    z = hot @ w0 + b0
    logits = np.maximum(z, 0) @ w1
    upper = np.maximum(z, 0) * w1[:, logits.argmax(1)].T  # LRP-0 of the head, then ReLU passes
    expected = (hot * ((upper / z) @ w0.T)).reshape(3, 5, 4).sum(2)  # LRP-0 of the first layer, per position
    np.testing.assert_allclose(found["zero"], expected, rtol=1e-4, atol=1e-6)


def test_jax_layer_norm_with_reciprocal_of_sqrt(rng):
    """flax's LayerNorm through jax2tf and tf2onnx: means as ReduceSum times 1/n, the variance as
    max(0, mean(x * x) - mean(x)^2), Reciprocal(Sqrt(var + eps)). Its sigma is a constant, as in the
    LayerNormalization op: the relevance equals that of the same model with the op (opset 17)."""
    source = jax_form("layernorm")
    x = floats(rng, 2, 6, 8)
    found = assert_builds_everywhere(source, {"x": x}, feed="x")
    twin = onnx.ModelProto()
    twin.CopyFrom(source)
    names = [n.name for n in twin.graph.node]
    norm = twin.graph.node[names.index("reduce_sum"):names.index("add_1") + 1]
    kept = [n for n in twin.graph.node if n not in norm]
    del twin.graph.node[:]
    twin.graph.node.extend(kept[:names.index("reduce_sum")] + [
        helper.make_node("LayerNormalization", ["g", "scale", "bias"], ["ln"], axis=-1, epsilon=1e-6, name="ln")]
        + kept[names.index("reduce_sum"):])
    twin.opset_import[0].version = 17
    twin.ir_version = 8
    for preset in ("attnlrp", "cp_lrp"):
        logits, relevance = run(onnxlrp.build(twin, preset), {"x": x}, ["logits", "relevance"])
        np.testing.assert_allclose(logits, run(source, {"x": x})[0], rtol=1e-5, atol=1e-6)
        assert relative_error(found[preset], relevance) < 1e-4, preset

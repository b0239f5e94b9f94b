"""Stored modified weights (`build --fold-weights`): the nodes that compute a tensor from initializers alone (W+,
W + gamma W+, flipped and sliced kernels) evaluated once at build time, so that a session does not compute them
when it starts; the file grows by the folded tensors."""
from __future__ import annotations

import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from ..errors import LrpError
from .files import first_line, shell
from .names import subgraph_protos


def with_folded_weights(model: onnx.ModelProto, source: str) -> onnx.ModelProto:
    """The model with every node whose inputs are all initializers (transitively) replaced by its results, stored
    as initializers; nodes with subgraphs and random generators stay."""
    graph = model.graph
    fed = {value.name for value in graph.input}
    known = {tensor.name for tensor in graph.initializer if tensor.name not in fed}
    folded, kept = [], []
    for node in graph.node:
        inputs = [name for name in node.input if name]
        if _foldable(node) and all(name in known for name in inputs):
            folded.append(node)
            known.update(node.output)
        else:
            kept.append(node)
    if not folded:
        return model
    produced = {name for node in folded for name in node.output}
    read = _names_read(kept) | {value.name for value in graph.output}
    results = [name for node in folded for name in node.output if name in read]
    values = _evaluate(model, folded, results, source)
    slim = shell(model, "graph")
    slim.graph.CopyFrom(shell(graph, "initializer"))
    del slim.graph.node[:]
    slim.graph.node.extend(kept)
    still_read = read - produced
    slim.graph.initializer.extend(t for t in graph.initializer if t.name in still_read or t.name in fed)
    slim.graph.initializer.extend(numpy_helper.from_array(value, name) for name, value in zip(results, values))
    return slim


def _foldable(node: onnx.NodeProto) -> bool:
    return not node.op_type.startswith("Random") and not any(a.type in (onnx.AttributeProto.GRAPH,
                                                                       onnx.AttributeProto.GRAPHS)
                                                             for a in node.attribute)


def _names_read(nodes: list[onnx.NodeProto]) -> set[str]:
    """Tensor names that `nodes` read, those of their subgraphs included (which may read outer tensors)."""
    names = set()
    for node in nodes:
        names.update(node.input)
        for subgraph in subgraph_protos(node):
            names.update(_names_read(list(subgraph.node)))
    return names


def _evaluate(model: onnx.ModelProto, nodes: list[onnx.NodeProto], results: list[str], source: str) -> list:
    """The values of `results`, computed by ONNX Runtime from `nodes` with the initializers they read as inputs
    (the evaluated model carries no weights: no 2 GB limit, no copy in the proto)."""
    initializers = {tensor.name: tensor for tensor in model.graph.initializer}
    read = sorted({name for node in nodes for name in node.input if name in initializers})
    graph = helper.make_graph(
        nodes, "fold", [helper.make_tensor_value_info(n, initializers[n].data_type, list(initializers[n].dims))
                        for n in read], [helper.make_value_info(name, onnx.TypeProto()) for name in results])
    evaluated = helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        session = ort.InferenceSession(evaluated.SerializeToString(), options, providers=["CPUExecutionProvider"])
        return session.run(results, {name: numpy_helper.to_array(initializers[name]) for name in read})
    except Exception as error:  # ONNX Runtime raises several types
        raise LrpError(f"{source}: --fold-weights: the weights could not be computed ({first_line(error)})") from None

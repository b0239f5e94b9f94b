"""Write a committed zoo architecture (fixtures/zoo, seeded weights) at another image size, for the benches on
machines without torch: `python bench/zoo_model.py resnet50 224 /tmp/resnet50_224.onnx`.

The fixture's random weights are drawn from each initializer's name (fixtures/seeded.py); the model's input
gets the new spatial size and its inner shapes are inferred again.
"""
from __future__ import annotations

import sys
from pathlib import Path

import onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fixtures"))
from seeded import materialize  # noqa: E402

ZOO = Path(__file__).resolve().parents[1] / "fixtures" / "zoo"


def zoo_model(name: str, side: int) -> onnx.ModelProto:
    """The zoo fixture `name` with its weights drawn and a `side` x `side` input."""
    model = materialize(onnx.load(str(ZOO / f"{name}.onnx")))
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_value = dims[3].dim_value = side
    del model.graph.value_info[:]
    return onnx.shape_inference.infer_shapes(model, strict_mode=True)


if __name__ == "__main__":
    name, side, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    onnx.save(zoo_model(name, side), out)

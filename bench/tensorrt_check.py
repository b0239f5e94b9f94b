"""Run built fixture models through ONNX Runtime's TensorRT provider (GPU machines with TensorRT) and print the
relevance against the CPU's: `python bench/tensorrt_check.py`."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

import onnxlrp

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


def main() -> None:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    for name, preset in (("mlp", "epsilon"), ("cnn", "epsilon_gamma_box"), ("vgg", "epsilon_plus_flat")):
        data = np.load(FIXTURES / f"{name}.npz")
        blob = onnxlrp.build(FIXTURES / f"{name}_ts.onnx", preset).SerializeToString()
        feeds = {"input": data["input"], "target": data["target"]}
        cpu = ort.InferenceSession(blob, options, providers=["CPUExecutionProvider"]).run(None, feeds)
        try:
            session = ort.InferenceSession(blob, options, providers=["TensorrtExecutionProvider",
                                                                     "CUDAExecutionProvider"])
            got = session.run(None, feeds)
        except Exception as error:  # onnxruntime raises several types
            print(f"{name} {preset}: TensorRT failed: {str(error).splitlines()[0][:200]}")
            continue
        error = np.linalg.norm(got[1] - cpu[1]) / np.linalg.norm(cpu[1])
        print(f"{name} {preset}: providers {session.get_providers()}, relevance vs CPU {error:.2e}")


if __name__ == "__main__":
    main()

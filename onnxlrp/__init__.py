"""onnxlrp: turn an ONNX classifier into an ONNX graph that also computes its LRP explanation."""
from .builder import build
from .composite import Composite, load_composite, preset_names
from .errors import LrpError
from .io import load, save_atomic

__all__ = ["build", "Composite", "load_composite", "preset_names", "LrpError", "load", "save_atomic"]
__version__ = "0.1.0"

"""onnxlrp: turn an ONNX classifier into an ONNX graph that also computes its LRP explanation."""
from .api import Explainer, build
from .composite import Composite, load_composite, preset_names
from .errors import LrpError
from .heatmap import heatmap
from .io import load, save_atomic

__all__ = ["build", "Explainer", "heatmap", "Composite", "load_composite", "preset_names", "LrpError", "load",
           "save_atomic"]
__version__ = "0.1.0"

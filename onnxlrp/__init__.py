"""onnxlrp: turn an ONNX classifier into an ONNX graph that also computes its LRP explanation."""
from importlib import import_module

# Imported on first use, so that the command can handle Ctrl-C before onnx and ONNX Runtime load.
_EXPORTS = {"build": "api", "Explainer": "api", "heatmap": "app.heatmaps", "Composite": "lrp.composite",
            "load_composite": "lrp.composite", "preset_names": "lrp.composite", "LrpError": "errors",
            "LrpWarning": "errors", "load": "ir.files", "save_atomic": "ir.files",
            "read_shards": "app.dataset"}
__all__ = list(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

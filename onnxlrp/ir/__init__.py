"""The graph layer: model files, names, the ops writer, shapes and node order. Imports nothing of onnxlrp above it."""

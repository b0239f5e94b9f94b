"""Composite presets (TOML), shipped inside the wheel as `onnxlrp.presets`."""

"""The package's shape: four layers that import only downwards, and presets that load in a fresh process."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import onnxlrp

PACKAGE = Path(onnxlrp.__file__).resolve().parent
# Lowest first: a module may import from its own layer and the ones before it. errors.py is below everything;
# pipeline.py and api.py sit between the relevance layer and the application.
LAYERS = ("errors", "ir", "canonical", "lrp", "pipeline", "api", "app")


def _layer(module: str) -> int:
    """The layer of a module named relative to the package (`lrp.emitters.linear` -> lrp)."""
    return LAYERS.index(module.split(".")[0]) if module.split(".")[0] in LAYERS else len(LAYERS)


def _imports(path: Path) -> list[str]:
    """The onnxlrp modules a file imports, relative to the package."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = list(parts[:len(parts) - node.level])
            target = ".".join(base + (node.module.split(".") if node.module else []))
            found += [target] if node.module else [".".join(base + [a.name]) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("onnxlrp."):
            found.append(node.module[len("onnxlrp."):])
    return found


MODULES = sorted(p for p in PACKAGE.rglob("*.py") if p.parent != PACKAGE or p.stem not in ("__init__", "__main__"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_layers_import_only_downwards(path):
    own = _layer(".".join(path.relative_to(PACKAGE).with_suffix("").parts))
    upward = [m for m in _imports(path) if _layer(m) > own]
    assert not upward, f"{path.relative_to(PACKAGE)} imports from a higher layer: {upward}"


def test_every_module_is_in_a_layer():
    assert all(_layer(".".join(p.relative_to(PACKAGE).with_suffix("").parts)) < len(LAYERS) for p in MODULES)


@pytest.mark.parametrize("name", onnxlrp.preset_names())
def test_every_preset_loads_in_a_fresh_process(name):
    """Nothing registers on import: a composite loads (and checks its op types) before anything else is imported."""
    script = f"import onnxlrp; c = onnxlrp.load_composite({name!r}); print(c.name, len(c.entries))"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[0] == name


def test_a_composite_naming_max_pool_loads_first_in_a_fresh_process(tmp_path):
    """The bug this layout fixed: a composite with op_types = ["MaxPool"] failed unless the builder was imported."""
    path = tmp_path / "pool.toml"
    path.write_text('[[layers]]\nop_types = ["MaxPool"]\nrule = "norm"\n')
    script = f"import onnxlrp; print(onnxlrp.load_composite({str(path)!r}).entries[0].rule)"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "norm", result.stderr


def test_no_emitter_compares_a_rule_by_name():
    """Rules are data: emitters read a rule's properties, never its name."""
    for path in (PACKAGE / "lrp" / "emitters").glob("*.py"):
        text = path.read_text()
        for name in ("pass", "wta", "absorb", "stop", "softmax", "norm", "epsilon", "zero"):
            assert f'== "{name}"' not in text and 'rule == ' not in text and '.name ==' not in text, path.name

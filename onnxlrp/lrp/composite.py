"""Composites: which rule, with which parameters, each layer gets. Presets are TOML files in `presets/`, shipped in
the wheel as `onnxlrp.presets`; a user's own file may extend one."""
from __future__ import annotations

import fnmatch
import tomllib
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Callable, Mapping, Sequence

import onnx_graphsurgeon as gs

from ..errors import LrpError
from .emitters import FAMILIES
from .emitters.linear import LINEAR_OPS
from .rules import DEFAULTS, RULES, Rule, check_params, parse_value

MATCH_KEYS = ("names", "op_types", "first_linear", "index", "depth")
# The presets that fit each architecture (walk.architecture_of), suggested when a composite inflates relevance.
SUGGESTED = {"transformer": ("attnlrp", "cp_lrp"), "cnn": ("epsilon_plus_flat", "epsilon_gamma_box")}
ARCHITECTURES = {"transformer": "a transformer", "cnn": "a CNN"}
_EXTENDING: list[str] = []  # the composites being loaded through `extends`, to catch a circle


@dataclass(frozen=True)
class Entry:
    """One `[[layers]]` table: which nodes it matches (all given criteria must hold) and the rule they get."""
    rule: str
    names: tuple[str, ...] = ()
    op_types: tuple[str, ...] = ()
    first_linear: bool | None = None
    params: Mapping[str, object] = field(default_factory=dict)
    index: tuple[int, int] | None = None  # first and last position (inclusive, negative from the end)
    depth: tuple[float, float] | None = None  # [low, high) fractions of the positions

    def matches(self, node: gs.Node, first_linear: gs.Node | None, order: Sequence[gs.Node] = ()) -> bool:
        if not self._selects(node, first_linear):
            return False
        if self.index is None and self.depth is None:
            return True
        # Position among the nodes that the other criteria select (linear layers if no op_types), in data-flow order.
        selected = [n for n in order if (self.op_types or n.op in LINEAR_OPS) and self._selects(n, first_linear)]
        position = next((i for i, n in enumerate(selected) if n is node), None)
        return position is not None and in_range(position, len(selected), self.index, self.depth)

    def _selects(self, node: gs.Node, first_linear: gs.Node | None) -> bool:
        if self.names and not any(fnmatch.fnmatchcase(node.name, pattern) for pattern in self.names):
            return False
        if self.op_types and node.op not in self.op_types:
            return False
        return self.first_linear is None or (node is first_linear) == self.first_linear


def in_range(position: int, count: int, index: tuple[int, int] | None, depth: tuple[float, float] | None) -> bool:
    """Whether the `position`-th of `count` layers lies in the index range and in the depth range: its depth is
    position / count, kept if low <= depth < high (so [0, 0.5] keeps the first ceil(count / 2) layers)."""
    if index is not None:
        first, last = (i + count if i < 0 else i for i in index)
        if not first <= position <= last:
            return False
    if depth is not None:
        low, high = depth
        tolerance = 1e-9 * count  # so that 1/3 of 3 layers is exactly one layer
        return low * count - tolerance <= position < high * count - tolerance
    return True


@dataclass(frozen=True)
class Composite:
    """An ordered list of entries (the first that matches a node wins) and default rule parameters."""
    name: str
    entries: tuple[Entry, ...]
    params: Mapping[str, object]

    def __post_init__(self):
        for index, entry in enumerate(self.entries, start=1):
            check_params(entry.rule, {**DEFAULTS, **self.params, **entry.params},
                         f"composite {self.name}, [[layers]] entry {index}")

    def with_params(self, overrides: Mapping[str, object]) -> "Composite":
        """Parameters given on the command line replace the composite's, in its defaults and in every entry."""
        overrides = {k: parse_value(k, v, f"parameter {k}") for k, v in overrides.items() if v is not None}
        entries = tuple(replace(e, params={k: overrides.get(k, v) for k, v in e.params.items()})
                        for e in self.entries)
        return Composite(self.name, entries, {**self.params, **overrides})

    def assign(self, graph: gs.Graph) -> Callable[[gs.Node], tuple[Rule, dict]]:
        """The rule lookup of one graph, with its first linear layer and data-flow order taken now (before the
        walk appends relevance nodes)."""
        order = tuple(graph.nodes)
        first_linear = next((n for n in order if n.op in LINEAR_OPS), None)
        return lambda node: self.rule_for(node, first_linear, order)

    def rule_for(self, node: gs.Node, first_linear: gs.Node | None, order: Sequence[gs.Node] = ()) -> tuple[Rule, dict]:
        """The rule name and full parameter set for one node (its family's default if no entry matches); `order`,
        the graph's nodes in data-flow order, gives the positions that `index` and `depth` entries count."""
        family = FAMILIES[node.op]
        entry = next((e for e in self.entries if e.matches(node, first_linear, order)), None)
        rule = entry.rule if entry else family.rules[0]
        if rule not in family.rules:
            raise LrpError(f"composite {self.name}: rule '{rule}' does not apply to node '{node.name}' "
                           f"({node.op}); it takes {', '.join(family.rules)}")
        return RULES[rule], {**DEFAULTS, **self.params, **(entry.params if entry else {})}


def preset_names() -> list[str]:
    """Names of the composites shipped in `presets/`."""
    return sorted(p.name[:-5] for p in resources.files("onnxlrp.presets").iterdir() if p.name.endswith(".toml"))


def load_composite(name_or_path: str) -> Composite:
    """A preset by name, or the user's own TOML file by path."""
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.is_file() or (path.exists() and name_or_path not in preset_names()):
        text, name = _read_composite_file(path), str(path)
    elif name_or_path in preset_names():
        text, name = resources.files("onnxlrp.presets").joinpath(f"{name_or_path}.toml").read_text(), name_or_path
    else:
        raise LrpError(f"unknown composite '{name_or_path}' (presets: {', '.join(preset_names())}; or a .toml file)")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise LrpError(f"composite {name}: not valid TOML ({error})") from None
    return parse_composite(name, data)


def _read_composite_file(path: Path) -> str:
    """The text of a composite file, or one line saying why it cannot be read."""
    if path.is_dir():
        raise LrpError(f"{path}: is a folder, not a composite file")
    if not path.is_file():
        raise LrpError(f"{path}: no such composite file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise LrpError(f"composite {path}: not UTF-8 text (byte {error.start})") from None
    except OSError as error:
        raise LrpError(f"composite {path}: cannot read it ({error.strerror or error})") from None


def parse_composite(name: str, data: Mapping[str, object]) -> Composite:
    """Validate the parsed TOML of a composite: every key known, every rule and op type real."""
    unknown = set(data) - {"description", "params", "layers", "extends"}
    if unknown:
        raise LrpError(f"composite {name}: unknown top-level key(s) {', '.join(sorted(unknown))}")
    params = _params(name, "[params]", data.get("params", {}))
    entries = []
    if not isinstance(data.get("layers", []), list):
        raise LrpError(f"composite {name}: layers must be a list of [[layers]] tables")
    for index, table in enumerate(data.get("layers", []), start=1):
        where = f"[[layers]] entry {index}"
        if not isinstance(table, dict) or "rule" not in table:
            raise LrpError(f"composite {name}: {where} needs a 'rule'")
        rule = table["rule"]
        if not isinstance(rule, str) or rule not in RULES:
            raise LrpError(f"composite {name}: {where}: unknown rule '{rule}' (rules: {', '.join(RULES)})")
        op_types = tuple(_strings(name, where, table, "op_types"))
        for op_type in op_types:
            if op_type not in FAMILIES:
                raise LrpError(f"composite {name}: {where}: unsupported op type '{op_type}'")
            if rule not in FAMILIES[op_type].rules:
                raise LrpError(f"composite {name}: {where}: rule '{rule}' does not apply to {op_type}")
        first = table.get("first_linear")
        if first is not None and not isinstance(first, bool):
            raise LrpError(f"composite {name}: {where}: first_linear must be true or false")
        rule_params = {k: v for k, v in table.items() if k not in MATCH_KEYS + ("rule",)}
        entries.append(Entry(rule, tuple(_strings(name, where, table, "names")), op_types, first,
                             _params(name, where, rule_params), _index(name, where, table.get("index")),
                             _depth(name, where, table.get("depth"))))
    if "extends" in data:
        base = _base(name, data["extends"])
        return Composite(name, tuple(entries) + base.entries, {**base.params, **params})
    return Composite(name, tuple(entries), params)


def _base(name: str, extends: object) -> Composite:
    """The composite a file extends: a preset name, or a TOML file (a relative path starts at the file's folder)."""
    if not isinstance(extends, str):
        raise LrpError(f"composite {name}: extends must be a preset name or a file path")
    nearby = Path(name).parent / extends
    reference = str(nearby) if extends.endswith(".toml") or nearby.exists() else extends
    if _identity(reference) in _EXTENDING + [_identity(name)]:
        raise LrpError(f"composite {name}: extends '{extends}' in a circle")
    _EXTENDING.append(_identity(name))
    try:
        return load_composite(reference)
    finally:
        _EXTENDING.pop()


def _identity(name: str) -> str:
    return str(Path(name).resolve()) if Path(name).is_file() else name


def _index(name: str, where: str, value: object) -> tuple[int, int] | None:
    """`index = 3` or `index = [first, last]`: positions counted from 0, both ends included, negative from the end."""
    if value is None:
        return None
    values = [value] * 2 if isinstance(value, int) else value
    if not isinstance(values, list) or len(values) != 2 or not all(type(v) is int for v in values):
        raise LrpError(f"composite {name}: {where}: index must be an integer or a list [first, last] of integers")
    return values[0], values[1]


def _depth(name: str, where: str, value: object) -> tuple[float, float] | None:
    """`depth = [low, high]`: fractions of the positions, 0 <= low <= high <= 1."""
    if value is None:
        return None
    if not isinstance(value, list) or len(value) != 2 or \
            not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value) or \
            not 0 <= value[0] <= value[1] <= 1:
        raise LrpError(f"composite {name}: {where}: depth must be a list [low, high] with 0 <= low <= high <= 1")
    return float(value[0]), float(value[1])


def _strings(name: str, where: str, table: Mapping, key: str) -> Sequence[str]:
    values = table.get(key, [])
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise LrpError(f"composite {name}: {where}: {key} must be a list of strings")
    return values


def _params(name: str, where: str, values: object) -> dict[str, object]:
    if not isinstance(values, dict):
        raise LrpError(f"composite {name}: {where} must be a table")
    result = {}
    for key, value in values.items():
        if key not in DEFAULTS:
            raise LrpError(f"composite {name}: {where}: unknown parameter '{key}' "
                           f"(parameters: {', '.join(DEFAULTS)})")
        result[key] = parse_value(key, value, f"composite {name}: {where}")
    return result

"""Composites: which rule, with which parameters, each layer gets. Presets are TOML files in `rules/`."""
from __future__ import annotations

import fnmatch
import math
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Mapping, Sequence

import onnx_graphsurgeon as gs

from .errors import LrpError
from .registry import FAMILIES
from .rules import DEFAULTS, RULES, check_params

MATCH_KEYS = ("names", "op_types", "first_linear")
RULE_NAMES = tuple(RULES) + ("pass", "wta")
VECTOR_PARAMS = ("low", "high")
NONNEGATIVE_PARAMS = ("epsilon", "stabilizer", "gamma", "alpha", "beta")


@dataclass(frozen=True)
class Entry:
    """One `[[layers]]` table: which nodes it matches (all given criteria must hold) and the rule they get."""
    rule: str
    names: tuple[str, ...] = ()
    op_types: tuple[str, ...] = ()
    first_linear: bool | None = None
    params: Mapping[str, object] = field(default_factory=dict)

    def matches(self, node: gs.Node, first_linear: gs.Node | None) -> bool:
        if self.names and not any(fnmatch.fnmatchcase(node.name, pattern) for pattern in self.names):
            return False
        if self.op_types and node.op not in self.op_types:
            return False
        return self.first_linear is None or (node is first_linear) == self.first_linear


@dataclass(frozen=True)
class Composite:
    """An ordered list of entries (the first that matches a node wins) and default rule parameters."""
    name: str
    entries: tuple[Entry, ...]
    params: Mapping[str, object]

    def __post_init__(self):
        for index, entry in enumerate(self.entries, start=1):
            if entry.rule in RULES:
                check_params(entry.rule, {**DEFAULTS, **self.params, **entry.params},
                             f"composite {self.name}, [[layers]] entry {index}")

    def with_params(self, overrides: Mapping[str, object]) -> "Composite":
        """Parameters given on the command line replace the composite's, in its defaults and in every entry."""
        overrides = {k: parse_value(k, v, f"parameter {k}") for k, v in overrides.items() if v is not None}
        entries = tuple(Entry(e.rule, e.names, e.op_types, e.first_linear,
                              {k: overrides.get(k, v) for k, v in e.params.items()}) for e in self.entries)
        return Composite(self.name, entries, {**self.params, **overrides})

    def rule_for(self, node: gs.Node, first_linear: gs.Node | None) -> tuple[str, dict]:
        """The rule name and full parameter set for one node (its family's default if no entry matches)."""
        family = FAMILIES[node.op]
        entry = next((e for e in self.entries if e.matches(node, first_linear)), None)
        rule = entry.rule if entry else family.rules[0]
        if rule not in family.rules:
            raise LrpError(f"composite {self.name}: rule '{rule}' does not apply to node '{node.name}' "
                           f"({node.op}); it takes {', '.join(family.rules)}")
        return rule, {**DEFAULTS, **self.params, **(entry.params if entry else {})}


def preset_names() -> list[str]:
    """Names of the composites shipped in `rules/`."""
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
    unknown = set(data) - {"description", "params", "layers"}
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
        if not isinstance(rule, str) or rule not in RULE_NAMES:
            raise LrpError(f"composite {name}: {where}: unknown rule '{rule}' (rules: {', '.join(RULE_NAMES)})")
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
                             _params(name, where, rule_params)))
    return Composite(name, tuple(entries), params)


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


def parse_value(key: str, value: object, where: str) -> float | tuple[float, ...]:
    """A rule parameter: a number, or for low/high also a list of per-channel numbers (or "a,b,c")."""
    if isinstance(value, str):
        try:
            value = [float(v) for v in value.split(",")]
        except ValueError:
            raise LrpError(f"{where}: {key} must be a number or comma-separated numbers (got '{value}')") from None
        value = value[0] if len(value) == 1 else value
    numbers = (int, float)
    if (isinstance(value, (list, tuple)) and key in VECTOR_PARAMS and value
            and all(isinstance(v, numbers) and not isinstance(v, bool) for v in value)):
        return tuple(_checked(key, v, where) for v in value)
    if isinstance(value, numbers) and not isinstance(value, bool):
        return _checked(key, value, where)
    raise LrpError(f"{where}: {key} must be a number" + (" or a list of numbers" if key in VECTOR_PARAMS else ""))


def _checked(key: str, value: int | float, where: str) -> float:
    """A finite float; epsilon, stabilizer, gamma, alpha and beta also >= 0 (others give all-NaN relevance)."""
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise LrpError(f"{where}: {key} must be a finite number (got {value if abs(number) != math.inf else number})")
    if number < 0 and key in NONNEGATIVE_PARAMS:
        needs = "alpha_beta needs alpha, beta >= 0" if key in ("alpha", "beta") else f"{key} must be >= 0"
        raise LrpError(f"{where}: {needs} (got {key}={number:g})")
    return number

"""Emitters by op family: each module describes its nodes as layers for the rule skeleton (lrp/rules.py) and lists
its families in FAMILIES. This is the one place that collects them: importing a module registers nothing."""
from __future__ import annotations

from ..families import Family, by_op_type
from . import arithmetic, encoding, linear, pooling, routing, softmax, transformer

MODULES = (linear, pooling, arithmetic, routing, encoding, softmax, transformer)
FAMILIES: dict[str, Family] = by_op_type(family for module in MODULES for family in module.FAMILIES)

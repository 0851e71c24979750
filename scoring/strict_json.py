"""JSON parsing that refuses what `json.loads` quietly accepts: duplicate keys, NaN/Infinity, overflowing numbers.

A duplicated key in a clinical record or a model file is almost always an
editing mistake, and `json.loads` would silently keep the last value.
"""

from __future__ import annotations

import json
import math
from typing import Any


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"key {key!r} appears twice in one object")
        result[key] = value
    return result


def _finite_float(literal: str) -> float:
    value = float(literal)
    if not math.isfinite(value):
        raise ValueError(f"number {literal} is out of range")
    return value


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number")


def loads_strict(text: str) -> Any:
    """`json.loads` with the refusals above; raises ValueError whose first line says what is wrong."""
    return json.loads(
        text, object_pairs_hook=_no_duplicate_keys, parse_float=_finite_float, parse_constant=_reject_constant
    )

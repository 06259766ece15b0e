"""Metadata filters: a small dictionary language, checked before any search runs.

``{"field": value}`` is equality; ``{"field": {"$in": [a, b]}}`` membership; the operators
``$eq``, ``$ne``, ``$in`` and ``$nin`` compare one field; ``{"$and": [...]}`` and
``{"$or": [...]}`` combine filters; several keys in one dictionary must all hold.
"""

from __future__ import annotations

from typing import Any

Filter = dict[str, Any]

_FIELD_OPERATORS = {
    "$eq": lambda value, target: value == target,
    "$ne": lambda value, target: value != target,
    "$in": lambda value, target: value in target,
    "$nin": lambda value, target: value not in target,
}


MAX_DEPTH = 32  # nested $and/$or levels; deeper filters are refused before any recursion limit


def validate_filter(where: Filter, depth: int = 0) -> None:
    """Raise ValueError naming the first malformed part of a filter."""
    if depth > MAX_DEPTH:
        raise ValueError(f"a filter may nest $and/$or at most {MAX_DEPTH} levels deep")
    if not isinstance(where, dict):
        raise ValueError(f"a filter must be a dict, got {type(where).__name__}")
    for key, condition in where.items():
        if key in ("$and", "$or"):
            if not isinstance(condition, list) or not condition:
                raise ValueError(f"{key} takes a non-empty list of filters")
            for part in condition:
                validate_filter(part, depth + 1)
        elif key.startswith("$"):
            raise ValueError(f"unknown filter operator {key!r}; use $and, $or or a field name")
        elif isinstance(condition, dict):
            for operator, target in condition.items():
                if operator not in _FIELD_OPERATORS:
                    raise ValueError(f"unknown operator {operator!r} on field {key!r}; use {sorted(_FIELD_OPERATORS)}")
                if operator in ("$in", "$nin") and not isinstance(target, (list, tuple, set)):
                    raise ValueError(f"{operator} on field {key!r} takes a list")


def matches(metadata: dict[str, Any], where: Filter) -> bool:
    """Whether one document's metadata satisfies a (validated) filter."""
    for key, condition in where.items():
        if key == "$and":
            ok = all(matches(metadata, part) for part in condition)
        elif key == "$or":
            ok = any(matches(metadata, part) for part in condition)
        elif isinstance(condition, dict):
            ok = key in metadata and all(
                _FIELD_OPERATORS[op](metadata[key], target) for op, target in condition.items()
            )
        else:
            ok = key in metadata and metadata[key] == condition
        if not ok:
            return False
    return True

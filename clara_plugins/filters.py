"""Metadata filters: a small dictionary language, checked before any search runs.

``{"field": value}`` is equality, where the value is not a dictionary: a dictionary holds a
field's operators, so ``{"field": {}}`` holds none and selects every document that has the field
(equality with an empty dictionary is ``{"field": {"$eq": {}}}``);
``{"field": {"$in": [a, b]}}`` is membership; the operators
``$eq``, ``$ne``, ``$in`` and ``$nin`` compare one field; ``$gt``, ``$gte``, ``$lt`` and
``$lte`` bound it; ``{"$and": [...]}`` and ``{"$or": [...]}`` combine filters; several keys in
one dictionary must all hold.

Equality is Python's, which milvus-lite's JSON filters share: ``True`` equals ``1`` and
``False`` equals ``0`` (a Milvus server tells them apart: ``milvus_store``). A range bound is a number or a string. Numbers compare with numbers, strings
with strings (so ISO dates order correctly); a stored value of another kind (a string
against a number bound, a boolean, a list) or a missing field simply does not match.
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Callable
from typing import Any

import numpy as np

Filter = dict[str, Any]


def _kind(value: Any) -> type | None:
    """What a range operator may compare: numbers (not booleans; numpy's too) or strings; None otherwise."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float
    return str if isinstance(value, str) else None


Test = Callable[[Any], bool]  # of one stored value


def _bounded_by(compare: Callable[[Any, Any], bool]) -> Callable[[Any], Test]:
    return lambda bound: lambda value: (_kind(value) is not None and _kind(value) is _kind(bound)
                                        and compare(value, bound))


def _plain(target: Any) -> Any:
    """A numpy number as the Python one it holds (a float32's exact value), as Milvus reads it,
    inside lists and dicts too (numpy compared a nested float32 in float32)."""
    if isinstance(target, np.generic):
        return target.item()
    if isinstance(target, (list, tuple)):
        return type(target)(map(_plain, target))
    return {key: _plain(item) for key, item in target.items()} if isinstance(target, dict) else target


def _nan(value: Any) -> bool:
    """A float NaN; an integer never is one (math.isnan of 10**400 overflowed)."""
    return isinstance(value, (float, np.floating)) and math.isnan(value)


def _equal_to(target: Any) -> Test:
    """Python's equality with a target read as a Python value (a numpy number compared a stored
    list element by element: an error, or [1] equal to 1)."""
    return lambda value: bool(value == target)


def _member_of(targets: Any) -> Test:
    """Equality with any of the targets: a set lookup for the scalars (Python's hash agrees with its
    equality: True, 1 and 1.0 alike; a store of a million compared each with every listed value),
    a stored list or dict compared with the list and dict targets one by one."""
    scalars = {target for target in targets if not isinstance(target, (list, dict))}
    containers = [target for target in targets if isinstance(target, (list, dict))]
    return lambda value: (value in scalars if not isinstance(value, (list, dict))
                          else any(value == target for target in containers))


def _negated(test: Test) -> Test:
    return lambda value: not test(value)


_RANGE_OPERATORS = {"$gt": operator.gt, "$gte": operator.ge, "$lt": operator.lt, "$lte": operator.le}
_FIELD_OPERATORS: dict[str, Callable[[Any], Test]] = {  # an operator: its (Python) target -> the test of a value
    "$eq": _equal_to,
    "$ne": lambda target: _negated(_equal_to(target)),
    "$in": _member_of,
    "$nin": lambda targets: _negated(_member_of(targets)),
    **{name: _bounded_by(compare) for name, compare in _RANGE_OPERATORS.items()},
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
        elif not isinstance(key, str):
            raise ValueError(f"a filter's field names are strings, got {key!r}")
        elif key.startswith("$"):
            raise ValueError(f"unknown filter operator {key!r}; use $and, $or or a field name")
        elif isinstance(condition, dict):
            for name, target in condition.items():
                _validate_operator(key, name, target)
        else:
            _check_equal_target(key, "equality", condition)


def _validate_operator(key: str, name: str, target: Any) -> None:
    if name not in _FIELD_OPERATORS:
        raise ValueError(f"unknown operator {name!r} on field {key!r}; use {sorted(_FIELD_OPERATORS)}")
    if name in ("$in", "$nin") and not isinstance(target, (list, tuple, set)):
        raise ValueError(f"{name} on field {key!r} takes a list")
    for value in target if name in ("$in", "$nin") else [target] if name in ("$eq", "$ne") else []:
        _check_equal_target(key, name, value)
    if name in _RANGE_OPERATORS and (_kind(target) is None or _nan(target)):
        raise ValueError(f"{name} on field {key!r} takes a number or a string, got {target!r:.60}")


def holds_no_condition(where: Filter) -> bool:
    """Whether a (validated) filter keeps every document whatever its metadata (a delete given
    one deleted everything): ``{}``, an ``$and`` of such filters, an ``$or`` holding one."""
    for key, parts in where.items():
        if key not in ("$and", "$or") or not (all if key == "$and" else any)(map(holds_no_condition, parts)):
            return False
    return True


def _check_equal_target(key: str, name: str, target: Any) -> None:
    """Refuse a value that is no JSON value: metadata is kept as JSON (tuples and NaN are refused
    at upsert), so it matched nothing, and with $ne or $nin every document. An infinity is a
    number beyond every stored one, and compares as one."""
    if not _storable(target):
        raise ValueError(f"{name} on field {key!r} compares with {target!r:.60}, which no stored metadata value "
                         "equals (metadata is JSON: numbers but NaN, strings, booleans, None, lists, dicts)")


def _storable(value: Any) -> bool:
    if value is None or isinstance(value, (str, bool, np.bool_)):
        return True
    if isinstance(value, numbers.Real):  # numpy's too
        return not _nan(value)
    if isinstance(value, list):
        return all(map(_storable, value))
    return isinstance(value, dict) and all(isinstance(k, str) and _storable(v) for k, v in value.items())


Match = Callable[[dict[str, Any]], bool]  # of one document's metadata


def matcher(where: Filter) -> Match:
    """Whether one document's metadata satisfies a (validated) filter: built once for the many
    documents it is asked of, its targets read as Python values once, not at every document."""
    tests = [_key_match(key, condition) for key, condition in where.items()]
    return tests[0] if len(tests) == 1 else lambda metadata: all(test(metadata) for test in tests)


def _key_match(key: str, condition: Any) -> Match:
    """One key of a filter: ``$and``/``$or`` of filters, or a field's conditions."""
    if key in ("$and", "$or"):
        parts = [matcher(part) for part in condition]
        if len(parts) == 1:  # LlamaIndex's filters come as one: a generator at every document took 5 times as long
            return parts[0]
        if key == "$and":
            return lambda metadata: all(part(metadata) for part in parts)
        return lambda metadata: any(part(metadata) for part in parts)
    conditions = condition.items() if isinstance(condition, dict) else [("$eq", condition)]
    fields = [_FIELD_OPERATORS[name](_plain(target)) for name, target in conditions]
    if len(fields) == 1:  # the common case, without a loop at every document
        field = fields[0]
        return lambda metadata: key in metadata and field(metadata[key])
    return lambda metadata: key in metadata and all(field(metadata[key]) for field in fields)

"""Evaluation of the pipeline definition language: Get, Std:Join, Std:JsonGet and conditions.

Written by hand because the SDK only *emits* these expressions; SageMaker evaluates them
in the service, and nothing in the SDK evaluates them locally.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

_TOKEN = re.compile(r"\.?([A-Za-z_][A-Za-z0-9_]*)|\[\s*'([^']*)'\s*\]|\[\s*\"([^\"]*)\"\s*\]|\[(\d+)\]")


class ExpressionError(Exception):
    """An expression refers to something that does not exist (yet)."""


def parse_path(path: str) -> list[str | int]:
    """`Outputs['data'].S3Output.S3Uri` -> ['Outputs', 'data', 'S3Output', 'S3Uri']."""
    tokens: list[str | int] = []
    pos = 0
    while pos < len(path):
        match = _TOKEN.match(path, pos)
        if not match:
            raise ExpressionError(f"cannot parse property path {path!r} at {path[pos:]!r}")
        name, quoted, dquoted, index = match.groups()
        if index is not None:
            tokens.append(int(index))
        else:
            tokens.append(name if name is not None else (quoted if quoted is not None else dquoted))
        pos = match.end()
    return tokens


def walk(value: Any, tokens: list[str | int], where: str) -> Any:
    """Follow a property path through a Describe* response or a JSON document.

    SageMaker addresses list members by name (`Outputs['data']`): a string key on a list
    selects the element whose `...Name` field (OutputName, ChannelName, ...) equals it.
    """
    for token in tokens:
        if isinstance(value, list):
            if isinstance(token, int):
                if token >= len(value):
                    raise ExpressionError(f"{where}: index {token} out of range")
                value = value[token]
                continue
            matches = [item for item in value if isinstance(item, dict) and any(
                k.endswith("Name") and v == token for k, v in item.items())]
            if not matches:
                raise ExpressionError(f"{where}: no element named {token!r}")
            value = matches[0]
        elif isinstance(value, dict):
            if token not in value:
                raise ExpressionError(f"{where}: no field {token!r}")
            value = value[token]
        else:
            raise ExpressionError(f"{where}: cannot take {token!r} of a {type(value).__name__}")
    return value


@dataclass
class Scope:
    """What expressions of one execution can see."""

    parameters: dict[str, Any]
    execution: dict[str, Any]
    step_properties: dict[str, dict] = field(default_factory=dict)
    # Reads a property file of a finished step: (step name, property file name) -> JSON.
    read_property_file: Callable[[str, str], Any] | None = None


def is_expression(value: Any) -> bool:
    return isinstance(value, dict) and len(value) == 1 and next(iter(value)) in (
        "Get", "Std:Join", "Std:JsonGet")


def resolve(value: Any, scope: Scope) -> Any:
    """Replace every expression inside `value` (a step's Arguments, say) with its value."""
    if isinstance(value, list):
        return [resolve(v, scope) for v in value]
    if not isinstance(value, dict):
        return value
    if not is_expression(value):
        return {k: resolve(v, scope) for k, v in value.items()}
    (op, arg), = value.items()
    if op == "Get":
        return _get(arg, scope)
    if op == "Std:Join":
        return str(arg.get("On", "")).join(_to_str(resolve(v, scope)) for v in arg["Values"])
    return _json_get(arg, scope)


def _get(ref: str, scope: Scope) -> Any:
    head, _, rest = ref.partition(".")
    if head == "Parameters":
        if rest not in scope.parameters:
            raise ExpressionError(f"Get {ref}: no parameter {rest!r}")
        return scope.parameters[rest]
    if head == "Execution":
        if rest not in scope.execution:
            raise ExpressionError(f"Get {ref}: unknown execution variable {rest!r}")
        return scope.execution[rest]
    if head == "Steps":
        step, _, path = rest.partition(".")
        if step not in scope.step_properties:
            raise ExpressionError(f"Get {ref}: step {step!r} has not run")
        return walk(scope.step_properties[step], parse_path(path), f"Get {ref}")
    raise ExpressionError(f"Get {ref}: unknown namespace {head!r}")


def _json_get(arg: dict, scope: Scope) -> Any:
    reference = arg.get("PropertyFile")
    if not (isinstance(reference, dict) and "Get" in reference):
        raise ExpressionError(f"Std:JsonGet: unsupported property file reference {reference!r}")
    match = re.fullmatch(r"Steps\.([^.]+)\.PropertyFiles\.([^.]+)", reference["Get"])
    if not match:
        raise ExpressionError(f"Std:JsonGet: {reference['Get']!r} is not Steps.X.PropertyFiles.Y")
    if scope.read_property_file is None:
        raise ExpressionError("Std:JsonGet: no property files in this scope")
    document = scope.read_property_file(match[1], match[2])
    return walk(document, parse_path(arg["Path"]), f"Std:JsonGet {match[2]}:{arg['Path']}")


def _to_str(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return str(value)


def _number_or_str(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, str):
        return value
    try:
        return float(value)
    except ValueError:
        return value


def _compare(left: Any, right: Any, op: Callable[[Any, Any], bool], kind: str) -> bool:
    left, right = _number_or_str(left), _number_or_str(right)
    try:
        return op(left, right)
    except TypeError:
        raise ExpressionError(f"{kind}: cannot compare {left!r} with {right!r}") from None


_COMPARISONS: dict[str, Callable[[Any, Any], bool]] = {
    "Equals": lambda a, b: a == b,
    "GreaterThan": lambda a, b: a > b,
    "GreaterThanOrEqualTo": lambda a, b: a >= b,
    "LessThan": lambda a, b: a < b,
    "LessThanOrEqualTo": lambda a, b: a <= b,
}


def evaluate_condition(condition: dict, scope: Scope) -> bool:
    kind = condition["Type"]
    if kind in _COMPARISONS:
        return _compare(resolve(condition["LeftValue"], scope),
                        resolve(condition["RightValue"], scope), _COMPARISONS[kind], kind)
    if kind == "In":
        value = _number_or_str(resolve(condition["QueryValue"], scope))
        return any(value == _number_or_str(resolve(v, scope)) for v in condition["Values"])
    if kind == "Not":
        return not evaluate_condition(condition["Condition"], scope)
    if kind == "Or":
        return any(evaluate_condition(c, scope) for c in condition["Conditions"])
    raise ExpressionError(f"unsupported condition type {kind!r}")



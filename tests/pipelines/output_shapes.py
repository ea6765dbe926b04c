"""Answers checked against botocore's output shapes, as the JSON arrives (before botocore parses
it, which would silently drop a member the shape does not have).

`strict_client` gives a boto3 SageMaker client that checks every answer of the local service
(pipelines/local/sagemaker_api.py) it receives: types,
required and unknown members, enums, lengths, sizes, ranges and patterns (AWS writes its patterns
in the Java dialect, which the `regex` module reads). A problem fails the call that got it.
"""

from __future__ import annotations

import functools
import json
from typing import Any

import boto3
import regex
from botocore.model import Shape

from pipelines.local.sagemaker_api import OPERATIONS

_TYPES = {"string": str, "boolean": bool, "blob": str, "list": list, "map": dict,
          "structure": dict, "integer": int, "long": int, "float": (int, float),
          "double": (int, float), "timestamp": (int, float)}  # JSON timestamps: epoch seconds


@functools.cache
def _pattern(pattern: str) -> regex.Pattern | None:
    try:
        return regex.compile(pattern, flags=regex.DOTALL)
    except regex.error:
        return None


def problems(value: Any, shape: Shape, where: str = "") -> list[str]:
    """What in `value` (decoded JSON) the shape does not allow, one line each."""
    kind, meta = shape.type_name, shape.metadata
    wanted = _TYPES[kind]
    if not isinstance(value, wanted) or (kind in ("integer", "long") and isinstance(value, bool)):
        return [f"{where or '(answer)'}: {type(value).__name__} where the shape has {kind}"]
    found: list[str] = []
    if kind == "structure":
        for name in value:
            if name not in shape.members:
                found.append(f"{where}.{name}: not a member of {shape.name}")
        for name in shape.required_members:
            if name not in value:
                found.append(f"{where}.{name}: required by {shape.name}, missing")
        for name, member in value.items():
            if name in shape.members:
                found += problems(member, shape.members[name], f"{where}.{name}")
    elif kind == "list":
        found += _range(len(value), meta, where, "items")
        for index, member in enumerate(value):
            found += problems(member, shape.member, f"{where}[{index}]")
    elif kind == "map":
        found += _range(len(value), meta, where, "entries")
        for key, member in value.items():
            found += problems(key, shape.key, f"{where} key") + problems(
                member, shape.value, f"{where}[{key!r}]")
    elif kind == "string":
        if shape.enum and value not in shape.enum:
            found.append(f"{where}: {value!r} is not one of {shape.enum}")
        found += _range(len(value), meta, where, "characters")
        compiled = _pattern(meta["pattern"]) if "pattern" in meta else None
        if compiled is not None and compiled.fullmatch(value) is None:
            found.append(f"{where}: {value!r} does not match {meta['pattern']}")
    elif kind in ("integer", "long", "float", "double"):
        found += _range(value, meta, where, "")
    return found


def _range(size: float, meta: dict, where: str, unit: str) -> list[str]:
    found = []
    if "min" in meta and size < meta["min"]:
        found.append(f"{where}: {size} {unit} under the minimum {meta['min']}".rstrip())
    if "max" in meta and size > meta["max"]:
        found.append(f"{where}: {size} {unit} over the maximum {meta['max']}".rstrip())
    return found


def _check_answer(operation_model, response_dict, **_) -> None:
    if operation_model.name not in OPERATIONS or response_dict["status_code"] >= 300:
        return  # moto's answers are moto's
    body = json.loads(response_dict["body"])
    found = problems(body, operation_model.output_shape)
    assert not found, f"{operation_model.name} answered outside its output shape:\n" + "\n".join(
        found)


def strict_client(endpoint_url: str, region: str = "us-east-1"):
    """A SageMaker client of the endpoint that fails any call whose answer (to an operation the
    local service answers itself) is outside the operation's output shape."""
    client = boto3.client("sagemaker", endpoint_url=endpoint_url, region_name=region,
                          aws_access_key_id="local", aws_secret_access_key="local")
    client.meta.events.register("before-parse.sagemaker.*", _check_answer)
    return client

"""Reading a pipeline definition: its steps as a graph, and its parameters' values.

Pure functions of the definition JSON that SageMaker receives (no AWS call, no engine): the
command line and the console use them for either target (which steps a re-run from a step runs,
which parameter values an execution gets), and the local engine runs the graph they read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipelines import UserError


def references(value: Any) -> set[str]:
    """Names of the steps an argument tree reads from (data dependencies)."""
    found: set[str] = set()
    if isinstance(value, list):
        for v in value:
            found |= references(v)
    elif isinstance(value, dict):
        get = value.get("Get")
        if isinstance(get, str) and get.startswith("Steps."):
            found.add(get.split(".")[1])
        for v in value.values():
            found |= references(v)
    return found


@dataclass
class Step:
    spec: dict
    depends: set[str]
    gate: tuple[str, bool] | None  # (condition step, branch taken) that enables this step


def flatten(steps: list[dict], gate: tuple[str, bool] | None = None) -> dict[str, Step]:
    found: dict[str, Step] = {}
    for spec in steps:
        arguments = spec.get("Arguments", {})
        depends = set(spec.get("DependsOn", [])) | references(arguments)
        if gate:
            depends.add(gate[0])
        found[spec["Name"]] = Step(spec, depends, gate)
        if spec["Type"] == "Condition":
            found.update(flatten(arguments.get("IfSteps", []), (spec["Name"], True)))
            found.update(flatten(arguments.get("ElseSteps", []), (spec["Name"], False)))
    return found


def topological_order(steps: dict[str, Step]) -> list[str]:
    for name, step in steps.items():
        unknown = step.depends - set(steps)
        if unknown:
            raise UserError(f"step {name} depends on unknown step(s) {', '.join(sorted(unknown))}")
    order: list[str] = []
    done: set[str] = set()
    while len(order) < len(steps):
        ready = [n for n, s in steps.items() if n not in done and s.depends <= done]
        if not ready:
            cycle = sorted(set(steps) - done)
            raise UserError(f"the definition has a dependency cycle among {', '.join(cycle)}")
        for name in ready:  # definition order among the ready ones
            order.append(name)
            done.add(name)
    return order


def step_specs(definition: dict) -> dict[str, dict]:
    """Every step of the definition by name, branch steps included, in the order they would run."""
    steps = flatten(definition.get("Steps", []))
    return {name: steps[name].spec for name in topological_order(steps)}


def step_names(definition: dict) -> list[str]:
    """Every step of the definition, branch steps included, in the order they would run."""
    return list(step_specs(definition))


def upstream(steps: dict[str, Step], name: str) -> set[str]:
    found: set[str] = set()
    pending = list(steps[name].depends)
    while pending:
        step = pending.pop()
        if step not in found:
            found.add(step)
            pending += steps[step].depends
    return found


def steps_from(definition: dict, step: str) -> list[str]:
    """`step` and every step downstream of it, in run order: what a re-run from `step` runs."""
    steps = flatten(definition.get("Steps", []))
    if step not in steps:
        raise UserError(f"no step {step!r} in this pipeline; its steps are {', '.join(steps)}")
    return [n for n in topological_order(steps) if n == step or step in upstream(steps, n)]


def step_graph(definition: dict) -> list[dict]:
    """Every step in run order with its type, the steps it waits for (data, `DependsOn` and the
    condition whose branch holds it) and that branch: the DAG as the console draws it."""
    steps = flatten(definition.get("Steps", []))
    return [{"name": name, "type": steps[name].spec["Type"],
             "depends": sorted(steps[name].depends),
             "branch": ({"condition": steps[name].gate[0], "if": steps[name].gate[1]}
                        if steps[name].gate else None)}
            for name in topological_order(steps)]


def unfinished_steps(definition: dict, statuses: dict[str, str]) -> list[str]:
    """The steps that did not succeed in an execution (`statuses`: step -> status), in run
    order: what continuing that execution runs."""
    return [n for n in step_names(definition) if statuses.get(n) != "Succeeded"]


def resolve_parameters(definition: dict, overrides: dict[str, str]) -> dict[str, Any]:
    """Parameter values with defaults and typed overrides, as StartPipelineExecution does."""
    declared = {p["Name"]: p for p in definition.get("Parameters", [])}
    unknown = set(overrides) - set(declared)
    if unknown:
        raise UserError(f"unknown pipeline parameter(s) {', '.join(sorted(unknown))}; "
                        f"this pipeline has {', '.join(declared)}")
    values: dict[str, Any] = {}
    for name, spec in declared.items():
        kind = spec.get("Type", "String")
        if name not in overrides:
            if "DefaultValue" not in spec:
                raise UserError(f"pipeline parameter {name} has no default; pass -p {name}=VALUE")
            values[name] = spec["DefaultValue"]
            continue
        raw = overrides[name]
        try:
            if kind == "Integer":
                values[name] = int(raw)
            elif kind == "Float":
                values[name] = float(raw)
            elif kind == "Boolean":
                if str(raw).lower() not in ("true", "false"):
                    raise ValueError
                values[name] = str(raw).lower() == "true"
            else:
                values[name] = str(raw)
        except ValueError:
            raise UserError(f"pipeline parameter {name}={raw!r} is not a valid {kind}") from None
        if kind == "String" and spec.get("EnumValues") and values[name] not in spec["EnumValues"]:
            raise UserError(f"pipeline parameter {name}={raw!r} must be one of {spec['EnumValues']}")
    return values

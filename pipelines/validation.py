"""What SageMaker refuses in a request: botocore's SageMaker service model, walked whole.

botocore's own `ParamValidator` checks types and required members only. The service enforces
more, and its model says what: string lengths and patterns, enums, list and map sizes, integer
and float ranges. `problems(operation, request)` checks both, walking the request beside the
operation's input shape, so nothing here is a hand-written list of fields. AWS writes its
patterns in the Java dialect (`\\p{L}`, `\\p{Z}`); the `regex` module reads them, `re` cannot.

A few rules SageMaker documents but its model cannot express (one field depending on another)
are in `DOCUMENTED_RULES`, each with the page it comes from.

Used by the local engine on every request it makes (so a local run fails where SageMaker would,
naming the step and the field), and by the command line to refuse, before anything runs, a
parameter value that would make a step's request invalid, or that a stage setting it drives does
not take (the ranges each stage's config dataclass declares, steps/stages.py).
"""

from __future__ import annotations

import functools
import itertools
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import botocore.session
import regex
from botocore.model import Shape
from botocore.validate import ParamValidator

from pipelines import UserError
from steps.common import knobs  # the declared ranges; no torch
from steps.stages import STAGES, stage_running

# What each step type of a definition asks SageMaker for.
STEP_OPERATIONS = {"Processing": "CreateProcessingJob", "Training": "CreateTrainingJob",
                   "RegisterModel": "CreateModelPackage"}
# The most a training job may run: "The maximum value is 28 days."
# https://docs.aws.amazon.com/sagemaker/latest/APIReference/API_StoppingCondition.html
MAX_RUNTIME_LIMIT_SECONDS = 28 * 24 * 3600


@functools.cache
def _service_model():
    return botocore.session.get_session().get_service_model("sagemaker")


def input_shape(operation: str) -> Shape:
    return _service_model().operation_model(operation).input_shape


@functools.cache
def _pattern(pattern: str) -> regex.Pattern | None:
    try:
        return regex.compile(pattern, flags=regex.DOTALL)
    except regex.error:  # 4 of the model's 466 patterns use UTF-16 surrogates `regex` refuses
        return None


def constraint_problems(value: Any, shape: Shape | None, where: str) -> Iterator[str]:
    """What the service enforces beyond types, as `<where>: <what is wrong>` lines."""
    if shape is None:
        return
    meta, kind = shape.metadata, shape.type_name
    if kind == "string" and isinstance(value, str):
        if "max" in meta and len(value) > meta["max"]:
            yield f"{where}: {len(value)} characters, over the maximum {meta['max']}"
        if "min" in meta and len(value) < meta["min"]:
            yield f"{where}: {len(value)} characters, under the minimum {meta['min']}"
        if shape.enum and value not in shape.enum:
            yield f"{where}: {value!r} is not one of {', '.join(shape.enum)}"
        pattern = _pattern(meta["pattern"]) if "pattern" in meta else None
        if pattern is not None and pattern.fullmatch(value) is None:
            shown = value if len(value) <= 80 else value[:77] + "..."
            yield f"{where}: {shown!r} does not match SageMaker's pattern {meta['pattern']}"
    elif kind in ("integer", "long", "float", "double") and isinstance(value, (int, float)) \
            and not isinstance(value, bool):
        if "max" in meta and value > meta["max"]:
            yield f"{where}: {value} is over the maximum {meta['max']}"
        if "min" in meta and value < meta["min"]:
            yield f"{where}: {value} is under the minimum {meta['min']}"
    elif kind == "structure" and isinstance(value, dict):
        for name, member in value.items():
            yield from constraint_problems(member, shape.members.get(name), _join(where, name))
    elif kind == "list" and isinstance(value, list):
        yield from _size_problems(len(value), meta, where, "items")
        for index, member in enumerate(value):
            yield from constraint_problems(member, shape.member, f"{where}[{index}]")
    elif kind == "map" and isinstance(value, dict):
        yield from _size_problems(len(value), meta, where, "entries")
        for key, member in value.items():
            yield from constraint_problems(key, shape.key, f"{_join(where, '')}key {key!r}")
            yield from constraint_problems(member, shape.value, _join(where, str(key)))


def _join(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def _size_problems(size: int, meta: dict, where: str, unit: str) -> Iterator[str]:
    if "max" in meta and size > meta["max"]:
        yield f"{where}: {size} {unit}, over the maximum {meta['max']}"
    if "min" in meta and size < meta["min"]:
        yield f"{where}: {size} {unit}, under the minimum {meta['min']}"


def _spot_rules(request: dict) -> Iterator[str]:
    stopping = request.get("StoppingCondition") or {}
    runtime, wait = stopping.get("MaxRuntimeInSeconds"), stopping.get("MaxWaitTimeInSeconds")
    # "The maximum value is 28 days." (API_StoppingCondition, MaxRuntimeInSeconds)
    if isinstance(runtime, int) and runtime > MAX_RUNTIME_LIMIT_SECONDS:
        yield (f"StoppingCondition.MaxRuntimeInSeconds: {runtime} is over SageMaker's limit of "
               f"{MAX_RUNTIME_LIMIT_SECONDS} (28 days)")
    # MaxWaitTimeInSeconds "must be equal to or greater than MaxRuntimeInSeconds" (same page), and
    # is refused without managed spot training: "Invalid MaxWaitTimeInSeconds. It is only supported
    # when EnableManagedSpotTraining is set to true" (CreateTrainingJob's ValidationException,
    # https://github.com/aws/sagemaker-python-sdk/issues/4140).
    if wait is not None and not request.get("EnableManagedSpotTraining"):
        yield ("StoppingCondition.MaxWaitTimeInSeconds: only allowed with "
               "EnableManagedSpotTraining true")
    if isinstance(wait, int) and isinstance(runtime, int) and wait < runtime:
        yield (f"StoppingCondition.MaxWaitTimeInSeconds: {wait} is under MaxRuntimeInSeconds "
               f"{runtime}; spot training waits at least as long as it may run")


# Rules of one field against another, which the service model cannot state.
DOCUMENTED_RULES: dict[str, Callable[[dict], Iterator[str]]] = {
    "CreateTrainingJob": _spot_rules,
}


_CONSTRAINT_REPORTS = ("Invalid length for parameter", "Invalid value for parameter",
                      "Invalid range for parameter")


def problems(operation: str, request: dict) -> list[str]:
    """Everything SageMaker would refuse in `request` for `operation`, one line each."""
    shape = input_shape(operation)
    # botocore's client fills a missing idempotency token (ClientRequestToken) before it validates.
    request = {**{name: str(uuid.uuid4()) for name, member in shape.members.items()
                  if member.metadata.get("idempotencyToken")}, **request}
    report = ParamValidator().validate(request, shape)
    # botocore's validator: types, required and unknown members (its minimum checks are among
    # the constraints below, worded the same way as the rest).
    found = [" ".join(line.split()) for line in report.generate_report().splitlines()
             if line.strip() and not line.startswith(_CONSTRAINT_REPORTS)] \
        if report.has_errors() else []
    found += constraint_problems(request, shape, "")
    rule = DOCUMENTED_RULES.get(operation)
    if rule is not None:
        found += rule(request)
    return found


def check_request(operation: str, request: dict, where: str) -> None:
    """Raise a one-line UserError, `<where>: <operation> <field>: <problem>`, if SageMaker would
    refuse `request`."""
    found = problems(operation, request)
    if found:
        more = f" (and {len(found) - 1} more: {'; '.join(found[1:3])})" if len(found) > 1 else ""
        raise UserError(f"{where}: {operation} {found[0]}{more}")


# -- before an execution: what the parameter values would make of each step's request ----------

class _Unknown:
    """A value known only while the execution runs (another step's output, a property file)."""


_EXECUTION_EXAMPLES = {"PipelineExecutionId": "abcdef123456", "PipelineName": "pipeline",
                       "PipelineExecutionArn": "arn:aws:sagemaker:us-east-1:123456789012:pipeline/"
                                               "pipeline/execution/abcdef123456",
                       "StartDateTime": "2026-01-01T00:00:00Z",
                       "CurrentDateTime": "2026-01-01T00:00:00Z"}


def _resolved(value: Any, values: dict[str, Any], where: str,
              origins: dict[str, set[str]]) -> Any:
    """`value` with parameters (and execution variables) replaced by what they will be; what
    only the execution knows becomes _Unknown. `origins`: field path -> parameters it holds."""
    if isinstance(value, list):
        return [_resolved(v, values, f"{where}[{i}]", origins) for i, v in enumerate(value)]
    if not isinstance(value, dict):
        return value
    if len(value) == 1 and next(iter(value)) in ("Get", "Std:Join", "Std:JsonGet"):
        used: set[str] = set()
        result = _expression(value, values, used)
        if used:
            origins[where] = used
        return result
    return {k: _resolved(v, values, _join(where, str(k)), origins) for k, v in value.items()}


def _expression(value: dict, values: dict[str, Any], used: set[str]) -> Any:
    (op, argument), = value.items()
    if op == "Get" and isinstance(argument, str):
        namespace, _, name = argument.partition(".")
        if namespace == "Parameters" and name in values:
            used.add(name)
            return values[name]
        if namespace == "Execution" and name in _EXECUTION_EXAMPLES:
            return _EXECUTION_EXAMPLES[name]
        return _Unknown()
    if op == "Std:Join" and isinstance(argument, dict):
        parts = [_expression(v, values, used) if isinstance(v, dict) else v
                 for v in argument.get("Values", [])]
        if any(isinstance(p, _Unknown) for p in parts):
            return _Unknown()
        return str(argument.get("On", "")).join(
            ("true" if p else "false") if isinstance(p, bool) else str(p) for p in parts)
    return _Unknown()


def _steps(steps: list[dict]) -> Iterator[dict]:
    for step in steps:
        yield step
        if step.get("Type") == "Condition":
            arguments = step.get("Arguments", {})
            yield from _steps(arguments.get("IfSteps", []) + arguments.get("ElseSteps", []))


def _stage_settings(step: dict) -> tuple[str | None, dict[str, Any]]:
    """The stage a step runs (steps/stages.py) and its settings as the definition gives them:
    a training job's hyperparameters, a processing job's `--name value` container arguments."""
    arguments = step.get("Arguments", {})
    if step.get("Type") == "Training":
        entrypoint = arguments.get("AlgorithmSpecification", {}).get("ContainerEntrypoint")
        settings = dict(arguments.get("HyperParameters") or {})
    elif step.get("Type") == "Processing":
        entrypoint = arguments.get("AppSpecification", {}).get("ContainerEntrypoint")
        given = arguments.get("AppSpecification", {}).get("ContainerArguments") or []
        settings = {key[2:].replace("-", "_"): value for key, value in itertools.pairwise(given)
                    if isinstance(key, str) and key.startswith("--")}
    else:
        return None, {}
    if not (isinstance(entrypoint, list) and len(entrypoint) == 3):
        return None, {}
    return stage_running(entrypoint[2]), settings


def _as_setting(value: Any, rule: knobs.Range | knobs.OneOf) -> Any:
    """A parameter's value as the stage parses it: a number for a numeric setting ('1e-4')."""
    if isinstance(rule, knobs.Range) and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def setting_problems(definition: dict, values: dict[str, Any]) -> list[str]:
    """Parameter values outside what the stage setting they drive takes, one line each, naming
    the parameter, its value and what the setting takes: refused before the first job runs (and
    bills), not when the stage's job parses them after the stages before it."""
    found = []
    for step in _steps(definition.get("Steps", [])):
        stage, settings = _stage_settings(step)
        if stage is None:
            continue
        for key, setting in settings.items():
            used: set[str] = set()
            value = _expression(setting, values, used) if isinstance(setting, dict) else setting
            if used and not isinstance(value, _Unknown):
                found += _setting_problems(stage, key, value, used, values)
    return list(dict.fromkeys(found))


def recipe_setting_problems(chosen, values: dict[str, Any]) -> list[str]:
    """`setting_problems` of a recipe's stages before its definition is built (`$Name` settings
    take the parameter's value)."""
    from pipelines.recipe import parameter_reference

    found = []
    for stage, settings in chosen.stages.items():
        for key, setting in settings.items():
            name = parameter_reference(setting)
            if name is not None and name in values:
                found += _setting_problems(stage, key, values[name], {name}, values)
    return list(dict.fromkeys(found))


def _setting_problems(stage: str, key: str, value: Any, used: set[str],
                      values: dict[str, Any]) -> list[str]:
    rule = knobs.allowed(STAGES[stage].config, key)
    if rule is None or rule.allows(_as_setting(value, rule)):
        return []
    return [f"pipeline parameter {name}={values[name]!r}: stage {stage}'s {key} takes "
            f"{'values ' if isinstance(rule, knobs.Range) else ''}{rule}" for name in sorted(used)]


def check_execution(definition: dict, values: dict[str, Any]) -> None:
    """Refuse, before anything runs, parameter values that a stage setting does not take (DPO's
    beta, PPO's kl_coef, a learning rate: `setting_problems`) or that would make a step's request
    one SageMaker refuses, naming the parameter: a metadata value with a comma, a group name with
    a space, an instance type that does not exist, a spot wait shorter than the runtime. What only
    the execution knows (other steps' outputs) is checked when the step runs.
    """
    found = setting_problems(definition, values)
    for step in _steps(definition.get("Steps", [])):
        operation = STEP_OPERATIONS.get(step.get("Type", ""))
        if operation is None:
            continue
        origins: dict[str, set[str]] = {}
        request = _resolved(step.get("Arguments", {}), values, "", origins)
        lines = list(constraint_problems(request, input_shape(operation), ""))
        rule = DOCUMENTED_RULES.get(operation)
        if rule is not None:
            lines += rule(request)
        for line in lines:
            path = line.split(": ", 1)[0]
            parameters = sorted({name for field, names in origins.items()
                                 if field == path or path.startswith(f"{field}.")
                                 or field.startswith(f"{path}.") for name in names})
            given = ", ".join(f"{name}={values[name]!r}" for name in parameters)
            found.append(f"{'parameter ' + given + ': ' if given else ''}step {step['Name']}: "
                         f"{operation} {line}")
    if found:
        more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
        raise UserError(found[0] + more)

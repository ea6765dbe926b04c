"""Runs a pipeline definition JSON locally, step by step, as SageMaker Pipelines would.

It reads the definition (not the Python objects that built it), so what runs here is what
SageMaker would receive: typed parameters with defaults and overrides, `Get` on parameters,
execution variables and step properties, `Std:Join`, `Std:JsonGet` over property files,
conditions with their branches, `DependsOn` and data dependencies in topological order,
Processing and Training jobs (pipelines/local/jobs.py), RegisterModel through boto3
`CreateModelPackage`, and Fail. Before a job starts, its resolved arguments are validated
against botocore's SageMaker model, so a request SageMaker would refuse fails here too.
Steps run one at a time (this machine has two cores); SageMaker runs independent steps
in parallel, which changes timing, not results.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import boto3
import botocore.session
from botocore.exceptions import ClientError
from botocore.validate import ParamValidator

from pipelines import UserError
from pipelines.local import jobs
from pipelines.local.expressions import (
    ExpressionError,
    Scope,
    evaluate_condition,
    references,
    resolve,
)

_OPERATIONS = {"Processing": "CreateProcessingJob", "Training": "CreateTrainingJob",
               "RegisterModel": "CreateModelPackage"}
_JOB_NAME_FIELD = {"Processing": "ProcessingJobName", "Training": "TrainingJobName"}
SUPPORTED_TYPES = {"Processing", "Training", "RegisterModel", "Condition", "Fail"}
# What a step can fail with that is the step's failure, not the engine's: missing S3 inputs,
# an image that cannot run the stage, a registry refusal.
_STEP_ERRORS = (UserError, ExpressionError, FileNotFoundError, ValueError, ClientError)


@dataclass
class StepRecord:
    name: str
    type: str
    status: str = "Pending"  # Pending, Executing, Succeeded, Failed, NotExecuted
    started: float | None = None
    ended: float | None = None
    failure_reason: str = ""
    log: str = ""
    job_name: str = ""
    outcome: str = ""  # Condition: "true"/"false"; RegisterModel: the package ARN
    properties: dict = field(default_factory=dict)

    @property
    def seconds(self) -> float | None:
        return None if self.started is None else (self.ended or time.time()) - self.started


@dataclass
class ExecutionRecord:
    execution_id: str
    pipeline_name: str
    arn: str
    parameters: dict[str, Any]
    started: float
    status: str = "Executing"  # Executing, Succeeded, Failed
    ended: float | None = None
    failure_reason: str = ""
    steps: dict[str, StepRecord] = field(default_factory=dict)


@dataclass
class _Step:
    spec: dict
    depends: set[str]
    gate: tuple[str, bool] | None  # (condition step, branch taken) that enables this step


def _flatten(steps: list[dict], gate: tuple[str, bool] | None = None) -> dict[str, _Step]:
    found: dict[str, _Step] = {}
    for spec in steps:
        arguments = spec.get("Arguments", {})
        depends = set(spec.get("DependsOn", [])) | references(arguments)
        if gate:
            depends.add(gate[0])
        found[spec["Name"]] = _Step(spec, depends, gate)
        if spec["Type"] == "Condition":
            found.update(_flatten(arguments.get("IfSteps", []), (spec["Name"], True)))
            found.update(_flatten(arguments.get("ElseSteps", []), (spec["Name"], False)))
    return found


def topological_order(steps: dict[str, _Step]) -> list[str]:
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


def step_names(definition: dict) -> list[str]:
    """Every step of the definition, branch steps included, in the order they would run."""
    return topological_order(_flatten(definition.get("Steps", [])))


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


_sagemaker_model = None


def validate_request(step_type: str, request: dict, step_name: str) -> None:
    """Check a resolved request against botocore's SageMaker API model, as the service would."""
    global _sagemaker_model
    if _sagemaker_model is None:
        _sagemaker_model = botocore.session.get_session().get_service_model("sagemaker")
    shape = _sagemaker_model.operation_model(_OPERATIONS[step_type]).input_shape
    report = ParamValidator().validate(request, shape)
    if report.has_errors():
        problems = "; ".join(line.strip() for line in report.generate_report().splitlines())
        raise UserError(f"step {step_name}: {_OPERATIONS[step_type]} request is invalid: {problems}")


class Progress:
    """Receives what happens during an execution (the command line draws it)."""

    def step_started(self, record: StepRecord) -> None: ...
    def step_line(self, record: StepRecord, line: str) -> None: ...
    def step_finished(self, record: StepRecord) -> None: ...


def _job_name(execution_id: str, step: str) -> str:
    return f"pipelines-{execution_id}-{step}"[:63].rstrip("-")


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def run_execution(
    definition: dict,
    overrides: dict[str, str],
    executions_dir: Path,
    region: str,
    account: str,
    pipeline_name: str,
    progress: Progress | None = None,
) -> ExecutionRecord:
    """Execute the definition; returns the record (also saved as JSON next to the logs)."""
    progress = progress or Progress()
    steps = _flatten(definition.get("Steps", []))
    unsupported = sorted({s.spec["Type"] for s in steps.values()} - SUPPORTED_TYPES)
    if unsupported:
        raise UserError(f"the local engine does not run step type(s) {', '.join(unsupported)}")
    order = topological_order(steps)
    parameters = resolve_parameters(definition, overrides)

    execution_id = secrets.token_hex(6)
    arn = f"arn:aws:sagemaker:{region}:{account}:pipeline/{pipeline_name}/execution/{execution_id}"
    record = ExecutionRecord(execution_id, pipeline_name, arn, parameters, time.time(),
                             steps={n: StepRecord(n, s.spec["Type"]) for n, s in steps.items()})
    folder = executions_dir / pipeline_name / execution_id
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "definition.json").write_text(json.dumps(definition, indent=1))

    s3 = boto3.client("s3")
    sagemaker = boto3.client("sagemaker")
    property_files: dict[tuple[str, str], Any] = {}

    def read_property_file(step: str, file_name: str) -> Any:
        if (step, file_name) not in property_files:
            spec = steps[step].spec
            declared = {f["PropertyFileName"]: f for f in spec.get("PropertyFiles", [])}
            if file_name not in declared:
                raise ExpressionError(f"step {step} declares no property file {file_name!r}")
            output = declared[file_name]
            outputs = record.steps[step].properties.get("ProcessingOutputConfig", {}).get("Outputs", [])
            uri = next((o["S3Output"]["S3Uri"] for o in outputs
                        if o["OutputName"] == output["OutputName"]), None)
            if uri is None:
                raise ExpressionError(f"step {step} has no output {output['OutputName']!r}")
            bucket, key = jobs.split_s3(f"{uri.rstrip('/')}/{output['FilePath']}")
            try:
                body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
            except ClientError:
                raise ExpressionError(f"property file {file_name}: s3://{bucket}/{key} "
                                      f"was not written by step {step}") from None
            try:
                property_files[(step, file_name)] = json.loads(body)
            except ValueError:
                raise ExpressionError(f"property file {file_name} (s3://{bucket}/{key}) "
                                      "is not valid JSON") from None
        return property_files[(step, file_name)]

    scope = Scope(
        parameters=parameters,
        execution={
            "PipelineExecutionId": execution_id,
            "PipelineExecutionArn": arn,
            "PipelineName": pipeline_name,
            "StartDateTime": _now_iso(),
            "CurrentDateTime": _now_iso(),
        },
        read_property_file=read_property_file,
    )

    def save() -> None:
        (folder / "execution.json").write_text(json.dumps(asdict(record), indent=1, default=str))

    for step_name in order:
        step, state = steps[step_name], record.steps[step_name]
        blocked = [d for d in step.depends if record.steps[d].status != "Succeeded"]
        branch_not_taken = step.gate and record.steps[step.gate[0]].outcome != str(step.gate[1]).lower()
        if blocked or branch_not_taken or record.status == "Failed":
            state.status = "NotExecuted"
            progress.step_finished(state)
            continue
        state.status, state.started = "Executing", time.time()
        state.log = str(folder / step_name / "log.txt")
        (folder / step_name).mkdir(exist_ok=True)
        progress.step_started(state)
        save()
        try:
            _run_step(step.spec, state, scope, folder / step_name, s3, sagemaker, record, progress)
        except _STEP_ERRORS as exc:
            state.status, state.failure_reason = "Failed", str(exc)
            with open(state.log, "a") as log:
                log.write(f"ERROR: {exc}\n")
        state.ended = time.time()
        if state.status == "Executing":
            state.status = "Succeeded"
        if state.status == "Failed" and record.status != "Failed":
            record.status = "Failed"
            record.failure_reason = f"step {step_name} failed: {state.failure_reason}"
        scope.execution["CurrentDateTime"] = _now_iso()
        progress.step_finished(state)
        save()

    if record.status != "Failed":
        record.status = "Succeeded"
    record.ended = time.time()
    save()
    return record


def _run_step(spec: dict, state: StepRecord, scope: Scope, job_dir: Path, s3, sagemaker,
              record: ExecutionRecord, progress: Progress) -> None:
    kind, arguments = spec["Type"], spec.get("Arguments", {})
    on_line: Callable[[str], None] = lambda line: progress.step_line(state, line)

    if kind == "Condition":
        outcome = all(evaluate_condition(c, scope) for c in arguments.get("Conditions", []))
        state.outcome = str(outcome).lower()
        state.properties = {"Outcome": state.outcome}
        on_line(f"conditions evaluated to {state.outcome}")
        return

    if kind == "Fail":
        message = resolve(arguments.get("ErrorMessage", ""), scope)
        state.status, state.failure_reason = "Failed", str(message)
        on_line(str(message))
        return

    request = resolve(arguments, scope)
    if kind in _JOB_NAME_FIELD:
        state.job_name = _job_name(record.execution_id, state.name)
        validate_request(kind, {_JOB_NAME_FIELD[kind]: state.job_name, **request}, state.name)
        run = jobs.run_processing_job if kind == "Processing" else jobs.run_training_job
        result = run(s3, request, state.job_name, job_dir, on_line)
        state.properties = result.description
        scope.step_properties[state.name] = result.description
        if not result.succeeded:
            state.status, state.failure_reason = "Failed", result.failure_reason
        return

    # RegisterModel
    validate_request(kind, request, state.name)
    group = request.get("ModelPackageGroupName")
    if group:
        try:
            sagemaker.describe_model_package_group(ModelPackageGroupName=group)
        except ClientError:
            sagemaker.create_model_package_group(ModelPackageGroupName=group)
    response = sagemaker.create_model_package(**request)
    state.outcome = response["ModelPackageArn"]
    state.properties = {"ModelPackageArn": response["ModelPackageArn"]}
    scope.step_properties[state.name] = state.properties
    on_line(f"registered {response['ModelPackageArn']}")

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

As on SageMaker, a step with `CacheConfig` may reuse an earlier run (pipelines/local/cache.py),
a step with `RetryPolicies` is tried again when it fails for a retryable cause (see
`failure_cause`), and a selective execution runs chosen steps while the others take their
outputs from an earlier execution. An execution can be stopped (its running job is stopped, no
further step starts; `jobs.JobControl`) and a failed one resumed in place from its failed steps,
as RetryPipelineExecution does. Each execution ends with a cost ledger (pipelines/cost.py).
What the engine does about a step (cache hits and misses, retries, registration) is written to
the step's log, beside the job's own output.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import boto3
from boto3.exceptions import Boto3Error, RetriesExceededError
from botocore.exceptions import BotoCoreError, ClientError, HTTPClientError
from botocore.exceptions import ConnectionError as BotoConnectionError

from pipelines import UserError, cost, files, graph
from pipelines.local import cache, jobs
from pipelines.local.expressions import (
    ExpressionError,
    Scope,
    evaluate_condition,
    resolve,
)
from pipelines.validation import STEP_OPERATIONS, check_request

_JOB_NAME_FIELD = {"Processing": "ProcessingJobName", "Training": "TrainingJobName"}
SUPPORTED_TYPES = {"Processing", "Training", "RegisterModel", "Condition", "Fail"}
# Step types SageMaker retries under RetryPolicies (of those this engine runs).
_RETRYABLE_TYPES = {"Processing", "Training", "RegisterModel"}
# What a step can fail with that is the step's failure, not the engine's: missing S3 inputs,
# an image that cannot run the stage, a registry refusal, an unreachable S3.
_STEP_ERRORS = (UserError, ExpressionError, FileNotFoundError, ValueError, ClientError,
                BotoCoreError, Boto3Error)
_THROTTLING_CODES = {"Throttling", "ThrottlingException", "ThrottledException", "SlowDown",
                     "TooManyRequestsException", "RequestLimitExceeded"}
# jobs.py reports a job's end as "exit code N: ..."; N is negative when a signal ended the
# process (subprocess's convention).
_KILLED_BY_SIGNAL = re.compile(r"exit code -\d+:")
# SageMaker caps MaxAttempts at 20; a policy with only ExpireAfterMin gets that cap too.
_MAX_RETRIES = 20


@dataclass
class StepRecord:
    name: str
    type: str
    status: str = "Pending"  # Pending, Executing, Succeeded, Failed, Stopped, NotExecuted
    started: float | None = None
    ended: float | None = None
    failure_reason: str = ""
    log: str = ""
    job_name: str = ""
    outcome: str = ""  # Condition: "true"/"false"; RegisterModel: the package ARN
    properties: dict = field(default_factory=dict)
    # Processing/Training: "hit (execution ID)" or "miss: <why>"; empty for other step types.
    cache: str = ""
    # The execution whose outputs this step took instead of running (cache hit, re-run).
    reused_from: str = ""
    # Processing/Training/RegisterModel: one entry per try (job_name, started, ended,
    # failure_reason, cause); several when a RetryPolicy retried the step.
    attempts: list[dict] = field(default_factory=list)
    billable_seconds: float = 0.0  # how long this execution's jobs of the step ran
    # For a reused step: the billable seconds of the run that produced its outputs.
    source_billable_seconds: float = 0.0

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
    status: str = "Executing"  # Executing, Succeeded, Failed, Stopped
    ended: float | None = None
    failure_reason: str = ""
    steps: dict[str, StepRecord] = field(default_factory=dict)
    # A selective execution: the execution the unselected steps reuse, and the selected steps.
    source_execution: str = ""
    selected_steps: list[str] = field(default_factory=list)
    cost: dict = field(default_factory=dict)  # the ledger (pipelines/cost.py)


@dataclass
class Selection:
    """SageMaker's SelectiveExecutionConfig: run `steps`; every other step takes its
    properties from `source` when it succeeded there, and does not run otherwise."""

    source: ExecutionRecord
    steps: list[str]


def validate_request(step_type: str, request: dict, step_name: str) -> None:
    """Refuse, as SageMaker would, a request its API model does not allow (pipelines.validation):
    types, lengths, patterns, enums, sizes and ranges, naming the step and the field."""
    check_request(STEP_OPERATIONS[step_type], request, f"step {step_name}")


def failure_cause(error: BaseException | None, failure_reason: str = "") -> str:
    """The RetryPolicies exception type a failure counts as; "" for the step's own failure.

    Locally: S3 or the registry unreachable or answering 5xx is Step.SERVICE_FAULT, a
    throttling answer Step.THROTTLING, ResourceLimitExceeded SageMaker.RESOURCE_LIMIT, and a
    job whose process was killed by a signal (the machine's doing, as an instance lost on
    SageMaker) SageMaker.JOB_INTERNAL_ERROR. A job that exits non-zero by itself failed in
    the stage's code or data (status 2 is a StageError): as SageMaker's AlgorithmError, it is
    never retried. Nothing here raises SageMaker.CAPACITY_ERROR.
    """
    if isinstance(error, RetriesExceededError):
        error = error.last_exception
    elif isinstance(error, Boto3Error):  # S3UploadFailedError wraps the ClientError
        error = error.__cause__ or error.__context__ or error
    if isinstance(error, ClientError):
        code = error.response.get("Error", {}).get("Code", "")
        status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        if code in _THROTTLING_CODES:
            return "Step.THROTTLING"
        if code == "ResourceLimitExceeded":
            return "SageMaker.RESOURCE_LIMIT"
        return "Step.SERVICE_FAULT" if status >= 500 else ""
    if isinstance(error, (BotoConnectionError, HTTPClientError)):
        return "Step.SERVICE_FAULT"
    if error is None and _KILLED_BY_SIGNAL.match(failure_reason):
        return "SageMaker.JOB_INTERNAL_ERROR"
    return ""


def retry_delay(policies: list[dict], causes: list[str], first_started: float,
                now: float) -> float | None:
    """Seconds to wait before trying a step again, or None when it is not to be retried.

    `causes` holds the cause of each failed attempt so far, latest last. The first policy
    that lists the latest cause decides: IntervalSeconds × BackoffRate^(retries it already
    made), at most MaxAttempts retries, none starting later than ExpireAfterMin after the
    first attempt.
    """
    cause = causes[-1]
    if not cause:
        return None
    for policy in policies:
        types = policy.get("ExceptionType", [])
        if cause not in types:
            continue
        retries = sum(1 for c in causes[:-1] if c in types)
        if retries >= int(policy.get("MaxAttempts", _MAX_RETRIES)):
            return None
        delay = float(policy.get("IntervalSeconds", 1)) * float(policy.get("BackoffRate", 2.0)) ** retries
        if "ExpireAfterMin" in policy and now + delay - first_started > 60 * float(policy["ExpireAfterMin"]):
            return None
        return delay
    return None


class Progress:
    """Receives what happens during an execution (the command line draws it)."""

    def step_started(self, record: StepRecord) -> None: ...
    def step_line(self, record: StepRecord, line: str) -> None: ...
    def step_finished(self, record: StepRecord) -> None: ...


def new_execution_id() -> str:
    return secrets.token_hex(6)


def _job_name(execution_id: str, step: str, attempt: int = 1) -> str:
    suffix = "" if attempt == 1 else f"-{attempt}"
    return f"pipelines-{execution_id}-{step}"[:63 - len(suffix)].rstrip("-") + suffix


_JOB_OF_EXECUTION = re.compile(r"pipelines-([0-9a-f]{12})-", re.IGNORECASE)


def job_execution_id(job_name: str) -> str | None:
    """The id of the execution that ran the job named `job_name` (see `_job_name`)."""
    match = _JOB_OF_EXECUTION.match(job_name)
    return match.group(1).lower() if match else None


def _attempt_dir(job_dir: Path, attempt: int) -> Path:
    # A retry is a new job on a fresh instance: its own folder, its own job name.
    return job_dir if attempt == 1 else job_dir / f"attempt-{attempt}"


def _note(state: StepRecord, progress: Progress, line: str) -> None:
    """What the engine did about a step: into the step's log (where the job's own output goes)
    and onto the display."""
    if state.log:
        with open(state.log, "a", encoding="utf-8") as log:
            log.write(line + "\n")
    progress.step_line(state, line)


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def load_execution(executions_dir: Path, pipeline_name: str, execution_id: str) -> ExecutionRecord:
    """A past local execution, from its execution.json."""
    execution_id = execution_id.rstrip("/").rsplit("/", 1)[-1]  # an ARN names it last
    path = executions_dir / pipeline_name / execution_id / "execution.json"
    if not path.is_file():
        known = sorted(p.name for p in (executions_dir / pipeline_name).glob("*")
                       if (p / "execution.json").is_file())
        hint = f"; its executions: {', '.join(known[-5:])}" if known else ""
        raise UserError(f"no execution {execution_id} of pipeline {pipeline_name} under "
                        f"{executions_dir}{hint}")
    data = json.loads(path.read_text())
    step_fields = {f.name for f in fields(StepRecord)}
    steps = {name: StepRecord(**{k: v for k, v in step.items() if k in step_fields})
             for name, step in data.get("steps", {}).items()}
    execution_fields = {f.name for f in fields(ExecutionRecord)} - {"steps"}
    return ExecutionRecord(**{k: v for k, v in data.items() if k in execution_fields}, steps=steps)


def _check_selection(selection: Selection, steps: dict[str, graph.Step], pipeline_name: str) -> None:
    if selection.source.pipeline_name != pipeline_name:
        raise UserError(f"execution {selection.source.execution_id} is of pipeline "
                        f"{selection.source.pipeline_name}, not {pipeline_name}")
    unknown = [s for s in selection.steps if s not in steps]
    if unknown:
        raise UserError(f"no step(s) {', '.join(unknown)} in this pipeline; its steps are "
                        f"{', '.join(steps)}")
    selected = set(selection.steps)
    # "All step(s) in all path(s) between two selected steps should be included"
    # (SelectiveExecutionConfig, https://docs.aws.amazon.com/sagemaker/latest/APIReference/
    # API_SelectiveExecutionConfig.html).
    for name in selection.steps:
        for between in sorted(graph.upstream(steps, name) - selected):
            if graph.upstream(steps, between) & selected:
                raise UserError(f"step {between} lies between the selected steps "
                                f"{', '.join(sorted(graph.upstream(steps, between) & selected))} and "
                                f"{name}: select it too")
    for name in selection.steps:
        for needed in sorted(steps[name].depends - selected):
            earlier = selection.source.steps.get(needed)
            if earlier is None or earlier.status != "Succeeded":
                source = selection.source.execution_id
                raise UserError(
                    f"step {name} needs the outputs of {needed}, which did not succeed in "
                    f"execution {source}; re-run from {needed} instead" if source else
                    f"step {name} needs the outputs of {needed}, which is not selected: select "
                    f"it, or name the execution to take its outputs from "
                    f"(SourcePipelineExecutionArn)")


def _reuse(state: StepRecord, execution_id: str, properties: dict, outcome: str,
           billable_seconds: float) -> None:
    """Take an earlier run's results as this step's: its outputs are what later steps read."""
    state.status, state.properties, state.outcome = "Succeeded", properties, outcome
    state.job_name = properties.get(_JOB_NAME_FIELD.get(state.type, ""), "")
    state.reused_from = execution_id
    state.source_billable_seconds = billable_seconds


def check_execution(definition: dict, overrides: dict[str, str], pipeline_name: str,
                    selection: Selection | None = None) -> dict[str, Any]:
    """What StartPipelineExecution refuses before anything runs (unknown step types, a broken
    graph, bad parameter values, a bad selection); returns the parameters' values."""
    steps = graph.flatten(definition.get("Steps", []))
    unsupported = sorted({s.spec["Type"] for s in steps.values()} - SUPPORTED_TYPES)
    if unsupported:
        raise UserError(f"the local engine does not run step type(s) {', '.join(unsupported)}")
    graph.topological_order(steps)
    parameters = graph.resolve_parameters(definition, overrides)
    try:
        for spec in steps.values():
            cache.settings(spec.spec)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if selection:
        _check_selection(selection, steps, pipeline_name)
    return parameters


def run_execution(
    definition: dict,
    overrides: dict[str, str],
    executions_dir: Path,
    region: str,
    account: str,
    pipeline_name: str,
    progress: Progress | None = None,
    selection: Selection | None = None,
    cache_dir: Path | None = None,
    *,
    execution_id: str | None = None,
    control: jobs.JobControl | None = None,
    resume: ExecutionRecord | None = None,
) -> ExecutionRecord:
    """Execute the definition; returns the record (also saved as JSON next to the logs).

    The step cache lives in `cache_dir`, by default `cache/` next to `executions_dir`.
    With `selection`, only the selected steps run, fresh (no cache); the others reuse the
    source execution's outputs. `execution_id` names the execution (the caller's, when it
    answered StartPipelineExecution before it runs); `control` starts its jobs and carries a
    stop request. With `resume`, that (failed) execution continues in place: its succeeded steps
    stay done, the others run again, with their earlier attempts kept.
    """
    progress = progress or Progress()
    control = control or jobs.JobControl()
    steps = graph.flatten(definition.get("Steps", []))
    order = graph.topological_order(steps)
    if resume:
        record, parameters = resume, resume.parameters
        _reopen(record)
    else:
        parameters = check_execution(definition, overrides, pipeline_name, selection)
        execution_id = execution_id or new_execution_id()
        arn = f"arn:aws:sagemaker:{region}:{account}:pipeline/{pipeline_name}/execution/{execution_id}"
        record = ExecutionRecord(execution_id, pipeline_name, arn, parameters, time.time(),
                                 steps={n: StepRecord(n, s.spec["Type"]) for n, s in steps.items()})
        if selection:
            record.source_execution = selection.source.execution_id
            record.selected_steps = list(selection.steps)
    cache_settings = {n: cache.settings(s.spec) for n, s in steps.items()}
    step_cache = cache.StepCache(cache_dir or executions_dir.parent / "cache", pipeline_name)
    folder = executions_dir / pipeline_name / record.execution_id
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "definition.json").write_text(json.dumps(definition, indent=1))

    # A session of its own: executions run side by side in one process (the local server), and
    # boto3's default session is not safe to share between threads.
    session = boto3.session.Session(region_name=region)
    s3 = session.client("s3")
    sagemaker = session.client("sagemaker")
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

    def missing_output(properties: dict) -> str | None:
        for uri in cache.output_uris(properties):
            bucket, key = jobs.split_s3(uri)
            try:
                listed = s3.list_objects_v2(Bucket=bucket, Prefix=key, MaxKeys=1)
            except ClientError:
                return uri
            if not listed.get("KeyCount"):
                return uri
        return None

    started = datetime.fromtimestamp(record.started, UTC).isoformat(timespec="seconds")
    scope = Scope(
        parameters=parameters,
        execution={
            "PipelineExecutionId": record.execution_id,
            "PipelineExecutionArn": record.arn,
            "PipelineName": pipeline_name,
            "StartDateTime": started,
            "CurrentDateTime": _now_iso(),
        },
        read_property_file=read_property_file,
    )

    def save() -> None:
        # Whole files only: the local server reads the record while the execution runs.
        files.write_whole(folder / "execution.json",
                          json.dumps(asdict(record), indent=1, default=str))

    stopped = False
    for step_name in order:
        step, state = steps[step_name], record.steps[step_name]
        kind = step.spec["Type"]
        if state.status == "Succeeded":  # resumed: what succeeded stays done
            scope.step_properties[step_name] = state.properties
            continue
        if record.selected_steps and step_name not in record.selected_steps:
            earlier = selection.source.steps.get(step_name) if selection else None
            if resume:
                continue  # it did not run in this selective execution, and does not now
            # A step downstream of a selected one does not run, nor take stale outputs: "the
            # non-selected steps downstream of selected steps do not run" (Selective execution
            # of pipeline steps, https://docs.aws.amazon.com/sagemaker/latest/dg/
            # pipelines-selective-ex.html).
            downstream = graph.upstream(steps, step_name) & set(record.selected_steps)
            if earlier and earlier.status == "Succeeded" and record.status != "Failed" \
                    and not downstream:
                _reuse(state, selection.source.execution_id, earlier.properties, earlier.outcome,
                       earlier.billable_seconds + earlier.source_billable_seconds)
                scope.step_properties[step_name] = state.properties
                progress.step_line(state, f"reused from execution {state.reused_from}")
            else:
                state.status = "NotExecuted"
            progress.step_finished(state)
            continue
        blocked = [d for d in step.depends if record.steps[d].status != "Succeeded"]
        branch_not_taken = step.gate and record.steps[step.gate[0]].outcome != str(step.gate[1]).lower()
        stopped = stopped or control.stop_requested.is_set()
        if blocked or branch_not_taken or record.status == "Failed" or stopped:
            state.status = "NotExecuted"
            progress.step_finished(state)
            continue
        state.status, state.started = "Executing", time.time()
        state.log = str(_attempt_dir(folder / step_name, len(state.attempts) + 1) / "log.txt")
        Path(state.log).parent.mkdir(parents=True, exist_ok=True)
        progress.step_started(state)
        save()

        key: dict | None = None
        try:
            if kind in cache.KEY_ATTRIBUTES:
                key = cache.key(kind, step.spec.get("Arguments", {}), scope)
                _use_cache(state, key, cache_settings[step_name], step_cache, missing_output,
                           bool(record.selected_steps), progress)
            if not state.reused_from:
                metadata = ({"estimated_cost_usd": _production_cost(record, steps, step_name)}
                            if kind == "RegisterModel" else {})
                _run_with_retries(step, state, scope, folder / step_name, s3, sagemaker, record,
                                  progress, metadata, control)
        except _STEP_ERRORS as exc:
            state.status, state.failure_reason = "Failed", str(exc)
            with open(state.log, "a") as log:
                log.write(f"ERROR: {exc}\n")
        state.ended = time.time()
        if state.status == "Executing":
            state.status = "Succeeded"
        stopped = stopped or state.status == "Stopped"
        if state.reused_from:
            scope.step_properties[step_name] = state.properties
        elif key is not None and state.status != "Stopped":
            step_cache.record(step_name, cache.Entry(record.execution_id, state.ended, state.status,
                                                     key, state.properties, state.billable_seconds))
        if state.status == "Failed" and record.status != "Failed":
            record.status = "Failed"
            record.failure_reason = f"step {step_name} failed: {state.failure_reason}"
        scope.execution["CurrentDateTime"] = _now_iso()
        progress.step_finished(state)
        save()

    if record.status != "Failed":
        record.status = "Stopped" if stopped else "Succeeded"
    record.ended = time.time()
    record.cost = cost.local_ledger(asdict(record))
    save()
    return record


def _reopen(record: ExecutionRecord) -> None:
    """Make a failed execution's record ready to continue: the steps that did not succeed are
    pending again (keeping their attempts and billed time, so that job names stay unique and
    the ledger counts every job); the execution is executing again."""
    for state in record.steps.values():
        if state.status == "Succeeded" or (record.selected_steps
                                           and state.name not in record.selected_steps):
            continue
        state.status, state.started, state.ended, state.failure_reason = "Pending", None, None, ""
        state.outcome, state.properties, state.cache, state.reused_from = "", {}, "", ""
    record.status, record.failure_reason, record.ended, record.cost = "Executing", "", None, {}


def _use_cache(state: StepRecord, key: dict, settings: tuple[bool, timedelta | None],
               store: cache.StepCache, missing_output: Callable[[dict], str | None],
               rerun: bool, progress: Progress) -> None:
    """Reuse an earlier run of the step when its CacheConfig allows; `state.cache` says
    whether it hit, or why not."""
    enabled, expire_after = settings
    if rerun:  # SageMaker runs the selected steps of a selective execution afresh
        state.cache = "miss: selected for re-run"
    elif not enabled:
        state.cache = "miss: caching disabled"
    else:
        lookup = store.lookup(state.name, key, expire_after, missing_output)
        if lookup.hit:
            hit = lookup.hit
            _reuse(state, hit.execution_id, hit.properties, "", hit.billable_seconds)
            state.cache = f"hit (execution {hit.execution_id})"
            _note(state, progress, f"cache hit: reusing the outputs of execution "
                                   f"{hit.execution_id} ({hit.when})")
            return
        state.cache = f"miss: {lookup.reason}"
    _note(state, progress, f"cache {state.cache}")


def _production_cost(record: ExecutionRecord, steps: dict[str, graph.Step], name: str) -> str:
    """What the steps upstream of `name` cost to produce (for a model package's metadata)."""
    usd = cost.production_cost([asdict(record.steps[n]) for n in graph.upstream(steps, name)])
    return "unknown" if usd is None else f"{usd:.4f}"


def _run_with_retries(step: graph.Step, state: StepRecord, scope: Scope, job_dir: Path, s3, sagemaker,
                      record: ExecutionRecord, progress: Progress,
                      registration_metadata: dict[str, str], control: jobs.JobControl) -> None:
    """Run the step, trying again as long as its RetryPolicies retry the failure's cause."""
    kind = step.spec["Type"]
    if kind not in _RETRYABLE_TYPES:
        _run_step(step.spec, state, scope, job_dir, s3, sagemaker, record, progress, 1, {},
                  control)
        return
    policies = step.spec.get("RetryPolicies", [])
    first = len(state.attempts)  # a resumed step keeps the attempts of its earlier run
    while True:
        attempt = len(state.attempts) + 1
        attempt_dir = _attempt_dir(job_dir, attempt)
        attempt_dir.mkdir(parents=True, exist_ok=True)
        state.log = str(attempt_dir / "log.txt")
        state.properties, started, error = {}, time.time(), None
        try:
            _run_step(step.spec, state, scope, attempt_dir, s3, sagemaker, record, progress,
                      attempt, registration_metadata, control)
        except _STEP_ERRORS as exc:
            error = exc
            state.status, state.failure_reason = "Failed", str(exc)
        ended = time.time()
        if state.properties and kind in cost.JOB_TYPES:  # a job started: it is billed
            state.billable_seconds += ended - started
        failed = state.status == "Failed"
        cause = failure_cause(error, state.failure_reason) if failed else ""
        state.attempts.append({"job_name": state.job_name, "started": started, "ended": ended,
                               "failure_reason": state.failure_reason if failed else "",
                               "cause": cause})
        if not failed:
            return
        causes = [a["cause"] for a in state.attempts[first:]]
        delay = retry_delay(policies, causes, state.attempts[first]["started"], time.time())
        if delay is None:
            if error is not None:
                raise error
            return
        if error is not None:  # a job's own log already ends with its error
            with open(state.log, "a") as log:
                log.write(f"ERROR: {error}\n")
        _note(state, progress, f"attempt {attempt} failed ({cause}: {state.failure_reason}); "
                               f"retrying in {delay:g}s")
        if control.stop_requested.wait(delay):
            state.status = "Stopped"
            return
        state.status, state.failure_reason = "Executing", ""


def _registered_package(sagemaker, request: dict) -> str | None:
    """An existing package of the group holding the same model artifact(s) and data manifest.

    RegisterModel is never cached, so a fully cached re-run registers again: without this
    check every such run would add a duplicate package of the same model.
    """
    group = request.get("ModelPackageGroupName")
    if not group:
        return None

    def identity(package: dict) -> tuple:
        containers = package.get("InferenceSpecification", {}).get("Containers", [])
        return (sorted(c.get("ModelDataUrl", "") for c in containers),
                (package.get("CustomerMetadataProperties") or {}).get("data_manifest_sha256"))

    wanted = identity(request)
    try:
        pages = sagemaker.get_paginator("list_model_packages").paginate(ModelPackageGroupName=group)
        arns = [p["ModelPackageArn"] for page in pages for p in page["ModelPackageSummaryList"]]
    except ClientError:
        return None  # no such group yet
    for arn in arns:
        if identity(sagemaker.describe_model_package(ModelPackageName=arn)) == wanted:
            return arn
    return None


def _run_step(spec: dict, state: StepRecord, scope: Scope, job_dir: Path, s3, sagemaker,
              record: ExecutionRecord, progress: Progress, attempt: int,
              registration_metadata: dict[str, str], control: jobs.JobControl) -> None:
    kind, arguments = spec["Type"], spec.get("Arguments", {})
    on_line: Callable[[str], None] = lambda line: _note(state, progress, line)

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
        state.job_name = _job_name(record.execution_id, state.name, attempt)
        validate_request(kind, {_JOB_NAME_FIELD[kind]: state.job_name, **request}, state.name)
        # What a Describe*Job of a job that never started would show (the cost ledger reads
        # the instance from it); replaced by the job's own description when it ran.
        state.properties = {**request, _JOB_NAME_FIELD[kind]: state.job_name}
        run = jobs.run_processing_job if kind == "Processing" else jobs.run_training_job
        # The job writes its own output to the log; it reaches the display only.
        result = run(s3, request, state.job_name, job_dir,
                     lambda line: progress.step_line(state, line), control=control)
        state.properties = result.description
        scope.step_properties[state.name] = result.description
        if result.stopped:
            state.status = "Stopped"
        elif not result.succeeded:
            state.status, state.failure_reason = "Failed", result.failure_reason
        return

    # RegisterModel
    if registration_metadata:
        request["CustomerMetadataProperties"] = {**request.get("CustomerMetadataProperties", {}),
                                                 **registration_metadata}
    validate_request(kind, request, state.name)
    group = request.get("ModelPackageGroupName")
    existing = _registered_package(sagemaker, request)
    if existing:
        state.outcome = existing
        state.properties = {"ModelPackageArn": existing}
        scope.step_properties[state.name] = state.properties
        on_line(f"already registered: {existing} holds the same model artifact and data "
                "manifest; not registering it again")
        return
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

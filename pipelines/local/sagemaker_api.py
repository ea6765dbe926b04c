"""The SageMaker Pipelines API of the local endpoint, answered for real; the rest goes to moto.

moto stores pipelines but runs nothing: every execution it starts reads Succeeded at once, and it
has no step list, stop or retry. Here the pipeline operations are answered by the project's own
service: StartPipelineExecution runs the execution with the local engine (pipelines/local/
executions.py), and the execution, its steps and the jobs it ran are described from what the
engine records, in botocore's output shapes, with SageMaker's statuses and step metadata (the
job's ARN, the condition's outcome, the registered package, the Fail step's message, the failure
reason, the cache-hit source, the attempt count, the execution a selective run reused).

Requests arrive as SageMaker's JSON protocol sends them: `POST /` with
`X-Amz-Target: SageMaker.<Operation>` and a JSON body. The operations in `OPERATIONS` are
answered here; every other request (S3, the model registry, endpoints, a job this server did not
run) is handed to moto unchanged. Requests are checked against botocore's whole API model first
(pipelines/validation.py), as the service does, and refused with SageMaker's error codes
(ValidationException, ResourceNotFound, ConflictException).

State lives under $LLM_PIPELINE_HOME: pipelines and their versions under `pipelines/REGION/`
(a pipeline, its executions and jobs exist in the region they were made in, as on SageMaker),
executions under `executions/`. It survives a restart of the server; moto's own state (S3
objects, the model registry) does not.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

import botocore.session
from botocore.exceptions import BotoCoreError, ClientError

from pipelines import UserError, files, graph, validation
from pipelines.local import engine, jobs
from pipelines.local.executions import ConflictError, Execution, Executions

# Where a job's model goes when its description names none yet (CreateTrainingJob's layout).
_MODEL_KEY = "{output}/{job}/output/model.tar.gz"
_DEFAULT_PAGE = 10  # SageMaker's List* operations answer this many items unless asked for more
_STEPS_PAGE = 50  # a pipeline has at most 50 steps: one page holds every step of an execution


class ApiError(Exception):
    """An error answer: SageMaker's error code and message, HTTP 400."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


class NotAnswered(Exception):
    """The request is not about something this service holds: moto answers it."""


@functools.cache
def _model():
    return botocore.session.get_session().get_service_model("sagemaker")


def _validation(message: str) -> ApiError:
    return ApiError("ValidationException", message)


def _not_found(message: str) -> ApiError:
    return ApiError("ResourceNotFound", message)


def _check_input(operation: str, request: dict) -> None:
    """Refuse what SageMaker refuses: everything its API model says (pipelines/validation.py:
    types, required and unknown members, lengths, patterns, enums, sizes, ranges)."""
    shape = validation.input_shape(operation)
    for name, member in shape.members.items():  # JSON carries timestamps as epoch seconds
        if member.type_name == "timestamp" and isinstance(request.get(name), (int, float)):
            request[name] = datetime.fromtimestamp(request[name])
    found = validation.problems(operation, request)
    # validation.problems fills a missing idempotency token, as botocore's client does before it
    # sends; the service requires it from whoever sends the request.
    found += [f'Missing required parameter in input: "{name}"'
              for name, member in shape.members.items()
              if member.metadata.get("idempotencyToken") and name in shape.required_members
              and name not in request]
    if found:
        raise _validation("; ".join(found))


def _epoch(value: Any) -> float | None:
    if isinstance(value, datetime):
        return value.timestamp()
    return value


def _page(items: list, request: dict, key: str, default_size: int = _DEFAULT_PAGE) -> dict:
    """One page of `items` as SageMaker's List* operations answer: `key` and a NextToken."""
    try:
        start = int(request.get("NextToken") or 0)
    except ValueError:
        raise _validation(f"NextToken {request['NextToken']!r} is not a token this service "
                          "gave") from None
    size = int(request.get("MaxResults") or default_size)
    answer: dict[str, Any] = {key: items[start:start + size]}
    if start + size < len(items):
        answer["NextToken"] = str(start + size)
    return answer


def _pipeline_name(name_or_arn: str) -> str:
    if name_or_arn.startswith("arn:"):
        return name_or_arn.partition(":pipeline/")[2].split("/", 1)[0]
    return name_or_arn


def _created_between(items: Iterable[dict], request: dict, field: str) -> list[dict]:
    after, before = _epoch(request.get("CreatedAfter")), _epoch(request.get("CreatedBefore"))
    return [i for i in items if (after is None or i[field] > after)
            and (before is None or i[field] < before)]


class Pipelines:
    """Pipelines as CreatePipeline/UpdatePipeline left them, every version's definition kept; one
    set per region, as SageMaker keeps them."""

    def __init__(self, home: Path) -> None:
        self.folder = home / "pipelines"

    def _path(self, region: str, name: str) -> Path:
        return self.folder / region / name / "pipeline.json"

    def get(self, region: str, name: str) -> dict | None:
        try:
            return json.loads(self._path(region, name).read_text())
        except (OSError, ValueError):
            return None

    def all(self, region: str) -> list[dict]:
        found = (self.get(region, p.parent.name)
                 for p in sorted((self.folder / region).glob("*/pipeline.json")))
        return [p for p in found if p is not None]

    def save(self, pipeline: dict) -> None:
        path = self._path(pipeline["region"], pipeline["PipelineName"])
        path.parent.mkdir(parents=True, exist_ok=True)
        files.write_whole(path, json.dumps(pipeline, indent=1))

    def delete(self, pipeline: dict) -> None:
        self._path(pipeline["region"], pipeline["PipelineName"]).unlink(missing_ok=True)

    def store_definition(self, pipeline: dict, text: str) -> str:
        """Keep a definition's exact text, once per content; its key."""
        digest = hashlib.sha256(text.encode()).hexdigest()
        path = self._path(pipeline["region"], pipeline["PipelineName"]).parent / "definitions" / \
            f"{digest}.json"
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            files.write_whole(path, text)
        return digest

    def definition(self, pipeline: dict, digest: str) -> str:
        path = self._path(pipeline["region"], pipeline["PipelineName"]).parent / "definitions" / \
            f"{digest}.json"
        return path.read_text(encoding="utf-8")


# The operations answered here; every other request goes to moto.
OPERATIONS = frozenset({
    "CreatePipeline", "UpdatePipeline", "DescribePipeline", "ListPipelines", "DeletePipeline",
    "ListPipelineVersions", "DescribePipelineDefinitionForExecution", "StartPipelineExecution",
    "DescribePipelineExecution", "ListPipelineExecutions", "ListPipelineExecutionSteps",
    "ListPipelineParametersForExecution", "StopPipelineExecution", "RetryPipelineExecution",
    "DescribeTrainingJob", "DescribeProcessingJob", "ListTrainingJobs", "ListProcessingJobs"})


class LocalSageMaker:
    """Answers the operations in OPERATIONS from the pipelines and executions under `home`."""

    def __init__(self, home: Path, account: str, executions: Executions | None = None,
                 read_s3_object: Callable[[str, str, str], str] | None = None) -> None:
        self.account = account
        self.pipelines = Pipelines(home)
        self.executions = executions or Executions(home)
        self._read_s3_object = read_s3_object
        self._changing = threading.Lock()  # one create, update or delete of a pipeline at a time
        self.handlers: dict[str, Callable[[dict, str], dict]] = {
            "CreatePipeline": self.create_pipeline,
            "UpdatePipeline": self.update_pipeline,
            "DescribePipeline": self.describe_pipeline,
            "ListPipelines": self.list_pipelines,
            "DeletePipeline": self.delete_pipeline,
            "ListPipelineVersions": self.list_pipeline_versions,
            "DescribePipelineDefinitionForExecution": self.describe_definition_for_execution,
            "StartPipelineExecution": self.start_pipeline_execution,
            "DescribePipelineExecution": self.describe_pipeline_execution,
            "ListPipelineExecutions": self.list_pipeline_executions,
            "ListPipelineExecutionSteps": self.list_pipeline_execution_steps,
            "ListPipelineParametersForExecution": self.list_parameters_for_execution,
            "StopPipelineExecution": self.stop_pipeline_execution,
            "RetryPipelineExecution": self.retry_pipeline_execution,
            "DescribeTrainingJob": self.describe_training_job,
            "DescribeProcessingJob": self.describe_processing_job,
            "ListTrainingJobs": self.list_training_jobs,
            "ListProcessingJobs": self.list_processing_jobs,
        }

        assert set(self.handlers) == OPERATIONS

    def answer(self, operation: str, request: dict, region: str) -> dict:
        _check_input(operation, request)
        return self.handlers[operation](request, region)

    # -- pipelines ------------------------------------------------------------------------

    def _pipeline(self, name_or_arn: str, region: str) -> dict:
        name = _pipeline_name(name_or_arn)
        if name_or_arn.startswith("arn:"):  # an ARN names its region
            region = name_or_arn.split(":")[3]
        pipeline = self.pipelines.get(region, name) if name else None
        if pipeline is None:
            arn = name_or_arn if name_or_arn.startswith("arn:") else name
            raise _not_found(f"Pipeline '{arn}' does not exist.")
        return pipeline

    def _definition_text(self, request: dict, region: str) -> str:
        text, location = request.get("PipelineDefinition"), request.get("PipelineDefinitionS3Location")
        if bool(text) == bool(location):
            raise _validation("Give exactly one of PipelineDefinition and "
                              "PipelineDefinitionS3Location")
        if location:
            if self._read_s3_object is None:
                raise _validation("PipelineDefinitionS3Location cannot be read here")
            try:
                text = self._read_s3_object(region, location["Bucket"], location["ObjectKey"])
            except (ClientError, BotoCoreError, UnicodeDecodeError) as exc:  # in S3's words
                raise _validation(f"cannot read the pipeline definition at "
                                  f"s3://{location['Bucket']}/{location['ObjectKey']}: "
                                  f"{exc}") from None
        try:
            definition = json.loads(text)
            graph.step_names(definition)  # every reference known, no cycle
        except ValueError as exc:
            raise _validation(f"PipelineDefinition is not valid JSON: {exc}") from None
        except (UserError, KeyError, TypeError, AttributeError) as exc:
            raise _validation(f"PipelineDefinition is not a valid pipeline: {exc}") from None
        return text

    def _add_version(self, pipeline: dict, text: str, now: float) -> int:
        version = len(pipeline["versions"]) + 1
        digest = self.pipelines.store_definition(pipeline, text)
        pipeline["versions"].append({"PipelineVersionId": version, "CreationTime": now,
                                     "definition": digest})
        return version

    def create_pipeline(self, request: dict, region: str) -> dict:
        with self._changing:
            return self._create_pipeline(request, region)

    def _create_pipeline(self, request: dict, region: str) -> dict:
        name = request["PipelineName"]
        if self.pipelines.get(region, name) is not None:
            # SageMaker's words, which the SageMaker SDK's upsert recognises.
            raise _validation(f"Pipeline names must be unique within an AWS account and region. "
                              f"Pipeline with name ({name}) already exists.")
        text = self._definition_text(request, region)
        now = time.time()
        pipeline = {
            "PipelineName": name,
            "PipelineArn": f"arn:aws:sagemaker:{region}:{self.account}:pipeline/{name}",
            "PipelineDisplayName": request.get("PipelineDisplayName") or name,
            "PipelineDescription": request.get("PipelineDescription", ""),
            "RoleArn": request["RoleArn"],
            "CreationTime": now, "LastModifiedTime": now,
            "Tags": request.get("Tags", []),
            "region": region, "versions": [],
        }
        if request.get("ParallelismConfiguration"):
            pipeline["ParallelismConfiguration"] = request["ParallelismConfiguration"]
        self._add_version(pipeline, text, now)
        self.pipelines.save(pipeline)
        return {"PipelineArn": pipeline["PipelineArn"]}

    def update_pipeline(self, request: dict, region: str) -> dict:
        with self._changing:
            return self._update_pipeline(request, region)

    def _update_pipeline(self, request: dict, region: str) -> dict:
        pipeline = self._pipeline(request["PipelineName"], region)
        now = time.time()
        for field in ("PipelineDisplayName", "PipelineDescription", "RoleArn",
                      "ParallelismConfiguration"):
            if request.get(field):
                pipeline[field] = request[field]
        if request.get("PipelineDefinition") or request.get("PipelineDefinitionS3Location"):
            self._add_version(pipeline, self._definition_text(request, region), now)
        pipeline["LastModifiedTime"] = now
        self.pipelines.save(pipeline)
        return {"PipelineArn": pipeline["PipelineArn"],
                "PipelineVersionId": pipeline["versions"][-1]["PipelineVersionId"]}

    def _version(self, pipeline: dict, version_id: int | None) -> dict:
        if version_id is None:
            return pipeline["versions"][-1]
        for version in pipeline["versions"]:
            if version["PipelineVersionId"] == version_id:
                return version
        raise _not_found(f"Pipeline '{pipeline['PipelineArn']}' has no version {version_id}.")

    def _last_run(self, pipeline: dict) -> float | None:
        return max((e.created for e in self._executions_of(pipeline)), default=None)

    def describe_pipeline(self, request: dict, region: str) -> dict:
        pipeline = self._pipeline(request["PipelineName"], region)
        version = self._version(pipeline, request.get("PipelineVersionId"))
        answer = {key: pipeline[key] for key in (
            "PipelineArn", "PipelineName", "PipelineDisplayName", "PipelineDescription",
            "RoleArn", "CreationTime", "LastModifiedTime", "ParallelismConfiguration")
            if pipeline.get(key) not in (None, "")}
        answer["PipelineDefinition"] = self.pipelines.definition(pipeline, version["definition"])
        answer["PipelineStatus"] = "Active"
        last_run = self._last_run(pipeline)
        if last_run is not None:
            answer["LastRunTime"] = last_run
        return answer

    def list_pipelines(self, request: dict, region: str) -> dict:
        prefix = request.get("PipelineNamePrefix", "")
        summaries = []
        for pipeline in self.pipelines.all(region):
            if not pipeline["PipelineName"].startswith(prefix):
                continue
            summary = {key: pipeline[key] for key in (
                "PipelineArn", "PipelineName", "PipelineDisplayName", "PipelineDescription",
                "RoleArn", "CreationTime", "LastModifiedTime") if pipeline.get(key) not in (None, "")}
            last_run = self._last_run(pipeline)
            if last_run is not None:
                summary["LastExecutionTime"] = last_run
            summaries.append(summary)
        summaries = _created_between(summaries, request, "CreationTime")
        by = "PipelineName" if request.get("SortBy") == "Name" else "CreationTime"
        summaries.sort(key=lambda s: s[by], reverse=request.get("SortOrder", "Descending") == "Descending")
        return _page(summaries, request, "PipelineSummaries")

    def delete_pipeline(self, request: dict, region: str) -> dict:
        with self._changing:
            return self._delete_pipeline(request, region)

    def _delete_pipeline(self, request: dict, region: str) -> dict:
        pipeline = self._pipeline(request["PipelineName"], region)
        running = [e.arn for e in self._executions_of(pipeline) if self.executions.is_running(e)]
        if running:
            raise ApiError("ConflictException", f"Pipeline '{pipeline['PipelineArn']}' has "
                           f"executions running ({', '.join(running)}); stop them first.")
        self.pipelines.delete(pipeline)
        return {"PipelineArn": pipeline["PipelineArn"]}

    def list_pipeline_versions(self, request: dict, region: str) -> dict:
        pipeline = self._pipeline(request["PipelineName"], region)
        executions = self._executions_of(pipeline)
        summaries = []
        for version in pipeline["versions"]:
            summary = {"PipelineArn": pipeline["PipelineArn"],
                       "PipelineVersionId": version["PipelineVersionId"],
                       "CreationTime": version["CreationTime"]}
            ran = [e for e in executions if e.version_id == version["PipelineVersionId"]]
            if ran:
                summary["LastExecutionPipelineExecutionArn"] = max(ran, key=lambda e: e.created).arn
            summaries.append(summary)
        summaries = _created_between(summaries, request, "CreationTime")
        summaries.sort(key=lambda s: s["CreationTime"],
                       reverse=request.get("SortOrder", "Descending") == "Descending")
        return _page(summaries, request, "PipelineVersionSummaries")

    # -- executions -----------------------------------------------------------------------

    def _executions_of(self, pipeline: dict) -> list[Execution]:
        return [e for e in self.executions.of_pipeline(pipeline["PipelineName"])
                if e.region == pipeline["region"]]

    def _execution(self, arn: str, region: str) -> Execution:
        execution = self.executions.get(arn)
        if execution is None or execution.region != region:
            raise _not_found(f"Pipeline execution '{arn}' does not exist.")
        return execution

    def _selection(self, pipeline: dict, config: dict) -> engine.Selection:
        steps = [s["StepName"] for s in config["SelectedSteps"]]
        source_arn = config.get("SourcePipelineExecutionArn")
        if not source_arn:
            # Without a reference execution the selected steps must need nothing outside them.
            source = engine.ExecutionRecord("", pipeline["PipelineName"], "", {}, time.time())
            return engine.Selection(source, steps)
        source = self.executions.get(source_arn)
        if source is None or source.pipeline_name != pipeline["PipelineName"] \
                or source.region != pipeline["region"]:
            raise _validation(f"SourcePipelineExecutionArn {source_arn} is not an execution of "
                              f"pipeline {pipeline['PipelineName']}")
        status = self.executions.status(source)
        if status not in ("Succeeded", "Failed"):
            raise _validation(f"SourcePipelineExecutionArn {source_arn} is {status}; the "
                              "reference execution must be Succeeded or Failed")
        record = self.executions.record(source)
        if record is None:
            raise _validation(f"SourcePipelineExecutionArn {source_arn} ran no step")
        return engine.Selection(record, steps)

    def start_pipeline_execution(self, request: dict, region: str) -> dict:
        pipeline = self._pipeline(request["PipelineName"], region)
        token = request.get("ClientRequestToken", "")
        earlier = self.executions.by_token(token) if token else None
        if earlier:  # the same request again (a client's retry): the same execution
            return {"PipelineExecutionArn": earlier}
        version = self._version(pipeline, request.get("PipelineVersionId"))
        definition = json.loads(self.pipelines.definition(pipeline, version["definition"]))
        overrides: dict[str, str] = {}
        for parameter in request.get("PipelineParameters", []):
            if parameter["Name"] in overrides:
                raise _validation(f"Pipeline parameter {parameter['Name']} is given twice")
            overrides[parameter["Name"]] = parameter["Value"]
        config = request.get("SelectiveExecutionConfig")
        selection = self._selection(pipeline, config) if config else None
        try:
            engine.check_execution(definition, overrides, pipeline["PipelineName"], selection)
        except UserError as exc:
            raise _validation(str(exc)) from None
        execution_id = engine.new_execution_id()
        now = time.time()
        execution = Execution(
            arn=f"{pipeline['PipelineArn']}/execution/{execution_id}",
            pipeline_name=pipeline["PipelineName"], pipeline_arn=pipeline["PipelineArn"],
            execution_id=execution_id, region=pipeline.get("region", region),
            account=self.account, created=now, modified=now,
            display_name=request.get("PipelineExecutionDisplayName")
            or f"execution-{int(now * 1000)}",
            description=request.get("PipelineExecutionDescription", ""),
            parameters=request.get("PipelineParameters", []),
            parallelism=request.get("ParallelismConfiguration")
            or pipeline.get("ParallelismConfiguration"),
            selective=config, version_id=version["PipelineVersionId"], client_token=token)
        self.executions.start(execution, definition, overrides, selection)
        return {"PipelineExecutionArn": execution.arn}

    def _describe_execution(self, execution: Execution) -> dict:
        answer: dict[str, Any] = {
            "PipelineArn": execution.pipeline_arn,
            "PipelineExecutionArn": execution.arn,
            "PipelineExecutionDisplayName": execution.display_name,
            "PipelineExecutionStatus": self.executions.status(execution),
            "CreationTime": execution.created,
            "LastModifiedTime": execution.modified,
            "PipelineVersionId": execution.version_id,
        }
        if execution.description:
            answer["PipelineExecutionDescription"] = execution.description
        if execution.failure_reason and answer["PipelineExecutionStatus"] == "Failed":
            answer["FailureReason"] = execution.failure_reason[:1300]
        if execution.parallelism:
            answer["ParallelismConfiguration"] = execution.parallelism
        if execution.selective:
            answer["SelectiveExecutionConfig"] = execution.selective
        return answer

    def describe_pipeline_execution(self, request: dict, region: str) -> dict:
        return self._describe_execution(self._execution(request["PipelineExecutionArn"], region))

    def list_pipeline_executions(self, request: dict, region: str) -> dict:
        pipeline = self._pipeline(request["PipelineName"], region)
        summaries = []
        for execution in self._executions_of(pipeline):
            summary = {"PipelineExecutionArn": execution.arn, "StartTime": execution.created,
                       "PipelineExecutionStatus": self.executions.status(execution),
                       "PipelineExecutionDisplayName": execution.display_name}
            if execution.description:
                summary["PipelineExecutionDescription"] = execution.description
            if execution.failure_reason and summary["PipelineExecutionStatus"] == "Failed":
                summary["PipelineExecutionFailureReason"] = execution.failure_reason[:3072]
            summaries.append(summary)
        summaries = _created_between(summaries, request, "StartTime")
        by = ("PipelineExecutionArn" if request.get("SortBy") == "PipelineExecutionArn"
              else "StartTime")
        summaries.sort(key=lambda s: s[by],
                       reverse=request.get("SortOrder", "Descending") == "Descending")
        return _page(summaries, request, "PipelineExecutionSummaries")

    def describe_definition_for_execution(self, request: dict, region: str) -> dict:
        execution = self._execution(request["PipelineExecutionArn"], region)
        pipeline = self.pipelines.get(execution.region, execution.pipeline_name)
        text = None
        if pipeline is not None:
            version = next((v for v in pipeline["versions"]
                            if v["PipelineVersionId"] == execution.version_id), None)
            if version is not None:
                text = self.pipelines.definition(pipeline, version["definition"])
        if text is None:  # the pipeline was deleted since: the definition the engine kept
            text = json.dumps(self.executions.definition_of(execution))
        return {"PipelineDefinition": text, "CreationTime": execution.created}

    def list_parameters_for_execution(self, request: dict, region: str) -> dict:
        execution = self._execution(request["PipelineExecutionArn"], region)
        record = self.executions.record(execution)
        if record is not None:  # every parameter, defaults included, as the execution used them
            values = [{"Name": k, "Value": _parameter_text(v)} for k, v in record.parameters.items()]
        else:
            values = execution.parameters
        return _page(values, request, "PipelineParameters")

    def list_pipeline_execution_steps(self, request: dict, region: str) -> dict:
        arn = request.get("PipelineExecutionArn")
        if not arn:
            raise _validation("PipelineExecutionArn is required")
        execution = self._execution(arn, region)
        record = self.executions.record(execution)
        specs = graph.step_specs(self.executions.definition_of(execution) or {})
        stopping = self.executions.status(execution) == "Stopping"
        items = []
        if record is not None:
            for order, state in enumerate(record.steps.values()):
                item = self._step(execution, state, specs.get(state.name, {}), stopping)
                if item is not None:
                    items.append((item.get("StartTime") or execution.created, order, item))
        # Newest first unless asked otherwise, as SageMaker lists them.
        items.sort(key=lambda i: i[:2], reverse=request.get("SortOrder", "Descending") == "Descending")
        return _page([i[2] for i in items], request, "PipelineExecutionSteps", _STEPS_PAGE)

    def _job_arn(self, execution: Execution, kind: str, name: str) -> str:
        resource = "training-job" if kind == "Training" else "processing-job"
        return f"arn:aws:sagemaker:{execution.region}:{self.account}:{resource}/{name.lower()}"

    def _execution_arn(self, execution: Execution, execution_id: str) -> str:
        return f"{execution.pipeline_arn}/execution/{execution_id}"

    def _step(self, execution: Execution, state: engine.StepRecord, spec: dict,
              stopping: bool) -> dict | None:
        """A step as ListPipelineExecutionSteps shows it; None for a step that never started."""
        if state.status in ("Pending", "NotExecuted"):
            return None
        status = "Stopping" if stopping and state.status == "Executing" else state.status
        item: dict[str, Any] = {"StepName": state.name, "StepStatus": status}
        if spec.get("DisplayName"):
            item["StepDisplayName"] = spec["DisplayName"][:256]
        if spec.get("Description"):
            item["StepDescription"] = spec["Description"][:3072]
        if state.started:
            item["StartTime"] = state.started
        if state.ended:
            item["EndTime"] = state.ended
        if state.status == "Failed" and state.failure_reason:
            item["FailureReason"] = state.failure_reason[:1024]
        metadata: dict[str, Any] = {}
        name_field = {"Training": "TrainingJobName", "Processing": "ProcessingJobName"}
        if state.type in name_field and state.properties.get(name_field[state.type]):
            key = "TrainingJob" if state.type == "Training" else "ProcessingJob"
            metadata[key] = {"Arn": self._job_arn(execution, state.type,
                                                  state.properties[name_field[state.type]])}
        elif state.type == "Condition" and state.outcome:
            metadata["Condition"] = {"Outcome": state.outcome.capitalize()}
        elif state.type == "RegisterModel" and state.outcome:
            metadata["RegisterModel"] = {"Arn": state.outcome}
        elif state.type == "Fail" and state.status == "Failed":
            metadata["Fail"] = {"ErrorMessage": state.failure_reason[:3072]}
        if metadata:
            item["Metadata"] = metadata
        if state.reused_from and state.cache.startswith("hit"):
            item["CacheHitResult"] = {"SourcePipelineExecutionArn":
                                      self._execution_arn(execution, state.reused_from)}
        elif state.reused_from:
            item["SelectiveExecutionResult"] = {"SourcePipelineExecutionArn":
                                                self._execution_arn(execution, state.reused_from)}
        else:
            item["AttemptCount"] = max(1, len(state.attempts))
        return item

    def stop_pipeline_execution(self, request: dict, region: str) -> dict:
        arn = request["PipelineExecutionArn"]
        self._execution(arn, region)
        try:
            self.executions.stop(arn)
        except ConflictError as exc:
            raise ApiError("ConflictException", str(exc)) from None
        return {"PipelineExecutionArn": arn}

    def retry_pipeline_execution(self, request: dict, region: str) -> dict:
        arn = request["PipelineExecutionArn"]
        self._execution(arn, region)
        try:
            self.executions.retry(arn, request.get("ParallelismConfiguration"))
        except ConflictError as exc:
            raise ApiError("ConflictException", str(exc)) from None
        return {"PipelineExecutionArn": arn}

    # -- the jobs the executions ran ------------------------------------------------------

    def _jobs(self, kind: str, region: str) -> Iterable[tuple[Execution, engine.StepRecord, str]]:
        """Every job of type `kind` the region's executions ran: (execution, step, job name)."""
        for execution in (e for e in self.executions.all() if e.region == region):
            record = self.executions.record(execution)
            if record is None:
                continue
            for state in record.steps.values():
                if state.type != kind or state.reused_from:
                    continue
                for name in _job_names(state):
                    yield execution, state, name

    def _find_job(self, kind: str, name: str,
                  region: str) -> tuple[Execution, engine.StepRecord, str]:
        execution_id = engine.job_execution_id(name)
        if execution_id:
            for execution in self.executions.all():
                if execution.execution_id != execution_id or execution.region != region:
                    continue
                record = self.executions.record(execution)
                for state in (record.steps.values() if record else []):
                    if state.type != kind:
                        continue
                    for job in _job_names(state):
                        if job.lower() == name.lower():
                            return execution, state, job
        raise NotAnswered(name)  # not a job of these executions: moto may know it

    def _job(self, kind: str, execution: Execution, state: engine.StepRecord, name: str) -> dict:
        """Describe*Job of one job of a step (its latest attempt, or an earlier one)."""
        status_field = "TrainingJobStatus" if kind == "Training" else "ProcessingJobStatus"
        attempt = next((a for a in state.attempts if a["job_name"] == name), None)
        latest = state.job_name == name
        description = {k: v for k, v in state.properties.items() if k in _members(kind)}
        if not latest:  # an earlier attempt: the same request, its own outcome
            for drop in ("FailureReason", "ExitMessage", "SecondaryStatus", "ModelArtifacts",
                         "FinalMetricDataList", "TrainingTimeInSeconds", "BillableTimeInSeconds",
                         status_field):
                description.pop(drop, None)
        started = attempt["started"] if attempt else state.started or execution.created
        ended = attempt["ended"] if attempt else None
        running = attempt is None and state.status in ("Executing", "Stopping")
        if running:
            status = "Stopping" if self.executions.status(execution) == "Stopping" else "InProgress"
        elif latest and state.properties.get(status_field):
            status = state.properties[status_field]
        elif attempt and attempt.get("failure_reason"):
            status = "Failed"
        else:
            status = "Completed"
        reason = (attempt or {}).get("failure_reason") or description.get("FailureReason", "")
        description[status_field] = status
        if status == "Failed" and reason:
            description["FailureReason"] = reason[:1024]
        arn = self._job_arn(execution, kind, name)
        description["CreationTime"] = started
        description["LastModifiedTime"] = ended or time.time()
        if kind == "Training":
            description.update(TrainingJobName=name, TrainingJobArn=arn, TrainingStartTime=started)
            description.setdefault("SecondaryStatus", {"InProgress": "Training"}.get(status, status))
            if ended:
                description["TrainingEndTime"] = ended
                seconds = jobs.billed_seconds(ended - started)
                description.setdefault("TrainingTimeInSeconds", seconds)
                description.setdefault("BillableTimeInSeconds", seconds)
            output = description.get("OutputDataConfig", {}).get("S3OutputPath", "s3://unknown")
            description.setdefault("ModelArtifacts", {"S3ModelArtifacts": _MODEL_KEY.format(
                output=output.rstrip("/"), job=name)})
            description.setdefault("StoppingCondition", {"MaxRuntimeInSeconds": 86400})
        else:
            description.update(ProcessingJobName=name, ProcessingJobArn=arn,
                               ProcessingStartTime=started)
            if ended:
                description["ProcessingEndTime"] = ended
        return description

    def describe_training_job(self, request: dict, region: str) -> dict:
        return self._job("Training", *self._find_job("Training", request["TrainingJobName"],
                                                     region))

    def describe_processing_job(self, request: dict, region: str) -> dict:
        return self._job("Processing", *self._find_job("Processing",
                                                       request["ProcessingJobName"], region))

    def _list_jobs(self, kind: str, request: dict, region: str) -> list[dict]:
        prefix = "Training" if kind == "Training" else "Processing"
        summary_fields = {"Training": ("TrainingJobName", "TrainingJobArn", "CreationTime",
                                       "TrainingEndTime", "LastModifiedTime", "TrainingJobStatus",
                                       "SecondaryStatus"),
                          "Processing": ("ProcessingJobName", "ProcessingJobArn", "CreationTime",
                                         "ProcessingEndTime", "LastModifiedTime",
                                         "ProcessingJobStatus", "FailureReason", "ExitMessage")}[kind]
        found = []
        for execution, state, name in self._jobs(kind, region):
            if request.get("NameContains", "").lower() not in name.lower():
                continue
            job = self._job(kind, execution, state, name)
            if request.get("StatusEquals") and job[f"{prefix}JobStatus"] != request["StatusEquals"]:
                continue
            found.append({k: job[k] for k in summary_fields if k in job})
        after, before = _epoch(request.get("CreationTimeAfter")), _epoch(request.get("CreationTimeBefore"))
        found = [j for j in found if (after is None or j["CreationTime"] > after)
                 and (before is None or j["CreationTime"] < before)]
        by = {"Name": f"{prefix}JobName", "Status": f"{prefix}JobStatus"}.get(
            request.get("SortBy", ""), "CreationTime")
        found.sort(key=lambda j: j[by], reverse=request.get("SortOrder", "Descending") == "Descending")
        return found

    def list_training_jobs(self, request: dict, region: str) -> dict:
        return _page(self._list_jobs("Training", request, region), request, "TrainingJobSummaries")

    def list_processing_jobs(self, request: dict, region: str) -> dict:
        return _page(self._list_jobs("Processing", request, region), request,
                     "ProcessingJobSummaries")


@functools.cache
def _members(kind: str) -> frozenset[str]:
    operation = "DescribeTrainingJob" if kind == "Training" else "DescribeProcessingJob"
    return frozenset(_model().operation_model(operation).output_shape.members)


def _job_names(state: engine.StepRecord) -> list[str]:
    """The jobs a step ran: one per attempt, and the one it is running."""
    names = [a["job_name"] for a in state.attempts if a.get("job_name")]
    name_field = "TrainingJobName" if state.type == "Training" else "ProcessingJobName"
    running = state.properties.get(name_field)
    if running and running not in names:
        names.append(running)
    return names


def _parameter_text(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


# -- HTTP -----------------------------------------------------------------------------------

_REGION = re.compile(r"Credential=[^/]+/\d{8}/([a-z0-9-]+)/")
_LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")


def _region(environ: dict, default: str) -> str:
    match = _REGION.search(environ.get("HTTP_AUTHORIZATION", ""))
    return match.group(1) if match else default


def _from_a_browser_page(environ: dict) -> bool:
    """A request a web page made: it carries an Origin, or names a host that is not this
    machine's loopback (DNS rebinding). AWS clients send neither, and nothing here serves pages,
    so that a page open in a browser cannot reach S3, the registry or the pipelines."""
    host = environ.get("HTTP_HOST", "")
    name = host.split("]")[0] + "]" if host.startswith("[") else host.rsplit(":", 1)[0]
    loopback = name in _LOOPBACK_HOSTS or name.endswith(".localhost")
    return bool(environ.get("HTTP_ORIGIN")) or (bool(name) and not loopback)


def _json_response(start_response, status: str, body: dict) -> list[bytes]:
    payload = json.dumps(body).encode()
    start_response(status, [("Content-Type", "application/x-amz-json-1.1"),
                            ("Content-Length", str(len(payload))),
                            ("x-amzn-RequestId", str(uuid.uuid4()))])
    return [payload]


class LocalEndpoint:
    """The WSGI application of the local server: the SageMaker operations this service answers,
    and moto for everything else."""

    def __init__(self, api: LocalSageMaker, moto_app: Callable, default_region: str) -> None:
        self.api, self.moto_app, self.default_region = api, moto_app, default_region

    def __call__(self, environ: dict, start_response) -> Iterable[bytes]:
        if _from_a_browser_page(environ):
            return _json_response(start_response, "403 Forbidden", {
                "__type": "AccessDeniedException",
                "message": "the local AWS server answers AWS clients on this machine, not web "
                           "pages (a request with an Origin header, or for another host)"})
        target = environ.get("HTTP_X_AMZ_TARGET", "")
        service, _, operation = target.partition(".")
        if environ.get("REQUEST_METHOD") != "POST" or service != "SageMaker" \
                or operation not in self.api.handlers:
            return self.moto_app(environ, start_response)
        length = int(environ.get("CONTENT_LENGTH") or 0)
        body = environ["wsgi.input"].read(length) if length else b""
        try:
            request = json.loads(body or b"{}")
            if not isinstance(request, dict):
                raise TypeError("not a JSON object")
        except (ValueError, TypeError) as exc:
            return _json_response(start_response, "400 Bad Request", {
                "__type": "SerializationException", "message": f"request body: {exc}"})
        try:
            answer = self.api.answer(operation, request, _region(environ, self.default_region))
        except NotAnswered:
            environ["wsgi.input"] = io.BytesIO(body)
            return self.moto_app(environ, start_response)
        except ApiError as exc:
            return _json_response(start_response, "400 Bad Request",
                                  {"__type": exc.code, "message": exc.message})
        return _json_response(start_response, "200 OK", answer)

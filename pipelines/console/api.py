"""What the console's page asks for, answered from the SageMaker, S3 and CloudWatch Logs APIs.

Each function takes the `Target` (clients of the chosen endpoint, with the user's credentials)
and returns JSON-ready data, or raises: UserError for a request the user can correct, botocore's
errors for what the service said; `error_line` makes either one line for the page.

Everything is read in SageMaker's own shapes (botocore's output shapes of DescribePipeline,
ListPipelineExecutionSteps, DescribeTrainingJob, ...), so the page shows an AWS account and a
local server that answers the same API alike. Two things are read where each target keeps them:
a step's log (locally the engine's log file, on AWS CloudWatch Logs) and a training step's
metric history (locally the job folder's live metrics.jsonl, else the copy in the job's
output.tar.gz on S3).
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    NoRegionError,
    ReadTimeoutError,
)

from pipelines import UserError, cost, graph, registry
from pipelines.local import server

# Written by the stages (steps.common.report.REPORT_HTML, steps.common.training.METRICS_FILE);
# named here rather than imported, which would load torch into the console.
REPORT_FILE = "report.html"
METRICS_FILE = "metrics.jsonl"
EVALUATION_OUTPUT = "evaluation"  # the Evaluate step's output that holds the report
LOG_TAIL_BYTES = 64 * 1024
LOG_EVENTS_PER_STREAM = 500
MAX_METRIC_ROWS = 10_000
MAX_ARCHIVE_BYTES = 64 * 2**20  # an output.tar.gz larger than this is not read for its metrics
FINISHED_JOB = {"Completed", "Failed", "Stopped"}
# ApprovalDescription's limit in botocore's model of UpdateModelPackage.
MAX_REASON = 1024
_EXPIRED = {"ExpiredToken", "ExpiredTokenException", "RequestExpired", "InvalidClientTokenId",
            "UnrecognizedClientException", "InvalidSignatureException"}
_DENIED = {"AccessDenied", "AccessDeniedException", "UnauthorizedOperation"}


@dataclass
class Target:
    """The endpoint the console talks to, and clients of it."""

    kind: str  # "local" or "aws"
    endpoint: str  # what the page shows: a URL, or "AWS"
    region: str
    sagemaker: Any
    s3: Any
    logs: Any
    home: Path  # local: where the engine keeps executions (logs, job folders)
    prices: cost.PriceTable
    jobs: dict[str, dict] = field(default_factory=dict)  # finished jobs' descriptions, by name


def connect(kind: str, region: str | None = None) -> Target:
    """Clients of the local server (started when none runs) or of AWS with your credentials."""
    import boto3

    if kind == "local":  # as the command line's --target local
        if server.endpoint_configured():
            endpoint = (os.environ.get("AWS_ENDPOINT_URL_SAGEMAKER")
                        or os.environ.get("AWS_ENDPOINT_URL") or "named by AWS_ENDPOINT_URL_*")
        else:
            endpoint = server.use_local_aws()
        os.environ.setdefault("AWS_DEFAULT_REGION", server.LOCAL_REGION)
        os.environ.setdefault("AWS_ACCESS_KEY_ID", "local")
        os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "local")
    else:
        endpoint = "AWS"
    region = region or os.environ.get("AWS_DEFAULT_REGION") or boto3.Session().region_name
    if not region:
        raise UserError("no AWS region: pass --region or set AWS_DEFAULT_REGION")
    # Few retries and short timeouts: the page polls, and should say soon that a call failed.
    # None locally: the local server does not throttle, and one that does not answer is down, so
    # botocore's retries (max_attempts counts retries) only delayed saying so, by random back-offs
    # of up to 3 s in all; the page's next poll is the retry.
    retries = {"total_max_attempts": 1} if kind == "local" else {"max_attempts": 2}
    config = Config(region_name=region, connect_timeout=5, read_timeout=30,
                    retries={**retries, "mode": "standard"})
    return Target(kind, endpoint, region, boto3.client("sagemaker", config=config),
                  boto3.client("s3", config=config), boto3.client("logs", config=config),
                  server.home(), cost.load_prices())


def error_line(exc: BaseException) -> str:
    """One line saying what failed and what to do; never a stack trace."""
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code, message = str(error.get("Code", "")), str(error.get("Message", ""))
        if message.lstrip().startswith("<"):  # an HTML error page, not a service's answer
            title = re.search(r"<title>(.*?)</title>", message, re.DOTALL | re.IGNORECASE)
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", code)
            answer = " ".join(title.group(1).split()) if title else ""
            if not answer.startswith(str(status)):
                answer = f"HTTP {status} {answer}".strip()
            message = f"{answer}; the endpoint may not implement this operation"
        text = f"{exc.operation_name}: " + (f"{code}: " if code and not code.isdigit() else "") \
            + (message or str(exc))
        if code in _EXPIRED:
            text += "; your credentials are invalid or expired: renew them (aws sso login, " \
                    "aws configure; keys from the environment need a console restart) and reload"
        elif code in _DENIED:
            text += "; your credentials are not allowed this action"
    elif isinstance(exc, NoCredentialsError):
        text = ("no AWS credentials: configure them (aws configure, aws sso login or "
                "AWS_PROFILE) and restart the console")
    elif isinstance(exc, NoRegionError):
        text = "no AWS region: restart the console with --region or AWS_DEFAULT_REGION"
    elif isinstance(exc, (EndpointConnectionError, ConnectTimeoutError, ReadTimeoutError)):
        url = exc.kwargs.get("endpoint_url", "the endpoint")
        text = (f"cannot reach {url} ({type(exc).__name__}); check the network, or for the "
                "local target `llm-pipeline server status`")
    elif isinstance(exc, (UserError, BotoCoreError)):
        text = str(exc)
    else:
        text = f"the console failed: {type(exc).__name__}: {exc} (details in its terminal)"
    return " ".join(text.split())


def overview(target: Target) -> dict:
    return {"target": target.kind, "endpoint": target.endpoint, "region": target.region,
            "prices": {"date": target.prices.date, "region": target.prices.region}}


# -- pipelines and executions --------------------------------------------------------------

def _pipeline_of(execution_arn: str) -> str:
    """The pipeline name in arn:...:pipeline/NAME/execution/ID."""
    match = re.fullmatch(r"arn:[^:]+:sagemaker:[^:]*:[^:]*:pipeline/([^/]+)/execution/[^/]+",
                         execution_arn or "")
    if not match:
        raise UserError(f"{execution_arn!r} is not a pipeline execution ARN "
                        "(arn:aws:sagemaker:REGION:ACCOUNT:pipeline/NAME/execution/ID)")
    return match.group(1)


def list_pipelines(target: Target) -> list[dict]:
    pages = target.sagemaker.get_paginator("list_pipelines").paginate(
        SortBy="Name", SortOrder="Ascending")
    return [{"name": p["PipelineName"], "arn": p["PipelineArn"],
             "description": p.get("PipelineDescription", ""),
             "created": p.get("CreationTime"), "last_execution": p.get("LastExecutionTime")}
            for page in pages for p in page["PipelineSummaries"]]


def pipeline(target: Target, name: str) -> dict:
    """The pipeline's parameters (for the start form), its DAG and its newest executions."""
    described = target.sagemaker.describe_pipeline(PipelineName=name)
    document = json.loads(described["PipelineDefinition"])
    executions = target.sagemaker.list_pipeline_executions(
        PipelineName=name, SortBy="CreationTime", SortOrder="Descending", MaxResults=50)
    return {"name": name, "arn": described["PipelineArn"],
            "description": described.get("PipelineDescription", ""),
            "parameters": document.get("Parameters", []), "graph": graph.step_graph(document),
            "executions": [{"arn": e["PipelineExecutionArn"],
                            "status": e["PipelineExecutionStatus"],
                            "started": e.get("StartTime"),
                            "name": e.get("PipelineExecutionDisplayName", ""),
                            "failure_reason": e.get("PipelineExecutionFailureReason", "")}
                           for e in executions["PipelineExecutionSummaries"]]}


def _definition_of(target: Target, execution_arn: str) -> dict:
    """The definition the execution ran (the pipeline's may have changed since)."""
    try:
        text = target.sagemaker.describe_pipeline_definition_for_execution(
            PipelineExecutionArn=execution_arn)["PipelineDefinition"]
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in _DENIED:
            raise
        text = target.sagemaker.describe_pipeline(
            PipelineName=_pipeline_of(execution_arn))["PipelineDefinition"]
    return json.loads(text)


def _steps(target: Target, execution_arn: str) -> list[dict]:
    pages = target.sagemaker.get_paginator("list_pipeline_execution_steps").paginate(
        PipelineExecutionArn=execution_arn, SortOrder="Ascending")
    return [step for page in pages for step in page["PipelineExecutionSteps"]]


def _job(target: Target, kind: str, name: str) -> dict:
    """The job's description; a finished job's is kept, as it no longer changes."""
    if name in target.jobs:
        return target.jobs[name]
    described = cost.describe_job(target.sagemaker, kind, name)
    if described.get(f"{kind}JobStatus") in FINISHED_JOB:
        target.jobs[name] = described
    return described


def _seconds(start: datetime | None, end: datetime | None, now: datetime) -> float | None:
    return None if start is None else ((end or now) - start).total_seconds()


def _reused(step: dict) -> str:
    if step.get("CacheHitResult", {}).get("SourcePipelineExecutionArn"):
        return "cache hit: execution " + step["CacheHitResult"][
            "SourcePipelineExecutionArn"].rsplit("/", 1)[-1]
    if step.get("SelectiveExecutionResult", {}).get("SourcePipelineExecutionArn"):
        return "reused from execution " + step["SelectiveExecutionResult"][
            "SourcePipelineExecutionArn"].rsplit("/", 1)[-1]
    return ""


def _outcome(metadata: dict) -> str:
    """What a step without a job decided: a condition's outcome, a registered package, ..."""
    if "Condition" in metadata:
        return f"condition {metadata['Condition'].get('Outcome', '?')}"
    if "RegisterModel" in metadata:
        return metadata["RegisterModel"].get("Arn", "")
    if "Fail" in metadata:
        return metadata["Fail"].get("ErrorMessage", "")
    return ""


def execution(target: Target, arn: str) -> dict:
    """The execution, its DAG, each step's status, duration, cache hit and cost.

    A part the endpoint cannot give (a local server without ListPipelineExecutionSteps, a
    job the credentials may not describe) is left out and said in `error`.
    """
    described = target.sagemaker.describe_pipeline_execution(PipelineExecutionArn=arn)
    document = _definition_of(target, arn)
    parameters = target.sagemaker.list_pipeline_parameters_for_execution(
        PipelineExecutionArn=arn).get("PipelineParameters", [])
    now, problems, rows, costs = datetime.now(UTC), [], [], []
    try:
        steps = _steps(target, arn)
    except (ClientError, BotoCoreError) as exc:
        steps = []
        problems.append(f"step statuses unavailable: {error_line(exc)}")
    for step in steps:
        row = {"name": step["StepName"], "status": step.get("StepStatus", ""),
               "started": step.get("StartTime"), "ended": step.get("EndTime"),
               "seconds": _seconds(step.get("StartTime"), step.get("EndTime"), now),
               "cache": _reused(step), "failure_reason": step.get("FailureReason", ""),
               "attempts": step.get("AttemptCount"), "outcome": _outcome(step.get("Metadata", {})),
               "job": None, "usd": None, "cost_note": ""}
        job = cost.step_job(step)
        if job:
            row["job"] = {"kind": job[0], "name": job[1]}
            try:
                job_described = _job(target, *job)
            except (ClientError, BotoCoreError) as exc:
                problems.append(f"cost of step {step['StepName']} unavailable: {error_line(exc)}")
                job_described = {}
            # A running job's billable time is not known yet: it is priced once it ends.
            if job_described.get(f"{job[0]}JobStatus") in FINISHED_JOB:
                step_cost = cost.aws_step_cost(step, job[0], job_described, target.prices)
                costs.append(step_cost)
                row["usd"], row["cost_note"] = step_cost.usd, step_cost.note
        rows.append(row)
    timing = "wall time on this machine" if target.kind == "local" else "SageMaker billable time"
    status = described["PipelineExecutionStatus"]
    return {"arn": arn, "pipeline": _pipeline_of(arn), "status": status,
            "name": described.get("PipelineExecutionDisplayName", ""),
            "failure_reason": described.get("FailureReason", "") if status == "Failed" else "",
            "started": described.get("CreationTime"),
            "modified": described.get("LastModifiedTime"),
            "selective": described.get("SelectiveExecutionConfig"),
            "parameters": {p["Name"]: p["Value"] for p in parameters},
            "graph": graph.step_graph(document), "steps": rows,
            "cost": cost.ledger(costs, target.prices, timing) if costs else None,
            "error": problems[0] if problems else ""}


# -- one step: log, metrics, report --------------------------------------------------------

def _local_job_folder(target: Target, execution_arn: str, step: str) -> Path:
    """The engine's folder of the step's newest attempt (engine.run_execution's layout)."""
    folder = target.home / "executions" / _pipeline_of(execution_arn) / \
        execution_arn.rsplit("/", 1)[-1] / step
    attempts = sorted(folder.glob("attempt-*"), key=lambda p: int(p.name.split("-")[1])
                      if p.name.split("-")[1].isdigit() else 0)
    return attempts[-1] if attempts else folder


def _tail(path: Path) -> str:
    with open(path, "rb") as handle:
        handle.seek(max(0, path.stat().st_size - LOG_TAIL_BYTES))
        return handle.read().decode("utf-8", errors="replace")


def _log(target: Target, execution_arn: str, step: str, job: tuple[str, str] | None) -> dict:
    if target.kind == "local":
        path = _local_job_folder(target, execution_arn, step) / "log.txt"
        if not path.is_file():
            return {"source": str(path), "text": "", "note": "no log file (yet) at this path"}
        return {"source": str(path), "text": _tail(path), "note": ""}
    if job is None:
        return {"source": "", "text": "", "note": "this step runs no job, so it has no log"}
    # Where SageMaker sends a job's output: log group /aws/sagemaker/TrainingJobs (or
    # ProcessingJobs), one stream per instance named JOB/algo-N-EPOCH
    # (https://docs.aws.amazon.com/sagemaker/latest/dg/logging-cloudwatch.html).
    group, prefix = f"/aws/sagemaker/{job[0]}Jobs", f"{job[1]}/"
    source = f"CloudWatch Logs {group} {prefix}*"
    try:
        streams = target.logs.describe_log_streams(
            logGroupName=group, logStreamNamePrefix=prefix)["logStreams"]
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") != "ResourceNotFoundException":
            raise
        streams = []
    if not streams:
        return {"source": source, "text": "",
                "note": "no log stream yet: a job's log appears once its instance starts"}
    lines = []
    for stream in streams[:8]:
        events = target.logs.get_log_events(
            logGroupName=group, logStreamName=stream["logStreamName"], startFromHead=False,
            limit=LOG_EVENTS_PER_STREAM)["events"]
        label = f"[{stream['logStreamName'][len(prefix):]}] " if len(streams) > 1 else ""
        lines += [label + event["message"].rstrip("\n") for event in events]
    return {"source": source, "text": "\n".join(lines), "note": ""}


def _metric_rows(text: str) -> list[dict]:
    """The numeric values of each metrics.jsonl line (steps.common.metrics writes them)."""
    rows = []
    for line in text.splitlines()[:MAX_METRIC_ROWS]:
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict):
            rows.append({k: v for k, v in entry.items()
                         if isinstance(v, (int, float)) and not isinstance(v, bool)})
    return rows


def _metric_history(target: Target, execution_arn: str, step: str, job: tuple[str, str],
                    described: dict) -> list[dict]:
    if job[0] != "Training":
        return []
    if target.kind == "local":
        live = _local_job_folder(target, execution_arn, step) / "opt_ml" / "output" / "data" / \
            METRICS_FILE
        if live.is_file():
            return _metric_rows(live.read_text(encoding="utf-8", errors="replace"))
    output = described.get("OutputDataConfig", {}).get("S3OutputPath", "")
    if not output.startswith("s3://") or described.get("TrainingJobStatus") not in FINISHED_JOB:
        return []
    # SageMaker packs the job's SM_OUTPUT_DATA_DIR into OUTPUT_PATH/JOB/output/output.tar.gz.
    bucket, _, prefix = output[5:].rstrip("/").partition("/")
    key = "/".join(filter(None, [prefix, job[1], "output", "output.tar.gz"]))
    try:
        head = target.s3.head_object(Bucket=bucket, Key=key)
        if head["ContentLength"] > MAX_ARCHIVE_BYTES:
            return []
        body = target.s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
            return []
        raise
    with tarfile.open(fileobj=io.BytesIO(body), mode="r:gz") as archive:
        member = next((m for m in archive.getmembers()
                       if m.isfile() and Path(m.name).name == METRICS_FILE), None)
        if member is None:
            return []
        return _metric_rows(archive.extractfile(member).read().decode("utf-8", "replace"))


def _report_uri(job: tuple[str, str] | None, described: dict) -> str:
    """report.html of an Evaluate step's completed job, else ''."""
    if not job or job[0] != "Processing" or described.get("ProcessingJobStatus") != "Completed":
        return ""
    for output in described.get("ProcessingOutputConfig", {}).get("Outputs", []):
        if output.get("OutputName") == EVALUATION_OUTPUT:
            return f"{output['S3Output']['S3Uri'].rstrip('/')}/{REPORT_FILE}"
    return ""


def step(target: Target, execution_arn: str, name: str) -> dict:
    """One step: its job, final metrics, metric history, log, report, and what re-running
    from it would run."""
    document = _definition_of(target, execution_arn)
    rerun = graph.steps_from(document, name)  # UserError naming the steps for an unknown one
    detail = {"name": name, "rerun_steps": rerun, "job": None, "metrics": [], "history": [],
              "report": "", "error": ""}
    try:
        entry = next((s for s in _steps(target, execution_arn) if s["StepName"] == name), None)
    except (ClientError, BotoCoreError) as exc:
        entry, detail["error"] = None, f"step status unavailable: {error_line(exc)}"
    job = cost.step_job(entry) if entry else None
    if entry:
        detail.update(status=entry.get("StepStatus", ""),
                      failure_reason=entry.get("FailureReason", ""),
                      outcome=_outcome(entry.get("Metadata", {})))
    if job:
        described = _job(target, *job)
        detail["job"] = {"kind": job[0], "name": job[1],
                         "status": described.get(f"{job[0]}JobStatus", ""),
                         "instance": "{} × {}".format(*cost.job_resources(job[0], described)),
                         "failure_reason": described.get("FailureReason", "")}
        detail["metrics"] = [{"name": m["MetricName"], "value": m["Value"]}
                             for m in described.get("FinalMetricDataList", [])]
        detail["history"] = _metric_history(target, execution_arn, name, job, described)
        detail["report"] = _report_uri(job, described)
    detail["log"] = _log(target, execution_arn, name, job)
    return detail


def report(target: Target, uri: str) -> bytes:
    """An evaluation report's HTML; nothing else on S3 is served."""
    if not (uri.startswith("s3://") and uri.endswith(f"/{REPORT_FILE}")):
        raise UserError(f"{uri!r}: the console serves only evaluation reports "
                        f"(s3://BUCKET/.../{REPORT_FILE})")
    bucket, _, key = uri[5:].partition("/")
    return target.s3.get_object(Bucket=bucket, Key=key)["Body"].read()


# -- actions on executions -----------------------------------------------------------------

def start(target: Target, pipeline_name: str, parameters: dict[str, str]) -> dict:
    """StartPipelineExecution with the parameters the page changed from their defaults."""
    document = json.loads(target.sagemaker.describe_pipeline(
        PipelineName=pipeline_name)["PipelineDefinition"])
    for name, value in parameters.items():
        if not str(value).strip():
            # Every parameter ends up in the model package's metadata, which holds no empty value.
            raise UserError(f"parameter {name}: empty value; give one, or leave the default")
    graph.resolve_parameters(document, parameters)  # unknown names, wrong types, enums
    response = target.sagemaker.start_pipeline_execution(
        PipelineName=pipeline_name,
        PipelineParameters=[{"Name": k, "Value": str(v)} for k, v in parameters.items()])
    return {"arn": response["PipelineExecutionArn"]}


def stop(target: Target, arn: str) -> dict:
    _pipeline_of(arn)
    target.sagemaker.stop_pipeline_execution(PipelineExecutionArn=arn)
    return {"arn": arn}


def retry(target: Target, arn: str) -> dict:
    """RetryPipelineExecution: a failed execution goes on from its failed steps."""
    _pipeline_of(arn)
    target.sagemaker.retry_pipeline_execution(PipelineExecutionArn=arn)
    return {"arn": arn}


def rerun(target: Target, arn: str, from_step: str) -> dict:
    """A selective execution of `from_step` and every step downstream of it, with the source
    execution's parameters; the other steps reuse the source's outputs."""
    document = _definition_of(target, arn)
    selected = graph.steps_from(document, from_step)
    parameters = target.sagemaker.list_pipeline_parameters_for_execution(
        PipelineExecutionArn=arn).get("PipelineParameters", [])
    response = target.sagemaker.start_pipeline_execution(
        PipelineName=_pipeline_of(arn), PipelineParameters=parameters,
        SelectiveExecutionConfig={"SourcePipelineExecutionArn": arn,
                                  "SelectedSteps": [{"StepName": s} for s in selected]})
    return {"arn": response["PipelineExecutionArn"], "selected": selected}


# -- model packages ------------------------------------------------------------------------

def _made_by(package: dict) -> str:
    """The ARN of the execution that registered the package, from its lineage metadata:
    the recipe's pipeline (definition.pipeline_name: llm-RECIPE) and the execution id."""
    metadata = package["metadata"]
    if not (metadata.get("pipeline_execution") and metadata.get("recipe")):
        return ""
    prefix = package["arn"].split(":model-package/")[0]
    return f"{prefix}:pipeline/llm-{metadata['recipe']}/execution/{metadata['pipeline_execution']}"


def packages(target: Target, group: str | None = None) -> list[dict]:
    """Packages with status, metrics, lineage metadata and the execution that made them."""
    listed = registry.list_packages(target.sagemaker, target.s3, group or None)
    return [{**package, "execution": _made_by(package)} for package in listed]


def set_approval(target: Target, arn: str, status: str, reason: str) -> dict:
    if status not in ("Approved", "Rejected"):
        raise UserError(f"status {status!r}: a package is Approved or Rejected")
    reason = " ".join(str(reason or "").split())
    if not reason:
        raise UserError(f"say why the package is {status.lower()}: the reason is kept as its "
                        "approval description")
    if len(reason) > MAX_REASON:
        raise UserError(f"the reason is {len(reason)} characters; SageMaker keeps at most "
                        f"{MAX_REASON}")
    return registry.summarize(target.s3, registry.set_status(target.sagemaker, arn, status, reason))


def promote(target: Target, arn: str, group: str, reason: str | None) -> dict:
    if not group:
        raise UserError("name the group to promote the package into")
    promoted, created = registry.promote(target.sagemaker, arn, group, reason or None)
    return {"arn": promoted, "created": created}


def diff(target: Target, arn_a: str, arn_b: str) -> list[dict]:
    return registry.diff(target.sagemaker, target.s3, arn_a, arn_b)

"""Following an execution to its end, and its summary: the same code for SageMaker and the local
endpoint.

Everything shown comes from the SageMaker API (DescribePipelineExecution,
ListPipelineExecutionSteps, Describe*Job, the model registry, S3), so `start --wait` on AWS and
`run` locally print the same things. Locally the steps' logs are on this machine too
(`$LLM_PIPELINE_HOME/executions/PIPELINE/ID/STEP/`): their new lines are shown as the steps write
them, and the summary of a failed execution ends with the failed step's log.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from pipelines import cost, error_line, graph

# What Evaluate writes beside evaluation.json for people to read (steps.common.report).
REPORT_FILE = "report.html"

TERMINAL = ("Succeeded", "Failed", "Stopped")


@dataclass
class StepView:
    """A step as the displays show it."""

    name: str
    type: str
    status: str = "Pending"
    started: datetime | None = None
    ended: datetime | None = None
    failure_reason: str = ""

    @property
    def seconds(self) -> float | None:
        if self.started is None:
            return None
        end = self.ended or datetime.now(self.started.tzinfo)
        return (end - self.started).total_seconds()


class PlainProgress:
    """One line per event; used when stdout is not a terminal (CI, logs)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass

    def step_started(self, step: StepView) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {step.name} ({step.type}) started", flush=True)

    def step_line(self, step: StepView, line: str) -> None:
        if line.strip():
            print(f"    {step.name} | {line}", flush=True)

    def step_finished(self, step: StepView) -> None:
        took = f"{step.seconds:.1f}s" if step.seconds is not None else ""
        reason = f": {step.failure_reason}" if step.failure_reason else ""
        print(f"[{time.strftime('%H:%M:%S')}] {step.name} {step.status.lower()} {took}{reason}",
              flush=True)


class LiveProgress:
    """A live table of steps with status, time and the latest log line of the running step."""

    def __init__(self, step_names: list[str]) -> None:
        from rich.console import Console
        from rich.live import Live

        self.steps: dict[str, StepView] = {}
        self.names = step_names
        self.latest: dict[str, str] = {}
        self.live = Live(self._table(), console=Console(), refresh_per_second=4, transient=False)

    def _table(self):
        from rich.table import Table

        table = Table(show_header=True, header_style="bold")
        for column in ("step", "status", "time", "latest"):
            table.add_column(column, overflow="fold" if column == "latest" else None)
        colours = {"Succeeded": "green", "Failed": "red", "Executing": "yellow",
                   "Stopping": "yellow", "Stopped": "red"}
        for name in self.names:
            step = self.steps.get(name)
            status = step.status if step else "Pending"
            took = f"{step.seconds:.0f}s" if step and step.seconds is not None else ""
            latest = self.latest.get(name, "")[-100:]
            table.add_row(name, f"[{colours.get(status, 'dim')}]{status}[/]", took, latest)
        return table

    def __enter__(self):
        self.live.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.live.update(self._table())
        self.live.__exit__(*exc)

    def step_started(self, step: StepView) -> None:
        self.steps[step.name] = step
        self.live.update(self._table())

    def step_line(self, step: StepView, line: str) -> None:
        if line.strip():
            self.latest[step.name] = line.strip()
            self.live.update(self._table())

    def step_finished(self, step: StepView) -> None:
        self.steps[step.name] = step
        if step.failure_reason:
            self.latest[step.name] = step.failure_reason
        self.live.update(self._table())


class StepLogs:
    """The logs of a local execution's steps: each step's `log.txt`, one per attempt."""

    def __init__(self, folder: Path | None) -> None:
        self.folder = folder
        self._read: dict[Path, int] = {}
        self._partial: dict[Path, str] = {}

    def files(self, step: str) -> list[Path]:
        if self.folder is None:
            return []
        first = self.folder / step / "log.txt"
        later = sorted(self.folder.glob(f"{step}/attempt-*/log.txt"),
                       key=lambda p: int(p.parent.name.rsplit("-", 1)[-1]))
        return [p for p in [first, *later] if p.is_file()]

    def new_lines(self, step: str) -> list[str]:
        """Whole lines written to the step's logs since the last call."""
        lines: list[str] = []
        for path in self.files(step):
            with open(path, encoding="utf-8", errors="replace") as log:
                log.seek(self._read.get(path, 0))
                text = self._partial.pop(path, "") + log.read()
                self._read[path] = log.tell()
            *complete, rest = text.split("\n")
            if rest:
                self._partial[path] = rest
            lines += complete
        return lines


class Changes:
    """The wait between two looks at an execution: `seconds`, or, for a local execution (the
    folder of its records), until the local server rewrites one of its records, which it
    replaces whole (a new file): a step started or ended, the execution ended. Looked for every
    CHECK_SECONDS (two `stat`s: no CPU to speak of), so that `run` sees a local execution end
    within a few hundredths of a second, not up to a whole poll later; log lines still show at
    each poll. On AWS: a plain wait."""

    CHECK_SECONDS = 0.05
    # The engine's record of the steps (pipelines/local/engine.py) and the server's of the
    # execution (pipelines/local/executions.py, META_FILE).
    RECORDS = ("execution.json", "pipeline-execution.json")

    def __init__(self, folder: Path | None) -> None:
        self.folder = folder
        self._paths = [folder / name for name in self.RECORDS] if folder is not None else []
        self._seen: tuple = ()

    def mark(self) -> None:
        """Remember the records as they are now, as a look at the execution begins."""
        self._seen = self._records()

    def wait(self, seconds: float) -> None:
        """Wait `seconds`, or until the records differ from the last `mark`."""
        if self.folder is None:
            time.sleep(seconds)
            return
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            time.sleep(min(self.CHECK_SECONDS, left))
            if self._records() != self._seen:
                return

    def _records(self) -> tuple:
        found = []
        for path in self._paths:
            try:
                status = os.stat(path)
                found.append((status.st_ino, status.st_mtime_ns))
            except OSError:
                found.append(None)
        return tuple(found)


def _steps(sagemaker, arn: str) -> list[dict]:
    pages = sagemaker.get_paginator("list_pipeline_execution_steps").paginate(
        PipelineExecutionArn=arn, SortOrder="Ascending")
    return [step for page in pages for step in page["PipelineExecutionSteps"]]


def _source(step: dict) -> tuple[str, str]:
    """("cache hit" | "reused", execution id) when the step took an earlier execution's outputs."""
    for key, kind in (("CacheHitResult", "cache hit"), ("SelectiveExecutionResult", "reused")):
        source = step.get(key, {}).get("SourcePipelineExecutionArn")
        if source:
            return kind, source.rsplit("/", 1)[-1]
    return "", ""


def step_types(sagemaker, arn: str) -> dict[str, str]:
    """Each step of the execution's definition and its type, in the order they run."""
    text = sagemaker.describe_pipeline_definition_for_execution(
        PipelineExecutionArn=arn)["PipelineDefinition"]
    return {name: spec["Type"] for name, spec in graph.step_specs(json.loads(text)).items()}


def follow(sagemaker, arn: str, progress, poll_seconds: float, logs: StepLogs) -> str:
    """Show the execution's steps as they start and end (and, locally, their log lines) until
    it ends, then the steps it never reached; its final status."""
    types = step_types(sagemaker, arn)
    views: dict[str, StepView] = {}
    changes = Changes(logs.folder)
    while True:
        changes.mark()
        status = sagemaker.describe_pipeline_execution(
            PipelineExecutionArn=arn)["PipelineExecutionStatus"]
        for step in _steps(sagemaker, arn):
            name = step["StepName"]
            view = views.get(name)
            if view is None:
                view = views[name] = StepView(name, types.get(name, ""))
                kind, source = _source(step)
                if kind == "reused":
                    progress.step_line(view, f"reused from execution {source}")
                else:
                    progress.step_started(view)
            was = view.status
            view.status, view.started = step["StepStatus"], step.get("StartTime")
            view.ended, view.failure_reason = step.get("EndTime"), step.get("FailureReason", "")
            for line in logs.new_lines(name):
                progress.step_line(view, line)
            if view.status in TERMINAL and was not in TERMINAL:
                progress.step_finished(view)
        if status in TERMINAL:
            for name in [n for n in types if n not in views]:  # steps it never reached
                progress.step_finished(StepView(name, types[name], "NotExecuted"))
            return status
        changes.wait(poll_seconds)


def failed_steps(sagemaker, execution_arn: str) -> list[str]:
    """`step NAME failed: REASON` for each failed step of an execution.

    The execution's own FailureReason only says that a step failed. A step's FailureReason holds
    a training job's /opt/ml/output/failure; a processing job's reason is in its ExitMessage (the
    first 1 KB of /opt/ml/output/message,
    https://docs.aws.amazon.com/sagemaker/latest/dg/build-your-own-processing-container.html),
    which only DescribeProcessingJob returns. One line saying why when the steps cannot be read
    (the caller needs ListPipelineExecutionSteps and DescribeProcessingJob).
    """
    from botocore.exceptions import BotoCoreError, ClientError

    lines = []
    try:
        for step in _steps(sagemaker, execution_arn):
            if step.get("StepStatus") != "Failed":
                continue
            reasons = [step.get("FailureReason", "")]
            job = step.get("Metadata", {}).get("ProcessingJob", {}).get("Arn")
            if job:
                message = sagemaker.describe_processing_job(
                    ProcessingJobName=job.rsplit("/", 1)[-1]).get("ExitMessage", "")
                if " ".join(message.removeprefix("ERROR:").split()) not in " ".join(
                        reasons[0].split()):  # the local engine's reason already holds it
                    reasons.append(message)
            reason = " ".join(": ".join(r for r in reasons if r).split())
            lines.append(f"step {step['StepName']} failed: {reason or 'no reason given'}")
    except (BotoCoreError, ClientError) as exc:
        return [f"the failed steps' reasons are unavailable: {exc}"]
    return lines


def _note(step: dict) -> str:
    """Why a step took no time, or took several tries."""
    kind, source = _source(step)
    if kind:
        return f"{kind} (execution {source})" if kind == "cache hit" else \
            f"reused from execution {source}"
    attempts = step.get("AttemptCount", 1)
    return f"{attempts} attempts" if attempts > 1 else ""


def _job_name(step: dict, kind: str) -> str | None:
    arn = step.get("Metadata", {}).get(kind, {}).get("Arn")
    return arn.rsplit("/", 1)[-1] if arn else None


def summary(sagemaker, s3, arn: str, logs: StepLogs, timing: str,
            gate_metric: str | None = None) -> bool:
    """Print the execution's outcome: its steps, what it cost, and either why it did not succeed
    (on stderr, the cause last, on one line) or what it made, with the recipe's `gate_metric`
    among the evaluation's metrics; whether it succeeded."""
    from botocore.exceptions import BotoCoreError, ClientError

    described = sagemaker.describe_pipeline_execution(PipelineExecutionArn=arn)
    status, execution_id = described["PipelineExecutionStatus"], arn.rsplit("/", 1)[-1]
    steps = {step["StepName"]: step for step in _steps(sagemaker, arn)}
    print()
    print(f"Execution {execution_id}: {status}")
    for name in step_types(sagemaker, arn):
        step = steps.get(name, {})
        started, ended = step.get("StartTime"), step.get("EndTime")
        took = f"{(ended - started).total_seconds():7.1f}s" if started and ended else " " * 8
        print(f"  {name:<22} {step.get('StepStatus', 'NotExecuted'):<12} {took}  "
              f"{_note(step)}".rstrip())
    try:
        ledger = cost.aws_ledger(sagemaker, arn)
        print("\n" + cost.format_ledger({**ledger, "timing": timing}))
    except (BotoCoreError, ClientError) as exc:
        print(f"cost ledger unavailable for {arn}: {exc}", file=sys.stderr)

    if status != "Succeeded":
        ended = next((s for s in steps.values() if s["StepStatus"] in ("Failed", "Stopped")), None)
        files = logs.files(ended["StepName"]) if ended else []
        if files:
            tail = files[-1].read_text(errors="replace").splitlines()[-25:]
            print(f"--- last lines of {ended['StepName']}'s log ({files[-1]}) ---",
                  file=sys.stderr)
            print("\n".join(tail), file=sys.stderr)
        if logs.folder is not None and (logs.folder / "execution.json").is_file():
            print(f"Execution record: {logs.folder / 'execution.json'}", file=sys.stderr)
        if status == "Stopped":
            stopped = [n for n, s in steps.items() if s["StepStatus"] == "Stopped"]
            reason = f"stopped while {', '.join(stopped)} ran" if stopped else "stopped"
        else:
            reason = "; ".join(failed_steps(sagemaker, arn)) or described.get(
                "FailureReason", "no reason given")
        # The cause last, on one line: what a CI log or a terminal shows at the bottom.
        print(error_line(f"execution {execution_id} {status.lower()}: {reason}"),
              file=sys.stderr)
        return False

    registered = _print_results(sagemaker, s3, steps, logs, gate_metric)
    if logs.folder is not None:
        print(f"Logs and execution record: {logs.folder}")
    if registered:
        aws = "" if logs.folder is not None else " --target aws"  # no local logs: on SageMaker
        print(f"\nTo serve the model, approve the package, then deploy it (pipelines/deploy.py):"
              f"\n  llm-pipeline registry approve {registered}{aws}"
              f"\n  llm-pipeline deploy {registered}{aws}{' --role-arn ROLE' if aws else ''}")
    return True


def _print_results(sagemaker, s3, steps: dict[str, dict], logs: StepLogs,
                   gate_metric: str | None) -> str | None:
    """The registered package, the evaluation's metrics and the trained models; the package's
    ARN (None when the execution registered none)."""
    registered = None
    for step in steps.values():
        package = step.get("Metadata", {}).get("RegisterModel", {}).get("Arn")
        if package:
            described = sagemaker.describe_model_package(ModelPackageName=package)
            print(f"\nRegistered model package: {package} ({described['ModelApprovalStatus']})")
            registered = package
    evaluation = _job_name(steps.get("Evaluate", {}), "ProcessingJob")
    if evaluation:
        job = sagemaker.describe_processing_job(ProcessingJobName=evaluation)
        outputs = job.get("ProcessingOutputConfig", {}).get("Outputs", [])
        uri = next((o["S3Output"]["S3Uri"] for o in outputs), None)
        if uri:
            _print_metrics(s3, uri, gate_metric)
            print(f"\nEvaluation report: {uri.rstrip('/')}/{REPORT_FILE}")
            on_disk = _local_report(logs)
            if on_disk is not None:
                print(f"  on disk: {on_disk}")
    for name, step in steps.items():
        training = _job_name(step, "TrainingJob")
        if training:
            job = sagemaker.describe_training_job(TrainingJobName=training)
            print(f"Model artifact ({name}): {job['ModelArtifacts']['S3ModelArtifacts']}")
    return registered


def _print_metrics(s3, uri: str, gate_metric: str | None) -> None:
    bucket, _, key = uri[5:].partition("/")
    metrics: dict[str, Any] = json.loads(s3.get_object(
        Bucket=bucket, Key=f"{key.rstrip('/')}/evaluation.json")["Body"].read())["metrics"]
    print("\nMetric              tuned        base")
    # The recipe's gate metric (logprob_margin_delta of dpo, win_rate of rlhf-ppo, ...) with the
    # usual ones, so that the number that decided registration is on screen.
    shown = ["eval_loss", "perplexity", "bits_per_byte", "rouge_l", "exact_match"]
    if gate_metric and gate_metric not in (*shown, "perplexity_ratio"):
        shown.append(gate_metric)
    for name in shown:
        if name in metrics:
            base = metrics.get(f"base_{name}", {}).get("value")
            print(f"  {name:<16} {metrics[name]['value']:>10.4f}  "
                  f"{'-' if base is None else f'{base:>10.4f}'}")
    if "perplexity_ratio" in metrics:
        print(f"  perplexity_ratio {metrics['perplexity_ratio']['value']:>10.4f}  "
              "(base perplexity / tuned perplexity)")
    if gate_metric:
        print(f"  (registration gate: {gate_metric})")


def _local_report(logs: StepLogs) -> Path | None:
    """Where a local execution's Evaluate job wrote report.html (its newest attempt), if it ran
    here: the local engine keeps each job's /opt/ml under the execution's folder."""
    if logs.folder is None:
        return None
    found = sorted(logs.folder.glob(f"Evaluate/**/processing/evaluation/{REPORT_FILE}"),
                   key=lambda path: path.stat().st_mtime)
    return found[-1] if found else None

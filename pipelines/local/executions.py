"""Pipeline executions started through the local endpoint, run by the engine in the background.

StartPipelineExecution answers at once with the execution's ARN, as SageMaker does; the engine
(pipelines/local/engine.py) then runs the execution in a thread of the local server, each job a
process of its own started through the execution's `jobs.JobControl` (the seam where a warm job
runner can take over). StopPipelineExecution asks the engine to stop: the running job's process
group gets SIGTERM (SIGKILL after SageMaker's grace period), no further step starts, and the
execution ends Stopped. RetryPipelineExecution continues a Failed execution in place, under the
same ARN: its succeeded steps stay done and the others run again.

ParallelismConfiguration is recorded and reported as given. Its MaxParallelExecutionSteps caps how
many steps of one execution run at once; the engine runs one step at a time (this machine has
few cores), which keeps within any cap. Executions run side by side, as on SageMaker.

Everything is recorded under $LLM_PIPELINE_HOME/executions/PIPELINE/ID/: `pipeline-execution.json`
(what StartPipelineExecution was asked, and the execution's status), and the engine's own
`definition.json`, `execution.json` and step folders (logs, job folders). A restarted server reads
them back; an execution that was running when its server ended is Failed, and says so.

A tracked execution's MLflow runs are made here when it tracks into the local store: each step's
as its job starts, the execution's with the first; each step's ends here too, once its job's
process has ended, in the background while the next step runs. Its run ends here, as the execution ended and
tagged with the package it registered (pipelines/tracking.py), before its status says it ended: a
command that saw the end finds the run closed. The server imports MLflow once, in the background
while the first tracked execution runs; the line saying how the run was closed is the execution's
`tracking`.
"""

from __future__ import annotations

import copy
import json
import logging
import threading
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from pipelines import UserError, files, graph, tracking
from pipelines.local import engine, jobs
from steps.common import tracking as step_tracking

log = logging.getLogger(__name__)

RUNNING = ("Executing", "Stopping")
META_FILE = "pipeline-execution.json"


@dataclass
class Execution:
    """What the service knows of an execution beside the engine's record."""

    arn: str
    pipeline_name: str
    pipeline_arn: str
    execution_id: str
    region: str
    account: str
    created: float
    modified: float
    display_name: str
    description: str = ""
    parameters: list[dict] = field(default_factory=list)  # PipelineParameters as given
    parallelism: dict | None = None
    selective: dict | None = None  # SelectiveExecutionConfig as given
    version_id: int = 1
    client_token: str = ""
    status: str = "Executing"  # Executing, Stopping, Stopped, Failed, Succeeded
    failure_reason: str = ""
    tracking: str = ""  # how its MLflow run ended: one line, a warning if it could not


class ConflictError(UserError):
    """A request that the execution's current status does not allow (SageMaker's
    ConflictException)."""


class _Recorder(engine.Progress):
    """Keeps the engine's live step records, fresher than the last execution.json it saved."""

    def __init__(self) -> None:
        self.steps: dict[str, engine.StepRecord] = {}

    def step_started(self, record: engine.StepRecord) -> None:
        self.steps[record.name] = record

    def step_finished(self, record: engine.StepRecord) -> None:
        self.steps[record.name] = record


@dataclass
class _Running:
    thread: threading.Thread
    control: jobs.JobControl
    recorder: _Recorder


class Executions:
    """The executions of one local server: started, stopped, retried and described here."""

    def __init__(self, home: Path,
                 start_job: Any = jobs.start_process) -> None:
        self.home = home
        self.folder = home / "executions"
        self.cache_dir = home / "cache"
        self._start_job = start_job
        self._lock = threading.Lock()
        self._running: dict[str, _Running] = {}
        self._by_token: dict[str, str] = {}
        self._recover()

    # -- reading --------------------------------------------------------------------------

    def _meta_path(self, pipeline_name: str, execution_id: str) -> Path:
        return self.folder / pipeline_name / execution_id / META_FILE

    def _load(self, path: Path) -> Execution | None:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        names = {f.name for f in fields(Execution)}
        return Execution(**{k: v for k, v in data.items() if k in names})

    def get(self, arn: str) -> Execution | None:
        pipeline_name, execution_id = split_execution_arn(arn)
        if not pipeline_name:
            return None
        return self._load(self._meta_path(pipeline_name, execution_id))

    def of_pipeline(self, pipeline_name: str) -> list[Execution]:
        found = (self._load(p) for p in sorted((self.folder / pipeline_name).glob(f"*/{META_FILE}")))
        return [e for e in found if e is not None]

    def all(self) -> list[Execution]:
        found = (self._load(p) for p in sorted(self.folder.glob(f"*/*/{META_FILE}")))
        return [e for e in found if e is not None]

    def status(self, execution: Execution) -> str:
        running = self._running.get(execution.arn)
        if running and running.control.stop_requested.is_set():
            return "Stopping"
        return execution.status

    def record(self, execution: Execution) -> engine.ExecutionRecord | None:
        """The engine's record of the execution, with the steps it is running as they are now."""
        try:
            record = engine.load_execution(self.folder, execution.pipeline_name,
                                           execution.execution_id)
        except UserError:  # it has not started its first step yet
            return None
        running = self._running.get(execution.arn)
        if running:
            for name, live in list(running.recorder.steps.items()):
                record.steps[name] = _copy(live)
        return record

    def definition_of(self, execution: Execution) -> dict | None:
        path = self.folder / execution.pipeline_name / execution.execution_id / "definition.json"
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None

    def by_token(self, token: str) -> str | None:
        return self._by_token.get(token)

    def is_running(self, execution: Execution) -> bool:
        return execution.arn in self._running

    # -- changing -------------------------------------------------------------------------

    def start(self, execution: Execution, definition: dict, overrides: dict[str, str],
              selection: engine.Selection | None) -> None:
        """Run a new execution in the background; `execution` is its description, checked by the
        caller (engine.check_execution) before it answered."""
        execution.created = execution.modified = time.time()
        with self._lock:
            self._save(execution)
            if execution.client_token:
                self._by_token[execution.client_token] = execution.arn
            self._launch(execution, definition, overrides, selection, None)

    def stop(self, arn: str) -> Execution:
        with self._lock:
            execution = self._existing(arn)
            running = self._running.get(arn)
            if running is None:
                raise ConflictError(f"Pipeline execution {arn} is {execution.status}; only an "
                                    "executing pipeline execution can be stopped")
            running.control.stop_requested.set()
            execution.status, execution.modified = "Stopping", time.time()
            self._save(execution)
            return execution

    def retry(self, arn: str, parallelism: dict | None) -> Execution:
        with self._lock:
            execution = self._existing(arn)
            if execution.status != "Failed" or arn in self._running:
                raise ConflictError(f"Pipeline execution {arn} is {self.status(execution)}; only "
                                    "a Failed pipeline execution can be retried")
            record = engine.load_execution(self.folder, execution.pipeline_name,
                                           execution.execution_id)
            definition = self.definition_of(execution)
            if definition is None:
                raise ConflictError(f"Pipeline execution {arn} has no recorded definition to "
                                    "retry")
            execution.status, execution.failure_reason = "Executing", ""
            execution.modified = time.time()
            if parallelism is not None:
                execution.parallelism = parallelism
            self._save(execution)
            self._launch(execution, definition, {}, None, record)
            return execution

    def shutdown(self, reason: str) -> None:
        """The server is ending: every running execution is Failed, saying why, and its job is
        asked to stop (SIGTERM to its process group)."""
        with self._lock:
            for arn, running in list(self._running.items()):
                running.control.stop_grace_seconds = 0.0
                running.control.stop_requested.set()
                execution = self.get(arn)
                if execution is not None:
                    execution.status, execution.failure_reason = "Failed", reason
                    execution.modified = time.time()
                    self._save(execution)

    # -- inside ---------------------------------------------------------------------------

    def _existing(self, arn: str) -> Execution:
        execution = self.get(arn)
        if execution is None:
            raise KeyError(arn)
        return execution

    def _save(self, execution: Execution) -> None:
        path = self._meta_path(execution.pipeline_name, execution.execution_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        files.write_whole(path, json.dumps(asdict(execution), indent=1))

    def _launch(self, execution: Execution, definition: dict, overrides: dict[str, str],
                selection: engine.Selection | None, resume: engine.ExecutionRecord | None) -> None:
        control = jobs.JobControl(start=self._start_job)
        recorder = _Recorder()
        thread = threading.Thread(
            target=self._execute, name=f"execution-{execution.execution_id}", daemon=True,
            args=(execution, definition, overrides, selection, resume, control, recorder))
        self._running[execution.arn] = _Running(thread, control, recorder)
        thread.start()

    def _execute(self, execution: Execution, definition: dict, overrides: dict[str, str],
                 selection: engine.Selection | None, resume: engine.ExecutionRecord | None,
                 control: jobs.JobControl, recorder: _Recorder) -> None:
        uri = self._tracking_uri(definition, overrides, resume)
        untracked = self._untracked(execution, uri, control)
        if untracked:
            uri = None
        self._prepare_tracking(uri)
        step_runs = None
        if uri is not None and uri == tracking.local_uri(self.home):
            step_runs = tracking.StepRuns(uri, execution.execution_id, execution.arn,
                                          new=resume is None)
            control.job_variables, control.job_ended = step_runs.variables, step_runs.job_ended
        package = None
        try:
            record = engine.run_execution(
                definition, overrides, self.folder, execution.region, execution.account,
                execution.pipeline_name, recorder, selection, self.cache_dir,
                execution_id=execution.execution_id, control=control, resume=resume)
            status, reason = record.status, record.failure_reason
            package = next((s.outcome for s in record.steps.values()
                            if s.type == "RegisterModel" and s.outcome), None)
        except UserError as exc:
            status, reason = "Failed", str(exc)
        except Exception as exc:  # the engine's own fault: recorded, never a silent hang
            log.exception("execution %s failed in the engine", execution.arn)
            status, reason = "Failed", f"the local engine failed: {exc!r}"
        # Outside the lock: an unreachable tracking server takes its retries' time. The steps'
        # runs end first (each job's, in the background since its process ended).
        if step_runs is not None:
            step_runs.wait()
        closed = tracking.close_execution_run(
            uri, execution.pipeline_name, execution.execution_id, status == "Succeeded", package,
            runs=step_runs.runs() if step_runs is not None else None) if uri else untracked
        if closed:
            (log.warning if closed.startswith("warning:") else log.info)(
                "execution %s: %s", execution.execution_id, closed)
        with self._lock:
            current = self.get(execution.arn) or execution
            if current.status == "Failed" and current.failure_reason:  # shutdown() said why
                status, reason = "Failed", current.failure_reason
            current.status, current.failure_reason = status, reason
            current.tracking = closed or ""
            current.modified = time.time()
            self._save(current)
            self._close_record(current, reason)
            del self._running[execution.arn]

    @staticmethod
    def _untracked(execution: Execution, uri: str | None, control: jobs.JobControl) -> str | None:
        """The line saying that the execution goes untracked, when its tracking server does not
        answer (asked once, here); each of its tracked jobs is told so, and says so in its log
        at once instead of spending MLflow's retries on the server. None: tracked as asked."""
        reason = tracking.unreachable(uri)
        if reason is None:
            return None
        line = (f"warning: MLflow tracking off for execution {execution.execution_id}: the "
                f"tracking server {uri} does not answer ({reason}); its steps go on untracked "
                "(check MlflowTrackingUri)")
        log.warning("%s", line)
        told = {step_tracking.OFF_VARIABLE: f"the local server found it does not answer: {reason}"}
        control.job_variables = lambda env: (
            told if tracking.tracked(env.get("MLFLOW_TRACKING_URI")) == uri else {})
        return line

    def _prepare_tracking(self, uri: str | None) -> None:
        """Before the first step: the local store's tables, and MLflow imported in the background
        for the run's end. Tracking never fails an execution: a store that cannot be created is
        logged here, and each step says in one line that it goes on untracked."""
        if uri is None:
            return
        try:
            if uri == tracking.local_uri(self.home):
                tracking.prepare_local_store(self.home)
        except Exception as exc:  # noqa: BLE001 (the steps report it too, and go on)
            log.warning("cannot create the local MLflow store for %s: %s", uri, exc)
        tracking.import_client_early(uri)

    @staticmethod
    def _tracking_uri(definition: dict, overrides: dict[str, str],
                      resume: engine.ExecutionRecord | None) -> str | None:
        """The execution's MlflowTrackingUri (given, else the definition's default); None when
        it does not track, or when its parameters are refused (the engine then says why)."""
        try:
            values = (resume.parameters if resume is not None
                      else graph.resolve_parameters(definition, overrides))
        except UserError:
            return None
        return tracking.tracked(values.get(tracking.PARAMETER))

    def _close_record(self, execution: Execution, reason: str) -> None:
        """Make the engine's record agree with an execution that ended without the engine saying
        so (the engine failed, the server ended): no step is left executing."""
        try:
            record = engine.load_execution(self.folder, execution.pipeline_name,
                                           execution.execution_id)
        except UserError:
            return
        if record.status not in RUNNING and not any(
                s.status in ("Executing", "Pending") and s.started for s in record.steps.values()):
            return
        now = time.time()
        for state in record.steps.values():
            if state.status in ("Executing", "Stopping"):
                state.status, state.ended = "Failed", now
                state.failure_reason = state.failure_reason or reason
        record.status, record.failure_reason, record.ended = execution.status, reason, now
        folder = self.folder / execution.pipeline_name / execution.execution_id
        files.write_whole(folder / "execution.json",
                          json.dumps(asdict(record), indent=1, default=str))

    def _recover(self) -> None:
        """At start: executions the previous server left running are Failed, saying why."""
        for execution in self.all():
            if execution.client_token:
                self._by_token[execution.client_token] = execution.arn
            if execution.status in RUNNING:
                execution.status = "Failed"
                execution.failure_reason = (
                    "the local server ended while this execution ran; retry it "
                    "(RetryPipelineExecution) or start a new one")
                execution.modified = time.time()
                self._save(execution)
            if execution.status == "Failed":
                self._close_record(execution, execution.failure_reason)


def split_execution_arn(arn: str) -> tuple[str, str]:
    """(pipeline name, execution id) of a pipeline execution ARN; ("", "") if it is none."""
    _, _, rest = arn.partition(":pipeline/")
    name, marker, execution_id = rest.partition("/execution/")
    if not marker or not name or not execution_id or "/" in execution_id:
        return "", ""
    return name, execution_id


def _copy(record: engine.StepRecord) -> engine.StepRecord:
    """A copy of a step record the engine may be changing in another thread."""
    for _ in range(5):
        try:
            return copy.deepcopy(record)
        except RuntimeError:  # a dict changed size while it was copied: take it again
            time.sleep(0.01)
    return copy.deepcopy(record)

"""Experiment tracking in MLflow: one run per pipeline execution, one nested run per step.

Where to track comes from the job's environment, which the pipeline definition sets on every step
(pipelines/definition.py):

    MLFLOW_TRACKING_URI        the MlflowTrackingUri parameter: empty or 'none' is off; a SageMaker
                               managed MLflow tracking server (or app) ARN, which the
                               sagemaker-mlflow plugin resolves and signs with the job's role; any
                               other MLflow URI (sqlite:///..., http://...)
    LLM_PIPELINE_NAME          the pipeline: the experiment's name
    LLM_PIPELINE_STEP          the step: the nested run's name
    LLM_PIPELINE_RECIPE, LLM_PIPELINE_CODE_VERSION   tags of the execution's run

The execution a job belongs to is read from the job's own name, never from its Environment: the
Environment is part of a step's cache key ("Default cache key attributes by pipeline step type",
https://docs.aws.amazon.com/sagemaker/latest/dg/pipelines-default-keys.html), and an execution id
there would make every execution miss the cache. SageMaker names a pipeline's jobs
`pipelines-<execution id>-<step>-...` and tells a training container its name (TRAINING_JOB_NAME,
TRAINING_JOB_ARN) and a processing container its own in /opt/ml/config/processingjobconfig.json.

On SageMaker the step makes its own run (`open_step_run`): the execution's run is found by its tag
(`sagemaker.pipeline_execution_id`) or created by the first step that tracks; steps that start
together may both create one, and then every step adopts the oldest and the others are deleted.
Each step leaves that run as the execution stands: RUNNING while a step runs, FINISHED when one
ends, FAILED once one failed (until a retry of that step succeeds); `llm-pipeline start --wait`
sets the final status when the execution ends.

Locally the server that executes the pipeline makes the same runs with the same functions before
each job starts, and hands the job its run's id (RUN_ID_VARIABLE, PARENT_RUN_ID_VARIABLE,
EXPERIMENT_ID_VARIABLE, as MLflow's own MLFLOW_RUN_ID hands a run to a process): it has MLflow imported and the store open
already, looks the experiment and the execution's run up once per execution, and owns that run's
status (pipelines/tracking.py), so that a job's start spends no database round trips on finding
and creating runs (about 0.1 s a job on a tiny run, most of what tracking added to it).

Locally the server also ends each step's run, after the job's process has ended
(RUN_END_VARIABLE): the job leaves in a file what its run's end must log (its reports and plots;
its settings and metrics, so that it writes nothing to the store itself; a training stage's
Trainer metrics too, unless it trained longer than LIVE_AFTER_S, from when on it writes them as it
trains, for MLflow's UI to show) and how it ended;
the server logs them and ends the run in the background while the next step runs, with the same
functions (`StageRun.log_held`, `log_files`, `finish`), and ends FAILED the run of a job that
failed or was killed. The end was most of what tracking added to each job of a tiny run
(settings written, artifacts copied, the run read and ended: 0.15 s of a 3.9 s run); on SageMaker
the step ends its own run, as nothing else there knows it.

Tracking never breaks a step: the first failure (an unreachable server, a missing permission, a
URI MLflow does not know) is reported in one line and the step goes on untracked; its metrics
still reach the log, metrics.jsonl and the model package. Locally the server asks a tracking
server over HTTP once per execution whether it answers, and tells every job of an execution whose
server does not (OFF_VARIABLE): each step then says so in its line at once, where it would have
spent MLflow's retries first (on SageMaker each step finds out itself).

Written by hand: MLflow has no notion of a run shared by several processes that start at
different times, nor of a pipeline; training metrics themselves go through transformers' own
MLflowCallback (`trainer_callback`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

EXECUTION_TAG = "sagemaker.pipeline_execution_id"
EXECUTION_ARN_TAG = "sagemaker.pipeline_execution_arn"
STEP_TAG = "sagemaker.pipeline_step"
MODEL_PACKAGE_TAG = "sagemaker.model_package_arn"
# On the execution's run while a step's last attempt failed: the run stays FAILED.
FAILED_STEP_TAG = "sagemaker.failed_step"
# Files a step's outputs hold that are worth seeing beside its run: reports, plots, metric
# histories, summaries. Data splits and weights are not (they are in S3 already, and large).
ARTIFACT_SUFFIXES = (".json", ".md", ".html", ".png", ".svg")
ARTIFACT_MAX_BYTES = 5 * 2**20
_JOB_OF_EXECUTION = re.compile(r"pipelines-([a-z0-9]{12})-", re.IGNORECASE)
# Names of settings whose values are never logged (a token passed as a setting).
_SECRET_NAME = re.compile(r"token|secret|password|api_key|credential", re.IGNORECASE)

# What Evaluate writes beside evaluation.json: the execution's run, for the model package.
RUN_LINK_FILE = "mlflow_run.json"
NO_RUN = "none"
# Set by the local server on a job whose step's run it made (pipelines/tracking.py): the step's
# run, its execution's, and their experiment. Named LLM_PIPELINE_*, not MLFLOW_RUN_ID:
# transformers' MLflowCallback would start that run a second time, and a job whose environment
# differs from the warm job runner's in an MLFLOW_ variable cannot be forked from it.
RUN_ID_VARIABLE = "LLM_PIPELINE_MLFLOW_RUN_ID"
PARENT_RUN_ID_VARIABLE = "LLM_PIPELINE_MLFLOW_PARENT_RUN_ID"
EXPERIMENT_ID_VARIABLE = "LLM_PIPELINE_MLFLOW_EXPERIMENT_ID"
# Set by the local server beside them: the file where the job leaves its run's end for the server
# (`StageRun.hand_over`), in the job's /opt/ml/output, where a container leaves its failure for
# SageMaker. Unset, the step ends its run itself.
RUN_END_VARIABLE = "LLM_PIPELINE_MLFLOW_RUN_END"
RUN_END_FILE = "mlflow-run-end.json"
# Set by the local server on each job of an execution whose tracking server did not answer it
# (pipelines/tracking.py, `unreachable`): why. The step goes on untracked at once, saying so in
# its one line, instead of spending MLflow's retries on the same server (about 4.5 s a job).
OFF_VARIABLE = "LLM_PIPELINE_MLFLOW_OFF"

# A training stage's Trainer metrics are held for the local server, like its settings, while its
# training is young; from this many seconds of training on they go to MLflow's logging thread as
# they come (`StageRun.log_trainer_metrics`), so that a long training's curves grow in MLflow's UI.
LIVE_AFTER_S = 10.0

_current: StageRun | None = None


def tracked(uri: str | None) -> str | None:
    """`uri` as a tracking URI; None when it turns tracking off (empty or "none", the
    MlflowTrackingUri parameter's off values)."""
    uri = (uri or "").strip()
    return None if uri.lower() in ("", "none") else uri


def tracking_uri() -> str | None:
    """The tracking URI the job was given; None when tracking is off."""
    return tracked(os.environ.get("MLFLOW_TRACKING_URI"))


def current() -> StageRun | None:
    """The run of the stage in this process, if it is tracked."""
    return _current


def _job() -> tuple[str | None, str | None]:
    """(job name, job ARN) as SageMaker tells the container; (None, None) outside a job."""
    if os.environ.get("TRAINING_JOB_NAME"):
        return os.environ["TRAINING_JOB_NAME"], os.environ.get("TRAINING_JOB_ARN")
    # Processing: /opt/ml/config beside /opt/ml/output (the local engine maps both).
    from steps.common import contract

    path = contract.output_dir().parent / "config" / "processingjobconfig.json"
    try:
        config = json.loads(path.read_text())
        return config.get("ProcessingJobName"), config.get("ProcessingJobArn")
    except (OSError, ValueError):
        return None, None


def execution_of_job() -> tuple[str | None, str | None]:
    """(execution id, execution ARN) of the pipeline execution that started this job."""
    name, arn = _job()
    match = _JOB_OF_EXECUTION.match(name or "")
    if not match:
        return None, None
    execution_id = match.group(1).lower()
    pipeline = os.environ.get("LLM_PIPELINE_NAME")
    parts = (arn or "").split(":")
    if not pipeline or len(parts) < 6:
        return execution_id, None
    region, account = parts[3], parts[4]
    return execution_id, (f"arn:aws:sagemaker:{region}:{account}:pipeline/{pipeline}/"
                          f"execution/{execution_id}")


def _warn(what: str, error: BaseException | str) -> None:
    reason = " ".join(str(error).split())[:300] or type(error).__name__
    print(f"warning: MLflow tracking off for this step: {what} failed ({reason}); the step goes "
          "on, and its metrics are still in its log and metrics.jsonl", file=sys.stderr, flush=True)


def _settings(config: Any) -> dict[str, str]:
    """A stage config's settings as MLflow params (no value of a secret-looking name)."""
    import dataclasses

    if not dataclasses.is_dataclass(config):
        return {}
    params = {}
    for key, value in dataclasses.asdict(config).items():
        if _SECRET_NAME.search(key) or value is None:
            continue
        text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
        params[key] = text[:6000]  # MLflow's limit on a param value
    return params


class StageRun:
    """The MLflow run of one step (nested in its execution's run): params, metrics, artifacts.

    Every method reports the first failure in one line and turns tracking off for the step.
    """

    def __init__(self, client, run_id: str, parent_run_id: str | None, step: str,
                 experiment_id: str = "", keeps_execution_run: bool = True,
                 warn: Callable[[str, BaseException], None] | None = None,
                 end_file: Path | None = None) -> None:
        self.client = client
        self.run_id = run_id
        self.parent_run_id = parent_run_id
        self.step = step
        self.experiment_id = experiment_id
        # Whether the step leaves the execution's run as the execution stands (on SageMaker);
        # not when the local server made the step's run: the server owns the execution's.
        self.keeps_execution_run = keeps_execution_run
        self.active = True
        self.fluent = False  # MLflow's fluent API has this run active (`activate`)
        # How a failure is reported: the step's one line, or the local server's log.
        self.warn = warn or _warn
        # `end_file`: where the job leaves its run's end to the local server (RUN_END_VARIABLE,
        # `hand_over`); None: the step ends its run itself. Where the server ends it, settings
        # and metrics are held here for it, so that the job makes no write to the store at all;
        # a training stage's run releases them to MLflow's logging thread once it has trained
        # for LIVE_AFTER_S (`log_trainer_metrics`).
        self.end_file = end_file
        self.held: dict[str, list] | None = (
            {"params": [], "metrics": []} if end_file is not None else None)
        self.live_at = math.inf  # when held Trainer metrics go to MLflow instead (`activate`)

    def _guarded(self, what: str, call, *args, **kwargs) -> Any:
        if not self.active:
            return None
        try:
            return call(*args, **kwargs)
        except Exception as error:  # noqa: BLE001 (tracking must never fail the step)
            self.active = False
            self.warn(what, error)
            return None

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None,
                    synchronous: bool = True) -> None:
        """Numeric values of `metrics` at `step` (its "step" entry when None). Not
        `synchronous`: queued for MLflow's logging thread, as transformers' MLflowCallback
        queues the Trainer's (what a training loop logs each step must not wait for the store);
        the step's end waits for the queue."""
        from mlflow.entities import Metric

        step = int(metrics.get("step", 0) if step is None else step)
        now = int(time.time() * 1000)
        values = [Metric(_metric_name(key), float(value), now, step)
                  for key, value in metrics.items()
                  if key not in ("step", "epoch") and isinstance(value, (int, float))
                  and not isinstance(value, bool) and math.isfinite(float(value))]
        self._log_batch(metrics=values, synchronous=synchronous)

    def log_params(self, params: Mapping[str, str], synchronous: bool = True) -> None:
        from mlflow.entities import Param

        self._log_batch(params=[Param(k, v) for k, v in params.items()], synchronous=synchronous)

    def _log_batch(self, metrics: list = (), params: list = (), synchronous: bool = True) -> None:
        if self.held is not None:
            self.held["metrics"] += metrics
            self.held["params"] += params
            return
        # MLflow takes at most 100 params and 1000 values in all in a batch: the settings and
        # metrics of a step's run's end are one write to the store.
        params, metrics = list(params), list(metrics)
        while params or metrics:
            batch_params, params = params[:100], params[100:]
            batch_metrics, metrics = (metrics[:1000 - len(batch_params)],
                                      metrics[1000 - len(batch_params):])
            self._guarded("logging settings and metrics", self.client.log_batch, self.run_id,
                          metrics=batch_metrics, params=batch_params, synchronous=synchronous)

    def release(self) -> None:
        """What is held for the local server, queued for MLflow's logging thread instead."""
        held, self.held = self.held, None
        if held:
            # The job writes to the store itself from here.
            self._guarded("opening the store", commit_without_sync, tracking_uri() or "")
            self._log_batch(held["metrics"], held["params"], synchronous=False)

    def log_trainer_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """What transformers' MLflowCallback logs at a Trainer step (`trainer_callback`): held
        for the local server with the step's settings while the training is younger than
        LIVE_AFTER_S, which is all of a short training (no write to the store, no logging thread
        in the job, nothing to wait for at its end: most of what tracking still added to a tiny
        run's training job); from then on queued for MLflow's logging thread with what was held,
        as MLflow's own `log_metrics(synchronous=False)` queues them."""
        from mlflow.entities import Metric

        if self.held is not None and time.monotonic() >= self.live_at:
            self.release()
        now = int(time.time() * 1000)
        self._log_batch(metrics=[Metric(key, float(value), now, int(step))
                                 for key, value in metrics.items()], synchronous=False)

    def log_held(self, ending: Mapping[str, Any]) -> None:
        """The settings and metrics a job held for its run (`hand_over`), in the local server."""
        from mlflow.entities import Metric, Param

        self._log_batch([Metric(*m) for m in ending.get("metrics", [])],
                        [Param(k, v) for k, v in ending.get("params", {}).items()])

    def log_files(self, paths: Iterable[Path]) -> None:
        """Each of `paths` as an artifact of the run (`artifact_files` chooses them)."""
        for path in paths:
            self._guarded(f"uploading {path.name}", self.client.log_artifact, self.run_id,
                          str(path))

    def log_evaluation(self, folders: Iterable[Path]) -> None:
        """The metrics of an evaluation.json (SageMaker's model-quality shape) in `folders`."""
        for folder in folders:
            path = folder / "evaluation.json"
            if path.is_file():
                try:
                    metrics = json.loads(path.read_text()).get("metrics", {})
                except (OSError, ValueError, AttributeError):
                    continue
                self.log_metrics({name: entry.get("value") for name, entry in metrics.items()
                                  if isinstance(entry, dict)}, step=0, synchronous=False)

    def activate(self) -> bool:
        """Make this run MLflow's fluent active run, which transformers' MLflowCallback reports
        into (rather than starting a run of its own); whether it is. Only a training stage needs
        it. The run is RUNNING already (the local server or `start` made it): MLflow's
        `start_run(run_id=...)` would read it twice and set it RUNNING again, three round trips
        to the store (about 0.1 s of a tiny training job); MLflow keeps no more of an active run
        than its id, experiment and status (`mlflow.active_run()` has no params or metrics), so
        it is put on MLflow's stack of active runs as it stands (`_enter_fluent_run`). The
        training starts now: LIVE_AFTER_S counts from here (`log_trainer_metrics`)."""
        if self.active and not self.fluent:
            self.fluent = self._guarded("activating the run", _enter_fluent_run, self.run_id,
                                        self.experiment_id, self.step) is not None
        self.live_at = time.monotonic() + LIVE_AFTER_S
        return self.fluent

    def leave_end(self, files: list[Path], succeeded: bool) -> bool:
        """At `end_file`, what the local server logs as it ends the run: what is held (settings,
        metrics), the `files` and whether the stage succeeded; written whole or not at all.
        `start` leaves the settings there at once (not succeeded, no files), so that a job
        killed before its end still has its settings in its FAILED run; `hand_over` replaces
        it. Whether it was written."""
        held = self.held or {"params": [], "metrics": []}
        ending = {"run_id": self.run_id, "succeeded": succeeded,
                  "artifacts": [str(p) for p in files],
                  "params": {p.key: p.value for p in held["params"]},
                  "metrics": [[m.key, m.value, m.timestamp, m.step] for m in held["metrics"]]}
        partial = self.end_file.with_name(f".{self.end_file.name}.partial")
        try:
            partial.write_text(json.dumps(ending))
            partial.replace(self.end_file)
        except OSError:
            return False
        return True

    def hand_over(self, files: list[Path], succeeded: bool) -> bool:
        """Leave the run's end to the local server (RUN_END_VARIABLE): write what was queued
        for MLflow's logging thread, then at `end_file` what was held (settings, metrics), the
        `files` to log and whether the stage succeeded. The run stays RUNNING until the server
        ends it after the job's process ended, FAILED if the job failed after all (or no file is
        there). Whether the file was written."""
        import mlflow

        if not self.leave_end(files, succeeded):
            return False
        self.held = None
        if self.fluent:  # a training stage's: not ended, the server ends it
            # What it queued for MLflow's logging thread (the Trainer's metrics of a training
            # longer than LIVE_AFTER_S) is in this process only: written now, as ending the run
            # would write it. Only a training stage queues: another never opens the store.
            self._guarded("logging metrics", mlflow.flush_async_logging)
            self._guarded("leaving the run", _leave_fluent_run)
            self.fluent = False
        return True

    def finish(self, succeeded: bool) -> None:
        import mlflow

        status = "FINISHED" if succeeded else "FAILED"
        # Either way after flushing what was logged in the background (set_terminated drains
        # MLflow's logging queue first); the fluent run's end ends it as MLflow's active run too.
        if self.fluent:
            self._guarded("ending the run", mlflow.end_run, status)
        else:
            self._guarded("ending the run", self.client.set_terminated, self.run_id, status)
        if not self.parent_run_id or not self.keeps_execution_run:
            return
        parent = self._guarded("reading the execution's run", self.client.get_run,
                               self.parent_run_id)
        if parent is None:
            return
        failed_step = parent.data.tags.get(FAILED_STEP_TAG)
        if not succeeded:
            self._guarded("updating the execution's run", self.client.set_tag,
                          self.parent_run_id, FAILED_STEP_TAG, self.step)
        elif failed_step is not None and failed_step != self.step:
            return  # another step failed: the execution's run stays FAILED
        elif failed_step is not None:  # this step failed before, and its retry succeeded
            self._guarded("updating the execution's run", self.client.delete_tag,
                          self.parent_run_id, FAILED_STEP_TAG)
        self._guarded("updating the execution's run", self.client.set_terminated,
                      self.parent_run_id, status)


def _enter_fluent_run(run_id: str, experiment_id: str, name: str):
    """Put the RUNNING run `run_id` on MLflow's stack of active runs, as `mlflow.start_run` does
    once it has read the run from the store; the active run. Written by hand: MLflow has no
    public way to activate a run it need not read (`_leave_fluent_run` takes it off)."""
    import mlflow
    from mlflow.entities import LifecycleStage, Run, RunData, RunInfo, RunStatus
    from mlflow.tracking import fluent

    info = RunInfo(run_id=run_id, experiment_id=experiment_id, user_id="",
                   status=RunStatus.to_string(RunStatus.RUNNING),
                   start_time=int(time.time() * 1000), end_time=None,
                   lifecycle_stage=LifecycleStage.ACTIVE, run_name=name)
    active = mlflow.ActiveRun(Run(info, RunData()))
    fluent._active_run_stack.get().append(active)
    return active


def _leave_fluent_run() -> None:
    """Take the run off MLflow's stack of active runs without ending it (`mlflow.end_run` ends
    it): the process may start another, and MLflow's own end at exit must not end it FINISHED
    behind the server. Written by hand: MLflow has no public way to leave a run running."""
    from mlflow.tracking import fluent

    stack = fluent._active_run_stack.get()
    if stack:
        stack.pop()


def artifact_files(folders: Iterable[Path], names: Iterable[str] | None = None) -> list[Path]:
    """The report-like files directly in `folders` (or only those named `names`): what a step's
    run keeps of its outputs."""
    wanted = set(names) if names is not None else None
    found = []
    for folder in folders:
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            if not path.is_file() or path.stat().st_size > ARTIFACT_MAX_BYTES:
                continue
            if (path.name in wanted if wanted is not None else
                    path.suffix in ARTIFACT_SUFFIXES or path.name.endswith("metrics.jsonl")):
                found.append(path)
    return found


def read_run_end(path: Path) -> dict[str, Any] | None:
    """What a job left for its run's end at `path` (`StageRun.leave_end`): {"run_id",
    "succeeded", "artifacts", "params", "metrics"}; None when it left nothing readable (it failed before, or was
    killed)."""
    try:
        ending = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return ending if isinstance(ending, dict) else None


def _metric_name(key: str) -> str:
    # MLflow allows letters, digits, _ - . space : / in names.
    return re.sub(r"[^0-9A-Za-z_\-. :/]", "_", key)


def execution_tags(env: Mapping[str, str], execution_id: str,
                   execution_arn: str | None) -> dict[str, str]:
    """The tags of an execution's run, from a job's environment (the definition sets the recipe
    and code version on every step)."""
    tags = {EXECUTION_TAG: execution_id, EXECUTION_ARN_TAG: execution_arn or "",
            "recipe": env.get("LLM_PIPELINE_RECIPE", ""),
            "code_version": env.get("LLM_PIPELINE_CODE_VERSION", "")}
    return {k: v for k, v in tags.items() if v}


def experiment_of(client, name: str, uri: str) -> str:
    """The id of the experiment named `name` (the pipeline's), created when there is none."""
    experiment = client.get_experiment_by_name(name)
    return experiment.experiment_id if experiment is not None else _create_experiment(client,
                                                                                      name, uri)


def tagged_runs(client, experiment_id: str, execution_id: str, max_results: int = 1000) -> list:
    """The runs tagged with the execution, oldest first: its own run (no parent) and its steps'."""
    return client.search_runs([experiment_id],
                              filter_string=f"tags.`{EXECUTION_TAG}` = '{execution_id}'",
                              max_results=max_results, order_by=["attributes.start_time ASC"])


def execution_run(client, experiment_id: str, execution_id: str, tags: dict[str, str]) -> str:
    """The run of the execution, RUNNING unless a step of it failed: found by its tag, else
    created with `tags`; the oldest wins a race."""

    def runs():  # the execution's own runs, not its steps' (which carry its tag too)
        return [run for run in tagged_runs(client, experiment_id, execution_id, max_results=50)
                if "mlflow.parentRunId" not in run.data.tags]

    found = runs()
    if not found:
        mine = new_execution_run(client, experiment_id, execution_id, tags)
        found = runs()
        for run in found[1:]:  # another step created one too: keep the oldest only
            if run.info.run_id == mine:
                client.delete_run(mine)
        if not found:
            return mine
    parent = found[0]
    if FAILED_STEP_TAG not in parent.data.tags:
        client.update_run(parent.info.run_id, status="RUNNING")
    return parent.info.run_id


def new_execution_run(client, experiment_id: str, execution_id: str, tags: dict[str, str]) -> str:
    """A new run for the execution, RUNNING, tagged with `tags`: for an execution known to have
    none yet (`execution_run` finds or makes it)."""
    return client.create_run(experiment_id, run_name=execution_id, tags=tags).info.run_id


def create_step_run(client, experiment_id: str, step: str, parent: str | None,
                    execution_id: str | None) -> str:
    """A new run for step `step`, nested in its execution's run `parent` when there is one."""
    tags = {STEP_TAG: step}
    if parent:
        tags.update({"mlflow.parentRunId": parent, EXECUTION_TAG: execution_id or ""})
    return client.create_run(experiment_id, run_name=step, tags=tags).info.run_id


def open_step_run(client, uri: str) -> tuple[str, str | None, str]:
    """(this job's step's new run, its execution's run, their experiment): what a step does
    itself on SageMaker, where nothing else knows its execution."""
    experiment_id = experiment_of(client, os.environ.get("LLM_PIPELINE_NAME") or "llm-pipeline",
                                  uri)
    execution_id, execution_arn = execution_of_job()
    parent = (execution_run(client, experiment_id, execution_id,
                            execution_tags(os.environ, execution_id, execution_arn))
              if execution_id else None)
    step = os.environ.get("LLM_PIPELINE_STEP") or "stage"
    return create_step_run(client, experiment_id, step, parent, execution_id), parent, experiment_id


def batch_queued_metrics() -> None:
    """MLflow's logging thread gathers what was queued every 2 seconds into one write, instead of
    writing each step's metrics on its own; unset, it waits on its queue a second at a time, and
    ending a run waits out that second (about 0.7 s a training job). A user's own
    MLFLOW_ASYNC_LOGGING_BUFFERING_SECONDS wins; it is read by the thread, so set before it logs."""
    os.environ.setdefault("MLFLOW_ASYNC_LOGGING_BUFFERING_SECONDS", "2")


def commit_without_sync(uri: str) -> None:
    """Where `uri` is an SQLite store (the local one), this process's connections to it commit
    without waiting for the disk (`PRAGMA synchronous=NORMAL`, a setting of each connection, made
    as MLflow opens one): in the write-ahead-log mode the local store keeps
    (pipelines/tracking.py), a commit then appends to the log and the disk is synced only when the
    log is copied into the database, instead of once per commit (a tiny run's steps commit about
    twenty times: runs made, settings and metrics logged, runs ended). Each write took about 3 ms
    instead of 6-8 here, and longer where other processes keep the disk busy. The database stays
    whole whatever happens (https://www.sqlite.org/pragma.html#pragma_synchronous); a power loss
    may lose its last commits. MLflow keeps one engine per URI in a process; connections it
    already pooled are closed, so that each is opened again with the setting. Once per process
    and URI; call it before the process writes."""
    if not uri.startswith("sqlite:///"):
        return
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
    from sqlalchemy import event

    engine = SqlAlchemyStore._get_or_create_engine(uri)
    if not event.contains(engine, "connect", _without_sync):
        event.listen(engine, "connect", _without_sync)
        engine.dispose()


def _without_sync(connection, _record) -> None:
    connection.execute("PRAGMA synchronous=NORMAL")


def limit_retries() -> None:
    """An unreachable tracking server must not hold a step or a command for minutes: MLflow
    retries a request 7 times by default, backing off up to 2 minutes between tries (about 4
    minutes in all). Set before the first request; a user's own MLFLOW_HTTP_REQUEST_* win."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")


def start(config: Any) -> StageRun | None:
    """Start the step's run (nested in its execution's), with `config`'s settings as params.

    None when tracking is off, in a process other than the first of a distributed job, or when
    the tracking store cannot be used (reported in one line).
    """
    global _current
    uri = tracking_uri()
    if uri is None or int(os.environ.get("RANK", "0")) != 0:
        return None
    if os.environ.get(OFF_VARIABLE):
        _warn(f"reaching the tracking store {uri}", os.environ[OFF_VARIABLE])
        return None
    limit_retries()
    batch_queued_metrics()
    # The sagemaker-mlflow plugin's request-header provider fails on every URI but an ARN, and
    # MLflow logs that at each request; the requests themselves are unaffected.
    logging.getLogger("mlflow.tracking.request_header.registry").setLevel(logging.ERROR)
    step = os.environ.get("LLM_PIPELINE_STEP") or "stage"
    given = os.environ.get(RUN_ID_VARIABLE)
    try:
        import mlflow
        from mlflow import MlflowClient

        # For transformers' MLflowCallback and the fluent run's end (`StageRun.activate`), which
        # read MLFLOW_TRACKING_URI where none was set: setting the same URI again resets MLflow's
        # tracing (opentelemetry's SDK imported, 0.07 s a job) for nothing.
        if mlflow.get_tracking_uri() != uri:
            mlflow.set_tracking_uri(uri)
        if given:  # made by the local server
            client = _ClientWhenUsed(uri)
            run_id, parent = given, os.environ.get(PARENT_RUN_ID_VARIABLE) or None
            experiment_id = os.environ.get(EXPERIMENT_ID_VARIABLE, "")
        else:
            commit_without_sync(uri)
            client = MlflowClient(uri)
            run_id, parent, experiment_id = open_step_run(client, uri)
    except Exception as error:  # noqa: BLE001 (tracking must never fail the step)
        _warn(f"reaching the tracking store {uri}", error)
        return None
    end_file = os.environ.get(RUN_END_VARIABLE) if given else None
    run = StageRun(client, run_id, parent, step, experiment_id, keeps_execution_run=not given,
                   end_file=Path(end_file) if end_file else None)
    # Queued (or held for the local server): written with the step's first metrics, or as its
    # run ends.
    run.log_params(_settings(config), synchronous=False)
    if run.end_file is not None:  # kept for a job killed before its end (`StageRun.leave_end`)
        run.leave_end([], False)
    print(f"MLflow: step run {run_id}" + (f" in execution run {parent}" if parent else "")
          + f" at {uri}", flush=True)
    _current = run
    return run


class _ClientWhenUsed:
    """MLflow's client for `uri`, made when first used: making one opens the store (for an SQL
    store, its module imported and the database's schema checked: a new process's first
    seconds), which a job whose run the local server ends uses only if it trains for longer
    than LIVE_AFTER_S."""

    def __init__(self, uri: str) -> None:
        self._uri = uri
        self._client = None

    def __getattr__(self, name: str) -> Any:
        if self._client is None:
            from mlflow import MlflowClient

            self._client = MlflowClient(self._uri)
        return getattr(self._client, name)


def _create_experiment(client, name: str, uri: str) -> str:
    from mlflow.exceptions import MlflowException

    # A server (SageMaker's, or any over HTTP) places artifacts itself; a client on an SQLite
    # file would put them under the job's working folder: beside the database instead.
    location = None
    if uri.startswith("sqlite:///"):
        location = (Path(uri.removeprefix("sqlite:///")).parent / "artifacts" / name).as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException:  # another step created it first
        return client.get_experiment_by_name(name).experiment_id


def write_run_link(path: Path) -> None:
    """{"execution_run_id": ...} at `path`: the execution's MLflow run, or "none" when the step
    is not tracked (the pipeline reads it with a property file, so it is always written)."""
    run = _current
    run_id = (run.parent_run_id or run.run_id) if run is not None else None
    path.write_text(json.dumps({"execution_run_id": run_id or NO_RUN}) + "\n")


def end(succeeded: bool, folders: Iterable[Path] = (), model_folder: Path | None = None,
        model_files: Iterable[str] = ()) -> None:
    """End the step's run; when it succeeded, first log what it left in `folders` (reports,
    plots, metric histories, evaluation metrics) and the `model_files` of `model_folder` (the
    model's record, not its weights). Where the local server ends the run (RUN_END_VARIABLE),
    the files are left for it to log."""
    global _current
    run, _current = _current, None
    if run is None:
        return
    folders = list(folders)
    files: list[Path] = []
    if succeeded:
        run.log_evaluation(folders)
        files = artifact_files(folders)
        if model_folder is not None:
            files += artifact_files([model_folder], names=model_files)
    if run.end_file is not None and run.hand_over(files, succeeded):
        return
    run.release()
    run.log_files(files)
    run.finish(succeeded)


def trainer_callback():
    """transformers' MLflowCallback reporting a training stage's Trainer logs (loss, learning
    rate, grad norm, eval loss, TRL's rewards and KL, ...) into the step's run at each step, or
    None when the step is not tracked. Its failures are reported once and end its reporting."""
    if _current is None or not _current.active:
        return None
    from transformers.integrations import MLflowCallback

    # The stage's own settings are the run's params (`start`); the Trainer's ~200 arguments would
    # repeat them under other names.
    os.environ.setdefault("MLFLOW_MAX_LOG_PARAMS", "0")
    run = _current
    if not run.activate():
        return None

    class GuardedMLflowCallback(MLflowCallback):
        def __init__(self) -> None:
            super().__init__()
            self._ml_flow = _ReportingInto(run)

        def on_train_begin(self, *args, **kwargs):
            run._guarded("reporting training", super().on_train_begin, *args, **kwargs)

        def on_log(self, *args, **kwargs):
            run._guarded("reporting training", super().on_log, *args, **kwargs)

        def on_train_end(self, *args, **kwargs):
            run._guarded("reporting training", super().on_train_end, *args, **kwargs)

    return GuardedMLflowCallback()


class _ReportingInto:
    """MLflow as transformers' MLflowCallback uses it (its `_ml_flow`: the `mlflow` module),
    except that the metrics it logs at each Trainer step go to the step's run's
    `log_trainer_metrics` (held for the local server while the training is young, then queued
    for MLflow's logging thread, as `mlflow.log_metrics(synchronous=False)` queues them). What
    the callback makes of the Trainer's logs (which values, their names, their step) is its own."""

    def __init__(self, run: StageRun) -> None:
        self._run = run

    def __getattr__(self, name: str) -> Any:
        import mlflow

        return getattr(mlflow, name)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None,
                    synchronous: bool | None = None, **kwargs) -> None:
        self._run.log_trainer_metrics(metrics, step or 0)

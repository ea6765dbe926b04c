"""MLflow beside the engine: the local tracking store, its UI, and each execution's run's end.

Each step tracks into its own run (steps/common/tracking.py); what is here needs the whole
execution:
  - locally, tracking is on by default, in an SQLite store under $LLM_PIPELINE_HOME/mlflow
    (MLflow's own recommended local backend; artifacts beside it), which `llm-pipeline mlflow`
    shows in MLflow's UI, offline;
  - locally, the server makes each step's run as its job starts, and the execution's run with the
    first (`StepRuns`), in the local store, where it has MLflow imported and the store open;
  - when the execution ends, its run ends as it did, tagged with the model package it registered
    (the package's metadata already names the run: pipelines/definition.py). Locally the server
    that executes the pipeline does it (pipelines/local/executions.py), importing MLflow once for
    all its executions, so that the command imports none of MLflow; on AWS `start --wait` does.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import subprocess
import sys
import threading
import urllib.parse
from pathlib import Path

from pipelines import UserError
from steps.common import tracking as step_tracking
from steps.common.tracking import tracked

PARAMETER = "MlflowTrackingUri"
log = logging.getLogger(__name__)


def local_store(home: Path) -> Path:
    return home / "mlflow"


def local_uri(home: Path) -> str:
    return f"sqlite:///{local_store(home) / 'mlflow.db'}"


def default_uri(target: str, home: Path) -> str | None:
    """The MlflowTrackingUri an execution gets when the command is not given one: the shell's
    MLFLOW_TRACKING_URI, else the local store for the local target; None (off) on AWS."""
    if os.environ.get("MLFLOW_TRACKING_URI", "").strip():
        return os.environ["MLFLOW_TRACKING_URI"].strip()
    return local_uri(home) if target == "local" else None


def prepare_local_store(home: Path) -> None:
    """Create the local store's tables once, before any step uses it: MLflow migrates a new
    SQLite database on first use (seconds), and steps that start together must not race at it.
    The store keeps a write-ahead log (`_write_ahead`)."""
    database = local_store(home) / "mlflow.db"
    database.parent.mkdir(parents=True, exist_ok=True)
    # Two commands started together (two `run`s) would migrate the same new database at once,
    # and alembic fails the second: one creates it while the others wait, then find it made
    # (the file exists from the migration's first statement, so it is looked for under the lock).
    with open(database.parent / "create.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not database.exists():
            from mlflow import MlflowClient

            # MLflow (its import sets its loggers up) and alembic log each migration step; the
            # command's output is the execution's.
            for name in ("mlflow", "alembic"):
                logging.getLogger(name).setLevel(logging.WARNING)

            MlflowClient(local_uri(home)).search_experiments(max_results=1)
        _write_ahead(database)


def _write_ahead(database: Path) -> None:
    """Put the SQLite database in write-ahead-log mode (a setting kept in the file, so once per
    store; also a store made before it was set): each write of a run (a run made, settings and
    metrics logged, a run ended; a tiny run's steps make about twenty) then syncs the disk once
    instead of three times (the rollback journal, the database, the journal's removal), which
    halved what tracking cost a tiny run's jobs here; and none, where the writing processes
    commit without syncing, as they do (steps/common/tracking.py, `commit_without_sync`). Readers
    (MLflow's UI) no longer block the steps' writes either. Like every SQLite database written by
    several processes, the store must be on a local disk (https://www.sqlite.org/wal.html). Only
    speed depends on it: a database that cannot switch now (another process writing) keeps
    working as it is."""
    import sqlite3

    try:
        with contextlib.closing(sqlite3.connect(database, timeout=5)) as connection:
            if connection.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                connection.execute("PRAGMA journal_mode=WAL")
    except sqlite3.Error as error:
        log.info("the local MLflow store %s keeps its rollback journal (%s)", database, error)


# MLflow's SQL stores: their client also imports SQLAlchemy and alembic.
_SQL_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")


def import_client_early(uri: str | None) -> None:
    """Import MLflow's client (and SQL store) in the background while the execution runs, when
    it is tracked: seconds (about 4 on a quiet 2-CPU machine, twice that on a busy one) that
    closing its run would otherwise spend after the execution ended (`close_execution_run`,
    whose own import then finds the modules loaded or waits for them). A process imports them
    once: the local server's later executions find them loaded."""
    uri = tracked(uri)
    if uri is None:
        return
    modules = ["mlflow"]
    if uri.split(":", 1)[0].split("+", 1)[0] in _SQL_SCHEMES:
        modules.append("mlflow.store.tracking.sqlalchemy_store")

    def load() -> None:
        import importlib

        for name in modules:
            try:
                importlib.import_module(name)
            except Exception:  # noqa: BLE001 (closing the run imports it again, and says why)
                return
        _out_of_the_collectors_sight()

    threading.Thread(target=load, name="import-mlflow", daemon=True).start()


_frozen = False


def _out_of_the_collectors_sight() -> None:
    """Once per process, after MLflow's import: what the process holds now (MLflow's modules,
    SQLAlchemy's and alembic's with them: about 240,000 objects, six times what the local server
    held before) moves to the garbage collector's permanent generation (gc.freeze), which its
    collections skip, as the warm job runner does with its libraries (pipelines/local/runner.py).
    Otherwise each full collection of the long-lived local server went through them all, holding
    every thread of it (0.15-0.8 s here, one every run or two of a tiny pipeline, the store's
    writes allocating more); one that fell before a job's start delayed the job. What is frozen
    stays in memory, as a module's objects do anyway."""
    global _frozen
    if not _frozen:
        _frozen = True
        import gc

        gc.freeze()


def unreachable(uri: str | None, timeout_s: float = 10.0) -> str | None:
    """Why the tracking server at `uri` does not answer, in a few words; None when it answers
    (any HTTP answer: what it says is for the steps to find out), or when `uri` is no server over
    HTTP (a store MLflow opens itself, or an ARN the steps resolve). The local server asks once
    per execution, before its first step, and tells the jobs when it does not answer
    (steps/common/tracking.py, OFF_VARIABLE): each would otherwise spend MLflow's retries on it
    (about 4.5 s a job, `limit_retries`), and closing the execution's run as many again. Asked
    as MLflow asks (requests, with the shell's proxies); a certificate it does not trust counts
    as an answer, since MLflow may be told to accept it."""
    uri = tracked(uri)
    if uri is None or urllib.parse.urlsplit(uri).scheme not in ("http", "https"):
        return None
    import requests

    try:
        requests.get(f"{uri.rstrip('/')}/health", timeout=(timeout_s, timeout_s)).close()
    except requests.exceptions.SSLError:
        return None
    except requests.ConnectionError as error:  # also a connection that timed out
        cause = re.search(r"\[Errno -?\d+\] ([^'\")]+)", str(error))
        return cause.group(1).strip() if cause else type(error).__name__
    except requests.RequestException:  # it answered, slowly or oddly: the steps find out
        return None
    return None


class StepRuns:
    """The MLflow runs of one local execution tracked in the local store, made and ended by the
    server that executes it: each step's run as its job starts, nested in the execution's run,
    made with the first. The job is handed its run in its environment (`variables`) and starts
    with it, instead of finding and creating runs itself (steps/common/tracking.py); it leaves its
    run's end (its reports and plots to log) in a file, and once its process has ended the run is
    ended here (`job_ended`), in the background while the next step runs; `wait` before the
    execution's run is closed. Only for the local store: a remote server that does not answer
    would hold every job's start here for its retries, and a step says in its own log that it
    goes on untracked. Whatever fails making a run leaves the jobs to make and end their runs
    themselves, as on SageMaker."""

    def __init__(self, uri: str, execution_id: str, execution_arn: str, new: bool = False) -> None:
        self.uri, self.execution_id, self.execution_arn = uri, execution_id, execution_arn
        # An execution that starts now (not a retry) has no run yet: it is made without searching
        # the store for one (twice, to settle a race of steps that only SageMaker has), which was
        # most of the time its first step waited for its run.
        self.new = new
        self.experiment_id: str | None = None
        self.parent: str | None = None
        self.failed = False
        self._ending: list[threading.Thread] = []
        self._made: list[str] = []  # the steps' runs, as made
        self._ended: set[str] = set()  # those ended here with all the job left them

    def variables(self, env: dict[str, str]) -> dict[str, str]:
        """What to add to the environment `env` of a job about to start: its step's new run;
        {} for a job that tracks elsewhere or not at all, or when the run could not be made."""
        step = env.get("LLM_PIPELINE_STEP")
        if self.failed or not step or tracked(env.get("MLFLOW_TRACKING_URI")) != self.uri:
            return {}
        try:
            from mlflow import MlflowClient

            step_tracking.commit_without_sync(self.uri)
            client = MlflowClient(self.uri)
            if self.parent is None:
                self.experiment_id = step_tracking.experiment_of(
                    client, env.get("LLM_PIPELINE_NAME") or "llm-pipeline", self.uri)
                make = (step_tracking.new_execution_run if self.new
                        else step_tracking.execution_run)
                self.parent = make(client, self.experiment_id, self.execution_id,
                                   step_tracking.execution_tags(env, self.execution_id,
                                                                self.execution_arn))
            run_id = step_tracking.create_step_run(client, self.experiment_id, step, self.parent,
                                                   self.execution_id)
            self._made.append(run_id)
        except Exception as error:  # noqa: BLE001 (the jobs make their runs, and say why not)
            self.failed = True
            log.warning("execution %s: the steps make their MLflow runs themselves, as the server "
                        "could not (%s)", self.execution_id, " ".join(str(error).split())[:300])
            return {}
        made = {step_tracking.RUN_ID_VARIABLE: run_id,
                step_tracking.PARENT_RUN_ID_VARIABLE: self.parent,
                step_tracking.EXPERIMENT_ID_VARIABLE: self.experiment_id}
        if env.get("SM_OUTPUT_DIR"):  # the job's /opt/ml/output (pipelines/local/jobs.py)
            made[step_tracking.RUN_END_VARIABLE] = str(Path(env["SM_OUTPUT_DIR"])
                                                       / step_tracking.RUN_END_FILE)
        return made

    def job_ended(self, variables: dict[str, str], succeeded: bool) -> None:
        """The job given `variables` has ended (`succeeded` or not): log what it left for its
        run's end and end the run, in the background."""
        run_id = variables.get(step_tracking.RUN_ID_VARIABLE)
        left = variables.get(step_tracking.RUN_END_VARIABLE)
        if not run_id or not left:
            return
        thread = threading.Thread(target=self._end_run, args=(run_id, Path(left), succeeded),
                                  name=f"mlflow-end-{run_id[:8]}", daemon=True)
        self._ending.append(thread)
        thread.start()

    def wait(self) -> None:
        """Until every ended job's run is ended."""
        for thread in self._ending:
            thread.join()

    def runs(self) -> tuple[str, list[str]] | None:
        """(the execution's run, the steps' runs not ended here: their jobs never ended, or
        ending them failed) once `wait` returned, for `close_execution_run`; None when some job
        made its own run (the server could not), or none was made."""
        if self.failed or self.parent is None:
            return None
        return self.parent, [run for run in self._made if run not in self._ended]

    def _end_run(self, run_id: str, left: Path, succeeded: bool) -> None:
        """The settings and metrics the job held for its run; then FINISHED with the files it
        left when it ended well and said its stage succeeded, else FAILED (a job that failed,
        was stopped or killed, or left no file)."""
        ending = step_tracking.read_run_end(left) or {}
        if ending.get("run_id") != run_id:
            ending = {}
        succeeded = succeeded and ending.get("succeeded") is True
        files = [Path(p) for p in ending.get("artifacts", [])] if succeeded else []

        def warn(what: str, error: BaseException) -> None:
            log.warning("execution %s: MLflow run %s: %s failed (%s)", self.execution_id, run_id,
                        what, " ".join(str(error).split())[:300])

        try:
            from mlflow import MlflowClient

            run = step_tracking.StageRun(MlflowClient(self.uri), run_id, self.parent, "",
                                         keeps_execution_run=False, warn=warn)
        except Exception as error:  # noqa: BLE001 (closing the execution's run ends it FAILED)
            warn("ending the run", error)
            return
        run.log_held(ending)
        run.log_files(files)
        run.finish(succeeded)
        if run.active:  # every call succeeded
            self._ended.add(run_id)


def close_execution_run(uri: str, pipeline: str, execution_id: str, succeeded: bool,
                        package_arn: str | None,
                        runs: tuple[str, list[str]] | None = None) -> str | None:
    """End the execution's run as the execution ended, tagged with the model package it
    registered, and end as FAILED any step's run its job left RUNNING (a job killed, or one that
    failed before its stage started tracking, in a run the local server made for it). `runs`:
    the execution's run and the steps' runs that may still be RUNNING, where the caller made them
    (`StepRuns.runs`); else they are searched for by the execution's tag (reading every step's
    run with its settings and metrics). The line that says so; a failure is a warning line, never
    an exception (the execution's own outcome is what counts). None when untracked or no step
    made a run."""
    uri = tracked(uri)
    if uri is None:
        return None
    try:
        from mlflow import MlflowClient

        step_tracking.limit_retries()
        step_tracking.commit_without_sync(uri)
        client = MlflowClient(uri)
        if runs is not None:
            run_id, running = runs
        else:
            experiment = client.get_experiment_by_name(pipeline)
            if experiment is None:
                return None
            found = step_tracking.tagged_runs(client, experiment.experiment_id, execution_id)
            run = next((r for r in found if "mlflow.parentRunId" not in r.data.tags), None)
            if run is None:
                return None
            run_id = run.info.run_id
            running = [step.info.run_id for step in found
                       if step.data.tags.get("mlflow.parentRunId") == run_id
                       and step.info.status == "RUNNING"]
        for step_run in running:
            client.set_terminated(step_run, "FAILED")
        if package_arn:
            client.set_tag(run_id, step_tracking.MODEL_PACKAGE_TAG, package_arn)
        client.set_terminated(run_id, "FINISHED" if succeeded else "FAILED")
        return (f"MLflow run {run_id} (experiment {pipeline})"
                + (f" tagged with {package_arn}" if package_arn else ""))
    except Exception as error:  # noqa: BLE001 (the execution's own outcome is what counts)
        return (f"warning: could not close the MLflow run of execution {execution_id} "
                f"({' '.join(str(error).split())[:300]})")


def serve_ui(home: Path, host: str, port: int) -> int:
    """MLflow's UI on the local store (MLflow's own server: no network beyond `host`)."""
    database = local_store(home) / "mlflow.db"
    if not database.exists():
        raise UserError(f"no local MLflow store at {database}: run a recipe first "
                        "(`llm-pipeline run --recipe sft`)")
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", local_uri(home),
               "--host", host, "--port", str(port)]
    print(f"MLflow UI on http://{host}:{port} (store {database}); Ctrl-C stops it", flush=True)
    try:
        return subprocess.call(command)
    except KeyboardInterrupt:
        return 0

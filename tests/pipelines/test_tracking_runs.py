"""The local server makes a tracked execution's MLflow runs, and its jobs start with them.

The server (pipelines/tracking.py, `StepRuns`) makes each step's run as its job starts, nested in
the execution's run, and hands the job its run in its environment; the job's stage then tracks
into that run instead of finding and creating runs itself (steps/common/tracking.py), and the
server ends the execution's run. Played here with a training job of one execution, as the engine
names and configures it, against an SQLite store in a temporary folder; the runs are read back
with MLflow's own client.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pytest
import sqlalchemy
from mlflow import MlflowClient
from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

from pipelines import tracking
from steps.common import tracking as step_tracking

PIPELINE = "llm-served"
ACCOUNT = "111122223333"


@dataclass
class Settings:
    learning_rate: float = 0.001
    max_steps: int = 3


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    MlflowClient(uri).search_experiments(max_results=1)  # the first migration, once
    return uri


def job_environment(uri: str, execution: str, step: str) -> dict[str, str]:
    """The variables of a training job's environment that tracking reads (jobs.job_environment)."""
    name = f"pipelines-{execution}-{step}"
    return {"MLFLOW_TRACKING_URI": uri, "LLM_PIPELINE_NAME": PIPELINE,
            "LLM_PIPELINE_STEP": step, "LLM_PIPELINE_RECIPE": "served",
            "TRAINING_JOB_NAME": name,
            "TRAINING_JOB_ARN": f"arn:aws:sagemaker:us-east-1:{ACCOUNT}:training-job/{name}"}


def server_runs(uri: str, execution: str) -> tracking.StepRuns:
    return tracking.StepRuns(uri, execution, f"arn:aws:sagemaker:us-east-1:{ACCOUNT}:pipeline/"
                                             f"{PIPELINE}/execution/{execution}")


def a_job_given_its_run(runs: tracking.StepRuns, uri: str, execution: str, step: str,
                        tmp_path) -> tuple[dict[str, str], dict[str, str]]:
    """The environment of `step`'s job, with its /opt/ml/output, and the variables the server
    gave it (its run, and the file where it leaves its run's end)."""
    output = tmp_path / "opt_ml" / "output"
    output.mkdir(parents=True)
    env = {**job_environment(uri, execution, step), "SM_OUTPUT_DIR": str(output)}
    return env, runs.variables(env)


def become_the_job(monkeypatch, env: dict[str, str], given: dict[str, str]) -> None:
    """This process as the job's: its environment and the variables the server gave it."""
    for name, value in {**env, **given}.items():
        monkeypatch.setenv(name, value)


def a_started_job(monkeypatch, uri: str, execution: str, step: str, tmp_path):
    """The server's runs of `execution`, the variables it gave `step`'s job, and that job's run
    as its stage starts tracking, in this process as the job's."""
    runs = server_runs(uri, execution)
    env, given = a_job_given_its_run(runs, uri, execution, step, tmp_path)
    become_the_job(monkeypatch, env, given)
    return runs, given, step_tracking.start(Settings())


def runs_of(uri: str, execution: str):
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(PIPELINE)
    runs = client.search_runs([experiment.experiment_id],
                              filter_string=f"tags.`{step_tracking.EXECUTION_TAG}` = "
                                            f"'{execution}'")
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    return parents, [r for r in runs if "mlflow.parentRunId" in r.data.tags]


def test_a_job_tracks_into_the_run_the_server_made_for_its_step(monkeypatch, store):
    execution = "5e7e5e7e5e7e"
    runs = server_runs(store, execution)
    env = job_environment(store, execution, "SFT")
    given = runs.variables(env)
    become_the_job(monkeypatch, env, given)  # the job's process
    run = step_tracking.start(Settings())
    run.log_metrics({"step": 1, "train_loss": 2.5})
    step_tracking.end(True)

    parents, steps = runs_of(store, execution)
    assert run.run_id == given[step_tracking.RUN_ID_VARIABLE]
    assert [s.info.run_id for s in steps] == [run.run_id]  # the job made no run of its own
    assert parents[0].info.run_id == given[step_tracking.PARENT_RUN_ID_VARIABLE]
    assert steps[0].data.tags["mlflow.parentRunId"] == parents[0].info.run_id
    assert steps[0].data.params["learning_rate"] == "0.001"
    assert steps[0].data.metrics == {"train_loss": 2.5}
    assert steps[0].info.status == "FINISHED"
    assert parents[0].data.tags["recipe"] == "served"
    assert parents[0].data.tags[step_tracking.EXECUTION_ARN_TAG].endswith(
        f":pipeline/{PIPELINE}/execution/{execution}")
    # The execution's run is the server's to end, when the execution ends.
    assert parents[0].info.status == "RUNNING"
    tracking.close_execution_run(store, PIPELINE, execution, True, None)
    assert runs_of(store, execution)[0][0].info.status == "FINISHED"


def test_the_server_ends_a_steps_run_with_the_files_its_job_left_once_the_job_ended(
        monkeypatch, store, tmp_path):
    # Locally a job leaves its run's end to the server, which logs the job's reports and plots
    # and ends the run after the job's process has ended, while the next step runs.
    execution = "0ff10ad0ff10"
    runs = server_runs(store, execution)
    env, given = a_job_given_its_run(runs, store, execution, "Evaluate", tmp_path)
    become_the_job(monkeypatch, env, given)  # the job's process
    report = tmp_path / "report"
    report.mkdir()
    (report / "report.html").write_text("<p>report</p>")
    (report / "evaluation.json").write_text(
        '{"metrics": {"perplexity_ratio": {"value": 0.9}}}')
    (report / "eval.jsonl").write_text("{}\n")  # data, not a report
    run = step_tracking.start(Settings())
    run.log_metrics({"step": 1, "tokens_per_second": 800.0}, synchronous=False)
    step_tracking.end(True, [report])

    # The job wrote nothing to the store: it left it all to the server.
    client = MlflowClient(store)
    left = client.get_run(run.run_id)
    assert left.info.status == "RUNNING"
    assert left.data.params == {} and left.data.metrics == {}
    assert client.list_artifacts(run.run_id) == []

    runs.job_ended(given, True)
    runs.wait()

    ended = client.get_run(run.run_id)
    assert ended.info.status == "FINISHED"
    assert ended.data.params["learning_rate"] == "0.001"
    assert ended.data.metrics == {"tokens_per_second": 800.0, "perplexity_ratio": 0.9}
    assert {a.path for a in client.list_artifacts(run.run_id)} == {"report.html",
                                                                   "evaluation.json"}


@pytest.mark.parametrize("leaves", ["a success", "its start", "nothing"])
def test_the_run_of_a_job_that_failed_or_was_killed_ends_failed_when_the_job_ends(
        monkeypatch, store, tmp_path, leaves):
    # "a success": the stage succeeded, and the job failed after it (exit status 1);
    # "its start": the job was killed while its stage ran (it started tracking, never ended);
    # "nothing": the job was killed before its stage started tracking.
    execution = f"dead0b1ec7ed-{leaves.replace(' ', '-')}"
    runs = server_runs(store, execution)
    env, given = a_job_given_its_run(runs, store, execution, "SFT", tmp_path)
    if leaves != "nothing":
        become_the_job(monkeypatch, env, given)
        monkeypatch.setattr(step_tracking, "_current", None)  # the run a killed job left
        step_tracking.start(Settings())
    if leaves == "a success":
        (tmp_path / "summary.json").write_text("{}")
        step_tracking.end(True, [tmp_path])

    runs.job_ended(given, False)
    runs.wait()

    run_id = given[step_tracking.RUN_ID_VARIABLE]
    ended = MlflowClient(store).get_run(run_id)
    assert ended.info.status == "FAILED"
    assert MlflowClient(store).list_artifacts(run_id) == []
    # The settings of a stage that got as far as tracking are kept either way.
    assert ("learning_rate" in ended.data.params) == (leaves != "nothing")


def test_a_short_trainings_metrics_reach_its_run_with_its_end_and_the_job_writes_nothing(
        monkeypatch, store, tmp_path):
    # transformers' MLflowCallback reports the Trainer's logs; a training younger than
    # LIVE_AFTER_S (all of a tiny run's) holds them for the server with the step's settings: no
    # write to the store, no logging thread, nothing to wait for at the job's end.
    execution = "5407e5407e54"
    runs, given, run = a_started_job(monkeypatch, store, execution, "SFT", tmp_path)
    callback = step_tracking.trainer_callback()
    trainer_logs(callback, tmp_path, {"loss": 2.0, "learning_rate": 0.1, "epoch": 0.5},
                 {"loss": 1.5, "learning_rate": 0.05, "epoch": 1.0})
    step_tracking.end(True, [])

    left = MlflowClient(store).get_run(run.run_id)
    assert left.info.status == "RUNNING" and mlflow.active_run() is None
    assert left.data.params == {} and left.data.metrics == {}
    writes = []
    log_batch = MlflowClient.log_batch
    monkeypatch.setattr(MlflowClient, "log_batch",
                        lambda *args, **kwargs: writes.append(1) or log_batch(*args, **kwargs))
    runs.job_ended(given, True)
    runs.wait()
    assert len(writes) == 1  # its settings and metrics in one write
    ended = MlflowClient(store).get_run(run.run_id)
    assert ended.info.status == "FINISHED" and ended.data.params["max_steps"] == "3"
    assert ended.data.metrics == {"loss": 1.5, "learning_rate": 0.05, "epoch": 1.0}
    assert [(m.step, m.value) for m in MlflowClient(store).get_metric_history(
        run.run_id, "loss")] == [(1, 2.0), (2, 1.5)]


def test_a_long_trainings_run_gets_its_settings_and_metrics_from_the_job_as_it_trains(
        monkeypatch, store, tmp_path):
    # Past LIVE_AFTER_S of training the job writes them through MLflow's logging thread, so that
    # MLflow's UI shows the curves growing.
    monkeypatch.setattr(step_tracking, "LIVE_AFTER_S", 0.0)
    execution = "7a1e7a1e7a1e"
    runs, given, run = a_started_job(monkeypatch, store, execution, "SFT", tmp_path)
    callback = step_tracking.trainer_callback()
    trainer_logs(callback, tmp_path, {"loss": 2.0, "epoch": 0.5}, {"loss": 1.5, "epoch": 1.0})
    step_tracking.end(True, [])

    left = MlflowClient(store).get_run(run.run_id)
    assert left.info.status == "RUNNING" and mlflow.active_run() is None
    assert left.data.params["max_steps"] == "3"
    assert left.data.metrics == {"loss": 1.5, "epoch": 1.0}
    runs.job_ended(given, True)
    runs.wait()
    assert MlflowClient(store).get_run(run.run_id).info.status == "FINISHED"


def trainer_logs(callback, tmp_path, *logs: dict[str, float]) -> None:
    """`logs` to `callback` as a Trainer reports them, at steps 1, 2, ..."""
    from transformers import TrainerControl, TrainerState, TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path / "trainer"), report_to=[])
    state, control = TrainerState(), TrainerControl()
    callback.on_train_begin(args, state, control)
    for step, entry in enumerate(logs, 1):
        state.global_step = step
        callback.on_log(args, state, control, logs=entry)


def test_a_job_that_does_not_train_never_opens_the_store(store, tmp_path):
    # Its run's end is the server's: opening the store (MLflow's SQL store imported, the
    # database's schema checked) would be a job's process's first seconds, in a new process.
    runs = server_runs(store, "0be70be70be7")
    env, given = a_job_given_its_run(runs, store, "0be70be70be7", "Evaluate", tmp_path)
    program = ("import sys; from steps.common import tracking; from tests.steps.test_tracking "
               "import Settings; run = tracking.start(Settings()); "
               "run.log_metrics({'step': 1, 'rouge': 0.5}); tracking.end(True); "
               "print(run.run_id, 'mlflow.store.tracking.sqlalchemy_store' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", program], env={
        **os.environ, **env, **given, "PYTHONPATH": str(Path(__file__).parents[2])},
        cwd=tmp_path, capture_output=True, text=True, check=False)

    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines()[-1] == f"{given[step_tracking.RUN_ID_VARIABLE]} False"
    runs.job_ended(given, True)
    runs.wait()
    assert MlflowClient(store).get_run(given[step_tracking.RUN_ID_VARIABLE]).data.metrics == {
        "rouge": 0.5}


def test_a_training_steps_run_becomes_mlflows_active_run_without_reading_the_store(
        monkeypatch, store, tmp_path):
    # The server made it RUNNING: reading it back and setting it RUNNING again was 0.1 s a job.
    execution = "ac71fe0ac71f"
    runs, given, run = a_started_job(monkeypatch, store, execution, "SFT", tmp_path)

    def no_store(*args, **kwargs):
        raise AssertionError("the store was used")

    with monkeypatch.context() as store_closed:
        for name in ("get_run", "update_run"):
            store_closed.setattr(MlflowClient, name, no_store)
        for name in ("get_run", "update_run_info"):
            store_closed.setattr(SqlAlchemyStore, name, no_store)
        assert run.activate()
        active = mlflow.active_run()
    experiment = MlflowClient(store).get_experiment_by_name(PIPELINE)
    assert (active.info.run_id, active.info.experiment_id, active.info.status) == (
        run.run_id, experiment.experiment_id, "RUNNING")
    mlflow.log_metrics({"loss": 2.0}, step=1, synchronous=False)  # as MLflowCallback logs
    step_tracking.end(True, [])
    runs.job_ended(given, True)
    runs.wait()
    ended = MlflowClient(store).get_run(run.run_id)
    assert ended.info.status == "FINISHED" and ended.data.metrics == {"loss": 2.0}


def test_the_steps_of_one_execution_share_its_run(store):
    execution = "5ba7ed5ba7ed"
    runs = server_runs(store, execution)
    made = [runs.variables(job_environment(store, execution, step))
            for step in ("DataPrep", "SFT", "Evaluate")]

    parents, steps = runs_of(store, execution)
    assert len(parents) == 1 and len(steps) == 3
    assert {m[step_tracking.PARENT_RUN_ID_VARIABLE] for m in made} == {parents[0].info.run_id}


def test_a_new_executions_run_is_made_without_searching_the_store_and_a_retry_finds_it(
        monkeypatch, store):
    # The store's search reads every run of the execution with its settings and metrics, twice:
    # most of the time the first step waited for its run. A retry continues the execution in
    # place, in the same run.
    execution = "f1a57f1a57f1"
    arn = f"arn:aws:sagemaker:us-east-1:{ACCOUNT}:pipeline/{PIPELINE}/execution/{execution}"

    def no_search(*args, **kwargs):
        raise AssertionError("the store was searched")

    with monkeypatch.context() as unsearchable:
        unsearchable.setattr(MlflowClient, "search_runs", no_search)
        first = tracking.StepRuns(store, execution, arn, new=True).variables(
            job_environment(store, execution, "DataPrep"))
    retried = tracking.StepRuns(store, execution, arn).variables(
        job_environment(store, execution, "SFT"))

    parents, steps = runs_of(store, execution)
    assert [p.info.run_id for p in parents] == [first[step_tracking.PARENT_RUN_ID_VARIABLE]]
    assert retried[step_tracking.PARENT_RUN_ID_VARIABLE] == parents[0].info.run_id
    assert parents[0].info.status == "RUNNING" and parents[0].data.tags["recipe"] == "served"
    assert {s.info.run_name for s in steps} == {"DataPrep", "SFT"}


def test_a_step_run_its_job_left_running_ends_failed_with_the_execution(store):
    execution = "1ef7a11ed1ef"
    runs = server_runs(store, execution)
    runs.variables(job_environment(store, execution, "SFT"))  # its job failed before tracking

    tracking.close_execution_run(store, PIPELINE, execution, False, None)

    parents, steps = runs_of(store, execution)
    assert [s.info.status for s in steps] == ["FAILED"]
    assert parents[0].info.status == "FAILED"


def test_the_server_closes_an_execution_from_the_runs_it_made_without_searching_the_store(
        monkeypatch, store, tmp_path):
    # Searching reads every step's run with its settings and metrics: the server knows them.
    execution = "c105edc105ed"
    # DataPrep's job: tracked, and it ended well
    runs, given, _ = a_started_job(monkeypatch, store, execution, "DataPrep", tmp_path)
    step_tracking.end(True)
    runs.job_ended(given, True)
    never_ended = runs.variables(job_environment(store, execution, "SFT"))  # the engine failed
    runs.wait()

    def no_search(*args, **kwargs):
        raise AssertionError("the store was searched")

    monkeypatch.setattr(MlflowClient, "search_runs", no_search)
    line = tracking.close_execution_run(store, PIPELINE, execution, False, None, runs=runs.runs())
    monkeypatch.undo()

    assert line.startswith("MLflow run ")
    parents, steps = runs_of(store, execution)
    assert {s.info.run_name: s.info.status for s in steps} == {"DataPrep": "FINISHED",
                                                               "SFT": "FAILED"}
    assert never_ended[step_tracking.RUN_ID_VARIABLE] in {s.info.run_id for s in steps}
    assert parents[0].info.status == "FAILED"


def test_the_server_makes_no_run_for_a_job_tracking_elsewhere_or_not_at_all(store, tmp_path):
    execution = "e15e1e15e1e5"
    runs = server_runs(store, execution)
    elsewhere = f"sqlite:///{tmp_path / 'other.db'}"

    assert runs.variables(job_environment(elsewhere, execution, "SFT")) == {}
    assert runs.variables(job_environment("none", execution, "SFT")) == {}
    assert MlflowClient(store).get_experiment_by_name(PIPELINE) is None or \
        runs_of(store, execution) == ([], [])


def test_the_local_store_keeps_a_write_ahead_log_also_when_made_before(tmp_path):
    # One disk sync per write instead of three: what tracking costs each step's runs.
    home = tmp_path / "home"
    database = tracking.local_store(home) / "mlflow.db"
    MlflowClient(tracking.local_uri(home)).search_experiments(max_results=1)  # an older store
    assert journal_mode(database) == "delete"

    tracking.prepare_local_store(home)

    assert journal_mode(database) == "wal"
    MlflowClient(tracking.local_uri(home)).create_experiment("still-works")
    assert MlflowClient(tracking.local_uri(home)).get_experiment_by_name("still-works")


def test_a_new_local_store_keeps_a_write_ahead_log(tmp_path):
    tracking.prepare_local_store(tmp_path)

    assert journal_mode(tracking.local_store(tmp_path) / "mlflow.db") == "wal"


def test_the_server_writes_to_the_local_store_without_waiting_for_the_disk(tmp_path):
    # A sync of the disk per write was about half of what each write cost.
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    MlflowClient(uri).search_experiments(max_results=1)  # a connection pooled already
    assert synchronous(uri) == "full"

    server_runs(uri, "5y5c5y5c5y5c").variables(job_environment(uri, "5y5c5y5c5y5c", "SFT"))

    assert synchronous(uri) == "normal"


def test_a_training_job_writes_to_the_local_store_without_waiting_for_the_disk(
        monkeypatch, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    *_, run = a_started_job(monkeypatch, uri, "7e57e57e57e5", "SFT", tmp_path)
    # This process played the server too; the job's process opens the store as it was.
    engine = SqlAlchemyStore._get_or_create_engine(uri)
    sqlalchemy.event.remove(engine, "connect", step_tracking._without_sync)
    engine.dispose()
    assert synchronous(uri) == "full"

    assert run.activate()
    run.release()  # it trained for LIVE_AFTER_S: it writes its metrics itself from now on

    assert synchronous(uri) == "normal"
    step_tracking.end(True, [])


def synchronous(uri: str) -> str:
    """How the connections MLflow opens to the SQLite store at `uri` commit."""
    engine = SqlAlchemyStore._get_or_create_engine(uri)
    with engine.connect() as connection:
        level = connection.exec_driver_sql("PRAGMA synchronous").scalar()
    return {0: "off", 1: "normal", 2: "full", 3: "extra"}[level]


def test_the_local_server_keeps_mlflow_out_of_its_garbage_collectors_sight(monkeypatch):
    # Each full collection of the long-lived server went through MLflow's 240,000 objects,
    # 0.15-0.8 s holding all its threads, one every run or two of a tiny pipeline.
    import gc
    import threading

    monkeypatch.setattr(tracking, "_frozen", False)
    gc.unfreeze()
    assert any(held is vars(mlflow) for held in gc.get_objects())

    tracking.import_client_early("sqlite:///never-opened.db")  # as an execution starts
    for thread in threading.enumerate():
        if thread.name == "import-mlflow":
            thread.join()

    assert not any(held is vars(mlflow) for held in gc.get_objects())
    assert gc.get_freeze_count() > 100_000


def journal_mode(database) -> str:
    with contextlib.closing(sqlite3.connect(database)) as connection:
        return connection.execute("PRAGMA journal_mode").fetchone()[0]


def test_the_server_finds_a_tracking_server_that_does_not_answer_and_only_that(tmp_path):
    import http.server
    import socket
    import threading

    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        refused = f"http://127.0.0.1:{closed.getsockname()[1]}"
    assert tracking.unreachable(refused) == "Connection refused"

    # Any HTTP answer is an answer (this server has no /health: a 404).
    answering = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    threading.Thread(target=answering.serve_forever, kwargs={"poll_interval": 0.05},  # shutdown()
                     daemon=True).start()
    try:
        assert tracking.unreachable(f"http://127.0.0.1:{answering.server_address[1]}") is None
    finally:
        answering.shutdown()
    # Stores MLflow opens itself, and tracking off, are the steps' to find out.
    for uri in (f"sqlite:///{tmp_path / 'mlflow.db'}", "none", "", None):
        assert tracking.unreachable(uri) is None


def test_a_job_told_its_tracking_server_does_not_answer_goes_on_untracked_at_once(
        monkeypatch, capsys):
    # 127.0.0.1:9 (discard) refuses; told by the server, the job does not try it (no retries).
    env = job_environment("http://127.0.0.1:9", "0ff0ff0ff0ff", "SFT")
    become_the_job(monkeypatch, env, {step_tracking.OFF_VARIABLE: "it refused (test)"})
    monkeypatch.setattr(step_tracking, "open_step_run", lambda *a: pytest.fail("tried the server"))

    assert step_tracking.start(Settings()) is None
    line = capsys.readouterr().err.strip()
    assert line == ("warning: MLflow tracking off for this step: reaching the tracking store "
                    "http://127.0.0.1:9 failed (it refused (test)); the step goes on, and its "
                    "metrics are still in its log and metrics.jsonl")

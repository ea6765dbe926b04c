"""A stage's MLflow run, seen from inside its job: nested in its execution's run, found by the
job's name, its settings as params (never a secret's value), failures marked on both runs.

Each test plays training jobs of one execution as SageMaker names them
(`pipelines-<execution id>-<step>-...`, TRAINING_JOB_NAME and TRAINING_JOB_ARN) against an SQLite
store in a temporary folder, and reads the runs back with MLflow's own client.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from mlflow import MlflowClient

from steps.common import tracking

EXECUTION = "0a1b2c3d4e5f"


@dataclass
class Settings:
    learning_rate: float = 0.001
    max_steps: int = 3
    hub_token: str = "hf_NotARealTokenButItMustNotBeLogged"


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    MlflowClient(uri).search_experiments(max_results=1)  # the first migration, once
    return uri


def job(monkeypatch, uri: str, step: str, execution: str = EXECUTION) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("LLM_PIPELINE_NAME", "llm-unit")
    monkeypatch.setenv("LLM_PIPELINE_STEP", step)
    monkeypatch.setenv("LLM_PIPELINE_RECIPE", "unit")
    name = f"pipelines-{execution}-{step}"
    monkeypatch.setenv("TRAINING_JOB_NAME", name)
    monkeypatch.setenv("TRAINING_JOB_ARN",
                       f"arn:aws:sagemaker:us-east-1:111122223333:training-job/{name.lower()}")


def runs_of(uri: str, execution: str):
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("llm-unit")
    runs = client.search_runs([experiment.experiment_id],
                              filter_string=f"tags.`{tracking.EXECUTION_TAG}` = '{execution}'")
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    return parents, {r.info.run_name: r for r in runs if "mlflow.parentRunId" in r.data.tags}


def test_steps_of_one_execution_nest_in_one_run_found_by_the_job_name(monkeypatch, store):
    for step in ("DataPrep", "SFT"):
        job(monkeypatch, store, step)
        run = tracking.start(Settings())
        run.log_metrics({"step": 1, "train_loss": 2.5, "epoch": 0.5})
        tracking.end(True)

    parents, steps = runs_of(store, EXECUTION)
    assert len(parents) == 1 and set(steps) == {"DataPrep", "SFT"}
    assert {r.data.tags["mlflow.parentRunId"] for r in steps.values()} == {parents[0].info.run_id}
    assert parents[0].data.tags[tracking.EXECUTION_ARN_TAG] == (
        f"arn:aws:sagemaker:us-east-1:111122223333:pipeline/llm-unit/execution/{EXECUTION}")
    assert parents[0].info.status == "FINISHED"
    sft = steps["SFT"]
    assert sft.data.params["learning_rate"] == "0.001" and sft.data.metrics == {"train_loss": 2.5}


def test_a_secret_looking_setting_is_never_logged(monkeypatch, store):
    job(monkeypatch, store, "SFT", execution="5e5e5e5e5e5e")
    tracking.start(Settings())
    tracking.end(True)

    sft = runs_of(store, "5e5e5e5e5e5e")[1]["SFT"]
    assert "hub_token" not in sft.data.params and "max_steps" in sft.data.params


def test_a_training_step_on_its_own_writes_the_trainers_metrics_as_it_trains(monkeypatch, store,
                                                                             tmp_path):
    # As on SageMaker, where no local server ends the run: transformers' MLflowCallback reports
    # into the step's run through MLflow's logging thread, flushed as the run ends.
    from transformers import TrainerControl, TrainerState, TrainingArguments

    job(monkeypatch, store, "SFT", execution="7a1ee07a1ee0")
    run = tracking.start(Settings())
    callback = tracking.trainer_callback()
    args = TrainingArguments(output_dir=str(tmp_path / "trainer"), report_to=[])
    state, control = TrainerState(), TrainerControl()
    callback.on_train_begin(args, state, control)
    for step, loss in enumerate((2.0, 1.5), 1):
        state.global_step = step
        callback.on_log(args, state, control, logs={"loss": loss, "epoch": step / 2})
    tracking.end(True)

    sft = runs_of(store, "7a1ee07a1ee0")[1]["SFT"]
    assert sft.info.run_id == run.run_id and sft.info.status == "FINISHED"
    assert sft.data.metrics == {"loss": 1.5, "epoch": 1.0} and "max_steps" in sft.data.params
    assert [(m.step, m.value) for m in MlflowClient(store).get_metric_history(
        run.run_id, "loss")] == [(1, 2.0), (2, 1.5)]


def test_a_failed_step_fails_the_execution_run_and_a_later_step_does_not_clear_it(
        monkeypatch, store):
    job(monkeypatch, store, "SFT", execution="fa11edfa11ed")
    tracking.start(Settings())
    tracking.end(False)
    job(monkeypatch, store, "Evaluate", execution="fa11edfa11ed")
    tracking.start(Settings())
    tracking.end(True)

    parents, steps = runs_of(store, "fa11edfa11ed")
    assert steps["SFT"].info.status == "FAILED" and steps["Evaluate"].info.status == "FINISHED"
    assert parents[0].info.status == "FAILED"


def test_tracking_off_or_unusable_leaves_the_stage_untracked_with_one_line(monkeypatch, capsys,
                                                                           tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "none")
    assert tracking.start(Settings()) is None

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "nosuchscheme://nowhere")
    assert tracking.start(Settings()) is None
    tracking.end(True, [tmp_path])  # nothing to end: no error
    lines = [line for line in capsys.readouterr().err.splitlines() if "MLflow" in line]
    assert len(lines) == 1 and "tracking off for this step" in lines[0]


def test_a_step_starts_tracking_without_setting_up_mlflows_tracing(store, tmp_path):
    # MLflow and transformers' MLflowCallback read the job's MLFLOW_TRACKING_URI themselves;
    # setting it again resets MLflow's tracing, which imports opentelemetry's SDK (0.07 s a job).
    # In a process of its own, as a job is.
    program = ("import sys; from steps.common import tracking; from tests.steps.test_tracking "
               "import Settings; assert tracking.start(Settings()) is not None; "
               "tracking.end(True); print('opentelemetry.sdk.metrics' in sys.modules)")
    env = {**os.environ, "MLFLOW_TRACKING_URI": store, "LLM_PIPELINE_NAME": "llm-unit",
           "LLM_PIPELINE_STEP": "Own", "PYTHONPATH": str(Path(__file__).parents[2])}
    done = subprocess.run([sys.executable, "-c", program], env=env, cwd=tmp_path,
                          capture_output=True, text=True, check=False)

    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines()[-1] == "False"

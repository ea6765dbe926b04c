"""Every execution is tracked in MLflow: one run per execution, one nested run per step.

A tiny SFT recipe runs through the local engine with tracking at its default (the local SQLite
store under the engine's home); the runs are read back with MLflow's own client. A second run
points tracking at a server that does not answer: the run still succeeds and registers, its steps
told by the server that tracking is off.
"""

from __future__ import annotations

import json

import pytest
from mlflow import MlflowClient

from pipelines import tracking
from tests.pipelines.conftest import clean_env, cli

pytestmark = pytest.mark.e2e

RECIPE = """\
name: tracked
model_package_group: tracked
parameters:
  BaseModel: builtin:tiny
  LearningRate: 0.005
stages:
  data_prep:
    tokenizer: $BaseModel
  sft:
    base_model: $BaseModel
    learning_rate: $LearningRate
    max_steps: 3
    per_device_batch_size: 2
    logging_steps: 1
    checkpoint_steps: 0
  evaluate:
    base_model: $BaseModel
    max_samples: 2
    max_new_tokens: 4
gate:
  metric: perplexity_ratio
"""


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tracked-inputs")
    (folder / "recipe.yaml").write_text(RECIPE)
    (folder / "train.jsonl").write_text("".join(
        json.dumps({"prompt": f"What is {a} + {b}?", "completion": f"{a + b}"}) + "\n"
        for a in range(4) for b in range(3)))
    return folder


def run(env, inputs, *extra):
    return cli(env, "run", "--recipe", str(inputs / "recipe.yaml"),
               "-p", f"InputData={inputs / 'train.jsonl'}", "-p", "EvalThreshold=0", *extra)


@pytest.fixture(scope="module")
def tracked(local_home, inputs):
    """One execution tracked in the local store: (its output, its execution id, the client)."""
    result = run(clean_env(local_home), inputs)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    execution_id = result.stdout.split("started ", 1)[1].split()[0].rsplit("/", 1)[1]
    return result, execution_id, MlflowClient(tracking.local_uri(local_home))


def execution_runs(client, execution_id):
    experiment = client.get_experiment_by_name("llm-tracked")
    runs = client.search_runs([experiment.experiment_id],
                              filter_string=f"tags.`sagemaker.pipeline_execution_id` = "
                                            f"'{execution_id}'")
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    steps = {r.info.run_name: r for r in runs if "mlflow.parentRunId" in r.data.tags}
    return parents, steps


def artifacts(client, run):
    return {entry.path for entry in client.list_artifacts(run.info.run_id)}


def test_an_execution_is_one_run_with_a_nested_run_per_step(tracked):
    _, execution_id, client = tracked
    parents, steps = execution_runs(client, execution_id)

    assert len(parents) == 1
    parent = parents[0]
    assert set(steps) == {"DataPrep", "SFT", "Evaluate", "CompareWithApproved"}
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in steps.values())
    assert all(r.info.status == "FINISHED" for r in [parent, *steps.values()])
    assert parent.data.tags["recipe"] == "tracked"
    assert parent.data.tags["sagemaker.pipeline_execution_arn"].endswith(
        f":pipeline/llm-tracked/execution/{execution_id}")
    assert len(parent.data.tags["code_version"]) >= 12


def test_a_training_step_has_its_settings_metric_histories_and_plots(tracked):
    _, execution_id, client = tracked
    sft = execution_runs(client, execution_id)[1]["SFT"]

    assert sft.data.params["max_steps"] == "3" and sft.data.params["learning_rate"] == "0.005"
    assert sft.data.params["base_model"] == "builtin:tiny"
    run_id = sft.info.run_id
    loss = client.get_metric_history(run_id, "loss")
    assert [m.step for m in loss] == [1, 2, 3] and all(m.value > 0 for m in loss)
    assert len(client.get_metric_history(run_id, "learning_rate")) == 3
    assert len(client.get_metric_history(run_id, "grad_norm")) == 3
    assert [m.step for m in client.get_metric_history(run_id, "tokens_per_second")] == [1, 2, 3]
    assert {"loss_curve.png", "metrics.jsonl", "training_summary.json",
            "lineage.json"} <= artifacts(client, sft)
    assert not any(name.endswith(".safetensors") for name in artifacts(client, sft))


def test_evaluation_logs_its_metrics_report_and_model_card(tracked):
    _, execution_id, client = tracked
    evaluate = execution_runs(client, execution_id)[1]["Evaluate"]

    assert {"evaluation.json", "report.html", "model_card.md",
            "metrics_comparison.png"} <= artifacts(client, evaluate)
    assert evaluate.data.metrics["perplexity_ratio"] > 0


def test_the_registered_package_and_the_run_name_each_other(tracked, local_home):
    _, execution_id, client = tracked
    parent = execution_runs(client, execution_id)[0][0]
    packages = json.loads(cli(clean_env(local_home), "registry", "list", "--group", "tracked",
                              "--json").stdout)
    package = next(p for p in packages if p["metadata"]["pipeline_execution"] == execution_id)

    assert package["metadata"]["mlflow_run_id"] == parent.info.run_id
    assert package["metadata"]["mlflow_experiment"] == "llm-tracked"
    assert client.get_run(parent.info.run_id).data.tags[
        "sagemaker.model_package_arn"] == package["arn"]


def test_an_unreachable_tracking_server_does_not_fail_the_run(tracked, local_home, inputs):
    result = run(clean_env(local_home), inputs, "-p", "MlflowTrackingUri=http://127.0.0.1:9")

    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Registered model package" in result.stdout
    home_logs = [p.read_text() for p in (local_home / "executions" / "llm-tracked").rglob("log.txt")]
    warned = [log for log in home_logs if "MLflow tracking off for this step" in log]
    assert len(warned) >= 4  # each step of the second execution said so, in one line
    # The server asked the tracking server once and told each job, which did not spend MLflow's
    # retries on it (seconds a job) before saying so; the command says so once.
    assert all("the local server found it does not answer: Connection refused" in log
               for log in warned)
    assert result.stderr.count("warning: MLflow tracking off for execution ") == 1
    assert "does not answer (Connection refused)" in result.stderr

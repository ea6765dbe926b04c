"""A recipe executed by the local endpoint, as SageMaker would execute it: statuses, step metadata,
the jobs it ran, a failed execution retried in place, a stopped one, and a server that ends while
an execution runs; and `llm-pipeline start --wait`, whose exit status says how it ended.

One small sft pipeline (builtin:tiny, a few training steps) is upserted once; its executions are
started with boto3, as CI or the console would start them, or with `start`. Every answer of the
local service is checked against botocore's output shapes (`strict_client`).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pytest

from pipelines.definition import DEFAULT_BUCKET
from tests.pipelines.conftest import ROOT, clean_env, cli
from tests.pipelines.output_shapes import strict_client
from tests.pipelines.test_cache import write_sums

pytestmark = pytest.mark.e2e

PIPELINE = "llm-endpoint-test"
RECIPE = """\
name: endpoint-test
model_package_group: endpoint-test
parameters:
  BaseModel: builtin:tiny
  LearningRate: 0.005
  MaxSteps: 3
stages:
  data_prep:
    tokenizer: $BaseModel
  sft:
    base_model: $BaseModel
    learning_rate: $LearningRate
    max_steps: $MaxSteps
    per_device_batch_size: 4
    logging_steps: 1
    checkpoint_steps: 0
  evaluate:
    base_model: $BaseModel
    max_samples: 0
gate:
  metric: perplexity_ratio
"""
JOB_STEPS = {"DataPrep": "ProcessingJob", "SFT": "TrainingJob", "Evaluate": "ProcessingJob",
             "CompareWithApproved": "ProcessingJob"}


@pytest.fixture(scope="module")
def env(local_home):
    return clean_env(local_home)


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("endpoint-test") / "recipe.yaml"
    path.write_text(RECIPE)
    return path


@pytest.fixture(scope="module")
def endpoint(env, recipe):
    """The module's server with the pipeline upserted and the data in its bucket."""
    url = cli(env, "server", "start").stdout.strip()
    folder = recipe.parent
    upserted = cli(env, "upsert", "--recipe", str(recipe))
    assert upserted.returncode == 0, upserted.stderr
    s3 = boto3.client("s3", endpoint_url=url, region_name="us-east-1",
                      aws_access_key_id="local", aws_secret_access_key="local")
    s3.upload_file(str(write_sums(folder)), DEFAULT_BUCKET, "inputs/endpoint-test/sums.jsonl")
    return url, strict_client(url), s3


DATA = f"s3://{DEFAULT_BUCKET}/inputs/endpoint-test/sums.jsonl"


def start(sagemaker, **parameters) -> str:
    parameters = {"InputData": DATA, "EvalThreshold": 0, **parameters}
    return sagemaker.start_pipeline_execution(
        PipelineName=PIPELINE,
        PipelineParameters=[{"Name": k, "Value": str(v)} for k, v in parameters.items()],
    )["PipelineExecutionArn"]


def watch(sagemaker, arn: str, until=lambda described, steps: False, timeout: float = 600):
    """Poll the execution until it ends (or `until` holds); the statuses it went through."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while True:
        described = sagemaker.describe_pipeline_execution(PipelineExecutionArn=arn)
        status = described["PipelineExecutionStatus"]
        if not seen or seen[-1] != status:
            seen.append(status)
        if status not in ("Executing", "Stopping") or until(described, steps(sagemaker, arn)):
            return seen
        assert time.monotonic() < deadline, f"{arn}: still {status} after {timeout}s"
        time.sleep(0.5)


def steps(sagemaker, arn: str) -> dict[str, dict]:
    listed = sagemaker.list_pipeline_execution_steps(PipelineExecutionArn=arn)
    return {s["StepName"]: s for s in listed["PipelineExecutionSteps"]}


def job_name(step: dict) -> str:
    """The step's job, as its ARN names it (in lower case, as SageMaker's ARNs do)."""
    kind = "TrainingJob" if "TrainingJob" in step["Metadata"] else "ProcessingJob"
    return step["Metadata"][kind]["Arn"].rsplit("/", 1)[-1]


def job_processes(folder: Path) -> list[int]:
    """The processes working in `folder` (a job's working directory) or below it."""
    found = []
    for cwd in Path("/proc").glob("[0-9]*/cwd"):
        try:
            if Path(os.readlink(cwd)).is_relative_to(folder):
                found.append(int(cwd.parent.name))
        except OSError:
            continue
    return found


def sft_training(local_home: Path, arn: str):
    """`until` for `watch`: SFT's job has started training (its process is up)."""
    folder = local_home / "executions" / PIPELINE / arn.rsplit("/", 1)[-1] / "SFT"

    def training(described, listed) -> bool:
        log = folder / "log.txt"
        return listed.get("SFT", {}).get("StepStatus") == "Executing" and log.is_file() \
            and "loss" in log.read_text() and bool(job_processes(folder))
    return training, folder


@pytest.fixture(scope="module")
def succeeded(endpoint):
    _, sagemaker, _ = endpoint
    arn = start(sagemaker)
    return arn, watch(sagemaker, arn)


def test_an_execution_goes_from_executing_to_succeeded_and_lists_each_step_it_ran(
        endpoint, succeeded):
    _, sagemaker, _ = endpoint
    arn, seen = succeeded
    assert seen == ["Executing", "Succeeded"]
    ran = steps(sagemaker, arn)
    assert set(ran) == {*JOB_STEPS, "EvaluationGate", "Register"}  # not EvaluationGateFailed
    assert {s["StepStatus"] for s in ran.values()} == {"Succeeded"}
    for name, kind in JOB_STEPS.items():
        assert ran[name]["Metadata"][kind]["Arn"].startswith(
            f"arn:aws:sagemaker:us-east-1:123456789012:{kind[:-3].lower()}-job/pipelines-")
        assert ran[name]["AttemptCount"] == 1
    assert ran["EvaluationGate"]["Metadata"] == {"Condition": {"Outcome": "True"}}
    package = sagemaker.describe_model_package(
        ModelPackageName=ran["Register"]["Metadata"]["RegisterModel"]["Arn"])
    assert package["ModelApprovalStatus"] == "PendingManualApproval"
    assert package["CustomerMetadataProperties"]["pipeline_execution"] == arn.rsplit("/", 1)[-1]


def test_the_jobs_of_an_execution_are_described_as_sagemaker_describes_them(endpoint, succeeded):
    _, sagemaker, s3 = endpoint
    arn, _ = succeeded
    ran = steps(sagemaker, arn)
    training = sagemaker.describe_training_job(TrainingJobName=job_name(ran["SFT"]))
    assert training["TrainingJobStatus"] == "Completed"
    assert training["TrainingJobArn"] == ran["SFT"]["Metadata"]["TrainingJob"]["Arn"]
    assert training["BillableTimeInSeconds"] >= 1
    assert "train_loss" in {m["MetricName"] for m in training["FinalMetricDataList"]}
    model = training["ModelArtifacts"]["S3ModelArtifacts"]
    bucket, _, key = model[5:].partition("/")
    assert s3.head_object(Bucket=bucket, Key=key)["ContentLength"] > 0

    prep = sagemaker.describe_processing_job(ProcessingJobName=job_name(ran["DataPrep"]))
    assert prep["ProcessingJobStatus"] == "Completed"
    assert prep["ProcessingEndTime"] > prep["ProcessingStartTime"]
    output = prep["ProcessingOutputConfig"]["Outputs"][0]["S3Output"]["S3Uri"]
    bucket, _, prefix = output[5:].partition("/")
    assert s3.list_objects_v2(Bucket=bucket, Prefix=prefix)["KeyCount"] > 0

    execution_id = arn.rsplit("/", 1)[-1]
    listed = sagemaker.list_processing_jobs(NameContains=execution_id)["ProcessingJobSummaries"]
    assert {job["ProcessingJobName"].lower() for job in listed} == {
        job_name(ran[name]) for name in ("DataPrep", "Evaluate", "CompareWithApproved")}
    assert [job["TrainingJobName"].lower() for job in sagemaker.list_training_jobs(
        NameContains=execution_id)["TrainingJobSummaries"]] == [job_name(ran["SFT"])]


def test_a_failed_execution_retried_after_its_cause_is_fixed_succeeds_under_the_same_arn(
        endpoint):
    """The data it names arrives late: DataPrep fails; once the data is there, the execution
    is retried in place and DataPrep runs again as a new job."""
    _, sagemaker, s3 = endpoint
    late = f"s3://{DEFAULT_BUCKET}/inputs/endpoint-test-late/"
    arn = start(sagemaker, InputData=late)
    assert watch(sagemaker, arn) == ["Executing", "Failed"]
    failed = steps(sagemaker, arn)
    assert set(failed) == {"DataPrep"}  # nothing after it started
    assert failed["DataPrep"]["StepStatus"] == "Failed"
    assert f"no S3 objects under {late}" in failed["DataPrep"]["FailureReason"]
    assert "DataPrep" in sagemaker.describe_pipeline_execution(
        PipelineExecutionArn=arn)["FailureReason"]

    s3.copy_object(Bucket=DEFAULT_BUCKET, Key="inputs/endpoint-test-late/sums.jsonl",
                   CopySource={"Bucket": DEFAULT_BUCKET, "Key": "inputs/endpoint-test/sums.jsonl"})
    assert sagemaker.retry_pipeline_execution(PipelineExecutionArn=arn)[
        "PipelineExecutionArn"] == arn
    assert watch(sagemaker, arn)[-1] == "Succeeded"
    retried = steps(sagemaker, arn)
    assert retried["DataPrep"]["AttemptCount"] == 2 and retried["Register"]["StepStatus"] == \
        "Succeeded"
    # Each attempt was a job of its own, which keeps its own outcome.
    assert job_name(retried["DataPrep"]) == job_name(failed["DataPrep"]) + "-2"
    assert sagemaker.describe_processing_job(ProcessingJobName=job_name(failed["DataPrep"]))[
        "ProcessingJobStatus"] == "Failed"
    assert sagemaker.describe_processing_job(ProcessingJobName=job_name(retried["DataPrep"]))[
        "ProcessingJobStatus"] == "Completed"


def test_start_wait_of_a_bad_dataset_exits_non_zero_naming_the_step_and_its_reason(
        env, endpoint, recipe, tmp_path):
    bad = tmp_path / "bad.jsonl"  # a local file: `start` uploads it, as `run` does
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c", "completion": 5}\n')
    result = cli(env, "start", "--recipe", str(recipe), "--wait", "-p", f"InputData={bad}",
                 "--poll-seconds", "0.5")
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("ERROR: execution ") and " failed: step DataPrep failed: " in last
    assert "bad.jsonl:2: field 'completion': expected a string, got a number" in last
    assert "DataPrep (Processing) started" in result.stdout  # the steps were shown as they ran


def test_stopping_an_execution_stops_its_running_job_and_start_wait_says_stopped(
        env, endpoint, recipe, local_home):
    _, sagemaker, _ = endpoint
    waiting = subprocess.Popen(
        [sys.executable, "-m", "pipelines.cli", "start", "--recipe", str(recipe), "--wait",
         "--poll-seconds", "0.5", "-p", f"InputData={DATA}", "-p", "MaxSteps=100000"],
        env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert waiting.stdout is not None
    arn = waiting.stdout.readline().split("started ", 1)[1].strip()
    training, folder = sft_training(local_home, arn)
    watch(sagemaker, arn, until=training)
    assert job_processes(folder)

    sagemaker.stop_pipeline_execution(PipelineExecutionArn=arn)
    assert watch(sagemaker, arn, timeout=60)[-1] == "Stopped"
    stopped = steps(sagemaker, arn)
    assert stopped["SFT"]["StepStatus"] == "Stopped" and "Evaluate" not in stopped
    assert job_processes(folder) == []  # the job and everything it started are gone
    assert sagemaker.describe_training_job(TrainingJobName=job_name(stopped["SFT"]))[
        "TrainingJobStatus"] == "Stopped"

    _, stderr = waiting.communicate(timeout=120)
    assert waiting.returncode == 1
    assert stderr.strip().splitlines()[-1] == (
        f"ERROR: execution {arn.rsplit('/', 1)[-1]} stopped: stopped while SFT ran")


def test_an_execution_running_when_its_server_ends_is_failed_saying_so(endpoint, env, local_home):
    _, sagemaker, _ = endpoint
    arn = start(sagemaker, MaxSteps=100000, LearningRate=0.004)
    training, folder = sft_training(local_home, arn)
    watch(sagemaker, arn, until=training)

    assert cli(env, "server", "stop").returncode == 0
    deadline = time.monotonic() + 30
    while job_processes(folder) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert job_processes(folder) == []
    restarted = strict_client(cli(env, "server", "start").stdout.strip())
    described = restarted.describe_pipeline_execution(PipelineExecutionArn=arn)
    assert described["PipelineExecutionStatus"] == "Failed"
    assert "the local server was stopped while this execution ran" in described["FailureReason"]
    assert steps(restarted, arn)["SFT"]["StepStatus"] == "Failed"
    # the pipeline is still there, and so is what the earlier executions recorded
    assert restarted.describe_pipeline(PipelineName=PIPELINE)["PipelineName"] == PIPELINE
    assert len(restarted.list_pipeline_executions(PipelineName=PIPELINE, MaxResults=100)[
        "PipelineExecutionSummaries"]) == 5

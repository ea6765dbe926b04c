"""The container contract as the local engine maps it: /opt/ml paths, staging, upload on success,
the environment SageMaker gives a container, and a failed job's reason where SageMaker reads it."""

import json
import sys
import time

import boto3
import pytest
from moto import mock_aws

from pipelines.local import jobs
from pipelines.local.engine import failure_cause
from pipelines.local.jobs import run_processing_job, run_training_job

IMAGE = "123456789012.dkr.ecr.us-east-1.amazonaws.com/llm-lifecycle-processing:test"
TRAINING_IMAGE = "123456789012.dkr.ecr.us-east-1.amazonaws.com/llm-lifecycle-training:test"
ROLE = "arn:aws:iam::123456789012:role/llm-pipeline-execution"


def request(input_uri: str) -> dict:
    return {
        "AppSpecification": {
            "ImageUri": IMAGE, "ContainerEntrypoint": ["python", "-m", "steps.data_prep"],
            "ContainerArguments": ["--input-dir", "/opt/ml/processing/input/raw",
                                   "--output-dir", "/opt/ml/processing/output"]},
        "ProcessingInputs": [{"InputName": "raw", "S3Input": {
            "S3Uri": input_uri, "LocalPath": "/opt/ml/processing/input/raw",
            "S3DataType": "S3Prefix", "S3InputMode": "File"}}],
        "ProcessingOutputConfig": {"Outputs": [{"OutputName": "data", "S3Output": {
            "S3Uri": "s3://bucket/out/data", "LocalPath": "/opt/ml/processing/output",
            "S3UploadMode": "EndOfJob"}}]},
        "RoleArn": ROLE,
    }


def training_request(**hyperparameters: str) -> dict:
    return {
        "AlgorithmSpecification": {"TrainingImage": TRAINING_IMAGE, "TrainingInputMode": "File",
                                   "ContainerEntrypoint": ["python", "-m", "steps.sft"]},
        "HyperParameters": hyperparameters,
        "InputDataConfig": [{"ChannelName": "validation", "DataSource": {"S3DataSource": {
            "S3DataType": "S3Prefix", "S3Uri": "s3://bucket/in"}}}],
        "OutputDataConfig": {"S3OutputPath": "s3://bucket/models"},
        "ResourceConfig": {"InstanceType": "ml.m5.xlarge", "InstanceCount": 1,
                           "VolumeSizeInGB": 30},
        "RoleArn": ROLE,
    }


@pytest.fixture
def s3(monkeypatch):
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    with mock_aws():
        client = boto3.client("s3")
        client.create_bucket(Bucket="bucket")
        yield client


def keys(s3, prefix):
    return sorted(o["Key"] for o in s3.list_objects_v2(Bucket="bucket", Prefix=prefix).get("Contents", []))


def test_processing_job_stages_inputs_rewrites_paths_and_uploads_outputs(s3, tmp_path, forked):
    records = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(10)]
    s3.put_object(Bucket="bucket", Key="in/data.jsonl",
                  Body="".join(json.dumps(r) + "\n" for r in records))
    lines = []
    result = run_processing_job(s3, request("s3://bucket/in"), "job-1", tmp_path, lines.append,
                                forked)
    assert result.succeeded, result.failure_reason
    # /opt/ml was mapped to the job's own tree, the input staged under its LocalPath
    assert (tmp_path / "opt_ml/processing/input/raw/data.jsonl").is_file()
    assert keys(s3, "out/data/") == ["out/data/manifest.json", "out/data/train.jsonl",
                                     "out/data/validation.jsonl"]
    assert result.description["ProcessingJobStatus"] == "Completed"
    assert (tmp_path / "log.txt").read_text() and lines


def test_failed_processing_job_uploads_nothing_and_reports_the_error_line(s3, tmp_path, forked):
    s3.put_object(Bucket="bucket", Key="in/data.jsonl", Body='{"prompt": "q", "completion": 5}\n')
    result = run_processing_job(s3, request("s3://bucket/in"), "job-2", tmp_path, lambda _: None,
                                forked)
    assert not result.succeeded
    assert "data.jsonl:1" in result.failure_reason
    assert keys(s3, "out/") == []


def test_a_failed_processing_job_reports_the_message_it_left_where_sagemaker_reads_it(s3, tmp_path, forked):
    # SageMaker returns a processing job's /opt/ml/output/message as its ExitMessage.
    s3.put_object(Bucket="bucket", Key="in/data.jsonl", Body='{"prompt": "q", "completion": 5}\n')
    result = run_processing_job(s3, request("s3://bucket/in"), "job-4", tmp_path, lambda _: None,
                                forked)

    message = (tmp_path / "opt_ml/output/message").read_text()
    assert message.startswith("ERROR: ") and "data.jsonl:1" in message
    assert result.description["ExitMessage"] == message
    assert result.failure_reason == result.description["FailureReason"] == \
        f"exit code 2: {message.removeprefix('ERROR: ')}"


def test_a_failed_training_job_reports_the_failure_it_left_where_sagemaker_reads_it(s3, tmp_path, forked):
    s3.put_object(Bucket="bucket", Key="in/data.jsonl", Body='{"prompt": "q", "completion": "a"}\n')
    # No train channel: the stage refuses to start.
    result = run_training_job(s3, training_request(base_model="builtin:tiny"), "job-5", tmp_path,
                              lambda _: None, forked)

    failure = (tmp_path / "opt_ml/output/failure").read_text()
    assert failure.startswith("ERROR: input channel 'train' is missing")
    assert result.failure_reason == result.description["FailureReason"] == \
        f"exit code 2: {failure.removeprefix('ERROR: ')}"
    assert keys(s3, "models/") == []


# A job that shows its environment: it writes it where its output is uploaded from.
SHOW_ENVIRONMENT = """
import json, os, sys
path = os.path.join(sys.argv[-1], "environment.json")
os.makedirs(sys.argv[-1], exist_ok=True)
open(path, "w").write(json.dumps(dict(os.environ)))
"""


@pytest.fixture
def environment_shown(monkeypatch):
    """Runs the jobs' processes as SHOW_ENVIRONMENT instead of their stage (the stage is not what
    these tests are about); the environment and the way the process starts are the engine's."""
    monkeypatch.setattr(jobs, "_command", lambda image, entrypoint, arguments: [
        sys.executable, "-c", SHOW_ENVIRONMENT, *arguments])


def test_a_job_sees_what_sagemaker_gives_a_container_and_nothing_of_the_engines_shell(
        s3, tmp_path, monkeypatch, environment_shown):
    monkeypatch.setenv("LLM_PIPELINE_PLANTED", "1")
    # Planted after the engine's clients exist (in us-east-1): a shell's default, not the job's.
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-west-2")
    monkeypatch.setenv("HF_TOKEN", "hf_PlantedTokenOfTheDeveloperAbCdEf")
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # this machine's: the threads a job computes on
    s3.put_object(Bucket="bucket", Key="in/data.jsonl", Body="{}\n")
    with_env = {**request("s3://bucket/in"), "Environment": {"STAGE_SETTING": "from the request"}}

    result = run_processing_job(s3, with_env, "job-6", tmp_path, lambda _: None)

    assert result.succeeded, result.failure_reason
    env = json.loads((tmp_path / "opt_ml/processing/output/environment.json").read_text())
    assert "LLM_PIPELINE_PLANTED" not in env and "HF_TOKEN" not in env
    assert "AWS_DEFAULT_REGION" not in env
    assert env["AWS_REGION"] == "us-east-1"  # the region of the engine's clients, as AWS_REGION
    assert env["STAGE_SETTING"] == "from the request"
    assert env["PYTHONUNBUFFERED"] == "1"  # the image's ENV (containers/processing/Dockerfile)
    assert env["SM_OUTPUT_DIR"] == str(tmp_path / "opt_ml/output")
    assert env["OMP_NUM_THREADS"] == "3"
    config = json.loads((tmp_path / "opt_ml/config/processingjobconfig.json").read_text())
    assert config["ProcessingJobArn"] == result.description["ProcessingJobArn"] == \
        "arn:aws:sagemaker:us-east-1:123456789012:processing-job/job-6"
    assert config["Environment"] == {"STAGE_SETTING": "from the request"}
    assert json.loads((tmp_path / "opt_ml/config/resourceconfig.json").read_text())["hosts"]
    # Nothing else of the engine's environment, and nothing but the documented local stand-ins.
    local = {"SM_OUTPUT_DIR", "PATH", "HOME", "LLM_PIPELINE_CACHE", "LLM_PIPELINE_NATIVE_BF16",
             "OMP_NUM_THREADS", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
             "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"}
    image = set(jobs.image_environment("llm-lifecycle-processing"))
    python = {"LC_CTYPE"}  # set by the interpreter in the C locale (PEP 538), as in a container
    assert set(env) - local - image - python - {"AWS_REGION", "STAGE_SETTING"} == set(), env


def test_a_training_job_gets_its_name_arn_and_channels_but_no_shell_variables(
        s3, tmp_path, monkeypatch, environment_shown):
    monkeypatch.setenv("LLM_PIPELINE_PLANTED", "1")
    s3.put_object(Bucket="bucket", Key="in/data.jsonl", Body="{}\n")
    train = training_request(max_steps="1")
    train["AlgorithmSpecification"]["ContainerArguments"] = [str(tmp_path / "shown")]

    result = run_training_job(s3, train, "job-7", tmp_path, lambda _: None)

    assert result.succeeded, result.failure_reason
    env = json.loads((tmp_path / "shown/environment.json").read_text())
    assert "LLM_PIPELINE_PLANTED" not in env
    assert env["TRAINING_JOB_NAME"] == "job-7"
    assert env["TRAINING_JOB_ARN"] == result.description["TrainingJobArn"] == \
        "arn:aws:sagemaker:us-east-1:123456789012:training-job/job-7"
    assert env["AWS_REGION"] == "us-east-1"
    assert env["SM_CHANNEL_VALIDATION"] == str(tmp_path / "opt_ml/input/data/validation")
    # The training toolkit's other variables are not there: the project's images do not have it.
    assert "SM_HPS" not in env and "SM_HOSTS" not in env


def test_a_job_starts_with_the_variables_its_server_adds_from_its_environment(
        s3, tmp_path, monkeypatch, environment_shown):
    # The local server hands a tracked job the MLflow run it made for the step
    # (pipelines/tracking.py), from the job's own environment, while its inputs are staged.
    s3.put_object(Bucket="bucket", Key="in/data.jsonl", Body="{}\n")
    train = training_request(max_steps="1")
    train["AlgorithmSpecification"]["ContainerArguments"] = [str(tmp_path / "shown")]
    control = jobs.JobControl(job_variables=lambda env: {
        "LLM_PIPELINE_MLFLOW_RUN_ID": f"run of {env['TRAINING_JOB_NAME']}"})

    result = run_training_job(s3, train, "job-9", tmp_path, lambda _: None, control=control)

    assert result.succeeded, result.failure_reason
    env = json.loads((tmp_path / "shown/environment.json").read_text())
    assert env["LLM_PIPELINE_MLFLOW_RUN_ID"] == "run of job-9"


@pytest.mark.parametrize("kind", ["processing", "training"])
@pytest.mark.parametrize("exit_code", [0, 3])
def test_the_server_hears_when_a_job_ended_and_whether_it_succeeded_before_its_outputs_upload(
        s3, tmp_path, monkeypatch, kind, exit_code):
    # The local server ends the step's MLflow run once the job's process has ended
    # (pipelines/tracking.py), with the variables it gave the job.
    monkeypatch.setattr(jobs, "_command", lambda image, entrypoint, arguments: [
        sys.executable, "-c", f"import sys; sys.exit({exit_code})"])
    s3.put_object(Bucket="bucket", Key="in/data.jsonl", Body="{}\n")
    heard = []
    control = jobs.JobControl(
        job_variables=lambda env: {"LLM_PIPELINE_MLFLOW_RUN_ID": "run-7"},
        job_ended=lambda variables, succeeded: heard.append(
            (variables, succeeded, keys(s3, "out/") + keys(s3, "models/"))))
    job = request("s3://bucket/in") if kind == "processing" else training_request()
    run = run_processing_job if kind == "processing" else run_training_job

    result = run(s3, job, "job-10", tmp_path, lambda _: None, control=control)

    assert result.succeeded == (exit_code == 0)
    assert heard == [({"LLM_PIPELINE_MLFLOW_RUN_ID": "run-7"}, exit_code == 0, [])]


@pytest.mark.parametrize("kind", ["processing", "training"])
def test_a_secret_in_a_failed_jobs_reason_is_masked(s3, tmp_path, monkeypatch, kind):
    secret = "sk-PlantedApiKeyOfTheJob0123456789"
    leaving = ("import os, sys; d = os.environ['SM_OUTPUT_DIR']; os.makedirs(d, exist_ok=True); "
               "open(os.path.join(d, sys.argv[1]), 'w').write('ERROR: bad key ' + "
               "os.environ['SERVICE_API_KEY']); sys.exit(2)")
    name = "message" if kind == "processing" else "failure"
    monkeypatch.setattr(jobs, "_command", lambda image, entrypoint, arguments: [
        sys.executable, "-c", leaving, name])
    s3.put_object(Bucket="bucket", Key="in/data.jsonl", Body="{}\n")
    job = request("s3://bucket/in") if kind == "processing" else training_request()
    job["Environment"] = {"SERVICE_API_KEY": secret}
    run = run_processing_job if kind == "processing" else run_training_job

    result = run(s3, job, "job-8", tmp_path, lambda _: None)

    assert result.failure_reason == "exit code 2: bad key ****"
    assert secret not in json.dumps({k: v for k, v in result.description.items()
                                     if k != "Environment"})


# A stage that lists the checkpoint folder it starts with, saves a checkpoint of its own and
# rotates an old file out, as the Trainer does.
_CHECKPOINTING = """
import os, pathlib
folder = pathlib.Path(os.environ["SM_CHECKPOINT_DIR"])
for path in sorted(p for p in folder.rglob("*") if p.is_file()):
    print("found", path.relative_to(folder).as_posix())
(folder / "run/job-9/checkpoint-4").mkdir(parents=True)
(folder / "run/job-9/checkpoint-4/weights").write_text("new")
(folder / "run/job-0/rotated-out").unlink()
"""


def test_a_training_job_starts_on_the_s3_checkpoints_says_so_and_mirrors_its_folder_back(
        s3, tmp_path, monkeypatch):
    monkeypatch.setattr(jobs, "_command", lambda image, entrypoint, arguments: [
        sys.executable, "-c", _CHECKPOINTING])
    s3.put_object(Bucket="bucket", Key="in/data.jsonl", Body="{}\n")
    for name in ("checkpoint-2/weights", "rotated-out"):  # an earlier attempt's
        s3.put_object(Bucket="bucket", Key=f"checkpoints/SFT/run/job-0/{name}", Body=b"old")
    job = {**training_request(), "CheckpointConfig": {
        "S3Uri": "s3://bucket/checkpoints/SFT", "LocalPath": "/opt/ml/checkpoints"}}

    result = run_training_job(s3, job, "job-9", tmp_path, lambda _: None)

    assert result.succeeded, result.failure_reason
    # The job's log, which `run`, `watch` and the console show, says where its checkpoints came from.
    log = (tmp_path / "log.txt").read_text().splitlines()
    assert log[:3] == ["restored 2 checkpoint files from s3://bucket/checkpoints/SFT",
                       "found run/job-0/checkpoint-2/weights", "found run/job-0/rotated-out"]
    assert keys(s3, "checkpoints/") == ["checkpoints/SFT/run/job-0/checkpoint-2/weights",
                                        "checkpoints/SFT/run/job-9/checkpoint-4/weights"]


def test_missing_input_prefix_is_a_clear_error(s3, tmp_path):
    with pytest.raises(FileNotFoundError, match="no S3 objects under s3://bucket/nothing"):
        run_processing_job(s3, request("s3://bucket/nothing"), "job-3", tmp_path, lambda _: None)


def test_a_job_past_its_max_runtime_is_stopped_as_sagemaker_stops_it(s3, tmp_path):
    # SageMaker sends SIGTERM when StoppingCondition.MaxRuntimeInSeconds is reached, and reports
    # the job Stopped with the secondary status MaxRuntimeExceeded; nothing is uploaded.
    s3.put_object(Bucket="bucket", Key="in/validation.jsonl",
                  Body='{"prompt": "q", "completion": "a"}\n')
    request = {**training_request(base_model="builtin:tiny", max_steps="1000"),
               "StoppingCondition": {"MaxRuntimeInSeconds": 1}}
    started = time.monotonic()
    result = run_training_job(s3, request, "job-4", tmp_path, lambda _: None)
    assert time.monotonic() - started < 60  # stopped, not trained to the end
    assert not result.succeeded
    assert result.description["TrainingJobStatus"] == "Stopped"
    assert result.description["SecondaryStatus"] == "MaxRuntimeExceeded"
    assert result.failure_reason.startswith("MaxRuntimeExceeded: the job ran past "
                                            "StoppingCondition.MaxRuntimeInSeconds (1 s)")
    assert failure_cause(None, result.failure_reason) == ""  # a limit is not retried
    assert keys(s3, "models/") == []


def test_a_job_is_done_when_its_process_ends_not_at_the_stop_watchers_next_look(tmp_path,
                                                                               monkeypatch):
    # A watcher looks for a stop request every STOP_CHECK_SECONDS while the job runs; the job's
    # outcome must not wait for its next look (every job of a run waited 0.1 s on average).
    monkeypatch.setattr(jobs, "STOP_CHECK_SECONDS", 120.0)
    started = time.monotonic()
    code, stopped = jobs._run([sys.executable, "-c", "print('done')"], {}, tmp_path,
                              tmp_path / "log.txt", lambda _: None)
    assert time.monotonic() - started < 60
    assert (code, stopped) == (0, "")
    assert (tmp_path / "log.txt").read_text() == "done\n"


def test_a_training_job_reports_whole_seconds_and_at_least_one_as_sagemaker_does():
    # TrainingTimeInSeconds and BillableTimeInSeconds have a minimum of 1 in SageMaker's API
    # model: a job stopped in its first second still reports 1 (it answered 0 before).
    assert [jobs.billed_seconds(s) for s in (0.0, 0.2, 1.0, 1.2, 59.5)] == [1, 1, 1, 2, 60]

"""Retry policies in the local engine: which failures are retried, how often, how long apart."""

import json

import boto3
import pytest
from botocore.exceptions import ClientError, EndpointConnectionError
from moto import mock_aws

from pipelines.local import engine, jobs
from pipelines.local.engine import failure_cause, retry_delay, run_execution

IMAGE = "123456789012.dkr.ecr.us-east-1.amazonaws.com/llm-lifecycle-processing:test"
EVERY_CAUSE = ["Step.SERVICE_FAULT", "Step.THROTTLING", "SageMaker.JOB_INTERNAL_ERROR",
               "SageMaker.CAPACITY_ERROR", "SageMaker.RESOURCE_LIMIT"]


def definition(retry_policies: list[dict]) -> dict:
    """One data-preparation step, shaped as the SDK writes it, with the given RetryPolicies."""
    return {"Version": "2020-12-01", "Parameters": [
        {"Name": "InputData", "Type": "String", "DefaultValue": "s3://bucket/in"}],
        "Steps": [{
            "Name": "DataPrep", "Type": "Processing", "RetryPolicies": retry_policies,
            "Arguments": {
                "ProcessingResources": {"ClusterConfig": {
                    "InstanceType": "ml.m5.xlarge", "InstanceCount": 1, "VolumeSizeInGB": 30}},
                "AppSpecification": {
                    "ImageUri": IMAGE, "ContainerEntrypoint": ["python", "-m", "steps.data_prep"],
                    "ContainerArguments": ["--input-dir", "/opt/ml/processing/input/raw",
                                           "--output-dir", "/opt/ml/processing/output"]},
                "RoleArn": "arn:aws:iam::123456789012:role/r",
                "ProcessingInputs": [{"InputName": "raw", "S3Input": {
                    "S3Uri": {"Get": "Parameters.InputData"},
                    "LocalPath": "/opt/ml/processing/input/raw",
                    "S3DataType": "S3Prefix", "S3InputMode": "File"}}],
                "ProcessingOutputConfig": {"Outputs": [{"OutputName": "data", "S3Output": {
                    "S3Uri": {"Std:Join": {"On": "/", "Values": [
                        "s3://bucket/out", {"Get": "Execution.PipelineExecutionId"}, "data"]}},
                    "LocalPath": "/opt/ml/processing/output", "S3UploadMode": "EndOfJob"}}]},
            }}]}


@pytest.fixture
def s3(monkeypatch):
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    with mock_aws():
        client = boto3.client("s3")
        client.create_bucket(Bucket="bucket")
        yield client


def execute(tmp_path, policies, control=None):
    return run_execution(definition(policies), {}, tmp_path / "executions", "us-east-1",
                         "123456789012", "retry-test", control=control)


def recorded(tmp_path, record):
    path = tmp_path / "executions" / "retry-test" / record.execution_id / "execution.json"
    return json.loads(path.read_text())


def test_a_step_that_loses_s3_once_succeeds_on_its_retry_as_a_new_job(s3, tmp_path, monkeypatch,
                                                                      forked):
    records = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(10)]
    s3.put_object(Bucket="bucket", Key="in/data.jsonl",
                  Body="".join(json.dumps(r) + "\n" for r in records))
    real_job, calls = jobs.run_processing_job, []

    def s3_unreachable_once(*args, **kwargs):
        calls.append(args[2])  # the job name
        if len(calls) == 1:
            raise EndpointConnectionError(endpoint_url="http://127.0.0.1:1/bucket/in")
        return real_job(*args, **kwargs)

    monkeypatch.setattr(engine.jobs, "run_processing_job", s3_unreachable_once)
    record = execute(tmp_path, [{"ExceptionType": ["Step.SERVICE_FAULT", "Step.THROTTLING"],
                                 "IntervalSeconds": 0.1, "BackoffRate": 2.0, "MaxAttempts": 2}],
                     forked)

    assert record.status == "Succeeded", record.failure_reason
    step = recorded(tmp_path, record)["steps"]["DataPrep"]
    assert [a["cause"] for a in step["attempts"]] == ["Step.SERVICE_FAULT", ""]
    assert "Could not connect" in step["attempts"][0]["failure_reason"]
    assert step["attempts"][1]["started"] - step["attempts"][0]["ended"] >= 0.1
    # each attempt is its own job, and the second one's outputs are in S3
    assert len(set(calls)) == 2 and step["job_name"] == calls[1]
    output = step["properties"]["ProcessingOutputConfig"]["Outputs"][0]["S3Output"]["S3Uri"]
    bucket, key = jobs.split_s3(f"{output}/manifest.json")
    assert s3.get_object(Bucket=bucket, Key=key)


def test_a_stage_that_rejects_its_data_is_not_retried_whatever_the_policies(s3, tmp_path, forked):
    s3.put_object(Bucket="bucket", Key="in/data.jsonl", Body='{"prompt": "q", "completion": 5}\n')
    record = execute(tmp_path, [{"ExceptionType": EVERY_CAUSE, "IntervalSeconds": 0,
                                 "BackoffRate": 1.0, "MaxAttempts": 5}], forked)

    assert record.status == "Failed"
    step = recorded(tmp_path, record)["steps"]["DataPrep"]
    assert len(step["attempts"]) == 1 and step["attempts"][0]["cause"] == ""
    assert step["failure_reason"].startswith("exit code 2:") and "data.jsonl:1" in step["failure_reason"]


def test_retries_stop_after_max_attempts_and_the_last_error_is_the_steps(s3, tmp_path, monkeypatch):
    def throttled(*args, **kwargs):
        raise ClientError({"Error": {"Code": "SlowDown", "Message": "Please reduce your request rate."},
                           "ResponseMetadata": {"HTTPStatusCode": 503}}, "GetObject")

    monkeypatch.setattr(engine.jobs, "run_processing_job", throttled)
    record = execute(tmp_path, [{"ExceptionType": ["Step.THROTTLING"], "IntervalSeconds": 0,
                                 "BackoffRate": 1.0, "MaxAttempts": 2}])

    step = recorded(tmp_path, record)["steps"]["DataPrep"]
    assert record.status == "Failed" and "SlowDown" in record.failure_reason
    assert [a["cause"] for a in step["attempts"]] == ["Step.THROTTLING"] * 3  # 1 try + 2 retries


def test_without_retry_policies_a_transient_fault_fails_the_step_at_once(s3, tmp_path, monkeypatch):
    def unreachable(*args, **kwargs):
        raise EndpointConnectionError(endpoint_url="http://127.0.0.1:1")

    monkeypatch.setattr(engine.jobs, "run_processing_job", unreachable)
    record = execute(tmp_path, [])
    assert record.status == "Failed"
    assert len(recorded(tmp_path, record)["steps"]["DataPrep"]["attempts"]) == 1


@pytest.mark.parametrize("error, reason, cause", [
    (EndpointConnectionError(endpoint_url="http://s3"), "", "Step.SERVICE_FAULT"),
    (ClientError({"Error": {"Code": "InternalError"}, "ResponseMetadata": {"HTTPStatusCode": 500}},
                 "PutObject"), "", "Step.SERVICE_FAULT"),
    (ClientError({"Error": {"Code": "ThrottlingException"},
                  "ResponseMetadata": {"HTTPStatusCode": 400}}, "CreateModelPackage"), "",
     "Step.THROTTLING"),
    (ClientError({"Error": {"Code": "ResourceLimitExceeded"},
                  "ResponseMetadata": {"HTTPStatusCode": 400}}, "CreateModelPackage"), "",
     "SageMaker.RESOURCE_LIMIT"),
    (ClientError({"Error": {"Code": "NoSuchKey"}, "ResponseMetadata": {"HTTPStatusCode": 404}},
                 "GetObject"), "", ""),
    (None, "exit code -9: Killed", "SageMaker.JOB_INTERNAL_ERROR"),
    (None, "exit code 1: Traceback (most recent call last):", ""),
    (None, "exit code 2: data.jsonl:3: field 'completion' must be a string", ""),
])
def test_failures_map_to_sagemaker_exception_types(error, reason, cause):
    assert failure_cause(error, reason) == cause


def test_retry_delays_back_off_and_the_first_policy_naming_the_cause_decides():
    policies = [{"ExceptionType": ["Step.SERVICE_FAULT"], "IntervalSeconds": 10,
                 "BackoffRate": 2.0, "MaxAttempts": 3},
                {"ExceptionType": ["Step.SERVICE_FAULT", "SageMaker.JOB_INTERNAL_ERROR"],
                 "IntervalSeconds": 60, "BackoffRate": 1.0, "ExpireAfterMin": 2}]
    fault = "Step.SERVICE_FAULT"
    assert [retry_delay(policies, [fault] * n, 0, 0) for n in (1, 2, 3, 4)] == [10, 20, 40, None]
    internal = "SageMaker.JOB_INTERNAL_ERROR"
    assert retry_delay(policies, [internal], first_started=0, now=30) == 60
    assert retry_delay(policies, [internal], first_started=0, now=61) is None  # past 2 minutes
    assert retry_delay(policies, ["SageMaker.CAPACITY_ERROR"], 0, 0) is None
    assert retry_delay(policies, [""], 0, 0) is None

"""The container contract as the local engine maps it: /opt/ml paths, staging, upload on success."""

import json

import boto3
import pytest
from moto import mock_aws

from pipelines.local.jobs import run_processing_job

IMAGE = "123456789012.dkr.ecr.us-east-1.amazonaws.com/llm-lifecycle-processing:test"


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


def test_processing_job_stages_inputs_rewrites_paths_and_uploads_outputs(s3, tmp_path):
    records = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(10)]
    s3.put_object(Bucket="bucket", Key="in/data.jsonl",
                  Body="".join(json.dumps(r) + "\n" for r in records))
    lines = []
    result = run_processing_job(s3, request("s3://bucket/in"), "job-1", tmp_path, lines.append)
    assert result.succeeded, result.failure_reason
    # /opt/ml was mapped to the job's own tree, the input staged under its LocalPath
    assert (tmp_path / "opt_ml/processing/input/raw/data.jsonl").is_file()
    assert keys(s3, "out/data/") == ["out/data/manifest.json", "out/data/train.jsonl",
                                     "out/data/validation.jsonl"]
    assert result.description["ProcessingJobStatus"] == "Completed"
    assert (tmp_path / "log.txt").read_text() and lines


def test_failed_processing_job_uploads_nothing_and_reports_the_error_line(s3, tmp_path):
    s3.put_object(Bucket="bucket", Key="in/data.jsonl", Body='{"prompt": "q", "completion": 5}\n')
    result = run_processing_job(s3, request("s3://bucket/in"), "job-2", tmp_path, lambda _: None)
    assert not result.succeeded
    assert "data.jsonl:1" in result.failure_reason
    assert keys(s3, "out/") == []


def test_missing_input_prefix_is_a_clear_error(s3, tmp_path):
    with pytest.raises(FileNotFoundError, match="no S3 objects under s3://bucket/nothing"):
        run_processing_job(s3, request("s3://bucket/nothing"), "job-3", tmp_path, lambda _: None)

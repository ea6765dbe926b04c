"""upsert / start / registry against the local server on loopback."""

import json

import boto3
import botocore.exceptions
import pytest

from tests.pipelines.conftest import clean_env, cli, cli_here


@pytest.fixture(scope="module")
def env(local_home):
    environment = clean_env(local_home)
    started = cli(environment, "server", "start")
    assert started.returncode == 0, started.stderr
    return environment


def test_server_state_survives_between_commands(env, clients, tmp_path):
    sagemaker, s3 = clients
    url = cli(env, "server", "status").stdout.strip()
    sagemaker.create_model_package_group(ModelPackageGroupName="survives")
    arn = sagemaker.create_model_package(
        ModelPackageGroupName="survives", ModelApprovalStatus="PendingManualApproval",
        InferenceSpecification={"Containers": [{"Image": "img", "ModelDataUrl": "s3://b/m.tar.gz"}],
                                "SupportedContentTypes": ["application/json"],
                                "SupportedResponseMIMETypes": ["application/json"]},
    )["ModelPackageArn"]
    # a model-sized artifact goes up as a multipart upload, as the engine's uploads do
    s3.create_bucket(Bucket="survives")
    artifact = tmp_path / "model.tar.gz"
    artifact.write_bytes(b"\0" * (9 * 1024 * 1024))
    s3.upload_file(str(artifact), "survives", "model.tar.gz")

    listed = cli(env, "registry", "list", "--group", "survives", "--json")
    assert listed.returncode == 0, listed.stderr
    assert [p["arn"] for p in json.loads(listed.stdout)] == [arn]
    assert cli(env, "server", "status").stdout.strip() == url  # the same server, not a new one


def test_upsert_creates_then_updates_the_pipeline_and_start_refuses_a_bad_parameter(
        env, clients, capsys):
    # The commands run in this process (each would import the SageMaker SDK again; as programs
    # they run in test_server_state_survives_between_commands and below).
    sagemaker, s3 = clients
    first = cli_here(capsys, env, "upsert", "--recipe", "sft")
    assert first.returncode == 0 and "created pipeline llm-sft" in first.stdout, first.stderr
    second = cli_here(capsys, env, "upsert", "--recipe", "sft")
    assert "updated pipeline llm-sft" in second.stdout
    stored = json.loads(sagemaker.describe_pipeline(PipelineName="llm-sft")["PipelineDefinition"])
    assert stored["Steps"][0]["Name"] == "DataPrep"
    versions = sagemaker.list_pipeline_versions(PipelineName="llm-sft")["PipelineVersionSummaries"]
    assert len(versions) == 2
    assert sagemaker.describe_model_package_group(ModelPackageGroupName="llm-sft")
    # the default InputData exists where the definition says
    default = next(p["DefaultValue"] for p in stored["Parameters"] if p["Name"] == "InputData")
    bucket, _, key = default[5:].partition("/")
    assert s3.head_object(Bucket=bucket, Key=key)

    # (start --wait's exit status, on real executions: tests/pipelines/test_local_sagemaker_runs.py)
    bad = cli_here(capsys, env, "start", "--recipe", "sft", "-p", "Epochs=x")
    assert bad.returncode == 2 and "Epochs='x' is not a valid Integer" in bad.stderr
    assert sagemaker.list_pipeline_executions(PipelineName="llm-sft")[
        "PipelineExecutionSummaries"] == []


def test_upsert_creates_the_model_package_group_the_pipeline_parameter_names(
        env, clients, tmp_path, capsys):
    # A recipe file naming its own group: executions register there, so it must exist.
    from tests.pipelines.conftest import ROOT

    sagemaker, _ = clients
    team = tmp_path / "team.yaml"
    team.write_text((ROOT / "pipelines/recipes/sft.yaml").read_text()
                    .replace("name: sft", "name: team-sft")
                    .replace("parameters:\n", "parameters:\n  ModelPackageGroup: llm-team-a\n", 1))
    result = cli_here(capsys, env, "upsert", "--recipe", str(team))
    assert result.returncode == 0, result.stderr
    stored = json.loads(sagemaker.describe_pipeline(PipelineName="llm-team-sft")["PipelineDefinition"])
    assert {"Name": "ModelPackageGroup", "Type": "String",
            "DefaultValue": "llm-team-a"} in stored["Parameters"]
    assert sagemaker.describe_model_package_group(ModelPackageGroupName="llm-team-a")


def test_start_of_a_pipeline_that_was_never_upserted_says_what_to_do(env, tmp_path):
    recipe = tmp_path / "other.yaml"
    from tests.pipelines.conftest import ROOT

    recipe.write_text((ROOT / "pipelines/recipes/sft.yaml").read_text()
                      .replace("name: sft", "name: never-upserted"))
    result = cli(env, "start", "--recipe", str(recipe))
    assert result.returncode == 2 and "run `llm-pipeline upsert" in result.stderr


def test_registry_lists_approves_and_rejects_keeping_metadata(env, clients):
    sagemaker, _ = clients
    sagemaker.create_model_package_group(ModelPackageGroupName="reg-test")
    arn = sagemaker.create_model_package(
        ModelPackageGroupName="reg-test", ModelApprovalStatus="PendingManualApproval",
        InferenceSpecification={"Containers": [{"Image": "img", "ModelDataUrl": "s3://b/m.tar.gz"}],
                                "SupportedContentTypes": ["application/json"],
                                "SupportedResponseMIMETypes": ["application/json"]},
        CustomerMetadataProperties={"recipe": "sft", "base_model": "builtin:tiny"},
    )["ModelPackageArn"]
    listed = json.loads(cli(env, "registry", "list", "--group", "reg-test", "--json").stdout)
    assert [(p["arn"], p["status"]) for p in listed] == [(arn, "PendingManualApproval")]

    approved = cli(env, "registry", "approve", arn, "--reason", "looks good")
    assert approved.returncode == 0 and "Approved" in approved.stdout
    package = sagemaker.describe_model_package(ModelPackageName=arn)
    assert package["ModelApprovalStatus"] == "Approved"
    assert package["CustomerMetadataProperties"]["recipe"] == "sft"

    rejected = cli(env, "registry", "reject", arn)
    assert "Rejected" in rejected.stdout
    missing = cli(env, "registry", "approve", arn.replace("/1", "/99"))
    assert missing.returncode == 2 and missing.stderr.startswith("ERROR: model package")


def test_start_wait_on_sagemaker_names_each_failed_step_and_its_jobs_own_reason():
    # SageMaker's own answers, as AWS words them, stubbed: a processing step whose job left its
    # reason in /opt/ml/output/message (ExitMessage), and a training step whose
    # /opt/ml/output/failure SageMaker put in the step's FailureReason.
    from datetime import UTC, datetime

    import boto3
    from botocore.stub import Stubber

    from pipelines.watch import failed_steps

    sagemaker = boto3.client("sagemaker", region_name="us-east-1", aws_access_key_id="x",
                             aws_secret_access_key="x")
    arn = "arn:aws:sagemaker:us-east-1:123456789012:pipeline/llm-sft/execution/exec1"
    job = "arn:aws:sagemaker:us-east-1:123456789012:processing-job/pipelines-exec1-dataprep"
    with Stubber(sagemaker) as stub:
        stub.add_response("list_pipeline_execution_steps", {"PipelineExecutionSteps": [
            {"StepName": "DataPrep", "StepStatus": "Failed",
             "FailureReason": "AlgorithmError: See job logs for more information",
             "Metadata": {"ProcessingJob": {"Arn": job}}},
            {"StepName": "SFT", "StepStatus": "Failed",
             "FailureReason": "AlgorithmError: ERROR: input channel 'train' is missing"},
            {"StepName": "Evaluate", "StepStatus": "Succeeded"},
        ]}, {"PipelineExecutionArn": arn, "SortOrder": "Ascending"})
        stub.add_response("describe_processing_job", {
            "ProcessingJobName": "pipelines-exec1-dataprep", "ProcessingJobArn": job,
            "ProcessingJobStatus": "Failed", "AppSpecification": {"ImageUri": "img"},
            "ProcessingResources": {"ClusterConfig": {
                "InstanceType": "ml.m5.xlarge", "InstanceCount": 1, "VolumeSizeInGB": 30}},
            "CreationTime": datetime(2026, 1, 1, tzinfo=UTC),
            "ExitMessage": "ERROR: train.jsonl:2: field 'completion': expected a string, got 5",
        }, {"ProcessingJobName": "pipelines-exec1-dataprep"})
        lines = failed_steps(sagemaker, arn)

    assert lines == [
        ("step DataPrep failed: AlgorithmError: See job logs for more information: "
         "ERROR: train.jsonl:2: field 'completion': expected a string, got 5"),
        "step SFT failed: AlgorithmError: ERROR: input channel 'train' is missing"]


# -- --target aws, with the local server standing in for AWS -----------------------------------
# The commands run in this process, each with the user's environment alone and boto3's state of a
# new process (cli_here); as programs, in test_registry_and_cost_on_aws_work_in_the_region_given.

ROLE = "arn:aws:iam::123456789012:role/llm-pipeline-execution"


@pytest.fixture(scope="module")
def aws(env):
    """The environment of a user with AWS credentials and no region configured anywhere; the
    endpoint is the module's server, standing in for AWS (it keeps state per region)."""
    url = cli(env, "server", "status").stdout.strip()
    return {**{k: v for k, v in env.items() if not k.startswith("AWS_")},
            "AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "key", "AWS_SECRET_ACCESS_KEY": "secret",
            "AWS_CONFIG_FILE": "/nonexistent", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent"}


def regional(env: dict, service: str, region: str):
    return boto3.client(service, region_name=region, endpoint_url=env["AWS_ENDPOINT_URL"],
                        aws_access_key_id="key", aws_secret_access_key="secret")


@pytest.mark.parametrize("command", [
    ["definition", "--target", "aws"],
    ["upsert", "--target", "aws", "--role-arn", ROLE, "--bucket", "b"],
    ["start", "--target", "aws", "--role-arn", ROLE, "--bucket", "b"],
    ["cost", "--target", "aws", "exec1"],
    ["registry", "list", "--target", "aws"],
])
def test_an_aws_command_with_no_region_anywhere_says_so_in_one_line(aws, command, capsys):
    result = cli_here(capsys, aws, *command)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("ERROR: no AWS region: pass --region")
    assert len(result.stderr.strip().splitlines()) == 1  # no traceback


def test_upsert_on_aws_honours_the_region_and_puts_the_demo_data_where_the_defaults_point(
        aws, capsys):
    # The region is only on the command line: every client the command makes must use it.
    s3 = regional(aws, "s3", "eu-west-1")
    s3.create_bucket(Bucket="demo-eu", CreateBucketConfiguration={"LocationConstraint": "eu-west-1"})
    command = ["upsert", "--target", "aws", "--region", "eu-west-1", "--recipe", "dpo",
               "--role-arn", ROLE, "--bucket", "demo-eu"]
    first = cli_here(capsys, aws, *command)
    assert first.returncode == 0, first.stderr
    sagemaker = regional(aws, "sagemaker", "eu-west-1")
    stored = json.loads(sagemaker.describe_pipeline(PipelineName="llm-dpo")["PipelineDefinition"])
    with pytest.raises(botocore.exceptions.ClientError):
        regional(aws, "sagemaker", "us-east-1").describe_pipeline(PipelineName="llm-dpo")
    # Every dataset parameter's default exists on "AWS", so `start` with no data runs the demo.
    defaults = {p["Name"]: p.get("DefaultValue") for p in stored["Parameters"]}
    objects = {}
    for parameter in ("InputData", "PreferenceData"):
        bucket, _, key = defaults[parameter][len("s3://"):].partition("/")
        assert bucket == "demo-eu"
        objects[key] = s3.head_object(Bucket=bucket, Key=key)["ETag"]
        assert f"{parameter} default: s3://demo-eu/{key} (uploaded)" in first.stdout

    again = cli_here(capsys, aws, *command)  # idempotent: the same bytes are not uploaded again
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("(already there)") == 2
    assert {key: s3.head_object(Bucket="demo-eu", Key=key)["ETag"] for key in objects} == objects

    # start finds the pipeline in that region too, with no region but --region
    started = cli_here(capsys, aws, "start", "--target", "aws", "--region", "eu-west-1",
                       "--recipe", "dpo", "--role-arn", ROLE, "--bucket", "demo-eu")
    assert started.returncode == 0, started.stderr
    assert ":eu-west-1:" in started.stdout


def test_upsert_on_aws_never_creates_the_bucket_and_says_which_to_pass(aws, capsys):
    result = cli_here(capsys, aws, "upsert", "--target", "aws", "--region", "eu-west-1",
                      "--role-arn", ROLE, "--bucket", "no-such-bucket")
    assert result.returncode == 2
    assert result.stderr.startswith("ERROR: bucket no-such-bucket does not exist: pass the "
                                    "ArtifactBucket that infra/ created")
    with pytest.raises(botocore.exceptions.ClientError):
        regional(aws, "s3", "eu-west-1").head_bucket(Bucket="no-such-bucket")


def test_start_on_aws_refuses_a_bad_value_before_starting_an_execution(aws, capsys):
    s3 = regional(aws, "s3", "eu-central-1")
    s3.create_bucket(Bucket="demo-fra",
                     CreateBucketConfiguration={"LocationConstraint": "eu-central-1"})
    target = ["--target", "aws", "--region", "eu-central-1", "--role-arn", ROLE,
              "--bucket", "demo-fra", "--recipe", "sft"]
    assert cli_here(capsys, aws, "upsert", *target).returncode == 0
    refused = cli_here(capsys, aws, "start", *target, "-p", "LearningRate=-1")
    assert refused.returncode == 2
    assert refused.stderr.startswith("ERROR: pipeline parameter LearningRate=-1.0: stage sft's "
                                     "learning_rate takes values >= 0")
    executions = regional(aws, "sagemaker", "eu-central-1").list_pipeline_executions(
        PipelineName="llm-sft")["PipelineExecutionSummaries"]
    assert executions == []  # StartPipelineExecution was never called


def test_upsert_refuses_a_pipeline_name_sagemaker_refuses_before_creating_anything(
        env, tmp_path, clients, capsys):
    from tests.pipelines.conftest import ROOT

    sagemaker, _ = clients
    recipe = tmp_path / "my_recipe.yaml"
    recipe.write_text((ROOT / "pipelines/recipes/sft.yaml").read_text()
                      .replace("name: sft", "name: my_recipe")
                      .replace("model_package_group: llm-sft", "model_package_group: llm-mine"))
    result = cli_here(capsys, env, "upsert", "--recipe", str(recipe))
    assert result.returncode == 2
    assert result.stderr.startswith("ERROR: upsert llm-my_recipe: CreatePipeline PipelineName: "
                                    "'llm-my_recipe' does not match SageMaker's pattern")
    groups = sagemaker.list_model_package_groups()["ModelPackageGroupSummaryList"]
    assert "llm-mine" not in {g["ModelPackageGroupName"] for g in groups}


def test_registry_and_cost_on_aws_work_in_the_region_given(aws):
    sagemaker = regional(aws, "sagemaker", "ap-southeast-2")
    sagemaker.create_model_package_group(ModelPackageGroupName="sydney")
    arn = sagemaker.create_model_package(
        ModelPackageGroupName="sydney", ModelApprovalStatus="PendingManualApproval",
        InferenceSpecification={"Containers": [{"Image": "img", "ModelDataUrl": "s3://b/m.tar.gz"}],
                                "SupportedContentTypes": ["application/json"],
                                "SupportedResponseMIMETypes": ["application/json"]},
    )["ModelPackageArn"]
    listed = cli(aws, "registry", "list", "--target", "aws", "--region", "ap-southeast-2",
                 "--group", "sydney", "--json")
    assert listed.returncode == 0, listed.stderr
    assert [p["arn"] for p in json.loads(listed.stdout)] == [arn]
    # The local server cannot list an execution's steps: the ledger fails, in one line, for the
    # execution of the region given.
    cost = cli(aws, "cost", "--target", "aws", "--region", "ap-southeast-2", "--role-arn", ROLE,
               "--bucket", "b", "exec1")
    assert cost.returncode == 2 and len(cost.stderr.strip().splitlines()) == 1
    assert cost.stderr.startswith("ERROR: cost ledger of arn:aws:sagemaker:ap-southeast-2:")

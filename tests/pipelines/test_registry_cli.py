"""`llm-pipeline registry promote|diff|list` wired to a real (moto) server on loopback."""

import json

import pytest

from tests.pipelines.conftest import clean_env, cli, cli_here

PROD_ROLE = "arn:aws:iam::210987654321:role/registry-promoter"


@pytest.fixture(scope="module")
def env(local_home):
    environment = clean_env(local_home)
    started = cli(environment, "server", "start")
    assert started.returncode == 0, started.stderr
    return environment


def test_approve_promote_list_and_diff_through_the_command_line(env, clients, capsys):
    sagemaker, s3 = clients
    s3.create_bucket(Bucket="reg-cli")
    s3.put_object(Bucket="reg-cli", Key="evaluation.json",
                  Body=json.dumps({"metrics": {"perplexity": {"value": 12.5}}}))
    sagemaker.create_model_package_group(ModelPackageGroupName="reg-cli")
    source = sagemaker.create_model_package(
        ModelPackageGroupName="reg-cli", ModelApprovalStatus="PendingManualApproval",
        InferenceSpecification={"Containers": [{"Image": "img",
                                                "ModelDataUrl": "s3://reg-cli/m.tar.gz"}],
                                "SupportedContentTypes": ["application/json"],
                                "SupportedResponseMIMETypes": ["application/json"]},
        ModelMetrics={"ModelQuality": {"Statistics": {
            "ContentType": "application/json", "S3Uri": "s3://reg-cli/evaluation.json"}}},
        CustomerMetadataProperties={"recipe": "sft"},
    )["ModelPackageArn"]

    # As a program once; then in this process (pipelines.cli.main, as the program runs it), where
    # each command would otherwise start an interpreter and import boto3 again.
    refused = cli(env, "registry", "promote", source, "--to-group", "reg-cli-prod")
    assert refused.returncode == 2 and refused.stdout == ""
    assert refused.stderr.startswith("ERROR: ") and refused.stderr.count("\n") == 1
    assert "PendingManualApproval, not Approved" in refused.stderr

    def here(*args: str):
        return cli_here(capsys, env, *args)

    assert here("registry", "approve", source).returncode == 0
    promoted = here("registry", "promote", source, "--to-group", "reg-cli-prod",
                    "--reason", "release 1")
    assert promoted.returncode == 0, promoted.stderr
    arn = promoted.stdout.split(": promoted from")[0]
    assert arn.startswith("arn:aws:sagemaker:") and "/reg-cli-prod/" in arn

    listed = here("registry", "list", "--group", "reg-cli-prod")
    assert listed.stdout.splitlines()[0] == arn
    assert "group=reg-cli-prod  status=Approved" in listed.stdout
    assert f"promoted_from={source}" in listed.stdout and "perplexity=12.5" in listed.stdout
    again = here("registry", "promote", source, "--to-group", "reg-cli-prod")
    assert again.returncode == 0 and again.stdout.startswith(f"{arn}: already promoted")

    compared = here("registry", "diff", source, arn, "--json")
    rows = {r["field"]: r for r in json.loads(compared.stdout)["differences"]}
    assert (rows["group"]["a"], rows["group"]["b"]) == ("reg-cli", "reg-cli-prod")
    assert rows["metadata.promoted_from"]["a"] is None
    assert "no differences" in here("registry", "diff", source, source).stdout

    other = here("registry", "promote", source, "--to-group", "reg-cli",
                 "--role-arn", PROD_ROLE)
    assert other.returncode == 0, other.stderr
    assert other.stdout.startswith("arn:aws:sagemaker:us-east-1:210987654321:"
                                   "model-package/reg-cli/")
    there = json.loads(here("registry", "list", "--role-arn", PROD_ROLE, "--json").stdout)
    assert [(p["group"], p["metadata"]["promoted_from"]) for p in there] == [("reg-cli", source)]

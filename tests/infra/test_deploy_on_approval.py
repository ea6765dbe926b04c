"""Deployment on approval: the stack's rule sends a package Approved in the production group to
infra/deploy_on_approval.py, which serves it at the staging endpoint (moto's SageMaker; botocore's
Stubber where moto has no UpdateEndpoint), each request checked against SageMaker's API model."""

from __future__ import annotations

import json

import boto3
import pytest
import yaml
from botocore.stub import Stubber
from moto import mock_aws

from infra import deploy_on_approval, template
from pipelines import deploy, validation

REGION = "us-east-1"
ACCOUNT = "123456789012"
GROUP = "llm-sft"
ROLE = f"arn:aws:iam::{ACCOUNT}:role/llm-lifecycle-execution"
IMAGE = f"{ACCOUNT}.dkr.ecr.{REGION}.amazonaws.com/llm-lifecycle-serving:abc123"


def checked(client) -> list[str]:
    """The operations `client` sends, each checked against SageMaker's API model as it is sent."""
    sent = []

    def check(params, model, **kwargs) -> None:
        sent.append(model.name)
        assert validation.problems(model.name, params) == [], (model.name, params)

    client.meta.events.register("provide-client-params.sagemaker.*", check)
    return sent


def approval_event(arn: str, group: str = GROUP, status: str = "Approved") -> dict:
    """SageMaker's model package state change event, as EventBridge delivers it."""
    return {"version": "0", "id": "6a7e8feb-b491-4cf7-a9f1-bf3703467718",
            "detail-type": "SageMaker Model Package State Change", "source": "aws.sagemaker",
            "account": ACCOUNT, "time": "2026-12-05T09:00:00Z", "region": REGION,
            "resources": [arn],
            "detail": {"ModelPackageGroupName": group, "ModelPackageVersion": 1,
                       "ModelPackageArn": arn, "ModelApprovalStatus": status}}


@pytest.fixture
def sagemaker(monkeypatch):
    for key, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                       ("AWS_DEFAULT_REGION", REGION)):
        monkeypatch.setenv(key, value)
    with mock_aws():
        client = boto3.client("sagemaker", region_name=REGION)
        client.create_model_package_group(ModelPackageGroupName=GROUP)
        yield client


def register(sagemaker, status: str = "Approved",
             instance_types: tuple[str, ...] = ("ml.m5.large", "ml.g5.xlarge")) -> str:
    return sagemaker.create_model_package(
        ModelPackageGroupName=GROUP, ModelApprovalStatus=status,
        InferenceSpecification={
            "Containers": [{"Image": IMAGE, "ModelDataUrl": "s3://artifacts/sft/model.tar.gz"}],
            "SupportedContentTypes": ["application/json"],
            "SupportedResponseMIMETypes": ["application/json"],
            "SupportedRealtimeInferenceInstanceTypes": list(instance_types)})["ModelPackageArn"]


def test_an_approved_package_is_served_at_the_staging_endpoint_on_its_first_listed_type(
        sagemaker, monkeypatch):
    arn = register(sagemaker)
    monkeypatch.setenv("ENDPOINT_NAME", "llm-staging")
    monkeypatch.setenv("EXECUTION_ROLE_ARN", ROLE)
    monkeypatch.setenv("INSTANCE_TYPE", "")

    outcome = deploy_on_approval.deploy_approved_package(approval_event(arn))

    assert outcome["action"] == "created" and outcome["instance_type"] == "ml.m5.large"
    endpoint = sagemaker.describe_endpoint(EndpointName="llm-staging")
    variant = sagemaker.describe_endpoint_config(
        EndpointConfigName=endpoint["EndpointConfigName"])["ProductionVariants"][0]
    assert variant["InstanceType"] == "ml.m5.large" and variant["InitialInstanceCount"] == 1
    model = sagemaker.describe_model(ModelName=variant["ModelName"])
    assert model["PrimaryContainer"]["ModelPackageName"] == arn
    assert model["ExecutionRoleArn"] == ROLE


def test_the_requests_are_valid_for_sagemakers_api_and_a_chosen_instance_type_wins(sagemaker):
    arn = register(sagemaker)
    sent = checked(sagemaker)

    outcome = deploy_on_approval.deploy(sagemaker, arn, endpoint_name="llm-staging",
                                        role_arn=ROLE, instance_type="ml.c5.2xlarge")

    assert outcome["instance_type"] == "ml.c5.2xlarge"
    assert ["CreateModel", "CreateEndpointConfig", "CreateEndpoint"] == [
        name for name in sent if name.startswith("Create")]


def test_a_repeated_event_for_the_package_the_endpoint_serves_changes_nothing(sagemaker):
    # SageMaker may send several events for one state change.
    arn = register(sagemaker)
    first = deploy_on_approval.deploy(sagemaker, arn, endpoint_name="llm-staging", role_arn=ROLE)

    again = deploy_on_approval.deploy(sagemaker, arn, endpoint_name="llm-staging", role_arn=ROLE)

    assert first["action"] == "created"
    assert again == {"action": "skipped", "package": arn,
                     "reason": "endpoint llm-staging already serves it"}
    assert len(sagemaker.list_models()["Models"]) == 1


def test_a_package_rejected_again_before_its_event_arrives_is_not_deployed(sagemaker):
    arn = register(sagemaker)
    sagemaker.update_model_package(ModelPackageArn=arn, ModelApprovalStatus="Rejected")

    outcome = deploy_on_approval.deploy(sagemaker, arn, endpoint_name="llm-staging",
                                        role_arn=ROLE)

    assert outcome["action"] == "skipped" and "Rejected" in outcome["reason"]
    assert sagemaker.list_endpoints()["Endpoints"] == []
    assert sagemaker.list_models()["Models"] == []


def test_a_new_approval_updates_the_endpoint_and_deletes_the_deployment_before_the_last():
    # moto has no UpdateEndpoint: SageMaker's answers are stubbed; botocore checks the requests.
    sagemaker = boto3.client("sagemaker", region_name=REGION, aws_access_key_id="x",
                             aws_secret_access_key="x")
    new_arn = f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:model-package/{GROUP}/3"
    old_arn = f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:model-package/{GROUP}/2"
    new, current, older = ("llm-staging-20261205100000", "llm-staging-20261204100000",
                           "llm-staging-20261203100000")
    another_endpoints = "llm-staging-2-20261203100000"
    endpoint = {"EndpointName": "llm-staging", "EndpointConfigName": current,
                "EndpointArn": f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:endpoint/llm-staging",
                "EndpointStatus": "InService", "CreationTime": 0, "LastModifiedTime": 0}
    sent = checked(sagemaker)
    stub = Stubber(sagemaker)
    stub.add_response("describe_model_package", {
        "ModelPackageName": GROUP, "ModelPackageArn": new_arn, "CreationTime": 0,
        "ModelPackageStatus": "Completed", "ModelApprovalStatus": "Approved",
        "ModelPackageStatusDetails": {"ValidationStatuses": [], "ImageScanStatuses": []},
        "InferenceSpecification": {"Containers": [{"Image": IMAGE}],
                                   "SupportedContentTypes": ["application/json"],
                                   "SupportedResponseMIMETypes": ["application/json"],
                                   "SupportedRealtimeInferenceInstanceTypes": ["ml.g5.xlarge"]}},
        {"ModelPackageName": new_arn})
    stub.add_response("describe_endpoint", endpoint, {"EndpointName": "llm-staging"})
    stub.add_response("describe_endpoint_config", {
        "EndpointConfigName": current, "CreationTime": 0,
        "EndpointConfigArn": f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:endpoint-config/{current}",
        "ProductionVariants": [{"VariantName": "AllTraffic", "ModelName": current}]},
        {"EndpointConfigName": current})
    stub.add_response("describe_model", {
        "ModelName": current, "CreationTime": 0,
        "ModelArn": f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:model/{current}",
        "PrimaryContainer": {"ModelPackageName": old_arn}}, {"ModelName": current})
    stub.add_response("create_model", {"ModelArn": f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:"
                                                   f"model/{new}"},
                      deploy_on_approval.model_request(new, new_arn, ROLE))
    stub.add_response("create_endpoint_config", {
        "EndpointConfigArn": f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:endpoint-config/{new}"},
        deploy_on_approval.endpoint_config_request(new, new, "ml.g5.xlarge"))
    stub.add_response("update_endpoint", {"EndpointArn": endpoint["EndpointArn"]},
                      {"EndpointName": "llm-staging", "EndpointConfigName": new})
    stub.add_response("list_endpoint_configs", {"EndpointConfigs": [
        {"EndpointConfigName": name, "CreationTime": 0,
         "EndpointConfigArn": f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:endpoint-config/{name}"}
        for name in (new, current, older, another_endpoints)]}, {"NameContains": "llm-staging-"})
    stub.add_response("delete_endpoint_config", {}, {"EndpointConfigName": older})
    stub.add_response("delete_model", {}, {"ModelName": older})

    with stub:
        outcome = deploy_on_approval.deploy(sagemaker, new_arn, endpoint_name="llm-staging",
                                            role_arn=ROLE, when=1796464800)  # 2026-12-05 10:00

    # The current config stays (the endpoint rolls back to it if the new model never answers),
    # and another endpoint's whose name begins the same way is not touched.
    stub.assert_no_pending_responses()
    assert outcome["action"] == "updated" and outcome["model"] == new
    assert "CreateEndpoint" not in sent


def test_a_failed_deployment_raises_for_lambda_to_retry_and_leaves_no_model_behind(
        sagemaker, monkeypatch):
    arn = register(sagemaker)

    def refuse(**request):
        raise RuntimeError("throttled")

    monkeypatch.setattr(sagemaker, "create_endpoint_config", refuse)
    with pytest.raises(RuntimeError, match="throttled"):
        deploy_on_approval.deploy(sagemaker, arn, endpoint_name="llm-staging", role_arn=ROLE)
    assert sagemaker.list_models()["Models"] == []


def test_a_failed_staging_endpoint_is_deleted_so_that_the_retry_creates_it_again():
    # moto's endpoints never fail: SageMaker's answers are stubbed.
    sagemaker = boto3.client("sagemaker", region_name=REGION, aws_access_key_id="x",
                             aws_secret_access_key="x")
    arn = f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:model-package/{GROUP}/3"
    failed = "llm-staging-20261204100000"
    stub = Stubber(sagemaker)
    stub.add_response("describe_model_package", {
        "ModelPackageName": GROUP, "ModelPackageArn": arn, "CreationTime": 0,
        "ModelPackageStatus": "Completed", "ModelApprovalStatus": "Approved",
        "ModelPackageStatusDetails": {"ValidationStatuses": [], "ImageScanStatuses": []}},
        {"ModelPackageName": arn})
    stub.add_response("describe_endpoint", {
        "EndpointName": "llm-staging", "EndpointConfigName": failed,
        "EndpointArn": f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:endpoint/llm-staging",
        "EndpointStatus": "Failed", "FailureReason": "the container did not pass /ping",
        "CreationTime": 0, "LastModifiedTime": 0}, {"EndpointName": "llm-staging"})
    stub.add_response("describe_endpoint_config", {
        "EndpointConfigName": failed, "CreationTime": 0,
        "EndpointConfigArn": f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:endpoint-config/{failed}",
        "ProductionVariants": [{"VariantName": "AllTraffic", "ModelName": failed}]},
        {"EndpointConfigName": failed})
    stub.add_response("describe_model", {
        "ModelName": failed, "CreationTime": 0,
        "ModelArn": f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:model/{failed}",
        "PrimaryContainer": {"ModelPackageName": arn.replace("/3", "/2")}}, {"ModelName": failed})
    stub.add_response("delete_endpoint", {}, {"EndpointName": "llm-staging"})

    with stub, pytest.raises(RuntimeError, match=r"endpoint llm-staging had failed \(the "
                                                 r"container did not pass /ping\); deleted it"):
        deploy_on_approval.deploy(sagemaker, arn, endpoint_name="llm-staging", role_arn=ROLE)
    stub.assert_no_pending_responses()


def test_the_function_sends_the_requests_llm_pipeline_deploy_sends():
    # Two copies because the function's inline source cannot import the project; held equal here.
    arn = f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:model-package/{GROUP}/1"
    name = deploy_on_approval.deployment_names("llm-staging", when=0)
    assert name == deploy.deployment_names("llm-staging", when=0)
    assert deploy_on_approval.deployment_names("x" * 48, when=0) == "x" * 48 + "-19700101000000"
    assert deploy_on_approval.model_request(name, arn, ROLE) == deploy.model_request(
        name, arn, ROLE)
    assert deploy_on_approval.endpoint_config_request(
        name, name, "ml.m5.large") == deploy.endpoint_config_request(name, name, "ml.m5.large")
    assert deploy_on_approval.DEFAULT_INSTANCE_TYPE == deploy.DEFAULT_INSTANCE_TYPE


# -- the stack's side ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def committed() -> dict:
    return yaml.safe_load(template.TEMPLATE.read_text())


def test_the_function_runs_this_files_source_with_only_what_lambda_has(committed):
    function = committed["Resources"]["DeployOnApprovalFunction"]["Properties"]
    assert function["Code"]["ZipFile"] == template.DEPLOY_ON_APPROVAL.read_text()
    module, entry = function["Handler"].split(".")
    assert module == "index" and callable(getattr(deploy_on_approval, entry))
    imported = {line.split()[1].split(".")[0] for line in function["Code"]["ZipFile"].splitlines()
                if line.startswith(("import ", "from "))}
    assert imported <= {"__future__", "os", "re", "time", "boto3", "botocore"}


@mock_aws
def test_the_rule_matches_an_approval_in_the_production_group_and_nothing_else(committed,
                                                                               monkeypatch):
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(key, "testing")
    pattern = committed["Resources"]["DeployOnApprovalRule"]["Properties"]["EventPattern"]
    pattern = json.loads(json.dumps(pattern).replace('{"Ref": "DeployOnApprovalGroup"}',
                                                     json.dumps(GROUP)))
    # moto has no TestEventPattern: the rule is put on moto's bus, with a queue as its target.
    events = boto3.client("events", region_name=REGION)
    sqs = boto3.client("sqs", region_name=REGION)
    queue = sqs.create_queue(QueueName="delivered")["QueueUrl"]
    queue_arn = sqs.get_queue_attributes(QueueUrl=queue, AttributeNames=["QueueArn"])[
        "Attributes"]["QueueArn"]
    events.put_rule(Name="deploy-on-approval", EventPattern=json.dumps(pattern))
    events.put_targets(Rule="deploy-on-approval", Targets=[{"Id": "q", "Arn": queue_arn}])
    arn = f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:model-package/{GROUP}/1"

    def matches(event: dict) -> bool:
        events.put_events(Entries=[{"Source": event["source"], "DetailType": event["detail-type"],
                                    "Resources": event["resources"],
                                    "Detail": json.dumps(event["detail"])}])
        delivered = sqs.receive_message(QueueUrl=queue, WaitTimeSeconds=0).get("Messages", [])
        for message in delivered:
            sqs.delete_message(QueueUrl=queue, ReceiptHandle=message["ReceiptHandle"])
        return bool(delivered)

    assert matches(approval_event(arn))
    assert not matches(approval_event(arn, status="Rejected"))
    assert not matches(approval_event(arn, status="PendingManualApproval"))
    assert not matches(approval_event(arn.replace(GROUP, "llm-dpo"), group="llm-dpo"))

"""infra/template.yaml: current with the tables, accepted by cfn-lint, deployable on moto."""

import json
import warnings

import boto3
import pytest
import yaml
from moto import mock_aws

from containers import images
from infra import template
from pipelines import recipe
from pipelines.definition import pipeline_name

# Resource types of the template that moto 5.2.5's CloudFormation cannot create. The deploy test
# leaves them out; the static tests below and tests/infra/test_least_privilege.py cover them.
NOT_IN_MOTO = {"AWS::S3::BucketPolicy", "AWS::SageMaker::ModelPackageGroup",
               "AWS::SageMaker::Pipeline"}


@pytest.fixture(scope="module")
def committed() -> dict:
    return yaml.safe_load(template.TEMPLATE.read_text())


def of_type(document: dict, kind: str) -> dict:
    return {name: r for name, r in document["Resources"].items() if r["Type"] == kind}


def test_committed_template_is_what_the_generator_writes():
    assert template.TEMPLATE.read_text() == template.render(), (
        "infra/template.yaml is out of date with containers/images.py or pipelines/recipes/; "
        "run `python -m infra.template`")


def test_one_repository_per_image_one_group_and_pipeline_per_recipe(committed):
    repositories = {r["Properties"]["RepositoryName"]
                    for r in of_type(committed, "AWS::ECR::Repository").values()}
    assert repositories == set(images.IMAGES)
    loaded = [recipe.load(name) for name in recipe.available()]
    groups = {r["Properties"]["ModelPackageGroupName"]
              for r in of_type(committed, "AWS::SageMaker::ModelPackageGroup").values()}
    # The group each recipe registers into unless an execution overrides ModelPackageGroup.
    assert groups == {chosen.parameters.get("ModelPackageGroup", chosen.model_package_group)
                      for chosen in loaded}
    pipelines = {r["Properties"]["PipelineName"]
                 for r in of_type(committed, "AWS::SageMaker::Pipeline").values()}
    assert pipelines == {pipeline_name(chosen) for chosen in loaded}


def test_repositories_scan_on_push_and_keep_tags_immutable(committed):
    for resource in of_type(committed, "AWS::ECR::Repository").values():
        assert resource["Properties"]["ImageScanningConfiguration"] == {"ScanOnPush": True}
        assert resource["Properties"]["ImageTagMutability"] == "IMMUTABLE"


def test_pipelines_read_their_definition_from_the_artifact_bucket_only_when_given(committed):
    for resource in of_type(committed, "AWS::SageMaker::Pipeline").values():
        assert resource["Condition"] == "HasDefinitions"
        location = resource["Properties"]["PipelineDefinition"]["PipelineDefinitionS3Location"]
        assert location["Bucket"] == {"Ref": "ArtifactBucket"}
        assert location["Key"]["Fn::Sub"].startswith("${DefinitionsPrefix}/")
        assert resource["Properties"]["RoleArn"] == {"Fn::GetAtt": ["ExecutionRole", "Arn"]}


def test_cfn_lint_finds_nothing():
    from cfnlint.api import ManualArgs, lint

    matches = lint(template.TEMPLATE.read_text(),
                   config=ManualArgs(regions=["us-east-1", "eu-west-1"]))
    assert [str(m) for m in matches] == []


def test_cfn_lint_is_not_vacuous(committed):
    # The same linter flags a real mistake in this template: a bucket encrypted with no key.
    from cfnlint.api import ManualArgs, lint

    broken = json.loads(json.dumps(committed))
    broken["Resources"]["DataBucket"]["Properties"]["BucketEncryption"] = {}
    assert lint(json.dumps(broken), config=ManualArgs(regions=["us-east-1"]))


@mock_aws
def test_stack_deploys_on_moto_with_encrypted_buckets_role_repositories_and_ci_role(
        committed, monkeypatch):
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(key, "testing")
    # Imported here: moto's CloudFormation models cost each test process a CPU second at
    # collection, and only this test's process needs them.
    from moto.cloudformation.parsing import get_model_map

    supported = get_model_map()
    deployable = json.loads(json.dumps(committed))
    left_out = {r["Type"] for r in committed["Resources"].values() if r["Type"] not in supported}
    assert left_out == NOT_IN_MOTO, "moto's CloudFormation support changed: update NOT_IN_MOTO"
    deployable["Resources"] = {name: r for name, r in committed["Resources"].items()
                               if r["Type"] in supported}

    region = "us-east-1"
    cloudformation = boto3.client("cloudformation", region_name=region)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # moto warns about every type it skips
        cloudformation.create_stack(
            StackName="llm-lifecycle", TemplateBody=json.dumps(deployable),
            Parameters=[{"ParameterKey": "GitHubRepository", "ParameterValue": "acme/llm"}],
            Capabilities=["CAPABILITY_IAM"])
    stack = cloudformation.describe_stacks(StackName="llm-lifecycle")["Stacks"][0]
    assert stack["StackStatus"] == "CREATE_COMPLETE"
    outputs = {o["OutputKey"]: o["OutputValue"] for o in stack["Outputs"]}

    kms = boto3.client("kms", region_name=region)
    key_arn = outputs["KeyArn"]
    assert kms.get_key_rotation_status(KeyId=key_arn)["KeyRotationEnabled"]
    aliases = {a["AliasName"]: a.get("TargetKeyId") for a in kms.list_aliases()["Aliases"]}
    assert key_arn.endswith(aliases[f"alias/{template.PREFIX}"])

    s3 = boto3.client("s3", region_name=region)
    for bucket in (outputs["DataBucketName"], outputs["ArtifactBucketName"]):
        rule = s3.get_bucket_encryption(Bucket=bucket)["ServerSideEncryptionConfiguration"][
            "Rules"][0]["ApplyServerSideEncryptionByDefault"]
        assert rule == {"SSEAlgorithm": "aws:kms", "KMSMasterKeyID": key_arn}

    ecr = boto3.client("ecr", region_name=region)
    repositories = ecr.describe_repositories(repositoryNames=list(images.IMAGES))["repositories"]
    assert {r["imageTagMutability"] for r in repositories} == {"IMMUTABLE"}

    iam = boto3.client("iam", region_name=region)
    role_name = outputs["ExecutionRoleArn"].rsplit("/", 1)[1]
    trust = iam.get_role(RoleName=role_name)["Role"]["AssumeRolePolicyDocument"]
    assert trust["Statement"][0]["Principal"] == {"Service": "sagemaker.amazonaws.com"}
    granted = iam.get_role_policy(RoleName=role_name,
                                  PolicyName=f"{template.PREFIX}-execution")["PolicyDocument"]
    by_sid = {s["Sid"]: s for s in granted["Statement"]}
    # References resolved to this stack's resources: the role may pass itself, and nothing else.
    assert by_sid["PassThisRoleToSageMakerOnly"]["Resource"] == [outputs["ExecutionRoleArn"]]
    assert by_sid["ReadData"]["Resource"] == [f"arn:aws:s3:::{outputs['DataBucketName']}/*"]
    assert by_sid["UseTheBucketKeyThroughS3"]["Resource"] == [key_arn]

    ci_role = outputs["CiRoleArn"].rsplit("/", 1)[1]
    ci_trust = iam.get_role(RoleName=ci_role)["Role"]["AssumeRolePolicyDocument"]["Statement"][0]
    assert ci_trust["Condition"]["StringEquals"][
        "token.actions.githubusercontent.com:sub"] == "repo:acme/llm:ref:refs/heads/main"
    assert iam.list_role_policies(RoleName=ci_role)["PolicyNames"] == [f"{template.PREFIX}-ci"]

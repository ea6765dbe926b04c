"""The template grants no wildcard, keeps the buckets private and encrypted, and the checker
that says so reports each protection when it is taken away."""

import copy
import subprocess
import sys

import pytest
import yaml

from infra import least_privilege, template


@pytest.fixture(scope="module")
def committed() -> dict:
    return yaml.safe_load(template.TEMPLATE.read_text())


def statement(document: dict, resource: str, sid: str) -> dict:
    props = document["Resources"][resource]["Properties"]
    policy = props.get("PolicyDocument") or props.get("KeyPolicy")
    return next(s for s in policy["Statement"] if s["Sid"] == sid)


def test_the_template_has_no_findings(committed):
    assert least_privilege.findings(committed) == []


def test_no_allow_anywhere_has_a_wildcard_action(committed):
    # Independent of the checker: every Allow of every policy lists plain actions.
    for name, resource in committed["Resources"].items():
        for _, document, _ in least_privilege._policies(resource):
            for body in document["Statement"]:
                if body["Effect"] == "Allow":
                    actions = least_privilege._list(body["Action"])
                    assert not [a for a in actions if "*" in a], f"{name} {body.get('Sid')}"


def _wildcard_action(t):
    statement(t, "ExecutionPolicy", "ReadData")["Action"].append("s3:*")


def _wildcard_resource(t):
    statement(t, "ExecutionPolicy", "ReadData")["Resource"] = ["*"]


def _scoped_action_joins_unscoped_one(t):
    statement(t, "ExecutionPolicy", "EcrLoginHasNoResourceLevelPermissions")["Action"].append(
        "ecr:BatchGetImage")


def _metrics_condition_removed(t):
    del statement(t, "ExecutionPolicy",
                  "MetricsHaveNoResourceLevelPermissionsSoScopedByNamespace")["Condition"]


def _not_action(t):
    body = statement(t, "ExecutionPolicy", "ReadData")
    body["NotAction"] = body.pop("Action")


def _pass_role_unconditioned(t):
    del statement(t, "ExecutionPolicy", "PassThisRoleToSageMakerOnly")["Condition"]


def _key_policy_wildcard(t):
    statement(t, "Key", "AccountAdministersTheKey")["Action"] = ["kms:*"]


def _key_rotation_off(t):
    t["Resources"]["Key"]["Properties"]["EnableKeyRotation"] = False


def _bucket_unencrypted(t):
    del t["Resources"]["DataBucket"]["Properties"]["BucketEncryption"]


def _bucket_on_s3_managed_keys(t):
    rule = t["Resources"]["ArtifactBucket"]["Properties"]["BucketEncryption"][
        "ServerSideEncryptionConfiguration"][0]["ServerSideEncryptionByDefault"]
    rule.clear()
    rule["SSEAlgorithm"] = "AES256"


def _bucket_on_a_foreign_key(t):
    t["Resources"]["DataBucket"]["Properties"]["BucketEncryption"][
        "ServerSideEncryptionConfiguration"][0]["ServerSideEncryptionByDefault"][
        "KMSMasterKeyID"] = "alias/aws/s3"


def _versioning_off(t):
    t["Resources"]["DataBucket"]["Properties"]["VersioningConfiguration"] = {"Status": "Suspended"}


def _public_policy_allowed(t):
    t["Resources"]["ArtifactBucket"]["Properties"]["PublicAccessBlockConfiguration"][
        "BlockPublicPolicy"] = False


def _public_acl(t):
    t["Resources"]["DataBucket"]["Properties"]["AccessControl"] = "PublicRead"


def _tls_deny_removed(t):
    del t["Resources"]["DataBucketPolicy"]


def _public_read_granted(t):
    policy = t["Resources"]["ArtifactBucketPolicy"]["Properties"]["PolicyDocument"]
    policy["Statement"].append({"Sid": "Anyone", "Effect": "Allow", "Principal": "*",
                                "Action": "s3:GetObject",
                                "Resource": {"Fn::Sub": "${ArtifactBucket.Arn}/*"}})


def _trust_opened(t):
    t["Resources"]["ExecutionRole"]["Properties"]["AssumeRolePolicyDocument"]["Statement"][0][
        "Principal"] = {"AWS": "*"}


def _group_prefix_widened_to_every_group(t):
    resources = statement(t, "CiPolicy", "CreateModelPackageGroupsNamedWithThePrefix")["Resource"]
    resources[0]["Fn::Sub"] = resources[0]["Fn::Sub"].replace("/llm-*", "/*")


def _job_arn_in_every_region(t):
    resources = statement(t, "CiPolicy", "ReadTheJobsOfTheExecutions")["Resource"]
    resources[0]["Fn::Sub"] = resources[0]["Fn::Sub"].replace("${AWS::Region}", "*")


def _conditional_grant_widened(t):
    # A policy the stack makes only when a parameter is set is checked all the same.
    statement(t, "CriticBedrockPolicy", "InvokeTheConstitutionalCriticBedrockModel")[
        "Resource"] = ["*"]


def _function_invocable_by_any_rule(t):
    del t["Resources"]["DeployOnApprovalPermission"]["Properties"]["SourceArn"]


def _function_may_serve_any_endpoint(t):
    resources = statement(t, "DeployOnApprovalPolicy", "ServeThemAtTheStagingEndpoint")["Resource"]
    resources[0]["Fn::Sub"] = resources[0]["Fn::Sub"].replace("endpoint/${StagingEndpointName}",
                                                              "endpoint/*")


def _tracking_server_widened(t):
    statement(t, "MlflowTrackingPolicy", "TrackRunsOnTheNamedMlflowTrackingServer")[
        "Resource"] = ["*"]


MUTATIONS = [
    (_wildcard_action, "ExecutionPolicy policy: statement ReadData: wildcard action s3:*"),
    (_wildcard_resource, "ExecutionPolicy policy: statement ReadData: s3:GetObject on Resource"),
    (_scoped_action_joins_unscoped_one, "ecr:BatchGetImage on Resource '*'"),
    (_metrics_condition_removed,
     "cloudwatch:PutMetricData on Resource '*' without a cloudwatch:namespace condition"),
    (_not_action, "statement ReadData: Allow with NotAction"),
    (_pass_role_unconditioned, "iam:PassRole without an iam:PassedToService condition"),
    (_key_policy_wildcard, "Key key policy: statement AccountAdministersTheKey: wildcard action"),
    (_key_rotation_off, "Key: key rotation is off"),
    (_bucket_unencrypted, "DataBucket: not encrypted with KMS"),
    (_bucket_on_s3_managed_keys, "ArtifactBucket: not encrypted with KMS"),
    (_bucket_on_a_foreign_key, "DataBucket: encrypted with a key this template does not create"),
    (_versioning_off, "DataBucket: versioning is not enabled"),
    (_public_policy_allowed, "ArtifactBucket: public access is not fully blocked"),
    (_public_acl, "DataBucket: canned ACL PublicRead"),
    (_tls_deny_removed, "DataBucket: no bucket policy denies requests without TLS"),
    (_public_read_granted,
     "ArtifactBucketPolicy bucket policy: statement Anyone: allows Principal '*'"),
    (_group_prefix_widened_to_every_group,
     "CreateModelPackageGroupsNamedWithThePrefix: allows every sagemaker model-package-group"),
    (_job_arn_in_every_region, "statement ReadTheJobsOfTheExecutions: allows every region"),
    (_conditional_grant_widened,
     "statement InvokeTheConstitutionalCriticBedrockModel: bedrock:InvokeModel on Resource '*'"),
    (_function_invocable_by_any_rule,
     "DeployOnApprovalPermission: lets any events.amazonaws.com resource invoke the function"),
    (_function_may_serve_any_endpoint,
     "ServeThemAtTheStagingEndpoint: allows every sagemaker endpoint"),
    (_tracking_server_widened,
     "statement TrackRunsOnTheNamedMlflowTrackingServer: sagemaker-mlflow:CreateExperiment, "),
    (_trust_opened,
     "ExecutionRole trust policy: statement SageMakerRunsThePipelinesAndJobs: allows Principal"),
]


@pytest.mark.parametrize(("mutate", "expected"), MUTATIONS,
                         ids=[mutate.__name__[1:] for mutate, _ in MUTATIONS])
def test_removing_a_protection_is_reported(committed, mutate, expected):
    mutated = copy.deepcopy(committed)
    mutate(mutated)
    found = least_privilege.findings(mutated)
    assert any(expected in finding for finding in found), found


def test_command_exits_1_and_prints_findings_for_a_weakened_template(committed, tmp_path):
    mutated = copy.deepcopy(committed)
    _wildcard_resource(mutated)
    path = tmp_path / "template.yaml"
    path.write_text(yaml.safe_dump(mutated))
    result = subprocess.run([sys.executable, "-m", "infra.least_privilege", str(path)],
                            cwd=template.TEMPLATE.parent.parent, capture_output=True, text=True,
                            check=False, timeout=60)
    assert result.returncode == 1
    assert "ReadData: s3:GetObject on Resource '*'" in result.stdout

"""What each role of the deployed stack may do, asked of its policies as IAM would ask them.

The stack is deployed on moto, so that CloudFormation (moto's) resolves every `Fn::Sub` and
`Fn::GetAtt`; each question then names a real request: an action and the ARN SageMaker or S3
gives the resource the command touches.
"""

import fnmatch
import json
import os
import warnings

import boto3
import pytest
import yaml
from moto import mock_aws

from infra import template
from pipelines import recipe
from pipelines.definition import DEMO_DATA_KEYS, pipeline_name

REGION = "us-east-1"


def allows(document: dict, action: str, resource: str, context: dict | None = None) -> bool:
    """Whether an identity policy allows `action` on `resource` with these condition keys.

    IAM's rules for what this template uses: an Allow applies when an action and a resource
    pattern match (`*` any characters, `?` one; actions case-insensitive) and every condition
    holds; a condition whose key the request lacks does not hold. Written here because moto's
    evaluator ignores missing condition keys. No statement here is a Deny.
    """
    context = context or {}
    for statement in document["Statement"]:
        actions = [a.lower() for a in _as_list(statement["Action"])]
        if statement["Effect"] != "Allow" or not any(
                fnmatch.fnmatchcase(action.lower(), pattern) for pattern in actions):
            continue
        if not any(fnmatch.fnmatchcase(resource, pattern)
                   for pattern in _as_list(statement["Resource"])):
            continue
        if all(_holds(operator, key, expected, context)
               for operator, block in statement.get("Condition", {}).items()
               for key, expected in block.items()):
            return True
    return False


def _as_list(value) -> list:
    return value if isinstance(value, list) else [value]


def _holds(operator: str, key: str, expected, context: dict) -> bool:
    if key not in context:
        return False
    match = {"StringEquals": lambda value, e: value == e,
             "StringLike": fnmatch.fnmatchcase}[operator]
    return any(match(context[key], e) for e in _as_list(expected))


def deploy(parameters: dict[str, str], policies: dict[str, tuple[str, str]]) -> dict:
    """The stack deployed on moto with `parameters`: its outputs, its account, and for each name
    in `policies` the resolved document of (role output, policy name)."""
    committed = yaml.safe_load(template.TEMPLATE.read_text())
    # Imported here: moto's CloudFormation models cost each test process a CPU second at
    # collection, and only this test's process needs them.
    from moto.cloudformation.parsing import get_model_map

    supported = get_model_map()
    deployable = {**committed, "Resources": {name: r for name, r in committed["Resources"].items()
                                            if r["Type"] in supported}}
    saved = {key: os.environ.get(key) for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    os.environ.update({key: "testing" for key in saved})
    try:
        with mock_aws():
            cloudformation = boto3.client("cloudformation", region_name=REGION)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # moto warns about every type it skips
                cloudformation.create_stack(
                    StackName="llm-lifecycle", TemplateBody=json.dumps(deployable),
                    Parameters=[{"ParameterKey": k, "ParameterValue": v}
                                for k, v in parameters.items()],
                    Capabilities=["CAPABILITY_IAM"])
            described = cloudformation.describe_stacks(StackName="llm-lifecycle")["Stacks"][0]
            outputs = {o["OutputKey"]: o["OutputValue"] for o in described["Outputs"]}
            iam = boto3.client("iam", region_name=REGION)
            documents = {}
            for name, (role_output, policy) in policies.items():
                role = outputs[role_output].rsplit("/", 1)[1]
                documents[name] = iam.get_role_policy(
                    RoleName=role, PolicyName=policy)["PolicyDocument"]
            if parameters.get("DeployOnApprovalGroup"):
                function = boto3.client("lambda", region_name=REGION).get_function(
                    FunctionName=f"{template.PREFIX}-deploy-on-approval")["Configuration"]
                role = function["Role"].rsplit("/", 1)[1]
                documents["deploy_on_approval"] = iam.get_role_policy(
                    RoleName=role,
                    PolicyName=f"{template.PREFIX}-deploy-on-approval")["PolicyDocument"]
                documents["function_environment"] = function["Environment"]["Variables"]
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    account = outputs["ExecutionRoleArn"].split(":")[4]
    return {"outputs": outputs, "account": account, **documents}


@pytest.fixture(scope="module")
def stack() -> dict:
    """The stack deployed on moto with a CI role: outputs, and each policy's resolved document."""
    return deploy({"GitHubRepository": "acme/llm", "DeployOnApprovalGroup": "llm-sft"},
                  {"execution": ("ExecutionRoleArn", f"{template.PREFIX}-execution"),
                   "ci": ("CiRoleArn", f"{template.PREFIX}-ci")})


def sagemaker_arn(stack: dict, resource: str) -> str:
    return f"arn:aws:sagemaker:{REGION}:{stack['account']}:{resource}"


def pipelines() -> list[str]:
    # SageMaker writes pipeline (and execution) ARNs in lower case.
    return [pipeline_name(recipe.load(name)).lower() for name in recipe.available()]


# -- the CI role: what `start --wait`, `cost` and `start --reuse` read ----------------------

def test_ci_role_can_list_the_steps_of_every_pipelines_executions(stack):
    for name in pipelines():
        execution = sagemaker_arn(stack, f"pipeline/{name}/execution/7k2x9q0abcde")
        assert allows(stack["ci"], "sagemaker:ListPipelineExecutionSteps", execution), name
    other = sagemaker_arn(stack, "pipeline/someone-elses/execution/7k2x9q0abcde")
    assert not allows(stack["ci"], "sagemaker:ListPipelineExecutionSteps", other)


def test_ci_role_can_describe_the_jobs_sagemaker_pipelines_starts_and_no_others(stack):
    # SageMaker Pipelines names its jobs pipelines-<execution id>-<step>-<suffix>.
    for action, kind in (("sagemaker:DescribeTrainingJob", "training-job"),
                         ("sagemaker:DescribeProcessingJob", "processing-job")):
        job = sagemaker_arn(stack, f"{kind}/pipelines-7k2x9q0abcde-sft-a1b2c3d4e5")
        assert allows(stack["ci"], action, job)
        assert not allows(stack["ci"], action, sagemaker_arn(stack, f"{kind}/my-notebook-job"))


# -- model package groups named with the prefix ---------------------------------------------

def test_ci_role_can_create_any_group_named_with_the_prefix_and_only_those(stack):
    for group in ("llm-sft", "llm-team-a-sft"):
        arn = sagemaker_arn(stack, f"model-package-group/{group}")
        assert allows(stack["ci"], "sagemaker:CreateModelPackageGroup", arn), group
        assert allows(stack["ci"], "sagemaker:DescribeModelPackageGroup", arn), group
    outside = sagemaker_arn(stack, "model-package-group/team-a-sft")
    assert not allows(stack["ci"], "sagemaker:CreateModelPackageGroup", outside)


def test_execution_role_registers_and_reads_packages_in_any_group_named_with_the_prefix(stack):
    group = sagemaker_arn(stack, "model-package-group/llm-team-a-sft")
    package = sagemaker_arn(stack, "model-package/llm-team-a-sft/3")
    assert allows(stack["execution"], "sagemaker:CreateModelPackage", group)
    assert allows(stack["execution"], "sagemaker:CreateModelPackage", package)
    assert allows(stack["execution"], "sagemaker:DescribeModelPackageGroup", group)
    # CompareWithApproved lists the group's packages and reads the newest Approved one.
    assert allows(stack["execution"], "sagemaker:ListModelPackages", package)
    assert allows(stack["execution"], "sagemaker:DescribeModelPackage", package)
    outside = sagemaker_arn(stack, "model-package/team-a-sft/3")
    assert not allows(stack["execution"], "sagemaker:CreateModelPackage", outside)


def test_every_recipes_own_group_is_named_with_the_prefix(stack):
    for name in recipe.available():
        chosen = recipe.load(name)
        group = chosen.parameters.get("ModelPackageGroup", chosen.model_package_group)
        arn = sagemaker_arn(stack, f"model-package-group/{str(group).lower()}")
        assert allows(stack["execution"], "sagemaker:CreateModelPackage", arn), name


def test_a_recipe_group_outside_the_prefix_is_refused_when_the_template_is_generated(tmp_path):
    source = recipe.RECIPES_DIR / "sft.yaml"
    outside = tmp_path / "team.yaml"
    outside.write_text(source.read_text().replace("model_package_group: llm-sft",
                                                  "model_package_group: team-sft"))
    with pytest.raises(ValueError, match=r"team-sft.*does not start with 'llm-'"):
        template.model_package_groups([recipe.load(str(outside))])


# -- the demo datasets `upsert --target aws` uploads ----------------------------------------

def test_ci_role_can_upload_and_read_the_demo_datasets_and_nothing_else_in_the_bucket(stack):
    bucket = stack["outputs"]["ArtifactBucketName"]
    for key in DEMO_DATA_KEYS.values():
        obj = f"arn:aws:s3:::{bucket}/{key}"
        assert allows(stack["ci"], "s3:PutObject", obj), key
        assert allows(stack["ci"], "s3:GetObject", obj), key  # HeadObject is authorised by it
    assert not allows(stack["ci"], "s3:PutObject", f"arn:aws:s3:::{bucket}/llm-sft/model.tar.gz")
    assert not allows(stack["ci"], "s3:DeleteObject", f"arn:aws:s3:::{bucket}/{key}")


def test_ci_role_uses_the_bucket_key_only_through_s3(stack):
    key = stack["outputs"]["KeyArn"]
    through_s3 = {"kms:ViaService": f"s3.{REGION}.amazonaws.com"}
    for action in ("kms:GenerateDataKey", "kms:Decrypt"):  # write, read (SSE-KMS)
        assert allows(stack["ci"], action, key, through_s3), action
        assert not allows(stack["ci"], action, key), f"{action} outside S3"


def test_ci_role_can_check_the_project_buckets_so_a_missing_object_reads_as_missing(stack):
    # HeadBucket (upsert) and ListObjectsV2 (the data-URI check of start) need s3:ListBucket;
    # without it S3 answers 403 where the object is absent, not 404.
    for output in ("ArtifactBucketName", "DataBucketName"):
        assert allows(stack["ci"], "s3:ListBucket", f"arn:aws:s3:::{stack['outputs'][output]}")
    assert not allows(stack["ci"], "s3:ListBucket", "arn:aws:s3:::someone-elses-bucket")


def test_checkpoints_left_under_every_pipelines_shared_prefix_expire(recipe_definitions):
    # Checkpoint locations are shared by every job of a step (keyed by the work, so that step
    # caching hits on AWS); a finished job deletes its own, a failed one's would stay for ever.
    committed = yaml.safe_load(template.TEMPLATE.read_text())
    rules = committed["Resources"]["ArtifactBucket"]["Properties"]["LifecycleConfiguration"]["Rules"]
    expiring = {rule["Prefix"]: rule["ExpirationInDays"] for rule in rules if "Prefix" in rule}
    document = json.loads(recipe_definitions["sft", "local"].read_text())
    uri = next(step["Arguments"]["CheckpointConfig"]["S3Uri"] for step in document["Steps"]
               if step["Type"] == "Training")
    key = uri.split("/", 3)[3]
    assert any(key.startswith(prefix) for prefix in expiring), (key, expiring)
    assert set(expiring.values()) == {template.CHECKPOINT_DAYS}
    assert len(expiring) == len(pipelines())


# -- deployment on approval (DeployOnApprovalGroup=llm-sft, StagingEndpointName llm-staging) ----

def test_deploy_on_approval_reads_the_packages_of_the_production_group_only(stack):
    role = stack["deploy_on_approval"]
    assert allows(role, "sagemaker:DescribeModelPackage",
                  sagemaker_arn(stack, "model-package/llm-sft/7"))
    assert not allows(role, "sagemaker:DescribeModelPackage",
                      sagemaker_arn(stack, "model-package/llm-dpo/7"))
    assert not allows(role, "sagemaker:UpdateModelPackage",
                      sagemaker_arn(stack, "model-package/llm-sft/7"))


def test_deploy_on_approval_creates_and_updates_the_staging_endpoint_and_no_other(stack):
    role = stack["deploy_on_approval"]
    deployment = "llm-staging-20261205100000"
    for action, resource in (("sagemaker:CreateModel", f"model/{deployment}"),
                             ("sagemaker:CreateEndpointConfig", f"endpoint-config/{deployment}"),
                             ("sagemaker:CreateEndpoint", "endpoint/llm-staging"),
                             ("sagemaker:UpdateEndpoint", "endpoint/llm-staging"),
                             ("sagemaker:DeleteEndpoint", "endpoint/llm-staging"),
                             ("sagemaker:DeleteEndpointConfig", f"endpoint-config/{deployment}"),
                             ("sagemaker:DeleteModel", f"model/{deployment}")):
        assert allows(role, action, sagemaker_arn(stack, resource)), action
    for action, resource in (("sagemaker:UpdateEndpoint", "endpoint/llm-production"),
                             ("sagemaker:DeleteEndpoint", "endpoint/llm-production"),
                             ("sagemaker:DeleteModel", "model/someone-elses-model"),
                             ("sagemaker:CreateTrainingJob", "training-job/llm-staging-1")):
        assert not allows(role, action, sagemaker_arn(stack, resource)), action


def test_deploy_on_approval_hosts_the_model_with_the_execution_role_and_passes_nothing_else(
        stack):
    role, execution = stack["deploy_on_approval"], stack["outputs"]["ExecutionRoleArn"]
    assert stack["function_environment"]["EXECUTION_ROLE_ARN"] == execution
    assert stack["function_environment"]["ENDPOINT_NAME"] == "llm-staging"
    to_sagemaker = {"iam:PassedToService": "sagemaker.amazonaws.com"}
    assert allows(role, "iam:PassRole", execution, to_sagemaker)
    assert not allows(role, "iam:PassRole", execution, {"iam:PassedToService":
                                                        "lambda.amazonaws.com"})
    assert not allows(role, "iam:PassRole", execution.replace("llm-lifecycle", "admin"),
                      to_sagemaker)


def test_the_execution_role_writes_the_logs_of_the_endpoints_it_hosts(stack):
    group = (f"arn:aws:logs:{REGION}:{stack['account']}:log-group:/aws/sagemaker/Endpoints/"
             "llm-staging:log-stream:AllTraffic/i-0abc")
    assert allows(stack["execution"], "logs:PutLogEvents", group)
    assert allows(stack["execution"], "logs:CreateLogStream", group)


# -- a SageMaker managed MLflow tracking server, when the stack names one --------------------

TRACKING_SERVER = "arn:aws:sagemaker:us-east-1:111122223333:mlflow-tracking-server/team"


@pytest.fixture(scope="module")
def tracked_stack() -> dict:
    return deploy({"MlflowTrackingServerArn": TRACKING_SERVER, "GitHubRepository": "acme/llm",
                   "MlflowArtifactBucket": "team-mlflow", "MlflowArtifactPrefix": "store"},
                  {"tracking": ("ExecutionRoleArn", f"{template.PREFIX}-mlflow-tracking"),
                   "artifacts": ("ExecutionRoleArn", f"{template.PREFIX}-mlflow-artifacts"),
                   "ci": ("CiRoleArn", f"{template.PREFIX}-ci-mlflow"),
                   "ci_pipelines": ("CiRoleArn", f"{template.PREFIX}-ci")})


def test_execution_role_tracks_runs_on_the_named_tracking_server_only(tracked_stack):
    # What steps.common.tracking asks of the server: experiment, execution run, step run, logs.
    for action in ("CreateExperiment", "GetExperimentByName", "SearchRuns", "CreateRun",
                   "GetRun", "LogBatch", "UpdateRun", "DeleteRun", "SetTag", "DeleteTag"):
        assert allows(tracked_stack["tracking"], f"sagemaker-mlflow:{action}", TRACKING_SERVER)
    other = TRACKING_SERVER.replace("/team", "/other-team")
    assert not allows(tracked_stack["tracking"], "sagemaker-mlflow:CreateRun", other)
    # Reading or deleting experiments, the UI, the MLflow model registry: not a step's business.
    for action in ("DeleteExperiment", "AccessUI", "CreateRegisteredModel"):
        assert not allows(tracked_stack["tracking"], f"sagemaker-mlflow:{action}",
                          TRACKING_SERVER)


def test_execution_role_writes_artifacts_under_the_artifact_store_prefix_only(tracked_stack):
    inside = "arn:aws:s3:::team-mlflow/store/3/0a1b2c/artifacts/loss_curve.png"
    assert allows(tracked_stack["artifacts"], "s3:PutObject", inside)
    assert not allows(tracked_stack["artifacts"], "s3:PutObject",
                      "arn:aws:s3:::team-mlflow/other/loss_curve.png")
    assert not allows(tracked_stack["artifacts"], "s3:DeleteObject", inside)


def test_without_a_tracking_server_the_stack_grants_no_mlflow_access():
    committed = yaml.safe_load(template.TEMPLATE.read_text())
    for name in ("MlflowTrackingPolicy", "MlflowArtifactsPolicy", "CiMlflowPolicy"):
        assert committed["Resources"][name]["Condition"] in committed["Conditions"]
    assert committed["Parameters"]["MlflowTrackingServerArn"]["Default"] == ""
    assert committed["Parameters"]["MlflowArtifactBucket"]["Default"] == ""


def test_ci_role_ends_the_execution_run_tagged_with_its_model_package(tracked_stack):
    # `start --wait` reads which store the execution tracked to, then tags and ends its run.
    execution = sagemaker_arn(tracked_stack, "pipeline/llm-sft/execution/7k2x9q0abcde")
    assert allows(tracked_stack["ci_pipelines"], "sagemaker:ListPipelineParametersForExecution",
                  execution)
    for action in ("GetExperimentByName", "SearchRuns", "SetTag", "UpdateRun"):
        assert allows(tracked_stack["ci"], f"sagemaker-mlflow:{action}", TRACKING_SERVER)
    assert not allows(tracked_stack["ci"], "sagemaker-mlflow:CreateRun", TRACKING_SERVER)

"""SageMaker's constraints beyond types, from botocore's model: each kind refused, one line each."""

import copy

import pytest

from pipelines import UserError
from pipelines.local.engine import validate_request
from pipelines.validation import problems

ROLE = "arn:aws:iam::123456789012:role/r"
PROCESSING = {
    "ProcessingJobName": "job", "RoleArn": ROLE,
    "AppSpecification": {"ImageUri": "123456789012.dkr.ecr.us-east-1.amazonaws.com/img:1",
                         "ContainerArguments": ["--output-dir", "/opt/ml/processing/output"]},
    "ProcessingResources": {"ClusterConfig": {
        "InstanceCount": 1, "InstanceType": "ml.m5.xlarge", "VolumeSizeInGB": 30}},
}
TRAINING = {
    "TrainingJobName": "job", "RoleArn": ROLE,
    "AlgorithmSpecification": {"TrainingImage": "img", "TrainingInputMode": "File"},
    "OutputDataConfig": {"S3OutputPath": "s3://bucket/out"},
    "ResourceConfig": {"InstanceType": "ml.g5.xlarge", "InstanceCount": 1, "VolumeSizeInGB": 100},
    "StoppingCondition": {"MaxRuntimeInSeconds": 3600},
}
PACKAGE = {
    "ModelPackageGroupName": "llm-sft", "ModelApprovalStatus": "PendingManualApproval",
    "InferenceSpecification": {"Containers": [{"Image": "img", "ModelDataUrl": "s3://b/m.tar.gz"}],
                               "SupportedContentTypes": ["application/json"],
                               "SupportedResponseMIMETypes": ["application/json"]},
    "CustomerMetadataProperties": {"recipe": "sft"},
}


def changed(request: dict, edit) -> dict:
    request = copy.deepcopy(request)
    edit(request)
    return request


def test_requests_within_every_constraint_pass():
    assert problems("CreateProcessingJob", PROCESSING) == []
    assert problems("CreateTrainingJob", TRAINING) == []
    assert problems("CreateModelPackage", PACKAGE) == []


@pytest.mark.parametrize("operation, request_, edit, expected", [
    # string length: a container argument over 256 characters (Evaluate's old --description)
    ("CreateProcessingJob", PROCESSING,
     lambda r: r["AppSpecification"]["ContainerArguments"].extend(["--x"] * 5 + ["d" * 370]),
     "AppSpecification.ContainerArguments[7]: 370 characters, over the maximum 256"),
    # string pattern, in AWS's \p{L} dialect: metadata values take no comma
    ("CreateModelPackage", PACKAGE,
     lambda r: r["CustomerMetadataProperties"].update(training_stages="sft,dpo"),
     "CustomerMetadataProperties.training_stages: 'sft,dpo' does not match SageMaker's pattern"),
    # enum
    ("CreateProcessingJob", PROCESSING,
     lambda r: r["ProcessingResources"]["ClusterConfig"].update(InstanceType="ml.bogus"),
     "ProcessingResources.ClusterConfig.InstanceType: 'ml.bogus' is not one of"),
    # list size
    ("CreateProcessingJob", PROCESSING,
     lambda r: r["AppSpecification"].update(ContainerArguments=["a"] * 101),
     "AppSpecification.ContainerArguments: 101 items, over the maximum 100"),
    # map size
    ("CreateModelPackage", PACKAGE,
     lambda r: r.update(CustomerMetadataProperties={f"k{i}": "v" for i in range(51)}),
     "CustomerMetadataProperties: 51 entries, over the maximum 50"),
    # map key pattern
    ("CreateModelPackage", PACKAGE,
     lambda r: r["CustomerMetadataProperties"].update({"a,b": "v"}),
     "CustomerMetadataProperties.key 'a,b': 'a,b' does not match"),
    # integer range
    ("CreateProcessingJob", PROCESSING,
     lambda r: r["ProcessingResources"]["ClusterConfig"].update(InstanceCount=0),
     "ProcessingResources.ClusterConfig.InstanceCount: 0 is under the minimum 1"),
    # string minimum length
    ("CreateTrainingJob", TRAINING, lambda r: r.update(TrainingJobName=""),
     "TrainingJobName: 0 characters, under the minimum 1"),
    # types, as botocore's own validator checks them
    ("CreateTrainingJob", TRAINING,
     lambda r: r["ResourceConfig"].update(InstanceCount="one"),
     "Invalid type for parameter ResourceConfig.InstanceCount"),
    # rules SageMaker documents between fields: 28 days at most, spot waits at least as long
    ("CreateTrainingJob", TRAINING,
     lambda r: r["StoppingCondition"].update(MaxRuntimeInSeconds=29 * 24 * 3600),
     "StoppingCondition.MaxRuntimeInSeconds: 2505600 is over SageMaker's limit of 2419200"),
    ("CreateTrainingJob", TRAINING,
     lambda r: r["StoppingCondition"].update(MaxWaitTimeInSeconds=7200),
     "StoppingCondition.MaxWaitTimeInSeconds: only allowed with EnableManagedSpotTraining true"),
    ("CreateTrainingJob", TRAINING,
     lambda r: (r.update(EnableManagedSpotTraining=True),
                r["StoppingCondition"].update(MaxWaitTimeInSeconds=60)),
     "StoppingCondition.MaxWaitTimeInSeconds: 60 is under MaxRuntimeInSeconds 3600"),
])
def test_each_kind_of_constraint_is_refused(operation, request_, edit, expected):
    found = problems(operation, changed(request_, edit))
    assert any(expected in line for line in found), found


def test_float_ranges_of_any_operation_are_checked():
    variant = {"VariantName": "v", "ModelName": "m", "InstanceType": "ml.m5.xlarge",
               "InitialInstanceCount": 1, "InitialVariantWeight": -1.0}
    found = problems("CreateEndpointConfig", {"EndpointConfigName": "c",
                                              "ProductionVariants": [variant]})
    assert found == ["ProductionVariants[0].InitialVariantWeight: -1.0 is under the minimum 0"]


def test_the_engine_names_the_step_and_the_field_in_one_line():
    request = changed(PROCESSING, lambda r: r["AppSpecification"]["ContainerArguments"].extend(
        ["--x"] * 5 + ["d" * 370]))
    with pytest.raises(UserError) as error:
        validate_request("Processing", request, "Evaluate")
    message = str(error.value)
    assert message == ("step Evaluate: CreateProcessingJob AppSpecification.ContainerArguments[7]: "
                       "370 characters, over the maximum 256")
    assert "\n" not in message

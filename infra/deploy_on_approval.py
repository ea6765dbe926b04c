"""Deployment on approval: the function the stack runs when a package of the production model
package group is Approved, which serves it at the staging endpoint.

EventBridge matches the registry's "SageMaker Model Package State Change" event (the stack's
rule: this group, ModelApprovalStatus Approved) and invokes this function, as SageMaker's MLOps
project templates deploy an approved model. It does what `llm-pipeline deploy ARN --target aws
--name STAGING` does, without waiting: CreateModel from the package (a container naming
ModelPackageName: the package's own image, artifact and environment), CreateEndpointConfig with
one variant, then CreateEndpoint, or UpdateEndpoint when the endpoint exists (SageMaker keeps the
old model answering until the new one passes /ping, and rolls back if it never does).

The template carries this file inline as the function's source (infra/template.py), so it
imports only what Lambda's Python runtime has: the standard library and boto3. That is why the
requests are built here and not taken from pipelines/deploy.py, which builds the same ones for
the command (tests/infra/test_deploy_on_approval.py holds the two to the same requests).

Settings, from the function's environment (the stack's parameters):
    ENDPOINT_NAME       the staging endpoint
    EXECUTION_ROLE_ARN  the role SageMaker hosts the model with (reads the artifact, pulls the
                        image): the stack's execution role
    INSTANCE_TYPE       the instance type; empty: the first one the package lists (the Register
                        step sizes them from the model), else ml.m5.xlarge
"""

from __future__ import annotations

import os
import re
import time

import boto3
from botocore.exceptions import ClientError

DEFAULT_INSTANCE_TYPE = "ml.m5.xlarge"  # a package that lists no inference instance types
VARIANT = "AllTraffic"
BUSY = ("Creating", "Updating", "SystemUpdating", "RollingBack", "Deleting")


def deploy_approved_package(event: dict, context: object = None) -> dict:
    """Lambda's entry point: serve the event's package at the staging endpoint; what was done."""
    return deploy(boto3.client("sagemaker"), event["detail"]["ModelPackageArn"],
                  endpoint_name=os.environ["ENDPOINT_NAME"],
                  role_arn=os.environ["EXECUTION_ROLE_ARN"],
                  instance_type=os.environ.get("INSTANCE_TYPE", ""))


def deploy(sagemaker, package_arn: str, *, endpoint_name: str, role_arn: str,
           instance_type: str = "", when: float | None = None) -> dict:
    """Create or update `endpoint_name` to serve the package; {"action": ..., ...}.

    SageMaker may send several events for one state change, and a package may be rejected again
    before the event arrives: a package that is no longer Approved, or that the endpoint already
    serves, is left alone. An error raises (Lambda retries the event twice, then its log keeps
    the reason), after deleting what this call created.
    """
    package = sagemaker.describe_model_package(ModelPackageName=package_arn)
    status = package.get("ModelApprovalStatus")
    if status != "Approved":
        return _said({"action": "skipped", "package": package_arn,
                      "reason": f"the package is {status} now"})
    endpoint = _describe_endpoint(sagemaker, endpoint_name)
    if endpoint is not None and package_arn in _served_packages(sagemaker, endpoint):
        return _said({"action": "skipped", "package": package_arn,
                      "reason": f"endpoint {endpoint_name} already serves it"})
    if endpoint is not None and endpoint["EndpointStatus"] == "Failed":
        # DeleteEndpoint is the only operation SageMaker allows on a failed endpoint (API
        # reference, DescribeEndpoint EndpointStatus): delete it, and let Lambda's retry create it
        # again once it is gone.
        sagemaker.delete_endpoint(EndpointName=endpoint_name)
        raise RuntimeError(f"endpoint {endpoint_name} had failed ({endpoint.get('FailureReason')}); "
                           f"deleted it: the retry of this event creates it with {package_arn}")
    if endpoint is not None and endpoint["EndpointStatus"] in BUSY:
        # Raised so that Lambda retries: a deployment in progress usually ends within minutes.
        raise RuntimeError(f"endpoint {endpoint_name} is {endpoint['EndpointStatus']}; "
                           f"deploy {package_arn} once it is InService or Failed")

    listed = package.get("InferenceSpecification", {}).get(
        "SupportedRealtimeInferenceInstanceTypes", [])
    chosen = instance_type or (listed[0] if listed else DEFAULT_INSTANCE_TYPE)
    created = deployment_names(endpoint_name, when)
    sagemaker.create_model(**model_request(created, package_arn, role_arn))
    try:
        sagemaker.create_endpoint_config(**endpoint_config_request(created, created, chosen))
        request = {"EndpointName": endpoint_name, "EndpointConfigName": created}
        if endpoint is None:
            sagemaker.create_endpoint(**request)
        else:
            sagemaker.update_endpoint(**request)
    except Exception:
        _delete(sagemaker, created, [created])
        raise
    if endpoint is not None:
        # The endpoint now moves off the configuration it was on when the deployment before
        # this one finished; what older deployments used is no longer referenced by anything.
        _delete_stale(sagemaker, endpoint_name, keep={created, endpoint["EndpointConfigName"]})
    return _said({"action": "updated" if endpoint else "created", "package": package_arn,
                  "endpoint": endpoint_name, "model": created, "instance_type": chosen})


def model_request(model_name: str, package_arn: str, role_arn: str) -> dict:
    """CreateModel from a model package (SageMaker developer guide, "Deploy a Model from the
    Registry"): the image, ModelDataUrl and Environment are the package's."""
    return {"ModelName": model_name, "ExecutionRoleArn": role_arn,
            "PrimaryContainer": {"ModelPackageName": package_arn}}


def endpoint_config_request(config_name: str, model_name: str, instance_type: str) -> dict:
    return {"EndpointConfigName": config_name,
            "ProductionVariants": [{"VariantName": VARIANT, "ModelName": model_name,
                                    "InstanceType": instance_type, "InitialInstanceCount": 1,
                                    "InitialVariantWeight": 1.0}]}


def deployment_names(name: str, when: float | None = None) -> str:
    """The Model's and EndpointConfig's name for one deployment of endpoint `name`: unique per
    deployment (an update needs new ones), within the 63 characters both allow, and starting
    with the endpoint's name, which the function's IAM policy is scoped to."""
    stamp = time.strftime("%Y%m%d%H%M%S", time.gmtime(when))
    return f"{name[:63 - len(stamp) - 1].rstrip('-')}-{stamp}"


def _said(outcome: dict) -> dict:
    print(outcome)  # the function's CloudWatch log: what each event did
    return outcome


def _describe_endpoint(sagemaker, name: str) -> dict | None:
    try:
        return sagemaker.describe_endpoint(EndpointName=name)
    except ClientError as err:
        if "Could not find" in err.response.get("Error", {}).get("Message", ""):
            return None
        raise


def _served_packages(sagemaker, endpoint: dict) -> set[str]:
    variants = sagemaker.describe_endpoint_config(
        EndpointConfigName=endpoint["EndpointConfigName"])["ProductionVariants"]
    return {sagemaker.describe_model(ModelName=variant["ModelName"]).get(
        "PrimaryContainer", {}).get("ModelPackageName", "") for variant in variants}


def _delete_stale(sagemaker, endpoint_name: str, keep: set[str]) -> None:
    """Delete the configs (and their models) of this endpoint's deployments but `keep`: names
    deployment_names gives, never another endpoint's (`staging-2-...` for endpoint `staging`)."""
    prefix = deployment_names(endpoint_name, 0)[:-len("19700101000000")]
    ours = re.compile(re.escape(prefix) + r"\d{14}")
    for page in sagemaker.get_paginator("list_endpoint_configs").paginate(NameContains=prefix):
        for config in page["EndpointConfigs"]:
            name = config["EndpointConfigName"]
            if ours.fullmatch(name) and name not in keep:
                _delete(sagemaker, name, [name])


def _delete(sagemaker, config_name: str, model_names: list[str]) -> None:
    for call, argument in ([(sagemaker.delete_endpoint_config,
                             {"EndpointConfigName": config_name})]
                           + [(sagemaker.delete_model, {"ModelName": m}) for m in model_names]):
        try:
            call(**argument)
        except ClientError as err:  # already gone
            print(f"could not delete {argument}: {err}")

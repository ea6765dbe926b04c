"""The SageMaker Model Registry as the command line shows it: list, approve, reject."""

from __future__ import annotations

import json

from botocore.exceptions import ClientError

from pipelines import UserError


def _evaluation(s3, package: dict) -> dict:
    uri = (package.get("ModelMetrics", {}).get("ModelQuality", {})
           .get("Statistics", {}).get("S3Uri"))
    if not uri or not uri.startswith("s3://"):
        return {}
    bucket, _, key = uri[5:].partition("/")
    try:
        document = json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
    except (ClientError, ValueError):
        return {}
    return {k: v.get("value") for k, v in document.get("metrics", {}).items() if isinstance(v, dict)}


def list_packages(sagemaker, s3, group: str | None = None) -> list[dict]:
    """Packages (newest first per group) with status, metadata and evaluation metrics."""
    if group:
        groups = [group]
    else:
        groups = [g["ModelPackageGroupName"] for page in
                  sagemaker.get_paginator("list_model_package_groups").paginate()
                  for g in page["ModelPackageGroupSummaryList"]]
    packages = []
    for name in sorted(groups):
        try:
            summaries = [s for page in sagemaker.get_paginator("list_model_packages").paginate(
                ModelPackageGroupName=name) for s in page["ModelPackageSummaryList"]]
        except ClientError as exc:
            raise UserError(f"cannot list model package group {name!r}: {exc}") from None
        for summary in sorted(summaries, key=lambda s: s.get("ModelPackageVersion", 0), reverse=True):
            package = sagemaker.describe_model_package(ModelPackageName=summary["ModelPackageArn"])
            packages.append({
                "arn": package["ModelPackageArn"],
                "group": name,
                "version": package.get("ModelPackageVersion"),
                "status": package.get("ModelApprovalStatus"),
                "created": str(package.get("CreationTime", "")),
                "description": package.get("ApprovalDescription", ""),
                "metadata": package.get("CustomerMetadataProperties", {}),
                "metrics": _evaluation(s3, package),
                "model_data": [c.get("ModelDataUrl") for c in
                               package.get("InferenceSpecification", {}).get("Containers", [])],
            })
    return packages


def set_status(sagemaker, arn: str, status: str, reason: str | None) -> dict:
    try:
        package = sagemaker.describe_model_package(ModelPackageName=arn)
    except ClientError as exc:
        raise UserError(f"model package {arn}: {exc.response['Error'].get('Message', exc)}; "
                        "see `llm-pipeline registry list` for ARNs") from None
    request = {"ModelPackageArn": arn, "ModelApprovalStatus": status}
    if reason:
        request["ApprovalDescription"] = reason
    # Some registries (moto among them) clear the metadata when an update omits it.
    if package.get("CustomerMetadataProperties"):
        request["CustomerMetadataProperties"] = package["CustomerMetadataProperties"]
    sagemaker.update_model_package(**request)
    return sagemaker.describe_model_package(ModelPackageName=arn)

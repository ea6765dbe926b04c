"""Registry promotion and comparison (pipelines/registry.py) against moto, in process."""

import json
import os
import re

import boto3
import pytest
from moto import mock_aws

from pipelines import UserError, registry

REGION = "us-east-1"
SOURCE_ACCOUNT = "123456789012"  # moto's default account
PROD_ACCOUNT = "210987654321"
BUCKET = "llm-artifacts"


@pytest.fixture
def aws(monkeypatch):
    """SageMaker, S3 and STS clients of an in-process moto, with none of the developer's AWS."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    with mock_aws():
        s3 = boto3.client("s3")
        s3.create_bucket(Bucket=BUCKET)
        yield boto3.client("sagemaker"), s3, boto3.client("sts")


def register(sagemaker, s3, group: str, metrics: dict, status: str = "PendingManualApproval",
             version: str = "1", **metadata: str) -> str:
    """A package shaped as the pipeline's Register step creates it (pipelines/definition.py)."""
    try:
        sagemaker.create_model_package_group(ModelPackageGroupName=group)
    except sagemaker.exceptions.ClientError:
        pass  # already there
    key = f"{group}/{version}/evaluation/evaluation.json"
    s3.put_object(Bucket=BUCKET, Key=key, Body=json.dumps(
        {"metrics": {k: {"value": v, "standard_deviation": 0.0} for k, v in metrics.items()}}))
    return sagemaker.create_model_package(
        ModelPackageGroupName=group, ModelApprovalStatus=status,
        ModelPackageDescription="sft: supervised fine-tuning",
        InferenceSpecification={
            "Containers": [{"Image": f"{SOURCE_ACCOUNT}.dkr.ecr.{REGION}.amazonaws.com/train:abc",
                            "ModelDataUrl": f"s3://{BUCKET}/{group}/{version}/model.tar.gz"}],
            "SupportedContentTypes": ["application/json"],
            "SupportedResponseMIMETypes": ["application/json"],
            "SupportedRealtimeInferenceInstanceTypes": ["ml.g5.xlarge"],
            "SupportedTransformInstanceTypes": ["ml.g5.xlarge"]},
        ModelMetrics={"ModelQuality": {"Statistics": {
            "ContentType": "application/json", "S3Uri": f"s3://{BUCKET}/{key}"}},
            "Bias": {}, "Explainability": {}},
        CustomerMetadataProperties={"recipe": "sft", "code_version": "c57c3aeae4797bab",
                                    "data_manifest_sha256": "ab" * 32,
                                    "param_BaseModel": "builtin:tiny", **metadata},
    )["ModelPackageArn"]


def approved(sagemaker, s3, group: str = "llm-sft", **metadata: str) -> str:
    arn = register(sagemaker, s3, group, {"perplexity": 12.0}, **metadata)
    registry.set_status(sagemaker, arn, "Approved", "reviewed")
    return arn


def group_names(sagemaker) -> list[str]:
    return [g["ModelPackageGroupName"]
            for g in sagemaker.list_model_package_groups()["ModelPackageGroupSummaryList"]]


# -- promote -------------------------------------------------------------------------------

def test_approve_promote_then_list_shows_it_in_the_production_group(aws):
    sagemaker, s3, _ = aws
    source = approved(sagemaker, s3)

    arn, created = registry.promote(sagemaker, source, "llm-sft-prod", "passed the review")

    assert created and arn != source
    [listed] = registry.list_packages(sagemaker, s3, "llm-sft-prod")
    original = registry.list_packages(sagemaker, s3, "llm-sft")[0]
    assert listed["arn"] == arn and listed["group"] == "llm-sft-prod"
    assert listed["status"] == "Approved" and source in listed["description"]
    assert listed["metadata"] == {**original["metadata"], "promoted_from": source,
                                  "promoted_by_reason": "passed the review"}
    assert (listed["image"], listed["model_data"], listed["metrics"]) == (
        original["image"], original["model_data"], {"perplexity": 12.0})
    described = sagemaker.describe_model_package(ModelPackageName=arn)
    assert described["ModelPackageDescription"] == "sft: supervised fine-tuning"
    group = sagemaker.describe_model_package_group(ModelPackageGroupName="llm-sft-prod")
    assert "Production group" in group["ModelPackageGroupDescription"]
    shown = registry.format_list([listed])
    assert "group=llm-sft-prod  status=Approved" in shown and f"promoted_from={source}" in shown


def test_promoting_again_finds_the_earlier_copy_instead_of_a_duplicate(aws):
    sagemaker, s3, _ = aws
    source = approved(sagemaker, s3)
    first, _ = registry.promote(sagemaker, source, "llm-sft-prod")
    # another package in the group that came from elsewhere does not count as the copy
    registry.promote(sagemaker, approved(sagemaker, s3, code_version="other"), "llm-sft-prod")

    again, created = registry.promote(sagemaker, source, "llm-sft-prod", "second try")

    assert (again, created) == (first, False)
    promoted_from = [p["metadata"]["promoted_from"]
                     for p in registry.list_packages(sagemaker, s3, "llm-sft-prod")]
    assert sorted(promoted_from).count(source) == 1 and len(promoted_from) == 2


@pytest.mark.parametrize("status", ["PendingManualApproval", "Rejected"])
def test_only_approved_packages_are_promoted_and_nothing_is_created(aws, status):
    sagemaker, s3, _ = aws
    source = register(sagemaker, s3, "llm-sft", {"perplexity": 12.0}, status=status)

    with pytest.raises(UserError, match=f"is {status}, not Approved.*registry approve"):
        registry.promote(sagemaker, source, "llm-sft-prod")

    assert group_names(sagemaker) == ["llm-sft"]


def test_promote_refuses_a_missing_package_and_the_package_own_group(aws):
    sagemaker, s3, _ = aws
    source = approved(sagemaker, s3)

    with pytest.raises(UserError, match="model package .*/9: .*registry list"):
        registry.promote(sagemaker, source.replace("/1", "/9"), "llm-sft-prod")
    with pytest.raises(UserError, match="already in group llm-sft .*--to-group.*--role-arn"):
        registry.promote(sagemaker, source, "llm-sft")

    assert group_names(sagemaker) == ["llm-sft"]
    assert len(registry.list_packages(sagemaker, s3, "llm-sft")) == 1


def test_cross_account_promotion_lands_in_the_assumed_role_account(aws):
    sagemaker, s3, sts = aws
    source = approved(sagemaker, s3)
    prod = registry.assume_role(sts, f"arn:aws:iam::{PROD_ACCOUNT}:role/registry-promoter", REGION)
    identity = prod.client("sts").get_caller_identity()
    assert identity["Account"] == PROD_ACCOUNT
    assert identity["Arn"].endswith(f"/{registry.PROMOTION_SESSION}")

    # the same group name is another group in another account
    arn, created = registry.promote(sagemaker, source, "llm-sft", "to prod",
                                    target=prod.client("sagemaker"))

    assert created and arn.split(":")[4] == PROD_ACCOUNT
    [listed] = registry.list_packages(prod.client("sagemaker"), s3, "llm-sft")
    assert listed["metadata"]["promoted_from"] == source and listed["status"] == "Approved"
    assert len(registry.list_packages(sagemaker, s3, "llm-sft")) == 1  # source account unchanged
    again, created = registry.promote(sagemaker, source, "llm-sft", target=prod.client("sagemaker"))
    assert (again, created) == (arn, False)


def test_promotion_keeps_the_reason_within_what_metadata_values_may_hold(aws):
    sagemaker, s3, _ = aws
    package = sagemaker.describe_model_package(ModelPackageName=approved(sagemaker, s3))
    reason = "LGTM, ticket #42 (prod rollout!) " + "x" * 300

    request = registry.promotion_request(package, "llm-sft-prod", reason)

    value = request["CustomerMetadataProperties"]["promoted_by_reason"]
    assert value.startswith("LGTM ticket 42 prod rollout x") and len(value) == 256
    assert re.fullmatch(r"[\w\s.:/=+\-@]*", value)
    assert request["ModelApprovalStatus"] == "Approved"
    note = registry.approval_note(package, reason)
    assert "LGTM, ticket #42 (prod rollout!)" in note and "(reviewed)" in note


# -- diff ----------------------------------------------------------------------------------

def test_diff_shows_differing_metadata_and_metric_deltas(aws):
    sagemaker, s3, _ = aws
    a = register(sagemaker, s3, "llm-sft", {"perplexity": 12.0, "accuracy": 0.5},
                 param_LearningRate="0.0002")
    b = register(sagemaker, s3, "llm-sft", {"perplexity": 10.5, "accuracy": 0.5, "rouge_l": 0.3},
                 version="2", param_LearningRate="0.0001", param_LoraRank="16")

    rows = {r["field"]: r for r in registry.diff(sagemaker, s3, a, b)}

    assert rows["metadata.param_LearningRate"] == {
        "field": "metadata.param_LearningRate", "a": "0.0002", "b": "0.0001", "delta": None}
    lora_rank = rows["metadata.param_LoraRank"]
    assert (lora_rank["a"], lora_rank["b"]) == (None, "16")
    assert rows["metric.perplexity"]["delta"] == pytest.approx(-1.5)
    assert (rows["metric.rouge_l"]["a"], rows["metric.rouge_l"]["delta"]) == (None, None)
    assert "model_data" in rows and "metric.accuracy" not in rows
    assert "metadata.recipe" not in rows and "group" not in rows
    table = registry.format_diff(a, b, list(rows.values())).splitlines()
    header = table[2]
    assert header.split() == ["field", "A", "B", "B", "-", "A"]
    perplexity = next(line for line in table if line.startswith("metric.perplexity"))
    assert perplexity.split()[1:] == ["12", "10.5", "-1.5"]
    assert perplexity.index("10.5") == header.index("B  ")  # columns aligned
    lora = next(line for line in table if line.startswith("metadata.param_LoraRank"))
    assert lora.split()[1:] == ["-", "16"]


def test_diff_of_a_package_with_itself_has_no_differences(aws):
    sagemaker, s3, _ = aws
    arn = register(sagemaker, s3, "llm-sft", {"perplexity": 12.0})

    assert registry.diff(sagemaker, s3, arn, arn) == []
    assert registry.format_diff(arn, arn, []).endswith("\nno differences")


def test_diff_of_a_promoted_copy_shows_the_group_and_its_lineage(aws):
    sagemaker, s3, _ = aws
    source = approved(sagemaker, s3)
    copy, _ = registry.promote(sagemaker, source, "llm-sft-prod")

    rows = {r["field"]: r for r in registry.diff(sagemaker, s3, source, copy)}

    assert rows["group"]["a"] == "llm-sft" and rows["group"]["b"] == "llm-sft-prod"
    assert rows["metadata.promoted_from"]["b"] == source
    assert not [f for f in rows if f.startswith("metric.") or f in ("image", "model_data")]

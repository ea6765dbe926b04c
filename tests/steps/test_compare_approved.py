"""The gate against the registry: the candidate must beat the group's newest Approved package."""

import json

import boto3
import pytest
from moto import mock_aws

from steps import compare_approved
from steps.common.contract import StageError
from steps.compare_approved import CompareApprovedConfig, compare_with_approved

GROUP = "llm-sft"


@pytest.fixture
def sagemaker():
    with mock_aws():
        client = boto3.client("sagemaker", region_name="us-east-1")
        client.create_model_package_group(ModelPackageGroupName=GROUP)
        yield client


def register(client, status: str, **metadata: str) -> str:
    """A package as the pipeline's Register step makes it (the gate value in eval_<metric>)."""
    return client.create_model_package(
        ModelPackageGroupName=GROUP, ModelApprovalStatus=status,
        InferenceSpecification={"Containers": [{"Image": "123456789012.dkr.ecr.us-east-1."
                                                "amazonaws.com/llm:1",
                                                "ModelDataUrl": "s3://b/model.tar.gz"}],
                                "SupportedContentTypes": ["application/json"],
                                "SupportedResponseMIMETypes": ["application/json"]},
        CustomerMetadataProperties={"gate_metric": "perplexity_ratio", **metadata},
    )["ModelPackageArn"]


def test_the_first_model_of_a_group_has_nothing_to_beat(sagemaker):
    register(sagemaker, "PendingManualApproval", eval_perplexity_ratio="9.0")  # not approved
    gate = compare_with_approved(GROUP, "perplexity_ratio", "higher", 1.2, 0.0, None, sagemaker)
    assert gate["beats_approved"] == 1 and gate["approved_package"] is None
    # A group that does not exist yet (the first registration creates it): the same.
    assert compare_with_approved("llm-new", "perplexity_ratio", "higher", 1.2, 0.0, None,
                                 sagemaker)["beats_approved"] == 1


def test_a_candidate_must_beat_the_newest_approved_package_by_the_margin(sagemaker):
    register(sagemaker, "Approved", eval_perplexity_ratio="1.10", data_manifest_sha256="abc")
    newest = register(sagemaker, "Approved", eval_perplexity_ratio="1.50",
                      data_manifest_sha256="abc")
    register(sagemaker, "Rejected", eval_perplexity_ratio="9.0")

    worse = compare_with_approved(GROUP, "perplexity_ratio", "higher", 1.30, 0.0, "abc", sagemaker)
    assert worse["beats_approved"] == 0 and worse["approved_package"] == newest
    assert worse["approved_value"] == 1.5 and worse["margin"] == pytest.approx(-0.2)
    assert worse["same_data"] is True

    better = compare_with_approved(GROUP, "perplexity_ratio", "higher", 1.60, 0.0, "xyz", sagemaker)
    assert better["beats_approved"] == 1 and better["same_data"] is False
    # Better, but not by the margin asked for.
    assert compare_with_approved(GROUP, "perplexity_ratio", "higher", 1.60, 0.2, None,
                                 sagemaker)["beats_approved"] == 0


def test_lower_is_better_metrics_compare_the_other_way(sagemaker):
    register(sagemaker, "Approved", eval_perplexity="20.0")
    assert compare_with_approved(GROUP, "perplexity", "lower", 18.0, 1.0, None,
                                 sagemaker)["beats_approved"] == 1
    assert compare_with_approved(GROUP, "perplexity", "lower", 19.5, 1.0, None,
                                 sagemaker)["beats_approved"] == 0


def test_an_approved_package_of_another_gate_blocks_rather_than_waves_through(sagemaker):
    register(sagemaker, "Approved", eval_win_rate="0.7")
    gate = compare_with_approved(GROUP, "perplexity_ratio", "higher", 5.0, 0.0, None, sagemaker)
    assert gate["beats_approved"] == 0 and "registered under another gate" in gate["reason"]


def only_aws_region(monkeypatch, tmp_path, region: str = "us-east-1") -> None:
    """The region as a SageMaker container has it: AWS_REGION, which boto3 does not read, and no
    AWS_DEFAULT_REGION or config file of the machine running the test."""
    monkeypatch.setenv("AWS_REGION", region)
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))


def candidate(tmp_path, value: float, data_sha256: str = "abc"):
    """The Evaluate and DataPrep outputs the stage reads: (evaluation dir, data dir)."""
    evaluation, data = tmp_path / "eval", tmp_path / "data"
    evaluation.mkdir(), data.mkdir()
    (evaluation / "evaluation.json").write_text(json.dumps(
        {"metrics": {"perplexity_ratio": {"value": value, "standard_deviation": 0.0}}}))
    (data / "manifest.json").write_text(json.dumps({"dataset_sha256": data_sha256}))
    return evaluation, data


def test_the_stage_reads_the_registry_with_only_aws_region_set_as_in_a_sagemaker_job(
        sagemaker, tmp_path, monkeypatch):
    only_aws_region(monkeypatch, tmp_path)
    approved = register(sagemaker, "Approved", eval_perplexity_ratio="1.5")
    evaluation, data = candidate(tmp_path, 1.4)

    compare_approved.main(CompareApprovedConfig(str(evaluation), str(tmp_path / "gate"), GROUP,
                                                "perplexity_ratio", data_dir=str(data)))

    gate = json.loads((tmp_path / "gate" / "gate.json").read_text())
    assert gate["approved_package"] == approved and gate["beats_approved"] == 0


def test_the_stage_writes_gate_json_or_one_error_line_and_nothing(sagemaker, tmp_path,
                                                                  monkeypatch):
    only_aws_region(monkeypatch, tmp_path)
    register(sagemaker, "Approved", eval_perplexity_ratio="1.5", data_manifest_sha256="abc")
    evaluation, data = candidate(tmp_path, 1.7)
    out = tmp_path / "gate"
    compare_approved.main(CompareApprovedConfig(str(evaluation), str(out), GROUP,
                                                "perplexity_ratio", data_dir=str(data)))
    gate = json.loads((out / "gate.json").read_text())
    assert gate["beats_approved"] == 1 and gate["same_data"] is True

    missing = tmp_path / "gate2"
    with pytest.raises(StageError, match="gate metric win_rate is not in .* change the recipe"):
        compare_approved.main(CompareApprovedConfig(str(evaluation), str(missing), GROUP,
                                                    "win_rate"))
    assert not missing.exists()


def test_an_unreadable_registry_is_one_clear_error(sagemaker):
    from botocore.stub import Stubber

    stubbed = boto3.client("sagemaker", region_name="us-east-1")
    with Stubber(stubbed) as stub:
        stub.add_client_error("list_model_packages", "AccessDeniedException",
                              "not authorized to perform: sagemaker:ListModelPackages")
        with pytest.raises(StageError, match="cannot read the Approved package of group llm-sft "
                                             ".*needs sagemaker:ListModelPackages"):
            compare_with_approved(GROUP, "perplexity_ratio", "higher", 1.0, 0.0, None, stubbed)

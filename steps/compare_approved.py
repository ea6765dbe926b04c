"""The candidate against the currently Approved model package of its group (processing stage).

    python -m steps.compare_approved --evaluation-dir EVAL --output-dir OUT
        --model-package-group GROUP --gate-metric METRIC [--gate-direction higher|lower]
        [--approved-margin 0.0] [--data-dir DATA]

Reads the candidate's evaluation.json (the Evaluate step's output), then the registry (SageMaker
ListModelPackages / DescribeModelPackage, through boto3 with the job's role, in the job's region)
for the newest
Approved package of the group the pipeline registers into, takes the gate metric's value that
package was registered with (its `eval_<metric>` metadata, written by the Register step) and
decides whether the candidate beats it by the required margin. It writes OUT/gate.json, which the
pipeline's condition reads:

    {"beats_approved": 1 | 0, "reason": "...", "approved_package": ARN | null,
     "approved_value": v | null, "candidate_value": v, "margin": m, "required_margin": r,
     "same_data": true | false | null}

It is a step of its own, never cached, rather than part of Evaluate: its answer depends on the
registry, which no step cache key sees, so a cached Evaluate would otherwise carry a comparison
made before the model it should beat was approved.

No Approved package yet (the first model of a group): beats_approved is 1. An Approved package
that records no value of this metric (registered under another gate) cannot be compared, and the
candidate does not pass: a person approves it, or changes the gate. The approved value was measured
on that package's own held-out data; `same_data` says whether it was the same data (by the data
manifest's sha256), so a reader can tell a like-for-like comparison from an indicative one.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from steps.common import contract
from steps.common.contract import StageError
from steps.compare_approved_config import CompareApprovedConfig


def main(config: CompareApprovedConfig) -> None:
    evaluation_path = Path(config.evaluation_dir) / "evaluation.json"
    if not evaluation_path.is_file():
        raise StageError(f"{evaluation_path} does not exist; give the Evaluate step's output")
    metrics = json.loads(evaluation_path.read_text(encoding="utf-8")).get("metrics", {})
    if config.gate_metric not in metrics:
        raise StageError(f"gate metric {config.gate_metric} is not in {evaluation_path} "
                         f"(measured: {', '.join(metrics)}); change the recipe's gate.metric")
    manifest = Path(config.data_dir) / "manifest.json" if config.data_dir else None
    data_sha256 = (json.loads(manifest.read_text(encoding="utf-8")).get("dataset_sha256")
                   if manifest and manifest.is_file() else None)
    gate = compare_with_approved(config.model_package_group, config.gate_metric,
                                 config.gate_direction, metrics[config.gate_metric]["value"],
                                 config.approved_margin, data_sha256)
    print(f"against the Approved package: {gate['reason']}", flush=True)
    with contract.atomic_output(Path(config.output_dir)) as staging:
        (staging / "gate.json").write_text(json.dumps(gate, indent=2) + "\n", encoding="utf-8")


def compare_with_approved(group: str, metric: str, direction: str, candidate: float,
                          required_margin: float, data_sha256: str | None,
                          client: Any = None) -> dict[str, Any]:
    """The "gate" block: whether `candidate` beats the group's newest Approved package."""
    package = newest_approved(group, client)
    gate: dict[str, Any] = {"approved_package": None, "approved_value": None,
                            "candidate_value": candidate, "margin": None,
                            "required_margin": required_margin, "same_data": None}
    if package is None:
        return {**gate, "beats_approved": 1,
                "reason": f"no Approved package in group {group} yet: nothing to beat"}
    metadata = package.get("CustomerMetadataProperties") or {}
    gate["approved_package"] = package["ModelPackageArn"]
    approved_data = metadata.get("data_manifest_sha256")
    gate["same_data"] = None if not (approved_data and data_sha256) else approved_data == data_sha256
    try:
        approved = float(metadata[f"eval_{metric}"])
    except (KeyError, ValueError):
        return {**gate, "beats_approved": 0,
                "reason": f"the Approved package {package['ModelPackageArn']} records no "
                          f"{metric}: it was registered under another gate, so the candidate "
                          "cannot be compared; approve it by hand or change the gate"}
    margin = candidate - approved if direction == "higher" else approved - candidate
    gate.update(approved_value=approved, margin=margin)
    beats = math.isfinite(margin) and margin >= required_margin
    better = "above" if direction == "higher" else "below"
    return {**gate, "beats_approved": int(beats),
            "reason": f"{metric} {candidate:.6g} vs {approved:.6g} of the Approved "
                      f"{package['ModelPackageArn']}: {margin:+.6g} {better} it, "
                      f"{'at least' if beats else 'less than'} the required {required_margin:g}"}


def newest_approved(group: str, client: Any = None) -> dict[str, Any] | None:
    """The newest Approved package of `group` (DescribeModelPackage's answer), or None."""
    from botocore.exceptions import BotoCoreError, ClientError

    if client is None:
        import boto3

        client = boto3.client("sagemaker", region_name=contract.aws_region())
    try:
        listed = client.list_model_packages(
            ModelPackageGroupName=group, ModelApprovalStatus="Approved", SortBy="CreationTime",
            SortOrder="Descending", MaxResults=1)["ModelPackageSummaryList"]
        if not listed:
            return None
        return client.describe_model_package(ModelPackageName=listed[0]["ModelPackageArn"])
    except ClientError as exc:
        error = exc.response.get("Error", {})
        if "does not exist" in error.get("Message", ""):
            return None  # no group yet: the pipeline's first registration creates it
        raise StageError(f"cannot read the Approved package of group {group} from the model "
                         f"registry: {error.get('Code')}: {error.get('Message')}; the job's role "
                         "needs sagemaker:ListModelPackages and DescribeModelPackage on it") from None
    except BotoCoreError as exc:
        raise StageError(f"cannot reach the model registry to read group {group}'s Approved "
                         f"package: {exc}; check the job's network and credentials") from None


if __name__ == "__main__":
    contract.run(main, CompareApprovedConfig, job="processing")

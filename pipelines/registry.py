"""The SageMaker Model Registry for the command line: list, approve/reject, promote, diff."""

from __future__ import annotations

import json
import unicodedata

from botocore.exceptions import ClientError

from pipelines import UserError

PROMOTION_SESSION = "llm-pipeline-promote"  # the STS session name a promotion's writes carry
# What a promoted package takes over from its source, as DescribeModelPackage returns it.
# Not SecurityConfig (a KMS key of the source account) nor anything the registry sets itself.
COPIED_FIELDS = ("ModelPackageDescription", "InferenceSpecification",
                 "AdditionalInferenceSpecifications", "ModelMetrics", "ModelCard", "Domain",
                 "Task", "SamplePayloadUrl", "DriftCheckBaselines", "MetadataProperties")
_METADATA_VALUE_MAX = 256


# -- reading -----------------------------------------------------------------------------

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


def describe(sagemaker, arn: str) -> dict:
    try:
        return sagemaker.describe_model_package(ModelPackageName=arn)
    except ClientError as exc:
        raise UserError(f"model package {arn}: {exc.response['Error'].get('Message', exc)}; "
                        "see `llm-pipeline registry list` for ARNs") from None


def summarize(s3, package: dict) -> dict:
    """One package as `registry list` shows it: status, metadata and evaluation metrics."""
    containers = package.get("InferenceSpecification", {}).get("Containers", [])
    return {
        "arn": package["ModelPackageArn"],
        "group": package.get("ModelPackageGroupName"),
        "version": package.get("ModelPackageVersion"),
        "status": package.get("ModelApprovalStatus"),
        "created": str(package.get("CreationTime", "")),
        "description": package.get("ApprovalDescription", ""),
        "metadata": package.get("CustomerMetadataProperties", {}),
        "metrics": _evaluation(s3, package),
        "image": [c.get("Image") for c in containers],
        "model_data": [c.get("ModelDataUrl") for c in containers],
    }


def _package_arns(sagemaker, group: str) -> list[str]:
    """The group's package ARNs, newest first; UserError if the group cannot be listed."""
    try:
        summaries = [s for page in sagemaker.get_paginator("list_model_packages").paginate(
            ModelPackageGroupName=group) for s in page["ModelPackageSummaryList"]]
    except ClientError as exc:
        raise UserError(f"cannot list model package group {group!r}: {exc}") from None
    summaries.sort(key=lambda s: s.get("ModelPackageVersion", 0), reverse=True)
    return [s["ModelPackageArn"] for s in summaries]


def list_packages(sagemaker, s3, group: str | None = None) -> list[dict]:
    """Packages (newest first per group) with status, metadata and evaluation metrics."""
    if group:
        groups = [group]
    else:
        groups = [g["ModelPackageGroupName"] for page in
                  sagemaker.get_paginator("list_model_package_groups").paginate()
                  for g in page["ModelPackageGroupSummaryList"]]
    return [summarize(s3, sagemaker.describe_model_package(ModelPackageName=arn))
            for name in sorted(groups) for arn in _package_arns(sagemaker, name)]


def format_list(packages: list[dict]) -> str:
    lines = []
    for package in packages:
        metrics = ", ".join(f"{k}={v:.4g}" for k, v in sorted(package["metrics"].items())
                            if _is_number(v) and not k.startswith("base_"))
        meta = package["metadata"]
        base_model = meta.get("base_model") or meta.get("param_BaseModel", "?")
        data = meta.get("data_manifest_sha256", "?")[:12]
        lines += [package["arn"],
                  f"  group={package['group']}  status={package['status']}  "
                  + f"created={package['created']}",
                  f"  recipe={meta.get('recipe', '?')}  base_model={base_model}  data={data}  "
                  + f"code={meta.get('code_version', '?')}",
                  f"  metrics: {metrics or '-'}"]
        if meta.get("promoted_from"):
            lines.append(f"  promoted_from={meta['promoted_from']}")
    return "\n".join(lines)


# -- approval ------------------------------------------------------------------------------

def set_status(sagemaker, arn: str, status: str, reason: str | None) -> dict:
    package = describe(sagemaker, arn)
    request = {"ModelPackageArn": arn, "ModelApprovalStatus": status}
    if reason:
        request["ApprovalDescription"] = reason
    # Some registries (moto among them) clear the metadata when an update omits it.
    if package.get("CustomerMetadataProperties"):
        request["CustomerMetadataProperties"] = package["CustomerMetadataProperties"]
    sagemaker.update_model_package(**request)
    return sagemaker.describe_model_package(ModelPackageName=arn)


# -- promotion -----------------------------------------------------------------------------

def assume_role(sts, role_arn: str, region: str):
    """A boto3 session with the credentials of `role_arn` (another account's, typically)."""
    import boto3

    try:
        credentials = sts.assume_role(RoleArn=role_arn,
                                      RoleSessionName=PROMOTION_SESSION)["Credentials"]
    except ClientError as exc:
        message = exc.response["Error"].get("Message", exc)
        raise UserError(f"cannot assume role {role_arn}: {message}; its trust policy must allow "
                        "the current credentials to assume it") from None
    return boto3.Session(aws_access_key_id=credentials["AccessKeyId"],
                         aws_secret_access_key=credentials["SecretAccessKey"],
                         aws_session_token=credentials["SessionToken"], region_name=region)


def _group_arn(sagemaker, group: str) -> str | None:
    try:
        described = sagemaker.describe_model_package_group(ModelPackageGroupName=group)
    except ClientError:
        return None
    return described["ModelPackageGroupArn"]


def _promoted_copy(sagemaker, group: str, source_arn: str) -> str | None:
    """The package of `group` that an earlier promotion of `source_arn` created, if any."""
    for arn in _package_arns(sagemaker, group):
        metadata = sagemaker.describe_model_package(ModelPackageName=arn).get(
            "CustomerMetadataProperties", {})
        if metadata.get("promoted_from") == source_arn:
            return arn
    return None


def _metadata_value(text: str) -> str:
    """`text` as a metadata value may hold it: letters, digits, spaces and _.:/=+-@ only."""
    kept = "".join(c if unicodedata.category(c)[0] in "LNZ" or c in "_.:/=+-@" else " "
                   for c in text)
    return " ".join(kept.split())[:_METADATA_VALUE_MAX] or "-"


def promotion_request(package: dict, group: str, reason: str | None) -> dict:
    """CreateModelPackage arguments for an Approved copy of the Approved `package` in `group`."""
    metadata = {k: v for k, v in package.get("CustomerMetadataProperties", {}).items()
                if k != "promoted_by_reason"}
    metadata["promoted_from"] = package["ModelPackageArn"]
    if reason:
        metadata["promoted_by_reason"] = _metadata_value(reason)
    return {**{k: package[k] for k in COPIED_FIELDS if package.get(k)},
            "ModelPackageGroupName": group, "ModelApprovalStatus": "Approved",
            "CustomerMetadataProperties": metadata}


def approval_note(package: dict, reason: str | None) -> str:
    """The promoted copy's approval description: where it was approved, and why it moved."""
    note = f"promoted from {package['ModelPackageArn']}, where it was approved"
    if package.get("ApprovalDescription"):
        note += f" ({package['ApprovalDescription']})"
    return (note + (f"; promotion reason: {reason}" if reason else ""))[:1024]


def promote(sagemaker, arn: str, group: str, reason: str | None = None,
            target=None) -> tuple[str, bool]:
    """Copy the Approved package `arn` into `group`; returns (its ARN there, whether created now).

    `target` is the SageMaker client of the account to promote into (credentials of an
    assumed role); by default the source's own account. Nothing is created when the package
    is not Approved, the group is its own group, or an earlier promotion already copied it.
    """
    target = target or sagemaker
    package = describe(sagemaker, arn)
    status = package.get("ModelApprovalStatus")
    if status != "Approved":
        raise UserError(f"model package {arn} is {status}, not Approved; only approved packages "
                        f"are promoted: `llm-pipeline registry approve {arn} --reason ...` first")
    source_group = _group_arn(sagemaker, package["ModelPackageGroupName"]) or ""
    target_group = _group_arn(target, group)
    if target_group and target_group.lower() == source_group.lower():
        raise UserError(f"model package {arn} is already in group {group} ({target_group}); "
                        "promote it to another group (--to-group) or account (--role-arn)")
    if target_group:
        existing = _promoted_copy(target, group, arn)
        if existing:
            return existing, False
    try:
        if not target_group:
            target.create_model_package_group(
                ModelPackageGroupName=group,
                ModelPackageGroupDescription="Production group: approved model packages promoted "
                                             "here by `llm-pipeline registry promote`")
        created = target.create_model_package(**promotion_request(package, group, reason))
        # CreateModelPackage takes no approval description; the update adds it.
        set_status(target, created["ModelPackageArn"], "Approved", approval_note(package, reason))
    except ClientError as exc:
        raise UserError(f"cannot create the promoted package in group {group}: "
                        f"{exc.response['Error'].get('Message', exc)}") from None
    return created["ModelPackageArn"], True


# -- comparison ----------------------------------------------------------------------------

def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _joined(values: list) -> str | None:
    return ", ".join(str(v) for v in values if v) or None


def diff(sagemaker, s3, arn_a: str, arn_b: str) -> list[dict]:
    """Rows {field, a, b, delta} for every field in which package B differs from package A."""
    a, b = (summarize(s3, describe(sagemaker, arn)) for arn in (arn_a, arn_b))
    rows = []

    def compare(field: str, value_a, value_b, numeric: bool = False) -> None:
        if value_a != value_b:
            both = numeric and value_a is not None and value_b is not None
            rows.append({"field": field, "a": value_a, "b": value_b,
                         "delta": value_b - value_a if both else None})

    for field in ("group", "status", "created"):
        compare(field, a[field] or None, b[field] or None)
    compare("approval", a["description"] or None, b["description"] or None)
    compare("image", _joined(a["image"]), _joined(b["image"]))
    compare("model_data", _joined(a["model_data"]), _joined(b["model_data"]))
    for key in sorted(a["metadata"].keys() | b["metadata"].keys()):
        compare(f"metadata.{key}", a["metadata"].get(key), b["metadata"].get(key))
    metrics_a, metrics_b = ({k: v for k, v in s["metrics"].items() if _is_number(v)}
                            for s in (a, b))
    for name in sorted(metrics_a.keys() | metrics_b.keys()):
        compare(f"metric.{name}", metrics_a.get(name), metrics_b.get(name), numeric=True)
    return rows


def _cell(value) -> str:
    if value is None:
        return "-"
    return f"{value:.6g}" if _is_number(value) else str(value)


def format_diff(arn_a: str, arn_b: str, rows: list[dict]) -> str:
    head = f"A: {arn_a}\nB: {arn_b}"
    if not rows:
        return f"{head}\nno differences"
    table = [("field", "A", "B", "B - A")] + [
        (r["field"], _cell(r["a"]), _cell(r["b"]),
         "" if r["delta"] is None else f"{r['delta']:+.6g}") for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(3)]
    return head + "\n" + "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths + [0])).rstrip()
        for line in table)


# -- the command ---------------------------------------------------------------------------

def _promote_command(args, sagemaker, s3, assumed) -> None:
    target = assumed.client("sagemaker") if assumed else None
    arn, created = promote(sagemaker, args.arn, args.to_group, args.reason, target)
    if created:
        print(f"{arn}: promoted from {args.arn} to group {args.to_group} (Approved)")
    else:
        print(f"{arn}: already promoted from {args.arn} to group {args.to_group}; "
              "not promoting it again")


def _list_command(args, sagemaker, s3, assumed) -> None:
    packages = list_packages(sagemaker, s3, args.group)
    if args.json:
        print(json.dumps(packages, indent=1, default=str))
    elif not packages:
        print("no model packages" + (f" in group {args.group}" if args.group else ""))
    else:
        print(format_list(packages))


def _diff_command(args, sagemaker, s3, assumed) -> None:
    rows = diff(sagemaker, s3, args.arn, args.other)
    if args.json:
        print(json.dumps({"a": args.arn, "b": args.other, "differences": rows}, indent=1,
                         default=str))
    else:
        print(format_diff(args.arn, args.other, rows))


def _status_command(args, sagemaker, s3, assumed) -> None:
    status = {"approve": "Approved", "reject": "Rejected"}[args.action]
    package = set_status(sagemaker, args.arn, status, args.reason)
    print(f"{package['ModelPackageArn']}: {package['ModelApprovalStatus']}")


def run_action(args) -> int:
    """`llm-pipeline registry ACTION`: the action on the target's registry, in the role's account
    with --role-arn (promote: from the caller's account into the role's)."""
    import boto3
    from botocore.exceptions import BotoCoreError

    from pipelines.targets import registry_region

    region = registry_region(args)
    try:
        home = boto3.Session(region_name=region)
        assumed = (assume_role(home.client("sts"), args.role_arn, region)
                   if args.role_arn else None)
        # promote reads the source with the caller's credentials and writes with the role's;
        # every other action works in the role's account.
        session = assumed if assumed and args.action != "promote" else home
        action = {"list": _list_command, "diff": _diff_command,
                  "promote": _promote_command}.get(args.action, _status_command)
        action(args, session.client("sagemaker"), session.client("s3"), assumed)
    except ClientError as exc:
        raise UserError(f"registry {args.action}: {exc}") from None
    except BotoCoreError as exc:
        raise UserError(f"registry {args.action}: {exc}; check the AWS credentials and region "
                        "(`aws configure`, AWS_PROFILE, --region)") from None
    return 0

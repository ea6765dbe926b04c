"""Least-privilege and data-protection checks of a CloudFormation template.

    python -m infra.least_privilege [TEMPLATE]    # prints the findings; exit 1 when there are any

A finding names the resource (and the policy statement) and what is wrong:

- an Allow with a wildcard in an action (`*`, `s3:*`, `s3:Get*`) or with NotAction;
- an Allow on Resource `*` (or NotResource) in an identity policy, unless each of its actions
  has no resource-level permissions (NO_RESOURCE_LEVEL below), carrying the condition key that
  narrows the action where one exists;
- an Allow on an ARN whose wildcard stands for a whole name, region or account
  (`model-package-group/*`, `arn:aws:sagemaker:*:*:...`): a wildcard may only end a name
  prefix the project owns (`model-package-group/llm-*`, `training-job/pipelines-*`) or follow
  a named parent (`${Bucket.Arn}/*`, `pipeline/llm-sft/execution/*`);
- an Allow to Principal `*` (anyone) in a resource or trust policy;
- iam:PassRole without an iam:PassedToService condition;
- a Lambda permission for a service principal without a SourceArn (any rule, bucket or topic of
  any account could invoke the function);
- a bucket without default encryption by a KMS key of this template, without versioning,
  without a full public access block, with a public canned ACL, or without a bucket policy that
  denies requests made without TLS; a KMS key without rotation.

Deny statements may be as broad as they like: breadth is what makes a Deny protect.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

import yaml

TEMPLATE = Path(__file__).with_name("template.yaml")

# Actions IAM cannot scope to a resource -> the condition key that narrows them (None: none does).
NO_RESOURCE_LEVEL: dict[str, str | None] = {
    "ecr:GetAuthorizationToken": None,
    "cloudwatch:PutMetricData": "cloudwatch:namespace",
    "sagemaker:ListEndpointConfigs": None,
}
_PUBLIC_ACLS = {"PublicRead", "PublicReadWrite", "AuthenticatedRead"}


def _list(value: Any) -> list:
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


def _is_public(principal: Any) -> bool:
    if principal == "*":
        return True
    return isinstance(principal, dict) and "*" in _list(principal.get("AWS"))


def _condition_keys(statement: dict) -> set[str]:
    return {key for block in (statement.get("Condition") or {}).values()
            for key in (block or {})}


def _arn_text(resource: Any) -> str | None:
    """The text of an ARN written plainly or with Fn::Sub, pseudo parameters such as
    `${AWS::Region}` written `<Region>` (their own colons would split the ARN wrongly)."""
    if isinstance(resource, dict) and "Fn::Sub" in resource:
        body = resource["Fn::Sub"]
        resource = body[0] if isinstance(body, list) else body
    if not isinstance(resource, str):
        return None
    return re.sub(r"\$\{AWS::(\w+)\}", r"<\1>", resource)


def _unnamed_wildcard(arn: str) -> str | None:
    """What a wildcard in `arn` stands for when it is a whole region, account or name; None when
    every wildcard is bounded by a name the project owns."""
    parts = arn.split(":", 5)
    if len(parts) < 6 or parts[0] != "arn":
        return None  # `${Bucket.Arn}/*`: the objects of a named bucket
    _, _, service, region, account, resource = parts
    if "*" in (region, account):
        return f"every {'region' if region == '*' else 'account'} ({arn})"
    kind, separator, name = resource.partition("/") if "/" in resource else resource.partition(":")
    if resource.startswith("*") or (separator and name.startswith("*")):
        return f"every {service} {kind if separator else 'resource'} ({arn})"
    return None


def _statement_findings(where: str, statement: dict, kind: str) -> list[str]:
    """kind: 'identity' (IAM policies), 'resource' (bucket, key, repository), 'trust'."""
    if statement.get("Effect") != "Allow":
        return []
    name = f"{where}: statement {statement.get('Sid', '(no Sid)')}"
    actions = [a for a in _list(statement.get("Action")) if isinstance(a, str)]
    found = []
    if "NotAction" in statement:
        found.append(f"{name}: Allow with NotAction grants every other action; list the actions")
    wild = [a for a in actions if "*" in a or "?" in a]
    if wild:
        found.append(f"{name}: wildcard action {', '.join(wild)}; list the actions it needs")
    if _is_public(statement.get("Principal")):
        found.append(f"{name}: allows Principal '*' (public access); name the principals")
    if kind == "identity":
        if "NotResource" in statement:
            found.append(f"{name}: Allow with NotResource applies to every other resource; "
                         "name the resources")
        if "*" in _list(statement.get("Resource")):
            scoped = [a for a in actions if a not in NO_RESOURCE_LEVEL]
            if scoped or not actions:
                found.append(f"{name}: {', '.join(scoped) or 'its actions'} on Resource '*'; "
                             "scope them to the project's ARNs")
            keys = _condition_keys(statement)
            for action in actions:
                key = NO_RESOURCE_LEVEL.get(action)
                if key and key not in keys:
                    found.append(f"{name}: {action} on Resource '*' without a {key} condition; "
                                 "add one to narrow it")
        for resource in _list(statement.get("Resource")):
            text = _arn_text(resource)
            broad = _unnamed_wildcard(text) if text and text != "*" else None
            if broad:
                found.append(f"{name}: allows {broad}; scope the wildcard to a name prefix the "
                             "project owns")
        if "iam:PassRole" in actions and "iam:PassedToService" not in _condition_keys(statement):
            found.append(f"{name}: iam:PassRole without an iam:PassedToService condition; "
                         "say which service may receive the role")
    return found


def _policies(resource: dict) -> list[tuple[str, dict, str]]:
    """(label, policy document, kind) of every policy a resource carries."""
    kind, props = resource.get("Type"), resource.get("Properties") or {}
    if kind in ("AWS::IAM::Policy", "AWS::IAM::ManagedPolicy"):
        return [("policy", props.get("PolicyDocument") or {}, "identity")]
    if kind == "AWS::IAM::Role":
        documents = [("trust policy", props.get("AssumeRolePolicyDocument") or {}, "trust")]
        for inline in props.get("Policies") or []:
            documents.append((f"inline policy {inline.get('PolicyName')}",
                              inline.get("PolicyDocument") or {}, "identity"))
        return documents
    if kind == "AWS::S3::BucketPolicy":
        return [("bucket policy", props.get("PolicyDocument") or {}, "resource")]
    if kind == "AWS::KMS::Key":
        # In a key policy Resource '*' means the key itself.
        return [("key policy", props.get("KeyPolicy") or {}, "resource")]
    if kind == "AWS::ECR::Repository" and "RepositoryPolicyText" in props:
        return [("repository policy", props["RepositoryPolicyText"], "resource")]
    return []


def _references(value: Any) -> str | None:
    """The logical id a `Ref` or `Fn::GetAtt` points at."""
    if isinstance(value, dict):
        if "Ref" in value:
            return value["Ref"]
        if "Fn::GetAtt" in value:
            target = value["Fn::GetAtt"]
            return target[0] if isinstance(target, list) else str(target).split(".")[0]
    return None


def _denies_plain_http(document: dict) -> bool:
    for statement in _list(document.get("Statement")):
        condition = (statement.get("Condition") or {}).get("Bool") or {}
        actions = _list(statement.get("Action"))
        if (statement.get("Effect") == "Deny" and _is_public(statement.get("Principal"))
                and str(condition.get("aws:SecureTransport")).lower() == "false"
                and ("s3:*" in actions or "*" in actions)):
            return True
    return False


def _bucket_findings(name: str, props: dict, resources: dict) -> list[str]:
    found = []
    rules = (props.get("BucketEncryption") or {}).get("ServerSideEncryptionConfiguration") or []
    default = (rules[0].get("ServerSideEncryptionByDefault") or {}) if rules else {}
    key = _references(default.get("KMSMasterKeyID"))
    if default.get("SSEAlgorithm") not in ("aws:kms", "aws:kms:dsse"):
        found.append(f"{name}: not encrypted with KMS by default; set BucketEncryption to "
                     "aws:kms with the template's key")
    elif (resources.get(key) or {}).get("Type") not in ("AWS::KMS::Key", "AWS::KMS::Alias"):
        found.append(f"{name}: encrypted with a key this template does not create; point "
                     "KMSMasterKeyID at the template's AWS::KMS::Key")
    if (props.get("VersioningConfiguration") or {}).get("Status") != "Enabled":
        found.append(f"{name}: versioning is not enabled; set VersioningConfiguration.Status "
                     "to Enabled")
    block = props.get("PublicAccessBlockConfiguration") or {}
    open_flags = [flag for flag in ("BlockPublicAcls", "BlockPublicPolicy", "IgnorePublicAcls",
                                    "RestrictPublicBuckets") if block.get(flag) is not True]
    if open_flags:
        found.append(f"{name}: public access is not fully blocked ({', '.join(open_flags)} not "
                     "true)")
    if props.get("AccessControl") in _PUBLIC_ACLS:
        found.append(f"{name}: canned ACL {props['AccessControl']} makes it public")
    policies = [r for r in resources.values() if r.get("Type") == "AWS::S3::BucketPolicy"
                and _references((r.get("Properties") or {}).get("Bucket")) == name]
    if not any(_denies_plain_http((p.get("Properties") or {}).get("PolicyDocument") or {})
               for p in policies):
        found.append(f"{name}: no bucket policy denies requests without TLS "
                     "(Deny s3:* when aws:SecureTransport is false)")
    return found


def findings(template: dict) -> list[str]:
    """Everything wrong with the template's permissions and data protection; [] when nothing."""
    resources = template.get("Resources") or {}
    found: list[str] = []
    for name, resource in resources.items():
        for label, document, kind in _policies(resource):
            for statement in _list(document.get("Statement")):
                found += _statement_findings(f"{name} {label}", statement, kind)
        props = resource.get("Properties") or {}
        if resource.get("Type") == "AWS::S3::Bucket":
            found += _bucket_findings(name, props, resources)
        if (resource.get("Type") == "AWS::Lambda::Permission"
                and str(props.get("Principal", "")).endswith(".amazonaws.com")
                and "SourceArn" not in props):
            found.append(f"{name}: lets any {props['Principal']} resource invoke the function; "
                         "set SourceArn to the one that should")
        if resource.get("Type") == "AWS::KMS::Key" and props.get("EnableKeyRotation") is not True:
            found.append(f"{name}: key rotation is off; set EnableKeyRotation: true")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infra.least_privilege", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("template", nargs="?", type=Path, default=TEMPLATE)
    args = parser.parse_args(argv)
    try:
        template = yaml.safe_load(args.template.read_text())
    except (OSError, yaml.YAMLError) as exc:
        print(f"error: cannot read {args.template}: {exc}".replace("\n", " "), file=sys.stderr)
        return 2
    found = findings(template)
    for finding in found:
        print(finding)
    if found:
        print(f"{len(found)} finding(s) in {args.template}", file=sys.stderr)
        return 1
    print(f"{args.template}: no findings")
    return 0


if __name__ == "__main__":
    sys.exit(main())

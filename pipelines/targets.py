"""Where the commands work: the local server or an AWS account, and boto3 pointed at it.

`--target local` (the default) uses the AWS endpoint named by AWS_ENDPOINT_URL* when set,
otherwise the local server on 127.0.0.1 (pipelines/local/server.py), which `connect` starts.
`--target aws` uses the caller's AWS credentials, region and account. The functions here take the
command's parsed arguments (`target`, `region`, `role_arn`, `bucket`, `job_runner`) as they come.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from pipelines import UserError, definition
from pipelines.local import server


@dataclass(frozen=True)
class Target:
    """Where the commands work: the account, region, role and bucket of the local server or of
    AWS, and the endpoint, in words."""

    region: str
    account: str
    role_arn: str
    bucket: str
    endpoint: str

    def client(self, service: str):
        """A boto3 client of the target's region (the command's --region, or the resolved one)."""
        import boto3

        return boto3.client(service, region_name=self.region)

    def execution_arn(self, reference: str, pipeline_name: str) -> str:
        """The ARN of an execution given by its id (or already by its ARN)."""
        if reference.startswith("arn:"):
            return reference
        return (f"arn:aws:sagemaker:{self.region}:{self.account}:pipeline/"
                f"{pipeline_name}/execution/{reference}")


def aws_region(region: str | None) -> str:
    """The AWS region a command works in: --region, else boto3's own configuration
    (AWS_DEFAULT_REGION, the profile's region); a one-line error when there is none."""
    import boto3
    from botocore.exceptions import BotoCoreError

    try:
        region = region or boto3.Session().region_name
    except BotoCoreError as exc:  # a broken profile or config file
        raise UserError(f"cannot read the AWS configuration ({exc}); pass --region") from None
    if not region:
        raise UserError("no AWS region: pass --region or set AWS_DEFAULT_REGION (or a region in "
                        "the AWS profile)")
    return region


def connect(args) -> Target:
    """Point boto3 at the chosen target; returns what the commands need to know about it."""
    if args.target == "local":
        if server.endpoint_configured():
            endpoint = "named by AWS_ENDPOINT_URL*"
        else:
            endpoint = server.use_local_aws(getattr(args, "job_runner", None))
        os.environ.setdefault("AWS_DEFAULT_REGION", server.LOCAL_REGION)
        os.environ.setdefault("AWS_ACCESS_KEY_ID", "local")
        os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "local")
        region = args.region or os.environ["AWS_DEFAULT_REGION"]
        return Target(region=region, account=definition.LOCAL_ACCOUNT,
                      role_arn=args.role_arn or definition.DEFAULT_ROLE_ARN,
                      bucket=args.bucket or definition.DEFAULT_BUCKET, endpoint=endpoint)
    import boto3
    from botocore.exceptions import BotoCoreError, ClientError

    region = aws_region(args.region)
    try:
        account = boto3.client("sts", region_name=region).get_caller_identity()["Account"]
    except (BotoCoreError, ClientError) as exc:
        raise UserError(f"cannot reach AWS with the current credentials ({exc}); "
                        "run `aws configure` / `aws sso login` or set AWS_PROFILE") from None
    role = args.role_arn or os.environ.get("LLM_PIPELINE_ROLE_ARN")
    bucket = args.bucket or os.environ.get("LLM_PIPELINE_BUCKET")
    if not role or not bucket:
        raise UserError("--target aws needs --role-arn and --bucket (or LLM_PIPELINE_ROLE_ARN and "
                        "LLM_PIPELINE_BUCKET); infra/ creates both")
    return Target(region=region, account=account, role_arn=role, bucket=bucket, endpoint="AWS")


def registry_region(args) -> str:
    """The region of the registry (and endpoints) to use; the local target also starts its
    server."""
    return connect(args).region if args.target == "local" else aws_region(args.region)

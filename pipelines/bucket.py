"""What the pipeline keeps in its S3 bucket before it runs: the bucket itself (made locally, the
infrastructure's on AWS), the demo datasets its data parameters default to, local files given as
data parameters (uploaded, content-addressed), and the checks that a data URI can work."""

from __future__ import annotations

import hashlib
import re
import tempfile
from pathlib import Path

from pipelines import UserError, definition, recipe


def ensure_bucket(s3, bucket: str, region: str) -> None:
    """The local target's bucket, made when missing."""
    from botocore.exceptions import ClientError

    try:
        s3.head_bucket(Bucket=bucket)
    except ClientError:
        config = {} if region == "us-east-1" else {
            "CreateBucketConfiguration": {"LocationConstraint": region}}
        s3.create_bucket(Bucket=bucket, **config)


def require_bucket(s3, bucket: str) -> None:
    """On AWS the bucket comes from the infrastructure (encrypted, versioned): never made here."""
    from botocore.exceptions import ClientError

    try:
        s3.head_bucket(Bucket=bucket)
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code")
        what = "does not exist" if code in ("404", "NoSuchBucket") else f"cannot be read ({code})"
        raise UserError(f"bucket {bucket} {what}: pass the ArtifactBucket that infra/ created "
                        "(--bucket or LLM_PIPELINE_BUCKET)") from None


def stage_input(s3, bucket: str, value: str, parameter: str = "InputData") -> str:
    """A local file or folder given as a dataset parameter is uploaded, content-addressed, to S3."""
    if value.startswith("s3://"):
        return value
    path = Path(value).expanduser()
    if not path.exists():
        raise UserError(f"{parameter} {value!r} is neither an s3:// URI nor an existing file or "
                        "folder")
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    if not files:
        raise UserError(f"{parameter} folder {path} is empty")
    relative = {f: f.relative_to(path).as_posix() if path.is_dir() else f.name for f in files}
    digest = hashlib.sha256()
    for file in files:
        digest.update(relative[file].encode())
        digest.update(file.read_bytes())
    prefix = f"inputs/{digest.hexdigest()[:16]}"
    for file in files:
        s3.upload_file(str(file), bucket, f"{prefix}/{relative[file]}")
    return f"s3://{bucket}/{prefix}" + ("" if path.is_dir() else f"/{path.name}")


_BUCKET_NAME = re.compile(r"[a-zA-Z0-9.\-_]{1,255}")  # what botocore accepts


def check_s3_uri(s3, parameter: str, uri: str) -> None:
    """Refuse an s3:// data URI that names no bucket, or (where this caller may look) no data."""
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, _, prefix = uri[len("s3://"):].partition("/")
    if not _BUCKET_NAME.fullmatch(bucket):
        raise UserError(f"{parameter} {uri!r} is not an S3 URI of the form s3://BUCKET/PREFIX "
                        f"(bucket name {bucket!r} is not valid)")
    try:
        listed = s3.list_objects_v2(Bucket=bucket, Prefix=prefix, MaxKeys=1)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") == "NoSuchBucket":
            raise UserError(f"{parameter} {uri!r}: bucket {bucket!r} does not exist") from None
        return  # not ours to list (the pipeline's role may read it): the job will tell
    except BotoCoreError:
        return
    if not listed.get("KeyCount") and not listed.get("Contents"):
        raise UserError(f"{parameter} {uri!r}: no objects under it; upload the data there or pass "
                        "a local file or folder")


def check_data_uris(s3, chosen: recipe.Recipe, overrides: dict[str, str]) -> None:
    for parameter in chosen.data_parameters:
        value = overrides.get(parameter)
        if value is not None and value.startswith("s3://"):
            check_s3_uri(s3, parameter, value)


def ensure_demo_data(s3, bucket: str, kind: str) -> bool:
    """Put a built-in demo dataset (recipe.DEMO_DATASETS) where the recipes' defaults point,
    unless the same bytes are there already; True when it uploaded.

    The object carries the sha256 of its content as metadata, so that a demo dataset this version
    of the code writes differently replaces the old one, and an unchanged one is left alone (its
    DataPrep step stays a cache hit).
    """
    from botocore.exceptions import ClientError

    from steps.common import demo_data

    key = definition.DEMO_DATA_KEYS[kind]
    writer = {"sft": demo_data.write_demo_dataset, "corpus": demo_data.write_demo_corpus,
              "preferences": demo_data.write_demo_preferences,
              "prompts": demo_data.write_demo_constitutional_prompts}[kind]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "demo.jsonl"
        writer(path)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        try:
            present = s3.head_object(Bucket=bucket, Key=key).get("Metadata", {}).get("sha256")
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchKey", "NotFound"):
                raise UserError(f"cannot read s3://{bucket}/{key} ({exc}); the demo data goes "
                                "there: check the bucket and this caller's permissions") from None
            present = None
        if present == digest:
            return False
        s3.upload_file(str(path), bucket, key, ExtraArgs={"Metadata": {"sha256": digest}})
    return True

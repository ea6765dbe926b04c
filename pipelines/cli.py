"""`llm-pipeline`: build the definition, run it locally, run it on SageMaker, manage the registry.

Target: `--target local` (the default) uses the AWS endpoint named by AWS_ENDPOINT_URL*
when set, otherwise the local server on 127.0.0.1 (pipelines/local/server.py: SageMaker's
Pipelines API run by the local engine, S3 and the registry), which the command starts and keeps
running. `--target aws` (or LLM_PIPELINE_TARGET=aws) uses your AWS credentials and account.
`upsert` and `start` are the same code on both targets; `run` is `upsert` + `start --wait` on the
local one.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import signal
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from containers import images
from pipelines import UserError, definition, error_line, memory_plan, recipe, tracking
from pipelines.local import runner, server

EXIT_FAILED, EXIT_USAGE = 1, 2


# -- helpers ---------------------------------------------------------------------------

def _parameters(pairs: list[str]) -> dict[str, str]:
    values = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UserError(f"-p {pair!r}: expected Key=Value (e.g. -p Epochs=2)")
        if not value.strip():
            # Every parameter ends up in the model package's metadata, which holds no empty value.
            raise UserError(f"-p {pair!r}: empty value; give one (an optional setting that is "
                            "off takes 'none')")
        values[key] = value
    return values


def _aws_region(args) -> str:
    """The AWS region a command works in: --region, else boto3's own configuration
    (AWS_DEFAULT_REGION, the profile's region); a one-line error when there is none."""
    import boto3
    from botocore.exceptions import BotoCoreError

    try:
        region = args.region or boto3.Session().region_name
    except BotoCoreError as exc:  # a broken profile or config file
        raise UserError(f"cannot read the AWS configuration ({exc}); pass --region") from None
    if not region:
        raise UserError("no AWS region: pass --region or set AWS_DEFAULT_REGION (or a region in "
                        "the AWS profile)")
    return region


@dataclass(frozen=True)
class Target:
    """Where the commands work: the account, region, role and bucket of the local server or of
    AWS, and the endpoint, in words."""

    region: str
    account: str
    role_arn: str
    bucket: str
    endpoint: str


def _client(service: str, target: Target):
    """A boto3 client of the target's region (the command's --region, or the resolved one)."""
    import boto3

    return boto3.client(service, region_name=target.region)


def _connect(args) -> Target:
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

    region = _aws_region(args)
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


def _build(args, chosen: recipe.Recipe, role_arn: str, bucket: str, region: str) -> str:
    """The recipe's definition text, exactly as the SDK wrote it."""
    return definition.definition_json(chosen, role_arn=role_arn, bucket=bucket, region=region,
                                      image_tag=args.image_tag, spot=args.spot)


def _build_for(args, chosen: recipe.Recipe, target: Target) -> str:
    return _build(args, chosen, target.role_arn, target.bucket, target.region)


def _build_cached(args, chosen: recipe.Recipe, target: Target) -> str:
    """`_build_for`, reusing the definition an earlier local run built from the same inputs.

    Building imports the SageMaker SDK (10-20 s), and a definition is a pure function of the
    recipe file, the target's role/bucket/region, the image tag and the code that builds it, so
    the text is kept under $LLM_PIPELINE_HOME/definitions keyed by all of them. Only `run` uses
    it: `definition` and `upsert` always build afresh.
    """
    from importlib import metadata

    builder = Path(__file__).parent
    key = hashlib.sha256()
    for part in (chosen.source.read_bytes(), target.role_arn, target.bucket,
                 target.region, args.image_tag or images.code_digest(), f"spot={args.spot}",
                 metadata.version("sagemaker"),
                 *(path.read_bytes() for path in sorted(builder.glob("*.py"))),
                 (builder / "sdk-config.yaml").read_bytes(),
                 (builder.parent / "containers" / "images.py").read_bytes(),
                 # the stage table: step names and modules
                 (builder.parent / "steps" / "stages.py").read_bytes()):
        key.update(part if isinstance(part, bytes) else str(part).encode())
        key.update(b"\0")
    path = server.home() / "definitions" / f"{key.hexdigest()[:32]}.json"
    if path.is_file():
        return path.read_text(encoding="utf-8")
    text = _build_for(args, chosen, target)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.partial")  # concurrent runs: whole files only
    partial.write_text(text, encoding="utf-8")
    partial.replace(path)
    return text


def _ensure_bucket(s3, bucket: str, region: str) -> None:
    from botocore.exceptions import ClientError

    try:
        s3.head_bucket(Bucket=bucket)
    except ClientError:
        config = {} if region == "us-east-1" else {
            "CreateBucketConfiguration": {"LocationConstraint": region}}
        s3.create_bucket(Bucket=bucket, **config)


def _stage_input(s3, bucket: str, value: str, parameter: str = "InputData") -> str:
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


def _check_s3_uri(s3, parameter: str, uri: str) -> None:
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


def _check_data_uris(s3, chosen: recipe.Recipe, overrides: dict[str, str]) -> None:
    for parameter in chosen.data_parameters:
        value = overrides.get(parameter)
        if value is not None and value.startswith("s3://"):
            _check_s3_uri(s3, parameter, value)


def _ensure_demo_data(s3, bucket: str, kind: str) -> bool:
    """Put a built-in demo dataset (recipe.DEMO_DATASETS) where the recipes' defaults point,
    unless the same bytes are there already; True when it uploaded.

    The object carries the sha256 of its content as metadata, so that a demo dataset this version
    of the code writes differently replaces the old one, and an unchanged one is left alone (its
    DataPrep step stays a cache hit).
    """
    from botocore.exceptions import ClientError

    from steps import demo_data

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


def _executions_dir() -> Path:
    return server.home() / "executions"


# -- commands ---------------------------------------------------------------------------

def cmd_definition(args) -> int:
    # The region names the images' ECR registry: for AWS it is the one the commands would use.
    region = _aws_region(args) if args.target == "aws" else args.region or definition.DEFAULT_REGION
    text = _build(args, recipe.load(args.recipe), args.role_arn or definition.DEFAULT_ROLE_ARN,
                  args.bucket or definition.DEFAULT_BUCKET, region)
    overrides = _parameters(args.parameter)
    if overrides:
        from pipelines.graph import resolve_parameters

        document = json.loads(text)
        values = resolve_parameters(document, overrides)
        for parameter in document["Parameters"]:
            if parameter["Name"] in overrides:
                parameter["DefaultValue"] = values[parameter["Name"]]
        text = json.dumps(document)
    sys.stdout.write(text + "\n")
    return 0


def _check_rerun_flags(args) -> None:
    if args.from_step and not args.reuse:
        raise UserError("--from-step needs --reuse EXECUTION, the execution whose outputs the "
                        "steps before it reuse (its id; on AWS also its ARN)")


def cmd_run(args) -> int:
    """`upsert` and `start --wait` on the local target, with the steps shown as they run: the
    local endpoint executes the pipeline as SageMaker would."""
    if args.target != "local":
        raise UserError("`run` executes locally; use `upsert` and `start --wait` for SageMaker")
    _check_rerun_flags(args)
    args.job_runner = runner.requested(args.job_runner)
    overrides = _parameters(args.parameter)
    # Before anything starts (the local server, an instance that bills): a training stage that
    # cannot fit its instance type's memory, in one line naming one that fits (the memory plan).
    memory_plan.refuse_unfittable(args.recipe, overrides)
    target = _connect(args)
    sagemaker, s3 = _client("sagemaker", target), _client("s3", target)
    # Before the build (seconds): a data URI that cannot work fails here, with nothing run.
    chosen = recipe.load(args.recipe)
    # Before the build (seconds): a data URI that cannot work fails here, with nothing run.
    _check_data_uris(s3, chosen, overrides)
    text = _build_cached(args, chosen, target)
    _upsert(args, target, chosen, text, sagemaker, s3)
    arn = _start(args, target, chosen, overrides, sagemaker, s3)
    # `run` owns its execution: interrupting or killing the command stops it (`start --wait`
    # only stops waiting, as on SageMaker).
    signal.signal(signal.SIGTERM, _interrupted)
    try:
        return _wait(args, arn, chosen, sagemaker, s3, poll_seconds=0.5)
    except KeyboardInterrupt:
        sagemaker.stop_pipeline_execution(PipelineExecutionArn=arn)
        print(f"stopping execution {arn}", file=sys.stderr)
        raise


def _interrupted(signum, frame) -> None:
    raise KeyboardInterrupt


def cmd_upsert(args) -> int:
    target = _connect(args)
    chosen = recipe.load(args.recipe)
    text = _build_for(args, chosen, target)
    _upsert(args, target, chosen, text, _client("sagemaker", target), _client("s3", target))
    return 0


def _upsert(args, target: Target, chosen: recipe.Recipe, text: str, sagemaker, s3) -> None:
    """Create or update the pipeline from its definition `text`, with what its executions need:
    the bucket (made locally; on AWS the infrastructure's), the model package group it registers
    into, and the demo datasets its data parameters default to."""
    from botocore.exceptions import ClientError

    from pipelines import validation

    name = definition.pipeline_name(chosen)
    # The SDK's own bytes: an unchanged tree gives an unchanged definition (step caching).
    request = {"PipelineName": name, "PipelineDefinition": text, "RoleArn": target.role_arn,
               "PipelineDescription": definition.shortened(chosen.description, 3072)}
    # Refused here as SageMaker would refuse it (a recipe name with '_', a role that is no ARN),
    # before anything is created.
    validation.check_request("CreatePipeline", request, f"upsert {name}")
    if args.target == "local":
        _ensure_bucket(s3, target.bucket, target.region)
    else:
        _require_bucket(s3, target.bucket)

    # SageMaker Pipelines registers only into a group that exists: create the one the pipeline's
    # ModelPackageGroup parameter names by default (the recipe's, or the one its file sets), and
    # before the pipeline, so that a group IAM refuses leaves no pipeline that cannot register.
    group = next(parameter["DefaultValue"] for parameter in json.loads(text)["Parameters"]
                 if parameter["Name"] == "ModelPackageGroup")
    try:
        sagemaker.describe_model_package_group(ModelPackageGroupName=group)
    except ClientError:
        try:
            sagemaker.create_model_package_group(
                ModelPackageGroupName=group, ModelPackageGroupDescription=chosen.description[:1000])
        except ClientError as exc:
            raise UserError(f"cannot create model package group {group!r} "
                            f"({exc.response['Error'].get('Message', exc)}); the infra stack's "
                            "roles may use only groups named llm-* (infra/README.md)") from None
    try:
        sagemaker.describe_pipeline(PipelineName=name)
        exists = True
    except ClientError as exc:
        if not any(s in str(exc) for s in ("does not exist", "Could not find", "ResourceNotFound")):
            raise UserError(f"cannot describe pipeline {name}: {exc}") from None
        exists = False
    action = "updated"
    if not exists:
        try:
            response = sagemaker.create_pipeline(**request)
            action = "created"
        except ClientError as exc:  # another upsert created it since: update it (as the SDK does)
            if "already exists" not in exc.response.get("Error", {}).get("Message", ""):
                raise
            exists = True
    if exists:
        response = sagemaker.update_pipeline(**request)
    # The data parameters' defaults point at the demo datasets in the bucket: on AWS too, so that
    # `start` with no data parameter runs the demo as it does locally.
    for parameter, dataset in chosen.demo_data.items():
        uploaded = _ensure_demo_data(s3, target.bucket, dataset)
        print(f"{parameter} default: s3://{target.bucket}/{definition.DEMO_DATA_KEYS[dataset]} "
              f"({'uploaded' if uploaded else 'already there'})")
    print(f"{action} pipeline {name}: {response['PipelineArn']}", flush=True)


def _require_bucket(s3, bucket: str) -> None:
    """On AWS the bucket comes from the infrastructure (encrypted, versioned): never made here."""
    from botocore.exceptions import ClientError

    try:
        s3.head_bucket(Bucket=bucket)
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code")
        what = "does not exist" if code in ("404", "NoSuchBucket") else f"cannot be read ({code})"
        raise UserError(f"bucket {bucket} {what}: pass the ArtifactBucket that infra/ created "
                        "(--bucket or LLM_PIPELINE_BUCKET)") from None


def cmd_start(args) -> int:
    _check_rerun_flags(args)
    overrides = _parameters(args.parameter)
    # Before anything starts (the local server, an instance that bills): a training stage that
    # cannot fit its instance type's memory, in one line naming one that fits (the memory plan).
    memory_plan.refuse_unfittable(args.recipe, overrides)
    target = _connect(args)
    sagemaker, s3 = _client("sagemaker", target), _client("s3", target)
    chosen = recipe.load(args.recipe)
    arn = _start(args, target, chosen, overrides, sagemaker, s3)
    if not args.wait:
        return 0
    poll_seconds = args.poll_seconds or (30.0 if args.target == "aws" else 1.0)
    return _wait(args, arn, chosen, sagemaker, s3, poll_seconds)


def _start(args, target: Target, chosen: recipe.Recipe, overrides: dict[str, str], sagemaker,
           s3) -> str:
    """StartPipelineExecution of the recipe's pipeline, as it exists on the target; its ARN.
    Dataset parameters given as local files or folders are uploaded to the bucket first, and
    parameter values are checked before anything runs or bills."""
    from botocore.exceptions import ClientError

    from pipelines import validation
    from pipelines.graph import resolve_parameters

    name = definition.pipeline_name(chosen)
    _check_data_uris(s3, chosen, overrides)
    for parameter in chosen.data_parameters:
        if parameter in overrides:
            overrides[parameter] = _stage_input(s3, target.bucket, overrides[parameter],
                                                parameter)
    try:
        described = sagemaker.describe_pipeline(PipelineName=name)
    except ClientError:
        raise UserError(f"pipeline {name} does not exist on {target.endpoint}; "
                        f"run `llm-pipeline upsert --recipe {args.recipe}` first") from None
    document = json.loads(described["PipelineDefinition"])
    _default_tracking(args, document, overrides)
    # Refused here, before StartPipelineExecution: nothing has run or billed yet.
    validation.check_execution(document, resolve_parameters(document, overrides))
    if overrides.get(tracking.PARAMETER) == tracking.local_uri(server.home()):
        tracking.prepare_local_store(server.home())
    request = {"PipelineName": name,
               "PipelineParameters": [{"Name": k, "Value": str(v)} for k, v in overrides.items()]}
    if args.reuse:
        request["SelectiveExecutionConfig"] = _selective_execution_config(
            args, sagemaker, document, name, target)
    validation.check_request("StartPipelineExecution", request, f"start {name}")
    arn = sagemaker.start_pipeline_execution(**request)["PipelineExecutionArn"]
    print(f"started {arn}", flush=True)
    return arn


def _default_tracking(args, document: dict, overrides: dict[str, str]) -> None:
    """MlflowTrackingUri when the command is not given one (pipelines/tracking.py): the shell's
    MLFLOW_TRACKING_URI, else the local store on the local target. A pipeline upserted before
    the parameter existed is left as it is."""
    if tracking.PARAMETER in overrides or not any(
            p["Name"] == tracking.PARAMETER for p in document.get("Parameters", [])):
        return
    uri = tracking.default_uri(args.target, server.home())
    if uri is not None:
        overrides[tracking.PARAMETER] = uri


def _close_tracked_run(sagemaker, arn: str, succeeded: bool) -> None:
    """The execution's MLflow run ends as the execution did, naming the model package it
    registered."""
    parameters = sagemaker.list_pipeline_parameters_for_execution(
        PipelineExecutionArn=arn).get("PipelineParameters", [])
    uri = next((p["Value"] for p in parameters if p["Name"] == tracking.PARAMETER), "")
    if not uri.strip() or uri.strip().lower() == "none":
        return
    steps = sagemaker.list_pipeline_execution_steps(PipelineExecutionArn=arn)
    package = next((step["Metadata"]["RegisterModel"]["Arn"]
                    for step in steps.get("PipelineExecutionSteps", [])
                    if step.get("Metadata", {}).get("RegisterModel", {}).get("Arn")), None)
    name, execution_id = arn.split(":pipeline/", 1)[1].split("/execution/")
    tracking.close_execution_run(uri, name, execution_id, succeeded, package)


def _wait(args, arn: str, chosen: recipe.Recipe, sagemaker, s3, poll_seconds: float) -> int:
    """Show the execution until it ends, then its summary; the exit status says how it ended."""
    from pipelines import watch

    name, execution_id = arn.split(":pipeline/", 1)[1].split("/execution/")
    logs = watch.StepLogs(_executions_dir() / name / execution_id
                          if args.target == "local" else None)
    progress = (watch.LiveProgress(list(watch.step_types(sagemaker, arn)))
                if sys.stdout.isatty() else watch.PlainProgress())
    with progress:
        watch.follow(sagemaker, arn, progress, poll_seconds, logs)
    timing = "wall time of the local jobs" if args.target == "local" else \
        "SageMaker billable time"
    from botocore.exceptions import BotoCoreError, ClientError

    # The MLflow run is closed first, so that the summary's last lines are what to do next
    # (approve and deploy the package, or why the execution failed).
    try:
        status = sagemaker.describe_pipeline_execution(
            PipelineExecutionArn=arn)["PipelineExecutionStatus"]
        _close_tracked_run(sagemaker, arn, status == "Succeeded")
    except (BotoCoreError, ClientError) as error:  # how the execution ended is said below
        print(f"warning: could not read the execution's parameters and steps to close its "
              f"MLflow run ({error})", file=sys.stderr)
    succeeded = watch.summary(sagemaker, s3, arn, logs, timing, chosen.gate_metric)
    return 0 if succeeded else EXIT_FAILED


def _execution_arn(reference: str, pipeline_name: str, target: Target) -> str:
    if reference.startswith("arn:"):
        return reference
    return (f"arn:aws:sagemaker:{target.region}:{target.account}:pipeline/"
            f"{pipeline_name}/execution/{reference}")


def _selective_execution_config(args, sagemaker, document: dict, name: str, target: Target) -> dict:
    """SageMaker's SelectiveExecutionConfig for `--reuse EXECUTION [--from-step STEP]`: the step
    and everything downstream of it, or without --from-step the steps that did not succeed."""
    from pipelines.graph import steps_from, unfinished_steps

    source = _execution_arn(args.reuse, name, target)
    if args.from_step:
        selected = steps_from(document, args.from_step)
    else:
        status = sagemaker.describe_pipeline_execution(
            PipelineExecutionArn=source)["PipelineExecutionStatus"]
        if status in ("Succeeded", "Executing", "Stopping"):
            raise UserError(f"execution {source} is {status}, there is nothing to continue; "
                            "pass --from-step STEP to re-run from a step")
        pages = sagemaker.get_paginator("list_pipeline_execution_steps").paginate(
            PipelineExecutionArn=source)
        statuses = {s["StepName"]: s["StepStatus"] for page in pages
                    for s in page["PipelineExecutionSteps"]}
        selected = unfinished_steps(document, statuses)
    print(f"re-running {', '.join(selected)}; the other steps reuse {source}", flush=True)
    return {"SourcePipelineExecutionArn": source,
            "SelectedSteps": [{"StepName": step} for step in selected]}


def cmd_cost(args) -> int:
    from pipelines import cost

    if args.target == "aws":
        target = _connect(args)
        arn = _execution_arn(args.execution, definition.pipeline_name(recipe.load(args.recipe)),
                             target)
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            ledger = cost.aws_ledger(_client("sagemaker", target), arn)
        except (BotoCoreError, ClientError) as exc:
            raise UserError(f"cost ledger of {arn}: {exc}") from None
    else:
        execution_id = args.execution.rstrip("/").rsplit("/", 1)[-1]
        found = sorted(_executions_dir().glob(f"*/{execution_id}/execution.json"))
        if not found:
            raise UserError(f"no local execution {execution_id} under {_executions_dir()}; "
                            "`run` prints the id of each execution it makes")
        ledger = cost.local_ledger(json.loads(found[0].read_text()))
    print(json.dumps(ledger, indent=1) if args.json else cost.format_ledger(ledger))
    return 0


def cmd_plan(args) -> int:
    chosen = recipe.load(args.recipe)
    plans = memory_plan.plan(chosen, _parameters(args.parameter), args.instance_type)
    if args.json:
        print(json.dumps({"recipe": chosen.name, "stages": [p.as_dict() for p in plans]},
                         indent=1, default=str))
    else:
        print(memory_plan.format_plan(plans, chosen.name))
    return EXIT_FAILED if any(p.runs is False for p in plans) else 0


# The registry actions, and how many package ARNs each takes.
REGISTRY_ACTIONS = {"list": 0, "approve": 1, "reject": 1, "promote": 1, "diff": 2}


def _registry_region(args) -> str:
    """The region of the registry to use; the local target also starts its server."""
    return _connect(args).region if args.target == "local" else _aws_region(args)


def _registry_promote(args, sagemaker, s3, assumed) -> None:
    from pipelines import registry

    target = assumed.client("sagemaker") if assumed else None
    arn, created = registry.promote(sagemaker, args.arn, args.to_group, args.reason, target)
    if created:
        print(f"{arn}: promoted from {args.arn} to group {args.to_group} (Approved)")
    else:
        print(f"{arn}: already promoted from {args.arn} to group {args.to_group}; "
              "not promoting it again")


def _registry_list(args, sagemaker, s3, assumed) -> None:
    from pipelines import registry

    packages = registry.list_packages(sagemaker, s3, args.group)
    if args.json:
        print(json.dumps(packages, indent=1, default=str))
    elif not packages:
        print("no model packages" + (f" in group {args.group}" if args.group else ""))
    else:
        print(registry.format_list(packages))


def _registry_diff(args, sagemaker, s3, assumed) -> None:
    from pipelines import registry

    rows = registry.diff(sagemaker, s3, args.arn, args.other)
    if args.json:
        print(json.dumps({"a": args.arn, "b": args.other, "differences": rows}, indent=1,
                         default=str))
    else:
        print(registry.format_diff(args.arn, args.other, rows))


def _registry_status(args, sagemaker, s3, assumed) -> None:
    from pipelines import registry

    status = {"approve": "Approved", "reject": "Rejected"}[args.action]
    package = registry.set_status(sagemaker, args.arn, status, args.reason)
    print(f"{package['ModelPackageArn']}: {package['ModelApprovalStatus']}")


def cmd_registry(args) -> int:
    import boto3
    from botocore.exceptions import BotoCoreError, ClientError

    from pipelines import registry

    region = _registry_region(args)
    try:
        home = boto3.Session(region_name=region)
        assumed = (registry.assume_role(home.client("sts"), args.role_arn, region)
                   if args.role_arn else None)
        # promote reads the source with the caller's credentials and writes with the role's;
        # every other action works in the role's account.
        session = assumed if assumed and args.action != "promote" else home
        action = {"list": _registry_list, "diff": _registry_diff,
                  "promote": _registry_promote}.get(args.action, _registry_status)
        action(args, session.client("sagemaker"), session.client("s3"), assumed)
    except ClientError as exc:
        raise UserError(f"registry {args.action}: {exc}") from None
    except BotoCoreError as exc:
        raise UserError(f"registry {args.action}: {exc}; check the AWS credentials and region "
                        "(`aws configure`, AWS_PROFILE, --region)") from None
    return 0


def cmd_endpoint(args) -> int:
    """deploy, invoke, endpoints, undeploy (pipelines/deploy.py). Locally only deploy needs the
    local AWS server (the registry and the artifact); the others read the endpoint records."""
    from pipelines import deploy

    region = _registry_region(args) if args.target == "aws" or args.command == "deploy" else None
    command = {"deploy": deploy.cmd_deploy, "invoke": deploy.cmd_invoke,
               "endpoints": deploy.cmd_endpoints, "undeploy": deploy.cmd_undeploy}[args.command]
    return command(args, region)


def cmd_server(args) -> int:
    job_runner = runner.requested(args.job_runner)
    if args.action == "start":
        url = server.ensure_running(job_runner)
        print(url)
    elif args.action == "stop":
        print("stopped" if server.stop() else "no local server was running")
    elif args.action == "env":
        url = server.ensure_running(job_runner)
        for key, value in server.local_environment(url).items():
            print(f"export {key}={value}")
    else:
        url = server.running_url()
        print(url or "not running")
        return 0 if url else EXIT_FAILED
    return 0


def cmd_console(args) -> int:
    from pipelines.console import api
    from pipelines.console import server as console

    console.serve(api.connect(args.target, args.region), args.host, args.port)
    return 0


def cmd_mlflow(args) -> int:
    return tracking.serve_ui(server.home(), args.host, args.port)


def cmd_recipes(args) -> int:
    for name in recipe.available():
        print(f"{name:<14} {recipe.load(name).description}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llm-pipeline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser, with_recipe: bool = True, with_params: bool = True) -> None:
        if with_recipe:
            p.add_argument("--recipe", default="sft", help="recipe name or YAML path")
        if with_params:
            p.add_argument("-p", "--parameter", action="append", metavar="Key=Value",
                           help="pipeline parameter override (repeatable)")
        p.add_argument("--target", choices=("local", "aws"),
                       default=os.environ.get("LLM_PIPELINE_TARGET", "local"))
        p.add_argument("--region")
        p.add_argument("--role-arn", help="SageMaker execution role ARN")
        p.add_argument("--bucket", help="S3 bucket for data and artifacts")
        p.add_argument("--image-tag", help="image tag (default: digest of the code)")

    def reruns(p: argparse.ArgumentParser) -> None:
        p.add_argument("--reuse", metavar="EXECUTION",
                       help="re-run part of this earlier execution (id, or ARN on AWS): steps "
                            "not re-run take its outputs; alone, continues it from its failed step")
        p.add_argument("--from-step", metavar="STEP",
                       help="with --reuse: re-run this step and every step downstream of it")

    def job_runner(p: argparse.ArgumentParser) -> None:
        p.add_argument("--job-runner", choices=runner.CHOICES,
                       help="how a local server that this command starts runs its jobs: warm (the "
                            "default) forks each from a process that has imported the ML stack "
                            "already; subprocess starts each as a fresh Python process. "
                            f"{runner.VARIABLE} sets it too; a running server keeps its own "
                            "(stop it to change)")

    def spot(p: argparse.ArgumentParser) -> None:
        p.add_argument("--spot", action="store_true",
                       help="training jobs use managed spot training (MaxWaitSeconds: how long "
                            "each may wait for capacity and run); chosen when the pipeline is "
                            "built, since SageMaker refuses a spot wait on an on-demand job")

    p = sub.add_parser("definition", help="print the pipeline definition JSON")
    common(p)
    spot(p)
    p.set_defaults(func=cmd_definition)
    p = sub.add_parser("run", help="run the pipeline locally: upsert + start --wait on the local "
                                       "endpoint")
    common(p)
    spot(p)
    reruns(p)
    job_runner(p)
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("upsert", help="create or update the pipeline on the target")
    common(p, with_params=False)
    spot(p)
    p.set_defaults(func=cmd_upsert)
    p = sub.add_parser("start", help="start an execution on the target")
    common(p)
    p.add_argument("--wait", action="store_true",
                   help="show the steps until it ends; exit non-zero unless it Succeeded")
    p.add_argument("--poll-seconds", type=float,
                   help="how often --wait asks for the execution's status (30 on AWS, 1 locally)")
    reruns(p)
    p.set_defaults(func=cmd_start)
    p = sub.add_parser("cost", help="the cost ledger of an execution")
    common(p, with_params=False)
    p.add_argument("execution", help="execution id (local) or ARN")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_cost)
    p = sub.add_parser("plan", help="each training stage's peak memory per device, whether it "
                                    "fits its instance type, and the cheapest that does")
    p.add_argument("--recipe", default="sft", help="recipe name or YAML path")
    p.add_argument("-p", "--parameter", action="append", metavar="Key=Value",
                   help="pipeline parameter override (repeatable)")
    p.add_argument("--instance-type", help="plan on this instance type instead of the "
                                           "TrainingInstanceType parameter's")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_plan)
    p = sub.add_parser(
        "registry", help="list, approve, reject, promote or diff model packages",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="The SageMaker Model Registry (on --target local, the local server's).\n\n"
                    "  list [--group G]                      packages with status and metrics\n"
                    "  approve|reject ARN [--reason TEXT]\n"
                    "  promote ARN --to-group G [--role-arn R] [--reason TEXT]\n"
                    "      copy an Approved package into group G (created if missing), in this\n"
                    "      account or, with --role-arn, in the account of role R (assumed through\n"
                    "      STS). Idempotent: a package promoted there before is not copied again.\n"
                    "      Across accounts the target account must also be able to read the\n"
                    "      model artifact and evaluation in S3 (bucket policy, KMS key grant):\n"
                    "      this command does not grant that.\n"
                    "  diff ARN_A ARN_B                      what differs, metric deltas B - A")
    p.add_argument("--target", choices=("local", "aws"),
                   default=os.environ.get("LLM_PIPELINE_TARGET", "local"))
    p.add_argument("--region")
    p.add_argument("--role-arn", help="IAM role to assume (STS): promote writes into its account; "
                                      "the other actions work in its account")
    p.add_argument("action", choices=REGISTRY_ACTIONS)
    p.add_argument("arn", nargs="?", help="model package ARN (approve, reject, promote, diff)")
    p.add_argument("other", nargs="?", metavar="ARN_B", help="second package ARN (diff)")
    p.add_argument("--group", help="model package group (list)")
    p.add_argument("--to-group", help="group to promote into (promote)")
    p.add_argument("--reason", help="approval description (approve, reject, promote)")
    p.add_argument("--json", action="store_true", help="machine-readable output (list, diff)")
    p.set_defaults(func=cmd_registry, bucket=None)

    def endpoint_target(p: argparse.ArgumentParser) -> None:
        p.add_argument("--target", choices=("local", "aws"),
                       default=os.environ.get("LLM_PIPELINE_TARGET", "local"))
        p.add_argument("--region")
        p.set_defaults(func=cmd_endpoint, bucket=None, role_arn=None)

    p = sub.add_parser("deploy", help="serve an Approved model package at an endpoint")
    p.add_argument("arn", help="model package ARN (see `registry list`)")
    p.add_argument("--name", help="endpoint name (default: the package's group; a name in use "
                                  "is updated to the package)")
    p.add_argument("--instance-type", help="default: the first the package lists")
    endpoint_target(p)
    p.add_argument("--role-arn", help="--target aws: the role SageMaker hosts the model with "
                                      "(default: LLM_PIPELINE_ROLE_ARN)")
    p.add_argument("--poll-seconds", type=float, default=30.0, help=argparse.SUPPRESS)
    p = sub.add_parser("invoke", help="ask an endpoint")
    p.add_argument("name", help="endpoint name")
    p.add_argument("--prompt", required=True, help="the user message")
    p.add_argument("--tenant", help="the tenant whose adapter answers (multi-tenant endpoints)")
    p.add_argument("--max-new-tokens", type=int, help="answer length limit")
    p.add_argument("--raw", action="store_true",
                   help="send the prompt as is ({\"inputs\": ...}), without the chat template")
    endpoint_target(p)
    p = sub.add_parser("endpoints", help="list endpoints: package, status, URL")
    endpoint_target(p)
    p = sub.add_parser("undeploy", help="stop an endpoint (on AWS: delete it, its config and "
                                        "model)")
    p.add_argument("name", help="endpoint name")
    endpoint_target(p)
    p = sub.add_parser("server", help="the local server: SageMaker pipelines, S3, the registry")
    p.add_argument("action", choices=("start", "stop", "status", "env"))
    job_runner(p)
    p.set_defaults(func=cmd_server)
    p = sub.add_parser("console", help="the web console: pipelines, executions, model packages",
                       description="Serves the web console and prints its URL, which carries the "
                                   "token that every request needs.")
    p.add_argument("--target", choices=("local", "aws"),
                   default=os.environ.get("LLM_PIPELINE_TARGET", "local"))
    p.add_argument("--region")
    p.add_argument("--host", default="127.0.0.1",
                   help="interface to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8765, help="port to listen on (0: any free one)")
    p.set_defaults(func=cmd_console)
    p = sub.add_parser("mlflow", help="MLflow's UI on the local tracking store (every local "
                                      "execution, its steps' params, metrics and plots)")
    p.add_argument("--host", default="127.0.0.1",
                   help="interface to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=5000, help="port to listen on")
    p.set_defaults(func=cmd_mlflow)
    p = sub.add_parser("recipes", help="list the recipes")
    p.set_defaults(func=cmd_recipes)
    return parser


def _check_registry_args(parser: argparse.ArgumentParser, args) -> None:
    wanted, given = REGISTRY_ACTIONS[args.action], [a for a in (args.arn, args.other) if a]
    if len(given) != wanted:
        what = {0: "no model package ARN", 1: "one model package ARN",
                2: "two model package ARNs (A and B)"}[wanted]
        parser.error(f"registry {args.action} takes {what}, got {len(given)}")
    if (args.action == "promote") != bool(args.to_group):
        parser.error("--to-group GROUP goes with registry promote, and promote needs it")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "registry":
        _check_registry_args(parser, args)
    try:
        return args.func(args)
    except UserError as exc:
        print(error_line(str(exc)), file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

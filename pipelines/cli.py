"""`llm-pipeline`: build the definition, run it locally, run it on SageMaker, manage the registry.

Target: `--target local` (the default) uses the AWS endpoint named by AWS_ENDPOINT_URL*
when set, otherwise a moto server on 127.0.0.1 that the command starts and keeps running.
`--target aws` (or LLM_PIPELINE_TARGET=aws) uses your AWS credentials and account.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

from containers import images
from pipelines import UserError, definition, recipe
from pipelines.local import server

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


def _client(service: str, target: dict):
    """A boto3 client of the target's region (the command's --region, or the resolved one)."""
    import boto3

    return boto3.client(service, region_name=target["region"])


def _connect(args) -> dict:
    """Point boto3 at the chosen target; returns what the commands need to know about it."""
    if args.target == "local":
        if server.endpoint_configured():
            endpoint = "named by AWS_ENDPOINT_URL*"
        else:
            endpoint = server.use_local_aws()
        os.environ.setdefault("AWS_DEFAULT_REGION", server.LOCAL_REGION)
        os.environ.setdefault("AWS_ACCESS_KEY_ID", "local")
        os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "local")
        region = args.region or os.environ["AWS_DEFAULT_REGION"]
        return {"region": region, "account": definition.LOCAL_ACCOUNT,
                "role_arn": args.role_arn or definition.DEFAULT_ROLE_ARN,
                "bucket": args.bucket or definition.DEFAULT_BUCKET, "endpoint": endpoint}
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
    return {"region": region, "account": account, "role_arn": role, "bucket": bucket,
            "endpoint": "AWS"}


def _build(args, role_arn: str, bucket: str, region: str) -> tuple[recipe.Recipe, str]:
    """The recipe and its definition text, exactly as the SDK wrote it."""
    chosen = recipe.load(args.recipe)
    return chosen, definition.definition_json(chosen, role_arn=role_arn, bucket=bucket,
                                              region=region, image_tag=args.image_tag,
                                              spot=args.spot)


def _build_for(args, target: dict) -> tuple[recipe.Recipe, str]:
    return _build(args, target["role_arn"], target["bucket"], target["region"])


def _build_cached(args, target: dict) -> tuple[recipe.Recipe, str]:
    """`_build_for`, reusing the definition an earlier local run built from the same inputs.

    Building imports the SageMaker SDK (10-20 s), and a definition is a pure function of the
    recipe file, the target's role/bucket/region, the image tag and the code that builds it, so
    the text is kept under $LLM_PIPELINE_HOME/definitions keyed by all of them. Only `run` uses
    it: `definition` and `upsert` always build afresh.
    """
    from importlib import metadata

    chosen = recipe.load(args.recipe)
    builder = Path(__file__).parent
    key = hashlib.sha256()
    for part in (chosen.source.read_bytes(), target["role_arn"], target["bucket"],
                 target["region"], args.image_tag or images.code_digest(), f"spot={args.spot}",
                 metadata.version("sagemaker"),
                 *(path.read_bytes() for path in sorted(builder.glob("*.py"))),
                 (builder / "sdk-config.yaml").read_bytes(),
                 (builder.parent / "containers" / "images.py").read_bytes()):
        key.update(part if isinstance(part, bytes) else str(part).encode())
        key.update(b"\0")
    path = server.home() / "definitions" / f"{key.hexdigest()[:32]}.json"
    if path.is_file():
        return chosen, path.read_text(encoding="utf-8")
    chosen, text = _build_for(args, target)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.partial")  # concurrent runs: whole files only
    partial.write_text(text, encoding="utf-8")
    partial.replace(path)
    return chosen, text


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


def _refuse_what_would_fail(chosen: recipe.Recipe, document: dict, values: dict) -> None:
    """Before the first job runs (and bills): parameter values outside what a stage setting
    takes, and any that would make a step's request one SageMaker refuses, each in one line
    naming the parameter."""
    from pipelines import stage_settings, validation

    problems = stage_settings.value_problems(chosen, values)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise UserError(problems[0] + more)
    validation.check_execution(document, values)


def _error_line(message: str) -> str:
    """`ERROR: <message>` on one line, as the stages print theirs."""
    return "ERROR: " + " ".join(message.split())


def _executions_dir() -> Path:
    return server.home() / "executions"


# -- progress display -------------------------------------------------------------------

class _PlainProgress:
    """One line per event; used when stdout is not a terminal (CI, logs)."""

    def step_started(self, state) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {state.name} ({state.type}) started", flush=True)

    def step_line(self, state, line: str) -> None:
        if line.strip():
            print(f"    {state.name} | {line}", flush=True)

    def step_finished(self, state) -> None:
        took = f"{state.seconds:.1f}s" if state.seconds is not None else ""
        reason = f": {state.failure_reason}" if state.failure_reason else ""
        print(f"[{time.strftime('%H:%M:%S')}] {state.name} {state.status.lower()} {took}{reason}",
              flush=True)


class _LiveProgress:
    """A live table of steps with status, time and the latest log line of the running step."""

    def __init__(self, step_names: list[str]) -> None:
        from rich.console import Console
        from rich.live import Live

        self.states: dict[str, object] = {}
        self.names = step_names
        self.latest: dict[str, str] = {}
        self.live = Live(self._table(), console=Console(), refresh_per_second=4, transient=False)

    def _table(self):
        from rich.table import Table

        table = Table(show_header=True, header_style="bold")
        for column in ("step", "status", "time", "latest"):
            table.add_column(column, overflow="fold" if column == "latest" else None)
        colours = {"Succeeded": "green", "Failed": "red", "Executing": "yellow"}
        for name in self.names:
            state = self.states.get(name)
            status = state.status if state else "Pending"
            took = f"{state.seconds:.0f}s" if state and state.seconds is not None else ""
            latest = self.latest.get(name, "")[-100:]
            table.add_row(name, f"[{colours.get(status, 'dim')}]{status}[/]", took, latest)
        return table

    def __enter__(self):
        self.live.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.live.update(self._table())
        self.live.__exit__(*exc)

    def step_started(self, state) -> None:
        self.states[state.name] = state
        self.live.update(self._table())

    def step_line(self, state, line: str) -> None:
        if line.strip():
            self.latest[state.name] = line.strip()
            self.live.update(self._table())

    def step_finished(self, state) -> None:
        self.states[state.name] = state
        if state.failure_reason:
            self.latest[state.name] = state.failure_reason
        self.live.update(self._table())


# -- commands ---------------------------------------------------------------------------

def cmd_definition(args) -> int:
    # The region names the images' ECR registry: for AWS it is the one the commands would use.
    region = _aws_region(args) if args.target == "aws" else args.region or definition.DEFAULT_REGION
    _, text = _build(args, args.role_arn or definition.DEFAULT_ROLE_ARN,
                     args.bucket or definition.DEFAULT_BUCKET, region)
    overrides = _parameters(args.parameter)
    if overrides:
        from pipelines.local.engine import resolve_parameters

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


def _local_selection(args, document: dict, pipeline_name: str):
    """`--reuse ID [--from-step STEP]`: which steps run, which reuse execution ID's outputs."""
    from pipelines.local.engine import Selection, load_execution, steps_from, unfinished_steps

    if not args.reuse:
        return None
    source = load_execution(_executions_dir(), pipeline_name, args.reuse)
    if args.from_step:
        selected = steps_from(document, args.from_step)
    elif source.status == "Succeeded":
        raise UserError(f"execution {source.execution_id} succeeded, there is nothing to continue; "
                        "pass --from-step STEP to re-run from a step")
    else:
        selected = unfinished_steps(document, {n: s.status for n, s in source.steps.items()})
    print(f"Re-running {', '.join(selected)}; the other steps reuse execution "
          f"{source.execution_id}", flush=True)
    return Selection(source, selected)


def cmd_run(args) -> int:
    from pipelines.local.engine import resolve_parameters, run_execution, step_names

    if args.target != "local":
        raise UserError("`run` executes locally; use `upsert` and `start --wait` for SageMaker")
    _check_rerun_flags(args)
    target = _connect(args)
    overrides = _parameters(args.parameter)
    s3 = _client("s3", target)
    # Before the build (seconds): a data URI that cannot work fails here, with nothing run.
    _check_data_uris(s3, recipe.load(args.recipe), overrides)
    chosen, text = _build_cached(args, target)
    document = json.loads(text)
    selection = _local_selection(args, document, definition.pipeline_name(chosen))
    _ensure_bucket(s3, target["bucket"], target["region"])
    for parameter in chosen.data_parameters:  # local files go to the bucket; demo data too
        if parameter in overrides:
            overrides[parameter] = _stage_input(s3, target["bucket"], overrides[parameter],
                                                parameter)
        elif parameter in chosen.demo_data:
            _ensure_demo_data(s3, target["bucket"], chosen.demo_data[parameter])
    _refuse_what_would_fail(chosen, document, resolve_parameters(document, overrides))

    print(f"Running {definition.pipeline_name(chosen)} locally (AWS endpoint {target['endpoint']})",
          flush=True)

    def execute(progress) -> object:
        return run_execution(document, overrides, _executions_dir(), target["region"],
                             target["account"], definition.pipeline_name(chosen), progress,
                             selection)

    if sys.stdout.isatty():
        with _LiveProgress(step_names(document)) as progress:
            record = execute(progress)
    else:
        record = execute(_PlainProgress())
    return _report(record, s3, _client("sagemaker", target))


def _step_note(state) -> str:
    """Why a step took no time, or took several tries."""
    if state.cache.startswith("hit"):
        return f"cache {state.cache}"
    if state.reused_from:
        return f"reused from execution {state.reused_from}"
    if len(state.attempts) > 1:
        return f"{len(state.attempts)} attempts"
    return ""


def _report(record, s3, sagemaker) -> int:
    folder = _executions_dir() / record.pipeline_name / record.execution_id
    print()
    print(f"Execution {record.execution_id}: {record.status}")
    for state in record.steps.values():
        took = f"{state.seconds:7.1f}s" if state.seconds is not None else " " * 8
        print(f"  {state.name:<22} {state.status:<12} {took}  {_step_note(state)}".rstrip())
    from pipelines import cost

    print("\n" + cost.format_ledger(record.cost))
    if record.status != "Succeeded":
        failed = next((s for s in record.steps.values() if s.status == "Failed"), None)
        if failed and failed.log and Path(failed.log).is_file():
            tail = Path(failed.log).read_text(errors="replace").splitlines()[-25:]
            print(f"--- last lines of {failed.name}'s log ({failed.log}) ---", file=sys.stderr)
            print("\n".join(tail), file=sys.stderr)
        print(f"Execution record: {folder / 'execution.json'}", file=sys.stderr)
        # The cause last, on one line: what a CI log or a terminal shows at the bottom.
        print(_error_line(f"execution {record.execution_id} failed: {record.failure_reason}"),
              file=sys.stderr)
        return EXIT_FAILED

    register = next((s for s in record.steps.values() if s.type == "RegisterModel"
                     and s.status == "Succeeded"), None)
    evaluation = next((s for s in record.steps.values() if s.name == "Evaluate"), None)
    if register:
        package = sagemaker.describe_model_package(ModelPackageName=register.outcome)
        print(f"\nRegistered model package: {register.outcome} ({package['ModelApprovalStatus']})")
    if evaluation and evaluation.properties:
        outputs = evaluation.properties.get("ProcessingOutputConfig", {}).get("Outputs", [])
        uri = next((o["S3Output"]["S3Uri"] for o in outputs), None)
        if uri:
            bucket, _, key = uri[5:].partition("/")
            metrics = json.loads(s3.get_object(Bucket=bucket, Key=f"{key}/evaluation.json")["Body"]
                                 .read())["metrics"]
            print("\nMetric              tuned        base")
            for name in ("eval_loss", "perplexity", "bits_per_byte", "rouge_l", "exact_match"):
                if name in metrics:
                    base = metrics.get(f"base_{name}", {}).get("value")
                    print(f"  {name:<16} {metrics[name]['value']:>10.4f}  "
                          f"{'-' if base is None else f'{base:>10.4f}'}")
            if "perplexity_ratio" in metrics:
                print(f"  perplexity_ratio {metrics['perplexity_ratio']['value']:>10.4f}  "
                      "(base perplexity / tuned perplexity)")
            print(f"\nEvaluation report: {uri}/")
    for state in record.steps.values():
        artifacts = state.properties.get("ModelArtifacts", {}).get("S3ModelArtifacts")
        if artifacts:
            print(f"Model artifact ({state.name}): {artifacts}")
    print(f"Logs and execution record: {folder}")
    return 0


def cmd_upsert(args) -> int:
    target = _connect(args)
    chosen, text = _build_for(args, target)
    sagemaker, s3 = _client("sagemaker", target), _client("s3", target)
    name = definition.pipeline_name(chosen)
    # The SDK's own bytes: an unchanged tree gives an unchanged definition (step caching).
    request = {"PipelineName": name, "PipelineDefinition": text, "RoleArn": target["role_arn"],
               "PipelineDescription": definition.shortened(chosen.description, 3072)}
    from botocore.exceptions import ClientError

    from pipelines import validation

    # Refused here as SageMaker would refuse it (a recipe name with '_', a role that is no ARN),
    # before anything is created.
    validation.check_request("CreatePipeline", request, f"upsert {name}")
    if args.target == "local":
        _ensure_bucket(s3, target["bucket"], target["region"])
    else:
        _require_bucket(s3, target["bucket"])

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
        response = sagemaker.update_pipeline(**request)
        action = "updated"
    except ClientError as exc:
        if not any(s in str(exc) for s in ("does not exist", "Could not find", "ResourceNotFound")):
            raise UserError(f"cannot describe pipeline {name}: {exc}") from None
        response = sagemaker.create_pipeline(**request)
        action = "created"
    # The data parameters' defaults point at the demo datasets in the bucket: on AWS too, so that
    # `start` with no data parameter runs the demo as it does locally.
    for parameter, dataset in chosen.demo_data.items():
        uploaded = _ensure_demo_data(s3, target["bucket"], dataset)
        print(f"{parameter} default: s3://{target['bucket']}/{definition.DEMO_DATA_KEYS[dataset]} "
              f"({'uploaded' if uploaded else 'already there'})")
    print(f"{action} pipeline {name}: {response['PipelineArn']}")
    return 0


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


_TERMINAL = {"Succeeded", "Failed", "Stopped"}


def cmd_start(args) -> int:
    _check_rerun_flags(args)
    target = _connect(args)
    chosen = recipe.load(args.recipe)
    name = definition.pipeline_name(chosen)
    sagemaker, s3 = _client("sagemaker", target), _client("s3", target)
    overrides = _parameters(args.parameter)
    _check_data_uris(s3, chosen, overrides)
    for parameter in chosen.data_parameters:
        if parameter in overrides:
            overrides[parameter] = _stage_input(s3, target["bucket"], overrides[parameter],
                                                parameter)
    from botocore.exceptions import ClientError

    try:
        described = sagemaker.describe_pipeline(PipelineName=name)
    except ClientError:
        raise UserError(f"pipeline {name} does not exist on {target['endpoint']}; "
                        f"run `llm-pipeline upsert --recipe {args.recipe}` first") from None
    from pipelines.local.engine import resolve_parameters

    document = json.loads(described["PipelineDefinition"])
    # Refused here, before StartPipelineExecution: nothing has run or billed yet.
    _refuse_what_would_fail(chosen, document, resolve_parameters(document, overrides))
    request = {"PipelineName": name,
               "PipelineParameters": [{"Name": k, "Value": str(v)} for k, v in overrides.items()]}
    if args.reuse:
        request["SelectiveExecutionConfig"] = _selective_execution_config(
            args, sagemaker, document, name, target)
    from pipelines import validation

    validation.check_request("StartPipelineExecution", request, f"start {name}")
    response = sagemaker.start_pipeline_execution(**request)
    arn = response["PipelineExecutionArn"]
    print(f"started {arn}", flush=True)
    if not args.wait:
        return 0
    status = ""
    while status not in _TERMINAL:
        described = sagemaker.describe_pipeline_execution(PipelineExecutionArn=arn)
        new_status = described["PipelineExecutionStatus"]
        if new_status != status:
            print(f"[{time.strftime('%H:%M:%S')}] {new_status}", flush=True)
            status = new_status
        if status not in _TERMINAL:
            time.sleep(args.poll_seconds)
    if args.target == "aws":  # the local server runs no jobs: nothing to cost there
        _print_aws_ledger(sagemaker, arn)
    if status != "Succeeded":
        if args.target == "aws":
            for line in failed_steps(sagemaker, arn):
                print(line, file=sys.stderr)
        print(f"execution {status}: {described.get('FailureReason', '')}", file=sys.stderr)
        return EXIT_FAILED
    return 0


def failed_steps(sagemaker, execution_arn: str) -> list[str]:
    """`step NAME failed: REASON` for each failed step of a SageMaker execution.

    The execution's own FailureReason only says that a step failed. A step's FailureReason holds
    a training job's /opt/ml/output/failure; a processing job's reason is in its ExitMessage (the
    first 1 KB of /opt/ml/output/message,
    https://docs.aws.amazon.com/sagemaker/latest/dg/build-your-own-processing-container.html),
    which only DescribeProcessingJob returns. One line saying why when the steps cannot be read
    (the caller needs ListPipelineExecutionSteps and DescribeProcessingJob).
    """
    from botocore.exceptions import BotoCoreError, ClientError

    lines = []
    try:
        pages = sagemaker.get_paginator("list_pipeline_execution_steps").paginate(
            PipelineExecutionArn=execution_arn, SortOrder="Ascending")
        for step in [s for page in pages for s in page["PipelineExecutionSteps"]]:
            if step.get("StepStatus") != "Failed":
                continue
            reasons = [step.get("FailureReason", "")]
            job = step.get("Metadata", {}).get("ProcessingJob", {}).get("Arn")
            if job:
                reasons.append(sagemaker.describe_processing_job(
                    ProcessingJobName=job.rsplit("/", 1)[-1]).get("ExitMessage", ""))
            reason = " ".join(": ".join(r for r in reasons if r).split())
            lines.append(f"step {step['StepName']} failed: {reason or 'no reason given'}")
    except (BotoCoreError, ClientError) as exc:
        return [f"the failed steps' reasons are unavailable: {exc}"]
    return lines


def _execution_arn(reference: str, pipeline_name: str, target: dict) -> str:
    if reference.startswith("arn:"):
        return reference
    return (f"arn:aws:sagemaker:{target['region']}:{target['account']}:pipeline/"
            f"{pipeline_name}/execution/{reference}")


def _selective_execution_config(args, sagemaker, document: dict, name: str, target: dict) -> dict:
    """SageMaker's SelectiveExecutionConfig for `--reuse EXECUTION [--from-step STEP]`: the step
    and everything downstream of it, or without --from-step the steps that did not succeed."""
    from pipelines.local.engine import steps_from, unfinished_steps

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


def _print_aws_ledger(sagemaker, execution_arn: str) -> None:
    from botocore.exceptions import BotoCoreError, ClientError

    from pipelines import cost

    try:
        print("\n" + cost.format_ledger(cost.aws_ledger(sagemaker, execution_arn)))
    except (BotoCoreError, ClientError) as exc:
        print(f"cost ledger unavailable for {execution_arn}: {exc}", file=sys.stderr)


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


# The registry actions, and how many package ARNs each takes.
REGISTRY_ACTIONS = {"list": 0, "approve": 1, "reject": 1, "promote": 1, "diff": 2}


def _registry_region(args) -> str:
    """The region of the registry to use; the local target also starts its server."""
    return _connect(args)["region"] if args.target == "local" else _aws_region(args)


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


def cmd_server(args) -> int:
    if args.action == "start":
        url = server.ensure_running()
        print(url)
    elif args.action == "stop":
        print("stopped" if server.stop() else "no local server was running")
    elif args.action == "env":
        url = server.ensure_running()
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

    def spot(p: argparse.ArgumentParser) -> None:
        p.add_argument("--spot", action="store_true",
                       help="training jobs use managed spot training (MaxWaitSeconds: how long "
                            "each may wait for capacity and run); chosen when the pipeline is "
                            "built, since SageMaker refuses a spot wait on an on-demand job")

    p = sub.add_parser("definition", help="print the pipeline definition JSON")
    common(p)
    spot(p)
    p.set_defaults(func=cmd_definition)
    p = sub.add_parser("run", help="run the pipeline locally")
    common(p)
    spot(p)
    reruns(p)
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("upsert", help="create or update the pipeline on SageMaker")
    common(p, with_params=False)
    spot(p)
    p.set_defaults(func=cmd_upsert)
    p = sub.add_parser("start", help="start an execution on SageMaker")
    common(p)
    p.add_argument("--wait", action="store_true", help="wait; exit status reflects the execution")
    p.add_argument("--poll-seconds", type=float, default=30.0)
    reruns(p)
    p.set_defaults(func=cmd_start)
    p = sub.add_parser("cost", help="the cost ledger of an execution")
    common(p, with_params=False)
    p.add_argument("execution", help="execution id (local) or ARN")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_cost)
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
    p = sub.add_parser("server", help="the local AWS (moto) server")
    p.add_argument("action", choices=("start", "stop", "status", "env"))
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
        print(_error_line(str(exc)), file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

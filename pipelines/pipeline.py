"""The pipeline on its target and its executions: what `upsert`, `start` and `run` do.

`upsert` creates or updates the recipe's pipeline with what its executions need (the bucket, the
model package group, the demo datasets); `start` checks the parameter values and starts an
execution, `--wait` shows it until it ends and prints its summary; `run` is `upsert` + `start
--wait` on the local target, building the definition from a cache. Each command loads the recipe
once and hands it down.
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

from pipelines import EXIT_FAILED, UserError, bucket, definition, memory_plan, recipe, tracking
from pipelines.local import server
from pipelines.targets import Target, connect


def executions_dir() -> Path:
    """Where the local server keeps its executions: <pipeline>/<execution id>/."""
    return server.home() / "executions"


def run(args, overrides: dict[str, str]) -> int:
    """`upsert` and `start --wait` on the local target, with the steps shown as they run: the
    local endpoint executes the pipeline as SageMaker would."""
    chosen = recipe.load(args.recipe)
    # Before anything starts (the local server, an instance that bills): a training stage that
    # cannot fit its instance type's memory, in one line naming one that fits (the memory plan).
    memory_plan.refuse_unfittable(chosen, overrides, args.recipe)
    target = connect(args)
    sagemaker, s3 = target.client("sagemaker"), target.client("s3")
    # Before the build (seconds): a data URI that cannot work fails here, with nothing run.
    bucket.check_data_uris(s3, chosen, overrides)
    text = definition.cached_definition_json(
        chosen, server.home() / "definitions", role_arn=target.role_arn, bucket=target.bucket,
        region=target.region, image_tag=args.image_tag, spot=args.spot)
    _upsert(target, chosen, text, sagemaker, s3, local=True)
    arn = _start(args, target, chosen, overrides, sagemaker, s3)
    # `run` owns its execution: interrupting or killing the command stops it (`start --wait`
    # only stops waiting, as on SageMaker).
    signal.signal(signal.SIGTERM, _interrupted)
    try:
        return _wait(arn, chosen, sagemaker, s3, poll_seconds=0.5, local=True,
                     tracked_uri=overrides.get(tracking.PARAMETER))
    except KeyboardInterrupt:
        sagemaker.stop_pipeline_execution(PipelineExecutionArn=arn)
        print(f"stopping execution {arn}", file=sys.stderr)
        raise


def _interrupted(signum, frame) -> None:
    raise KeyboardInterrupt


def upsert(args) -> int:
    """Create or update the recipe's pipeline on the target."""
    target = connect(args)
    chosen = recipe.load(args.recipe)
    text = definition.definition_json(chosen, role_arn=target.role_arn, bucket=target.bucket,
                                      region=target.region, image_tag=args.image_tag,
                                      spot=args.spot)
    _upsert(target, chosen, text, target.client("sagemaker"), target.client("s3"),
            local=args.target == "local")
    return 0


def _upsert(target: Target, chosen: recipe.Recipe, text: str, sagemaker, s3, local: bool) -> None:
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
    if local:
        bucket.ensure_bucket(s3, target.bucket, target.region)
    else:
        bucket.require_bucket(s3, target.bucket)

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
        uploaded = bucket.ensure_demo_data(s3, target.bucket, dataset)
        print(f"{parameter} default: s3://{target.bucket}/{definition.DEMO_DATA_KEYS[dataset]} "
              f"({'uploaded' if uploaded else 'already there'})")
    print(f"{action} pipeline {name}: {response['PipelineArn']}", flush=True)



def start(args, overrides: dict[str, str]) -> int:
    """Start an execution of the recipe's pipeline on the target; with --wait, show it until it
    ends: the exit status says how it ended."""
    chosen = recipe.load(args.recipe)
    # Before anything starts (the local server, an instance that bills): a training stage that
    # cannot fit its instance type's memory, in one line naming one that fits (the memory plan).
    memory_plan.refuse_unfittable(chosen, overrides, args.recipe)
    target = connect(args)
    sagemaker, s3 = target.client("sagemaker"), target.client("s3")
    arn = _start(args, target, chosen, overrides, sagemaker, s3)
    if not args.wait:
        return 0
    poll_seconds = args.poll_seconds or (30.0 if args.target == "aws" else 1.0)
    return _wait(arn, chosen, sagemaker, s3, poll_seconds, local=args.target == "local",
                 tracked_uri=overrides.get(tracking.PARAMETER))


def _start(args, target: Target, chosen: recipe.Recipe, overrides: dict[str, str], sagemaker,
           s3) -> str:
    """StartPipelineExecution of the recipe's pipeline, as it exists on the target; its ARN.
    Dataset parameters given as local files or folders are uploaded to the bucket first, and
    parameter values are checked before anything runs or bills."""
    from botocore.exceptions import ClientError

    from pipelines import validation
    from pipelines.graph import resolve_parameters

    name = definition.pipeline_name(chosen)
    bucket.check_data_uris(s3, chosen, overrides)
    for parameter in chosen.data_parameters:
        if parameter in overrides:
            overrides[parameter] = bucket.stage_input(s3, target.bucket, overrides[parameter],
                                                      parameter)
    try:
        described = sagemaker.describe_pipeline(PipelineName=name)
    except ClientError:
        raise UserError(f"pipeline {name} does not exist on {target.endpoint}; "
                        f"run `llm-pipeline upsert --recipe {args.recipe}` first") from None
    document = json.loads(described["PipelineDefinition"])
    _default_tracking(args.target, document, overrides)
    # Refused here, before StartPipelineExecution: nothing has run or billed yet.
    validation.check_execution(document, resolve_parameters(document, overrides))
    request = {"PipelineName": name,
               "PipelineParameters": [{"Name": k, "Value": str(v)} for k, v in overrides.items()]}
    if args.reuse:
        request["SelectiveExecutionConfig"] = selective_execution_config(
            sagemaker, document, target.execution_arn(args.reuse, name), args.from_step)
    validation.check_request("StartPipelineExecution", request, f"start {name}")
    arn = sagemaker.start_pipeline_execution(**request)["PipelineExecutionArn"]
    print(f"started {arn}", flush=True)
    return arn


def _default_tracking(target: str, document: dict, overrides: dict[str, str]) -> None:
    """MlflowTrackingUri when the command is not given one (pipelines/tracking.py): the shell's
    MLFLOW_TRACKING_URI, else the local store on the local target. A pipeline upserted before
    the parameter existed is left as it is."""
    if tracking.PARAMETER in overrides or not any(
            p["Name"] == tracking.PARAMETER for p in document.get("Parameters", [])):
        return
    uri = tracking.default_uri(target, server.home())
    if uri is not None:
        overrides[tracking.PARAMETER] = uri


def selective_execution_config(sagemaker, document: dict, source: str,
                               from_step: str | None) -> dict:
    """SageMaker's SelectiveExecutionConfig for `--reuse EXECUTION [--from-step STEP]`: the step
    and everything downstream of it, or without --from-step the steps of execution `source`
    (an ARN) that did not succeed."""
    from pipelines.graph import steps_from, unfinished_steps

    if from_step:
        selected = steps_from(document, from_step)
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


def _wait(arn: str, chosen: recipe.Recipe, sagemaker, s3, poll_seconds: float,
          local: bool, tracked_uri: str | None) -> int:
    """Show the execution until it ends, then its summary; the exit status says how it ended.
    `tracked_uri`: the MlflowTrackingUri it was started with, if the command set one."""
    from pipelines import watch

    name, execution_id = arn.split(":pipeline/", 1)[1].split("/execution/")
    logs = watch.StepLogs(executions_dir() / name / execution_id if local else None)
    progress = (watch.LiveProgress(list(watch.step_types(sagemaker, arn)))
                if sys.stdout.isatty() else watch.PlainProgress())
    if not local:  # the local server closes its executions' runs itself
        tracking.import_client_early(tracked_uri)
    with progress:
        watch.follow(sagemaker, arn, progress, poll_seconds, logs)
    timing = "wall time of the local jobs" if local else "SageMaker billable time"
    # How the MLflow run ended is said first, so that the summary's last lines are what to do
    # next (approve and deploy the package, or why the execution failed).
    if local:
        _print_tracking_line(executions_dir() / name / execution_id)
    else:
        _close_tracked_run(sagemaker, arn)
    succeeded = watch.summary(sagemaker, s3, arn, logs, timing, chosen.gate_metric)
    return 0 if succeeded else EXIT_FAILED


def _print_tracking_line(folder: Path) -> None:
    """The local server's line saying how the execution's MLflow run ended
    (pipelines/local/executions.py), if it is tracked."""
    from pipelines.local.executions import META_FILE

    try:
        line = json.loads((folder / META_FILE).read_text()).get("tracking", "")
    except (OSError, ValueError):
        return
    _say_tracking(line)


def _say_tracking(line: str | None) -> None:
    """How an execution's MLflow run ended: a warning on stderr, else on stdout."""
    if line:
        print(line, file=sys.stderr if line.startswith("warning:") else sys.stdout, flush=True)


def _close_tracked_run(sagemaker, arn: str) -> None:
    """The execution's MLflow run ends as the execution did, naming the model package it
    registered (on AWS: no step knows when the execution ends)."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        succeeded = sagemaker.describe_pipeline_execution(
            PipelineExecutionArn=arn)["PipelineExecutionStatus"] == "Succeeded"
        parameters = sagemaker.list_pipeline_parameters_for_execution(
            PipelineExecutionArn=arn).get("PipelineParameters", [])
        uri = tracking.tracked(next((p["Value"] for p in parameters
                                     if p["Name"] == tracking.PARAMETER), None))
        if uri is None:
            return
        steps = sagemaker.list_pipeline_execution_steps(PipelineExecutionArn=arn)
    except (BotoCoreError, ClientError) as error:  # how the execution ended is said below
        print(f"warning: could not read the execution's parameters and steps to close its "
              f"MLflow run ({error})", file=sys.stderr)
        return
    package = next((step["Metadata"]["RegisterModel"]["Arn"]
                    for step in steps.get("PipelineExecutionSteps", [])
                    if step.get("Metadata", {}).get("RegisterModel", {}).get("Arn")), None)
    name, execution_id = arn.split(":pipeline/", 1)[1].split("/execution/")
    _say_tracking(tracking.close_execution_run(uri, name, execution_id, succeeded, package))

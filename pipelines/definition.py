"""The lifecycle DAG, built with the SageMaker Python SDK v3 from a recipe.

`get_pipeline(...)` is a pure function from settings to a `Pipeline` (the SageMaker MLOps
template's shape): it makes no AWS call, needs no credentials, and the same inputs give
the same definition bytes (images are tagged by code digest, output prefixes use the
execution id, nothing carries a timestamp).

What a step's request holds is kept within what SageMaker accepts for any recipe: a recipe's
description of any length reaches Evaluate in container arguments of at most 256 characters,
and model-package metadata joins lists with '+' (its pattern allows no comma).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from containers import images
from pipelines import UserError, files, sizing
from pipelines.recipe import JUDGE_STAGES, Recipe, parameter_reference
from steps.stages import STAGES

if TYPE_CHECKING:
    from sagemaker.mlops.workflow.pipeline import Pipeline

DEFAULT_REGION = "us-east-1"
LOCAL_ACCOUNT = "123456789012"  # moto's account: the local engine's registry lives there
DEFAULT_ROLE_ARN = f"arn:aws:iam::{LOCAL_ACCOUNT}:role/llm-pipeline-execution"
DEFAULT_BUCKET = f"llm-pipeline-{LOCAL_ACCOUNT}"
DEMO_DATA_KEY = "datasets/demo/sft-demo.jsonl"

# Parameters every pipeline has, with the defaults used when the recipe gives none. A recipe
# declares any others under `parameters`; their type follows the default's (int, float, str).
COMMON_PARAMETER_DEFAULTS: dict[str, object] = {
    "InputData": None,  # the recipe's demo dataset in the bucket
    "ProcessingInstanceType": "ml.m5.xlarge",
    "TrainingInstanceType": "ml.g5.xlarge",
    "TrainingInstanceCount": 1,
    "EvalThreshold": 1.0,
    # The candidate's gate metric must beat the group's newest Approved package by this much.
    "ApprovedMargin": 0.0,
    "ModelPackageGroup": None,  # the recipe's model_package_group
    # Each training job's StoppingCondition.MaxRuntimeInSeconds; a recipe whose jobs run longer
    # (pre-training, CPT) sets its own. In seconds, as the API takes it: the definition language
    # has no arithmetic to turn hours into seconds, and SageMaker's own default of one day
    # ("The default value is 1 day. The maximum value is 28 days.",
    # https://docs.aws.amazon.com/sagemaker/latest/APIReference/API_StoppingCondition.html)
    # is what an SDK-built request loses: ModelTrainer sends 3600 s unless told otherwise.
    "MaxRuntimeSeconds": 24 * 3600,
    # Where every step tracks its run in MLflow (steps/common/tracking.py): a SageMaker managed
    # MLflow tracking server ARN, any MLflow tracking URI, or empty (or 'none') for no tracking.
    # Off on AWS unless given; `run` and `start` locally default it to the local store.
    "MlflowTrackingUri": "",
}
# Common parameters that may be empty: they are not registered as model-package metadata.
OPTIONAL_PARAMETERS = {"MlflowTrackingUri"}
# With --spot: StoppingCondition.MaxWaitTimeInSeconds, the runtime plus the time spent waiting for
# spot capacity ("It must be equal to or greater than MaxRuntimeInSeconds", same page); by default
# the recipe's MaxRuntimeSeconds and a day of waiting.
SPOT_PARAMETER_DEFAULTS: dict[str, object] = {"MaxWaitSeconds": None}
SPOT_WAIT_SECONDS = 24 * 3600
# SageMaker's limit on one container argument (botocore: ContainerArgument, max 256).
CONTAINER_ARGUMENT_LIMIT = 256
# ... and on a model package's description (ModelPackageDescription is an EntityDescription).
PACKAGE_DESCRIPTION_LIMIT = 1024
DEMO_DATA_KEYS = {"sft": DEMO_DATA_KEY, "corpus": "datasets/demo/corpus.jsonl",
                  "preferences": "datasets/demo/preferences.jsonl",
                  "prompts": "datasets/demo/constitutional-prompts.jsonl"}

CHECKPOINT_LOCAL_PATH = "/opt/ml/checkpoints"  # steps.common.contract.checkpoint_dir's default

# What the training stage prints (steps/common/metrics.py) and SageMaker reads from the log.
# The leading space keeps `tokens_per_second` from also matching `mean_tokens_per_second`.
METRIC_DEFINITIONS = {
    name: rf"[ ]{name}=([0-9.eE+-]+)"
    for name in ("train_loss", "eval_loss", "learning_rate", "tokens_per_second",
                 "mean_tokens_per_second", "total_tokens", "trainable_parameters",
                 "peak_memory_mb", "eval_kl_to_teacher")
}


def pipeline_name(recipe: Recipe) -> str:
    return f"llm-{recipe.name}"


def prepare_sdk_environment(region: str) -> None:
    """Set what the SDK needs to build a definition offline; call before importing it.

    `sagemaker.mlops` creates a boto3 client at import (needs a region), validates roles
    through IAM unless told not to, and sends telemetry unless opted out by config.
    """
    os.environ.setdefault("AWS_DEFAULT_REGION", region)
    os.environ["SAGEMAKER_VALIDATE_ROLE"] = "false"
    os.environ["SAGEMAKER_USER_CONFIG_OVERRIDE"] = str(Path(__file__).with_name("sdk-config.yaml"))
    warnings.filterwarnings("ignore", message="Running within a PipelineSession")


def _validate_sdk_config_once() -> None:
    """Make the SDK validate each distinct config against its JSON schema once, not per lookup.

    Written by hand: the SDK re-validates the session's whole config (our sdk-config.yaml) on
    every config value it looks up, about 0.5 s each and some 90 lookups per definition, which
    was 80-90% of a build. It also validates the config files again each time a session is
    created (`load_sagemaker_config`), and every ProcessingStep creates one (a local-mode client,
    for a method's name): some 10 more checks of the schema itself per definition, 50-70% of the
    CPU time left. A config that passed is remembered by its JSON text, through both ways the
    SDK validates; a new or changed one is still validated, and an invalid one still raises.
    """
    import json as _json

    from sagemaker.core.config import config as config_files
    from sagemaker.core.config.config_manager import SageMakerConfig

    def remembering(validate):
        if getattr(validate, "_remembers_valid_configs", False):
            return validate
        valid: set[str] = set()

        def validate_once(sagemaker_config=None):
            key = _json.dumps(sagemaker_config, sort_keys=True, default=str)
            if key not in valid:
                validate(sagemaker_config)
                valid.add(key)

        validate_once._remembers_valid_configs = True
        return validate_once

    SageMakerConfig.validate_sagemaker_config = staticmethod(
        remembering(SageMakerConfig.validate_sagemaker_config))
    # load_sagemaker_config looks this name up in its module when it runs.
    config_files.validate_sagemaker_config = remembering(config_files.validate_sagemaker_config)


def _share_service_models() -> None:
    """Make every botocore session of this process read botocore's service models once.

    Written by hand: each session the SDK creates while building (the PipelineSession, its
    config's, and a local-mode session per ProcessingStep, for a method's name) makes a new boto3
    session, whose loader reads and parses the service models again (SageMaker's alone is
    megabytes of JSON): about two thirds of a definition's CPU time after the first. A botocore
    loader caches files that botocore only reads, keyed by its search path; here sessions with
    the same search path (AWS_DATA_PATH) share one. The definition is byte-identical either way.
    """
    import botocore.session

    create = botocore.session.create_loader
    if getattr(create, "_shared", False):
        return
    loaders: dict[str | None, object] = {}

    def shared_loader(search_path_string: str | None = None):
        loader = loaders.get(search_path_string)
        if loader is None:
            loader = loaders[search_path_string] = create(search_path_string)
        # boto3 adds its own data folder to each new session's loader: once is enough.
        loader.search_paths[:] = list(dict.fromkeys(loader.search_paths))
        return loader

    shared_loader._shared = True
    botocore.session.create_loader = shared_loader


def _account_of(role_arn: str) -> str:
    parts = role_arn.split(":")
    if len(parts) < 6 or parts[0] != "arn" or parts[2] != "iam" or not parts[4].isdigit():
        raise UserError(f"role ARN {role_arn!r} is not an IAM role ARN "
                        "(arn:aws:iam::ACCOUNT:role/NAME); pass --role-arn with a full ARN")
    return parts[4]


def argument_pieces(text: str, limit: int = CONTAINER_ARGUMENT_LIMIT) -> list[str]:
    """`text` as container arguments of at most `limit` characters that join back into it
    exactly: each cut falls before a space where there is one, the space starting the next piece
    (so no piece after the first can be read as an --option)."""
    pieces = []
    while len(text) > limit:
        cut = text.rfind(" ", 1, limit + 1)
        cut = cut if cut > 0 else limit
        pieces.append(text[:cut])
        text = text[cut:]
    return [*pieces, text]


def shortened(text: str, limit: int) -> str:
    """`text`, or its first words and an ellipsis when it is longer than `limit` characters."""
    if len(text) <= limit:
        return text
    cut = text.rfind(" ", 0, limit - 1)
    return text[:cut if cut > 0 else limit - 1].rstrip() + "…"


def _parameters(recipe: Recipe, bucket: str, spot: bool = False) -> dict[str, object]:
    """Pipeline parameter name -> default value, common ones first, then the recipe's own."""
    defaults = dict(COMMON_PARAMETER_DEFAULTS)
    if spot:
        defaults.update(SPOT_PARAMETER_DEFAULTS)
    for parameter, dataset in recipe.demo_data.items():
        defaults[parameter] = f"s3://{bucket}/{DEMO_DATA_KEYS[dataset]}"
    defaults["ModelPackageGroup"] = recipe.model_package_group
    defaults.update(recipe.parameters)
    if not spot:  # a recipe may give spot's wait a default; it only exists with spot
        defaults.pop("MaxWaitSeconds", None)
    elif defaults["MaxWaitSeconds"] is None:
        defaults["MaxWaitSeconds"] = int(defaults["MaxRuntimeSeconds"]) + SPOT_WAIT_SECONDS
    for key, value in defaults.items():
        if not key.isidentifier() or not key[:1].isupper():
            raise UserError(f"{recipe.source}: parameters.{key}: parameter names are CamelCase "
                            "identifiers such as LearningRate")
        if isinstance(value, str) and not value.strip() and key not in OPTIONAL_PARAMETERS:
            raise UserError(f"{recipe.source}: parameters.{key} is empty; registration records "
                            "every parameter and metadata holds no empty value: write 'none'")
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise UserError(f"{recipe.source}: parameters.{key}={value!r}: a default must be a "
                            "string, an integer or a float (write booleans as 'true'/'false')")
        common = {**COMMON_PARAMETER_DEFAULTS, **SPOT_PARAMETER_DEFAULTS}.get(key)
        if common is not None and type(value) is not type(common):
            if not (isinstance(common, float) and isinstance(value, int)):
                raise UserError(f"{recipe.source}: parameters.{key}={value!r} is not "
                                f"{type(common).__name__}")
            defaults[key] = float(value)
    return defaults


def get_pipeline(
    recipe: Recipe,
    role_arn: str = DEFAULT_ROLE_ARN,
    bucket: str = DEFAULT_BUCKET,
    region: str = DEFAULT_REGION,
    image_tag: str | None = None,
    spot: bool = False,
) -> Pipeline:
    """The recipe's pipeline. `spot`: its training jobs use managed spot training.

    Spot is chosen when the pipeline is built, not by a pipeline parameter: a job without spot
    must not carry MaxWaitTimeInSeconds (CreateTrainingJob refuses it: "It is only supported
    when EnableManagedSpotTraining is set to true"), and the definition language cannot leave a
    field out depending on a parameter's value
    (https://github.com/aws/sagemaker-python-sdk/issues/4140).
    """
    prepare_sdk_environment(region)
    _share_service_models()
    _validate_sdk_config_once()
    import boto3
    from sagemaker.core.model_metrics import MetricsSource, ModelMetrics
    from sagemaker.core.processing import Processor
    from sagemaker.core.shapes import (
        ProcessingInput,
        ProcessingOutput,
        ProcessingS3Input,
        ProcessingS3Output,
    )
    from sagemaker.core.training.configs import (
        CheckpointConfig,
        Compute,
        InputData,
        OutputDataConfig,
    )
    from sagemaker.core.workflow.conditions import (
        ConditionEquals,
        ConditionGreaterThanOrEqualTo,
        ConditionLessThanOrEqualTo,
    )
    from sagemaker.core.workflow.execution_variables import ExecutionVariables
    from sagemaker.core.workflow.functions import Join, JsonGet
    from sagemaker.core.workflow.parameters import ParameterFloat, ParameterInteger, ParameterString
    from sagemaker.core.workflow.pipeline_context import PipelineSession
    from sagemaker.core.workflow.properties import PropertyFile
    from sagemaker.mlops.workflow.condition_step import ConditionStep
    from sagemaker.mlops.workflow.fail_step import FailStep
    from sagemaker.mlops.workflow.model_step import ModelStep
    from sagemaker.mlops.workflow.pipeline import Pipeline
    from sagemaker.mlops.workflow.retry import (
        SageMakerJobExceptionTypeEnum,
        SageMakerJobStepRetryPolicy,
        StepExceptionTypeEnum,
        StepRetryPolicy,
    )
    from sagemaker.mlops.workflow.steps import CacheConfig, ProcessingStep, TrainingStep
    from sagemaker.serve.model_builder import ModelBuilder
    from sagemaker.train.model_trainer import ModelTrainer

    class StageTrainingStep(TrainingStep):
        """A TrainingStep whose container runs a named stage module.

        ModelTrainer sets ContainerEntrypoint only for its own uploaded-source driver; our
        code is baked into the image (so caching can hit), hence the entry point is added
        to the request here. For the same reason the SDK's distributed configs (which upload
        driver scripts under a timestamped key on every build) are not used: a stage started
        on several instances launches torchrun itself (steps.common.contract.run).
        """

        def __init__(self, name: str, module: str, **kwargs):
            super().__init__(name, **kwargs)
            self.module = module

        @property
        def arguments(self):
            request = super().arguments
            request["AlgorithmSpecification"]["ContainerEntrypoint"] = ["python", "-m", self.module]
            # Written here because the SDK's StoppingCondition takes literal integers only, and
            # the limits are pipeline parameters.
            request["StoppingCondition"] = stopping_condition
            return request

    account = _account_of(role_arn)
    tag = image_tag or images.code_digest()
    processing_image = images.image_uri(f"{images.REPOSITORY_PREFIX}-processing", account, region, tag)
    training_image = images.image_uri(f"{images.REPOSITORY_PREFIX}-training", account, region, tag)
    name = pipeline_name(recipe)

    make = {str: ParameterString, int: ParameterInteger, float: ParameterFloat}
    params = {key: make[type(value)](name=key, default_value=value)
              for key, value in _parameters(recipe, bucket, spot).items()}
    p = params

    def setting(value: object):
        """A stage setting as a definition value: a parameter reference, or the literal text."""
        reference = parameter_reference(value)
        if reference is None:
            return str(value).lower() if isinstance(value, bool) else str(value)
        parameter = params[reference]
        return parameter if isinstance(parameter, ParameterString) else parameter.to_string()

    def cli_args(stage: str) -> list:
        """A processing stage's settings as its command-line arguments."""
        args: list = []
        for key, value in recipe.stages[stage].items():
            args += [f"--{key.replace('_', '-')}", setting(value)]
        return args

    session = PipelineSession(boto_session=boto3.Session(region_name=region), default_bucket=bucket)
    # default_bucket() would otherwise check (and create) the bucket through S3.
    session._default_bucket = bucket

    def output_uri(step: str, output: str):
        return Join(on="/", values=["s3:/", bucket, name, ExecutionVariables.PIPELINE_EXECUTION_ID,
                                    step, output])

    def checkpoint_uri(step: str) -> str:
        """Where a training step's checkpoints sync: keyed by the code version and the step, never
        by the execution, because SageMaker's step cache compares a training step's
        CheckpointConfig with the earlier run's ("Default cache key attributes by pipeline step
        type", https://docs.aws.amazon.com/sagemaker/latest/dg/pipelines-default-keys.html): an
        execution id here would make every execution miss the cache from the first training
        step on. Under it each job writes only below <run key>/<job name>, the run key being its
        settings and the content of its inputs (steps.common.training.checkpoint_folder), so
        runs of other settings or data never resume from each other's checkpoints and two
        executions of the same work at once never write the same object."""
        return f"s3://{bucket}/{name}/checkpoints/{tag}/{step}"

    def s3_input(input_name: str, uri, local_path: str) -> ProcessingInput:
        return ProcessingInput(input_name=input_name, s3_input=ProcessingS3Input(
            s3_uri=uri, local_path=local_path, s3_data_type="S3Prefix", s3_input_mode="File"))

    def s3_output(output_name: str, uri, local_path: str) -> ProcessingOutput:
        return ProcessingOutput(output_name=output_name, s3_output=ProcessingS3Output(
            s3_uri=uri, local_path=local_path, s3_upload_mode="EndOfJob"))

    def tracking_environment(step_name: str) -> dict:
        """What a step's container needs to track its run in MLflow (steps/common/tracking.py).
        Nothing here varies between executions: a job's Environment is part of its step's cache
        key; the container reads its execution from its job's name."""
        return {"MLFLOW_TRACKING_URI": p["MlflowTrackingUri"], "LLM_PIPELINE_NAME": name,
                "LLM_PIPELINE_STEP": step_name, "LLM_PIPELINE_RECIPE": recipe.name,
                "LLM_PIPELINE_CODE_VERSION": tag}

    def processor(module: str, step_name: str) -> Processor:
        return Processor(role=role_arn, image_uri=processing_image, instance_count=1,
                         instance_type=p["ProcessingInstanceType"], sagemaker_session=session,
                         entrypoint=["python", "-m", module], volume_size_in_gb=30,
                         max_runtime_in_seconds=4 * 3600, env=tracking_environment(step_name))

    # Every training job's limits; with spot, how long it may also wait for capacity.
    stopping_condition = {"MaxRuntimeInSeconds": p["MaxRuntimeSeconds"]}
    if spot:
        stopping_condition["MaxWaitTimeInSeconds"] = p["MaxWaitSeconds"]
    cache = CacheConfig(enable_caching=True, expire_after="P30D")
    # Service faults and throttling retry quickly; lost capacity and internal job errors after the
    # recipe's lost_job_retry_seconds (a minute by default), doubling. A stage's own failure (bad
    # data, a bad parameter) is not retried.
    retries = [
        StepRetryPolicy(exception_types=[StepExceptionTypeEnum.SERVICE_FAULT,
                                         StepExceptionTypeEnum.THROTTLING],
                        interval_seconds=10, backoff_rate=2.0, max_attempts=3),
        SageMakerJobStepRetryPolicy(exception_types=[SageMakerJobExceptionTypeEnum.INTERNAL_ERROR,
                                                     SageMakerJobExceptionTypeEnum.CAPACITY_ERROR,
                                                     SageMakerJobExceptionTypeEnum.RESOURCE_LIMIT],
                                    interval_seconds=recipe.lost_job_retry_seconds,
                                    backoff_rate=2.0, max_attempts=3),
    ]

    def training_stage(stage: str, inputs: dict[str, str]) -> TrainingStep:
        """A training step: channels train/validation from `data`, one channel per other input."""
        step_name, module = STAGES[stage].step, STAGES[stage].module
        inputs = dict(inputs)
        data_uri = resolve_input(inputs.pop("data"))
        channels = [
            InputData(channel_name="train", data_source=Join(on="/", values=[data_uri, "train.jsonl"])),
            InputData(channel_name="validation",
                      data_source=Join(on="/", values=[data_uri, "validation.jsonl"])),
        ]
        for channel, reference in inputs.items():  # model, and stage-specific ones
            uri = resolve_input(reference)
            if uri is not None:
                channels.append(InputData(channel_name=channel, data_source=uri))
        trainer = ModelTrainer(
            training_image=training_image,
            role=role_arn,
            sagemaker_session=session,
            compute=Compute(instance_type=p["TrainingInstanceType"],
                            instance_count=p["TrainingInstanceCount"], volume_size_in_gb=100,
                            enable_managed_spot_training=True if spot else None),
            hyperparameters={key: setting(value) for key, value in recipe.stages[stage].items()},
            environment=tracking_environment(step_name),
            output_data_config=OutputDataConfig(s3_output_path=output_uri(step_name, "model")),
            # Synced to S3 while the job runs; a retried, restarted or spot-interrupted job
            # resumes from it.
            checkpoint_config=CheckpointConfig(s3_uri=checkpoint_uri(step_name),
                                               local_path=CHECKPOINT_LOCAL_PATH),
        ).with_metric_definitions([{"name": k, "regex": v} for k, v in METRIC_DEFINITIONS.items()])
        return StageTrainingStep(name=step_name, module=module,
                                 step_args=trainer.train(input_data_config=channels),
                                 cache_config=cache, retry_policies=retries)

    def processing_stage(stage: str, inputs: dict[str, str]) -> ProcessingStep:
        """A processing step between DataPrep and Evaluate: each input a folder
        (--<name>-dir), one output folder (--output-dir)."""
        step_name, module = STAGES[stage].step, STAGES[stage].module
        located = {name: resolve_input(reference) for name, reference in inputs.items()}
        located = {name: uri for name, uri in located.items() if uri is not None}
        return ProcessingStep(
            name=step_name,
            step_args=processor(module, step_name).run(
                inputs=[s3_input(name, uri, f"/opt/ml/processing/input/{name}")
                        for name, uri in located.items()],
                outputs=[s3_output("output", output_uri(step_name, "output"),
                                   "/opt/ml/processing/output")],
                arguments=[*(arg for name in located for arg in (
                               f"--{name.replace('_', '-')}-dir", f"/opt/ml/processing/input/{name}")),
                           "--output-dir", "/opt/ml/processing/output", *cli_args(stage),
                           # A quantized model is registered as one archive (steps.quantize).
                           *(["--archive", "true"] if stage == "quantize" else [])],
            ),
            cache_config=cache,
            retry_policies=retries,
        )

    # 1. Data preparation: one DataPrep step per dataset parameter the stages read ------------
    prepared: dict[str, tuple[ProcessingStep, PropertyFile]] = {}

    def data_prep(parameter: str) -> tuple[ProcessingStep, PropertyFile]:
        if parameter not in prepared:
            suffix = parameter.removesuffix("Data") if parameter != "InputData" else ""
            manifest = PropertyFile(name=f"DataManifest{suffix}", output_name="data",
                                    path="manifest.json")
            step = ProcessingStep(
                name=f"{STAGES['data_prep'].step}{suffix}",
                step_args=processor(STAGES["data_prep"].module,
                                    f"{STAGES['data_prep'].step}{suffix}").run(
                    inputs=[s3_input("raw", p[parameter], "/opt/ml/processing/input/raw")],
                    outputs=[s3_output("data", output_uri(f"{STAGES['data_prep'].step}{suffix}", "data"),
                                       "/opt/ml/processing/output")],
                    arguments=["--input-dir", "/opt/ml/processing/input/raw",
                               "--output-dir", "/opt/ml/processing/output",
                               *cli_args("data_prep")],
                ),
                property_files=[manifest],
                cache_config=cache,
                retry_policies=retries,
            )
            prepared[parameter] = (step, manifest)
        return prepared[parameter]

    # What each stage produced: a model artifact (training) or an output folder (processing).
    produced: dict[str, object] = {}

    def resolve_input(reference: str):
        """The S3 location an input reference names (None for `base`)."""
        parameter = parameter_reference(reference)
        if parameter is not None:
            step, _ = data_prep(parameter)
            return step.properties.ProcessingOutputConfig.Outputs["data"].S3Output.S3Uri
        if reference == "base":
            return None
        source, _, part = reference.partition("/")
        return Join(on="/", values=[produced[source], part]) if part else produced[source]

    # 2. The stages between, in order; by default each reads InputData and the policy the
    # training stage before it produced (a reward model is not one) -------------------------
    middle_steps = []
    previous_model = "base"
    data_of: dict[str, str] = {}
    for stage in recipe.middle_stages:
        inputs = {"data": "$InputData", "model": previous_model, **recipe.inputs[stage]}
        data_of[stage] = inputs["data"]
        if STAGES[stage].job == "processing":
            step = processing_stage(stage, inputs)
            produced[stage] = step.properties.ProcessingOutputConfig.Outputs["output"].S3Output.S3Uri
        else:
            step = training_stage(stage, inputs)
            produced[stage] = step.properties.ModelArtifacts.S3ModelArtifacts
            if stage not in JUDGE_STAGES:
                previous_model = stage
        middle_steps.append(step)

    # 3. Evaluation: the trained model against its base, on the last stage's held-out data ------
    last = recipe.policy_stages[-1]
    inputs = {"model": last, "data": data_of[last], **recipe.inputs["evaluate"]}
    model_uri = resolve_input(inputs["model"])
    evaluation = PropertyFile(name="Evaluation", output_name="evaluation", path="evaluation.json")
    # The execution's MLflow run ("none" untracked), for the package (steps/common/tracking.py).
    tracked_run = PropertyFile(name="MlflowRun", output_name="evaluation", path="mlflow_run.json")
    evaluate = ProcessingStep(
        name=STAGES["evaluate"].step,
        step_args=processor(STAGES["evaluate"].module, STAGES["evaluate"].step).run(
            inputs=[s3_input(name, resolve_input(reference),
                             f"/opt/ml/processing/{name}")
                    for name, reference in inputs.items()],
            outputs=[s3_output("evaluation", output_uri(STAGES["evaluate"].step, "evaluation"),
                               "/opt/ml/processing/evaluation")],
            arguments=[*(arg for name in inputs
                         for arg in (f"--{name.replace('_', '-')}-dir", f"/opt/ml/processing/{name}")),
                       "--output-dir", "/opt/ml/processing/evaluation",
                       "--description", *argument_pieces(recipe.description or recipe.name),
                       *cli_args("evaluate")],
        ),
        property_files=[evaluation, tracked_run],
        cache_config=cache,
        retry_policies=retries,
    )
    evaluation_uri = evaluate.properties.ProcessingOutputConfig.Outputs["evaluation"].S3Output.S3Uri
    gate_value = JsonGet(step_name=evaluate.name, property_file=evaluation,
                         json_path=f"metrics.{recipe.gate_metric}.value")
    main_prep, main_manifest = prepared.get("InputData") or next(iter(prepared.values()))

    # 4. Gate, then registration or failure ------------------------------------------------
    metadata = {
        "recipe": recipe.name,
        "training_stages": "+".join(recipe.training_stages),
        "data_manifest_sha256": JsonGet(step_name=main_prep.name, property_file=main_manifest,
                                        json_path="dataset_sha256"),
        "code_version": tag,
        "pipeline_execution": ExecutionVariables.PIPELINE_EXECUTION_ID,
        "gate_metric": recipe.gate_metric,
        f"eval_{recipe.gate_metric}": gate_value.to_string(),
    }
    metadata["mlflow_run_id"] = JsonGet(step_name=evaluate.name, property_file=tracked_run,
                                        json_path="execution_run_id")
    metadata["mlflow_experiment"] = name
    # Every other dataset's manifest too (the preference pairs of an alignment recipe, ...).
    for parameter, (step, manifest) in prepared.items():
        if step is not main_prep:
            metadata[f"data_manifest_sha256_{parameter.removesuffix('Data').lower()}"] = JsonGet(
                step_name=step.name, property_file=manifest, json_path="dataset_sha256")
    # The recipe's own parameters (base model, method, learning rate, ...) as this run set them.
    for key in recipe.parameters:
        if key not in COMMON_PARAMETER_DEFAULTS:
            metadata[f"param_{key}"] = setting(f"${key}")
    # The report and model card Evaluate wrote (steps.common.report), beside evaluation.json.
    metadata["evaluation_report"] = Join(on="/", values=[evaluation_uri, "report.html"])
    metadata["model_card"] = Join(on="/", values=[evaluation_uri, "model_card.md"])
    if "BaseModel" in recipe.parameters:
        metadata["parent_model"] = setting("$BaseModel")
    # With a quantize stage the registered model is its variant of the evaluated one: one scheme,
    # packed as the single archive a model package names (steps.quantize --archive).
    if "quantize" in recipe.stages:
        scheme = recipe.stages["quantize"].get("scheme", "both")
        if scheme in ("both", None):
            raise UserError(f"{recipe.source}: stages.quantize.scheme must name the one scheme "
                            "registered (int8 or nf4, or a $Parameter), not both")
        metadata["unquantized_model"] = model_uri
        metadata["quantization"] = setting(scheme)
        metadata["quantization_report"] = Join(on="/", values=[produced["quantize"],
                                                                "quantization.json"])
        model_uri = Join(on="/", values=[produced["quantize"],
                                         Join(on="", values=[setting(scheme), ".tar.gz"])])
    # The package names the serving image, which loads the artifact as it is (an adapter carries
    # its base: steps.common.models), on instances sized from the model the recipe's defaults
    # name, quantized if a quantize stage registers its variant (pipelines/sizing.py).
    serving_image = images.image_uri(f"{images.REPOSITORY_PREFIX}-serving", account, region, tag)
    quantization = recipe.stages.get("quantize", {}).get("scheme")
    if parameter_reference(quantization):
        quantization = recipe.parameters.get(parameter_reference(quantization))
    instance_types = sizing.inference_instance_types(str(recipe.parameters.get("BaseModel", "")),
                                                     quantization)
    builder = ModelBuilder(image_uri=serving_image, s3_model_data_url=model_uri,
                           sagemaker_session=session, role_arn=role_arn)
    register = ModelStep(
        name="Register",
        step_args=builder.register(
            model_package_group_name=p["ModelPackageGroup"],
            approval_status="PendingManualApproval",
            description=shortened(f"{recipe.name}: {recipe.description}",
                                  PACKAGE_DESCRIPTION_LIMIT),
            content_types=["application/json"],
            response_types=["application/json"],
            inference_instances=instance_types,
            transform_instances=instance_types[:1],
            model_metrics=ModelMetrics(model_statistics=MetricsSource(
                s3_uri=Join(on="/", values=[evaluation_uri, "evaluation.json"]),
                content_type="application/json")),
            customer_metadata_properties=metadata,
        ),
    )
    higher = recipe.gate_direction == "higher"
    # The candidate against the group's Approved package: a step of its own and never cached,
    # since its answer depends on the registry, which no cache key sees (steps.compare_approved).
    approved_gate = PropertyFile(name="ApprovedGate", output_name="gate", path="gate.json")
    compare = ProcessingStep(
        name=STAGES["compare_approved"].step,
        step_args=processor(STAGES["compare_approved"].module,
                            STAGES["compare_approved"].step).run(
            inputs=[s3_input("evaluation", evaluation_uri, "/opt/ml/processing/evaluation"),
                    s3_input("data", resolve_input(inputs["data"]), "/opt/ml/processing/data")],
            outputs=[s3_output("gate", output_uri(STAGES["compare_approved"].step, "gate"),
                               "/opt/ml/processing/gate")],
            arguments=["--evaluation-dir", "/opt/ml/processing/evaluation",
                       "--data-dir", "/opt/ml/processing/data",
                       "--output-dir", "/opt/ml/processing/gate",
                       "--model-package-group", p["ModelPackageGroup"],
                       "--gate-metric", recipe.gate_metric,
                       "--gate-direction", recipe.gate_direction,
                       "--approved-margin", p["ApprovedMargin"].to_string()],
        ),
        property_files=[approved_gate],
        retry_policies=retries,
    )
    beats_approved = JsonGet(step_name=compare.name, property_file=approved_gate,
                             json_path="beats_approved")
    fail = FailStep(
        name="EvaluationGateFailed",
        error_message=Join(on=" ", values=[
            f"Evaluation gate failed: {recipe.gate_metric} =", gate_value,
            "(must be at least" if higher else "(must be at most", "EvalThreshold =",
            p["EvalThreshold"], "); against the Approved package:",
            JsonGet(step_name=compare.name, property_file=approved_gate, json_path="reason"),
            "; nothing was registered"]),
    )
    condition = ConditionGreaterThanOrEqualTo if higher else ConditionLessThanOrEqualTo
    gate = ConditionStep(
        name="EvaluationGate",
        # Both: the absolute threshold, and the margin over the model in production.
        conditions=[condition(left=gate_value, right=p["EvalThreshold"]),
                    ConditionEquals(left=beats_approved, right=1)],
        if_steps=[register],
        else_steps=[fail],
    )

    # The SDK turns up botocore's and its own loggers at import; keep the command quiet.
    for logger in ("botocore", "boto3", "sagemaker", "urllib3"):
        logging.getLogger(logger).setLevel(logging.WARNING)
    return Pipeline(name=name, parameters=list(params.values()),
                    steps=[*(step for step, _ in prepared.values()), *middle_steps, evaluate,
                           compare, gate],
                    sagemaker_session=session, pipeline_experiment_config=None)


def definition_json(recipe: Recipe, **settings) -> str:
    """The definition as SageMaker receives it (the contract the local engine runs)."""
    # The SDK prints and logs chatter (image URIs, compression type) while building;
    # keep stdout for the definition itself.
    logging.disable(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return get_pipeline(recipe, **settings).definition()
    finally:
        logging.disable(logging.NOTSET)


def cached_definition_json(recipe: Recipe, cache: Path, *, role_arn: str, bucket: str,
                           region: str, image_tag: str | None, spot: bool) -> str:
    """`definition_json`, reusing the text an earlier call built from the same inputs, kept in the
    folder `cache`.

    Building imports the SageMaker SDK (10-20 s), and a definition is a pure function of the
    recipe file, the role/bucket/region, the image tag and the code that builds it, so the text is
    kept keyed by all of them. Only `run` uses it: `definition` and `upsert` always build afresh.
    """
    import hashlib
    from importlib import metadata

    builder = Path(__file__).parent
    key = hashlib.sha256()
    for part in (recipe.source.read_bytes(), role_arn, bucket, region,
                 image_tag or images.code_digest(), f"spot={spot}",
                 metadata.version("sagemaker"),
                 *(path.read_bytes() for path in sorted(builder.glob("*.py"))),
                 (builder / "sdk-config.yaml").read_bytes(),
                 (builder.parent / "containers" / "images.py").read_bytes(),
                 # the stage table: step names and modules
                 (builder.parent / "steps" / "stages.py").read_bytes()):
        key.update(part if isinstance(part, bytes) else str(part).encode())
        key.update(b"\0")
    path = cache / f"{key.hexdigest()[:32]}.json"
    if path.is_file():
        return path.read_text(encoding="utf-8")
    text = definition_json(recipe, role_arn=role_arn, bucket=bucket, region=region,
                           image_tag=image_tag, spot=spot)
    path.parent.mkdir(parents=True, exist_ok=True)
    files.write_whole(path, text)  # concurrent runs: whole files only
    return text


def with_parameter_defaults(text: str, overrides: dict[str, str]) -> str:
    """The definition `text` with the parameters in `overrides` defaulting to the values given
    (checked and typed as an execution would take them); `text` itself when there are none."""
    if not overrides:
        return text
    from pipelines.graph import resolve_parameters

    document = json.loads(text)
    values = resolve_parameters(document, overrides)
    for parameter in document["Parameters"]:
        if parameter["Name"] in overrides:
            parameter["DefaultValue"] = values[parameter["Name"]]
    return json.dumps(document)

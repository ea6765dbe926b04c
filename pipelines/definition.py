"""The lifecycle DAG, built with the SageMaker Python SDK v3 from a recipe.

`get_pipeline(...)` is a pure function from settings to a `Pipeline` (the SageMaker MLOps
template's shape): it makes no AWS call, needs no credentials, and the same inputs give
the same definition bytes (images are tagged by code digest, output prefixes use the
execution id, nothing carries a timestamp).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from containers import images
from pipelines import UserError
from pipelines.recipe import Recipe

if TYPE_CHECKING:
    from sagemaker.mlops.workflow.pipeline import Pipeline

DEFAULT_REGION = "us-east-1"
LOCAL_ACCOUNT = "123456789012"  # moto's account: the local engine's registry lives there
DEFAULT_ROLE_ARN = f"arn:aws:iam::{LOCAL_ACCOUNT}:role/llm-pipeline-execution"
DEFAULT_BUCKET = f"llm-pipeline-{LOCAL_ACCOUNT}"
DEMO_DATA_KEY = "datasets/demo/sft-demo.jsonl"

# Pipeline parameters every recipe exposes (scripts rely on these names) and their types.
PARAMETER_TYPES = {
    "InputData": "String",
    "BaseModel": "String",
    "ProcessingInstanceType": "String",
    "TrainingInstanceType": "String",
    "Epochs": "Integer",
    "LearningRate": "Float",
    "LoraRank": "Integer",
    "EvalThreshold": "Float",
    "ModelPackageGroup": "String",
}

# What the training stage prints (steps/common/metrics.py) and SageMaker reads from the log.
# The leading space keeps `tokens_per_second` from also matching `mean_tokens_per_second`.
METRIC_DEFINITIONS = {
    name: rf"[ ]{name}=([0-9.eE+-]+)"
    for name in ("train_loss", "eval_loss", "learning_rate", "tokens_per_second",
                 "trainable_parameters", "peak_memory_mb")
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


def _account_of(role_arn: str) -> str:
    parts = role_arn.split(":")
    if len(parts) < 6 or parts[0] != "arn" or parts[2] != "iam" or not parts[4].isdigit():
        raise UserError(f"role ARN {role_arn!r} is not an IAM role ARN "
                        "(arn:aws:iam::ACCOUNT:role/NAME); pass --role-arn with a full ARN")
    return parts[4]


def _cli_args(settings: dict[str, object]) -> list[str]:
    """Stage settings as command-line arguments of a processing entry point."""
    args: list[str] = []
    for key, value in settings.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return args


def get_pipeline(
    recipe: Recipe,
    role_arn: str = DEFAULT_ROLE_ARN,
    bucket: str = DEFAULT_BUCKET,
    region: str = DEFAULT_REGION,
    image_tag: str | None = None,
) -> Pipeline:
    prepare_sdk_environment(region)
    import boto3
    from sagemaker.core.model_metrics import MetricsSource, ModelMetrics
    from sagemaker.core.processing import Processor
    from sagemaker.core.shapes import (
        ProcessingInput,
        ProcessingOutput,
        ProcessingS3Input,
        ProcessingS3Output,
    )
    from sagemaker.core.workflow.conditions import ConditionGreaterThanOrEqualTo
    from sagemaker.core.workflow.execution_variables import ExecutionVariables
    from sagemaker.core.workflow.functions import Join, JsonGet
    from sagemaker.core.workflow.parameters import ParameterFloat, ParameterInteger, ParameterString
    from sagemaker.core.workflow.pipeline_context import PipelineSession
    from sagemaker.core.workflow.properties import PropertyFile
    from sagemaker.mlops.workflow.condition_step import ConditionStep
    from sagemaker.mlops.workflow.fail_step import FailStep
    from sagemaker.mlops.workflow.model_step import ModelStep
    from sagemaker.mlops.workflow.pipeline import Pipeline
    from sagemaker.mlops.workflow.steps import CacheConfig, ProcessingStep, TrainingStep
    from sagemaker.serve.model_builder import ModelBuilder
    from sagemaker.train.configs import Compute, InputData, OutputDataConfig
    from sagemaker.train.model_trainer import ModelTrainer

    class StageTrainingStep(TrainingStep):
        """A TrainingStep whose container runs a named stage module.

        ModelTrainer sets ContainerEntrypoint only for its own uploaded-source driver; our
        code is baked into the image (so caching can hit), hence the entry point is added
        to the request here.
        """

        def __init__(self, name: str, module: str, **kwargs):
            super().__init__(name, **kwargs)
            self.module = module

        @property
        def arguments(self):
            request = super().arguments
            request["AlgorithmSpecification"]["ContainerEntrypoint"] = ["python", "-m", self.module]
            return request

    account = _account_of(role_arn)
    tag = image_tag or images.code_digest()
    processing_image = images.image_uri(f"{images.REPOSITORY_PREFIX}-processing", account, region, tag)
    training_image = images.image_uri(f"{images.REPOSITORY_PREFIX}-training", account, region, tag)
    name = pipeline_name(recipe)

    unknown = set(recipe.parameters) - set(PARAMETER_TYPES)
    if unknown:
        raise UserError(f"{recipe.source}: unknown pipeline parameter(s) {', '.join(sorted(unknown))}; "
                        f"valid: {', '.join(PARAMETER_TYPES)}")
    defaults = {"InputData": f"s3://{bucket}/{DEMO_DATA_KEY}",
                "ModelPackageGroup": recipe.model_package_group, **recipe.parameters}
    make = {"String": ParameterString, "Integer": ParameterInteger, "Float": ParameterFloat}
    cast = {"String": str, "Integer": int, "Float": float}
    params = {}
    for key, kind in PARAMETER_TYPES.items():
        if key not in defaults:
            raise UserError(f"{recipe.source}: parameters.{key} needs a default value")
        try:
            default = cast[kind](defaults[key])
        except (TypeError, ValueError):
            raise UserError(f"{recipe.source}: parameters.{key}={defaults[key]!r} is not "
                            f"{kind.lower()}") from None
        params[key] = make[kind](name=key, default_value=default)
    p = params

    session = PipelineSession(boto_session=boto3.Session(region_name=region), default_bucket=bucket)
    # default_bucket() would otherwise check (and create) the bucket through S3.
    session._default_bucket = bucket

    def output_uri(step: str, output: str):
        return Join(on="/", values=["s3:/", bucket, name, ExecutionVariables.PIPELINE_EXECUTION_ID,
                                    step, output])

    def s3_input(input_name: str, uri, local_path: str) -> ProcessingInput:
        return ProcessingInput(input_name=input_name, s3_input=ProcessingS3Input(
            s3_uri=uri, local_path=local_path, s3_data_type="S3Prefix", s3_input_mode="File"))

    def s3_output(output_name: str, uri, local_path: str) -> ProcessingOutput:
        return ProcessingOutput(output_name=output_name, s3_output=ProcessingS3Output(
            s3_uri=uri, local_path=local_path, s3_upload_mode="EndOfJob"))

    def processor(module: str) -> Processor:
        return Processor(role=role_arn, image_uri=processing_image, instance_count=1,
                         instance_type=p["ProcessingInstanceType"], sagemaker_session=session,
                         entrypoint=["python", "-m", module], volume_size_in_gb=30,
                         max_runtime_in_seconds=4 * 3600)

    cache = CacheConfig(enable_caching=True, expire_after="P30D")

    # 1. Data preparation -------------------------------------------------------------
    manifest = PropertyFile(name="DataManifest", output_name="data", path="manifest.json")
    data_prep = ProcessingStep(
        name="DataPrep",
        step_args=processor("steps.data_prep").run(
            inputs=[s3_input("raw", p["InputData"], "/opt/ml/processing/input/raw")],
            outputs=[s3_output("data", output_uri("DataPrep", "data"), "/opt/ml/processing/output")],
            arguments=["--input-dir", "/opt/ml/processing/input/raw",
                       "--output-dir", "/opt/ml/processing/output",
                       "--tokenizer", p["BaseModel"],
                       *_cli_args(recipe.stages.get("data_prep", {}))],
        ),
        property_files=[manifest],
        cache_config=cache,
    )
    data_uri = data_prep.properties.ProcessingOutputConfig.Outputs["data"].S3Output.S3Uri

    # 2. Supervised fine-tuning (LoRA) --------------------------------------------------
    hyperparameters = {key: str(value) for key, value in recipe.stages.get("sft", {}).items()}
    hyperparameters.update({
        "base_model": p["BaseModel"],
        "epochs": p["Epochs"].to_string(),
        "learning_rate": p["LearningRate"].to_string(),
        "lora_r": p["LoraRank"].to_string(),
        "peft_method": "lora",
    })
    trainer = ModelTrainer(
        training_image=training_image,
        role=role_arn,
        sagemaker_session=session,
        compute=Compute(instance_type=p["TrainingInstanceType"], instance_count=1,
                        volume_size_in_gb=100),
        hyperparameters=hyperparameters,
        output_data_config=OutputDataConfig(s3_output_path=output_uri("SFT", "model")),
    ).with_metric_definitions([{"name": k, "regex": v} for k, v in METRIC_DEFINITIONS.items()])
    sft = StageTrainingStep(
        name="SFT",
        module="steps.sft",
        step_args=trainer.train(input_data_config=[
            InputData(channel_name="train", data_source=Join(on="/", values=[data_uri, "train.jsonl"])),
            InputData(channel_name="validation",
                      data_source=Join(on="/", values=[data_uri, "validation.jsonl"])),
        ]),
        cache_config=cache,
    )
    model_uri = sft.properties.ModelArtifacts.S3ModelArtifacts

    # 3. Evaluation: tuned vs base ------------------------------------------------------
    evaluation = PropertyFile(name="Evaluation", output_name="evaluation", path="evaluation.json")
    evaluate = ProcessingStep(
        name="Evaluate",
        step_args=processor("steps.evaluate").run(
            inputs=[s3_input("model", model_uri, "/opt/ml/processing/model"),
                    s3_input("data", data_uri, "/opt/ml/processing/data")],
            outputs=[s3_output("evaluation", output_uri("Evaluate", "evaluation"),
                               "/opt/ml/processing/evaluation")],
            arguments=["--model-dir", "/opt/ml/processing/model",
                       "--data-dir", "/opt/ml/processing/data",
                       "--output-dir", "/opt/ml/processing/evaluation",
                       "--base-model", p["BaseModel"],
                       *_cli_args(recipe.stages.get("evaluate", {}))],
        ),
        property_files=[evaluation],
        cache_config=cache,
    )
    evaluation_uri = evaluate.properties.ProcessingOutputConfig.Outputs["evaluation"].S3Output.S3Uri
    gate_value = JsonGet(step_name=evaluate.name, property_file=evaluation,
                         json_path=f"metrics.{recipe.gate_metric}.value")

    # 4. Gate, then registration or failure ------------------------------------------------
    builder = ModelBuilder(image_uri=training_image, s3_model_data_url=model_uri,
                           sagemaker_session=session, role_arn=role_arn)
    register = ModelStep(
        name="Register",
        step_args=builder.register(
            model_package_group_name=p["ModelPackageGroup"],
            approval_status="PendingManualApproval",
            description=f"{recipe.name}: {recipe.description}"[:1000],
            content_types=["application/json"],
            response_types=["application/json"],
            inference_instances=["ml.g5.xlarge", "ml.g5.2xlarge"],
            transform_instances=["ml.g5.xlarge"],
            model_metrics=ModelMetrics(model_statistics=MetricsSource(
                s3_uri=Join(on="/", values=[evaluation_uri, "evaluation.json"]),
                content_type="application/json")),
            customer_metadata_properties={
                "recipe": recipe.name,
                "base_model": p["BaseModel"],
                "data_manifest_sha256": JsonGet(step_name=data_prep.name, property_file=manifest,
                                                json_path="dataset_sha256"),
                "code_version": tag,
                "pipeline_execution": ExecutionVariables.PIPELINE_EXECUTION_ID,
                "gate_metric": recipe.gate_metric,
                f"eval_{recipe.gate_metric}": gate_value.to_string(),
            },
        ),
    )
    fail = FailStep(
        name="EvaluationGateFailed",
        error_message=Join(on=" ", values=[
            f"Evaluation gate failed: {recipe.gate_metric} =", gate_value,
            "is below EvalThreshold =", p["EvalThreshold"],
            "; nothing was registered (lower EvalThreshold or improve the model)"]),
    )
    gate = ConditionStep(
        name="EvaluationGate",
        conditions=[ConditionGreaterThanOrEqualTo(left=gate_value, right=p["EvalThreshold"])],
        if_steps=[register],
        else_steps=[fail],
    )

    # The SDK turns up botocore's and its own loggers at import; keep the command quiet.
    for logger in ("botocore", "boto3", "sagemaker", "urllib3"):
        logging.getLogger(logger).setLevel(logging.WARNING)
    return Pipeline(name=name, parameters=list(params.values()),
                    steps=[data_prep, sft, evaluate, gate],
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

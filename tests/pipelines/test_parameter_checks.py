"""Parameter values are checked before anything runs or bills: against what each stage setting
takes, and against what SageMaker accepts in the requests they end up in."""

import json

import pytest

from pipelines import UserError
from pipelines.validation import check_execution, setting_problems
from tests.pipelines.conftest import clean_env, cli_here


def defaults(document: dict) -> dict:
    return {p["Name"]: p["DefaultValue"] for p in document["Parameters"]}


def test_every_recipe_runs_on_its_defaults_without_a_refusal(recipe_definitions):
    for path in recipe_definitions.values():
        document = json.loads(path.read_text())
        check_execution(document, defaults(document))
        assert setting_problems(document, defaults(document)) == []


@pytest.mark.parametrize("recipe_name, parameter, value, expected", [
    # A stage's own settings, from the ranges its config dataclass declares (steps/stages.py).
    ("dpo", "Beta", -0.1, "pipeline parameter Beta=-0.1: stage dpo's beta takes values > 0"),
    ("rlhf-ppo", "KLCoef", -1.0,
     "pipeline parameter KLCoef=-1.0: stage ppo's kl_coef takes values >= 0"),
    ("distill", "Alpha", 1.5,
     "pipeline parameter Alpha=1.5: stage distill's alpha takes values in [0, 1]"),
    ("dpo", "PeftMethod", "qlora",
     "pipeline parameter PeftMethod='qlora': stage dpo's peft_method takes one of none, lora"),
    ("full-lifecycle", "Sharding", "zero3",
     "pipeline parameter Sharding='zero3': stage cpt's sharding takes one of none, fsdp"),
])
def test_a_value_a_stage_setting_does_not_take_is_refused_naming_the_parameter(
        recipe_definitions, recipe_name, parameter, value, expected):
    document = json.loads(recipe_definitions[recipe_name, "local"].read_text())
    assert parameter in defaults(document), f"{recipe_name} has no parameter {parameter}"
    with pytest.raises(UserError) as error:
        check_execution(document, {**defaults(document), parameter: value})
    assert str(error.value).startswith(expected), error.value
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("parameter, value, expected", [
    # metadata values take no comma (model-package metadata's pattern)
    ("BaseModel", "s3://bucket/base,v2",
     ("parameter BaseModel='s3://bucket/base,v2': step Register: CreateModelPackage "
      "CustomerMetadataProperties.param_BaseModel: 's3://bucket/base,v2' does not match")),
    # a group name is letters, digits and hyphens
    ("ModelPackageGroup", "my models",
     ("parameter ModelPackageGroup='my models': step Register: CreateModelPackage "
      "ModelPackageGroupName: 'my models' does not match")),
    # instance types are an enum
    ("TrainingInstanceType", "ml.g5.huge",
     ("parameter TrainingInstanceType='ml.g5.huge': step SFT: CreateTrainingJob "
      "ResourceConfig.InstanceType: 'ml.g5.huge' is not one of")),
    # SageMaker's documented limit of 28 days
    ("MaxRuntimeSeconds", 30 * 24 * 3600,
     ("parameter MaxRuntimeSeconds=2592000: step SFT: CreateTrainingJob "
      "StoppingCondition.MaxRuntimeInSeconds: 2592000 is over SageMaker's limit of 2419200")),
])
def test_a_value_that_makes_a_request_sagemaker_refuses_is_refused_naming_the_parameter(
        recipe_definitions, parameter, value, expected):
    document = json.loads(recipe_definitions["sft", "local"].read_text())
    with pytest.raises(UserError) as error:
        check_execution(document, {**defaults(document), parameter: value})
    assert str(error.value).startswith(expected), error.value
    assert "\n" not in str(error.value)


def test_a_spot_wait_shorter_than_the_runtime_is_refused_naming_the_parameter():
    document = {"Parameters": [], "Steps": [{"Name": "SFT", "Type": "Training", "Arguments": {
        "EnableManagedSpotTraining": True,
        "StoppingCondition": {"MaxRuntimeInSeconds": {"Get": "Parameters.MaxRuntimeSeconds"},
                              "MaxWaitTimeInSeconds": {"Get": "Parameters.MaxWaitSeconds"}}}}]}
    with pytest.raises(UserError, match=r"^parameter MaxWaitSeconds=60: step SFT: "
                       r"CreateTrainingJob StoppingCondition.MaxWaitTimeInSeconds: 60 is under "
                       r"MaxRuntimeInSeconds 3600"):
        check_execution(document, {"MaxRuntimeSeconds": 3600, "MaxWaitSeconds": 60})


@pytest.fixture(scope="module")
def env(local_home):
    return clean_env(local_home)


@pytest.mark.parametrize("override, expected", [
    ("LearningRate=-1", ("pipeline parameter LearningRate=-1.0: stage sft's learning_rate takes "
                         "values >= 0 (0: the stage's usual rate)")),
    ("Epochs=0", "pipeline parameter Epochs=0: stage sft's epochs takes values > 0"),
    ("PeftMethod=bogus", ("pipeline parameter PeftMethod='bogus': stage sft's peft_method takes "
                          "one of none, lora, qlora, prompt_tuning, p_tuning, prefix_tuning")),
    ("Precision=fp8", ("pipeline parameter Precision='fp8': stage sft's precision takes one of "
                       "auto, fp32, bf16, fp16")),
    ("Sharding=deepspeed", ("pipeline parameter Sharding='deepspeed': stage sft's sharding takes "
                            "one of none, fsdp")),
    ("BaseModel=builtin:tiny,v2", "parameter BaseModel='builtin:tiny,v2': step Register"),
])
def test_run_refuses_a_bad_value_before_the_first_job(capsys, env, local_home, override,
                                                      expected):
    # In this process (pipelines.cli.main): each command as a program of its own spent about a
    # CPU second importing the SageMaker SDK again to reach the same check.
    result = cli_here(capsys, env, "run", "--recipe", "sft", "-p", override)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.startswith(f"ERROR: {expected}"), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Running llm-sft" not in result.stdout  # no execution, no job
    assert not list((local_home / "executions").glob("llm-sft/*"))

"""The definition: built offline, identical bytes every time, accepted by SageMaker's API model."""

import json

import pytest
import yaml

from pipelines import definition, recipe
from tests.conftest import TARGETS
from tests.external import check_definition
from tests.pipelines.conftest import ROOT, clean_env, cli, cli_here

REQUIRED_PARAMETERS = {"InputData", "BaseModel", "ProcessingInstanceType", "TrainingInstanceType",
                       "TrainingInstanceCount", "Epochs", "LearningRate", "LoraRank", "PeftMethod",
                       "Precision", "GradientAccumulationSteps", "EvalThreshold",
                       "ModelPackageGroup"}


@pytest.fixture(scope="module")
def offline_env(tmp_path_factory):
    # No credentials and every AWS endpoint unreachable: any AWS call would fail the build.
    return clean_env(tmp_path_factory.mktemp("home"), AWS_ENDPOINT_URL="http://127.0.0.1:9",
                     AWS_DEFAULT_REGION="eu-west-1")


@pytest.fixture(scope="module")
def definition_text(offline_env):
    result = cli(offline_env, "definition", "--recipe", "sft")
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_definition_builds_offline_and_twice_gives_identical_bytes(definition_text,
                                                                   recipe_definitions):
    # The second build is the session's, in a process of its own with a home of its own
    # (tests/conftest.py): a build that depends on its process, its home or the clock differs.
    again = recipe_definitions["sft", "local"].read_text()
    assert definition_text == again + "\n"  # the command ends its output with a new line


def test_definition_exposes_the_documented_parameters_and_dag(definition_text):
    document = json.loads(definition_text)
    assert REQUIRED_PARAMETERS <= {p["Name"] for p in document["Parameters"]}
    steps = {s["Name"]: s for s in document["Steps"]}
    assert [s["Name"] for s in document["Steps"]] == [
        "DataPrep", "SFT", "Evaluate", "CompareWithApproved", "EvaluationGate"]
    # The registry comparison is never cached: its answer depends on the registry's state.
    assert "CacheConfig" in steps["Evaluate"] and "CacheConfig" not in steps["CompareWithApproved"]
    gate = steps["EvaluationGate"]["Arguments"]
    assert [c["Type"] for c in gate["Conditions"]] == ["GreaterThanOrEqualTo", "Equals"]
    assert [s["Type"] for s in gate["IfSteps"]] == ["RegisterModel"]
    assert [s["Type"] for s in gate["ElseSteps"]] == ["Fail"]
    register = gate["IfSteps"][0]["Arguments"]
    assert register["ModelApprovalStatus"] == "PendingManualApproval"
    assert set(register["CustomerMetadataProperties"]) >= {
        "recipe", "data_manifest_sha256", "code_version", "param_BaseModel", "param_PeftMethod",
        "parent_model", "evaluation_report", "model_card"}
    assert "evaluation.json" in json.dumps(register["ModelMetrics"])
    # no timestamps: code is referenced by image digest, never uploaded under a dated prefix
    channels = [c["ChannelName"] for c in steps["SFT"]["Arguments"]["InputDataConfig"]]
    assert channels == ["train", "validation"]  # no uploaded-code channels
    # Retries cover service and capacity faults.
    retried = {kind for policy in steps["SFT"]["RetryPolicies"] for kind in policy["ExceptionType"]}
    assert {"Step.SERVICE_FAULT", "SageMaker.CAPACITY_ERROR"} <= retried
    # The pipeline parameters reach the stage as its hyperparameters.
    hyperparameters = steps["SFT"]["Arguments"]["HyperParameters"]
    assert hyperparameters["peft_method"] == {"Get": "Parameters.PeftMethod"}
    assert hyperparameters["gradient_accumulation_steps"]["Std:Join"]["Values"] == [
        {"Get": "Parameters.GradientAccumulationSteps"}]


def test_the_registered_package_names_the_serving_image_on_instances_sized_for_its_model(
        definition_text):
    document = json.loads(definition_text)
    gate = next(s for s in document["Steps"] if s["Name"] == "EvaluationGate")["Arguments"]
    specification = gate["IfSteps"][0]["Arguments"]["InferenceSpecification"]
    container = specification["Containers"][0]
    # SageMaker starts it as `serve`; the artifact is the SFT job's model.tar.gz, which carries
    # the adapter's base (steps.common.models), so the image needs nothing else to load it.
    assert container["Image"].split("/")[-1].startswith("llm-lifecycle-serving:")
    assert container["ModelDataUrl"] == {"Get": "Steps.SFT.ModelArtifacts.S3ModelArtifacts"}
    # SmolLM2-135M, the recipe's default, needs no GPU.
    assert specification["SupportedRealtimeInferenceInstanceTypes"][0] == "ml.m5.xlarge"
    assert not any(t.startswith(("ml.g", "ml.p"))
                   for t in specification["SupportedRealtimeInferenceInstanceTypes"])


def test_parameter_overrides_change_defaults_in_the_printed_definition(offline_env, capsys):
    # The command run in this process (as a program: the test above).
    result = cli_here(capsys, offline_env, "definition", "-p", "Epochs=3",
                      "-p", "BaseModel=builtin:tiny")
    parameters = {p["Name"]: p["DefaultValue"] for p in json.loads(result.stdout)["Parameters"]}
    assert parameters["Epochs"] == 3 and parameters["BaseModel"] == "builtin:tiny"
    bad = cli_here(capsys, offline_env, "definition", "-p", "Epochs=lots")
    assert bad.returncode == 2 and "Epochs='lots' is not a valid Integer" in bad.stderr


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("name", recipe.available())
def test_every_recipe_definition_passes_check_definition_on_every_target(
        recipe_definitions, name, target):
    result = check_definition(recipe_definitions[name, target])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 problems" in result.stdout


def test_a_description_of_any_length_reaches_the_model_card_whole(tmp_path):
    # SageMaker takes container arguments of at most 256 characters; a user's description is
    # passed to Evaluate in pieces that join back into it exactly.
    words = [f"word{i}" for i in range(250)] + ["https://example.com/" + "x" * 300]
    description = " ".join(words)
    user_recipe = yaml.safe_load((ROOT / "pipelines/recipes/sft.yaml").read_text())
    user = tmp_path / "long.yaml"
    user.write_text(yaml.safe_dump({**user_recipe, "description": description}, sort_keys=False))
    # Built in this process (the command's build is tested above): a process would import the
    # SDK again.
    text = definition.definition_json(recipe.load(str(user)))
    path = tmp_path / "long.json"
    path.write_text(text)
    checked = check_definition(path)
    assert checked.returncode == 0, checked.stdout

    from steps.common.contract import parse_config
    from steps.evaluate import EvaluateConfig

    arguments = next(s for s in json.loads(text)["Steps"] if s["Name"] == "Evaluate")[
        "Arguments"]["AppSpecification"]["ContainerArguments"]
    plain = [a if isinstance(a, str) else "x" for a in arguments]  # parameters: any value
    local = [a.replace("/opt/ml/processing", str(tmp_path)) for a in plain]
    config = parse_config(EvaluateConfig, {}, local)
    assert "".join(config.description) == description
    assert all(len(a) <= 256 for a in plain) and len(config.description) > 2


def test_metadata_joins_the_training_stages_with_a_character_sagemaker_allows(recipe_definitions):
    document = json.loads(recipe_definitions["dpo", "local"].read_text())
    gate = next(s for s in document["Steps"] if s["Name"] == "EvaluationGate")
    metadata = gate["Arguments"]["IfSteps"][0]["Arguments"]["CustomerMetadataProperties"]
    assert metadata["training_stages"] == "sft+dpo"


def test_unknown_recipe_and_bad_recipe_files_are_one_line_errors(offline_env, tmp_path):
    result = cli(offline_env, "definition", "--recipe", "nope")
    assert result.returncode == 2 and "recipe 'nope' not found" in result.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text((ROOT / "pipelines/recipes/sft.yaml").read_text() + "\nextra_key: 1\n")
    result = cli(offline_env, "definition", "--recipe", str(bad))
    assert result.returncode == 2 and "unknown recipe key(s) extra_key" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_the_sdk_validates_each_config_once_and_still_refuses_a_bad_one(monkeypatch):
    # The SDK re-validated its whole config on every lookup (80-90% of a build); a config that
    # passed is remembered, one that does not still raises.
    import jsonschema
    from sagemaker.core.config import config_manager

    calls = []
    monkeypatch.setattr(config_manager.SageMakerConfig, "validate_sagemaker_config",
                        staticmethod(lambda config=None: calls.append(config)
                                     or jsonschema.validate(config, {"type": "object",
                                                                     "required": ["SchemaVersion"]})))
    definition._validate_sdk_config_once()
    validate = config_manager.SageMakerConfig().validate_sagemaker_config
    good = {"SchemaVersion": "1.0"}
    for _ in range(3):
        validate(good)
    assert calls == [good]
    with pytest.raises(jsonschema.ValidationError):
        validate({"Bogus": 1})
    with pytest.raises(jsonschema.ValidationError):  # and again: a failure is not remembered
        validate({"Bogus": 1})


def test_the_sdk_validates_each_config_file_once_per_process_and_still_refuses_a_bad_one(
        monkeypatch, tmp_path):
    # Every session the SDK creates (one per ProcessingStep) loads and validates the config files
    # again; a file that passed is remembered, one that does not still raises.
    import jsonschema
    from sagemaker.core.config import config as config_files

    calls = []
    monkeypatch.setattr(config_files, "validate_sagemaker_config",
                        lambda config=None: calls.append(config)
                        or jsonschema.validate(config, {"type": "object",
                                                        "required": ["SchemaVersion"]}))
    definition._validate_sdk_config_once()
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text("SchemaVersion: '1.0'\n")
    bad.write_text("Bogus: 1\n")
    monkeypatch.delenv("SAGEMAKER_ADMIN_CONFIG_OVERRIDE", raising=False)
    monkeypatch.setattr(config_files, "_DEFAULT_ADMIN_CONFIG_FILE_PATH", str(tmp_path / "none"))
    monkeypatch.setenv("SAGEMAKER_USER_CONFIG_OVERRIDE", str(good))
    for _ in range(3):
        assert config_files.load_sagemaker_config() == {"SchemaVersion": "1.0"}
    assert calls == [{"SchemaVersion": "1.0"}]
    monkeypatch.setenv("SAGEMAKER_USER_CONFIG_OVERRIDE", str(bad))
    for _ in range(2):  # and again: a failure is not remembered
        with pytest.raises(jsonschema.ValidationError):
            config_files.load_sagemaker_config()


def test_training_jobs_stop_after_max_runtime_seconds_with_a_default_per_recipe(
        recipe_definitions):
    # Not the SDK's one hour: a day by default, longer where real runs take days.
    expected = {"sft": 86400, "dpo": 86400, "cpt": 432000, "pretrain": 432000,
                "full-lifecycle": 432000, "rlhf-ppo": 172800}
    for name, seconds in expected.items():
        document = json.loads(recipe_definitions[name, "aws"].read_text())
        parameters = {p["Name"]: p for p in document["Parameters"]}
        assert parameters["MaxRuntimeSeconds"] == {"Name": "MaxRuntimeSeconds", "Type": "Integer",
                                                   "DefaultValue": seconds}
        assert "MaxWaitSeconds" not in parameters  # on demand: no spot wait
        for step in (s for s in document["Steps"] if s["Type"] == "Training"):
            assert step["Arguments"]["StoppingCondition"] == {
                "MaxRuntimeInSeconds": {"Get": "Parameters.MaxRuntimeSeconds"}}
            assert "EnableManagedSpotTraining" not in step["Arguments"]


def test_a_spot_pipeline_waits_at_most_max_wait_seconds_and_passes_check_definition(
        offline_env, tmp_path, capsys):
    # The command run in this process (as a program: definition_text).
    built = cli_here(capsys, offline_env, "definition", "--recipe", "cpt", "--spot")
    assert built.returncode == 0, built.stderr
    document = json.loads(built.stdout)
    parameters = {p["Name"]: p["DefaultValue"] for p in document["Parameters"]}
    assert parameters["MaxWaitSeconds"] >= parameters["MaxRuntimeSeconds"]
    (step,) = [s for s in document["Steps"] if s["Type"] == "Training"]
    assert step["Arguments"]["EnableManagedSpotTraining"] is True
    assert step["Arguments"]["StoppingCondition"] == {
        "MaxRuntimeInSeconds": {"Get": "Parameters.MaxRuntimeSeconds"},
        "MaxWaitTimeInSeconds": {"Get": "Parameters.MaxWaitSeconds"}}
    path = tmp_path / "spot.json"
    path.write_text(built.stdout)
    checked = check_definition(path)
    assert checked.returncode == 0, checked.stdout

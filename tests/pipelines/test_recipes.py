"""Recipes: what a recipe file may say, and every shipped recipe builds a valid definition."""

import json
import textwrap
from pathlib import Path

import pytest
import yaml

from pipelines import UserError, recipe
from pipelines.recipe import JUDGE_STAGES
from steps.stages import STAGES
from tests.external import check_definition

MINIMAL = """
name: custom
model_package_group: llm-custom
parameters:
  BaseModel: builtin:tiny
stages:
  data_prep: {tokenizer: $BaseModel}
  sft: {base_model: $BaseModel, max_steps: 5}
  evaluate: {base_model: $BaseModel}
gate: {metric: perplexity_ratio}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def test_a_minimal_recipe_loads_with_its_stages_in_order(tmp_path):
    loaded = recipe.load(str(write(tmp_path, MINIMAL)))
    assert list(loaded.stages) == ["data_prep", "sft", "evaluate"]
    assert loaded.training_stages == ["sft"]
    assert loaded.gate_direction == "higher" and loaded.demo_data == {"InputData": "sft"}


@pytest.mark.parametrize("change, message", [
    (("max_steps: 5", "max_steps: $Steps"), "undeclared parameter(s) $Steps"),
    (("BaseModel: builtin:tiny", "BaseModel: builtin:tiny\n  Unused: 3"),
     "parameter(s) Unused are declared but no stage setting uses them"),
    (("  sft:", "  rlhf:"), "unknown stage 'rlhf'"),
    (("  data_prep: {tokenizer: $BaseModel}\n", ""), "stages must start with data_prep"),
    (("  sft: {base_model: $BaseModel, max_steps: 5}\n", ""), "stages name no training stage"),
    (("{metric: perplexity_ratio}", "{metric: perplexity, direction: down}"),
     "gate takes 'metric' and 'direction'"),
    (("max_steps: 5", "max_steps: [5]"), "stages.sft.max_steps must be a single value"),
    (("name: custom", "name: custom\ndemo_data: images"), "demo_data 'images' is not one of"),
    (("max_steps: 5}", "max_steps: 5, inputs: {model: dpo}}"),
     "inputs.model: 'dpo' is neither $Parameter, base, nor an earlier stage"),
    (("max_steps: 5}", "max_steps: 5, inputs: {data: $Prefs}}"),
     "inputs.data: parameter $Prefs is not declared"),
    # A misspelt stage setting, caught here rather than when the stage's job runs.
    (("max_steps: 5", "max_stepz: 5"),
     ("stages.sft.max_stepz: not a setting of stage sft (did you mean 'max_steps'?); "
      "its settings: allow_unsafe_weights, base_model, ")),
    (("{tokenizer: $BaseModel}", "{tokenizer: $BaseModel, max_record_token: 9}"),
     ("stages.data_prep.max_record_token: not a setting of stage data_prep (did you mean "
      "'max_record_tokens'?)")),
    # A training stage's settings are hyperparameters, matched by exact name.
    (("max_steps: 5", "max-steps: 5"),
     ("stages.sft.max-steps: not a setting of stage sft (a training stage's settings are "
      "hyperparameters: write 'max_steps')")),
    (("max_steps: 5", "max_steps: 5, zzz: 1"), "stages.sft.zzz: not a setting of stage sft; "),
    (("name: custom", "name: custom\nlost_job_retry_seconds: 0"),
     "lost_job_retry_seconds must be a whole number of seconds, at least 1 (found 0)"),
    (("name: custom", "name: custom\nlost_job_retry_seconds: 1m"),
     "lost_job_retry_seconds must be a whole number of seconds, at least 1 (found '1m')"),
])
def test_recipe_mistakes_are_one_line_errors_naming_the_file_and_key(tmp_path, change, message):
    path = write(tmp_path, MINIMAL.replace(*change))
    with pytest.raises(UserError) as raised:
        recipe.load(str(path))
    assert message in str(raised.value)
    assert str(path) in str(raised.value) and "\n" not in str(raised.value)


def test_settings_every_stage_takes_load_and_processing_settings_take_either_spelling(tmp_path):
    loaded = recipe.load(str(write(tmp_path, MINIMAL.replace(
        "{tokenizer: $BaseModel}",
        "{tokenizer: $BaseModel, validation-fraction: 0.2, max_record_tokens: 512, "
        "trust_remote_code: false}").replace("max_steps: 5", "max_steps: 5, allow_unsafe_weights: "
                                             "false"))))
    # Processing settings become `--validation-fraction` arguments, which the stage's parser
    # takes in either spelling; every stage takes the model-loading opt-ins.
    assert loaded.stages["data_prep"] == {"tokenizer": "$BaseModel", "validation-fraction": 0.2,
                                          "max_record_tokens": 512, "trust_remote_code": False}
    assert loaded.stages["sft"]["allow_unsafe_weights"] is False


def test_a_renamed_recipe_names_its_new_name():
    with pytest.raises(UserError, match="recipe 'sft-lora' is now sft .*run --recipe sft"):
        recipe.load("sft-lora")


def test_every_shipped_recipe_sets_only_hyperparameters_its_stages_accept():
    # A misspelt setting would otherwise fail only when the job runs, possibly hours in.
    import dataclasses

    for name in recipe.available():
        loaded = recipe.load(name)
        for stage in loaded.middle_stages:
            config_class = STAGES[stage].config
            fields = {f.name for f in dataclasses.fields(config_class)}
            unknown = set(loaded.stages[stage]) - fields
            assert not unknown, f"{name}: stages.{stage}: {sorted(unknown)} not in {config_class}"


# Two datasets and a chain whose second stage names its inputs; lost jobs retried after 5 s.
CHAINED = """
name: chained
model_package_group: llm-chained
lost_job_retry_seconds: 5
parameters:
  BaseModel: builtin:tiny
  CorpusData: s3://bucket/corpus.jsonl
stages:
  data_prep: {tokenizer: $BaseModel}
  cpt: {base_model: $BaseModel, inputs: {data: $CorpusData}}
  sft: {base_model: $BaseModel, inputs: {model: cpt}}
  evaluate: {base_model: $BaseModel}
gate: {metric: perplexity_ratio}
"""


@pytest.fixture(scope="module")
def definitions(recipe_definitions, tmp_path_factory) -> dict[str, dict]:
    """Every shipped recipe's definition (the session's build, for the local engine), and
    CHAINED's, built here."""
    from pipelines import definition

    path = tmp_path_factory.mktemp("definitions") / "chained.yaml"
    path.write_text(CHAINED)
    documents = {name: json.loads(file.read_text())
                 for (name, target), file in recipe_definitions.items() if target == "local"}
    return {**documents, "chained": json.loads(definition.definition_json(recipe.load(str(path))))}


def test_the_documented_recipes_exist_and_chain_their_training_stages(definitions):
    assert {"pretrain", "cpt", "sft", "chained"} <= set(definitions)
    for name, document in definitions.items():
        training = [s for s in document["Steps"] if s["Type"] == "Training"]
        assert training, name
        # Only the first training stage starts from BaseModel; each later one reads the model of
        # the policy stage before it through its 'model' channel, unless the recipe names its
        # inputs. A reward model is no policy: the stage after it starts from the one before.
        named = {} if name == "chained" else recipe.load(name).inputs
        stage_of = {entry.step: stage for stage, entry in STAGES.items()}
        policies = [s for s in training if stage_of[s["Name"]] not in JUDGE_STAGES]
        for after in training[1:]:
            if "model" in named.get(stage_of[after["Name"]], {}):
                continue
            before = [s for s in policies if training.index(s) < training.index(after)][-1]
            model = next(c for c in after["Arguments"]["InputDataConfig"]
                         if c["ChannelName"] == "model")
            assert model["DataSource"]["S3DataSource"]["S3Uri"] == {
                "Get": f"Steps.{before['Name']}.ModelArtifacts.S3ModelArtifacts"}
    pretrain = {s["Name"]: s for s in definitions["pretrain"]["Steps"]}["Pretrain"]
    assert "model" not in [c["ChannelName"] for c in pretrain["Arguments"]["InputDataConfig"]]
    for name in ("cpt", "sft"):
        parameters = {p["Name"] for p in definitions[name]["Parameters"]}
        assert {"PeftMethod", "Precision", "GradientAccumulationSteps"} <= parameters, name


def test_a_lost_job_step_is_retried_after_the_recipes_interval_a_minute_unless_it_says(
        definitions):
    for name, document in definitions.items():
        for step in document["Steps"]:
            if step["Type"] not in ("Training", "Processing"):
                continue
            lost = [p for p in step["RetryPolicies"]
                    if "SageMaker.JOB_INTERNAL_ERROR" in p["ExceptionType"]]
            assert [p["IntervalSeconds"] for p in lost] == [5 if name == "chained" else 60], \
                (name, step["Name"])


def test_each_dataset_gets_its_own_data_prep_and_stages_read_the_inputs_they_name(definitions):
    steps = {s["Name"]: s for s in definitions["chained"]["Steps"]}
    assert list(steps)[:4] == ["DataPrepCorpus", "DataPrep", "CPT", "SFT"]

    def channel(step, name):
        return next(c["DataSource"]["S3DataSource"]["S3Uri"]
                    for c in steps[step]["Arguments"]["InputDataConfig"] if c["ChannelName"] == name)

    assert "DataPrepCorpus" in json.dumps(channel("CPT", "train"))
    assert "Steps.DataPrep." in json.dumps(channel("SFT", "train"))
    assert channel("SFT", "model") == {"Get": "Steps.CPT.ModelArtifacts.S3ModelArtifacts"}
    # Evaluate reads the last stage's model and held-out data.
    evaluate_inputs = {i["InputName"]: i["S3Input"]["S3Uri"]
                       for i in steps["Evaluate"]["Arguments"]["ProcessingInputs"]}
    assert evaluate_inputs["model"] == {"Get": "Steps.SFT.ModelArtifacts.S3ModelArtifacts"}
    assert "Steps.DataPrep." in json.dumps(evaluate_inputs["data"])


def _steps(document: dict) -> dict[str, dict]:
    return {s["Name"]: s for s in document["Steps"]}


def _channels(step: dict) -> dict[str, str]:
    return {c["ChannelName"]: json.dumps(c["DataSource"]["S3DataSource"]["S3Uri"])
            for c in step["Arguments"]["InputDataConfig"]}


def test_alignment_recipes_train_on_preference_data_from_the_sft_policy(definitions):
    for name in ("dpo", "rlhf-ppo"):
        steps = _steps(definitions[name])
        assert ["DataPrep", "SFT"] == [n for n in steps if n in ("DataPrep", "SFT")]
        assert "DataPrepPreference" in steps, name  # the pairs get their own checks and split
        parameters = {p["Name"]: p for p in definitions[name]["Parameters"]}
        assert parameters["PreferenceData"]["DefaultValue"].endswith("preferences.jsonl")
        aligned = "DPO" if name == "dpo" else "PPO"
        channels = _channels(steps[aligned])
        assert "Steps.DataPrepPreference." in channels["train"]
        assert "Steps.SFT.ModelArtifacts" in channels["model"]
        evaluate = {i["InputName"]: json.dumps(i["S3Input"]["S3Uri"])
                    for i in steps["Evaluate"]["Arguments"]["ProcessingInputs"]}
        assert f"Steps.{aligned}.ModelArtifacts" in evaluate["model"]
        assert "Steps.DataPrepPreference." in evaluate["data"]  # judged on held-out pairs
        register = steps["EvaluationGate"]["Arguments"]["IfSteps"][0]
        metadata = register["Arguments"]["CustomerMetadataProperties"]
        assert "Steps.DataPrepPreference" in json.dumps(metadata["data_manifest_sha256_preference"])
    rlhf = _steps(definitions["rlhf-ppo"])
    # The reward model starts from the SFT model; PPO's policy too, and it is scored by the RM.
    assert "Steps.SFT.ModelArtifacts" in _channels(rlhf["RewardModel"])["model"]
    assert "Steps.RewardModel.ModelArtifacts" in _channels(rlhf["PPO"])["reward_model"]
    arguments = rlhf["Evaluate"]["Arguments"]["AppSpecification"]["ContainerArguments"]
    assert "--reward-model-dir" in arguments  # the win rate's judge


def test_the_constitutional_recipe_feeds_revisions_to_sft_and_ai_preferences_to_dpo(definitions):
    steps = _steps(definitions["constitutional"])
    assert [n for n in steps if n in ("DataPrep", "Constitutional", "SFT", "DPO", "Evaluate")] == [
        "DataPrep", "Constitutional", "SFT", "DPO", "Evaluate"]
    constitutional = steps["Constitutional"]["Arguments"]
    arguments = constitutional["AppSpecification"]["ContainerArguments"]
    # The base model answers (no model input); the prompts are the prepared InputData.
    assert arguments[arguments.index("--model-dir") + 1] == {"Get": "Parameters.BaseModel"}
    inputs = [i["InputName"] for i in constitutional["ProcessingInputs"]]
    assert inputs == ["data"]
    sft, dpo = _channels(steps["SFT"]), _channels(steps["DPO"])
    assert "Steps.Constitutional." in sft["train"] and '"sft"' in sft["train"]
    assert "Steps.Constitutional." in dpo["train"] and '"preferences"' in dpo["train"]
    assert "Steps.SFT.ModelArtifacts" in dpo["model"]


def test_a_recipe_with_two_datasets_and_named_inputs_builds_a_definition_that_passes_check(
        definitions, tmp_path):
    # The shipped recipes' definitions are checked on every target in test_definition.py.
    path = tmp_path / "chained.json"
    path.write_text(json.dumps(definitions["chained"]))
    result = check_definition(path)
    assert result.returncode == 0 and "0 problems" in result.stdout, result.stdout


def test_an_empty_parameter_value_is_refused_before_it_reaches_the_registry(tmp_path):
    # Every parameter is recorded in the model package's metadata, which holds no empty string:
    # an empty value would fail the run at its very last step.
    from pipelines import cli, definition

    path = write(tmp_path, MINIMAL.replace("  BaseModel: builtin:tiny",
                                           "  BaseModel: builtin:tiny\n  Critic: ''"))
    path.write_text(path.read_text().replace("max_steps: 5", "max_steps: 5, peft_method: $Critic"))
    with pytest.raises(UserError, match=r"parameters.Critic is empty; .* write 'none'"):
        definition._parameters(recipe.load(str(path)), "bucket")
    with pytest.raises(UserError, match="-p 'CriticModel=': empty value"):
        cli._parameters(["CriticModel="])


def test_a_dataset_named_by_any_stage_input_is_a_data_parameter(tmp_path):
    # The distill recipe with the teacher given prompts without answers (steps.teacher_logits'
    # prompts): PromptData is a dataset, uploaded from a local path and prepared like InputData.
    written = yaml.safe_load((recipe.RECIPES_DIR / "distill.yaml").read_text())
    written["parameters"]["PromptData"] = "s3://bucket/prompts.jsonl"
    written["stages"]["teacher_logits"]["inputs"] = {"prompts": "$PromptData"}
    path = tmp_path / "distill-prompts.yaml"
    path.write_text(yaml.safe_dump(written, sort_keys=False))

    assert recipe.load(str(path)).data_parameters == ["InputData", "PromptData"]

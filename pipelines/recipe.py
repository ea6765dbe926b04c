"""Recipes: YAML files naming a lifecycle path, its pipeline parameters and stage settings.

    name: sft
    model_package_group: llm-sft
    demo_data: sft                  # the built-in dataset InputData defaults to
    parameters:                     # the pipeline parameters and their defaults
      BaseModel: builtin:smollm2-135m-instruct
      PeftMethod: lora
    stages:                         # in order: data_prep, training stages, evaluate
      data_prep: {tokenizer: $BaseModel}
      sft: {base_model: $BaseModel, peft_method: $PeftMethod, max_steps: 40}
      evaluate: {base_model: $BaseModel}
    gate: {metric: perplexity_ratio, direction: higher}

A setting whose value is `$Name` takes the value of pipeline parameter Name at execution time;
any other value is baked into the definition. Each setting must be one the stage takes (a field
of its config dataclass, steps/stages.py), so a misspelt one fails here, not in its job.
Training stages run in the order written, each starting from the model the one before it
produced and training on InputData, unless the stage says otherwise under `inputs` (not a
hyperparameter):

      dpo: {inputs: {data: $PreferenceData, model: sft}}
      ppo: {inputs: {data: $PreferenceData, model: sft, reward_model: reward_model}}

An input is `$Param` (a dataset parameter, prepared by its own DataPrep step), the name of an
earlier stage (its model or output), `stage/part` (a part of a stage's output folder), or `base`
(no model channel: the stage loads its base_model). A reward model is a judge, not a policy: the
stage after it starts from the policy before it, and evaluation never evaluates it.

`demo_data` names the built-in dataset InputData defaults to (sft | corpus | preferences |
prompts), or maps each dataset parameter to one: {InputData: sft, PreferenceData: preferences}.

`lost_job_retry_seconds` (optional, default 60): how long a job step lost to SageMaker (an internal
error, lost capacity, a resource limit; locally, a killed job) waits before its first retry, each
further retry waiting twice as long as the one before, 3 retries at most. It is the
IntervalSeconds of the steps' SageMakerJobStepRetryPolicy, so it is fixed when the pipeline is
built.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from pipelines import UserError
from steps.stages import STAGES

RECIPES_DIR = Path(__file__).parent / "recipes"
# Recipes that changed name, so that an old script gets told what to run instead.
RENAMED = {"sft-lora": "sft (LoRA is its default PeftMethod)"}
_KEYS = {"name", "description", "model_package_group", "demo_data", "parameters", "stages",
         "gate", "lost_job_retry_seconds"}
DEFAULT_LOST_JOB_RETRY_SECONDS = 60
DEMO_DATASETS = ("sft", "corpus", "preferences", "prompts")
# Stage kinds (steps/stages.py), in the order they may appear. Training stages chain their models.
ENDS = ("data_prep", "evaluate")  # every recipe starts and ends with these
TRAINING_STAGES = tuple(name for name, stage in STAGES.items() if stage.job == "training")
JUDGE_STAGES = ("reward_model",)  # training stages whose model scores the policy, not replaces it
# Processing stages between the ends (compare_approved is every pipeline's, before its gate).
PROCESSING_STAGES = tuple(name for name, stage in STAGES.items() if stage.job == "processing"
                          and name not in (*ENDS, "compare_approved"))
# Keys of a stage block that are the recipe's, not the stage's (taken out before the settings).
RECIPE_KEYS = frozenset({"inputs"})
# Parameters every recipe's pipeline has (defaults given by the pipeline when the recipe is silent).
COMMON_PARAMETERS = ("InputData", "ProcessingInstanceType", "TrainingInstanceType",
                     "TrainingInstanceCount", "EvalThreshold", "ApprovedMargin",
                     "ModelPackageGroup", "MaxRuntimeSeconds", "MaxWaitSeconds")


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    model_package_group: str
    demo_data: dict[str, str]  # dataset parameter -> built-in dataset it defaults to
    parameters: dict[str, object]
    stages: dict[str, dict[str, object]]  # settings (hyperparameters / arguments) per stage
    inputs: dict[str, dict[str, str]]  # stage -> input name -> reference, as written
    gate_metric: str
    gate_direction: str  # "higher": register when metric >= EvalThreshold; "lower": <=
    lost_job_retry_seconds: int  # the wait before a lost job step's first retry
    source: Path = field(compare=False)

    @property
    def training_stages(self) -> list[str]:
        return [stage for stage in self.stages if stage in TRAINING_STAGES]

    @property
    def policy_stages(self) -> list[str]:
        """Training stages that produce the policy (all but reward models), in order."""
        return [stage for stage in self.training_stages if stage not in JUDGE_STAGES]

    @property
    def data_parameters(self) -> list[str]:
        """Parameters that name datasets: InputData, and each input `$X` (`data: $X`, or another
        input such as teacher_logits' `prompts: $X`), in order; each has its own DataPrep step."""
        named = [parameter_reference(reference) for inputs in self.inputs.values()
                 for reference in inputs.values()]
        return list(dict.fromkeys(["InputData", *(name for name in named if name)]))

    @property
    def middle_stages(self) -> list[str]:
        """Training and processing stages between data_prep and evaluate, in order."""
        return [stage for stage in self.stages if stage not in ENDS]


def available() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def listing() -> str:
    """The built-in recipes, one a line: name and description (`llm-pipeline recipes`)."""
    return "\n".join(f"{name:<14} {load(name).description}" for name in available())


def parameter_reference(value: object) -> str | None:
    """'BaseModel' for the setting value '$BaseModel', else None."""
    if isinstance(value, str) and value.startswith("$") and value[1:].isidentifier():
        return value[1:]
    return None


def load(name_or_path: str) -> Recipe:
    """A recipe by name (`sft`) or by path to a YAML file."""
    path = Path(name_or_path)
    if not path.suffix:
        path = RECIPES_DIR / f"{name_or_path}.yaml"
    if not path.is_file() and name_or_path in RENAMED:
        raise UserError(f"recipe {name_or_path!r} is now {RENAMED[name_or_path]}: "
                        f"run --recipe {RENAMED[name_or_path].split()[0]}")
    if not path.is_file():
        raise UserError(f"recipe {name_or_path!r} not found; available: {', '.join(available())} "
                        "(or give a path to a recipe YAML file)")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML: {exc}".replace("\n", " ")) from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: a recipe is a mapping with keys {', '.join(sorted(_KEYS))}")
    unknown = set(data) - _KEYS
    if unknown:
        raise UserError(f"{path}: unknown recipe key(s) {', '.join(sorted(unknown))}; "
                        f"valid keys: {', '.join(sorted(_KEYS))}")
    for key in ("name", "model_package_group", "parameters", "stages", "gate"):
        if key not in data:
            raise UserError(f"{path}: missing recipe key {key!r}")
    for key in ("parameters", "stages", "gate"):
        if not isinstance(data[key], dict):
            raise UserError(f"{path}: {key!r} must be a mapping")
    demo_data = data.get("demo_data", "sft")
    demo_data = dict(demo_data) if isinstance(demo_data, dict) else {"InputData": demo_data}
    for parameter, dataset in demo_data.items():
        if dataset not in DEMO_DATASETS:
            raise UserError(f"{path}: demo_data {dataset!r} is not one of "
                            f"{', '.join(DEMO_DATASETS)}")
        if parameter in data["parameters"]:
            raise UserError(f"{path}: {parameter} has its default from demo_data; remove it "
                            "from 'parameters'")
    demo_data.setdefault("InputData", "sft")
    # Dataset parameters with a demo dataset are declared by demo_data (their default is in the
    # pipeline's bucket, which the recipe cannot name).
    declared = set(data["parameters"]) | set(COMMON_PARAMETERS) | set(demo_data)
    stages = data["stages"]
    inputs: dict[str, dict[str, str]] = {}
    for position, (stage, settings) in enumerate(stages.items()):
        if stage not in ENDS + TRAINING_STAGES + PROCESSING_STAGES:
            raise UserError(f"{path}: unknown stage {stage!r}; stages are "
                            f"{', '.join(ENDS + TRAINING_STAGES + PROCESSING_STAGES)}")
        if not isinstance(settings, dict):
            raise UserError(f"{path}: stages.{stage} must be a mapping of settings")
        inputs[stage] = _inputs(path, stage, settings.pop("inputs", {}), list(stages)[:position],
                                declared)
        for key, value in settings.items():
            # Checked here, not first when the stage's job runs (after the stages before it).
            problem = unknown_setting_message(stage, str(key))
            if problem:
                raise UserError(f"{path}: {problem}")
            if isinstance(value, (dict, list)) or value is None:
                raise UserError(f"{path}: stages.{stage}.{key} must be a single value "
                                f"(string, number or boolean), not {type(value).__name__}")
    order = list(stages)
    if order[:1] != ["data_prep"] or order[-1:] != ["evaluate"]:
        raise UserError(f"{path}: stages must start with data_prep and end with evaluate "
                        f"(found: {', '.join(order)})")
    if not any(stage in TRAINING_STAGES and stage not in JUDGE_STAGES for stage in order):
        raise UserError(f"{path}: stages name no training stage that produces a model to "
                        f"evaluate (one or more of "
                        f"{', '.join(s for s in TRAINING_STAGES if s not in JUDGE_STAGES)})")
    referenced = {ref for settings in [*stages.values(), *inputs.values()]
                  for value in settings.values() if (ref := parameter_reference(value))}
    undeclared = referenced - declared
    if undeclared:
        raise UserError(f"{path}: stage settings refer to undeclared parameter(s) "
                        f"{', '.join('$' + n for n in sorted(undeclared))}; add them under "
                        "'parameters' with a default")
    unused = declared - referenced - set(COMMON_PARAMETERS)
    if unused:
        raise UserError(f"{path}: parameter(s) {', '.join(sorted(unused))} are declared but no "
                        "stage setting uses them (write `key: $Name` under a stage)")
    gate = data["gate"]
    if "metric" not in gate:
        raise UserError(f"{path}: gate.metric is required (a metric name of evaluation.json)")
    direction = str(gate.get("direction", "higher"))
    if direction not in ("higher", "lower") or set(gate) - {"metric", "direction"}:
        raise UserError(f"{path}: gate takes 'metric' and 'direction' (higher: register when "
                        "metric >= EvalThreshold; lower: when metric <= EvalThreshold)")
    retry_seconds = data.get("lost_job_retry_seconds", DEFAULT_LOST_JOB_RETRY_SECONDS)
    if isinstance(retry_seconds, bool) or not isinstance(retry_seconds, int) or retry_seconds < 1:
        raise UserError(f"{path}: lost_job_retry_seconds must be a whole number of seconds, at "
                        f"least 1 (found {retry_seconds!r}); leave it out for "
                        f"{DEFAULT_LOST_JOB_RETRY_SECONDS}")
    description = " ".join(str(data.get("description", "")).split())
    if description.startswith("-"):
        # It is passed to Evaluate as a command-line argument, where it would read as an option.
        raise UserError(f"{path}: description starts with '-'; begin it with a word")
    return Recipe(
        name=str(data["name"]),
        description=description,
        model_package_group=str(data["model_package_group"]),
        demo_data=demo_data,
        parameters=dict(data["parameters"]),
        stages={k: dict(v) for k, v in stages.items()},
        inputs=inputs,
        gate_metric=str(gate["metric"]),
        gate_direction=direction,
        lost_job_retry_seconds=retry_seconds,
        source=path,
    )


def unknown_setting_message(stage: str, key: str) -> str | None:
    """None when `key` is a setting of `stage`; else why not, and the closest valid name.

    A training stage's settings are hyperparameters, matched by exact name, so only
    `max_steps` works there; a processing stage's become `--<key, - for _>` arguments, which its
    parser takes in either spelling, so `max-records` works there too.
    """
    valid = STAGES[stage].settings()
    underscored = key.replace("-", "_")
    hyperparameters = STAGES[stage].job == "training"
    if key in RECIPE_KEYS or (key if hyperparameters else underscored) in valid:
        return None
    if underscored in valid:
        hint = f" (a training stage's settings are hyperparameters: write '{underscored}')"
    elif close := difflib.get_close_matches(underscored, sorted(valid), n=1):
        hint = f" (did you mean '{close[0]}'?)"
    else:
        hint = ""
    return (f"stages.{stage}.{key}: not a setting of stage {stage}{hint}; its settings: "
            f"{', '.join(sorted(valid))}")


def _inputs(path: Path, stage: str, given: object, earlier: list[str],
            parameters: set[str]) -> dict[str, str]:
    """A stage's `inputs`, each checked to name a declared parameter or an earlier stage."""
    if not isinstance(given, dict):
        raise UserError(f"{path}: stages.{stage}.inputs must map input names to references "
                        "such as {data: $PreferenceData, model: sft}")
    checked = {}
    for name, reference in given.items():
        reference = str(reference)
        param = parameter_reference(reference)
        if param is not None:
            if param not in parameters:
                raise UserError(f"{path}: stages.{stage}.inputs.{name}: parameter {reference} is "
                                "not declared under 'parameters'")
        elif reference != "base" and reference.split("/", 1)[0] not in earlier:
            raise UserError(f"{path}: stages.{stage}.inputs.{name}: {reference!r} is neither "
                            f"$Parameter, base, nor an earlier stage ({', '.join(earlier)})")
        checked[str(name)] = reference
    return checked

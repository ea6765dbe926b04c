"""The settings each recipe stage takes: its config dataclass's field names, without importing it.

A recipe's `stages.<stage>` block becomes the stage job's hyperparameters (training stages) or
command-line arguments (processing stages), which the stage parses into its config dataclass
(`contract.run(main, XConfig, ...)`) and refuses when a name is unknown: but only when its job
runs, after the stages before it. `recipe.load` checks the names against this table instead, so a
misspelt setting fails before anything runs. The table is written out because importing the stage
modules (torch, transformers) would cost the command line seconds; tests/pipelines/
test_stage_settings.py asserts that it equals each config dataclass's fields, so it cannot drift.
"""

from __future__ import annotations

import difflib

# steps.common.training.TrainingKnobs: every training stage.
_TRAINING = frozenset({
    "checkpoint_steps", "checkpoints_to_keep", "epochs", "gradient_accumulation_steps",
    "gradient_checkpointing", "learning_rate", "logging_steps", "lr_scheduler_type",
    "max_grad_norm", "max_seq_length", "max_steps", "packing", "per_device_batch_size",
    "precision", "seed", "warmup_ratio", "weight_decay",
})
# steps.common.peft_methods.PeftKnobs: every training stage that adapts an existing model.
_PEFT = frozenset({
    "encoder_hidden_size", "encoder_reparameterization_type", "lora_alpha", "lora_dropout",
    "lora_r", "lora_target_modules", "num_virtual_tokens", "peft_method", "prefix_projection",
    "prompt_tuning_init_text",
})

# Recipe stage -> the field names of the config dataclass its module runs with.
CONFIG_FIELDS: dict[str, frozenset[str]] = {
    "data_prep": frozenset({  # steps.data_prep.DataPrepConfig
        "input_dir", "max_record_tokens", "max_records", "output_dir", "seed", "tokenizer",
        "validation_fraction",
    }),
    "pretrain": _TRAINING | {  # steps.pretrain.PretrainStageConfig
        "hidden_size", "intermediate_size", "num_heads", "num_kv_heads", "num_layers",
        "tie_word_embeddings", "vocab_size",
    },
    "cpt": _TRAINING | _PEFT | {"base_model", "extend_vocabulary"},  # steps.cpt.CPTStageConfig
    "sft": _TRAINING | _PEFT | {"base_model", "merge_lora"},  # steps.sft.SFTStageConfig
    # steps.reward_model.RewardModelStageConfig
    "reward_model": _TRAINING | _PEFT | {"base_model", "center_rewards_coefficient"},
    "dpo": _TRAINING | _PEFT | {"base_model", "beta", "loss_type"},  # steps.dpo.DPOStageConfig
    "ppo": _TRAINING | _PEFT | {  # steps.ppo.PPOStageConfig
        "base_model", "cliprange", "cliprange_value", "gamma", "kl_coef", "lam",
        "missing_eos_penalty", "num_mini_batches", "ppo_epochs", "response_length", "temperature",
        "value_learning_rate", "vf_coef",
    },
    "distill": _TRAINING | _PEFT | {  # steps.distill.DistillStageConfig
        "alpha", "compare_students", "comparison_new_tokens", "comparison_samples",
        "max_new_tokens", "on_policy", "student_model", "teacher_batch_size", "teacher_model",
        "temperature", "top_k",
    },
    "constitutional": frozenset({  # steps.constitutional.ConstitutionalConfig
        "batch_size", "bedrock_model_id", "constitution", "critic", "critic_model", "data_dir",
        "endpoint_name", "max_new_tokens", "model_dir", "output_dir", "region", "samples", "seed",
        "temperature", "validation_fraction",
    }),
    "teacher_logits": frozenset({  # steps.teacher_logits.TeacherLogitsConfig
        "base_model", "batch_size", "data_dir", "max_seq_length", "model_dir", "output_dir",
        "top_k",
    }),
    "quantize": frozenset({  # steps.quantize.QuantizeConfig
        "archive", "base_model", "batch_size", "compute_dtype", "data_dir", "max_new_tokens",
        "max_samples", "max_seq_length", "model_dir", "output_dir", "scheme", "speed_runs",
        "speed_tokens",
    }),
    "evaluate": frozenset({  # steps.evaluate.EvaluateConfig
        "base_dir", "base_model", "batch_size", "data_dir", "description", "max_new_tokens",
        "max_samples", "max_seq_length", "model_dir", "output_dir", "quantization_dir",
        "reward_model_dir",
    }),
}

# steps.common.contract.LoadPolicy: the model-loading opt-ins every stage takes besides its config.
LOAD_POLICY_FIELDS = frozenset({"allow_unsafe_weights", "trust_remote_code"})

# Keys of a stage block that are the recipe's, not the stage's (recipe.load takes them out first).
RECIPE_KEYS = frozenset({"inputs"})


def settings(stage: str) -> frozenset[str]:
    """Every setting `stage` takes (underscore spelling)."""
    return CONFIG_FIELDS[stage] | LOAD_POLICY_FIELDS


def unknown_setting_message(stage: str, key: str, hyperparameters: bool) -> str | None:
    """None when `key` is a setting of `stage`; else why not, and the closest valid name.

    A training stage's settings are hyperparameters, matched by exact name, so only
    `max_steps` works there; a processing stage's become `--<key, - for _>` arguments, which its
    parser takes in either spelling, so `max-records` works there too (`hyperparameters=False`).
    """
    valid = settings(stage)
    underscored = key.replace("-", "_")
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


def value_problems(recipe, values: dict[str, object]) -> list[str]:
    """Why a pipeline parameter's value is one a stage setting it drives does not take, one line
    each, naming the parameter, its value and what the setting takes: so that `run` and `start`
    refuse it before the first job runs (and bills), not when the stage's job parses it.

    The values each setting takes are those its config dataclass declares (steps.common.knobs,
    read without importing torch): today the knobs every training stage shares. A stage's own
    settings (DPO's beta, PPO's kl_coef, ...) are still checked by the stage's job only.
    """
    from pipelines.recipe import parameter_reference
    from steps.common import knobs  # the declarations; no torch

    found = []
    for stage, settings in recipe.stages.items():
        declared = [config for config, names in ((knobs.TrainingKnobs, _TRAINING),
                                                 (knobs.PeftKnobs, _PEFT))
                    if names <= CONFIG_FIELDS[stage]]
        for key, setting in settings.items():
            name = parameter_reference(setting)
            if name is None or name not in values:
                continue
            rule = next((r for config in declared if (r := knobs.allowed(config, key))), None)
            value = values[name]
            if rule is None or rule.allows(_as_number(value, rule)):
                continue
            found.append(f"pipeline parameter {name}={value!r}: stage {stage}'s {key} takes "
                         f"{'values ' if isinstance(rule, knobs.Range) else ''}{rule}")
    return found


def _as_number(value: object, rule) -> object:
    """A string parameter read as the number a numeric setting parses it into ('1e-4')."""
    from steps.common import knobs

    if isinstance(rule, knobs.Range) and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value

"""The settings of steps.ppo.

Importable without torch (steps.common.knobs): the command line reads these settings, defaults
and ranges to check a recipe and a pipeline's parameter values before anything runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from steps.common.knobs import (
    ALIGNMENT_PEFT_METHODS,
    NOT_NEGATIVE,
    POSITIVE,
    OneOf,
    PeftKnobs,
    Range,
    StageError,
    TrainingKnobs,
)

# The value head starts at zero and must fit the returns within a few iterations: at the policy's
# rate it barely moves (see value_learning_rate).
VALUE_LEARNING_RATE = 1e-3


@dataclass
class PPOStageConfig(PeftKnobs, TrainingKnobs):
    base_model: str = field(
        default="builtin:smollm2-135m-instruct",
        metadata={"help": "Model spec of the policy to start from. Ignored when the 'model' "
                  "channel holds a model."},
    )
    max_steps: int = field(
        default=-1,
        metadata={"help": "PPO iterations (rollout, then ppo_epochs of updates); -1: `epochs` "
                  "passes over the prompts."},
    )
    per_device_batch_size: int = field(
        default=4,
        metadata={"help": "Sequences per forward pass; a rollout has per_device_batch_size x "
                  "gradient_accumulation_steps x num_mini_batches prompts."},
    )
    response_length: int = field(
        default=32, metadata={"help": "Most tokens a sampled response has."}
    )
    temperature: float = field(
        default=0.7, metadata={"help": "Sampling temperature of the rollouts (> 0)."}
    )
    kl_coef: float = field(
        default=0.05,
        metadata={"help": "Weight of the per-token KL penalty to the reference in the reward."},
    )
    gamma: float = field(default=1.0, metadata={"help": "Discount factor of GAE, in [0, 1]."})
    lam: float = field(default=0.95, metadata={"help": "Lambda of GAE, in [0, 1]."})
    cliprange: float = field(
        default=0.2, metadata={"help": "Clip range of the policy ratio, epsilon of PPO."}
    )
    cliprange_value: float = field(
        default=0.2, metadata={"help": "Clip range of the value update around the old values."}
    )
    vf_coef: float = field(default=0.1, metadata={"help": "Weight of the value loss."})
    value_learning_rate: float = field(
        default=VALUE_LEARNING_RATE,
        metadata={"help": "Peak learning rate of the value head, a layer that starts at zero and "
                  "must learn the returns in a few iterations, unlike the policy, which must move "
                  "little (learning_rate)."},
    )
    missing_eos_penalty: float = field(
        default=1.0,
        metadata={"help": "Subtracted from the reward model's score of a response cut at "
                  "response_length before its stop token, which the reward model would score as "
                  "if complete; 0: no penalty."},
    )
    ppo_epochs: int = field(
        default=4, metadata={"help": "Passes of PPO updates over each rollout batch."}
    )
    num_mini_batches: int = field(
        default=1, metadata={"help": "Minibatches (optimizer steps) per pass over a rollout."}
    )
    logging_steps: int = field(
        default=1, metadata={"help": "Print a metrics line every this many PPO iterations."}
    )

    # RL moves a model that already answers well: small steps (the rates TRL's PPO examples use).
    USUAL_LEARNING_RATES: ClassVar[dict[str, float]] = {"none": 3e-6, "lora": 5e-5}
    # The values PPO's own knobs take (the shared ones are declared in steps.common.knobs).
    ALLOWED: ClassVar[dict[str, Range | OneOf]] = {
        "peft_method": OneOf(ALIGNMENT_PEFT_METHODS),
        "response_length": POSITIVE, "temperature": POSITIVE, "ppo_epochs": POSITIVE,
        "num_mini_batches": POSITIVE, "kl_coef": NOT_NEGATIVE, "cliprange": NOT_NEGATIVE,
        "cliprange_value": NOT_NEGATIVE, "vf_coef": NOT_NEGATIVE, "gamma": Range(low=0, high=1),
        "lam": Range(low=0, high=1), "value_learning_rate": POSITIVE,
        "missing_eos_penalty": NOT_NEGATIVE,
    }

    def __post_init__(self) -> None:
        PeftKnobs.__post_init__(self)
        TrainingKnobs.__post_init__(self)  # checks every knob against ALLOWED, PPO's included
        if self.packing:
            raise StageError("packing does not apply to PPO (responses are sampled); set "
                             "packing=false")
        if self.response_length >= self.max_seq_length:
            raise StageError(f"response_length ({self.response_length}) must be below "
                             f"max_seq_length ({self.max_seq_length}), which holds prompt and "
                             "response")

    @property
    def rollout_batch_size(self) -> int:
        return self.per_device_batch_size * self.gradient_accumulation_steps * self.num_mini_batches

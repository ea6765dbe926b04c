"""The settings of steps.reward_model.

Importable without torch (steps.common.knobs): the command line reads these settings, defaults
and ranges to check a recipe and a pipeline's parameter values before anything runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from steps.common.knobs import (
    ALIGNMENT_PEFT_METHODS,
    NOT_NEGATIVE,
    OneOf,
    PeftKnobs,
    Range,
    ShardingKnob,
    StageError,
    TrainingKnobs,
)


@dataclass
class RewardModelStageConfig(ShardingKnob, PeftKnobs, TrainingKnobs):
    base_model: str = field(
        default="builtin:smollm2-135m-instruct",
        metadata={"help": "Model spec to start from (builtin:tiny, builtin:smollm2-135m-instruct, "
                  "a folder, a model.tar.gz or a hub id). Ignored when the 'model' channel holds "
                  "a model."},
    )
    center_rewards_coefficient: float = field(
        default=0.0,
        metadata={"help": "Weight of a penalty on (r(chosen) + r(rejected))^2 that keeps rewards "
                  "centred on zero (Eisenstein et al. 2023; 0.01 is usual); 0 for none."},
    )

    USUAL_LEARNING_RATES: ClassVar[dict[str, float]] = {"none": 1e-5, "lora": 1e-4}
    ALLOWED: ClassVar[dict[str, Range | OneOf]] = {
        "peft_method": OneOf(ALIGNMENT_PEFT_METHODS), "center_rewards_coefficient": NOT_NEGATIVE}

    def __post_init__(self) -> None:
        PeftKnobs.__post_init__(self)
        TrainingKnobs.__post_init__(self)
        if self.packing:
            raise StageError("packing does not apply to reward modelling (pairs are scored whole); "
                             "set packing=false")

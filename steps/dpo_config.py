"""The settings of steps.dpo.

Importable without torch (steps.common.knobs): the command line reads these settings, defaults
and ranges to check a recipe and a pipeline's parameter values before anything runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from steps.common.knobs import (
    ALIGNMENT_PEFT_METHODS,
    POSITIVE,
    OneOf,
    PeftKnobs,
    Range,
    ShardingKnob,
    StageError,
    TrainingKnobs,
)

LOSS_TYPES = ("sigmoid", "hinge", "ipo", "nca_pair", "bco_pair", "sppo_hard", "aot",
              "apo_zero", "apo_down", "sigmoid_norm")


@dataclass
class DPOStageConfig(ShardingKnob, PeftKnobs, TrainingKnobs):
    base_model: str = field(
        default="builtin:smollm2-135m-instruct",
        metadata={"help": "Model spec to align (builtin:tiny, builtin:smollm2-135m-instruct, a "
                  "folder, a model.tar.gz or a hub id). Ignored when the 'model' channel holds a "
                  "model."},
    )
    beta: float = field(
        default=0.1,
        metadata={"help": "Strength of the pull towards the reference: larger keeps the policy "
                  "closer to it (DPO's beta, the inverse temperature of the implicit reward)."},
    )
    loss_type: str = field(
        default="sigmoid",
        metadata={"help": f"DPO loss: one of {', '.join(LOSS_TYPES)} (sigmoid = DPO, hinge = SLiC, "
                  "ipo = IPO)."},
    )

    # Preference optimisation moves a model that already answers well: small steps.
    USUAL_LEARNING_RATES: ClassVar[dict[str, float]] = {"none": 1e-6, "lora": 5e-5}
    ALLOWED: ClassVar[dict[str, Range | OneOf]] = {
        "peft_method": OneOf(ALIGNMENT_PEFT_METHODS), "beta": POSITIVE,
        "loss_type": OneOf(LOSS_TYPES)}

    def __post_init__(self) -> None:
        PeftKnobs.__post_init__(self)
        TrainingKnobs.__post_init__(self)
        if self.packing:
            raise StageError("packing does not apply to DPO (each pair is scored whole); set "
                             "packing=false")

"""The settings of steps.sft.

Importable without torch (steps.common.knobs): the command line reads these settings, defaults
and ranges to check a recipe and a pipeline's parameter values before anything runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from steps.common.knobs import PeftKnobs, ShardingKnob, StageError, TrainingKnobs, target_modules


@dataclass
class SFTStageConfig(ShardingKnob, PeftKnobs, TrainingKnobs):
    base_model: str = field(
        default="builtin:smollm2-135m-instruct",
        metadata={
            "help": "Model spec: builtin:tiny, builtin:smollm2-135m-instruct, a folder, a "
            "model.tar.gz or a hub id. Ignored when the 'model' channel holds a model."
        },
    )
    merge_lora: bool = field(
        default=False,
        metadata={"help": "Save LoRA/QLoRA as a full model, the adapter merged into a freshly "
                  "loaded full-precision base (for serving without PEFT)."},
    )

    def __post_init__(self) -> None:
        PeftKnobs.__post_init__(self)
        TrainingKnobs.__post_init__(self)
        if self.merge_lora and self.peft_method not in ("lora", "qlora"):
            raise StageError(
                f"merge_lora needs peft_method lora or qlora, not '{self.peft_method}' (full "
                "fine-tuning saves a full model already; prompt-learning adapters cannot merge)"
            )
        if "lm_head" in target_modules(self.lora_target_modules):
            # TRL 1.16 refuses adapters on the output head (its fused loss reads lm_head.weight).
            raise StageError(
                "lora_target_modules cannot include lm_head (TRL does not train adapters on it); "
                "remove it or use 'all-linear'"
            )
        # auto never turns it on for prefix tuning (steps.common.training.resolve_checkpointing).
        if self.peft_method == "prefix_tuning" and self.gradient_checkpointing is True:
            # Recomputing a layer re-reads the prefix cache, which has grown by then: a size
            # mismatch in attention (peft 0.21, transformers 5.24).
            raise StageError(
                "gradient_checkpointing does not work with peft_method prefix_tuning; set "
                "gradient_checkpointing=false, or use prompt_tuning or p_tuning"
            )
        if self.is_prompt_learning and self.packing:
            # Packed rows keep their sequences apart by position ids, which PEFT drops for
            # prompt_tuning/p_tuning and offsets for prefix_tuning: examples would see each other.
            raise StageError(
                f"packing does not work with peft_method {self.peft_method} (the virtual tokens "
                "would be shared by every sequence packed in a row); set packing=false"
            )

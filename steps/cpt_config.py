"""The settings of steps.cpt.

Importable without torch (steps.common.knobs): the command line reads these settings, defaults
and ranges to check a recipe and a pipeline's parameter values before anything runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from steps.common.knobs import PeftKnobs, ShardingKnob, StageError, TrainingKnobs


@dataclass
class CPTStageConfig(ShardingKnob, PeftKnobs, TrainingKnobs):
    base_model: str = field(
        default="builtin:smollm2-135m-instruct",
        metadata={
            "help": "Model spec: builtin:tiny, builtin:smollm2-135m-instruct, a folder, a "
            "model.tar.gz or a hub id. Ignored when the 'model' channel holds a model."
        },
    )
    extend_vocabulary: int = field(
        default=0,
        metadata={"help": "Add up to this many of the corpus's frequent words that the base "
                  "tokenizer splits as new tokens (0: keep the vocabulary). Needs peft_method "
                  "none, lora or qlora, which train the new rows."},
    )
    max_seq_length: int = field(
        default=256,
        metadata={"help": "Tokens per training block; at most the model's maximum positions."},
    )
    packing: bool = field(
        default=True,
        metadata={"help": "Always on: documents are joined with EOS and cut into "
                  "max_seq_length blocks (false is refused)."},
    )

    def __post_init__(self) -> None:
        PeftKnobs.__post_init__(self)
        TrainingKnobs.__post_init__(self)
        if self.extend_vocabulary < 0:
            raise StageError(f"extend_vocabulary must be >= 0, got {self.extend_vocabulary}")
        if self.extend_vocabulary and self.is_prompt_learning:
            raise StageError(
                f"extend_vocabulary needs the new tokens' embeddings to train, which "
                f"peft_method {self.peft_method} cannot do; use peft_method none, lora or qlora, "
                "or set extend_vocabulary=0"
            )
        if not self.packing:
            raise StageError(
                "packing=false is not supported by continued pre-training: documents are always "
                "joined with EOS and cut into max_seq_length blocks; remove the setting"
            )

"""The settings of steps.pretrain.

Importable without torch (steps.common.knobs): the command line reads these settings, defaults
and ranges to check a recipe and a pipeline's parameter values before anything runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from steps.common.knobs import POSITIVE, OneOf, Range, ShardingKnob, StageError, TrainingKnobs


@dataclass
class PretrainStageConfig(ShardingKnob, TrainingKnobs):
    vocab_size: int = field(
        default=4096, metadata={"help": "Tokens of the BPE tokenizer, special tokens included."}
    )
    hidden_size: int = field(default=128, metadata={"help": "Width of the model."})
    num_layers: int = field(default=4, metadata={"help": "Transformer layers."})
    num_heads: int = field(
        default=4, metadata={"help": "Attention heads; hidden_size must divide by it."}
    )
    num_kv_heads: int = field(
        default=2,
        metadata={"help": "Key/value heads (grouped-query attention); num_heads must be a "
                  "multiple of it."},
    )
    intermediate_size: int = field(
        default=384, metadata={"help": "Width of each layer's gated MLP."}
    )
    tie_word_embeddings: bool = field(
        default=True,
        metadata={"help": "Share the input embeddings with the output head (fewer parameters)."},
    )
    # TrainingKnobs whose defaults differ for a small model learning from nothing.
    max_seq_length: int = field(
        default=128,
        metadata={"help": "Tokens per training block, and the model's maximum positions."},
    )
    packing: bool = field(
        default=True,
        metadata={"help": "Always on: documents are joined with EOS and cut into "
                  "max_seq_length blocks (false is refused)."},
    )
    warmup_ratio: float = field(
        default=0.05, metadata={"help": "Fraction of steps of linear warm-up, in [0, 1)."}
    )
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay."})
    per_device_batch_size: int = field(
        default=8, metadata={"help": "Blocks per device (process) per forward pass."}
    )
    epochs: float = field(
        default=4.0, metadata={"help": "Passes over the training data (ignored if max_steps > 0)."}
    )

    # A small model learning from random weights takes large steps.
    USUAL_LEARNING_RATES: ClassVar[dict[str, float]] = {"none": 3e-3}
    ALLOWED: ClassVar[dict[str, Range | OneOf]] = dict.fromkeys(
        ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
         "intermediate_size"), POSITIVE)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.vocab_size < 300:
            raise StageError(
                f"vocab_size must be at least 300 (256 byte tokens, special tokens and some "
                f"merges), got {self.vocab_size}"
            )
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 2:
            raise StageError(
                f"hidden_size {self.hidden_size} must divide into num_heads {self.num_heads} heads "
                "of an even size (rotary position embeddings rotate pairs)"
            )
        if self.num_heads % self.num_kv_heads:
            raise StageError(
                f"num_heads {self.num_heads} must be a multiple of num_kv_heads {self.num_kv_heads}"
            )
        if not self.packing:
            raise StageError(
                "packing=false is not supported by pre-training: documents are always joined "
                "with EOS and cut into max_seq_length blocks; remove the setting"
            )

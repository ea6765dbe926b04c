"""The settings of steps.teacher_logits.

Importable without torch (steps.common.knobs): the command line reads these settings, defaults
and ranges to check a recipe and a pipeline's parameter values before anything runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from steps.common.knobs import StageError


@dataclass
class TeacherLogitsConfig:
    model_dir: str = field(
        metadata={"help": "The teacher: a model or adapter folder, a model.tar.gz or a folder "
                  "holding one, or builtin:tiny / builtin:smollm2-135m-instruct."}
    )
    data_dir: str = field(
        metadata={"help": "Data preparation output (train.jsonl [+ validation.jsonl]), or a data "
                  "file or folder (scored as the train split)."}
    )
    output_dir: str = field(metadata={"help": "Where the shards and manifest.json go."})
    top_k: int = field(
        default=16, metadata={"help": "Log-probabilities kept per position (the largest k)."}
    )
    max_seq_length: int = field(
        default=512,
        metadata={"help": "Tokens per example, longer ones cut: must equal the student's."},
    )
    batch_size: int = field(default=8, metadata={"help": "Sequences per teacher forward pass."})
    prompts_dir: str | None = field(
        default=None,
        metadata={"help": "Prompts without reference answers (prompt-only records or any with a "
                  "prompt; a file, folder or data preparation output): the teacher answers each, "
                  "and its answers are cached as the 'teacher_answered' split, which "
                  "steps.distill trains the student on beside the labelled data. Prompts of the "
                  "labelled data are skipped."},
    )
    max_new_tokens: int = field(
        default=32,
        metadata={"help": "Length limit of the teacher's greedy answers to the prompts; an answer "
                  "cut off there (no stop token) is not kept."},
    )
    base_model: str | None = field(
        default=None,
        metadata={"help": "Base model spec of an adapter teacher; default: the one it records."},
    )

    def __post_init__(self) -> None:
        for name in ("top_k", "max_seq_length", "batch_size", "max_new_tokens"):
            if getattr(self, name) <= 0:
                raise StageError(f"{name} must be > 0, got {getattr(self, name)}")

"""The settings of steps.evaluate.

Importable without torch (steps.common.knobs): the command line reads these settings, defaults
and ranges to check a recipe and a pipeline's parameter values before anything runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from steps.common.knobs import StageError


@dataclass
class EvaluateConfig:
    model_dir: str = field(
        metadata={"help": "Training output: a model/adapter folder, or a folder with model.tar.gz."}
    )
    data_dir: str = field(
        metadata={"help": "Folder with validation.jsonl, or a data file or folder."}
    )
    output_dir: str = field(
        metadata={"help": "Where evaluation.json and metrics_comparison.png go."}
    )
    base_model: str | None = field(
        default=None,
        metadata={"help": "Base model spec, or none to evaluate the model alone; default: the "
                  "base_model in training_summary.json."},
    )
    base_dir: str | None = field(
        default=None,
        metadata={"help": "A model folder (or one with model.tar.gz) to compare against instead "
                  "of base_model: e.g. the teacher of a distilled student."},
    )
    max_new_tokens: int = field(
        default=64, metadata={"help": "Generation length limit per sample."}
    )
    max_samples: int = field(
        default=32, metadata={"help": "Held-out prompts to generate answers for."}
    )
    batch_size: int = field(default=8, metadata={"help": "Sequences per forward pass."})
    max_seq_length: int = field(
        default=512, metadata={"help": "Tokens per sequence for the loss; longer are cut."}
    )
    reward_model_dir: str | None = field(
        default=None,
        metadata={"help": "A reward model that steps.reward_model wrote (a folder, or one with "
                  "model.tar.gz) to judge the answers: reward_mean, reward_margin, win_rate."},
    )
    # SageMaker takes a container argument of at most 256 characters, so a pipeline passes a
    # longer description in pieces (pipelines/definition.py), joined here exactly as they are.
    description: list[str] | None = field(
        default=None,
        metadata={"help": "What the model is for, for model_card.md, in one or more pieces "
                  "joined as they are (default: a description in its training summary)."},
    )
    quantization_dir: str | None = field(
        default=None,
        metadata={"help": "A folder with the quantization.json steps.quantize wrote for this "
                  "model: its size, speed and perplexity delta join the report's table of what "
                  "each stage bought."},
    )

    def __post_init__(self) -> None:
        for name in ("max_new_tokens", "batch_size", "max_seq_length"):
            if getattr(self, name) <= 0:
                raise StageError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.max_samples < 0:
            raise StageError(f"max_samples must be >= 0, got {self.max_samples}")

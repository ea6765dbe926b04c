"""The settings of steps.quantize.

Importable without torch (steps.common.knobs): the command line reads these settings, defaults
and ranges to check a recipe and a pipeline's parameter values before anything runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from steps.common.knobs import StageError

SCHEMES = ("int8", "nf4")
# nf4's compute dtypes (steps.quantize maps each to its torch dtype).
COMPUTE_DTYPES = ("fp32", "bf16", "fp16")


@dataclass
class QuantizeConfig:
    model_dir: str = field(
        metadata={"help": "A model or LoRA adapter folder, a model.tar.gz or a folder holding one, "
                  "or builtin:tiny / builtin:smollm2-135m-instruct."}
    )
    output_dir: str = field(
        metadata={"help": "Where int8/, nf4/, quantization.json and the plot go."}
    )
    scheme: str = field(default="both", metadata={"help": "int8, nf4 or both."})
    data_dir: str | None = field(
        default=None,
        metadata={"help": "Folder with validation.jsonl, or a data file or folder, for the "
                  "evaluation deltas; unset: size, load time and speed only."},
    )
    base_model: str | None = field(
        default=None,
        metadata={"help": "Base model spec of an adapter input; default: the one it records."},
    )
    compute_dtype: str = field(
        default="auto",
        metadata={"help": "nf4 compute dtype: fp32, bf16 or fp16; auto = bf16 on a GPU that has "
                  "it, else fp32."},
    )
    max_samples: int = field(
        default=16, metadata={"help": "Held-out prompts to generate answers for."}
    )
    max_new_tokens: int = field(default=32, metadata={"help": "Answer length limit."})
    batch_size: int = field(default=8, metadata={"help": "Sequences per forward pass."})
    max_seq_length: int = field(
        default=512, metadata={"help": "Tokens per sequence for the loss; longer are cut."}
    )
    speed_runs: int = field(
        default=3, metadata={"help": "Timed generation runs per variant (the median is kept)."}
    )
    speed_tokens: int = field(
        default=32, metadata={"help": "New tokens per timed generation run."}
    )
    archive: bool = field(
        default=False,
        metadata={"help": "Also pack each variant as <scheme>.tar.gz, the single archive a "
                  "SageMaker model package's ModelDataUrl must name (for registration)."},
    )

    def __post_init__(self) -> None:
        if self.scheme not in (*SCHEMES, "both"):
            raise StageError(f"scheme '{self.scheme}' is not one of int8, nf4, both")
        if self.compute_dtype not in ("auto", *COMPUTE_DTYPES):
            raise StageError(
                f"compute_dtype '{self.compute_dtype}' is not one of auto, {', '.join(COMPUTE_DTYPES)}"
            )
        for name in ("max_new_tokens", "batch_size", "max_seq_length", "speed_runs",
                     "speed_tokens"):
            if getattr(self, name) <= 0:
                raise StageError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.max_samples < 0:
            raise StageError(f"max_samples must be >= 0, got {self.max_samples}")

    @property
    def schemes(self) -> tuple[str, ...]:
        return SCHEMES if self.scheme == "both" else (self.scheme,)

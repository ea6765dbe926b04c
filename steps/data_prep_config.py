"""The settings of steps.data_prep.

Importable without torch (steps.common.knobs): the command line reads these settings, defaults
and ranges to check a recipe and a pipeline's parameter values before anything runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from steps.common.knobs import StageError


@dataclass
class DataPrepConfig:
    input_dir: str = field(
        metadata={"help": "A data file, or a folder of .jsonl/.json/.csv/.parquet files."}
    )
    output_dir: str = field(
        metadata={"help": "Where train.jsonl, validation.jsonl and manifest.json go."}
    )
    validation_fraction: float = field(
        default=0.1, metadata={"help": "Share of prompts held out (about), in (0, 1)."}
    )
    seed: int = field(
        default=42, metadata={"help": "Seed of the shuffle and of which prompts are held out."}
    )
    tokenizer: str = field(
        default="builtin:tiny", metadata={"help": "Model spec whose tokenizer measures lengths."}
    )
    max_records: int | None = field(
        default=None,
        metadata={"help": "Keep at most this many records (after de-duplication and shuffling)."},
    )
    max_record_tokens: int | None = field(
        default=None,
        metadata={"help": "Fail, naming <file>:<line>, when a record kept is longer than this many "
                  "tokens as training sees it (by --tokenizer; the longer side of a preference "
                  "pair), instead of letting training truncate it silently. Default: no limit."},
    )

    def __post_init__(self) -> None:
        if not 0 < self.validation_fraction < 1:
            raise StageError(
                f"validation_fraction must be in (0, 1), got {self.validation_fraction}"
            )
        if self.max_records is not None and self.max_records < 2:
            raise StageError(
                f"max_records must be at least 2 (a train and a validation record), "
                f"got {self.max_records}"
            )
        if self.max_record_tokens is not None and self.max_record_tokens < 1:
            raise StageError(
                f"max_record_tokens must be at least 1 (or unset for no limit), "
                f"got {self.max_record_tokens}"
            )

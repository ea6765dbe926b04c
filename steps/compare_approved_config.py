"""The settings of steps.compare_approved.

Importable without torch (steps.common.knobs): the command line reads these settings, defaults
and ranges to check a recipe and a pipeline's parameter values before anything runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from steps.common.knobs import StageError


@dataclass
class CompareApprovedConfig:
    evaluation_dir: str = field(metadata={"help": "The Evaluate step's output (evaluation.json)."})
    output_dir: str = field(metadata={"help": "Where gate.json goes."})
    model_package_group: str = field(metadata={"help": "The registry group to compare with."})
    gate_metric: str = field(metadata={"help": "The metric of evaluation.json the gate compares."})
    gate_direction: str = field(
        default="higher", metadata={"help": "higher or lower: which way the metric is better."}
    )
    approved_margin: float = field(
        default=0.0,
        metadata={"help": "How much better than the Approved package the candidate must be, in "
                  "the metric's units (0: at least as good)."},
    )
    data_dir: str | None = field(
        default=None,
        metadata={"help": "The evaluation data (a data preparation output with manifest.json), "
                  "to tell whether the Approved package was measured on the same data."},
    )

    def __post_init__(self) -> None:
        if self.gate_direction not in ("higher", "lower"):
            raise StageError(f"gate_direction must be higher or lower, got {self.gate_direction}")
        if not math.isfinite(self.approved_margin):
            raise StageError(f"approved_margin must be a finite number, got {self.approved_margin}")

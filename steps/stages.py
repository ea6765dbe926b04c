"""The lifecycle's stages, in one table: for each, its step name in a pipeline, the module its job
runs, the kind of job (and so the image) that runs it, and its config dataclass.

pipelines/ builds steps and checks recipe settings from it, containers/images.py bakes its modules
into the images. Importable without torch: the configs live in `steps/<stage>_config.py`, apart
from the stage code (as TRL keeps `*_config.py` apart from its trainers).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from steps.common.knobs import LoadPolicy
from steps.compare_approved_config import CompareApprovedConfig
from steps.constitutional_config import ConstitutionalConfig
from steps.cpt_config import CPTStageConfig
from steps.data_prep_config import DataPrepConfig
from steps.distill_config import DistillStageConfig
from steps.dpo_config import DPOStageConfig
from steps.evaluate_config import EvaluateConfig
from steps.ppo_config import PPOStageConfig
from steps.pretrain_config import PretrainStageConfig
from steps.quantize_config import QuantizeConfig
from steps.reward_model_config import RewardModelStageConfig
from steps.sft_config import SFTStageConfig
from steps.teacher_logits_config import TeacherLogitsConfig


@dataclass(frozen=True)
class Stage:
    step: str  # the pipeline step's name
    module: str  # what its job runs: python -m MODULE
    job: Literal["training", "processing"]  # a SageMaker training or processing job
    config: type  # the dataclass its settings (hyperparameters or arguments) are parsed into

    @property
    def image(self) -> str:
        """The image family that holds the module (containers/<image>/Dockerfile)."""
        return self.job

    def settings(self) -> frozenset[str]:
        """Every setting the stage takes: its config's fields and the model-loading opt-ins."""
        return frozenset(f.name for f in (*dataclasses.fields(self.config),
                                          *dataclasses.fields(LoadPolicy)))


# Recipe stage name -> Stage; training stages in the order a recipe may chain them.
STAGES: dict[str, Stage] = {
    "data_prep": Stage("DataPrep", "steps.data_prep", "processing", DataPrepConfig),
    "pretrain": Stage("Pretrain", "steps.pretrain", "training", PretrainStageConfig),
    "cpt": Stage("CPT", "steps.cpt", "training", CPTStageConfig),
    "sft": Stage("SFT", "steps.sft", "training", SFTStageConfig),
    "reward_model": Stage("RewardModel", "steps.reward_model", "training", RewardModelStageConfig),
    "dpo": Stage("DPO", "steps.dpo", "training", DPOStageConfig),
    "ppo": Stage("PPO", "steps.ppo", "training", PPOStageConfig),
    "distill": Stage("Distill", "steps.distill", "training", DistillStageConfig),
    "constitutional": Stage("Constitutional", "steps.constitutional", "processing",
                            ConstitutionalConfig),
    "teacher_logits": Stage("TeacherLogits", "steps.teacher_logits", "processing",
                            TeacherLogitsConfig),
    "quantize": Stage("Quantize", "steps.quantize", "processing", QuantizeConfig),
    "evaluate": Stage("Evaluate", "steps.evaluate", "processing", EvaluateConfig),
    # Not a recipe stage: every pipeline runs it before its registration gate.
    "compare_approved": Stage("CompareWithApproved", "steps.compare_approved", "processing",
                              CompareApprovedConfig),
}


def stage_running(module: str) -> str | None:
    """The name of the stage whose job runs `module` (None: not a stage's module)."""
    return next((name for name, stage in STAGES.items() if stage.module == module), None)

"""The settings of steps.distill.

Importable without torch (steps.common.knobs): the command line reads these settings, defaults
and ranges to check a recipe and a pipeline's parameter values before anything runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from steps.common.knobs import (
    POSITIVE,
    OneOf,
    PeftKnobs,
    Range,
    ShardingKnob,
    StageError,
    TrainingKnobs,
)

# A config-built student starts from random weights: the rate of pre-training from scratch
# (steps.pretrain), not the small one that fine-tunes pretrained weights.
RANDOM_INIT_LEARNING_RATE = 3e-3
# A student cut from its teacher starts from pretrained weights that lost half their layers: it
# must move further than a fine-tuned model (2e-5) and less than a random one (3e-3). Measured on
# SmolLM2-135M-Instruct kept at 15 of 30 layers, 100 steps of batch 8 (benchmarks/distillation.py
# --setting, BENCHMARKS.md): at 2e-4 neither student came near its teacher and the labels' CE, the
# loss that pulls hardest at the measured perplexity, won or tied; at 6e-4 the distilled student
# (alpha 0.8, T 2) beat the hard-label one at seeds 1, 7 and 42, whose own perplexity the higher
# rate made less stable from seed to seed.
PRUNED_LEARNING_RATE = 6e-4
@dataclass
class DistillStageConfig(ShardingKnob, PeftKnobs, TrainingKnobs):
    student_model: str | None = field(
        default=None,
        metadata={"help": "The student: teacher:layers=N[+intermediate=I] (the teacher cut down), "
                  "config:layers=N+hidden=H+... (the teacher's architecture resized, random "
                  "weights) or a model spec of the teacher's tokenizer. Ignored when the 'model' "
                  "channel holds a model."},
    )
    teacher_model: str | None = field(
        default=None,
        metadata={"help": "Teacher model spec, for on-the-fly or on-policy teacher outputs; "
                  "not needed with the 'teacher' channel (cached outputs)."},
    )
    temperature: float = field(
        default=2.0, metadata={"help": "Softening temperature T of both distributions (> 0)."}
    )
    alpha: float = field(
        default=0.5,
        metadata={"help": "Weight of the ground-truth CE; 1 - alpha weighs T^2 * KL to the "
                  "teacher. 1.0 = plain hard-label training."},
    )
    top_k: int = field(
        default=16,
        metadata={"help": "Teacher tokens per position; with cached outputs at most the cached k "
                  "(the largest top_k of them are used)."},
    )
    on_policy: bool = field(
        default=False,
        metadata={"help": "GKD-style: distil on the student's own sampled continuations of the "
                  "prompts (needs a teacher model)."},
    )
    max_new_tokens: int = field(
        default=64, metadata={"help": "Tokens the student samples per prompt (on_policy)."}
    )
    teacher_batch_size: int = field(
        default=8, metadata={"help": "Sequences per teacher forward pass (on the fly)."}
    )
    peft_method: str = field(
        default="none",
        metadata={"help": "none (full training of the student, the usual for distillation), "
                  "lora, qlora, prompt_tuning, p_tuning or prefix_tuning over a pretrained one."},
    )
    teacher_answers: bool = field(
        default=True,
        metadata={"help": "Also train on the teacher's answers to prompts that have no reference "
                  "answer (the cached outputs' 'teacher_answered' split, steps.teacher_logits "
                  "--prompts-dir), when there are any. A hard-label student (compare_students) "
                  "trains on the labelled data alone either way: without a teacher it has no "
                  "answers to them."},
    )
    compare_students: bool = field(
        default=False,
        metadata={"help": "Also measure the initial student and the same student trained on the "
                  "ground truth alone for the same steps (a second training run) against the "
                  "distilled one, on the validation split."},
    )
    comparison_samples: int = field(
        default=24, metadata={"help": "Held-out prompts each compared student answers."}
    )
    comparison_new_tokens: int = field(
        default=32, metadata={"help": "Generation length limit of the compared answers."}
    )

    ALLOWED: ClassVar[dict[str, Range | OneOf]] = {
        "temperature": POSITIVE, "alpha": Range(low=0, high=1),
        **dict.fromkeys(("top_k", "max_new_tokens", "teacher_batch_size", "comparison_samples",
                         "comparison_new_tokens"), POSITIVE)}

    def __post_init__(self) -> None:
        # Here, not at the top: parsing a spec needs no torch, but its module does, and the
        # command line reads this config's fields and ranges without torch.
        from steps.common import students

        PeftKnobs.__post_init__(self)
        self.student = students.parse(self.student_model)  # a wrong spec fails here, in one line
        TrainingKnobs.__post_init__(self)
        if self.packing:
            raise StageError(
                "packing is not supported by distillation (teacher outputs are per example); "
                "set packing=false"
            )
        if self.student is not None and self.peft_method != "none":
            what = ("starts from random weights, which" if students.is_config_student(
                self.student_model) else "lost layers of its teacher, which only full training "
                "makes up for and which")
            raise StageError(
                f"student_model {self.student_model} {what} peft_method {self.peft_method} would "
                "keep frozen; use peft_method=none"
            )
        if self.compare_students and self.on_policy:
            raise StageError("compare_students trains a hard-label student on the same batches, "
                             "which on_policy=true does not use; set one of them to false")

    def usual_learning_rate(self) -> float:
        """The peak rate a student trains at unless told: by how far it starts from a useful
        model (a config-built one from random weights, a pruned one from half a teacher)."""
        from steps.common import students

        if students.is_config_student(self.student_model):
            return RANDOM_INIT_LEARNING_RATE
        if isinstance(students.parse(self.student_model), students.PrunedStudent):
            return PRUNED_LEARNING_RATE
        return super().usual_learning_rate()

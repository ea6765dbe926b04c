"""The knobs every training stage shares, and the values each may take, importable without torch.

This module and the stage configs built on it (`steps/<stage>_config.py`) import nothing heavier
than the standard library, so that the command line reads every stage's settings, defaults and
ranges in milliseconds: `StageError` and `LoadPolicy` live here for that reason, and
steps.common.contract, which imports transformers, re-exports them.

`TrainingKnobs` (every training stage) and `PeftKnobs` (every stage that tunes an existing model)
declare each knob once: its default and help as a field, and in the class's `ALLOWED` the values it
takes (`Range` or `OneOf`; a field's metadata cannot hold them, since transformers'
HfArgumentParser hands all of it to argparse). `check_allowed(config)` enforces `ALLOWED` in a
config's `__post_init__`, and the command line reads the same declarations to refuse a pipeline
parameter value before anything runs (pipelines/validation.py), without importing torch. Rules
that tie one knob to another stay in `__post_init__`.

A stage config inherits both (``class SFTStageConfig(PeftKnobs, TrainingKnobs)``), redeclaring a
field to change its default, and calls both ``__post_init__``s.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar


class StageError(Exception):
    """A problem the user can fix: bad data, a bad parameter, missing model files.

    The message is one line saying what is wrong, where (file:line:field or the
    parameter name) and what to do. `run` prints it as ``ERROR: <message>`` and
    exits with status 2; anything else is a bug and exits with status 1.
    """


@dataclass
class LoadPolicy:
    """What loading a model may do, for every stage: the two opt-ins of the safe defaults.

    By default weights load from safetensors only and no code shipped with a model runs. Each
    stage accepts these as hyperparameters (training) or arguments (processing), so a user opts in
    by name, per stage, for files they trust.
    """

    allow_unsafe_weights: bool = field(
        default=False,
        metadata={"help": "Load pickle-based weights (pytorch_model.bin, adapter_model.bin) when a "
                  "model has no safetensors; unpickling can run code: only for files you trust."},
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={"help": "Run the Python code a model ships (auto_map in its config); only for "
                  "code you trust."},
    )


PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# transformers.SchedulerType's values (tests/steps/test_training.py keeps them equal): written out
# so that reading them does not import transformers' trainer, and with it torch.
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
                 "constant_with_warmup", "inverse_sqrt", "reduce_lr_on_plateau",
                 "cosine_with_min_lr", "cosine_warmup_with_min_lr", "warmup_stable_decay",
                 "greedy")
PEFT_METHODS = ("none", "lora", "qlora", "prompt_tuning", "p_tuning", "prefix_tuning")
PROMPT_LEARNING_METHODS = ("prompt_tuning", "p_tuning", "prefix_tuning")
ENCODER_TYPES = ("MLP", "LSTM")
# The peak learning rate each method is usually trained with, for a stage whose learning_rate is
# left unset: full fine-tuning moves pretrained weights and wants small steps; LoRA starts its B
# matrices at zero and wants about 10x larger ones; a soft prompt is a few embeddings that start
# far from anything useful (PEFT's guides: 3e-2 prompt tuning, 1e-3 p-tuning, 1e-2 prefix tuning).
# Stages that train gentler (DPO, PPO, reward models) declare their own table.
USUAL_LEARNING_RATES = {"none": 2e-5, "lora": 2e-4, "qlora": 2e-4, "prompt_tuning": 3e-2,
                        "p_tuning": 1e-3, "prefix_tuning": 1e-2}
# The methods the alignment stages (reward model, DPO, PPO) train with: the reference of a LoRA
# policy is the same weights with the adapter switched off, of a full one a frozen copy.
ALIGNMENT_PEFT_METHODS = ("none", "lora")
# How a stage's model is spread over the processes that train it (steps.common.sharding): none (each
# holds the whole model, data-parallel) or fsdp (weights, gradients and optimizer state sharded).
SHARDINGS = ("none", "fsdp")


@dataclass(frozen=True)
class Range:
    """Numbers from `low` to `high` (either may be open or absent), and the values in `also`."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    also: tuple[float, ...] = ()
    note: str = ""  # what `also`, or a value of the range, means: "use epochs"

    def allows(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if value in self.also:
            return True
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def problem(self, name: str, value: Any) -> str:
        return f"{name} must be {self}, got {value}"

    def __str__(self) -> str:
        if self.low is not None and self.high is not None:
            text = (f"in {'(' if self.low_open else '['}{self.low:g}, "
                    f"{self.high:g}{')' if self.high_open else ']'}")
        elif self.low is not None:
            text = f"{'>' if self.low_open else '>='} {self.low:g}"
        else:
            text = f"{'<' if self.high_open else '<='} {self.high:g}"
        note = f" ({self.note})" if self.note else ""
        if self.also:
            return f"{' or '.join(f'{v:g}' for v in self.also)}{note} or {text}"
        return f"{text}{note}"


@dataclass(frozen=True)
class OneOf:
    choices: tuple[str, ...]

    def allows(self, value: Any) -> bool:
        return value in self.choices

    def __str__(self) -> str:
        return f"one of {', '.join(self.choices)}"

    def problem(self, name: str, value: Any) -> str:
        return f"{name} '{value}' is not one of {', '.join(self.choices)}"


POSITIVE = Range(low=0, low_open=True)
NOT_NEGATIVE = Range(low=0)


def allowed(config_class: type, name: str) -> Range | OneOf | None:
    """What field `name` of a config dataclass takes (None: not declared), from the `ALLOWED` of
    the nearest class in its MRO that declares one: a class that redeclares a field to change
    its default keeps the rule it inherits."""
    for klass in config_class.__mro__:
        rule = vars(klass).get("ALLOWED", {}).get(name)
        if rule is not None:
            return rule
    return None


def problem(config_class: type, name: str, value: Any) -> str | None:
    """Why `value` is not one field `name` takes, or None when it is."""
    rule = allowed(config_class, name)
    if rule is None or value is None or rule.allows(value):
        return None
    return rule.problem(name, value)


def check_allowed(config: Any) -> None:
    """Raise the stage's one-line error for the first field outside what it declares."""
    for declared in dataclasses.fields(config):
        found = problem(type(config), declared.name, getattr(config, declared.name))
        if found:
            raise StageError(found)


CHECKPOINTING = ("auto", "true", "false")


def checkpointing_setting(value: Any) -> bool | str:
    """gradient_checkpointing as a stage holds it: True, False or "auto"."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text not in CHECKPOINTING:
        raise StageError(f"gradient_checkpointing '{value}' is not one of "
                         f"{', '.join(CHECKPOINTING)}")
    return text if text == "auto" else text == "true"


def _knob(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass
class TrainingKnobs:
    """The knobs of every training stage. Stages override defaults by redeclaring a field."""

    epochs: float = _knob(1.0, "Passes over the training data (ignored if max_steps > 0).")
    max_steps: int = _knob(-1, "Optimizer steps to run; -1 to run `epochs` epochs.")
    learning_rate: float | None = _knob(
        None, "Peak learning rate; unset or 0: the stage's usual rate for its peft_method "
        "(its config's USUAL_LEARNING_RATES), which the job prints and training_summary.json "
        "records.")
    lr_scheduler_type: str = _knob("cosine", "transformers scheduler name (cosine, linear, ...).")
    warmup_ratio: float = _knob(0.0, "Fraction of steps of linear warm-up, in [0, 1).")
    weight_decay: float = _knob(0.0, "AdamW weight decay.")
    max_grad_norm: float = _knob(1.0, "Gradient clipping norm; 0 turns clipping off.")
    per_device_batch_size: int = _knob(4, "Sequences per device (process) per forward pass.")
    gradient_accumulation_steps: int = _knob(
        1, "Forward passes per optimizer step; the global batch is per_device_batch_size x "
        "gradient_accumulation_steps x processes.")
    max_seq_length: int = _knob(512, "Tokens per sequence; longer ones are truncated.")
    packing: bool = _knob(False, "Pack several sequences into each max_seq_length row "
                          "(padding-free).")
    precision: str = _knob("auto", "fp32, or bf16 / fp16 autocast; auto = bf16 where native, "
                           "else fp32.")
    # A string for the argument parser (true, false or auto); __post_init__ makes it a bool or
    # "auto", which the job resolves from its memory estimate (steps.common.training).
    gradient_checkpointing: str = _knob(
        "auto", "Recompute activations in the backward pass: less memory, more time. auto: only "
        "where the stage would not fit its device's memory without it (the job estimates it from "
        "the model's config, its settings and the device's free memory, logs the decision and "
        "records it in training_summary.json).")
    seed: int = _knob(42, "Seed for initialisation, dropout and data order.")
    logging_steps: int = _knob(5, "Print a metrics line every this many optimizer steps.")
    checkpoint_steps: int = _knob(100, "Write a resumable checkpoint every this many steps; 0 "
                                  "for none.")
    checkpoints_to_keep: int = _knob(2, "Checkpoints kept in the checkpoint folder (oldest go).")

    # The stage's usual peak learning rate per peft_method (stages without one: "none").
    USUAL_LEARNING_RATES: ClassVar[dict[str, float]] = USUAL_LEARNING_RATES
    # The values each knob takes.
    ALLOWED: ClassVar[dict[str, Range | OneOf]] = {
        "epochs": POSITIVE, "max_steps": Range(low=0, low_open=True, also=(-1,), note="use epochs"),
        "learning_rate": Range(low=0, note="0: the stage's usual rate"),
        "lr_scheduler_type": OneOf(LR_SCHEDULERS),
        "warmup_ratio": Range(low=0, high=1, high_open=True),
        "weight_decay": NOT_NEGATIVE, "max_grad_norm": NOT_NEGATIVE,
        "per_device_batch_size": POSITIVE, "gradient_accumulation_steps": POSITIVE,
        "max_seq_length": POSITIVE, "precision": OneOf(PRECISIONS), "logging_steps": POSITIVE,
        "checkpoint_steps": NOT_NEGATIVE, "checkpoints_to_keep": POSITIVE,
    }

    def __post_init__(self) -> None:
        self.gradient_checkpointing = checkpointing_setting(self.gradient_checkpointing)
        check_allowed(self)
        # Resolved here, once: from now on the config holds, and the training record keeps, the
        # rate the stage trains with. 0 stands for unset (a pipeline parameter cannot be unset).
        if not self.learning_rate:
            self.learning_rate = self.usual_learning_rate()

    def usual_learning_rate(self) -> float:
        """The rate this stage trains with when learning_rate is unset."""
        return self.USUAL_LEARNING_RATES[getattr(self, "peft_method", "none")]

    def learning_rate_line(self) -> str:
        """What a job prints about its learning rate: the rate, and whether it is the usual one."""
        usual = " (the stage's usual rate)" if self.learning_rate == self.usual_learning_rate() \
            else ""
        return f"learning rate: {self.learning_rate:g}{usual}"


@dataclass
class PeftKnobs:
    """Which parameter-efficient method tunes the model, and its sizes."""

    peft_method: str = _knob("lora", f"One of: {', '.join(PEFT_METHODS)} (none = full "
                             "fine-tuning).")
    lora_r: int = _knob(8, "LoRA rank (lora, qlora).")
    lora_alpha: int = _knob(16, "LoRA scaling numerator: scale = alpha / r (lora, qlora).")
    lora_dropout: float = _knob(0.05, "Dropout on the LoRA input, in [0, 1) (lora, qlora).")
    lora_target_modules: str = _knob(
        "all-linear", "'all-linear' (every linear layer but the output head) or a "
        "comma-separated list such as 'q_proj,v_proj' (lora, qlora).")
    num_virtual_tokens: int = _knob(20, "Virtual tokens of the soft prompt or prefix "
                                    "(prompt_tuning, p_tuning, prefix_tuning).")
    prompt_tuning_init_text: str | None = _knob(
        None, "Text whose token embeddings start the soft prompt, repeated or cut to "
        "num_virtual_tokens (prompt_tuning); unset: random.")
    encoder_reparameterization_type: str = _knob("MLP", "Prompt encoder of p_tuning: MLP or "
                                                 "LSTM.")
    encoder_hidden_size: int | None = _knob(
        None, "Hidden size of the p_tuning prompt encoder or the prefix_tuning projection; "
        "unset: the model's hidden size.")
    prefix_projection: bool = _knob(False, "Produce the prefixes with a two-layer MLP "
                                    "(prefix_tuning): more parameters while training, often "
                                    "more stable.")

    # The values each knob takes.
    ALLOWED: ClassVar[dict[str, Range | OneOf]] = {
        "peft_method": OneOf(PEFT_METHODS), "lora_r": POSITIVE, "lora_alpha": POSITIVE,
        "lora_dropout": Range(low=0, high=1, high_open=True), "num_virtual_tokens": POSITIVE,
        "encoder_reparameterization_type": OneOf(ENCODER_TYPES), "encoder_hidden_size": POSITIVE,
    }

    def __post_init__(self) -> None:

        if self.prompt_tuning_init_text is not None and not self.prompt_tuning_init_text.strip():
            self.prompt_tuning_init_text = None  # SageMaker cannot send "unset": "" means it
        check_allowed(self)
        if not target_modules(self.lora_target_modules):
            raise StageError(
                "lora_target_modules is empty; use 'all-linear' or names such as 'q_proj,v_proj'"
            )
        # A knob that only one method reads, set for another, is a mistake the run would hide.
        misplaced = {
            "prompt_tuning_init_text": (self.prompt_tuning_init_text is not None,
                                        ("prompt_tuning",)),
            "encoder_hidden_size": (self.encoder_hidden_size is not None,
                                    ("p_tuning", "prefix_tuning")),
            "prefix_projection": (self.prefix_projection, ("prefix_tuning",)),
        }
        for name, (is_set, methods) in misplaced.items():
            if is_set and self.peft_method not in methods:
                raise StageError(
                    f"{name} applies to peft_method {' or '.join(methods)}, not "
                    f"'{self.peft_method}'; unset it or change peft_method"
                )

    @property
    def is_prompt_learning(self) -> bool:
        return self.peft_method in PROMPT_LEARNING_METHODS


@dataclass
class ShardingKnob:
    """Whether the stage shards its model across every GPU of every instance of its job: the
    stages trained with transformers' Trainer (not PPO, which trains in one process)."""

    sharding: str = _knob(
        "none", "none (every GPU holds the whole model) or fsdp (weights, gradients and optimizer "
        "state sharded across every GPU of every instance: PyTorch FSDP through accelerate; a "
        "CPU job runs unsharded and says so).")

    ALLOWED: ClassVar[dict[str, Range | OneOf]] = {"sharding": OneOf(SHARDINGS)}


def target_modules(value: str) -> str | list[str]:
    """lora_target_modules as PEFT takes it: 'all-linear' stays a string, a list is split."""
    value = value.strip()
    if value == "all-linear":
        return value
    return [name.strip() for name in value.split(",") if name.strip()]

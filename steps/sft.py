"""Supervised fine-tuning (training stage): LoRA on a causal LM with TRL's SFTTrainer.

In a SageMaker training container: ``python -m steps.sft`` with hyperparameters.json and the
channels ``train`` (required), ``validation`` and ``model`` (optional: a model from an earlier
stage, used instead of ``base_model``). Locally, hyperparameters can also be given on the command
line: ``python -m steps.sft --base_model builtin:tiny --max_steps 30``.

Writes the adapter (PEFT layout), the tokenizer and training_summary.json to SM_MODEL_DIR, and
metrics.jsonl and loss_curve.png to SM_OUTPUT_DATA_DIR.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Literal

import torch
import transformers
from datasets import Dataset
from peft import LoraConfig
from transformers import PrinterCallback, Trainer
from trl import SFTConfig, SFTTrainer
from trl.chat_template_utils import has_generation_markers

from steps.common import contract
from steps.common.contract import StageError
from steps.common.datasets import DatasetFormat, Record, load_records, sft_example
from steps.common.metrics import MetricsCallback, log_metrics, peak_memory_mb, plot_loss_curve
from steps.common.models import load_model, load_tokenizer, resolve_model_source, resolve_precision

PEFT_METHODS = ("lora",)  # full fine-tuning, QLoRA and prompt tuning come in later changes
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass
class SFTStageConfig:
    base_model: str = field(
        default="builtin:smollm2-135m-instruct",
        metadata={
            "help": "Model spec: builtin:tiny, builtin:smollm2-135m-instruct, a folder, a "
            "model.tar.gz or a hub id. Ignored when the 'model' channel holds a model."
        },
    )
    peft_method: str = field(
        default="lora", metadata={"help": f"One of: {', '.join(PEFT_METHODS)}."}
    )
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(
        default=16, metadata={"help": "LoRA scaling numerator (scale = alpha / r)."}
    )
    lora_dropout: float = field(
        default=0.05, metadata={"help": "Dropout on the LoRA input, in [0, 1)."}
    )
    lora_target_modules: str = field(
        default="all-linear",
        metadata={"help": "'all-linear' or a comma-separated list such as 'q_proj,v_proj'."},
    )
    epochs: float = field(
        default=1.0, metadata={"help": "Passes over the training data (ignored if max_steps > 0)."}
    )
    max_steps: int = field(
        default=-1, metadata={"help": "Optimizer steps to run; -1 to run `epochs` epochs."}
    )
    learning_rate: float = field(default=2e-4, metadata={"help": "Peak learning rate."})
    per_device_batch_size: int = field(
        default=4, metadata={"help": "Sequences per device per forward pass."}
    )
    gradient_accumulation_steps: int = field(
        default=1, metadata={"help": "Forward passes per optimizer step."}
    )
    max_seq_length: int = field(
        default=512, metadata={"help": "Tokens per sequence; longer ones are truncated."}
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = field(
        default="auto",
        metadata={"help": "fp32, or bf16 / fp16 autocast; auto = bf16 where native, else fp32."},
    )
    seed: int = field(
        default=42, metadata={"help": "Seed for initialisation, dropout and data order."}
    )
    warmup_ratio: float = field(
        default=0.0, metadata={"help": "Fraction of steps of linear warm-up, in [0, 1)."}
    )
    lr_scheduler_type: str = field(
        default="cosine", metadata={"help": "transformers scheduler name."}
    )
    logging_steps: int = field(
        default=5, metadata={"help": "Print a metrics line every this many steps."}
    )
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "Recompute activations to save memory (about +50% time)."}
    )
    packing: bool = field(
        default=False, metadata={"help": "Pack several sequences into each max_seq_length row."}
    )

    def __post_init__(self) -> None:
        if self.peft_method not in PEFT_METHODS:
            methods = ", ".join(PEFT_METHODS)
            raise StageError(
                f"peft_method '{self.peft_method}' is not supported yet; use one of {methods}"
            )
        if self.precision not in PRECISIONS:
            raise StageError(f"precision '{self.precision}' is not one of {', '.join(PRECISIONS)}")
        schedulers = ", ".join(s.value for s in transformers.SchedulerType)
        if self.lr_scheduler_type not in schedulers.split(", "):
            raise StageError(
                f"lr_scheduler_type '{self.lr_scheduler_type}' is not one of {schedulers}"
            )
        for name in (
            "lora_r",
            "lora_alpha",
            "per_device_batch_size",
            "gradient_accumulation_steps",
            "max_seq_length",
            "logging_steps",
            "learning_rate",
            "epochs",
        ):
            if not getattr(self, name) > 0:
                raise StageError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.max_steps != -1 and self.max_steps <= 0:
            raise StageError(f"max_steps must be -1 (use epochs) or > 0, got {self.max_steps}")
        for name in ("lora_dropout", "warmup_ratio"):
            if not 0 <= getattr(self, name) < 1:
                raise StageError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if not self.lora_target_modules.strip():
            raise StageError(
                "lora_target_modules is empty; use 'all-linear' or names such as 'q_proj,v_proj'"
            )
        if "lm_head" in _target_modules(self.lora_target_modules):
            # TRL 1.16 reads lm_head.weight directly in its fused head and refuses adapters on it.
            raise StageError(
                "lora_target_modules cannot include lm_head (TRL does not train adapters on it)"
            )


class SFTTrainerWithModelLoss(SFTTrainer):
    """SFTTrainer whose loss is the model's own forward loss.

    TRL 1.16 swaps in a chunked LM head that also computes entropy and token accuracy, and no
    setting turns it off; on a CPU it halves throughput for the same loss (measured: 2,300 against
    4,755 tokens/s). `transformers.Trainer.compute_loss` passes the labels and `num_items_in_batch`
    to the model, whose loss is then normalised over the whole accumulated batch as TRL's is, so
    the Trainer does not divide it by the accumulation steps again. Given up: the entropy and
    token-accuracy log entries.
    """

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        return Trainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)


def main(config: SFTStageConfig) -> None:
    transformers.set_seed(config.seed)
    model_dir, output_data_dir = contract.model_dir(), contract.output_data_dir()

    # 1. Data: every record is read and checked before the model loads, so bad data fails fast.
    train_format, train_records = load_records(contract.channel_dir("train"))
    validation_dir = contract.optional_channel_dir("validation")
    validation_format, validation_records = (
        load_records(validation_dir) if validation_dir else (None, [])
    )
    print(
        f"train: {len(train_records)} {train_format.name} records; "
        f"validation: {len(validation_records)} records",
        flush=True,
    )

    # 2. Model: the 'model' channel (an earlier stage's output) wins over base_model.
    source = resolve_model_source(contract.optional_channel_dir("model"), config.base_model)
    print(f"loading model {source}", flush=True)
    tokenizer = load_tokenizer(source)
    model = load_model(source)
    if hasattr(model, "peft_config"):
        raise StageError(f"model {source} is a PEFT adapter; merge it into its base model first")
    chat_template = bool(tokenizer.chat_template)
    train_dataset = _trl_dataset(train_records, train_format, chat_template)
    eval_dataset = (
        _trl_dataset(validation_records, validation_format, chat_template)
        if validation_records
        else None
    )

    # 3. Trainer: TRL's SFTTrainer with a LoRA adapter, every TRL default that matters set here.
    precision = resolve_precision(config.precision)
    print(f"precision: {precision} (asked: {config.precision})", flush=True)
    output_data_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = output_data_dir / "metrics.jsonl"
    metrics_path.write_text("")  # a fresh log per run; SageMaker uploads it even if the job fails
    metrics = MetricsCallback(metrics_path)
    scratch = tempfile.TemporaryDirectory(prefix="sft-trainer-")  # save_strategy="no": stays empty
    args = SFTConfig(
        output_dir=scratch.name,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps,
        learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_scheduler_type,
        warmup_steps=config.warmup_ratio,  # transformers 5: a float below 1 is a fraction of steps
        per_device_train_batch_size=config.per_device_batch_size,
        per_device_eval_batch_size=config.per_device_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        max_length=config.max_seq_length,
        packing=config.packing,
        # The loss covers completions for prompt-completion data (TRL's default), assistant turns
        # of conversations when the chat template marks them, else the whole sequence.
        completion_only_loss=None,
        assistant_only_loss=(
            "messages" in train_dataset.column_names
            and has_generation_markers(tokenizer.chat_template or "")
        ),
        # TRL turns both on by default, even on a CPU: bf16 only where asked or native, and
        # checkpointing (about +50% time) only when asked.
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        activation_checkpointing=config.gradient_checkpointing,  # transformers 5's name for it
        seed=config.seed,
        logging_steps=config.logging_steps,
        logging_first_step=True,
        include_num_input_tokens_seen="non_padding",
        eval_strategy="no",
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_pin_memory=torch.cuda.is_available(),
    )
    trainer = SFTTrainerWithModelLoss(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=LoraConfig(
            r=config.lora_r,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules=_target_modules(config.lora_target_modules),
            task_type="CAUSAL_LM",
        ),
        callbacks=[metrics],
    )
    # PrinterCallback prints every log as a dict, next to MetricsCallback's lines.
    trainer.remove_callback(PrinterCallback)
    trainable, total = trainer.model.get_nb_trainable_parameters()
    print(
        f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)",
        flush=True,
    )

    # 4. Train, then evaluate once on the validation channel.
    started = time.perf_counter()
    result = trainer.train()
    runtime = time.perf_counter() - started
    eval_loss = trainer.evaluate()["eval_loss"] if eval_dataset is not None else None
    tokens = trainer.state.num_input_tokens_seen
    log_metrics(
        {
            "step": trainer.state.global_step,
            "train_runtime_s": round(runtime, 2),
            "total_tokens": tokens,
            "mean_tokens_per_second": round(tokens / runtime, 1),
            "trainable_parameters": trainable,
            "peak_memory_mb": round(peak_memory_mb(), 1),
        },
        metrics_path,
    )
    scratch.cleanup()
    if not trainer.is_world_process_zero():  # with several processes, one of them saves
        return

    # 5. Save: the adapter in PEFT's layout, the tokenizer (with its chat template, so the folder
    # is self-contained) and a summary; all or nothing.
    train_losses = [m["train_loss"] for m in metrics.history if "train_loss" in m]
    summary = {
        "stage": "sft",
        "base_model": source,
        "peft_method": config.peft_method,
        "hyperparameters": asdict(config),
        "precision": precision,
        "data_format": train_format.name,
        "train_examples": len(train_dataset),
        "validation_examples": len(eval_dataset) if eval_dataset is not None else 0,
        "global_steps": trainer.state.global_step,
        "first_train_loss": train_losses[0] if train_losses else None,
        "final_train_loss": train_losses[-1] if train_losses else None,
        "mean_train_loss": result.training_loss,
        "eval_loss": eval_loss,
        "total_tokens": tokens,
        "train_runtime_s": round(runtime, 2),
    }
    with contract.atomic_output(model_dir) as staging:
        # LoRA leaves the embeddings alone; saying so stops PEFT from looking the base model up on
        # the Hub to find out whether they changed.
        trainer.model.save_pretrained(staging, save_embedding_layers=False)
        tokenizer.save_pretrained(staging)
        (staging / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot_loss_curve(metrics.history, output_data_dir / "loss_curve.png")
    print(f"saved the adapter, tokenizer and training_summary.json to {model_dir}", flush=True)


def _trl_dataset(records: list[Record], fmt: DatasetFormat, chat_template: bool) -> Dataset:
    if fmt.conversational and not chat_template:
        raise StageError(
            "the data is conversational but the model's tokenizer has no chat template; "
            "use a chat model or give the data as text / prompt+completion strings"
        )
    if fmt.name in ("preference", "unpaired_preference"):
        print(f"{fmt.name} data: training on the chosen / desirable responses", flush=True)
    examples = [sft_example(record.data, fmt, chat_template) for record in records]
    examples = [example for example in examples if example is not None]
    if not examples:
        raise StageError(f"no {fmt.name} record has a response to learn from (all labels false?)")
    return Dataset.from_list(examples)


def _target_modules(value: str) -> str | list[str]:
    value = value.strip()
    if value == "all-linear":  # PEFT's shorthand: every linear layer but the output head
        return value
    return [name.strip() for name in value.split(",") if name.strip()]


if __name__ == "__main__":
    contract.run(main, SFTStageConfig, job="training")

"""Supervised fine-tuning (training stage): full fine-tuning or a PEFT method, with TRL's SFTTrainer.

In a SageMaker training container: ``python -m steps.sft`` with hyperparameters.json and the
channels ``train`` (required), ``validation`` and ``model`` (optional: a model from an earlier
stage, used instead of ``base_model``). Locally, hyperparameters can also be given on the command
line: ``python -m steps.sft --base_model builtin:tiny --peft_method prompt_tuning --max_steps 30``;
under ``torchrun --nproc_per_node N -m steps.sft ...`` it trains data-parallel.

The loss covers what the model should learn to say: completions of prompt-completion data, the
assistant turns of conversations (the chat template marks them), all of plain text; each ends with
a token generation stops at, so the tuned model stops.

Writes to SM_MODEL_DIR the tuned model (an adapter in PEFT's layout, or a full model for
peft_method=none or merge_lora=true), the tokenizer with its chat template, and
training_summary.json; to SM_OUTPUT_DATA_DIR metrics.jsonl and loss_curve.png; resumable
checkpoints to the SageMaker checkpoint folder.
"""

from __future__ import annotations

import itertools
import tempfile
from collections import Counter
from pathlib import Path

import transformers
from datasets import Dataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase, PrinterCallback, Trainer
from trl import SFTConfig, SFTTrainer
from trl.chat_template_utils import has_generation_markers
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from steps.common import contract
from steps.common.contract import StageError
from steps.common.datasets import (
    DatasetFormat,
    Record,
    load_records,
    needs_responses,
    sft_example,
)
from steps.common.lm_loss import add_memory_light_loss
from steps.common.models import load_tokenizer, resolve_model_source, stop_token_ids
from steps.common.peft_methods import (
    apply_peft,
    load_model_for_training,
    merge_adapter,
    save_model,
    set_quantized_adapter_dtype,
)
from steps.common.sharding import gather_trained_model, prepare_sharding
from steps.common.training import (
    metrics_callback,
    prepare_precision,
    resolve_checkpointing,
    save_training_record,
    train,
    trainer_arguments,
    training_summary,
)
from steps.sft_config import SFTStageConfig


class SFTTrainerWithModelLoss(SFTTrainer):
    """SFTTrainer whose loss is the model's own forward loss.

    TRL 1.16 swaps in a chunked LM head that also computes entropy and token accuracy, and no
    setting turns it off; on a CPU it halves throughput for the same loss (measured: 2,300 against
    4,755 tokens/s). `transformers.Trainer.compute_loss` passes the labels and `num_items_in_batch`
    to the model, whose loss is then normalised over the whole accumulated batch as TRL's is, so
    the Trainer does not divide it by the accumulation steps again. That forward is
    steps.common.lm_loss's (`add_memory_light_loss` in `main`), so the full-vocabulary logits are
    not materialised either. Given up: the entropy and token-accuracy log entries.
    """

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # As TRL's own compute_loss: no key/value cache in training (it costs memory, and with one
        # transformers does not mask packed sequences apart).
        inputs["use_cache"] = False
        return Trainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)


class PackedRowsCollator(DataCollatorForLanguageModeling):
    """TRL's collator for packed rows that keeps the batch's rows apart.

    TRL's best-fit packing turns on padding-free batches: the B rows of a batch are flattened into
    one sequence of B x max_seq_length tokens, which a varlen (FlashAttention) kernel splits back
    at the sequence boundaries. Any other attention (SDPA, eager) gets one (B x max_seq_length)^2
    block mask from transformers instead: B times the attention work and memory (on an H100,
    packed SFT of SmolLM2 ran slower than a plain Trainer and peaked 20% higher). This collator
    returns the B rows, each with position ids that restart at every packed sequence and no
    attention mask, so transformers masks each row's sequences apart at B x max_seq_length^2 cost.
    Padding at a row's end restarts at position 0 and is masked out of the loss by its labels.
    """

    def torch_call(self, examples):
        batch = super().torch_call(examples)
        batch.pop("attention_mask", None)  # a mask would hide the packed sequences' boundaries
        # The first token of each packed sequence is no target: without this, the last token of
        # one sequence would be trained to predict the next one's first. TRL masks it in its
        # padding-free batches only, not in rows (trl 1.16, DataCollatorForLanguageModeling).
        batch["labels"][batch["position_ids"] == 0] = -100
        return batch


def packed_rows_collator(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase):
    """None (keep TRL's padding-free batches) under a varlen attention kernel, else
    PackedRowsCollator. Transformers masks packed sequences apart only in a forward without a
    key/value cache, which SFTTrainerWithModelLoss ensures."""
    if "flash" in str(getattr(model.config, "_attn_implementation", "")):
        return None
    return PackedRowsCollator(pad_token_id=tokenizer.pad_token_id, padding_free=False,
                              return_position_ids=True)


def main(config: SFTStageConfig) -> None:
    transformers.set_seed(config.seed)
    model_dir = contract.model_dir()

    # 1. Data: every record is read and checked before the model loads, so bad data fails fast.
    train_format, train_records = load_records(contract.channel_dir("train"))
    needs_responses(train_format, "the 'train' data")
    validation_dir = contract.optional_channel_dir("validation")
    validation_format, validation_records = (
        load_records(validation_dir) if validation_dir else (None, [])
    )
    print(
        f"train: {len(train_records)} {train_format.name} records; "
        f"validation: {len(validation_records)} records",
        flush=True,
    )

    # 2. Model: the 'model' channel (an earlier stage's output) wins over base_model; PEFT wraps it.
    source = resolve_model_source(contract.optional_channel_dir("model"), config.base_model)
    precision = prepare_precision(config)
    prepare_sharding(config)  # FSDP across the job's GPUs, or one line saying why not
    print(f"peft_method: {config.peft_method}; {config.learning_rate_line()}", flush=True)
    print(f"loading model {source}", flush=True)
    tokenizer = load_tokenizer(source)
    model = apply_peft(load_model_for_training(source, config, precision), config, tokenizer)
    print(f"next-token loss: {add_memory_light_loss(model)}", flush=True)  # steps.common.lm_loss
    checkpointing = resolve_checkpointing(config, "sft", model, precision)  # auto: fits without?
    chat_template = bool(tokenizer.chat_template)
    train_dataset = _trl_dataset(train_records, train_format, chat_template)
    eval_dataset = (
        _trl_dataset(validation_records, validation_format, chat_template)
        if validation_records
        else None
    )

    # 3. Trainer: TRL's SFTTrainer; every TRL default that costs speed is set in sft_trainer.
    metrics, metrics_path = metrics_callback()
    trainer = sft_trainer(config, precision, model, tokenizer, train_dataset, eval_dataset,
                          callbacks=[metrics])
    if config.packing:
        print(f"packing: {len(train_dataset)} examples in {len(trainer.train_dataset)} rows of up "
              f"to {config.max_seq_length} tokens", flush=True)
    stop_tokens = check_examples_teach_stopping(
        trainer.train_dataset, trainer.model, tokenizer, config.max_seq_length
    )

    # 4. Train (resuming from the latest checkpoint, if a restarted job left one), then evaluate;
    # the held-out loss before training too, so the record says what this stage bought.
    trainer.remove_callback(PrinterCallback)  # it prints each log as a dict, beside our lines
    eval_loss_before = trainer.evaluate()["eval_loss"] if eval_dataset is not None else None
    report = train(trainer, config, metrics, metrics_path)
    weights = gather_trained_model(trainer.model)  # sharded: the whole weights, for saving
    if not trainer.is_world_process_zero():  # with several processes, one of them saves
        return
    if eval_loss_before is not None:
        print(f"validation loss: {eval_loss_before:.4f} before, {report.eval_loss:.4f} after",
              flush=True)

    # 5. Save, all or nothing: the model folder must load on its own for evaluation and serving.
    summary = training_summary(
        "sft", config, source, precision, report,
        gradient_checkpointing=checkpointing,
        merged=config.merge_lora,
        data_format=train_format.name,
        train_examples=len(train_dataset),
        validation_examples=len(eval_dataset) if eval_dataset is not None else 0,
        eval_loss_before=eval_loss_before,
        stop_tokens=stop_tokens,
    )
    with contract.atomic_output(model_dir) as staging:
        if config.merge_lora:
            with tempfile.TemporaryDirectory(prefix="adapter-") as adapter_dir:
                save_model(trainer.model, tokenizer, Path(adapter_dir), config,
                           state_dict=weights)
                merge_adapter(adapter_dir, staging, base_model=source)
        else:
            save_model(trainer.model, tokenizer, staging, config, state_dict=weights)
        save_training_record(staging, summary, started_from=source)
    what = "model" if config.peft_method == "none" else "adapter"
    what = "merged model" if config.merge_lora else what
    print(f"saved the {what}, tokenizer and training_summary.json to {model_dir}", flush=True)


def sft_trainer(
    config: SFTStageConfig, precision: str, model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase, train_dataset: Dataset, eval_dataset: Dataset | None,
    callbacks: list | None = None,
) -> SFTTrainerWithModelLoss:
    """TRL's SFTTrainer as the stage trains with it: its datasets tokenized, masked and packed."""
    args = trainer_arguments(
        config,
        precision,
        SFTConfig,
        max_length=config.max_seq_length,
        packing=config.packing,
        # The loss covers completions for prompt-completion data (TRL's default), assistant turns
        # of conversations when the chat template marks them, else the whole sequence.
        completion_only_loss=None,
        assistant_only_loss=(
            "messages" in train_dataset.column_names
            and has_generation_markers(tokenizer.chat_template or "")
        ),
    )
    trainer = SFTTrainerWithModelLoss(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    set_quantized_adapter_dtype(trainer.model)  # TRL cast a QLoRA adapter to bf16 regardless
    if config.packing and (collator := packed_rows_collator(model, tokenizer)) is not None:
        trainer.data_collator = collator  # TRL takes no collator of ours with best-fit packing
    return trainer


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


def check_examples_teach_stopping(
    dataset: Dataset, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
    max_length: int,
) -> list[str]:
    """Check that every tokenized training example's trained tokens end with a stop token.

    TRL appends the tokenizer's EOS to text and string completions; a chat template ends each
    assistant turn with its own end-of-turn token (ChatML: <|im_end|>, then a newline). A model
    trained on examples that end otherwise never learns to stop, which no loss curve shows: the
    stage refuses to train it. Examples cut at max_length end nowhere, so they only warn. The
    first 2,000 rows are checked: what this catches comes from the template or the tokenizer, so
    it shows in every example. Returns the stop tokens, for the summary.
    """
    stops = set(stop_token_ids(model, tokenizer))
    blank: dict[int, bool] = {}

    def is_blank(token: int) -> bool:  # a newline after the end-of-turn token does not count
        if token not in blank:
            blank[token] = not tokenizer.decode([token]).strip() and token not in stops
        return blank[token]

    total, truncated, wrong_ends = 0, 0, Counter()
    for row in itertools.islice(dataset, 2000):
        start = 0
        # Packed rows hold several examples; seq_lengths says where each one ends.
        for length in row.get("seq_lengths") or [len(row["input_ids"])]:
            trained = [t for t in row["labels"][start:start + length] if t != -100]
            start += length
            while trained and is_blank(trained[-1]):
                trained.pop()
            if not trained:
                continue
            total += 1
            if trained[-1] in stops:
                continue
            if length >= max_length:
                truncated += 1
            else:
                wrong_ends[trained[-1]] += 1
    names = sorted(tokenizer.decode([token]) for token in stops)
    if wrong_ends:
        token, count = wrong_ends.most_common(1)[0]
        raise StageError(
            f"{sum(wrong_ends.values())} of {total} tokenized training examples end with "
            f"{tokenizer.decode([token])!r} (e.g. {count}), not a token generation stops at "
            f"({', '.join(names)}), so the tuned model would not learn to stop; use a chat "
            "template whose turns end with the model's EOS, or add that token to the model's "
            "generation_config eos_token_id"
        )
    if truncated:
        print(f"warning: {truncated} of {total} training examples are cut at max_seq_length="
              f"{max_length} and teach no stop; raise max_seq_length", flush=True)
    print(f"every complete training example ends with a stop token ({', '.join(names)})",
          flush=True)
    return names


if __name__ == "__main__":
    contract.run(main, SFTStageConfig, job="training")

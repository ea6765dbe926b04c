"""Continued pre-training (training stage): more next-token training of a model on a domain corpus.

In a SageMaker training container: ``python -m steps.cpt`` with hyperparameters.json and the
channels ``train`` (required) and ``validation`` (optional), both `text` records, and ``model``
(optional: an earlier stage's model, used instead of ``base_model``). Locally:
``python -m steps.cpt --base_model builtin:tiny --peft_method lora --extend_vocabulary 100``.

The recipe:
  1. read every document, checked, before the model loads;
  2. load the base model as `peft_method` trains it (4-bit for qlora);
  3. optionally extend the vocabulary with the corpus's frequent words (`extend_vocabulary`);
  4. join the documents with EOS and cut them into blocks of `max_seq_length` tokens;
  5. wrap the model for its PEFT method (none = every weight trains);
  6. measure the validation loss, train with a plain `transformers.Trainer` on the model's own
     loss, measure it again;
  7. save the model (or adapter), the tokenizer and training_summary.json to SM_MODEL_DIR.

Writes metrics.jsonl and loss_curve.png to SM_OUTPUT_DATA_DIR, and resumable checkpoints to the
SageMaker checkpoint folder.
"""

from __future__ import annotations

import transformers
from transformers import PrinterCallback, Trainer, default_data_collator

from steps.common import contract
from steps.common.contract import StageError
from steps.common.lm_data import (
    extend_vocabulary,
    frequent_new_tokens,
    mean_tokens_per_document,
    pack_blocks,
    read_documents,
)
from steps.common.lm_loss import add_memory_light_loss
from steps.common.metrics import log_metrics
from steps.common.models import load_tokenizer, resolve_model_source
from steps.common.peft_methods import (
    apply_peft,
    load_model_for_training,
    save_model,
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
from steps.cpt_config import CPTStageConfig


def main(config: CPTStageConfig) -> None:
    transformers.set_seed(config.seed)
    block_size = config.max_seq_length

    # 1. Data: every record is read and checked before the model loads, so bad data fails fast.
    train_texts = read_documents(contract.channel_dir("train"))
    validation_dir = contract.optional_channel_dir("validation")
    validation_texts = read_documents(validation_dir) if validation_dir else []
    print(f"train: {len(train_texts)} documents, {sum(map(len, train_texts)):,} characters; "
          f"validation: {len(validation_texts)} documents", flush=True)

    # 2. Model: the 'model' channel (an earlier stage's output) wins over base_model.
    source = resolve_model_source(contract.optional_channel_dir("model"), config.base_model)
    precision = prepare_precision(config)
    prepare_sharding(config)  # FSDP across the job's GPUs, or one line saying why not
    print(f"peft_method: {config.peft_method}; {config.learning_rate_line()}", flush=True)
    print(f"loading model {source}", flush=True)
    tokenizer = load_tokenizer(source)
    model = load_model_for_training(source, config, precision)
    # Prompt-learning methods put their virtual tokens before every block.
    positions = block_size + (config.num_virtual_tokens if config.is_prompt_learning else 0)
    max_positions = getattr(model.config, "max_position_embeddings", None)
    if max_positions is not None and positions > max_positions:
        raise StageError(
            f"max_seq_length={block_size}"
            + (f" + num_virtual_tokens={config.num_virtual_tokens}" if positions > block_size
               else "")
            + f" exceeds the {max_positions} positions model {source} was trained for; "
            f"set max_seq_length to at most {max_positions - (positions - block_size)}"
        )

    # 3. Vocabulary: the corpus's frequent words that the base tokenizer splits become tokens.
    new_token_ids: list[int] = []
    vocabulary: dict[str, float] = {}
    if config.extend_vocabulary:
        before = mean_tokens_per_document(train_texts, tokenizer)
        candidates = frequent_new_tokens(train_texts, tokenizer, config.extend_vocabulary)
        tokenizer, new_token_ids = extend_vocabulary(
            model, tokenizer, candidates, config.extend_vocabulary
        )
        after = mean_tokens_per_document(train_texts, tokenizer)
        vocabulary = {
            "vocabulary_added_tokens": len(new_token_ids),
            "vocabulary_size": len(tokenizer),
            "tokens_per_document_before": round(before, 2),
            "tokens_per_document_after": round(after, 2),
            "tokens_per_document_saving": round(1 - after / before, 4),
        }
        shown = ", ".join(repr(t) for t in tokenizer.convert_ids_to_tokens(new_token_ids[:8]))
        print(f"vocabulary: added {len(new_token_ids)} tokens ({shown}, ...); tokens per "
              f"document {before:.1f} -> {after:.1f} ({100 * (1 - after / before):.1f}% fewer)",
              flush=True)

    # 4. Blocks of the (possibly extended) tokenizer's tokens.
    train_blocks = pack_blocks(train_texts, tokenizer, block_size)
    eval_blocks = (
        pack_blocks(validation_texts, tokenizer, block_size, "validation")
        if validation_texts else None
    )
    print(f"{len(train_blocks)} train blocks of {block_size} tokens"
          + (f", {len(eval_blocks)} validation blocks" if eval_blocks else ""), flush=True)

    # 5. PEFT: LoRA/QLoRA also train the new tokens' rows; the rest of the base stays frozen.
    model = apply_peft(model, config, tokenizer, new_token_ids=new_token_ids)
    print(f"next-token loss: {add_memory_light_loss(model)}", flush=True)  # steps.common.lm_loss
    checkpointing = resolve_checkpointing(config, "cpt", model, precision)

    # 6. Train, between two measurements of the validation loss.
    metrics, metrics_path = metrics_callback()
    if vocabulary:
        log_metrics({"step": 0, **vocabulary}, metrics_path)
    trainer = Trainer(
        model=model,
        args=trainer_arguments(config, precision),
        train_dataset=train_blocks,
        eval_dataset=eval_blocks,
        data_collator=default_data_collator,  # full blocks: nothing to pad
        processing_class=tokenizer,
        callbacks=[metrics],
    )
    trainer.remove_callback(PrinterCallback)  # it prints each log as a dict, beside our lines
    eval_loss_before = trainer.evaluate()["eval_loss"] if eval_blocks is not None else None
    report = train(trainer, config, metrics, metrics_path)
    weights = gather_trained_model(trainer.model)  # sharded: the whole weights, for saving
    if not trainer.is_world_process_zero():  # with several processes, one of them saves
        return
    if eval_loss_before is not None:
        print(f"validation loss: {eval_loss_before:.4f} before, {report.eval_loss:.4f} after",
              flush=True)

    # 7. Save, all or nothing: the folder loads on its own (an adapter's base is the one it
    # names, grown to its tokenizer when the vocabulary was extended).
    summary = training_summary(
        "cpt", config, source, precision, report,
        gradient_checkpointing=checkpointing,
        train_documents=len(train_texts),
        train_blocks=len(train_blocks),
        validation_blocks=len(eval_blocks) if eval_blocks else 0,
        eval_loss_before=eval_loss_before,
        new_token_ids=new_token_ids,
        **vocabulary,
    )
    model_dir = contract.model_dir()
    with contract.atomic_output(model_dir) as staging:
        # The new rows of a LoRA run are in the adapter (trainable tokens), so the embedding
        # matrices need not be saved whole.
        save_model(trainer.model, tokenizer, staging, config, save_embedding_layers=False,
                   state_dict=weights)
        save_training_record(staging, summary, started_from=source)
    what = "model" if config.peft_method == "none" else "adapter"
    print(f"saved the {what}, tokenizer and training_summary.json to {model_dir}", flush=True)


if __name__ == "__main__":
    contract.run(main, CPTStageConfig, job="training")

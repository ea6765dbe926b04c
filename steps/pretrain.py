"""Pre-training from scratch (training stage): a tokenizer and a causal LM learnt from a corpus.

In a SageMaker training container: ``python -m steps.pretrain`` with hyperparameters.json and the
channels ``train`` (required) and ``validation`` (optional), both `text` records
(``{"text": "..."}``). Locally: ``python -m steps.pretrain --max_steps 200 --hidden_size 128``.

The recipe:
  1. read every document, checked, before anything is trained;
  2. train a byte-level BPE tokenizer of `vocab_size` tokens on the training documents;
  3. join the documents with EOS and cut them into blocks of `max_seq_length` tokens;
  4. build a Llama-style model of the configured size with random weights;
  5. train it on the next-token loss with a plain `transformers.Trainer` (the model's own loss,
     checkpoints, precision, accumulation and metrics shared with every training stage);
  6. save the model, the tokenizer and training_summary.json to SM_MODEL_DIR, all or nothing.

The defaults make a small model (1.3M parameters) that visibly learns on a 2-core CPU in a couple
of minutes: on the demo corpus (python -m steps.common.demo_data corpus.jsonl --corpus), 4 epochs
take the loss from 8.3 (ln 4096, a uniform guess) to about 4.7, and its samples turn from noise
into the corpus's phrasing. The same stage trains larger models by its knobs on a GPU instance.
"""

from __future__ import annotations

import math

import torch
import transformers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Trainer,
    default_data_collator,
)

from steps.common import contract
from steps.common.lm_data import pack_blocks, read_documents, train_tokenizer
from steps.common.lm_loss import add_memory_light_loss
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
from steps.pretrain_config import PretrainStageConfig


def main(config: PretrainStageConfig) -> None:
    transformers.set_seed(config.seed)
    block_size = config.max_seq_length

    # 1. Data: every record is read and checked before anything is trained.
    train_texts = read_documents(contract.channel_dir("train"))
    validation_dir = contract.optional_channel_dir("validation")
    validation_texts = read_documents(validation_dir) if validation_dir else []
    print(f"train: {len(train_texts)} documents, {sum(map(len, train_texts)):,} characters; "
          f"validation: {len(validation_texts)} documents", flush=True)

    # 2-3. Tokenizer and blocks. Training the tokenizer is deterministic, so a restarted job
    # that resumes from a checkpoint gets the same tokens for the same corpus.
    tokenizer = train_tokenizer(train_texts, config.vocab_size, model_max_length=block_size)
    train_blocks = pack_blocks(train_texts, tokenizer, block_size)
    eval_blocks = (
        pack_blocks(validation_texts, tokenizer, block_size, "validation")
        if validation_texts else None
    )
    characters_per_token = sum(map(len, train_texts)) / (len(train_blocks) * block_size)
    print(f"tokenizer: {len(tokenizer)} tokens, {characters_per_token:.2f} characters a token; "
          f"{len(train_blocks)} train blocks of {block_size} tokens"
          + (f", {len(eval_blocks)} validation blocks" if eval_blocks else ""), flush=True)

    # 4. Model, randomly initialised (transformers.set_seed above makes it the same every run).
    model = _new_model(config, tokenizer)
    print(f"model: Llama-style, {config.num_layers} layers x {config.hidden_size} wide, "
          f"{model.num_parameters():,} parameters", flush=True)
    print(f"next-token loss: {add_memory_light_loss(model)}", flush=True)  # steps.common.lm_loss

    # 5. Train. Blocks are full, so the default collator only stacks them (nothing to pad).
    precision = prepare_precision(config)
    prepare_sharding(config)  # FSDP across the job's GPUs, or one line saying why not
    checkpointing = resolve_checkpointing(config, "pretrain", model, precision)
    metrics, metrics_path = metrics_callback()
    trainer = Trainer(
        model=model,
        args=trainer_arguments(config, precision),
        train_dataset=train_blocks,
        eval_dataset=eval_blocks,
        data_collator=default_data_collator,
        processing_class=tokenizer,
        callbacks=[metrics],
    )
    report = train(trainer, config, metrics, metrics_path)
    weights = gather_trained_model(trainer.model)  # sharded: the whole weights, for saving
    if not trainer.is_world_process_zero():  # with several processes, one of them saves
        return
    sample = _sample(model, tokenizer, (validation_texts or train_texts)[0])
    print(f"sample: {sample!r}", flush=True)

    # 6. Save, all or nothing. There is no base model to compare with: "none" tells evaluation.
    summary = training_summary(
        "pretrain", config, "none", precision, report,
        gradient_checkpointing=checkpointing,
        vocab_size=len(tokenizer),
        train_documents=len(train_texts),
        train_blocks=len(train_blocks),
        validation_blocks=len(eval_blocks) if eval_blocks else 0,
        characters_per_token=round(characters_per_token, 3),
        loss_at_random=round(math.log(len(tokenizer)), 4),
        eval_perplexity=round(math.exp(report.eval_loss), 3) if report.eval_loss else None,
        sample=sample,
    )
    model_dir = contract.model_dir()
    with contract.atomic_output(model_dir) as staging:
        model.save_pretrained(staging, safe_serialization=True, state_dict=weights)
        tokenizer.save_pretrained(staging)
        save_training_record(staging, summary, started_from=None)
    print(f"saved the model, tokenizer and training_summary.json to {model_dir}", flush=True)


def _new_model(config: PretrainStageConfig, tokenizer: PreTrainedTokenizerBase) -> LlamaForCausalLM:
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_hidden_layers=config.num_layers,
            num_attention_heads=config.num_heads,
            num_key_value_heads=config.num_kv_heads,
            max_position_embeddings=config.max_seq_length,
            tie_word_embeddings=config.tie_word_embeddings,
            bos_token_id=None,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    # Generation stops at the end of a document, and at the end of a chat turn once the model is
    # fine-tuned on conversations with the ChatML template its tokenizer carries.
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, end_of_turn]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def _sample(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, document: str) -> str:
    """A greedy continuation of the first words of `document`: a look at what the model learnt."""
    prompt = " ".join(document.split()[:6])
    inputs = tokenizer(prompt, return_tensors="pt").to(model.device)
    model.eval()
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=24, do_sample=False)
    return prompt + tokenizer.decode(output[0, inputs["input_ids"].shape[1]:])


if __name__ == "__main__":
    contract.run(main, PretrainStageConfig, job="training")

"""Direct preference optimisation (training stage): align a model to preference pairs with TRL's
DPOTrainer, no reward model and no sampling.

In a SageMaker training container: ``python -m steps.dpo`` with hyperparameters.json and the
channels ``train`` (required: preference records {prompt?, chosen, rejected}), ``validation``
(optional: held-out pairs) and ``model`` (optional: the model to align, typically SFT's output,
used instead of ``base_model``). Locally:
``python -m steps.dpo --base_model builtin:tiny --peft_method lora --beta 0.1 --max_steps 50``.

DPO minimises, over pairs (x, y_w chosen, y_l rejected),

    -log sigmoid(beta * [(log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))])

(loss_type sigmoid; TRL's other pairwise losses by name), where ref is the model before this
stage. The reference costs no second copy with peft_method lora: it is the policy with its adapter
switched off (or, when the 'model' channel holds SFT's LoRA adapter and training continues it, a
frozen copy of that adapter). For full fine-tuning it is a frozen in-memory copy of the starting
model, passed to the trainer explicitly: TRL would otherwise reload it from the path the model
config names, which is wrong for a model changed or merged in memory.

The recipe:
  1. read and check every pair before the model loads;
  2. load the starting model (see steps.common.preference.load_policy);
  3. measure the held-out pairs: log-probability margin of chosen over rejected, and how often
     the model prefers the chosen response;
  4. train with DPOTrainer; each training line logs reward_chosen, reward_rejected,
     reward_margin and reward_accuracy (DPO's implicit rewards, beta x log-ratio to the
     reference);
  5. measure the held-out pairs again;
  6. save the model or adapter, the tokenizer and training_summary.json to SM_MODEL_DIR.

DPOTrainer computes log-probabilities with TRL's chunked LM head, which no setting turns off. It
is kept: unlike SFT's (steps.sft), replacing it buys nothing here. DPO needs per-token
log-probabilities, not the model's own loss, and computing them from the full logits was measured
no faster (LoRA DPO on SmolLM2-135M, 6 steps of 4 pairs on 2 shared CPU cores: 146 s with TRL's
head against 142 s from the logits in fp32, 91 s against 123 s in bf16).
"""

from __future__ import annotations

import copy

import transformers
from datasets import Dataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from trl import DPOConfig, DPOTrainer

from steps.common import contract
from steps.common.datasets import DatasetFormat, Record
from steps.common.metrics import log_metrics
from steps.common.models import load_tokenizer, resolve_model_source
from steps.common.peft_methods import (
    peft_config,
    save_model,
)
from steps.common.preference import (
    PreferencePair,
    is_peft_model,
    load_policy,
    load_preference_records,
    logprob_margins,
    preference_example,
    preference_pairs,
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
from steps.dpo_config import DPOStageConfig

# DPOTrainer's log entries, as metric names (training lines; eval_... on evaluation).
LOGGED = {"rewards/chosen": "reward_chosen", "rewards/rejected": "reward_rejected",
          "rewards/margins": "reward_margin", "rewards/accuracies": "reward_accuracy",
          "logps/chosen": "logp_chosen", "logps/rejected": "logp_rejected"}




def main(config: DPOStageConfig) -> None:
    transformers.set_seed(config.seed)
    model_dir = contract.model_dir()

    # 1. Data: preference pairs only, every record checked before the model loads.
    train_format, train_records = load_preference_records(contract.channel_dir("train"), "train")
    validation_dir = contract.optional_channel_dir("validation")
    validation_format, validation_records = (
        load_preference_records(validation_dir, "validation") if validation_dir else (None, [])
    )
    print(f"train: {len(train_records)} preference pairs; validation: "
          f"{len(validation_records)} pairs", flush=True)

    # 2. Model: the policy, and what it is measured against.
    source = resolve_model_source(contract.optional_channel_dir("model"), config.base_model)
    precision = prepare_precision(config)
    prepare_sharding(config)  # FSDP across the job's GPUs, or one line saying why not
    print(f"peft_method: {config.peft_method}; beta: {config.beta:g}; loss_type: "
          f"{config.loss_type}; {config.learning_rate_line()}", flush=True)
    print(f"loading model {source}", flush=True)
    tokenizer = load_tokenizer(source)
    policy = load_policy(source, config)
    chat_template = bool(tokenizer.chat_template)
    train_dataset = _trl_dataset(train_records, train_format, chat_template)
    eval_dataset = (_trl_dataset(validation_records, validation_format, chat_template)
                    if validation_records else None)
    held_out = preference_pairs(validation_records or train_records,
                                validation_format or train_format, chat_template)

    # 3. The held-out margins before training: the reference's own.
    before = _measure(policy, tokenizer, held_out, config.per_device_batch_size)

    # 4. Trainer. Three ways to get the reference without reloading it from disk:
    #    - a fresh LoRA adapter (peft_config given to the trainer): the adapter switched off;
    #    - SFT's LoRA adapter, trained further: TRL copies it as a frozen "ref" adapter;
    #    - full fine-tuning: a frozen copy made here, before any weight moves.
    lora = None
    ref_model = None
    if config.peft_method == "lora" and not is_peft_model(policy):
        lora = peft_config(config, policy)
        reference = "the policy with its LoRA adapter disabled (no copy)"
    elif config.peft_method == "lora":
        reference = "a frozen copy of the starting LoRA adapter (adapter-sized)"
    else:
        ref_model = copy.deepcopy(policy).eval().requires_grad_(False)
        reference = "a frozen in-memory copy of the starting model"
    print(f"reference model: {reference}", flush=True)
    checkpointing = resolve_checkpointing(config, "dpo", policy, precision)

    metrics, metrics_path = metrics_callback(LOGGED)
    args = trainer_arguments(
        config, precision, DPOConfig,
        max_length=config.max_seq_length,
        beta=config.beta,
        loss_type=[config.loss_type],
    )
    trainer = DPOTrainer(
        model=policy, ref_model=ref_model, args=args, train_dataset=train_dataset,
        eval_dataset=eval_dataset, processing_class=tokenizer, peft_config=lora,
        callbacks=[metrics],
    )
    model = trainer.model

    # 5. Train (resuming from the latest checkpoint, if a restarted job left one), then measure.
    report = train(trainer, config, metrics, metrics_path)
    weights = gather_trained_model(trainer.model)  # sharded: the whole weights, for saving
    if not trainer.is_world_process_zero():
        return
    if is_peft_model(model) and "ref" in model.peft_config:
        model.delete_adapter("ref")  # TRL's frozen reference copy: not part of the output
    after = _measure(model, tokenizer, held_out, config.per_device_batch_size)
    where = "held-out" if validation_records else "training (no validation channel)"
    print(f"{where} pairs ({len(held_out)}): log-probability margin {before['logprob_margin']:.3f} "
          f"-> {after['logprob_margin']:.3f}; preference accuracy "
          f"{before['preference_accuracy']:.3f} -> {after['preference_accuracy']:.3f}",
          flush=True)
    log_metrics({"step": report.global_step,
                 "preference_accuracy": after["preference_accuracy"],
                 "logprob_margin": after["logprob_margin"],
                 "base_preference_accuracy": before["preference_accuracy"],
                 "base_logprob_margin": before["logprob_margin"]}, metrics_path)

    # 6. Save, all or nothing: the folder must load on its own for evaluation and serving.
    summary = training_summary(
        "dpo", config, source, precision, report,
        gradient_checkpointing=checkpointing,
        data_format="preference",
        train_pairs=len(trainer.train_dataset),
        validation_pairs=len(validation_records),
        reference_model=reference,
        held_out={"pairs": len(held_out), "on": "validation" if validation_records else "train",
                  "measured_in": "fp32", "before": before, "after": after},
    )
    with contract.atomic_output(model_dir) as staging:
        save_model(model, tokenizer, staging, config, state_dict=weights)
        save_training_record(staging, summary, started_from=source)
    what = "adapter" if is_peft_model(model) else "model"
    print(f"saved the {what}, tokenizer and training_summary.json to {model_dir}", flush=True)


def _measure(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
             pairs: list[PreferencePair], batch_size: int) -> dict[str, float]:
    """Mean log-probability margin (chosen - rejected) and the fraction of pairs it is positive."""
    training = model.training
    model.eval()
    margins = logprob_margins(model, tokenizer, pairs, batch_size)
    model.train(training)
    return {"logprob_margin": round(sum(margins) / max(len(margins), 1), 4),
            "preference_accuracy": round(sum(m > 0 for m in margins) / max(len(margins), 1), 4)}


def _trl_dataset(records: list[Record], fmt: DatasetFormat, chat_template: bool) -> Dataset:
    return Dataset.from_list([preference_example(r.data, fmt, chat_template) for r in records])


if __name__ == "__main__":
    contract.run(main, DPOStageConfig, job="training")

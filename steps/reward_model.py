"""Reward model (training stage): a scalar score of a response, learnt from preference pairs.

In a SageMaker training container: ``python -m steps.reward_model`` with hyperparameters.json and
the channels ``train`` (required: preference records {prompt?, chosen, rejected}), ``validation``
(optional: held-out pairs) and ``model`` (optional: the model to start from, typically SFT's
output, used instead of ``base_model``). Locally:
``python -m steps.reward_model --base_model builtin:tiny --peft_method lora --max_steps 50``.

The recipe:
  1. read and check every pair before the model loads;
  2. load the starting causal LM (a LoRA adapter from SFT is merged into its base) and put a
     one-output score head on its backbone: a sequence-classification model whose output at the
     last token is the reward;
  3. train it with TRL's RewardTrainer on the Bradley-Terry loss, -log sigmoid(r(chosen) -
     r(rejected)), the whole model (peft_method none) or LoRA adapters plus the score head (lora);
  4. measure the pairwise accuracy on the held-out pairs: how often r(chosen) > r(rejected);
  5. save a full sequence-classification model (LoRA merged in), its tokenizer and
     training_summary.json to SM_MODEL_DIR.

The output is always a full model, never an adapter: its consumers (PPO's ``reward_model``
channel, evaluation) load it with AutoModelForSequenceClassification, and when the starting model
was itself an adapter merged in memory there would be no base for a reward adapter to name.
Writes metrics.jsonl and loss_curve.png to SM_OUTPUT_DATA_DIR; resumable checkpoints to the
SageMaker checkpoint folder.
"""

from __future__ import annotations

import torch
import transformers
from datasets import Dataset
from transformers import PreTrainedModel
from trl import RewardConfig, RewardTrainer

from steps.common import contract
from steps.common.contract import StageError
from steps.common.datasets import DatasetFormat, Record
from steps.common.metrics import log_metrics
from steps.common.models import load_tokenizer, resolve_model_source
from steps.common.peft_methods import PeftKnobs, peft_config
from steps.common.preference import (
    load_policy,
    load_preference_records,
    preference_example,
    preference_pairs,
    reward_accuracy,
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
from steps.reward_model_config import RewardModelStageConfig

# TRL's RewardTrainer log entries, as metric names (training lines; eval_... on evaluation).
LOGGED = {"accuracy": "reward_accuracy", "margin": "reward_margin",
          "mean_reward": "mean_reward"}




def main(config: RewardModelStageConfig) -> None:
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

    # 2. Model: the starting causal LM's backbone under a one-output score head.
    source = resolve_model_source(contract.optional_channel_dir("model"), config.base_model)
    precision = prepare_precision(config)
    if prepare_sharding(config) and config.peft_method == "lora":  # FSDP, or one line why not
        # The LoRA is merged into the saved model by the first process alone, which a sharded
        # PeftModel cannot do without the others (not run on a GPU here: refused, not risked).
        raise StageError("the reward model stage cannot merge a LoRA trained with sharding fsdp; "
                         "use peft_method none (full fine-tuning shards) or sharding none")
    print(f"peft_method: {config.peft_method}; {config.learning_rate_line()}", flush=True)
    print(f"loading model {source}", flush=True)
    tokenizer = load_tokenizer(source)
    # A reward model is a new model: whatever peft_method trains it, it starts from full weights
    # (a LoRA adapter in the 'model' channel is merged into its base).
    causal_lm = load_policy(source, PeftKnobs(peft_method="none"))
    model = sequence_classifier(causal_lm, tokenizer.pad_token_id)
    if config.peft_method == "lora":
        from peft import get_peft_model

        lora = peft_config(config, model)
        # SEQ_CLS: PEFT keeps the new score head fully trainable and saves it with the adapter.
        lora.task_type, lora.modules_to_save = "SEQ_CLS", ["score"]
        model = get_peft_model(model, lora)

    checkpointing = resolve_checkpointing(config, "reward_model", model, precision)
    chat_template = bool(tokenizer.chat_template)
    train_dataset = _trl_dataset(train_records, train_format, chat_template)
    eval_dataset = (_trl_dataset(validation_records, validation_format, chat_template)
                    if validation_records else None)

    # 3. Trainer: TRL's RewardTrainer (Bradley-Terry loss); costly defaults set in
    # trainer_arguments. RewardTrainer computes rewards from the score head's plain output: no
    # chunked LM head to replace here.
    metrics, metrics_path = metrics_callback(LOGGED)
    args = trainer_arguments(
        config, precision, RewardConfig,
        max_length=config.max_seq_length,
        center_rewards_coefficient=config.center_rewards_coefficient or None,
    )
    trainer = RewardTrainer(
        model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
        processing_class=tokenizer, callbacks=[metrics],
    )
    _report_dropped(train_dataset, trainer.train_dataset, config.max_seq_length, "train")

    # 4. Train (resuming from the latest checkpoint, if a restarted job left one), then measure.
    report = train(trainer, config, metrics, metrics_path)
    weights = gather_trained_model(trainer.model)  # sharded: the whole weights, for saving
    if not trainer.is_world_process_zero():
        return
    reward_model = trainer.model
    if config.peft_method == "lora":
        reward_model = reward_model.merge_and_unload()  # the score head's trained copy included
    reward_model.eval()
    held_out = validation_records or train_records
    pairs = preference_pairs(held_out, validation_format or train_format, chat_template)
    accuracy, margin = reward_accuracy(reward_model, tokenizer, pairs, config.per_device_batch_size)
    where = "held-out" if validation_records else "training (no validation channel)"
    print(f"pairwise accuracy on {len(pairs)} {where} pairs: {accuracy:.3f}; mean reward margin "
          f"{margin:.3f}", flush=True)
    log_metrics({"step": report.global_step, "pairwise_accuracy": round(accuracy, 4),
                 "pairwise_reward_margin": round(margin, 4)}, metrics_path)

    # 5. Save, all or nothing: a full sequence-classification model that loads on its own.
    summary = training_summary(
        "reward_model", config, source, precision, report,
        gradient_checkpointing=checkpointing,
        data_format="preference",
        train_pairs=len(trainer.train_dataset),
        validation_pairs=len(validation_records),
        pairwise_accuracy=accuracy,
        pairwise_accuracy_on="validation" if validation_records else "train",
        reward_margin=margin,
    )
    with contract.atomic_output(model_dir) as staging:
        reward_model.save_pretrained(staging, safe_serialization=True, state_dict=weights)
        tokenizer.save_pretrained(staging)
        save_training_record(staging, summary, started_from=source)
    print(f"saved the reward model (sequence classification, 1 output), tokenizer and "
          f"training_summary.json to {model_dir}", flush=True)


def sequence_classifier(causal_lm: PreTrainedModel, pad_token_id: int) -> PreTrainedModel:
    """A one-output sequence-classification model over `causal_lm`'s backbone.

    Built in memory from the causal LM's config, its backbone weights copied in (the LM head is
    dropped) and a new score head initialised as transformers initialises it; the score of a
    sequence is the head's output at its last token that is not padding. (TRL builds the same
    thing from a folder; in memory it works for builtin models and merged adapters too.)
    """
    from transformers import AutoModelForSequenceClassification

    config = causal_lm.config
    config.num_labels = 1
    config.pad_token_id = pad_token_id  # the model finds each sequence's last token by it
    try:
        classifier = AutoModelForSequenceClassification.from_config(config, dtype=torch.float32)
    except ValueError as err:
        raise StageError(
            f"model type '{config.model_type}' has no sequence-classification class in "
            f"transformers, so it cannot be a reward model ({str(err).splitlines()[0]})"
        ) from None
    classifier.base_model.load_state_dict(causal_lm.base_model.state_dict())
    classifier.name_or_path = causal_lm.name_or_path
    return classifier


def _trl_dataset(records: list[Record], fmt: DatasetFormat, chat_template: bool) -> Dataset:
    return Dataset.from_list([preference_example(r.data, fmt, chat_template) for r in records])


def _report_dropped(before: Dataset, after: Dataset, max_length: int, split: str) -> None:
    # RewardTrainer silently drops pairs longer than max_length: say so, and refuse to train on
    # nothing.
    dropped = len(before) - len(after)
    if dropped and not len(after):
        raise StageError(
            f"every {split} pair is longer than max_seq_length={max_length} tokens; raise "
            "max_seq_length"
        )
    if dropped:
        print(f"warning: {dropped} of {len(before)} {split} pairs are longer than "
              f"max_seq_length={max_length} tokens and are left out", flush=True)


if __name__ == "__main__":
    contract.run(main, RewardModelStageConfig, job="training")

"""Preference pairs, shared by the alignment stages (reward model, DPO, PPO) and by evaluation.

Reading: preference records become TRL examples by the rule SFT follows (steps.common.datasets.
sft_example): with a chat template, a string prompt and its responses become a one-turn
conversation, so every stage reads the same text the same way and a model aligned after SFT is
aligned in the format it is prompted with.

Measuring a policy (`logprob_margins`, `preference_accuracy`): the summed log-probability of each
response given its prompt, tokenized as TRL's DPOTrainer tokenizes it, chosen against rejected.
DPO raises exactly this margin relative to its reference; a policy "prefers" the chosen response
of a pair when its margin is positive.

Measuring with a reward model (`load_reward_model`, `reward_scores`, `reward_accuracy`): a
sequence-classification model with one output (steps.reward_model writes one) scores a prompt and
a response rendered as TRL's RewardTrainer renders them in training.

Measuring against a reference (`sequence_kl`) and between two policies (`win_rate`, judged by a
reward model), as evaluation compares a tuned model with its base.

`load_policy` loads the model an alignment stage starts from, the output of SFT included (a LoRA
adapter); `load_prompts` reads the prompts of any TRL format, for PPO's rollouts.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError

from steps.common import contract, models
from steps.common.contract import StageError
from steps.common.datasets import (
    DatasetFormat,
    Record,
    distinct_prompts,
    load_records,
    read_prompts,
)
from steps.common.knobs import ALIGNMENT_PEFT_METHODS

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from steps.common.peft_methods import PeftKnobs


@dataclass(frozen=True)
class PreferencePair:
    """One pair in TRL's explicit-prompt shape: strings, or lists of messages (conversational)."""

    prompt: Any
    chosen: Any
    rejected: Any


# --- Reading --------------------------------------------------------------------------------------


def load_preference_records(path: Path, channel: str) -> tuple[DatasetFormat, list[Record]]:
    """Every record at `path`, checked, which must be preference records ({prompt?, chosen,
    rejected}); otherwise one StageError line naming the channel, file and format found."""
    fmt, records = load_records(path)
    if fmt.name != "preference":
        raise StageError(
            f"{records[0].location}: the '{channel}' data is {fmt.name} records, but this stage "
            "trains on preference pairs: give records with 'chosen' and 'rejected' (and 'prompt')"
        )
    return fmt, records


def preference_example(data: dict[str, Any], fmt: DatasetFormat, chat_template: bool) -> dict:
    """The record as TRL's preference trainers take it.

    With a chat template, string prompts and responses become a user turn and assistant turns
    (the rule SFT follows); an implicit-prompt string pair stays as it is, since there is no
    telling where its prompt ends (TRL splits it at the longest common prefix).
    """
    if fmt.conversational and not chat_template:
        raise StageError(
            "the preference data is conversational but the model's tokenizer has no chat "
            "template; use a chat model or give prompt/chosen/rejected as strings"
        )
    example = {key: data[key] for key in ("prompt", "chosen", "rejected") if key in data}
    if not fmt.conversational and chat_template and "prompt" in example:
        example = {
            "prompt": [{"role": "user", "content": example["prompt"]}],
            "chosen": [{"role": "assistant", "content": example["chosen"]}],
            "rejected": [{"role": "assistant", "content": example["rejected"]}],
        }
    return example


def preference_pairs(records: list[Record], fmt: DatasetFormat,
                     chat_template: bool) -> list[PreferencePair]:
    """The records as explicit-prompt pairs (an implicit prompt is split off as TRL splits it)."""
    from trl.data_utils import extract_prompt

    pairs = []
    for record in records:
        example = preference_example(record.data, fmt, chat_template)
        if "prompt" not in example:
            example = extract_prompt(example)
        pairs.append(PreferencePair(example["prompt"], example["chosen"], example["rejected"]))
    return pairs


# --- The model an alignment stage starts from -----------------------------------------------------


def load_policy(source: str, knobs: PeftKnobs) -> PreTrainedModel:
    """The causal LM to align, from `source` (the `model` channel or base_model).

    - A full model: as it is (peft_method lora wraps it later; its reference is then the same
      weights with the adapter disabled).
    - A LoRA adapter, typically SFT's output, with peft_method lora: the adapter over its base,
      trainable, so alignment continues the SFT adapter and saves an adapter over the same base.
    - A LoRA adapter with peft_method none: merged into its base, a full model to tune.
    - Any other adapter (prompt tuning, prefix tuning): refused, there are no weights to merge.
    """
    if knobs.peft_method not in ALIGNMENT_PEFT_METHODS:
        raise StageError(
            f"peft_method '{knobs.peft_method}' is not supported by the alignment stages; use "
            f"{' or '.join(ALIGNMENT_PEFT_METHODS)}"
        )
    folder = None if source in (models.TINY, models.SMOLLM2) else models.local_model_folder(source)
    adapter_config = folder / "adapter_config.json" if folder is not None else None
    if adapter_config is None or not adapter_config.exists():
        return models.load_model(source)
    peft_type = json.loads(adapter_config.read_text()).get("peft_type")
    if peft_type != "LORA":
        raise StageError(
            f"model {source} is a {peft_type} adapter, which cannot be aligned further or merged; "
            "give the stage a full model or a LoRA adapter"
        )
    if knobs.peft_method == "none":
        print(f"model {source} is a LoRA adapter: merged into its base for full fine-tuning",
              flush=True)
        return models.load_model(source).merge_and_unload()
    print(f"model {source} is a LoRA adapter: training continues it (with its own lora_r, "
          "lora_alpha and target modules)", flush=True)
    return models.load_model(source, trainable_adapter=True)


def is_peft_model(model: torch.nn.Module) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "disable_adapter")


# --- Measuring a policy ---------------------------------------------------------------------------


def _render(tokenizer: PreTrainedTokenizerBase, messages_or_text: Any,
            add_generation_prompt: bool = False) -> list[int]:
    # Exactly how TRL's trainers tokenize (trl.data_utils._tokenize): the chat template for
    # messages, the tokenizer's own call (its special tokens included) for text.
    if isinstance(messages_or_text, list):
        return tokenizer.apply_chat_template(
            messages_or_text, tokenize=True, return_dict=True,
            add_generation_prompt=add_generation_prompt,
        )["input_ids"]
    return tokenizer(text=messages_or_text)["input_ids"]


def completion_tokens(tokenizer: PreTrainedTokenizerBase, prompt: Any,
                      completion: Any) -> tuple[list[int], int]:
    """(prompt + completion token ids, index of the first completion token), as DPOTrainer builds
    them: string completions end with EOS; the completion starts where the tokenized prompt and
    prompt + completion diverge (tokens can merge across the boundary)."""
    if isinstance(prompt, list):
        if isinstance(completion, str):  # a generated answer to a conversation
            completion = [{"role": "assistant", "content": completion}]
        prompt_ids = _render(tokenizer, prompt, add_generation_prompt=True)
        full_ids = _render(tokenizer, prompt + completion)
    else:
        if not completion.endswith(tokenizer.eos_token):
            completion = completion + tokenizer.eos_token
        prompt_ids, full_ids = _render(tokenizer, prompt), _render(tokenizer, prompt + completion)
    start = 0
    while start < min(len(prompt_ids), len(full_ids)) and prompt_ids[start] == full_ids[start]:
        start += 1
    return full_ids, start


@torch.no_grad()
def completion_logprobs(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                        prompts: Sequence[Any], completions: Sequence[Any],
                        batch_size: int = 8) -> list[float]:
    """log p(completion | prompt) under `model`, summed over the completion's tokens."""
    device = next(model.parameters()).device
    encoded = [completion_tokens(tokenizer, p, c) for p, c in zip(prompts, completions)]
    results = []
    for first in range(0, len(encoded), batch_size):
        batch = encoded[first:first + batch_size]
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.full((len(batch), width), tokenizer.pad_token_id, device=device)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long, device=device)
        scored = torch.zeros((len(batch), width), dtype=torch.bool, device=device)
        for row, (ids, start) in enumerate(batch):
            input_ids[row, :len(ids)] = torch.tensor(ids, device=device)
            attention_mask[row, :len(ids)] = 1
            scored[row, start:len(ids)] = True
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
        logits = logits[:, -width:]  # prompt-learning adapters prepend virtual tokens
        # Token t is predicted from the logits at t - 1.
        token_logprobs = logits[:, :-1].log_softmax(-1).gather(-1, input_ids[:, 1:, None])[..., 0]
        results += (token_logprobs * scored[:, 1:]).sum(-1).tolist()
    return results


def logprob_margins(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                    pairs: Sequence[PreferencePair], batch_size: int = 8) -> list[float]:
    """log p(chosen | prompt) - log p(rejected | prompt) per pair: positive where the model prefers
    the chosen response. DPO's implicit reward margin is beta x (policy's - reference's)."""
    prompts = [pair.prompt for pair in pairs]
    chosen = completion_logprobs(model, tokenizer, prompts, [p.chosen for p in pairs], batch_size)
    rejected = completion_logprobs(
        model, tokenizer, prompts, [p.rejected for p in pairs], batch_size
    )
    return [c - r for c, r in zip(chosen, rejected)]


def preference_accuracy(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                        pairs: Sequence[PreferencePair], batch_size: int = 8) -> float:
    """The fraction of pairs whose chosen response the model finds more likely than the rejected."""
    margins = logprob_margins(model, tokenizer, pairs, batch_size)
    return sum(margin > 0 for margin in margins) / max(len(margins), 1)


def sequence_kl(policy: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                prompts: Sequence[Any], responses: Sequence[Any],
                reference: PreTrainedModel | None = None, batch_size: int = 8) -> list[float]:
    """log pi(y | x) - log ref(y | x) per response, summed over its tokens. With the responses
    sampled from the policy, the mean estimates KL(pi || ref), the divergence PPO penalises.
    `reference` None: the policy with its adapter disabled (a LoRA policy's base)."""
    tuned = completion_logprobs(policy, tokenizer, prompts, responses, batch_size)
    if reference is None:
        with policy.disable_adapter():
            base = completion_logprobs(policy, tokenizer, prompts, responses, batch_size)
    else:
        base = completion_logprobs(reference, tokenizer, prompts, responses, batch_size)
    return [t - b for t, b in zip(tuned, base)]


# --- Measuring with a reward model ----------------------------------------------------------------


def load_reward_model(spec: str, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """The reward model in `spec` (a folder or model.tar.gz that steps.reward_model wrote): a
    sequence-classification model with one output. Anything else is refused: loading a causal LM
    as a classifier would silently put a random score head on it."""
    from transformers import AutoModelForSequenceClassification

    folder = models.local_model_folder(spec)
    if folder is None:
        raise StageError(f"reward model '{spec}' is not a local folder or model.tar.gz")
    if (folder / "adapter_config.json").exists():
        raise StageError(
            f"reward model {spec} is a PEFT adapter; give the full sequence-classification model "
            "that steps.reward_model saves"
        )
    config_path = folder / "config.json"
    if not config_path.exists():
        raise StageError(f"reward model folder {folder} has no config.json")
    config = json.loads(config_path.read_text())
    architectures = config.get("architectures") or []
    if not any(name.endswith("ForSequenceClassification") for name in architectures):
        raise StageError(
            f"{folder} holds a {', '.join(architectures) or 'model'}, not a reward model (a "
            "sequence-classification model); train one with python -m steps.reward_model"
        )
    if config.get("num_labels", len(config.get("id2label") or {0: 0})) != 1:
        raise StageError(f"reward model {folder} has more than one output; a reward is one score")
    # The loading policy every model follows (steps.common.models): safetensors unless the stage
    # opted in to pickle weights, no remote code unless opted in.
    models.refuse_remote_code(folder)
    pickled = models.check_weights(folder, [], kind="reward model")
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            folder, dtype=dtype, use_safetensors=not pickled,
            trust_remote_code=contract.load_policy().trust_remote_code,
        )
    except (OSError, SafetensorError) as exc:  # a truncated or corrupt weights file
        raise StageError(f"could not load reward model folder {folder}: "
                         f"{' '.join(str(exc).split())[:300]}; is a weights file truncated or "
                         "corrupt?") from None
    return model.eval()


def reward_inputs(tokenizer: PreTrainedTokenizerBase, prompt: Any, response: Any) -> list[int]:
    """The tokens a reward model scores for `response` to `prompt`, as RewardTrainer renders a
    pair in training: the whole conversation through the chat template, or text + EOS."""
    if isinstance(prompt, list):
        if isinstance(response, str):
            response = [{"role": "assistant", "content": response}]
        return _render(tokenizer, prompt + response)
    if not response.endswith(tokenizer.eos_token):
        response = response + tokenizer.eos_token
    return _render(tokenizer, prompt + response)


@torch.no_grad()
def reward_scores(reward_model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                  prompts: Sequence[Any], responses: Sequence[Any],
                  batch_size: int = 8) -> list[float]:
    """The reward model's score of each response to its prompt."""
    device = next(reward_model.parameters()).device
    encoded = [reward_inputs(tokenizer, p, r) for p, r in zip(prompts, responses)]
    scores: list[float] = []
    for first in range(0, len(encoded), batch_size):
        batch = encoded[first:first + batch_size]
        scores += _score_token_ids(reward_model, batch, tokenizer.pad_token_id, device).tolist()
    return scores


def _score_token_ids(reward_model: PreTrainedModel, sequences: list[list[int]], pad_token_id: int,
                    device: torch.device) -> torch.Tensor:
    """Scores of unpadded token sequences, right-padded as in RewardTrainer (the model scores the
    last token that is not padding)."""
    width = max(len(ids) for ids in sequences)
    input_ids = torch.full((len(sequences), width), pad_token_id, device=device)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long, device=device)
    for row, ids in enumerate(sequences):
        input_ids[row, :len(ids)] = torch.tensor(ids, device=device)
        attention_mask[row, :len(ids)] = 1
    return reward_model(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0].float()


def reward_accuracy(reward_model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                    pairs: Sequence[PreferencePair], batch_size: int = 8) -> tuple[float, float]:
    """(pairwise accuracy, mean margin): how often the reward model scores the chosen response
    above the rejected one, and by how much on average."""
    prompts = [pair.prompt for pair in pairs]
    chosen = reward_scores(reward_model, tokenizer, prompts, [p.chosen for p in pairs], batch_size)
    rejected = reward_scores(
        reward_model, tokenizer, prompts, [p.rejected for p in pairs], batch_size
    )
    margins = [c - r for c, r in zip(chosen, rejected)]
    count = max(len(margins), 1)
    return sum(m > 0 for m in margins) / count, sum(margins) / count


def win_rate(reward_model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
             prompts: Sequence[Any], responses: Sequence[Any], other_responses: Sequence[Any],
             batch_size: int = 8) -> float:
    """How often the reward model prefers `responses` to `other_responses` to the same prompts
    (a tie counts half): the tuned model's answers against the base model's, say."""
    ours = reward_scores(reward_model, tokenizer, prompts, responses, batch_size)
    theirs = reward_scores(reward_model, tokenizer, prompts, other_responses, batch_size)
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(ours, theirs))
    return wins / max(len(ours), 1)


# --- Prompts, for the stages that sample responses (PPO) ------------------------------------------


def load_prompts(path: Path, chat_template: bool) -> list[Any]:
    """The distinct prompts of the data at `path` (steps.common.datasets.read_prompts: any format
    with prompts), in order, in the shape a policy is prompted with: with a chat template a string
    prompt becomes a user turn, as in training."""
    fmt, prompts = read_prompts(path)
    if fmt.conversational and not chat_template:
        raise StageError("the prompts are conversational but the model's tokenizer has no chat "
                         "template; use a chat model or give the prompts as strings")
    distinct = distinct_prompts(prompts)
    if chat_template:
        distinct = [[{"role": "user", "content": p}] if isinstance(p, str) else p for p in distinct]
    return distinct

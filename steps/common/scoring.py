"""Scoring a causal language model on held-out data, shared by the stages that measure one
(steps.evaluate, steps.quantize) and those that watch one train (steps.ppo):

- the loss on the tokens SFT trains on (`example_losses`, labelled by steps.common.labels) and its
  perplexity;
- greedy answers that stop at the model's stop tokens (`generate_answers`), and how they compare
  with reference answers (`rouge_l`, `exact_match`);
- the exact KL between a tuned model and its base over the answers it generated (`answer_kl`);
- what a model is given and what it should answer in an SFT example (`prompt_and_completion`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from rouge_score import rouge_scorer
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from steps.common.datasets import turns_before_answer
from steps.common.labels import sft_tokens_and_labels, trains_a_token
from steps.common.models import stop_token_ids

# --- Loss -----------------------------------------------------------------------------------------


def example_losses(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: list[dict[str, Any]],
    batch_size: int,
    max_seq_length: int,
) -> list[tuple[float, int, int]]:
    """(summed token loss, token count, byte count) per example, over the tokens SFT trains on
    (steps.common.labels: TRL's labels), so that this is the loss training minimised."""
    tokenized = [sft_tokens_and_labels(example, tokenizer, max_seq_length) for example in examples]
    tokenized = [(ids, labels) for ids, labels in tokenized if trains_a_token(labels)]
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id
    results = []
    for start in range(0, len(tokenized), batch_size):
        batch = tokenized[start : start + batch_size]
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.tensor(
            [ids + [pad_id] * (width - len(ids)) for ids, _ in batch], device=device
        )
        labels = torch.tensor(
            [lab + [-100] * (width - len(lab)) for _, lab in batch], device=device
        )
        attention_mask = torch.tensor(
            [[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in batch], device=device
        )
        with torch.no_grad():
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
        # A prompt-tuning or p-tuning adapter prepends its virtual tokens, and their logits.
        logits = logits[:, -input_ids.shape[1] :]
        # Token t is predicted from the logits at t-1. One row per token: over the vocabulary
        # laid out as the logits are (a transposed view took 3-10x as long at vocab 4096).
        predicting = logits[:, :-1]
        token_loss = torch.nn.functional.cross_entropy(
            predicting.reshape(-1, predicting.shape[-1]), labels[:, 1:].reshape(-1),
            ignore_index=-100, reduction="none",
        ).view(labels.shape[0], -1)
        counted = labels[:, 1:] != -100
        for row, (_, row_labels) in enumerate(batch):
            scored = [label for label in row_labels[1:] if label != -100]
            size = len(tokenizer.decode(scored).encode("utf-8"))
            results.append(
                (token_loss[row][counted[row]].sum().item(), int(counted[row].sum()), size)
            )
        print(
            f"  loss batch {start // batch_size + 1}/{math.ceil(len(tokenized) / batch_size)}",
            flush=True,
        )
    return results


# --- Generation -----------------------------------------------------------------------------------


def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[Any],
    max_new_tokens: int,
    batch_size: int,
) -> list[str]:
    """Greedy answers to `prompts` (message lists get the chat template's generation prompt)."""
    return generate_answers(model, tokenizer, prompts, max_new_tokens, batch_size)[0]


def generate_answers(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[Any],
    max_new_tokens: int,
    batch_size: int,
) -> tuple[list[str], list[bool], list[tuple[list[int], list[int]]]]:
    """Greedy answers to `prompts`, whether each ended with a stop token (`stop_token_ids`) within
    `max_new_tokens` rather than being cut off there, and each (prompt, answer) as token ids (the
    answer up to and including its stop token), for scoring the very tokens generated."""
    stops = stop_token_ids(model, tokenizer)
    texts = [
        tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
        if isinstance(p, list)
        else p
        for p in prompts
    ]
    device = next(model.parameters()).device
    answers, stopped, token_ids = [], [], []
    # Pad on the left, so that every prompt in a batch ends where generation continues.
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(
                texts[start : start + batch_size],
                add_special_tokens=False,
                padding=True,
                return_tensors="pt",
            ).to(device)
            with torch.no_grad():
                output = model.generate(
                    **batch,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    eos_token_id=stops,
                    pad_token_id=tokenizer.pad_token_id,
                )
            new_tokens = output[:, batch["input_ids"].shape[1] :]
            answers += [
                text.strip()
                for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
            ]
            # Generation ends a row at its first stop token; rows that did not stop are full.
            is_stop = torch.isin(new_tokens, torch.tensor(stops, device=device))
            stopped += is_stop.any(-1).tolist()
            for row in range(new_tokens.shape[0]):
                prompt_ids = batch["input_ids"][row][batch["attention_mask"][row].bool()].tolist()
                end = int(is_stop[row].int().argmax()) + 1 if is_stop[row].any() else None
                token_ids.append((prompt_ids, new_tokens[row][:end].tolist()))
            batches = math.ceil(len(texts) / batch_size)
            print(f"  generation batch {start // batch_size + 1}/{batches}", flush=True)
    finally:
        tokenizer.padding_side = padding_side
    return answers, stopped, token_ids


@torch.no_grad()
def answer_kl(
    model: PreTrainedModel,
    sequences: list[tuple[list[int], list[int]]],
    pad_token_id: int,
    batch_size: int,
    reference: PreTrainedModel | None = None,
) -> list[float]:
    """Per (prompt, answer) token ids: the sum over the answer's tokens of the exact
    KL(model(. | context) || reference(. | context)) between the two next-token distributions.

    Always >= 0 and 0 only where the two models agree; it scores the tokens generated, so no
    decode/re-encode round trip changes them. `reference` None: `model` with its adapter switched
    off (a LoRA model's base). Written here because neither TRL nor transformers has it for a
    model pair outside a trainer.
    """
    device = next(model.parameters()).device
    results: list[float] = []
    for first in range(0, len(sequences), batch_size):
        batch = sequences[first:first + batch_size]
        width = max(len(p) + len(a) for p, a in batch)
        input_ids = torch.full((len(batch), width), pad_token_id, device=device)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long, device=device)
        scored = torch.zeros((len(batch), width), dtype=torch.bool, device=device)
        for row, (prompt, answer) in enumerate(batch):
            input_ids[row, :len(prompt) + len(answer)] = torch.tensor(prompt + answer)
            attention_mask[row, :len(prompt) + len(answer)] = 1
            # The distributions that predicted each answer token: positions P-1 .. P+T-2.
            scored[row, max(len(prompt) - 1, 0):len(prompt) + len(answer) - 1] = True
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        # Prompt-learning adapters prepend virtual tokens: keep the last `width` positions.
        tuned = model(**inputs).logits[:, -width:].float().log_softmax(-1)
        if reference is None:
            with model.disable_adapter():
                base = model(**inputs).logits[:, -width:].float().log_softmax(-1)
        else:
            base = reference(**inputs).logits[:, -width:].float().log_softmax(-1)
        kl = (tuned.exp() * (tuned - base)).sum(-1).clamp_min(0)  # rounding can dip below 0
        results += (kl * scored).sum(-1).tolist()
    return results



# --- Answers against references -------------------------------------------------------------------


def rouge_l(references: list[str], answers: list[str]) -> list[float]:
    """Per answer, the ROUGE-L F-measure against its reference (rouge-score's, no stemming)."""
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    return [scorer.score(ref, answer)["rougeL"].fmeasure
            for ref, answer in zip(references, answers)]


def exact_match(references: list[str], answers: list[str]) -> list[float]:
    """Per answer, 1.0 where it is its reference up to capitals and spacing, else 0.0."""
    return [float(_normalise(ref) == _normalise(answer))
            for ref, answer in zip(references, answers)]


def mean_loss(losses: list[tuple[float, int, int]]) -> float:
    """The mean token loss of `example_losses`' results: over all scored tokens, not examples."""
    return sum(total for total, _, _ in losses) / max(sum(count for _, count, _ in losses), 1)


def perplexity(loss: float) -> float:
    """exp(loss), capped: a diverged model's loss must not overflow a report."""
    return math.exp(min(loss, 700.0))


# --- SFT examples as prompts and answers ----------------------------------------------------------


def prompt_and_completion(example: dict[str, Any]) -> tuple[Any, Any] | None:
    """What the model is given and what it should answer; None for text with no prompt."""
    if "prompt" in example:
        return example["prompt"], example["completion"]
    if "messages" in example:  # the last answer, to the turns before it
        prompt = turns_before_answer(example["messages"])
        return (prompt, [example["messages"][len(prompt)]]) if prompt else None
    return None


def response_text(completion: Any) -> str:
    """A completion as the text of its answer (the assistant turns of a message list)."""
    if isinstance(completion, list):
        return "\n".join(m["content"] for m in completion if m["role"] == "assistant")
    return completion


def _normalise(text: str) -> str:
    return " ".join(text.lower().split())

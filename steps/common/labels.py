"""What SFT trains on in an example: its tokens and which of them carry loss, as TRL's SFTTrainer
builds them. Every stage that scores or distils "the loss training minimised" labels with this one
function (Evaluate's and Quantize's losses, the teacher's logits, the distilled student), so that a
number measured after training is over the very tokens training counted.

TRL (1.16) builds labels only inside `SFTTrainer._prepare_dataset`; its pieces are used here as
they are (`trl.data_utils._tokenize`, the dispatch between the chat template and the tokenizer,
and `common_prefix_length`) and the few lines that glue them are TRL's rules, restated:

- text: EOS is appended unless the text ends with it; the tokenizer adds its special tokens (a BOS
  for tokenizers that have one); every token trains.
- messages: the chat template renders the conversation; with `{% generation %}` markers only the
  assistant turns train (`assistant_only_loss`, as steps.sft sets it), else every token.
- prompt + completion: a string completion gets EOS; the completion starts where the tokenized
  prompt (with the generation prompt, for messages) and prompt + completion diverge, and trains.

tests/steps/test_labels.py holds this to TRL's own `SFTTrainer` on every format.
"""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedTokenizerBase
from trl.chat_template_utils import has_generation_markers
from trl.data_utils import _tokenize, common_prefix_length

IGNORE = -100  # the label of a token that carries no loss (PyTorch's cross-entropy ignore_index)


def sft_tokens_and_labels(
    example: dict[str, Any], tokenizer: PreTrainedTokenizerBase, max_length: int | None = None
) -> tuple[list[int], list[int]]:
    """The token ids of an SFT example (steps.common.datasets.sft_example's text, messages or
    prompt + completion) and its labels (IGNORE where no loss), cut at `max_length` from the end
    as TRL truncates (keep_start)."""
    eos = tokenizer.eos_token
    if "text" in example:
        text = example["text"] if example["text"].endswith(eos) else example["text"] + eos
        ids = list(_tokenize(tokenizer, text)["input_ids"])
        labels = list(ids)
    elif "messages" in example:
        # steps.sft trains assistant turns only when the chat template marks them.
        assistant_only = has_generation_markers(tokenizer.chat_template or "")
        out = _tokenize(tokenizer, example["messages"],
                        return_assistant_tokens_mask=assistant_only)
        ids = list(out["input_ids"])
        masks = out["assistant_masks"] if assistant_only else [1] * len(ids)
        labels = [token if mask else IGNORE for token, mask in zip(ids, masks)]
    else:
        prompt, completion = example["prompt"], example["completion"]
        if isinstance(prompt, list):
            prompt_ids = _tokenize(tokenizer, prompt, add_generation_prompt=True)["input_ids"]
        else:
            completion = completion if completion.endswith(eos) else completion + eos
            prompt_ids = _tokenize(tokenizer, prompt)["input_ids"]
        ids = list(_tokenize(tokenizer, prompt + completion)["input_ids"])
        shared = common_prefix_length(list(prompt_ids), ids)
        labels = [IGNORE] * shared + ids[shared:]
    if max_length is not None:
        ids, labels = ids[:max_length], labels[:max_length]
    return ids, labels


def trains_a_token(labels: list[int]) -> bool:
    """Whether a next-token loss counts any token: the first label has no prediction before it."""
    return any(label != IGNORE for label in labels[1:])

"""The labels every scoring stage uses are the ones TRL's SFTTrainer trains and evaluates on, as
steps.sft builds it, on every dataset format, with and without a BOS token."""

import pytest
from datasets import Dataset

from steps import sft
from steps.common import models
from steps.common.labels import IGNORE, sft_tokens_and_labels

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"},
    {"role": "user", "content": "Count to 2."}, {"role": "assistant", "content": "1 2"},
]
EXAMPLES = {
    "text": {"text": "The sea is blue."},
    "text ending with EOS": {"text": "The sea is blue.<|im_end|>"},
    "messages": {"messages": CONVERSATION},
    "prompt and completion": {"prompt": "Count to 3.", "completion": " 1 2 3"},
    "conversational prompt and completion": {
        "prompt": CONVERSATION[:4], "completion": [{"role": "assistant", "content": "1 2"}]},
}


def _tokenizer(bos: bool, chat_template: str | None = "chatml"):
    tokenizer = models.load_tokenizer(models.TINY)
    if bos:  # a Llama-style tokenizer: BOS before every encoded text, and in the chat template
        tokenizer.bos_token, tokenizer.add_bos_token = "<|endoftext|>", True
        tokenizer.update_post_processor()
        tokenizer.chat_template = "{{- bos_token }}" + tokenizer.chat_template
    if chat_template is None:
        tokenizer.chat_template = None
    return tokenizer


def _trl_rows(example: dict, tokenizer, max_length: int) -> tuple[dict, dict]:
    """The example as SFT's TRL trainer prepares it for training and for its evaluation."""
    config = sft.SFTStageConfig(base_model=models.TINY, checkpoint_steps=0,
                                max_seq_length=max_length)
    dataset = Dataset.from_list([example])
    trainer = sft.sft_trainer(config, "fp32", models.load_model(models.TINY), tokenizer,
                              dataset, dataset)
    return trainer.train_dataset[0], trainer.eval_dataset[0]


@pytest.mark.parametrize("bos", [False, True], ids=["no BOS", "BOS"])
@pytest.mark.parametrize("name", EXAMPLES)
def test_labels_equal_those_trl_trains_and_evaluates_sft_on(name, bos):
    tokenizer = _tokenizer(bos)
    train, evaluation = _trl_rows(EXAMPLES[name], tokenizer, 512)

    ids, labels = sft_tokens_and_labels(EXAMPLES[name], tokenizer, 512)

    assert (ids, labels) == (train["input_ids"], train["labels"])
    assert (ids, labels) == (evaluation["input_ids"], evaluation["labels"])
    assert (ids[0] == tokenizer.bos_token_id) is bos


def test_assistant_only_loss_scores_every_assistant_turn_and_not_the_newline_after_it():
    tokenizer = _tokenizer(bos=False)

    ids, labels = sft_tokens_and_labels(EXAMPLES["messages"], tokenizer)

    trained = tokenizer.decode([label for label in labels if label != IGNORE])
    assert trained == "Yo<|im_end|>1 2<|im_end|>"
    assert tokenizer.decode(ids).endswith("1 2<|im_end|>\n")


def test_plain_text_without_a_chat_template_trains_every_token_and_its_eos():
    tokenizer = _tokenizer(bos=False, chat_template=None)
    train, _ = _trl_rows(EXAMPLES["prompt and completion"], tokenizer, 512)

    ids, labels = sft_tokens_and_labels(EXAMPLES["prompt and completion"], tokenizer)

    assert (ids, labels) == (train["input_ids"], train["labels"])
    assert tokenizer.decode([label for label in labels if label != IGNORE]) == " 1 2 3<|im_end|>"


def test_a_long_example_is_cut_at_max_length_as_trl_cuts_it():
    tokenizer = _tokenizer(bos=True)
    train, _ = _trl_rows(EXAMPLES["messages"], tokenizer, 45)

    ids, labels = sft_tokens_and_labels(EXAMPLES["messages"], tokenizer, 45)

    assert len(ids) == 45
    assert (ids, labels) == (train["input_ids"], train["labels"])
    assert tokenizer.decode([label for label in labels if label != IGNORE]) == "Yo<|im_end|>"

"""Language-modelling data: tokenizer training, packing into blocks, vocabulary extension."""

import pytest
import torch
from transformers import AutoTokenizer

from steps.common import lm_data, models
from steps.common.contract import StageError
from steps.common.demo_data import demo_corpus, write_demo_corpus

from .conftest import write_jsonl

CORPUS = [record["text"] for record in demo_corpus(max_documents=40)]


def test_a_trained_tokenizer_has_the_requested_size_and_round_trips_any_text(tmp_path):
    tokenizer = lm_data.train_tokenizer(CORPUS, vocab_size=600, model_max_length=64)
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    text = CORPUS[3] + " naïve café 😀\t<tab> ünïcödé"

    assert len(tokenizer) == len(reloaded) == 600
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text  # bytes: nothing is unknown
    assert reloaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert (tokenizer.eos_token, tokenizer.pad_token) == ("<|endoftext|>", "<|pad|>")
    # Merges learnt from the corpus: its text takes far fewer tokens than bytes.
    assert len(tokenizer(CORPUS[3])["input_ids"]) < 0.6 * len(CORPUS[3].encode())


def test_packing_gives_full_blocks_with_eos_between_documents_and_no_padding():
    tokenizer = models.load_tokenizer(models.TINY)  # one token per byte: easy to count
    documents = ["alpha beta", "gamma", "delta epsilon zeta", "eta theta"]

    blocks = lm_data.pack_blocks(documents, tokenizer, block_size=8)

    eos = tokenizer.eos_token_id
    stream = [t for doc in documents for t in tokenizer(doc)["input_ids"] + [eos]]  # 46 tokens
    assert len(blocks) == len(stream) // 8 == 5  # the last 6 tokens fill no block: dropped
    assert [t for block in blocks["input_ids"] for t in block] == stream[:40]
    assert all(len(block) == 8 for block in blocks["input_ids"])
    assert blocks["labels"] == blocks["input_ids"]
    assert all(mask == [1] * 8 for mask in blocks["attention_mask"])
    assert tokenizer.pad_token_id not in stream


def test_a_corpus_shorter_than_one_block_is_refused():
    tokenizer = models.load_tokenizer(models.TINY)
    with pytest.raises(StageError, match="the validation documents are 6 tokens long, less than "
                       "one block of max_seq_length=64; add text or lower max_seq_length"):
        lm_data.pack_blocks(["short"], tokenizer, 64, "validation")


def test_records_that_are_not_text_are_refused_with_file_line_and_what_to_do(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [{"prompt": "Hi", "completion": "Hello"}])
    with pytest.raises(StageError, match=r"train\.jsonl:1: prompt_completion records, but "
                       r"\(continued\) pre-training reads language-modelling records"):
        lm_data.read_documents(tmp_path)


def test_vocabulary_extension_adds_frequent_words_as_bpe_tokens_and_shortens_documents(tmp_path):
    tokenizer = models.load_tokenizer(models.TINY)
    model = models.load_model(models.TINY)
    before = lm_data.mean_tokens_per_document(CORPUS, tokenizer)

    candidates = lm_data.frequent_new_tokens(CORPUS, tokenizer, 40)
    extended, new_ids = lm_data.extend_vocabulary(model, tokenizer, candidates, 40)
    after = lm_data.mean_tokens_per_document(CORPUS, extended)

    assert len(new_ids) == 40 and len(extended) == len(tokenizer) + 40 == 300
    assert after < 0.85 * before
    # Numbers keep the base's segmentation.
    assert not any(char.isdigit() for text in candidates for char in text)
    # The model grew to the tokenizer (the tiny model's 288 rows were not enough)...
    assert model.get_input_embeddings().weight.shape[0] == 300 == model.config.vocab_size
    # ... and each new row starts as the mean of the rows of the two pieces it joins.
    embeddings = model.get_input_embeddings().weight
    joined = extended.convert_ids_to_tokens(new_ids[0])
    left, right = next(
        (a, b) for a, b in (tuple(m) for m in _merges(extended)) if a + b == joined
    )
    pieces = extended.convert_tokens_to_ids([left, right])
    assert torch.allclose(embeddings[new_ids[0]], embeddings[pieces].mean(dim=0))
    # Text round-trips; special tokens keep their ids; a saved tokenizer reloads the same.
    assert extended.decode(extended(CORPUS[5])["input_ids"]) == CORPUS[5]
    assert extended.convert_tokens_to_ids(["<|endoftext|>", "<|pad|>"]) == [256, 259]
    extended.save_pretrained(tmp_path)
    assert AutoTokenizer.from_pretrained(tmp_path)(CORPUS[5])["input_ids"] == (
        extended(CORPUS[5])["input_ids"]
    )


def test_new_tokens_are_bpe_merges_so_longer_words_keep_their_pieces():
    # tokenizer.add_tokens would match " the" inside " there" and cut it; BPE merges only join
    # pieces the base tokenizer produced.
    tokenizer = models.load_tokenizer(models.TINY)
    extended, _ = lm_data.extend_vocabulary(
        models.load_model(models.TINY), tokenizer, [" the", " there"], budget=10
    )
    tokens = extended.convert_ids_to_tokens(extended(" the there theme")["input_ids"])

    assert tokens == ["Ġthe", "Ġthere", "Ġthe", "m", "e"]


def _merges(tokenizer) -> list:
    import json

    return json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]


def test_the_demo_corpus_is_deterministic_text_records_of_bounded_length(tmp_path):
    path = write_demo_corpus(tmp_path / "corpus.jsonl", max_chars=2000)

    documents = lm_data.read_documents(path)  # every record checked as `text`

    assert len(documents) > 200 and sum(map(len, documents)) > 400_000
    assert documents == [record["text"] for record in demo_corpus(max_chars=2000)]
    # A paragraph longer than max_chars stays whole; the others fill documents up to it.
    assert sorted(map(len, documents))[len(documents) // 2] <= 2000
    assert any(doc.startswith('The "if" statement') for doc in documents)

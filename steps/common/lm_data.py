"""Language-modelling data for pre-training and continued pre-training.

  - `read_documents`: the documents of a `text`-format dataset, refusing any other format;
  - `train_tokenizer`: a byte-level BPE tokenizer trained on a corpus (pre-training from scratch);
  - `pack_blocks`: documents joined with EOS and cut into fixed-length blocks, the causal-LM
    training examples of both stages;
  - `frequent_new_tokens` and `extend_vocabulary`: vocabulary extension for continued
    pre-training, the corpus's frequent words that the base tokenizer splits, added to its BPE
    vocabulary with embedding rows initialised from the pieces they join.
"""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from pathlib import Path

import torch
from datasets import Dataset
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)
from trl import pack_dataset

from steps.common.contract import StageError
from steps.common.datasets import load_records
from steps.common.models import SPECIAL_TOKENS, chatml_template

# A pre-trained tokenizer's document separator (EOS) and padding token; its other special tokens
# are the ChatML ones, so that the pre-trained model can go on to SFT on conversations.
END_OF_TEXT = "<|endoftext|>"
PAD = "<|pad|>"


def read_documents(path: Path) -> list[str]:
    """The `text` of every record at `path` (a file or folder), every record checked."""
    fmt, records = load_records(path)
    if fmt.name != "language_modeling":
        raise StageError(
            f"{records[0].location}: {fmt.name} records, but (continued) pre-training reads "
            'language-modelling records ({"text": "..."}); give it plain text documents, or '
            "train on this data with the sft stage"
        )
    return [record.data["text"] for record in records]


def train_tokenizer(
    texts: list[str], vocab_size: int, model_max_length: int
) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer of `vocab_size` tokens (special tokens included) for `texts`.

    GPT-2's scheme, as SmolLM2 and Llama 3 use: every byte is a token, so any text encodes and
    decodes back unchanged and nothing is ever unknown; the other tokens are merges learnt from
    the corpus (deterministic for the same texts). Fewer than `vocab_size` tokens come out only
    when the corpus has too few pairs seen twice to merge.
    """
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)
    if backend.get_vocab_size() < vocab_size:
        print(
            f"warning: the corpus gave only {backend.get_vocab_size()} of {vocab_size} tokens "
            "(too little text for more merges)",
            flush=True,
        )
    # tokenizer_object=: the documented way to wrap a `tokenizers` object (transformers 5's
    # GPT2TokenizerFast(vocab_file=...) would silently build an empty tokenizer).
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=END_OF_TEXT,
        pad_token=PAD,
        bos_token=None,
        unk_token=None,
        chat_template=chatml_template(),
        model_max_length=model_max_length,
    )


def pack_blocks(
    texts: list[str], tokenizer: PreTrainedTokenizerBase, block_size: int, split: str = "train"
) -> Dataset:
    """Every document tokenized and followed by EOS, concatenated, cut into `block_size` blocks.

    Columns: input_ids, labels (the same ids: the model shifts them) and attention_mask (all
    ones; it also makes the Trainer count tokens). Blocks are full: no padding, and the trailing
    tokens that do not fill a last block are dropped. A block attends across the EOS into the
    previous document, as in GPT-2's and Llama's pre-training; EOS teaches where documents end.
    """
    if tokenizer.eos_token_id is None:
        raise StageError("the tokenizer has no EOS token to separate documents; set eos_token")
    eos = tokenizer.eos_token_id
    # add_special_tokens: documents start as the model saw them in pre-training (BOS for models
    # that use one); EOS is appended here since most tokenizers do not add it.
    documents = [
        ids if ids and ids[-1] == eos else [*ids, eos]
        # verbose=False: documents longer than the model's maximum are what packing is for.
        for ids in tokenizer(texts, add_special_tokens=True, verbose=False)["input_ids"]
    ]
    total = sum(len(ids) for ids in documents)
    if total < block_size:
        raise StageError(
            f"the {split} documents are {total} tokens long, less than one block of "
            f"max_seq_length={block_size}; add text or lower max_seq_length"
        )
    # TRL's "wrapped" packing is this concatenate-and-cut (run_clm's group_texts). It cuts each
    # map batch separately, so the whole corpus goes in one batch (batch_size=None) and only the
    # final, partial block is dropped.
    packed = pack_dataset(
        Dataset.from_dict({"input_ids": documents}),
        block_size,
        strategy="wrapped",
        map_kwargs={"batch_size": None},
    )
    blocks = packed.filter(lambda ids: len(ids) == block_size, input_columns="input_ids")
    return blocks.map(
        lambda ids: {"labels": ids, "attention_mask": [1] * len(ids)}, input_columns="input_ids"
    )


def mean_tokens_per_document(texts: list[str], tokenizer: PreTrainedTokenizerBase) -> float:
    encoded = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
    lengths = [len(ids) for ids in encoded]
    return sum(lengths) / max(len(lengths), 1)


# --- Vocabulary extension -------------------------------------------------------------------------


def frequent_new_tokens(
    texts: list[str], tokenizer: PreTrainedTokenizerBase, max_new: int
) -> list[str]:
    """Strings of the corpus worth a token of their own, most frequent first.

    A BPE tokenizer with the base's own pre-tokenization is trained on the corpus
    (`train_new_from_iterator`); its tokens that the base tokenizer splits into pieces are the
    candidates, ranked by how often they occur in the corpus (each occurrence is a token saved per
    vocabulary entry it costs). Candidates with digits are left out: numbers keep the base's
    segmentation (SmolLM2 reads them digit by digit), which a token like " 10" would break.
    `max_new` sizes the domain tokenizer; every candidate is returned, for `extend_vocabulary` to
    take as many as its budget holds.
    """
    if not tokenizer.is_fast:
        raise StageError(
            "extend_vocabulary needs a fast (Rust) tokenizer to train a domain tokenizer; this "
            "base model's tokenizer is not one: set extend_vocabulary=0"
        )
    # Large enough that the corpus's frequent words are whole tokens; the ranking picks among them.
    domain = tokenizer.train_new_from_iterator(texts, vocab_size=256 + max(8 * max_new, 4096))
    base_vocab = tokenizer.get_vocab()
    counts: Counter[int] = Counter()
    for ids in domain(texts, add_special_tokens=False)["input_ids"]:
        counts.update(ids)
    special = set(domain.all_special_ids)
    candidates: list[tuple[int, str]] = []
    for token_id, count in counts.items():
        token = domain.convert_ids_to_tokens(token_id)
        if token_id in special or token in base_vocab:
            continue
        text = domain.convert_tokens_to_string([token])
        if not any(char.isdigit() for char in text):
            candidates.append((count, text))
    candidates.sort(key=lambda item: (-item[0], item[1]))  # ties by text: the same order each run
    return [text for _, text in candidates]


def extend_vocabulary(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, new_tokens: list[str], budget: int
) -> tuple[PreTrainedTokenizerBase, list[int]]:
    """The tokenizer with `new_tokens` (best first) in its BPE vocabulary, and the model grown to
    match; returns the new tokenizer and the ids of the tokens added, at most `budget` of them.

    Written by hand because `tokenizer.add_tokens` is the wrong tool here: it adds strings matched
    before the BPE model runs, also inside longer words (" the" in " there"), which on SmolLM2 and
    the demo corpus made the text *longer* and cut common words the base model knows well. Instead
    each new token becomes real BPE vocabulary: if the base splits it into pieces p1 p2 p3, the
    merges (p1, p2) -> p1p2 and (p1p2, p3) -> p1p2p3 are appended after the base's merges, so the
    base tokenizes everything as before and then joins these pieces wherever they meet (an
    intermediate like p1p2 is a new token too, and counts against `budget`).

    The embeddings grow to the tokenizer's length (as PEFT's AutoPeftModel grows a base model to
    its adapter's tokenizer, so adapters saved over the grown model reload there too). Each new
    row, in the input embeddings and in an untied output head, starts as the mean of the rows of
    the pieces it joins: the model starts out reading a new token roughly as it read its pieces,
    instead of as noise (measured on SmolLM2: random rows cost more loss than these).
    """
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    bpe = state["model"]
    if bpe.get("type") != "BPE":
        raise StageError(
            f"extend_vocabulary works on BPE tokenizers; this base model's is {bpe.get('type')}: "
            "set extend_vocabulary=0"
        )
    vocab, merges = bpe["vocab"], bpe["merges"]
    pair_as_text = bool(merges) and isinstance(merges[0], str)  # older tokenizer.json: "a b"
    # `tokenizers` numbers added (special) tokens that are not in the model's vocabulary after it,
    # renumbering them on load if the vocabulary grows into their ids (builtin:tiny's specials
    # follow its 256 bytes): entered into the vocabulary, they keep their ids.
    for token in state["added_tokens"]:
        vocab.setdefault(token["content"], token["id"])
    next_id = max(vocab.values()) + 1
    if next_id != len(vocab):
        raise StageError(
            "extend_vocabulary cannot extend this tokenizer (its token ids have gaps); set "
            "extend_vocabulary=0"
        )
    added: dict[str, list[int]] = {}  # new token -> ids of the two pieces it joins
    for text in new_tokens:
        pieces = tokenizer.convert_ids_to_tokens(
            tokenizer(text, add_special_tokens=False)["input_ids"]
        )
        steps = []  # the merges that build this token, left to right
        current = pieces[0]
        for piece in pieces[1:]:
            steps.append((current, piece))
            current += piece
        cost = sum(1 for left, right in steps if left + right not in vocab)
        if cost == 0 or len(added) + cost > budget:
            continue
        for left, right in steps:
            if left + right in vocab:
                continue
            merges.append(f"{left} {right}" if pair_as_text else [left, right])
            vocab[left + right] = next_id
            added[left + right] = [vocab[left], vocab[right]]
            next_id += 1

    # Rebuilt through save_pretrained/from_pretrained, so that the tokenizer keeps its class,
    # special tokens, chat template and settings with only tokenizer.json changed.
    with tempfile.TemporaryDirectory(prefix="tokenizer-") as folder:
        tokenizer.save_pretrained(folder)
        Path(folder, "tokenizer.json").write_text(json.dumps(state), encoding="utf-8")
        extended = AutoTokenizer.from_pretrained(folder)
    extended.pad_token = tokenizer.pad_token

    if len(extended) > model.get_input_embeddings().weight.shape[0]:
        # mean_resizing=False: every new row is set below (and the covariance transformers would
        # compute for its own initialisation is slow on a large vocabulary).
        model.resize_token_embeddings(len(extended), mean_resizing=False)
    layers = [model.get_input_embeddings()]
    output = model.get_output_embeddings()
    if output is not None and output.weight is not layers[0].weight:  # an untied head
        layers.append(output)
    with torch.no_grad():
        for layer in layers:
            for token, piece_ids in added.items():  # in order: a piece may be a new token itself
                layer.weight[vocab[token]] = layer.weight[piece_ids].mean(dim=0)
    return extended, [vocab[token] for token in added]

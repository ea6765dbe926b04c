"""Knowledge distillation's shared pieces: the examples both ends tokenize, the teacher's top-k
outputs and the file format they are cached in, and the loss.

The teacher stage (steps.teacher_logits) and the student stage (steps.distill) must agree token for
token on what they score, so both tokenize with `tokenize_examples` (TRL's SFTTrainer rules,
steps.common.labels) and the student checks the cache's `tokens_sha256` against its own before it
trusts a single number in it.

The cache (a folder):

    manifest.json            what is in it (see `write_cache`): teacher, tokenizer fingerprint,
                             top_k, max_seq_length, per split: counts, data and token hashes, shards
    <split>-NNNNN.safetensors   per shard of examples: input_ids, labels and example_offsets (the
                             tokenized examples, flat), top_k_ids and top_k_logprobs ([positions, k])
                             and position_offsets
    tokenizer/               the teacher's tokenizer, for a student built from teacher_config.json
    teacher_config.json      the teacher's model config
    teacher_answered.jsonl   the teacher's answers to prompts without reference answers, as
                             prompt/completion records, when it was given some: their examples
                             are the split `teacher_answered`

Positions: only those that carry loss. Position t of an example is stored when the token after it,
t + 1, is trained (label != -100): its logits predict a trained token. Prompt positions are never
distilled, so storing them would only cost space.

Log-probabilities: log_softmax of the teacher's raw logits over the whole vocabulary (temperature
1), the k largest kept, in float16. They are temperature-independent: softening by T is
log_softmax(z / T), and over the kept ids softmax(logprob / T) is exactly the top-k renormalised
softened distribution (the normaliser cancels), so one cache serves every temperature.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from steps.common.contract import StageError
from steps.common.datasets import DatasetFormat, Record, sft_example
from steps.common.labels import sft_tokens_and_labels, trains_a_token

CACHE_FORMAT = "llm-pipeline/teacher-top-k"
CACHE_VERSION = 1
MANIFEST = "manifest.json"
TEACHER_CONFIG = "teacher_config.json"
TOKENIZER_FOLDER = "tokenizer"
EXAMPLES_PER_SHARD = 2048
# The split of the teacher's answers to prompts without reference answers (steps.teacher_logits
# --prompts-dir), and the file its records are kept in beside the shards.
TEACHER_ANSWERED = "teacher_answered"
TEACHER_ANSWERS_FILE = "teacher_answered.jsonl"


@dataclass
class Example:
    """One tokenized example; with the teacher's top-k at its loss positions once they are known."""

    input_ids: list[int]
    labels: list[int]  # -100 where no loss
    top_k_ids: torch.Tensor | None = None  # [loss positions, k] int64
    top_k_logprobs: torch.Tensor | None = None  # [loss positions, k] float32

    @property
    def loss_positions(self) -> int:
        return sum(1 for label in self.labels[1:] if label != -100)

    @property
    def prompt_length(self) -> int:
        """Where the last trained run of tokens starts: the prompt an on-policy student continues."""
        start = len(self.labels)
        while start > 0 and self.labels[start - 1] == -100:
            start -= 1
        while start > 0 and self.labels[start - 1] != -100:
            start -= 1
        return start


# --- Tokenization: what the student trains on -----------------------------------------------------


def vocab_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """sha256 of the token -> id table (added tokens included): equal exactly when two tokenizers
    give the same id to every token, which comparing distributions token by token needs."""
    table = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
    return hashlib.sha256(table.encode("utf-8")).hexdigest()


def tokenize_examples(
    records: list[Record], fmt: DatasetFormat, tokenizer: PreTrainedTokenizerBase,
    max_seq_length: int,
) -> list[Example]:
    """The records as TRL's SFTTrainer tokenizes and masks them (steps.sft), truncated at the end:
    SFT's shape of each record (`sft_example`) labelled by steps.common.labels. Examples cut to
    nothing trainable are dropped, as TRL drops them.
    """
    if fmt.conversational and not tokenizer.chat_template:
        raise StageError(
            "the data is conversational but the tokenizer has no chat template; use a chat model "
            "or give the data as text / prompt+completion strings"
        )
    chat_template = bool(tokenizer.chat_template)
    examples = []
    for record in records:
        example = sft_example(record.data, fmt, chat_template)
        if example is None:
            continue
        ids, labels = sft_tokens_and_labels(example, tokenizer, max_seq_length)
        if trains_a_token(labels):
            examples.append(Example(ids, labels))
    if not examples:
        raise StageError(
            f"no {fmt.name} record has a response to learn from within max_seq_length="
            f"{max_seq_length}; raise max_seq_length or check the data"
        )
    return examples


def tokens_sha256(examples: list[Example]) -> str:
    """One hash of every example's tokens and loss mask: equal on both ends exactly when the data,
    the tokenizer and max_seq_length gave the same training sequences."""
    digest = hashlib.sha256()
    for example in examples:
        digest.update(json.dumps([example.input_ids, example.labels]).encode())
    return digest.hexdigest()


def data_sha256(files: list[Path]) -> str:
    digest = hashlib.sha256()
    for file in files:
        digest.update(Path(file).read_bytes())
    return digest.hexdigest()


# --- The teacher ----------------------------------------------------------------------------------


class TeacherCounter:
    """Counts the teacher's forward passes (batches), which a cached run must not make."""

    def __init__(self) -> None:
        self.forward_passes = 0


def teacher_top_k(
    teacher: PreTrainedModel, examples: list[Example], top_k: int, batch_size: int,
    pad_token_id: int, counter: TeacherCounter, progress: bool = True,
) -> None:
    """Run `teacher` once over `examples` and attach its top-k log-probabilities at every loss
    position (`Example.top_k_ids`, `Example.top_k_logprobs`, rounded to float16 as cached)."""
    device = next(teacher.parameters()).device
    teacher.eval()
    batches = (len(examples) + batch_size - 1) // batch_size
    for number, start in enumerate(range(0, len(examples), batch_size), start=1):
        batch = examples[start:start + batch_size]
        input_ids, attention_mask, labels = pad_batch(batch, pad_token_id, device)
        with torch.no_grad():
            logits = teacher(input_ids=input_ids, attention_mask=attention_mask).logits
        counter.forward_passes += 1
        # A prompt-tuning or p-tuning teacher prepends its virtual tokens, and their logits.
        logits = logits[:, -input_ids.shape[1]:]
        mask = labels[:, 1:] != -100
        # log_softmax only at the loss positions: [positions, vocab] rather than [batch, len, vocab].
        logprobs = F.log_softmax(logits[:, :-1][mask].float(), dim=-1)
        values, ids = logprobs.topk(top_k, dim=-1)
        values = values.to(torch.float16).float().cpu()  # what the cache holds, on both paths
        ids = ids.cpu()
        offset = 0
        for example in batch:
            count = example.loss_positions
            example.top_k_ids = ids[offset:offset + count]
            example.top_k_logprobs = values[offset:offset + count]
            offset += count
        if progress and (number % 10 == 0 or number == batches):
            print(f"  teacher batch {number}/{batches}", flush=True)


def pad_batch(
    examples: list[Example], pad_token_id: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input_ids, attention_mask and labels of `examples`, padded on the right."""
    width = max(len(example.input_ids) for example in examples)
    ids = [e.input_ids + [pad_token_id] * (width - len(e.input_ids)) for e in examples]
    labels = [e.labels + [-100] * (width - len(e.labels)) for e in examples]
    mask = [[1] * len(e.input_ids) + [0] * (width - len(e.input_ids)) for e in examples]
    return (torch.tensor(ids, device=device), torch.tensor(mask, device=device),
            torch.tensor(labels, device=device))


# --- The loss -------------------------------------------------------------------------------------


def top_k_kl(
    student_logits: torch.Tensor, top_k_ids: torch.Tensor, top_k_logprobs: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """KL(teacher_T || student_T) per position, the teacher known only by its top k tokens.

    student_logits [P, V] (raw), top_k_ids / top_k_logprobs [P, k] (the teacher's log-softmax at
    temperature 1). Written by hand because no library loss takes a sparse teacher:

        q_i = softmax_{j in K}(logprob_j / T)_i          teacher, softened, renormalised over K
        log s_i = log_softmax(z / T)_i                   student, softened, over the whole vocabulary
        KL = sum_{i in K} q_i (log q_i - log s_i)

    The approximation: the teacher's mass outside its top k (usually a few percent at k = 16) is
    dropped and its top k renormalised. The student's log-probabilities are over the whole
    vocabulary, so its mass outside K is still pushed down (sum_K s_i < 1 only raises the KL); the
    value is >= 0 and 0 only when the student puts exactly q on K.
    """
    teacher = F.log_softmax(top_k_logprobs.float() / temperature, dim=-1)
    student = F.log_softmax(student_logits.float() / temperature, dim=-1).gather(-1, top_k_ids)
    return (teacher.exp() * (teacher - student)).sum(-1)


# --- The cache on disk ----------------------------------------------------------------------------


def write_cache(folder: Path, splits: dict[str, list[Example]], manifest: dict[str, Any],
                split_info: dict[str, dict[str, Any]]) -> None:
    """Shards of every split into `folder`, and manifest.json (with `manifest`'s fields)."""
    manifest = {"format": CACHE_FORMAT, "version": CACHE_VERSION, **manifest, "splits": {}}
    for split, examples in splits.items():
        shards = []
        for number, start in enumerate(range(0, len(examples), EXAMPLES_PER_SHARD)):
            chunk = examples[start:start + EXAMPLES_PER_SHARD]
            name = f"{split}-{number:05d}.safetensors"
            save_file(_shard_tensors(chunk), str(folder / name))
            shards.append({"file": name, "examples": len(chunk),
                           "sha256": hashlib.sha256((folder / name).read_bytes()).hexdigest()})
        manifest["splits"][split] = {
            **split_info[split],
            "examples": len(examples),
            "tokens": sum(len(e.input_ids) for e in examples),
            "loss_positions": sum(e.loss_positions for e in examples),
            "tokens_sha256": tokens_sha256(examples),
            "shards": shards,
        }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def _shard_tensors(examples: list[Example]) -> dict[str, torch.Tensor]:
    def offsets(counts: list[int]) -> torch.Tensor:
        return torch.tensor([0, *counts], dtype=torch.int64).cumsum(0)

    return {
        "input_ids": torch.tensor([t for e in examples for t in e.input_ids], dtype=torch.int32),
        "labels": torch.tensor([t for e in examples for t in e.labels], dtype=torch.int32),
        "example_offsets": offsets([len(e.input_ids) for e in examples]),
        "top_k_ids": torch.cat([e.top_k_ids for e in examples]).to(torch.int32),
        "top_k_logprobs": torch.cat([e.top_k_logprobs for e in examples]).to(torch.float16),
        "position_offsets": offsets([e.loss_positions for e in examples]),
    }


def read_manifest(folder: Path) -> dict[str, Any]:
    path = Path(folder) / MANIFEST
    if not path.exists():
        found = ", ".join(sorted(p.name for p in Path(folder).iterdir())[:10])
        raise StageError(
            f"{folder} holds no {MANIFEST} of teacher outputs (found: {found or 'nothing'}); give "
            "the 'teacher' channel the output folder of steps.teacher_logits"
        )
    manifest = json.loads(path.read_text(encoding="utf-8"))
    if manifest.get("format") != CACHE_FORMAT or manifest.get("version") != CACHE_VERSION:
        raise StageError(
            f"{path}: not teacher outputs of format {CACHE_FORMAT} v{CACHE_VERSION} (found "
            f"{manifest.get('format')} v{manifest.get('version')}); rerun steps.teacher_logits"
        )
    return manifest


def read_cache(folder: Path, split: str, top_k: int) -> list[Example]:
    """The examples of `split` with their cached top-k (the first `top_k` of each position's)."""
    manifest = read_manifest(folder)
    info = manifest["splits"].get(split)
    if info is None:
        raise StageError(
            f"{folder}/{MANIFEST} has no '{split}' split (has: {', '.join(manifest['splits'])})"
        )
    examples = []
    for shard in info["shards"]:
        tensors = load_file(str(Path(folder) / shard["file"]))
        ids, labels = tensors["input_ids"].tolist(), tensors["labels"].tolist()
        example_offsets = tensors["example_offsets"].tolist()
        position_offsets = tensors["position_offsets"].tolist()
        top_ids = tensors["top_k_ids"][:, :top_k].long()
        top_logprobs = tensors["top_k_logprobs"][:, :top_k].float()
        for n in range(len(example_offsets) - 1):
            a, b = example_offsets[n], example_offsets[n + 1]
            p, q = position_offsets[n], position_offsets[n + 1]
            examples.append(Example(ids[a:b], labels[a:b], top_ids[p:q], top_logprobs[p:q]))
    return examples

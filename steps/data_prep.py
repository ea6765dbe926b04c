"""Data preparation (processing stage): validate, de-duplicate, shuffle and split a dataset.

    python -m steps.data_prep --input-dir data/ --output-dir out/ [--validation-fraction 0.1]
        [--seed 42] [--tokenizer builtin:tiny] [--max-records N] [--max-record-tokens N]

Reads every .jsonl/.json/.csv/.parquet file under --input-dir (or the one file it names), checks
every record against one TRL dataset format (steps.common.datasets: text, conversational,
prompt-completion, preference, unpaired preference, and prompt-only for the online methods), drops
exact duplicates, shuffles, splits by prompt, and writes train.jsonl, validation.jsonl and
manifest.json (counts, content hashes, token-length statistics) to --output-dir. Nothing is written
unless every record is valid, and, with --max-record-tokens, no record written is longer than that.
A manifest.json in --input-dir (an earlier run's output read again) is not read as data.

The split holds out prompts, not records: every record of a prompt is on one side, and which side
is a function of the prompt (normalised, `prompt_key`) and the seed alone, a keyed hash below
--validation-fraction. The DataPrep steps of a recipe all run with the recipe's one data_prep
settings, so a prompt held out of one dataset is held out of every other one too (the demo SFT data
and preference pairs share most prompts): no stage trains on another's validation prompts, and no
step needs another's output to know which.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any

import numpy as np

from steps.common import contract
from steps.common.contract import StageError
from steps.common.datasets import (
    DatasetFormat,
    Record,
    data_files,
    prompt_key,
    read_records,
    sft_example,
    validate_records,
)
from steps.common.models import load_tokenizer
from steps.data_prep_config import DataPrepConfig


def main(config: DataPrepConfig) -> None:
    input_path, output_dir = Path(config.input_dir), Path(config.output_dir)

    # Read and check everything before writing anything.
    records: list[Record] = []
    inputs = []
    for file in data_files(input_path):
        file_records = read_records(file)
        records += file_records
        relative = file.relative_to(input_path).as_posix() if input_path.is_dir() else file.name
        inputs.append(
            {"path": relative, "sha256": _sha256(file.read_bytes()), "records": len(file_records)}
        )
        print(f"read {len(file_records)} records from {file}", flush=True)
    fmt = validate_records(records)
    print(
        f"format: {fmt.name} ({'conversational' if fmt.conversational else 'standard'}); "
        f"all {len(records)} records valid",
        flush=True,
    )

    unique = _deduplicate(records)
    duplicates = len(records) - len(unique)
    print(f"removed {duplicates} exact duplicates; {len(unique)} unique records", flush=True)

    random.Random(config.seed).shuffle(unique)
    if config.max_records is not None:
        unique = unique[: config.max_records]
    if len(unique) < 2:
        raise StageError(
            f"{input_path}: {len(unique)} unique record(s); a train/validation split needs at "
            "least 2"
        )
    keys = [prompt_key(record.data, fmt) for record in unique]
    if len(set(keys)) < 2:
        raise StageError(
            f"{input_path}: the {len(unique)} unique records all answer one prompt; a split by "
            "prompt needs at least 2 (give records of more prompts)"
        )
    held_out, forced = held_out_prompts(set(keys), config.seed, config.validation_fraction)
    kept = {
        "train": [record for record, key in zip(unique, keys) if key not in held_out],
        "validation": [record for record, key in zip(unique, keys) if key in held_out],
    }
    splits = {name: [record.data for record in split] for name, split in kept.items()}
    prompts = {"train": len(set(keys) - held_out), "validation": len(held_out)}
    print(
        f"split by prompt: {len(splits['train'])} train records ({prompts['train']} prompts), "
        f"{len(splits['validation'])} validation records ({prompts['validation']} prompts) "
        f"(seed {config.seed})",
        flush=True,
    )
    if forced:
        print(f"warning: validation_fraction {config.validation_fraction} put all {len(set(keys))}"
              " prompts on one side; the one nearest the line was moved to the other, where "
              "another dataset of the recipe may not hold it", flush=True)

    tokenizer = load_tokenizer(config.tokenizer)
    lengths = {
        name: [_token_length(record.data, fmt, tokenizer) for record in split]
        for name, split in kept.items()
    }
    token_lengths = {name: _length_stats(values) for name, values in lengths.items()}
    for name, stats in token_lengths.items():
        print(f"{name} token lengths: {stats}", flush=True)
    if config.max_record_tokens is not None:
        _check_record_lengths(records, kept, lengths, config)

    with contract.atomic_output(output_dir) as staging:
        outputs = {}
        for name, split in splits.items():
            lines = "".join(json.dumps(data, ensure_ascii=False) + "\n" for data in split)
            payload = lines.encode("utf-8")
            (staging / f"{name}.jsonl").write_bytes(payload)
            outputs[f"{name}.jsonl"] = _sha256(payload)
        manifest = {
            "format": fmt.name,
            "conversational": fmt.conversational,
            "counts": {
                "records_read": len(records),
                "duplicates_removed": duplicates,
                "train": len(splits["train"]),
                "validation": len(splits["validation"]),
                "train_prompts": prompts["train"],
                "validation_prompts": prompts["validation"],
                # Prompts moved to keep both splits non-empty, so off the recipe-wide rule.
                "prompts_moved": int(forced),
            },
            "split": "by prompt: blake2b(normalised prompt, key=seed) below validation_fraction",
            "inputs": inputs,
            "outputs": outputs,
            # One hash for the prepared data: of the sorted "<file> <sha256>" lines (sha256sum's).
            "dataset_sha256": _sha256(
                "".join(f"{name} {h}\n" for name, h in sorted(outputs.items())).encode()
            ),
            "token_lengths": token_lengths,
            "tokenizer": config.tokenizer,
            "seed": config.seed,
            "validation_fraction": config.validation_fraction,
            "max_records": config.max_records,
            "max_record_tokens": config.max_record_tokens,
        }
        (staging / "manifest.json").write_text(
            json.dumps(manifest, indent=2) + "\n", encoding="utf-8"
        )
    print(
        f"wrote train.jsonl, validation.jsonl and manifest.json to {output_dir} "
        f"(dataset_sha256 {manifest['dataset_sha256'][:12]})",
        flush=True,
    )


def held_out_prompts(keys: set[str], seed: int, fraction: float) -> tuple[set[str], bool]:
    """The prompts held out for validation, and whether one had to be moved to keep both sides.

    A prompt is held out when its keyed hash, read as a number in [0, 1), is below `fraction`: the
    same prompt, seed and fraction give the same side in any dataset. Where that leaves a side
    empty (a handful of prompts), the prompt nearest the line crosses it. Needs two prompts.
    """
    position = {key: _hash_position(key, seed) for key in keys}
    held_out = {key for key, value in position.items() if value < fraction}
    if not held_out:
        return {min(position, key=position.get)}, True
    if held_out == keys:
        return held_out - {max(position, key=position.get)}, True
    return held_out, False


def _hash_position(key: str, seed: int) -> float:
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8,
                             key=str(seed).encode("utf-8")).digest()
    return int.from_bytes(digest, "big") / 2**64


def _deduplicate(records: list[Record]) -> list[Record]:
    """Exact duplicates, compared as canonical JSON (sorted keys); the first occurrence is kept."""
    seen: set[str] = set()
    unique = []
    for record in records:
        key = json.dumps(record.data, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        if key not in seen:
            seen.add(key)
            unique.append(record)
    return unique


def _check_record_lengths(
    records: list[Record],
    kept: dict[str, list[Record]],
    lengths: dict[str, list[int]],
    config: DataPrepConfig,
) -> None:
    """Fail on the first record (in reading order) kept that is over max_record_tokens."""
    limit = config.max_record_tokens
    length_of = {
        id(record): length
        for name, split in kept.items()
        for record, length in zip(split, lengths[name], strict=True)
    }
    over = [r for r in records if id(r) in length_of and length_of[id(r)] > limit]
    if not over:
        return
    first = over[0]
    more = f" ({len(over) - 1} more record(s) are over it too)" if len(over) > 1 else ""
    raise StageError(
        f"{first.location}: record is {length_of[id(first)]} tokens long (tokenizer "
        f"{config.tokenizer}), over max_record_tokens {limit}{more}; raise --max-record-tokens "
        "(max_record_tokens in the recipe's data_prep stage) or shorten or split the record"
    )


def _token_length(data: dict[str, Any], fmt: DatasetFormat, tokenizer: Any) -> int:
    """Tokens in the longest sequence of a record as training sees it.

    Each sequence takes the shape `sft_example` gives it (so a string prompt/completion becomes
    a chat turn when the tokenizer has a template, as SFT trains it); preference records are
    measured on both the chosen and the rejected response. A prompt-only record is measured as a
    policy is prompted with it: a user turn and the generation prompt, when there is a template.
    """
    chat = bool(tokenizer.chat_template)
    if fmt.name == "prompt_only":
        prompt = data["prompt"]
        if isinstance(prompt, str) and not chat:
            return len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        if not chat:
            raise StageError(
                "the prompts are conversational but the tokenizer has no chat template; pick a "
                "chat model with --tokenizer"
            )
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])
    if fmt.name == "preference":
        variants = [{**data, "chosen": data[side]} for side in ("chosen", "rejected")]
    elif fmt.name == "unpaired_preference":
        variants = [{**data, "label": True}]  # measured whether or not SFT would keep it
    else:
        variants = [data]
    lengths = []
    for variant in variants:
        example = sft_example(variant, fmt, chat)
        if "text" in example:
            sequence = example["text"]
        elif "messages" in example:
            sequence = example["messages"]
        else:
            sequence = example["prompt"] + example["completion"]  # strings or message lists
        if isinstance(sequence, list):
            if not chat:
                raise StageError(
                    "the data is conversational but the tokenizer has no chat template; pick a "
                    "chat model with --tokenizer"
                )
            sequence = tokenizer.apply_chat_template(sequence, tokenize=False)
        lengths.append(len(tokenizer(sequence, add_special_tokens=False)["input_ids"]))
    return max(lengths)


def _length_stats(lengths: list[int]) -> dict[str, float]:
    values = np.asarray(lengths)
    return {
        "min": int(values.min()),
        "max": int(values.max()),
        "mean": round(float(values.mean()), 2),
        "p50": float(np.percentile(values, 50)),
        "p95": float(np.percentile(values, 95)),
    }


def _sha256(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()


if __name__ == "__main__":
    contract.run(main, DataPrepConfig, job="processing")

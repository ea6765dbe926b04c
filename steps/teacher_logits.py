"""Teacher outputs, once (processing stage): a teacher's top-k next-token log-probabilities over the
training data, cached for any number of distillation runs (steps.distill's 'teacher' channel).

    python -m steps.teacher_logits --model-dir TEACHER --data-dir DATA --output-dir OUT
        [--top-k 16] [--max-seq-length 512] [--batch-size 8] [--base-model SPEC]

--model-dir is the teacher: a model or PEFT adapter folder, a model.tar.gz or a folder holding one
(as SageMaker hands a training stage's output to a processing job), or a builtin spec.
--data-dir is a data preparation output (train.jsonl, and validation.jsonl when present: both
splits are scored, so the student's validation KL to the teacher can be measured) or any data file
or folder (scored as the 'train' split). --max-seq-length must equal the student stage's.

The recipe:
  1. read and check every record of every split;
  2. tokenize them as the student stage will (steps.common.distillation.tokenize_examples: TRL's
     SFT rules, with the teacher's tokenizer, whose vocabulary fingerprint is recorded);
  3. run the teacher once over every example and keep, at each position whose next token carries
     loss, the top-k log-probabilities (log_softmax of the raw logits, temperature 1: any
     temperature can be applied later) and their token ids;
  4. write shards, manifest.json, the teacher's tokenizer and config to --output-dir, all or nothing
     (the format: steps/common/distillation.py).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from steps.common import contract, distillation
from steps.common.contract import StageError
from steps.common.datasets import data_files, load_records
from steps.common.models import (
    SMOLLM2,
    TINY,
    base_name,
    load_model,
    load_tokenizer,
    resolve_model_source,
    stop_token_ids,
)
from steps.teacher_logits_config import TeacherLogitsConfig


def main(config: TeacherLogitsConfig) -> None:
    started = time.perf_counter()

    # 1. Data: every split read and checked before the teacher loads.
    splits = _split_paths(Path(config.data_dir))
    records = {split: load_records(path) for split, path in splits.items()}
    for split, (fmt, split_records) in records.items():
        print(f"{split}: {len(split_records)} {fmt.name} records from {splits[split]}", flush=True)

    # 2. Teacher and its tokenizer.
    source = (config.model_dir if config.model_dir in (TINY, SMOLLM2)
              else resolve_model_source(Path(config.model_dir), config.model_dir))
    print(f"loading teacher {source}", flush=True)
    tokenizer = load_tokenizer(source)
    teacher = load_model(source, base_model=config.base_model).eval()
    if torch.cuda.is_available():
        teacher.to("cuda")
    vocab_size = teacher.get_output_embeddings().weight.shape[0]
    if config.top_k > vocab_size:
        raise StageError(f"top_k={config.top_k} exceeds the teacher's {vocab_size} output tokens; "
                         "lower top_k")

    # 3. Tokenize as the student will, and run the teacher once over every example.
    counter = distillation.TeacherCounter()
    examples = {}
    for split, (fmt, split_records) in records.items():
        examples[split] = distillation.tokenize_examples(
            split_records, fmt, tokenizer, config.max_seq_length
        )
        positions = sum(e.loss_positions for e in examples[split])
        print(f"{split}: scoring {len(examples[split])} examples, {positions} loss positions",
              flush=True)
        distillation.teacher_top_k(teacher, examples[split], config.top_k, config.batch_size,
                                   tokenizer.pad_token_id, counter)
    runtime = time.perf_counter() - started

    # 4. Write, all or nothing.
    is_adapter = hasattr(teacher, "peft_config")
    teacher_config = teacher.get_base_model().config if is_adapter else teacher.config
    manifest = {
        "teacher": {
            "model": source,
            "adapter": is_adapter,
            "base_model": (config.base_model
                           or base_name(teacher.active_peft_config.base_model_name_or_path)
                           if is_adapter else None),
            "model_type": teacher_config.model_type,
            "parameters": sum(p.numel() for p in teacher.parameters()),
            "output_tokens": vocab_size,
        },
        "tokenizer": {
            "vocab_sha256": distillation.vocab_fingerprint(tokenizer),
            "size": len(tokenizer),
            "eos_token": tokenizer.eos_token,
            "stop_token_ids": stop_token_ids(teacher, tokenizer),
        },
        "top_k": config.top_k,
        "max_seq_length": config.max_seq_length,
        "log_probs": "log_softmax of the raw logits (temperature 1) over the whole vocabulary; "
                     "the top_k largest per position, float16, sorted descending",
        "positions": "loss positions only: position t where the label of token t+1 is not -100",
        "teacher_forward_passes": counter.forward_passes,
        "runtime_s": round(runtime, 2),
    }
    split_info = {
        split: {"data_files": [f.name for f in data_files(path)],
                "data_sha256": distillation.data_sha256(data_files(path))}
        for split, path in splits.items()
    }
    output_dir = Path(config.output_dir)
    with contract.atomic_output(output_dir) as staging:
        distillation.write_cache(staging, examples, manifest, split_info)
        tokenizer.save_pretrained(staging / distillation.TOKENIZER_FOLDER)
        (staging / distillation.TEACHER_CONFIG).write_text(teacher_config.to_json_string())
    written = json.loads((output_dir / distillation.MANIFEST).read_text())
    sizes = sum(p.stat().st_size for p in output_dir.glob("*.safetensors"))
    counts = ", ".join(f"{s}: {i['examples']} examples / {i['loss_positions']} positions"
                       for s, i in written["splits"].items())
    print(f"wrote teacher top-{config.top_k} outputs ({counts}; {sizes / 2**20:.2f} MiB) in "
          f"{counter.forward_passes} teacher forward passes to {output_dir}", flush=True)


def _split_paths(data_dir: Path) -> dict[str, Path]:
    """train (and validation) of a data preparation output; else the whole input as train."""
    if not data_dir.exists():
        raise StageError(f"data {data_dir} does not exist")
    if data_dir.is_dir() and (data_dir / "train.jsonl").exists():
        splits = {"train": data_dir / "train.jsonl"}
        if (data_dir / "validation.jsonl").exists():
            splits["validation"] = data_dir / "validation.jsonl"
        return splits
    return {"train": data_dir}


if __name__ == "__main__":
    contract.run(main, TeacherLogitsConfig, job="processing")

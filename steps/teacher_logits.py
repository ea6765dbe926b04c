"""Teacher outputs, once (processing stage): a teacher's top-k next-token log-probabilities over the
training data, cached for any number of distillation runs (steps.distill's 'teacher' channel).

    python -m steps.teacher_logits --model-dir TEACHER --data-dir DATA --output-dir OUT
        [--top-k 16] [--max-seq-length 512] [--batch-size 8] [--base-model SPEC]
        [--prompts-dir PROMPTS] [--max-new-tokens 32]

--model-dir is the teacher: a model or PEFT adapter folder, a model.tar.gz or a folder holding one
(as SageMaker hands a training stage's output to a processing job), or a builtin spec.
--data-dir is a data preparation output (train.jsonl, and validation.jsonl when present: both
splits are scored, so the student's validation KL to the teacher can be measured) or any data file
or folder (scored as the 'train' split). --max-seq-length must equal the student stage's.
--prompts-dir holds prompts that have no reference answer (optional): the teacher answers them, and
its answers are cached as a third split, 'teacher_answered' (sequence-level distillation, Kim & Rush
2016: what a teacher is for when most prompts are unlabelled). steps.distill trains its student on
them beside the labelled data; a hard-label student, having no teacher, cannot.

The recipe:
  1. read and check every record of every split, and the prompts, less those the labelled data
     already has (answered by their labels, or held out for evaluation);
  2. the teacher answers the prompts (greedy, at most --max-new-tokens; an answer cut off there is
     dropped); tokenize every split as the student stage will
     (steps.common.distillation.tokenize_examples: TRL's SFT rules, with the teacher's tokenizer,
     whose vocabulary fingerprint is recorded);
  3. run the teacher once over every example and keep, at each position whose next token carries
     loss, the top-k log-probabilities (log_softmax of the raw logits, temperature 1: any
     temperature can be applied later) and their token ids;
  4. write shards, manifest.json, the teacher's tokenizer and config (and the teacher's answers as
     teacher_answered.jsonl) to --output-dir, all or nothing (the format:
     steps/common/distillation.py).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from steps.common import contract, distillation
from steps.common.contract import StageError
from steps.common.datasets import (
    DatasetFormat,
    Record,
    data_files,
    distinct_prompts,
    load_records,
    prompt_key,
    read_prompts,
)
from steps.common.models import (
    SMOLLM2,
    TINY,
    base_name,
    load_model,
    load_tokenizer,
    resolve_model_source,
    stop_token_ids,
)
from steps.common.scoring import generate_answers
from steps.teacher_logits_config import TeacherLogitsConfig


def main(config: TeacherLogitsConfig) -> None:
    started = time.perf_counter()

    # 1. Data: every split read and checked before the teacher loads.
    splits = _split_paths(Path(config.data_dir))
    records = {split: load_records(path) for split, path in splits.items()}
    for split, (fmt, split_records) in records.items():
        print(f"{split}: {len(split_records)} {fmt.name} records from {splits[split]}", flush=True)
    prompts = unlabelled_prompts(Path(config.prompts_dir), records) if config.prompts_dir else []

    # 2. Teacher and its tokenizer.
    source = (config.model_dir if config.model_dir in (TINY, SMOLLM2)
              else resolve_model_source(Path(config.model_dir), config.model_dir))
    print(f"loading teacher {source}", flush=True)
    tokenizer = load_tokenizer(source)
    teacher = load_model(source, base_model=config.base_model).eval()
    is_adapter = hasattr(teacher, "peft_config")
    adapter_base = (config.base_model or base_name(teacher.active_peft_config.base_model_name_or_path)
                    if is_adapter else None)
    teacher_config = teacher.get_base_model().config if is_adapter else teacher.config
    teacher = _merged(teacher)
    if torch.cuda.is_available():
        teacher.to("cuda")
    vocab_size = teacher.get_output_embeddings().weight.shape[0]
    if config.top_k > vocab_size:
        raise StageError(f"top_k={config.top_k} exceeds the teacher's {vocab_size} output tokens; "
                         "lower top_k")
    # The teacher's answers to the prompts without reference answers: a split of their own.
    fmt, answered = answer_prompts(teacher, tokenizer, prompts, config) if prompts else (None, [])
    if answered:
        records[distillation.TEACHER_ANSWERED] = (fmt, answered)

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
    manifest = {
        "teacher": {
            "model": source,
            "adapter": is_adapter,
            "base_model": adapter_base,
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
    if answered:
        splits[distillation.TEACHER_ANSWERED] = Path(config.prompts_dir)
    split_info = {
        split: {"data_files": [f.name for f in data_files(path)],
                "data_sha256": distillation.data_sha256(data_files(path))}
        for split, path in splits.items()
    }
    if answered:
        split_info[distillation.TEACHER_ANSWERED].update(
            prompts=len(prompts), answers=distillation.TEACHER_ANSWERS_FILE,
            max_new_tokens=config.max_new_tokens)
    output_dir = Path(config.output_dir)
    with contract.atomic_output(output_dir) as staging:
        distillation.write_cache(staging, examples, manifest, split_info)
        if answered:
            (staging / distillation.TEACHER_ANSWERS_FILE).write_text(
                "".join(json.dumps(r.data, ensure_ascii=False) + "\n" for r in answered),
                encoding="utf-8")
        tokenizer.save_pretrained(staging / distillation.TOKENIZER_FOLDER)
        (staging / distillation.TEACHER_CONFIG).write_text(teacher_config.to_json_string())
    written = json.loads((output_dir / distillation.MANIFEST).read_text())
    sizes = sum(p.stat().st_size for p in output_dir.glob("*.safetensors"))
    counts = ", ".join(f"{s}: {i['examples']} examples / {i['loss_positions']} positions"
                       for s, i in written["splits"].items())
    print(f"wrote teacher top-{config.top_k} outputs ({counts}; {sizes / 2**20:.2f} MiB) in "
          f"{counter.forward_passes} teacher forward passes to {output_dir}", flush=True)


def unlabelled_prompts(prompts_dir: Path, labelled: dict[str, tuple[DatasetFormat, list[Record]]]
                       ) -> list:
    """The distinct prompts at `prompts_dir` that no labelled record of any split has (compared as
    data preparation compares prompts, steps.common.datasets.prompt_key): a labelled prompt has its
    reference answer already, and a validation prompt answered by the teacher would put the
    held-out answers in the student's training data."""
    _, prompts = read_prompts(prompts_dir)
    prompts = distinct_prompts(prompts)
    taken = {prompt_key(r.data, fmt) for fmt, split_records in labelled.values()
             for r in split_records}
    kept = [p for p in prompts
            if prompt_key({"prompt": p}, DatasetFormat("prompt_only", isinstance(p, list)))
            not in taken]
    print(f"prompts: {len(kept)} to answer from {prompts_dir} ({len(prompts) - len(kept)} of "
          f"{len(prompts)} distinct ones skipped: the labelled data has them)", flush=True)
    return kept


def answer_prompts(teacher: torch.nn.Module, tokenizer, prompts: list, config: TeacherLogitsConfig
                   ) -> tuple[DatasetFormat, list[Record]]:
    """The teacher's greedy answers to `prompts` as prompt/completion records (in the prompts'
    form: strings, or messages, which a chat model needs), less those cut off at max_new_tokens:
    an unfinished answer would teach the student to stop mid-sentence (none left: a warning, and
    no records)."""
    conversational = isinstance(prompts[0], list)
    chat = bool(tokenizer.chat_template)
    if conversational and not chat:
        raise StageError(f"the prompts in {config.prompts_dir} are conversations but the teacher's "
                         "tokenizer has no chat template; give the prompts as strings")
    print(f"teacher: answering {len(prompts)} prompts (greedy, at most {config.max_new_tokens} "
          "tokens)", flush=True)
    asked = [[{"role": "user", "content": p}] if chat and not conversational else p
             for p in prompts]
    answers, stopped, _ = generate_answers(teacher, tokenizer, asked, config.max_new_tokens,
                                           config.batch_size)
    records = [Record({"prompt": p, "completion": [{"role": "assistant", "content": a}]
                       if conversational else a}, f"{config.prompts_dir}: prompt {n}")
               for n, (p, a, done) in enumerate(zip(prompts, answers, stopped)) if done and a]
    print(f"teacher: {len(records)} answers kept ({len(prompts) - len(records)} cut off at "
          f"max_new_tokens={config.max_new_tokens} or empty)", flush=True)
    if not records:
        print(f"warning: the teacher finished none of its answers to the {len(prompts)} prompts "
              f"within max_new_tokens={config.max_new_tokens}: the cache has no teacher-answered "
              "split, and the student trains on the labelled data alone; raise max_new_tokens",
              flush=True)
    return DatasetFormat("prompt_completion", conversational), records


def _merged(teacher: torch.nn.Module) -> torch.nn.Module:
    """A LoRA teacher with its adapter merged into its weights: the same function, without the
    adapter's extra layers at every step (32 answers of SmolLM2's SFT adapter took 70 s unmerged,
    17 s merged, on 2 busy CPUs). Prompt-learning and quantized teachers stay as they are."""
    if not hasattr(teacher, "merge_and_unload") or getattr(teacher, "is_loaded_in_4bit", False) \
            or getattr(teacher, "is_loaded_in_8bit", False):
        return teacher
    return teacher.merge_and_unload()


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

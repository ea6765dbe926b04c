"""Training throughput of every training stage against the two baselines a user would otherwise
write, on the same model, data and batch shape, in the same process:

- **TRL defaults**: the corresponding TRL trainer (SFTTrainer, RewardTrainer, DPOTrainer) with
  TRL's own configuration defaults (TRL 1.16 has no PPO trainer, and its DistillationTrainer is
  on-policy only); only what fixes the work is set (batch size, sequence length, steps, learning
  rate, the same adapter).
- **plain Trainer**: a `transformers.Trainer` whose loss is the model's own (or, where the stage's
  loss is not a language-model loss, the textbook loss written out: Bradley-Terry for the reward
  model, sigmoid DPO against the adapter-disabled reference, KL to the temperature-softened teacher
  plus cross-entropy for distillation), in the precision the stage resolved, without activation
  checkpointing: what the stage's loop costs beyond the arithmetic.

Tokens/s counts non-padding tokens over `trainer.train()` (the Trainer's `num_input_tokens_seen`),
as every stage logs it. Each figure is the median of `--repeats` runs, interleaved (project, TRL,
plain, project, ...) so that a slow patch of the machine hits all three alike.

    python -m benchmarks.throughput             # every stage, 3 repeats
    python -m benchmarks.throughput --quick     # 1 repeat, few steps: does it run?
    python -m benchmarks.throughput --stages sft-lora,dpo
"""

from __future__ import annotations

import argparse
import contextlib
import io
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks import common

# The stage defaults are judged against these (shared/FACTS.md: TRL's defaults cost ~3.4x on SFT).
TARGET_VS_TRL, TARGET_VS_PLAIN = 2.5, 1.0
SFT_METHODS = ("none", "lora", "qlora", "prompt_tuning", "p_tuning", "prefix_tuning")
STAGES = ("cpt", *(f"sft-{m}" for m in SFT_METHODS), "reward_model", "dpo", "ppo", "distill")


@dataclass
class Shape:
    batch: int
    length: int
    steps: int


# --- Data and models, made once -------------------------------------------------------------------


class Workspace:
    def __init__(self, root: Path, shape: Shape) -> None:
        from steps.common import demo_data

        self.root, self.shape = root, shape
        self.model = common.small_model_folder(root)
        self.sft = common.write_jsonl(root / "sft" / "train.jsonl", demo_data.demo_records(96))
        self.preferences = common.write_jsonl(root / "pref" / "train.jsonl",
                                              demo_data.demo_preferences(64))
        corpus = [{"text": d["text"]} for d in demo_data.demo_corpus(max_documents=48)]
        self.corpus = common.write_jsonl(root / "corpus" / "train.jsonl", corpus)
        prompts = [{"prompt": r["prompt"]} for r in demo_data.demo_records(64, seed=1)]
        self.prompts = common.write_jsonl(root / "prompts" / "train.jsonl", prompts)
        self._reward_model: Path | None = None
        self._teacher_cache: Path | None = None

    def tokenizer(self):
        from steps.common.models import load_tokenizer

        return load_tokenizer(str(self.model))

    def reward_model(self) -> Path:
        """A reward model for PPO to score with, trained once (not timed)."""
        if self._reward_model is None:
            from steps import reward_model

            folder = self.root / "reward-model"
            config = reward_model.RewardModelStageConfig(
                base_model=str(self.model), max_steps=4, per_device_batch_size=8,
                max_seq_length=self.shape.length, checkpoint_steps=0)
            with common.stage_job({"train": self.preferences.parent}) as job:
                with contextlib.redirect_stdout(io.StringIO()):
                    reward_model.main(config)
                (job / "model").rename(folder)
            self._reward_model = folder
        return self._reward_model

    def teacher_cache(self) -> Path:
        """The teacher's top-k outputs, written once as the TeacherLogits step writes them."""
        if self._teacher_cache is None:
            from steps import teacher_logits

            folder = self.root / "teacher-cache"
            with contextlib.redirect_stdout(io.StringIO()):
                teacher_logits.main(teacher_logits.TeacherLogitsConfig(
                    model_dir=str(self.model), data_dir=str(self.sft.parent),
                    output_dir=str(folder), top_k=16, max_seq_length=self.shape.length))
            self._teacher_cache = folder
        return self._teacher_cache


# --- Measuring a Trainer --------------------------------------------------------------------------


def tokens_per_second(trainer) -> float:
    """Non-padding tokens over trainer.train(), as the stages measure it."""
    from transformers import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    with contextlib.redirect_stdout(io.StringIO()):
        started = time.perf_counter()
        trainer.train()
        runtime = time.perf_counter() - started
    return trainer.state.num_input_tokens_seen / runtime


def baseline_arguments(args_class, shape: Shape, output_dir: str, **extra):
    """Only what fixes the work; everything else is the class's own default."""
    import torch

    return args_class(
        output_dir=output_dir, per_device_train_batch_size=shape.batch, max_steps=shape.steps,
        learning_rate=1e-4, save_strategy="no", report_to="none", disable_tqdm=True,
        logging_steps=max(shape.steps, 1), include_num_input_tokens_seen="non_padding",
        # Without a GPU the Trainer refuses bf16 (TRL's default) unless told the CPU is meant.
        use_cpu=not torch.cuda.is_available(), **extra,
    )


def plain_arguments(shape: Shape, output_dir: str, **extra):
    """A plain Trainer in the precision the stages resolve ('auto'), no checkpointing."""
    from transformers import TrainingArguments

    from steps.common.models import resolve_precision

    precision = resolve_precision("auto")
    return baseline_arguments(TrainingArguments, shape, output_dir, bf16=precision == "bf16",
                              fp16=precision == "fp16", remove_unused_columns=False, **extra)


def adapter_config(model, method: str):
    """The same adapter the stage trains (the project's PEFT config), or None."""
    from steps.common.peft_methods import PeftKnobs, peft_config

    return None if method in ("none",) else peft_config(PeftKnobs(peft_method=method), model)


def load(model: Path, method: str):
    """The model as the stage loads it for `method` (QLoRA: 4-bit NF4 base)."""
    from steps.common.models import resolve_precision
    from steps.common.peft_methods import PeftKnobs, load_model_for_training

    return load_model_for_training(str(model), PeftKnobs(peft_method=method),
                                   resolve_precision("auto"))


# --- Tokenizing for the plain loops ---------------------------------------------------------------


def _chat_ids(tokenizer, prompt: str, response: str, length: int) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of a user prompt and assistant response; the prompt masked."""
    head = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                         add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template([{"role": "user", "content": prompt},
                                          {"role": "assistant", "content": response}],
                                         tokenize=False)
    head_ids = tokenizer(head, add_special_tokens=False)["input_ids"]
    ids = tokenizer(full, add_special_tokens=False)["input_ids"][:length]
    return ids, ([-100] * len(head_ids) + ids[len(head_ids):])[:length]


def blocks_dataset(tokenizer, texts: list[str], length: int):
    """The texts joined and cut into full blocks of `length` tokens (the classic causal-LM
    recipe, in which a block's documents attend to each other)."""
    from datasets import Dataset

    ids = tokenizer("\n\n".join(texts))["input_ids"]
    blocks = [ids[i:i + length] for i in range(0, len(ids) - length + 1, length)]
    return Dataset.from_list([{"input_ids": b, "attention_mask": [1] * length, "labels": b}
                              for b in blocks])


def _pad(rows: list[list[int]], value: int):
    import torch

    width = max(map(len, rows))
    return torch.tensor([row + [value] * (width - len(row)) for row in rows])


def _sft_rows(ws: Workspace, tokenizer) -> list[dict[str, Any]]:
    from steps.common.datasets import load_records

    _, records = load_records(ws.sft.parent)
    rows = []
    for record in records:
        ids, labels = _chat_ids(tokenizer, record.data["prompt"], record.data["completion"],
                                ws.shape.length)
        rows.append({"input_ids": ids, "labels": labels})
    return rows


def _sft_collator(tokenizer):
    def collate(rows):
        ids = _pad([r["input_ids"] for r in rows], tokenizer.pad_token_id)
        return {"input_ids": ids, "attention_mask": _pad([[1] * len(r["input_ids"]) for r in rows], 0),
                "labels": _pad([r["labels"] for r in rows], -100)}
    return collate


def _pair_rows(ws: Workspace, tokenizer) -> list[dict[str, Any]]:
    from steps.common.datasets import load_records

    _, records = load_records(ws.preferences.parent)
    rows = []
    for record in records:
        chosen, chosen_labels = _chat_ids(tokenizer, record.data["prompt"],
                                          record.data["chosen"], ws.shape.length)
        rejected, rejected_labels = _chat_ids(tokenizer, record.data["prompt"],
                                              record.data["rejected"], ws.shape.length)
        rows.append({"chosen": chosen, "chosen_labels": chosen_labels, "rejected": rejected,
                     "rejected_labels": rejected_labels})
    return rows


def _pair_collator(tokenizer):
    """Chosen then rejected sequences in one batch (2B rows), as TRL's preference trainers do."""
    def collate(rows):
        seqs = [r["chosen"] for r in rows] + [r["rejected"] for r in rows]
        labels = [r["chosen_labels"] for r in rows] + [r["rejected_labels"] for r in rows]
        return {"input_ids": _pad(seqs, tokenizer.pad_token_id),
                "attention_mask": _pad([[1] * len(s) for s in seqs], 0),
                "labels": _pad(labels, -100)}
    return collate


def _sequence_logps(model, batch):
    import torch

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    logps = torch.log_softmax(logits[:, :-1].float(), -1)
    picked = torch.gather(logps, 2, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum(-1)


# --- The three ways to train each stage -----------------------------------------------------------


def project(ws: Workspace, stage: str) -> float:
    """The stage's own main(), on its defaults but the shape; tokens/s from its summary."""
    from steps import cpt, distill, dpo, ppo, reward_model, sft

    shape = {"max_steps": ws.shape.steps, "per_device_batch_size": ws.shape.batch,
             "max_seq_length": ws.shape.length, "checkpoint_steps": 0,
             "logging_steps": ws.shape.steps}
    base = {"base_model": str(ws.model), **shape}
    if stage == "cpt":
        run = (cpt.main, cpt.CPTStageConfig(**base), {"train": ws.corpus.parent})
    elif stage.startswith("sft-"):
        run = (sft.main, sft.SFTStageConfig(peft_method=stage[4:], **base),
               {"train": ws.sft.parent})
    elif stage == "reward_model":
        run = (reward_model.main, reward_model.RewardModelStageConfig(**base),
               {"train": ws.preferences.parent})
    elif stage == "dpo":
        run = (dpo.main, dpo.DPOStageConfig(**base), {"train": ws.preferences.parent})
    elif stage == "ppo":
        run = (ppo.main, ppo.PPOStageConfig(**base),
               {"train": ws.prompts.parent, "reward_model": ws.reward_model()})
    else:
        run = (distill.main, distill.DistillStageConfig(
            student_model="config:layers=2", teacher_model=str(ws.model), **shape),
            {"train": ws.sft.parent, "teacher": ws.teacher_cache()})
    summary = common.run_stage(*run)
    return summary["training"]["tokens_per_second"]


def trl_defaults(ws: Workspace, stage: str, out: str) -> float | None:
    from datasets import Dataset

    from steps.common.datasets import load_records, sft_example
    from steps.common.preference import preference_example

    tokenizer = ws.tokenizer()
    if stage == "cpt" or stage.startswith("sft-"):
        from trl import SFTConfig, SFTTrainer

        method = "none" if stage == "cpt" else stage[4:]
        if stage == "cpt":
            dataset = Dataset.from_list([{"text": d["text"]} for d in
                                         _jsonl(ws.corpus)])
        else:
            fmt, records = load_records(ws.sft.parent)
            dataset = Dataset.from_list([sft_example(r.data, fmt, True) for r in records])
        model = load(ws.model, method)
        trainer = SFTTrainer(model=model, peft_config=adapter_config(model, method),
                             args=baseline_arguments(SFTConfig, ws.shape, out,
                                                     max_length=ws.shape.length,
                                                     packing=stage == "cpt"),
                             train_dataset=dataset, processing_class=tokenizer)
        return tokens_per_second(trainer)
    if stage in ("reward_model", "dpo"):
        fmt, records = load_records(ws.preferences.parent)
        dataset = Dataset.from_list([preference_example(r.data, fmt, True) for r in records])
        if stage == "dpo":
            from trl import DPOConfig, DPOTrainer

            model = load(ws.model, "lora")
            trainer = DPOTrainer(model=model, peft_config=adapter_config(model, "lora"),
                                 args=baseline_arguments(DPOConfig, ws.shape, out,
                                                         max_length=ws.shape.length),
                                 train_dataset=dataset, processing_class=tokenizer)
        else:
            from transformers import AutoModelForSequenceClassification
            from trl import RewardConfig, RewardTrainer

            model = AutoModelForSequenceClassification.from_pretrained(ws.model, num_labels=1)
            model.config.pad_token_id = tokenizer.pad_token_id
            trainer = RewardTrainer(model=model, args=baseline_arguments(
                RewardConfig, ws.shape, out, max_length=ws.shape.length),
                train_dataset=dataset, processing_class=tokenizer)
        return tokens_per_second(trainer)
    return None  # ppo and distill: no TRL trainer does the same training (see NOT_COMPARED)


def plain_trainer(ws: Workspace, stage: str, out: str) -> float | None:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, Trainer

    tokenizer = ws.tokenizer()
    args = plain_arguments(ws.shape, out)
    if stage == "cpt":
        from transformers import default_data_collator

        dataset = blocks_dataset(tokenizer, [d["text"] for d in _jsonl(ws.corpus)],
                                 ws.shape.length)
        trainer = Trainer(model=load(ws.model, "none"), args=args, train_dataset=dataset,
                          data_collator=default_data_collator)
        return tokens_per_second(trainer)
    if stage.startswith("sft-"):
        from peft import get_peft_model

        method = stage[4:]
        model = load(ws.model, method)
        if method != "none":
            model = get_peft_model(model, adapter_config(model, method))
        trainer = Trainer(model=model, args=args,
                          train_dataset=Dataset.from_list(_sft_rows(ws, tokenizer)),
                          data_collator=_sft_collator(tokenizer))
        return tokens_per_second(trainer)
    if stage in ("reward_model", "dpo"):
        dataset = Dataset.from_list(_pair_rows(ws, tokenizer))
        if stage == "reward_model":
            from transformers import AutoModelForSequenceClassification

            class BradleyTerry(Trainer):  # the pairwise loss, written out
                def compute_loss(self, model, inputs, return_outputs=False,
                                 num_items_in_batch=None):
                    rewards = model(input_ids=inputs["input_ids"],
                                    attention_mask=inputs["attention_mask"]).logits.squeeze(-1)
                    chosen, rejected = rewards.chunk(2)
                    return -torch.nn.functional.logsigmoid(chosen - rejected).mean()

            model = AutoModelForSequenceClassification.from_pretrained(ws.model, num_labels=1)
            model.config.pad_token_id = tokenizer.pad_token_id
            trainer = BradleyTerry(model=model, args=args, train_dataset=dataset,
                                   data_collator=_pair_collator(tokenizer))
        else:
            from peft import get_peft_model

            class SigmoidDPO(Trainer):  # DPO's loss, written out; the reference: adapter off
                def compute_loss(self, model, inputs, return_outputs=False,
                                 num_items_in_batch=None):
                    policy = _sequence_logps(model, inputs)
                    with torch.no_grad(), model.disable_adapter():
                        reference = _sequence_logps(model, inputs)
                    pc, pr = policy.chunk(2)
                    rc, rr = reference.chunk(2)
                    return -torch.nn.functional.logsigmoid(0.1 * ((pc - rc) - (pr - rr))).mean()

            model = load(ws.model, "lora")
            trainer = SigmoidDPO(model=get_peft_model(model, adapter_config(model, "lora")), args=args,
                                 train_dataset=dataset, data_collator=_pair_collator(tokenizer))
        return tokens_per_second(trainer)
    if stage == "distill":
        from steps.common.students import config_student

        teacher = AutoModelForCausalLM.from_pretrained(ws.model).eval().requires_grad_(False)

        class OnTheFlyDistillation(Trainer):  # KL to the softened teacher + CE, written out
            def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
                temperature, alpha = 2.0, 0.5
                out = model(**inputs)
                with torch.no_grad():
                    t_logits = teacher(input_ids=inputs["input_ids"],
                                       attention_mask=inputs["attention_mask"]).logits
                mask = inputs["labels"][:, 1:] != -100
                s = torch.log_softmax(out.logits[:, :-1].float() / temperature, -1)[mask]
                t = torch.log_softmax(t_logits[:, :-1].float() / temperature, -1)[mask]
                kl = torch.nn.functional.kl_div(s, t, log_target=True, reduction="batchmean")
                return alpha * out.loss + (1 - alpha) * temperature**2 * kl

        student = config_student("config:layers=2", teacher.config.to_dict(), 42)
        trainer = OnTheFlyDistillation(model=student, args=args,
                                       train_dataset=Dataset.from_list(_sft_rows(ws, tokenizer)),
                                       data_collator=_sft_collator(tokenizer))
        return tokens_per_second(trainer)
    return None  # ppo: no rollout loop in a plain Trainer (see NOT_COMPARED)


def _jsonl(path: Path) -> list[dict[str, Any]]:
    import json

    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


NOT_COMPARED = {
    ("ppo", "trl"): "TRL 1.16 ships no PPO trainer (removed after 1.12)",
    ("distill", "trl"): "TRL 1.16's DistillationTrainer trains on-policy only (the student "
                        "generates, the teacher scores), not the same training as the stage's "
                        "off-policy distillation from cached teacher outputs",
    ("ppo", "plain"): "a plain Trainer has no rollout loop",
}
# Baselines that fail for a known reason, and the reason.
KNOWN_FAILURES = {
    ("sft-prefix_tuning", "trl"): "TRL's default activation checkpointing breaks prefix tuning "
                                  "(a size mismatch in attention); the stage refuses that "
                                  "combination up front",
}
WHY_SLOWER = {
    "trl": "TRL's defaults: bf16 + activation checkpointing (+~50% time on a CPU) and, for "
           "SFT/DPO, a chunked LM head that also computes entropy and accuracy",
}


# --- The run --------------------------------------------------------------------------------------


def measure(stages: list[str], shape: Shape, repeats: int,
            trl_repeats: int) -> dict[str, dict[str, list[float]]]:
    import torch

    runs: dict[str, dict[str, list[float]]] = {s: {"project": [], "trl": [], "plain": []}
                                                for s in stages}
    errors: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="bench-throughput-") as tmp:
        ws = Workspace(Path(tmp), shape)
        ways: dict[str, Callable[..., float | None]] = {
            "project": lambda s, out: project(ws, s),
            "trl": lambda s, out: trl_defaults(ws, s, out),
            "plain": lambda s, out: plain_trainer(ws, s, out),
        }
        for repeat in range(repeats):
            for stage in stages:
                for way, fn in ways.items():
                    if (stage, way) in NOT_COMPARED or f"{stage}/{way}" in errors:
                        continue
                    if way == "trl" and repeat >= trl_repeats:
                        continue
                    torch.manual_seed(0)
                    with tempfile.TemporaryDirectory(dir=tmp) as out:
                        try:
                            value = fn(stage, out)
                        except Exception as err:  # noqa: BLE001 (a baseline that cannot run)
                            errors[f"{stage}/{way}"] = f"{type(err).__name__}: {str(err)[:200]}"
                            common.progress(f"{stage} {way}: failed ({errors[f'{stage}/{way}']})")
                            continue
                    if value is not None:
                        runs[stage][way].append(value)
                        common.progress(f"repeat {repeat + 1}/{repeats} {stage:22s} {way:8s} "
                                        f"{value:,.0f} tokens/s")
    return {"runs": runs, "errors": errors}


def render(measured: dict[str, Any], shape: Shape, repeats: int,
           trl_repeats: int) -> tuple[str, list[dict]]:
    runs, errors = measured["runs"], measured["errors"]
    rows, data = [], []
    for stage, ways in runs.items():
        project_tps = common.median(ways["project"])
        trl_tps, plain_tps = common.median(ways["trl"]), common.median(ways["plain"])
        vs_trl = project_tps / trl_tps if ways["trl"] else None
        vs_plain = project_tps / plain_tps if ways["plain"] else None
        verdict = []
        for name, value, target in (("TRL", vs_trl, TARGET_VS_TRL),
                                    ("plain", vs_plain, TARGET_VS_PLAIN)):
            key = "trl" if name == "TRL" else "plain"
            if value is None:
                why = NOT_COMPARED.get((stage, key)) or errors.get(f"{stage}/{key}", "not run")
                why = KNOWN_FAILURES.get((stage, key), why) if f"{stage}/{key}" in errors else why
                verdict.append(f"vs {name}: not compared ({why})")
            elif value < target:
                overlap = ways[key] and max(ways["project"]) >= min(ways[key])
                verdict.append(f"vs {name}: **misses {target}×**" + (
                    " (the runs' ranges overlap: within this machine's noise)" if overlap
                    else ""))
        rows.append([stage, common.spread(ways["project"]), common.spread(ways["trl"]),
                     common.spread(ways["plain"]),
                     f"{vs_trl:.2f}×" if vs_trl else "—", f"{vs_plain:.2f}×" if vs_plain else "—",
                     "; ".join(verdict) or "meets both"])
        data.append({"stage": stage, "project": ways["project"], "trl": ways["trl"],
                     "plain": ways["plain"], "vs_trl": vs_trl, "vs_plain": vs_plain})
    text = (
        f"Tokens/s (non-padding) over `trainer.train()`, median (min–max) of {repeats} interleaved "
        f"runs ({trl_repeats} of the TRL-defaults baseline, the slowest); {shape.steps} optimizer steps of batch {shape.batch} × up to {shape.length} "
        f"tokens on a config-built {common.SMALL['num_hidden_layers']}-layer, hidden-"
        f"{common.SMALL['hidden_size']} Llama with a byte-level tokenizer (about 3.4M "
        "parameters). SFT/CPT/reward/DPO/distillation data: the built-in demo datasets. "
        f"Targets: at least {TARGET_VS_TRL}× TRL with its defaults, at least "
        f"{TARGET_VS_PLAIN}× a plain Trainer.\n\n"
        + common.table(["stage", "project tokens/s", "TRL defaults", "plain Trainer",
                        "vs TRL", "vs plain", "targets"], rows)
        + "\n\nWhy the baselines differ: " + WHY_SLOWER["trl"] + ". The plain Trainer runs in "
        "the precision the stages resolve, without checkpointing, so the ratio against it is the "
        "cost of what a stage adds to the loop (metrics, stop-token checks, masks). Distillation "
        "baselines run the teacher forward on every step; the stage reads the teacher's top-k "
        "outputs that the TeacherLogits step cached once, which is the design. DPO and the reward "
        "model forward chosen and rejected sequences, so they count both."
    )
    return text, data


def plot(data: list[dict]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = [d["stage"] for d in data]
    fig, ax = plt.subplots(figsize=(11, 4))
    width = 0.27
    for k, (way, label) in enumerate((("project", "project stage"), ("trl", "TRL defaults"),
                                      ("plain", "plain Trainer"))):
        values = [common.median(d[way]) if d[way] else 0 for d in data]
        ax.bar([i + (k - 1) * width for i in range(len(stages))], values, width, label=label)
    ax.set_xticks(range(len(stages)), stages, rotation=30, ha="right")
    ax.set_ylabel("tokens/s (median)")
    ax.set_title("Training throughput: project stages against the baselines")
    ax.legend()
    return common.save_figure(fig, "throughput")


def rerender() -> None:
    """The section again from results/throughput.json's figures (after a change to its text)."""
    import json

    saved = json.loads((common.RESULTS_DIR / "throughput.json").read_text())
    data = saved["data"]
    runs = {d["stage"]: {way: d[way] for way in ("project", "trl", "plain")}
            for d in data["stages"]}
    errors = {k: v for k, v in data["errors"].items()
              if tuple(k.split("/")) not in NOT_COMPARED}
    shape = Shape(**data["shape"])
    trl_repeats = data.get("trl_repeats", 1)
    text, stages = render({"runs": runs, "errors": errors}, shape, data["repeats"], trl_repeats)
    common.save_result("throughput", saved["title"], text,
                       {**data, "stages": stages, "errors": errors, "trl_repeats": trl_repeats},
                       order=saved["order"], plots=[plot(stages)],
                       environment=saved["environment"], command=saved["command"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stages", default=",".join(STAGES),
                        help=f"comma-separated, of: {', '.join(STAGES)}")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--trl-repeats", type=int, default=1,
                        help="runs of the TRL-defaults baseline (slowest, and far behind)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--quick", action="store_true", help="1 repeat of 3 steps")
    parser.add_argument("--render", action="store_true",
                        help="re-render results/throughput.json from its saved figures")
    args = parser.parse_args()
    if args.render:
        rerender()
        return
    stages = [s for s in args.stages.split(",") if s]
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        parser.error(f"unknown stage(s) {', '.join(unknown)}; choose from {', '.join(STAGES)}")
    repeats, steps = (1, 3) if args.quick else (args.repeats, args.steps)
    shape = Shape(args.batch, args.length, steps)
    trl_repeats = min(repeats, args.trl_repeats)
    measured = measure(stages, shape, repeats, trl_repeats)
    text, data = render(measured, shape, repeats, trl_repeats)
    common.save_result("throughput", "Training throughput against TRL and a plain Trainer", text,
                       {"shape": shape.__dict__, "repeats": repeats, "trl_repeats": trl_repeats,
                        "stages": data,
                        "errors": measured["errors"]}, order=10, plots=[plot(data)])


if __name__ == "__main__":
    main()

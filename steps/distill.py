"""Knowledge distillation (training stage): a student learns from a teacher's next-token
distributions as well as from the data.

In a SageMaker training container: ``python -m steps.distill`` with hyperparameters.json and the
channels
  train          the training data (required), as for steps.sft;
  validation     held-out data (optional): the student's loss and its KL to the teacher on it;
  teacher        the teacher's cached top-k outputs from steps.teacher_logits (optional);
  teacher_model  a teacher model, if not given as `teacher_model` (optional);
  model          the student's starting model, if not given as `student_model` (optional).
Locally: ``python -m steps.distill --student_model config:layers=1 --teacher_model builtin:tiny``.

The loss per trained token (the tokens SFT would train: completions, assistant turns, text):

    loss = alpha * CE(student, ground truth) + (1 - alpha) * T^2 * KL(teacher_T || student_T)

where teacher_T is the teacher's top-k distribution softened by the temperature T and renormalised
over those k tokens (steps.common.distillation.top_k_kl documents the approximation), and T^2 keeps
the soft term's gradients on the scale of the hard term's as T grows (Hinton et al., 2015). Both
terms are summed over the tokens and divided by the tokens of the whole accumulated batch
(`num_items_in_batch`), so gradient accumulation gives the gradients of the larger batch.

Prompts without reference answers: when the cached outputs hold the teacher's answers to such
prompts (the 'teacher_answered' split, steps.teacher_logits --prompts-dir) and teacher_answers is
true, the student trains on them beside the labelled data, with the same loss (their "ground truth"
is the teacher's answer: sequence-level distillation, Kim & Rush 2016). This is what a teacher is
for when labels are scarce and prompts are not, and what a student trained on the labels alone
cannot have.

Where the teacher's distributions come from (`teacher_outputs` in training_summary.json):
  cached      the 'teacher' channel: no teacher forward pass at all in this job; any number of
              students (sizes, alphas, temperatures, top_k up to the cached k) reuse one cache.
  on_the_fly  no 'teacher' channel but a teacher model: it runs once over the training (and
              validation) examples before training, in this job, then is freed; the cost of one
              steps.teacher_logits run, paid again by every student run.
  on_policy   on_policy=true (GKD-style; needs a teacher model): each step the student samples a
              continuation of each prompt (temperature 1, up to max_new_tokens), the teacher scores
              the student's own tokens, and the student minimises the same KL on them; alpha still
              weighs the ground-truth CE of the batch. One teacher forward pass per micro-batch,
              plus generation: several times the cost of an off-policy step. Written by hand, as a
              compute_loss branch of the trainer below: TRL's GKDTrainer needs its own ChatML
              collator and SFTTrainer's chunked head, applies no temperature to its loss and has no
              hard-label term; TRL's DistillationTrainer is a GRPO-style generation trainer with a
              live teacher and no cached outputs. The on-policy term is normalised per micro-batch
              by its generated tokens (their count is not known before generation) and divided by
              the accumulation steps: exact only without accumulation.

The student: the 'model' channel, or `student_model` (steps.common.students):
  teacher:layers=N[+intermediate=I]   the teacher itself cut down: N of its decoder layers kept,
                                      evenly spaced (or teacher:keep_layers=0/4/8/...), and
                                      optionally its MLP narrowed to the I channels most active on
                                      a few training batches; trained fully (peft_method none).
                                      Needs the teacher's weights: the 'teacher_model' channel (or
                                      teacher_model) beside the cached outputs. The default of the
                                      recipes: it starts from what the teacher knows.
  config:layers=L+hidden=H+...        the teacher's architecture resized, with random weights
                                      (keys: layers, hidden, intermediate, heads, kv_heads, or any
                                      config attribute): it must learn the language from scratch.
  a model spec                        a smaller pretrained model of the teacher's tokenizer.
Teacher and student must share the tokenizer: distributions are compared token id by token id, so
a student whose vocabulary fingerprint differs from the teacher's is refused (an explicit
vocabulary mapping is out of scope).

With compare_students=true the stage also answers whether distillation earned its place: it
measures on the validation split, with steps.evaluate's own measurements (loss and perplexity of
the responses, greedy answers' ROUGE-L, exact match and EOS rate, at most comparison_samples
answers of comparison_new_tokens tokens) and the KL to the teacher,
  initial     the student as it started, before any training;
  hard_label  the same initial student trained on the ground truth alone (alpha 1) with the same
              steps, schedule, batch size and seed, on every labelled example and nothing else
              (no teacher-answered prompts): what the same compute buys without a teacher;
  distilled   the student this stage saves;
and records them under distillation.comparison in training_summary.json, from which steps.evaluate
reports them. It costs a second training run of the student.

Writes to SM_MODEL_DIR the student (a full model, or an adapter for a PEFT method over a pretrained
student), its tokenizer and training_summary.json (with a `distillation` record: teacher, T, alpha,
top_k, teacher forward passes made, validation KL to the teacher); to SM_OUTPUT_DATA_DIR
metrics.jsonl and loss_curve.png.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import transformers
from transformers import PreTrainedModel, PrinterCallback, Trainer, TrainerCallback

from steps.common import contract, distillation, students
from steps.common.contract import StageError
from steps.common.datasets import DatasetFormat, Record, load_records
from steps.common.distillation import Example, TeacherCounter
from steps.common.metrics import log_metrics
from steps.common.models import load_model, load_tokenizer, resolve_model_source, stop_token_ids
from steps.common.peft_methods import (
    apply_peft,
    load_model_for_training,
    save_model,
)
from steps.common.sharding import gather_trained_model, prepare_sharding
from steps.common.training import (
    metrics_callback,
    prepare_precision,
    resolve_checkpointing,
    save_training_record,
    train,
    trainer_arguments,
    training_summary,
)
from steps.distill_config import DistillStageConfig
from steps.evaluate import held_out_examples, model_metrics, score_model

# Training examples whose MLP activations rank the channels a width-pruned student keeps.
CALIBRATION_EXAMPLES = 64


class TopKDistillationTrainer(Trainer):
    """A Trainer whose loss is the distillation loss of the module docstring.

    Batches carry the teacher's top-k ids and log-probabilities of every loss position, in the
    order of ``labels[:, 1:] != -100`` (row by row), which is the order the student's logits are
    gathered in. Evaluation (the Trainer's eval_loss) is the ground-truth CE alone: the number SFT
    reports, and the one the evaluation stage's perplexity is computed from.
    """

    # compute_loss divides by num_items_in_batch (the trained tokens of the whole accumulated
    # batch) itself: the Trainer must not divide by the accumulation steps again.
    loss_is_scaled_for_ga = True

    def __init__(self, *args: Any, temperature: float, alpha: float,
                 teacher: PreTrainedModel | None = None, counter: TeacherCounter | None = None,
                 max_new_tokens: int = 64, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.temperature, self.alpha = temperature, alpha
        self.teacher, self.counter, self.max_new_tokens = teacher, counter, max_new_tokens

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs["labels"]
        mask = labels[:, 1:] != -100
        count = num_items_in_batch if num_items_in_batch is not None else mask.sum()
        on_policy = self.teacher is not None and model.training
        outputs = None
        ce_sum = torch.zeros((), device=labels.device)
        if not on_policy or self.alpha > 0:
            logits, outputs = self._trained_logits(model, inputs["input_ids"],
                                                   inputs["attention_mask"], mask)
            ce_sum = F.cross_entropy(logits.float(), labels[:, 1:][mask], reduction="sum")
        # num_items_in_batch counts every process's tokens while DDP averages the gradients over
        # the processes: a sum over all tokens / all tokens needs the average undone, as
        # Trainer.compute_loss does.
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            count = count / self.accelerator.num_processes
        if not model.training:
            loss = ce_sum / count
        elif on_policy:
            kl = self._on_policy_kl(model, inputs)
            loss = self.alpha * ce_sum / count + (1 - self.alpha) * self.temperature**2 * kl
        elif self.alpha == 1:  # the ground truth alone (a hard-label student): no KL to compute
            loss = ce_sum / count
        else:
            kl_sum = distillation.top_k_kl(logits, inputs["top_k_ids"], inputs["top_k_logprobs"],
                                           self.temperature).sum()
            loss = (self.alpha * ce_sum + (1 - self.alpha) * self.temperature**2 * kl_sum) / count
        return (loss, outputs) if return_outputs else loss

    def _trained_logits(self, model: PreTrainedModel, input_ids: torch.Tensor,
                        attention_mask: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """The logits that predict a trained token, [trained positions, vocab], and the outputs.

        The output head runs only at the positions some row of the batch trains
        (transformers' logits_to_keep): the vocabulary projection is about a third of a small
        student's compute, and the prompts, most of each sequence, train nothing. A
        prompt-learning adapter prepends virtual tokens, which shift the positions: it gets
        every position's logits, as does a model whose forward takes no logits_to_keep.
        """
        if _keeps_logits(self.accelerator.unwrap_model(model)):
            kept = mask.any(0).nonzero().squeeze(-1)
            outputs = model(input_ids=input_ids, attention_mask=attention_mask,
                            logits_to_keep=kept)
            return outputs.logits[mask[:, kept]], outputs
        outputs = model(input_ids=input_ids, attention_mask=attention_mask)
        return _trained_logits(outputs.logits, input_ids, mask), outputs

    def _on_policy_kl(self, model: PreTrainedModel, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean KL(teacher_T || student_T) over the tokens the student samples for the prompts."""
        tokenizer = self.processing_class
        student = self.accelerator.unwrap_model(model)
        with torch.no_grad():
            sequences = student.generate(
                input_ids=inputs["prompt_ids"], attention_mask=inputs["prompt_attention_mask"],
                do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                max_new_tokens=self.max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                eos_token_id=stop_token_ids(student, tokenizer),
            )
        # The student's samples as examples: each prompt (without its left padding) and what
        # followed it up to and including the first stop token, which alone carries loss.
        stops = set(stop_token_ids(student, tokenizer))
        width = inputs["prompt_ids"].shape[1]
        samples = []
        for row, prompt_mask in zip(sequences.tolist(), inputs["prompt_attention_mask"].tolist()):
            prompt = [t for t, keep in zip(row[:width], prompt_mask) if keep]
            generated = row[width:]
            end = next((i + 1 for i, t in enumerate(generated) if t in stops), len(generated))
            generated = generated[:max(end, 1)]
            samples.append(Example(prompt + generated, [-100] * len(prompt) + generated))
        distillation.teacher_top_k(self.teacher, samples, inputs["top_k"], len(samples),
                                   tokenizer.pad_token_id, self.counter, progress=False)
        device = inputs["input_ids"].device
        input_ids, attention_mask, labels = distillation.pad_batch(
            samples, tokenizer.pad_token_id, device)
        mask = labels[:, 1:] != -100
        logits = _trained_logits(model(input_ids=input_ids, attention_mask=attention_mask).logits,
                                 input_ids, mask)
        top_ids = torch.cat([s.top_k_ids for s in samples]).to(device)
        top_logprobs = torch.cat([s.top_k_logprobs for s in samples]).to(device)
        kl = distillation.top_k_kl(logits, top_ids, top_logprobs, self.temperature)
        return kl.mean() / self.current_gradient_accumulation_steps


def _keeps_logits(model: PreTrainedModel) -> bool:
    """Whether `model`'s forward computes the logits of chosen positions only (logits_to_keep)."""
    config = getattr(model, "active_peft_config", None)
    if config is not None and config.is_prompt_learning:
        return False
    base = model.get_base_model() if config is not None else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def _trained_logits(logits: torch.Tensor, input_ids: torch.Tensor,
                    mask: torch.Tensor) -> torch.Tensor:
    """[trained positions, vocab]: the logits that predict a trained token (logits at t predict
    t + 1). A prompt-learning adapter's virtual-token logits come first: dropped."""
    return logits[:, -input_ids.shape[1]:][:, :-1][mask]


class Collator:
    """Right-padded ids, mask and labels; the teacher's top-k of the batch's loss positions in
    row order; for on-policy, the prompts left-padded (generation continues at the right edge)."""

    def __init__(self, pad_token_id: int, top_k: int, on_policy: bool) -> None:
        self.pad_token_id, self.top_k, self.on_policy = pad_token_id, top_k, on_policy

    def __call__(self, examples: list[Example]) -> dict[str, torch.Tensor | int]:
        input_ids, attention_mask, labels = distillation.pad_batch(examples, self.pad_token_id)
        batch: dict[str, torch.Tensor | int] = {
            "input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
        }
        if examples[0].top_k_ids is not None:
            batch["top_k_ids"] = torch.cat([e.top_k_ids for e in examples])
            batch["top_k_logprobs"] = torch.cat([e.top_k_logprobs for e in examples])
        if self.on_policy:
            prompts = [e.input_ids[:e.prompt_length] for e in examples]
            width = max(len(p) for p in prompts)
            batch["prompt_ids"] = torch.tensor(
                [[self.pad_token_id] * (width - len(p)) + p for p in prompts])
            batch["prompt_attention_mask"] = torch.tensor(
                [[0] * (width - len(p)) + [1] * len(p) for p in prompts])
            batch["top_k"] = self.top_k
        return batch


def main(config: DistillStageConfig) -> None:
    transformers.set_seed(config.seed)
    model_dir = contract.model_dir()

    # 1. Data: every record is read and checked before any model loads.
    train_format, train_records = load_records(contract.channel_dir("train"))
    validation_dir = contract.optional_channel_dir("validation")
    validation = load_records(validation_dir) if validation_dir else None
    print(f"train: {len(train_records)} {train_format.name} records; validation: "
          f"{len(validation[1]) if validation else 0} records", flush=True)

    # 2. Who teaches, who learns, and the examples with the teacher's top-k for each.
    teacher = resolve_teacher(config)
    student = resolve_student(config, teacher)
    train_examples, validation_examples, counter = build_data(
        config, teacher, student.tokenizer, (train_format, train_records), validation)
    answered = teacher_answered(config, teacher)

    # 3. The student model.
    precision = prepare_precision(config)
    prepare_sharding(config)  # FSDP across the job's GPUs, or one line saying why not
    print(f"student: {student.spec}; peft_method: {config.peft_method}; "
          f"{config.learning_rate_line()}", flush=True)
    model, cut = build_student_model(config, student, teacher, train_examples, precision)
    _check_vocabulary_size(model, train_examples + answered + validation_examples, student.spec)
    if teacher.mode == "on_the_fly":
        teacher.model = None  # its outputs are attached to the examples: free it before training
    print(f"student parameters: {sum(p.numel() for p in model.parameters()):,}", flush=True)
    checkpointing = resolve_checkpointing(config, "distill", model, precision,
                                          teacher=teacher.model if config.on_policy else None)
    comparing = config.compare_students and bool(validation_examples)
    if config.compare_students and not comparing:
        print("compare_students: no validation data to compare the students on; skipped",
              flush=True)
    initial = copy.deepcopy(model) if comparing else None
    tokenizer = student.tokenizer

    # 4. Train with the shared knobs, checkpoints and metrics; evaluate.
    metrics, metrics_path = metrics_callback()
    args = trainer_arguments(config, precision, remove_unused_columns=False,
                             prediction_loss_only=True)
    trainer = TopKDistillationTrainer(
        model=model, args=args, train_dataset=train_examples + answered,
        eval_dataset=validation_examples or None, processing_class=tokenizer,
        data_collator=Collator(tokenizer.pad_token_id, config.top_k, config.on_policy),
        callbacks=[metrics], temperature=config.temperature, alpha=config.alpha,
        teacher=teacher.model if config.on_policy else None, counter=counter,
        max_new_tokens=config.max_new_tokens,
    )
    report = train(trainer, config, metrics, metrics_path)
    weights = gather_trained_model(trainer.model)  # sharded: the whole weights, for saving
    hard_label, hard_label_runtime = (train_hard_label(copy.deepcopy(initial), config, precision,
                                                       tokenizer, train_examples,
                                                       report.global_step)
                                      if comparing else (None, None))
    if not trainer.is_world_process_zero():
        return
    kl = None
    if validation_examples and validation_examples[0].top_k_ids is not None:
        kl = kl_to_teacher(trainer.model, validation_examples, config.per_device_batch_size,
                           tokenizer.pad_token_id)
        log_metrics({"step": report.global_step, "eval_kl_to_teacher": kl}, metrics_path)
    comparison = None
    if comparing:
        comparison = compare_students(
            {"initial": initial, "hard_label": hard_label, "distilled": trainer.model},
            tokenizer, validation, validation_examples, config)
        comparison.update(steps=report.global_step, hard_label_runtime_s=hard_label_runtime,
                          labelled_examples=len(train_examples),
                          teacher_answered_examples=len(answered))

    # 5. Save, all or nothing.
    from_teacher = student.built or student.pruned is not None
    summary = training_summary(
        "distill", config,
        # What evaluation compares the student with: the model it started from, or (for a
        # student built from or cut from its teacher) the teacher.
        teacher.name if from_teacher else student.spec,
        precision, report,
        gradient_checkpointing=checkpointing,
        student_model=student.spec,
        data_format=train_format.name,
        train_examples=len(train_examples),
        teacher_answered_examples=len(answered),
        validation_examples=len(validation_examples),
        distillation={
            "teacher": teacher.name,
            "teacher_outputs": teacher.mode,
            "teacher_forward_passes": counter.forward_passes,
            "temperature": config.temperature,
            "alpha": config.alpha,
            "top_k": config.top_k,
            "on_policy": config.on_policy,
            "vocab_sha256": student.vocab_sha256,
            "eval_kl_to_teacher": kl,
            **({"student": cut} if cut else {}),
            **({"comparison": comparison} if comparison else {}),
        },
    )
    with contract.atomic_output(model_dir) as staging:
        save_model(trainer.model, tokenizer, staging, config, state_dict=weights)
        # A student cut from its teacher continues the teacher's lineage.
        save_training_record(staging, summary, started_from=(
            teacher.spec if student.pruned else student.spec))
    print(f"teacher forward passes in this job: {counter.forward_passes}", flush=True)
    print(f"saved the student, tokenizer and training_summary.json to {model_dir}", flush=True)


# --- Setting up: the teacher, the student, the examples ------------------------------------------


@dataclass
class Teacher:
    """Where this job's teacher distributions come from (`mode`, as training_summary.json records
    it), and the teacher's weights when the job has them."""

    mode: str                          # cached | on_the_fly | on_policy
    name: str                          # the teacher as recorded: the cache's model, or `spec`
    spec: str | None                   # the teacher model this job can load, if any
    cache_dir: Path | None = None      # steps.teacher_logits' output, for `cached`
    manifest: dict[str, Any] | None = None
    model: PreTrainedModel | None = None  # loaded when this job runs it

    @property
    def vocab_sha256(self) -> str:
        if self.mode == "cached":
            return self.manifest["tokenizer"]["vocab_sha256"]
        return distillation.vocab_fingerprint(load_tokenizer(self.spec))

    @property
    def where(self) -> str:
        return f"{self.cache_dir}/{distillation.MANIFEST}" if self.mode == "cached" else self.spec


def resolve_teacher(config: DistillStageConfig) -> Teacher:
    """The teacher: its cached outputs (the 'teacher' channel), or a model this job runs (the
    'teacher_model' channel or setting), loaded unless its outputs are cached."""
    cache_dir = contract.optional_channel_dir("teacher")
    spec = _model_spec(contract.optional_channel_dir("teacher_model"), config.teacher_model)
    manifest = distillation.read_manifest(cache_dir) if cache_dir else None
    if config.on_policy:
        mode = "on_policy"
        if spec is None:
            raise StageError(
                "on_policy=true needs a teacher model to score the student's samples (cached "
                "outputs cover the data only): set teacher_model or give a 'teacher_model' channel"
            )
    elif manifest is not None:
        mode = "cached"
    elif spec is not None:
        mode = "on_the_fly"
    else:
        raise StageError(
            "no teacher: give the job a 'teacher' channel (steps.teacher_logits output), or set "
            "teacher_model (or a 'teacher_model' channel) to run the teacher in this job"
        )
    if manifest is not None and mode != "cached":
        print(f"on_policy: the cached outputs in {cache_dir} are not used", flush=True)
    if mode == "cached" and spec is not None:
        print(f"teacher_model {spec}: its cached outputs are used, not run again", flush=True)
    teacher = Teacher(mode=mode, name=manifest["teacher"]["model"] if mode == "cached" else spec,
                      spec=spec, cache_dir=cache_dir if mode == "cached" else None,
                      manifest=manifest if mode == "cached" else None)
    print(f"teacher: {teacher.name} ({mode}); T={config.temperature:g}, alpha={config.alpha:g}, "
          f"top_k={config.top_k}", flush=True)
    if mode == "cached":
        if config.top_k > manifest["top_k"]:
            raise StageError(
                f"top_k={config.top_k} but the cached teacher outputs in {cache_dir} hold the top "
                f"{manifest['top_k']}; set top_k <= {manifest['top_k']} or rerun teacher_logits"
            )
        return teacher
    teacher.model = load_model(spec).eval()
    rows = teacher.model.get_output_embeddings().weight.shape[0]
    if config.top_k > rows:
        raise StageError(f"top_k={config.top_k} exceeds the teacher's {rows} output tokens; "
                         "lower top_k")
    if torch.cuda.is_available():
        teacher.model.to("cuda")
    return teacher


@dataclass
class Student:
    """The student as its spec names it, before any weights load, and its tokenizer."""

    spec: str
    pruned: students.PrunedStudent | None  # cut from the teacher's weights
    built: bool                            # config-built from random weights
    tokenizer: transformers.PreTrainedTokenizerBase

    @property
    def vocab_sha256(self) -> str:
        return distillation.vocab_fingerprint(self.tokenizer)


def resolve_student(config: DistillStageConfig, teacher: Teacher) -> Student:
    """The student the 'model' channel or `student_model` names, and its tokenizer, which must be
    the teacher's."""
    spec = _model_spec(contract.optional_channel_dir("model"), config.student_model)
    if spec is None:
        raise StageError(
            "no student: set student_model (teacher:layers=N for the teacher cut down, "
            "config:layers=N+... for a resized copy of its architecture, or a model spec) or give "
            "the job a 'model' channel"
        )
    built = students.is_config_student(spec)
    pruned = students.parse(spec)
    if not isinstance(pruned, students.PrunedStudent):
        pruned = None
    elif teacher.spec is None:
        raise StageError(
            f"student_model {spec} is cut from the teacher's weights, which this job does not "
            "have (cached outputs hold no weights): give it a 'teacher_model' channel or set "
            "teacher_model"
        )
    if config.student is not None and spec != config.student_model:
        # The learning rate was chosen for that student (steps.distill_config); the channel's
        # model would train at a rate meant for another start.
        raise StageError(
            f"student_model {config.student_model} asks for a new student, but the job's 'model' "
            "channel holds one; remove student_model, or give the stage no model input "
            "(inputs: {model: base})"
        )
    if pruned:
        tokenizer = load_tokenizer(teacher.spec)  # the teacher's, with its chat template
    elif built:
        tokenizer = (load_tokenizer(str(teacher.cache_dir / distillation.TOKENIZER_FOLDER))
                     if teacher.mode == "cached" else load_tokenizer(teacher.spec))
    else:
        tokenizer = load_tokenizer(spec)
    student = Student(spec=spec, pruned=pruned, built=built, tokenizer=tokenizer)
    if student.vocab_sha256 != teacher.vocab_sha256:
        raise StageError(
            f"the student's tokenizer ({spec}: vocab sha256 {student.vocab_sha256[:12]}, "
            f"{len(tokenizer)} tokens) is not the teacher's ({teacher.where}: vocab sha256 "
            f"{teacher.vocab_sha256[:12]}); distillation compares distributions token by token, "
            "so use a student of the teacher's tokenizer, e.g. student_model=teacher:layers=N"
        )
    return student


def build_data(config: DistillStageConfig, teacher: Teacher,
               tokenizer: transformers.PreTrainedTokenizerBase,
               train_data: tuple[DatasetFormat, list[Record]],
               validation: tuple[DatasetFormat, list[Record]] | None,
               ) -> tuple[list[Example], list[Example], TeacherCounter]:
    """The training and validation examples, tokenized as the teacher's were, each with the
    teacher's top-k (from the cache, or from running the teacher here); and the count of teacher
    forward passes this made."""
    train_format, train_records = train_data
    train_examples = distillation.tokenize_examples(train_records, train_format, tokenizer,
                                                    config.max_seq_length)
    validation_examples = (distillation.tokenize_examples(validation[1], validation[0], tokenizer,
                                                          config.max_seq_length)
                           if validation else [])
    counter = TeacherCounter()
    if teacher.mode == "cached":
        train_examples = _cached(teacher.cache_dir, teacher.manifest, "train", train_examples,
                                 config)
        if validation_examples and "validation" in teacher.manifest["splits"]:
            validation_examples = _cached(teacher.cache_dir, teacher.manifest, "validation",
                                          validation_examples, config)
        elif validation_examples:
            print("the teacher outputs have no validation split: no KL to the teacher is measured "
                  "on validation", flush=True)
    else:
        for name, examples in (("train", train_examples), ("validation", validation_examples)):
            if examples and (teacher.mode == "on_the_fly" or name == "validation"):
                print(f"teacher: scoring {len(examples)} {name} examples", flush=True)
                distillation.teacher_top_k(teacher.model, examples, config.top_k,
                                           config.teacher_batch_size, tokenizer.pad_token_id,
                                           counter)
    if config.on_policy and any(e.prompt_length == 0 for e in train_examples):
        raise StageError(
            f"on_policy=true needs prompts to continue, and the {train_format.name} data has "
            "examples that train from their first token; use prompt/completion or conversational "
            "data, or on_policy=false"
        )
    return train_examples, validation_examples, counter


def teacher_answered(config: DistillStageConfig, teacher: Teacher) -> list[Example]:
    """The teacher's answers to prompts without reference answers, from its cached outputs, with
    its top-k: training examples beside the labelled ones (none unless teacher_answers is on and
    the cache has them)."""
    split = distillation.TEACHER_ANSWERED
    if teacher.mode != "cached" or split not in teacher.manifest["splits"]:
        return []
    count = teacher.manifest["splits"][split]["examples"]
    if not config.teacher_answers:
        print(f"teacher_answers=false: the teacher's answers to {count} unlabelled prompts in "
              f"{teacher.cache_dir} are not used", flush=True)
        return []
    print(f"teacher-answered: {count} prompts without reference answers, answered by the teacher "
          "(trained on beside the labelled examples)", flush=True)
    return distillation.read_cache(teacher.cache_dir, split, config.top_k)


def build_student_model(config: DistillStageConfig, student: Student, teacher: Teacher,
                        train_examples: list[Example], precision: str,
                        ) -> tuple[PreTrainedModel, dict[str, Any] | None]:
    """The student's weights: cut from the teacher (and the record of the cut), built from the
    teacher's config with random weights, or loaded (with its PEFT method)."""
    tokenizer = student.tokenizer
    if student.pruned:
        return _cut_from_teacher(teacher.spec, student.pruned, train_examples, config,
                                 tokenizer.pad_token_id)
    if student.built:
        teacher_config = (json.loads((teacher.cache_dir / distillation.TEACHER_CONFIG).read_text())
                          if teacher.mode == "cached" else _config_of(teacher.model).to_dict())
        model = students.config_student(student.spec, teacher_config, config.seed)
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        return model, None
    return apply_peft(load_model_for_training(student.spec, config, precision), config,
                      tokenizer), None


def _cut_from_teacher(teacher_spec: str, pruned: students.PrunedStudent,
                      examples: list[Example], config: DistillStageConfig,
                      pad_token_id: int) -> tuple[PreTrainedModel, dict[str, Any]]:
    """The student `pruned` names, cut from a fresh copy of the teacher (an adapter merged into its
    base first), and the record of the cut."""
    print(f"cutting the student from the teacher {teacher_spec}", flush=True)
    teacher = load_model(teacher_spec).eval()
    if hasattr(teacher, "merge_and_unload"):
        teacher = teacher.merge_and_unload()
    calibration = [
        dict(zip(("input_ids", "attention_mask"), distillation.pad_batch(
            examples[start:start + config.per_device_batch_size], pad_token_id)[:2]))
        for start in range(0, min(len(examples), CALIBRATION_EXAMPLES),
                           config.per_device_batch_size)
    ]
    student, record = students.pruned_student(teacher, pruned, calibration)
    width = (f", MLP {record['intermediate']['teacher']} -> {record['intermediate']['student']} "
             "channels" if "intermediate" in record else "")
    print(f"student: layers {'/'.join(map(str, record['kept_layers']))} of the teacher's "
          f"{record['teacher_layers']}{width}; {record['student_parameters']:,} of "
          f"{record['teacher_parameters']:,} parameters", flush=True)
    return student, record


class HardLabelProgress(TrainerCallback):
    """The hard-label student's training loss, printed as hard_label_train_loss: not train_loss,
    which SageMaker's metric definitions would read as the distilled student's."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs and "loss" in logs:
            log_metrics({"step": state.global_step, "hard_label_train_loss": float(logs["loss"])})


def train_hard_label(student: PreTrainedModel, config: DistillStageConfig, precision: str,
                     tokenizer: transformers.PreTrainedTokenizerBase,
                     examples: list[Example], steps: int) -> tuple[PreTrainedModel, float]:
    """`student` trained as the stage trains, with the same `steps` (the distilled student's:
    counted in epochs, the labelled data alone would make fewer), schedule, batch size and seed,
    on the labelled examples' ground truth alone (alpha 1): the baseline distillation must beat;
    and the seconds its training took. Not checkpointed: a restarted job trains it again."""
    print(f"hard-label student: the same initial student, the same {steps} steps and batch size, "
          f"on the ground truth of the {len(examples)} labelled examples alone", flush=True)
    baseline = dataclasses.replace(config, alpha=1.0, checkpoint_steps=0, max_steps=steps)
    trainer = TopKDistillationTrainer(
        model=student,
        args=trainer_arguments(baseline, precision, remove_unused_columns=False,
                               prediction_loss_only=True),
        train_dataset=examples, processing_class=tokenizer,
        data_collator=Collator(tokenizer.pad_token_id, config.top_k, on_policy=False),
        callbacks=[HardLabelProgress()], temperature=config.temperature, alpha=1.0,
    )
    trainer.remove_callback(PrinterCallback)
    started = time.perf_counter()
    trainer.train()
    runtime = round(time.perf_counter() - started, 2)
    # Measured in fp32, as the distilled student is (steps.common.training.train).
    return trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False), runtime


COMPARED = ("eval_loss", "perplexity", "rouge_l", "exact_match", "eos_rate")


def compare_students(compared: dict[str, PreTrainedModel],
                     tokenizer: transformers.PreTrainedTokenizerBase,
                     validation: tuple[DatasetFormat, list[Record]],
                     validation_examples: list[Example],
                     config: DistillStageConfig) -> dict[str, Any]:
    """Each student's held-out figures, measured as steps.evaluate measures a model (its own
    functions, on the same validation records), and its top-k KL to the teacher."""
    fmt, records = validation
    examples, pairs, held_out = held_out_examples(records, fmt, bool(tokenizer.chat_template),
                                                  config.comparison_samples)
    comparison: dict[str, Any] = {"samples": len(pairs), "loss_examples": len(examples),
                                  "max_new_tokens": config.comparison_new_tokens,
                                  "students": {}}
    for name, model in compared.items():
        model.eval()
        result = score_model(name, model, tokenizer, examples, pairs, held_out,
                             max_new_tokens=config.comparison_new_tokens,
                             batch_size=config.per_device_batch_size,
                             max_seq_length=config.max_seq_length)
        figures = {key: value for key, value in model_metrics({"tuned": result}, {}).items()
                   if key in COMPARED}
        kl = kl_to_teacher(model, validation_examples, config.per_device_batch_size,
                           tokenizer.pad_token_id)
        figures["kl_to_teacher"] = {"value": kl, "standard_deviation": 0.0}
        comparison["students"][name] = figures
        print(f"{name} student: " + ", ".join(f"{key} {value['value']:.4g}"
                                              for key, value in figures.items()), flush=True)
    return comparison


def _model_spec(channel: Path | None, spec: str | None) -> str | None:
    if channel is not None:
        return resolve_model_source(channel, "")
    return spec


def _cached(cache_dir: Path, manifest: dict[str, Any], split: str, examples: list[Example],
            config: DistillStageConfig) -> list[Example]:
    """The cached examples of `split`, once they are shown to be the ones this job trains on."""
    info = manifest["splits"][split]
    ours = distillation.tokens_sha256(examples)
    if ours != info["tokens_sha256"]:
        cached_length = manifest["max_seq_length"]
        why = (f"max_seq_length {config.max_seq_length} here, {cached_length} there"
               if cached_length != config.max_seq_length else
               f"{len(examples)} examples here, {info['examples']} there")
        raise StageError(
            f"the cached teacher outputs in {cache_dir} were computed for other '{split}' data or "
            f"tokenization ({why}; tokens sha256 {ours[:12]} here, {info['tokens_sha256'][:12]} "
            "there); run steps.teacher_logits on the data this job trains on with the same "
            "max_seq_length"
        )
    return distillation.read_cache(cache_dir, split, config.top_k)


def _config_of(model: PreTrainedModel) -> transformers.PretrainedConfig:
    return model.get_base_model().config if hasattr(model, "peft_config") else model.config


def _check_vocabulary_size(student: PreTrainedModel, examples: list[Example], spec: str) -> None:
    rows = student.get_output_embeddings().weight.shape[0]
    highest = max((int(e.top_k_ids.max()) for e in examples
                   if e.top_k_ids is not None and e.top_k_ids.numel()), default=-1)
    if highest >= rows:
        raise StageError(
            f"the teacher ranks token id {highest} among its top-k, but student {spec} has only "
            f"{rows} output rows; use a student with the teacher's vocabulary size"
        )


def kl_to_teacher(model: PreTrainedModel, examples: list[Example], batch_size: int,
                  pad_token_id: int) -> float:
    """Mean KL(teacher || student) at temperature 1 over the examples' loss positions (top-k)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, positions = 0.0, 0
    try:
        for start in range(0, len(examples), batch_size):
            batch = examples[start:start + batch_size]
            input_ids, attention_mask, labels = distillation.pad_batch(batch, pad_token_id, device)
            mask = labels[:, 1:] != -100
            with torch.no_grad():
                logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
                kl = distillation.top_k_kl(
                    _trained_logits(logits, input_ids, mask),
                    torch.cat([e.top_k_ids for e in batch]).to(device),
                    torch.cat([e.top_k_logprobs for e in batch]).to(device), 1.0)
            total, positions = total + kl.sum().item(), positions + kl.numel()
    finally:
        model.train(was_training)
    return total / max(positions, 1) if math.isfinite(total) else total


if __name__ == "__main__":
    contract.run(main, DistillStageConfig, job="training")

"""What every training stage shares: the training knobs, the Trainer arguments they become,
checkpoints that survive a restarted job, and the end-of-run report.

A stage's config dataclass inherits `TrainingKnobs` (and, for tuning stages, `PeftKnobs`), both
declared in steps.common.knobs with the values each knob takes, so every knob has one name, one
default and one range for SageMaker's hyperparameters.json, the command line and tests.
`trainer_arguments` turns the knobs into `transformers.TrainingArguments` or a TRL config, setting
explicitly every default that costs speed on the hardware the stage runs on (TRL turns on bf16
and activation checkpointing even on a CPU).

Checkpoints go to the SageMaker checkpoint folder (`contract.checkpoint_dir()`), which SageMaker
syncs to the step's `CheckpointConfig.S3Uri` while the job runs and restores into a restarted job;
`train` resumes from the latest checkpoint there with optimizer, scheduler and RNG state. The
pipeline keys that location by code version and step only (so that the step cache can hit), which
every run of the step shares; each job therefore writes below `<run key>/<job name>/`
(`checkpoint_folder`): the run key is the job's settings and the content of its input channels, so
a run of other settings or data never sees another's checkpoints, and the job name keeps two jobs
of the same run (two executions at once) from ever writing the same file.

Each stage saves its model with `save_training_record`: training_summary.json, the stage's metric
history (training_metrics.jsonl) and lineage.json, every training stage that made the model with
its history, carried forward from stage to stage, so that evaluation can report how the model was
made (its loss curves and model card) from the model alone.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments

from steps.common import contract, memory_estimate, sharding, tracking
from steps.common.contract import StageError
from steps.common.knobs import PeftKnobs, TrainingKnobs
from steps.common.metrics import MetricsCallback, log_metrics, peak_memory_mb, plot_loss_curve
from steps.common.models import local_model_folder, resolve_precision

ArgsT = TypeVar("ArgsT", bound=TrainingArguments)

# Knobs that change how a run is observed or saved, not the numbers it computes: a checkpoint
# written under other values of these is still a valid place to resume from.
_NOT_IN_FINGERPRINT = {"logging_steps", "checkpoint_steps", "checkpoints_to_keep"}
_FINGERPRINT_FILE = "run_fingerprint.json"
# Written into a checkpoint folder after the Trainer saved it whole: each file's size and sha256.
# SageMaker uploads checkpoint files as they appear, in no promised order, so a checkpoint read back
# from S3 (a restarted job's, another job's) is complete only if it matches this record.
_CHECKPOINT_RECORD = "checkpoint_files.json"

METRICS_FILE = "metrics.jsonl"  # in SM_OUTPUT_DATA_DIR: the stage's metric history
# What a model folder records about how it was made, beside its weights (see save_training_record).
SUMMARY_FILE = "training_summary.json"
HISTORY_FILE = "training_metrics.jsonl"
LINEAGE_FILE = "lineage.json"
TRAINING_RECORD_FILES = (SUMMARY_FILE, HISTORY_FILE, LINEAGE_FILE)


def world_size() -> int:
    """Processes taking part in training (torchrun's WORLD_SIZE; 1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def trainer_arguments(
    knobs: TrainingKnobs, precision: str, args_class: type[ArgsT] = TrainingArguments, **extra: Any
) -> ArgsT:
    """`args_class` (TrainingArguments or a TRL config) from the knobs, every costly default set.

    `precision` is the resolved one (`resolve_precision`). `extra` holds what only one kind of
    trainer has (SFTConfig's max_length, DPOConfig's beta, ...).
    """
    distributed = world_size() > 1
    checkpoints = checkpoint_folder(knobs) if knobs.checkpoint_steps > 0 else contract.checkpoint_dir()
    saving = {"save_strategy": "no"}
    if knobs.checkpoint_steps > 0:
        saving = {
            "save_strategy": "steps",
            "save_steps": knobs.checkpoint_steps,
            "save_total_limit": knobs.checkpoints_to_keep,
            "save_only_model": False,  # optimizer, scheduler and RNG state: a true resume
        }
    return args_class(
        output_dir=str(checkpoints),
        num_train_epochs=knobs.epochs,
        max_steps=knobs.max_steps,
        learning_rate=knobs.learning_rate,
        lr_scheduler_type=knobs.lr_scheduler_type,
        warmup_steps=knobs.warmup_ratio,  # transformers 5: a float below 1 is a fraction of steps
        weight_decay=knobs.weight_decay,
        max_grad_norm=knobs.max_grad_norm,
        per_device_train_batch_size=knobs.per_device_batch_size,
        per_device_eval_batch_size=knobs.per_device_batch_size,
        gradient_accumulation_steps=knobs.gradient_accumulation_steps,
        # TRL configs turn both on by default, even on a CPU: bf16 only where asked or native,
        # activation checkpointing (about +50% time on a CPU) only when asked.
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        # Under FSDP its own wrapper checkpoints instead (steps.common.sharding.fsdp_arguments).
        activation_checkpointing=(knobs.gradient_checkpointing is True
                                  and not sharding.is_sharded(knobs)),
        seed=knobs.seed,
        data_seed=knobs.seed,
        logging_steps=knobs.logging_steps,
        logging_first_step=True,
        include_num_input_tokens_seen="non_padding",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_pin_memory=torch.cuda.is_available(),
        # Without a GPU the Trainer must be told that the run is on the CPU on purpose: otherwise
        # it refuses bf16, and under torchrun accelerate's distributed type stays NO, so every
        # process trains its own copy, unsynchronised. (Apple's MPS stays usable for the rest.)
        use_cpu=not torch.cuda.is_available() and (precision == "bf16" or distributed),
        # Several CPU processes talk through gloo; GPUs through NCCL (the Trainer's default there).
        ddp_backend="gloo" if distributed and not torch.cuda.is_available() else None,
        ddp_find_unused_parameters=False if distributed else None,
        **saving,
        **sharding.fsdp_arguments(knobs),  # FSDP on GPUs with `sharding: fsdp`, else nothing
        **extra,
    )


def prepare_precision(knobs: TrainingKnobs) -> str:
    precision = resolve_precision(knobs.precision)
    print(f"precision: {precision} (asked: {knobs.precision})", flush=True)
    return precision


def resolve_checkpointing(config: TrainingKnobs, stage: str, model: torch.nn.Module,
                          precision: str, teacher: torch.nn.Module | None = None,
                          usable_bytes: float | None = None) -> dict[str, Any]:
    """Decide `gradient_checkpointing: auto` for the loaded `model`, and say so in one line.

    Off where the stage fits its device without it, by the memory plan's own estimate
    (steps.common.memory_estimate) of the model's config, the stage's settings, `precision` and
    the processes training together; on where it does not. `usable_bytes`: what one device's
    training may use (default: `usable_device_bytes`). The config then holds the decision (a
    bool); the returned record, for training_summary.json, holds it and the estimate behind it.
    """
    asked = config.gradient_checkpointing
    if asked != "auto":
        return {"asked": asked, "on": asked}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    settings = {**{f.name: f.default for f in dataclasses.fields(PeftKnobs)},
                **dataclasses.asdict(config), "gradient_checkpointing": False}
    start = memory_estimate.shape_from_config(model.config.to_dict(), stage)
    shape = start.as_classifier() if stage == "reward_model" else start
    teacher_shape = (memory_estimate.shape_from_config(teacher.config.to_dict(), "teacher")
                     if teacher is not None else None)
    work = memory_estimate.workload(stage, settings, shape, start, precision=precision,
                                    device=device, world_size=world_size(), teacher=teacher_shape)
    without = memory_estimate.estimate(work)
    with_checkpointing = memory_estimate.estimate(dataclasses.replace(work, checkpointing=True))
    usable = usable_device_bytes(model) if usable_bytes is None else usable_bytes
    on = without.peak > usable
    why = ""
    if on and getattr(config, "peft_method", "none") == "prefix_tuning":
        on, why = False, " (prefix tuning cannot recompute its layers: it trains without)"
    config.gradient_checkpointing = on
    gib = memory_estimate.GIB
    print(f"gradient_checkpointing auto: {'on' if on else 'off'}: the stage needs an estimated "
          f"{without.peak / gib:.2f} GiB per {device} device without it "
          f"({with_checkpointing.peak / gib:.2f} GiB with), {usable / gib:.2f} GiB usable{why}",
          flush=True)
    return {"asked": "auto", "on": on, "device": device,
            "estimated_peak_bytes_without": without.peak,
            "estimated_peak_bytes_with": with_checkpointing.peak, "usable_bytes": usable}


def usable_device_bytes(model: torch.nn.Module) -> float:
    """What this process's training may use of its device: the memory free now and what `model`
    already holds there (the estimate counts its weights), within USABLE_FRACTION. A GPU's from
    CUDA; a CPU's is the machine's available memory (/proc/meminfo), shared by the processes of
    this host."""
    if torch.cuda.is_available():  # this process's GPU: torchrun gives each its own
        gpu = int(os.environ.get("LOCAL_RANK", "0"))
        free, _ = torch.cuda.mem_get_info(gpu)
        return (free + torch.cuda.memory_allocated(gpu)) * memory_estimate.USABLE_FRACTION
    available = 0.0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = float(line.split()[1]) * 1024
    except OSError:  # not Linux: the machine's whole memory
        available = float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    held = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return (available / processes + held) * memory_estimate.USABLE_FRACTION


def metrics_callback(renamed: dict[str, str] | None = None) -> tuple[MetricsCallback, Path]:
    """A fresh metrics.jsonl in SM_OUTPUT_DATA_DIR (SageMaker uploads it even if the job fails).

    `renamed`: more trainer log entries to pass through, as MetricsCallback takes them.
    """
    output_data_dir = contract.output_data_dir()
    output_data_dir.mkdir(parents=True, exist_ok=True)
    path = output_data_dir / METRICS_FILE
    path.write_text("")
    return MetricsCallback(path, renamed), path


def trainable_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; PEFT's own count where the model is a PeftModel.

    PEFT's count also covers prompt encoders and 4-bit weights (packed two to a byte), which
    counting `parameters()` gets wrong.
    """
    if hasattr(model, "get_nb_trainable_parameters"):
        return model.get_nb_trainable_parameters()
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


@dataclass
class TrainingReport:
    global_step: int
    resumed_from_step: int
    first_train_loss: float | None
    final_train_loss: float | None
    mean_train_loss: float
    eval_loss: float | None
    tokens: int
    runtime_s: float
    tokens_per_second: float
    trainable_parameters: int
    total_parameters: int
    peak_memory_mb: float

    def as_summary(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def train(trainer: Trainer, knobs: TrainingKnobs, metrics: MetricsCallback,
          metrics_path: Path) -> TrainingReport:
    """Run `trainer` (resuming from the latest checkpoint), evaluate once, log the run's figures.

    Logged to the job's metrics: tokens/s of non-padding tokens, trainable parameters and peak
    memory, which the benchmarks compare across methods.
    """
    trainer.remove_callback(PrinterCallback)  # prints each log as a dict, beside our lines
    trainable, total = trainable_parameters(trainer.model)
    if is_main_process():
        print(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.3f}%)",
              flush=True)
        batch, steps, processes = (knobs.per_device_batch_size, knobs.gradient_accumulation_steps,
                                   world_size())
        print(f"global batch: {batch} per process x {steps} accumulation steps x {processes} "
              f"processes = {batch * steps * processes} sequences per optimizer step", flush=True)
    folder = Path(trainer.args.output_dir)  # checkpoint_folder(knobs), from trainer_arguments
    resume = _resume_checkpoint(knobs, folder)
    trainer.add_callback(_RecordCheckpointFiles())
    reporting = tracking.trainer_callback()
    if reporting is not None:
        trainer.add_callback(reporting)

    started = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=resume)
    runtime = time.perf_counter() - started
    if knobs.checkpoint_steps > 0 and is_main_process():
        _discard_checkpoints(folder)
    eval_loss = trainer.evaluate()["eval_loss"] if trainer.eval_dataset is not None else None
    # accelerate wraps the model's forward in bf16/fp16 autocast for mixed precision; what the
    # stage measures after training (held-out margins, rewards, generations) is measured on the
    # fp32 weights it saves, so every figure means the same on machines with and without native
    # bf16. The training figures above (losses) were computed in `precision`.
    trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)

    resumed_from = int(Path(resume).name.split("-")[-1]) if resume else 0
    # num_input_tokens_seen is restored with the checkpoint: count this run's tokens only.
    tokens = trainer.state.num_input_tokens_seen - metrics.tokens_at_start
    train_losses = [m["train_loss"] for m in metrics.history if "train_loss" in m]
    report = TrainingReport(
        global_step=trainer.state.global_step,
        resumed_from_step=resumed_from,
        first_train_loss=train_losses[0] if train_losses else None,
        final_train_loss=train_losses[-1] if train_losses else None,
        mean_train_loss=result.training_loss,
        eval_loss=eval_loss,
        tokens=tokens,
        runtime_s=round(runtime, 2),
        tokens_per_second=round(tokens / max(runtime, 1e-9), 1),
        trainable_parameters=trainable,
        total_parameters=total,
        peak_memory_mb=round(peak_memory_mb(), 1),
    )
    if trainer.is_world_process_zero():
        log_metrics({
            "step": report.global_step,
            "train_runtime_s": report.runtime_s,
            "total_tokens": tokens,
            "mean_tokens_per_second": report.tokens_per_second,
            "trainable_parameters": trainable,
            "peak_memory_mb": report.peak_memory_mb,
            # eval_loss is not repeated here: MetricsCallback logged it when evaluate() ran, and a
            # second line would give SageMaker's metric a second data point.
        }, metrics_path)
        plot_loss_curve(metrics.history, metrics_path.parent / "loss_curve.png")
    return report


def _discard_checkpoints(folder: Path) -> None:
    """Trained: this job's checkpoints are no longer needed, and every later job of the step would
    download them (SageMaker restores the whole CheckpointConfig prefix at start and deletes in S3
    what the job deletes locally: docs.aws.amazon.com/sagemaker/latest/dg/model-checkpoints.html).
    Should saving the model fail after this, a retry starts over."""
    if folder.is_dir():
        shutil.rmtree(folder)


def _fingerprint(knobs: TrainingKnobs) -> dict[str, Any]:
    """What makes a run this run: every setting that changes the numbers it computes."""
    return {k: v for k, v in dataclasses.asdict(knobs).items() if k not in _NOT_IN_FINGERPRINT}


def _input_digests() -> dict[str, str]:
    """sha256 of each input channel's content (file names and bytes), by channel name.

    The channels are those of inputdataconfig.json, which SageMaker writes for every training job
    ("How Amazon SageMaker provides training information", docs.aws.amazon.com/sagemaker/latest/
    dg/your-algorithms-training-algo-running-container.html); without it (a stage run by hand),
    none.
    """
    config = contract.input_config_dir() / "inputdataconfig.json"
    if not config.is_file():
        return {}
    digests = {}
    for name in sorted(json.loads(config.read_text(encoding="utf-8"))):
        folder = contract.optional_channel_dir(name)
        if folder is None:
            continue
        digest = hashlib.sha256()
        for path in sorted(p for p in folder.rglob("*") if p.is_file()) if folder.is_dir() \
                else [folder]:
            digest.update(path.relative_to(folder).as_posix().encode() + b"\0")
            digest.update(_file_sha256(path).encode())
        digests[name] = digest.hexdigest()
    return digests


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def checkpoint_folder(knobs: TrainingKnobs) -> Path:
    """This job's own checkpoint folder: `<checkpoint dir>/<run key>/<job name>`.

    The run key is the sha256 of the run's settings and its inputs' content: what determines the
    work. The job name is the TRAINING_JOB_NAME SageMaker gives a training container
    (docs.aws.amazon.com/sagemaker/latest/dg/your-algorithms-training-algo-running-container.html),
    which a job restarted after a spot interruption keeps (so it resumes in its own folder); a
    retry is a new job, and finds its predecessor's checkpoints beside its own
    (`_resume_checkpoint`).
    """
    record = {"settings": _fingerprint(knobs), "inputs": _input_digests()}
    key = hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()
    job = re.sub(r"[^A-Za-z0-9._-]", "-", os.environ.get("TRAINING_JOB_NAME", "job"))
    return contract.checkpoint_dir() / key[:16] / job


class _RecordCheckpointFiles(TrainerCallback):
    """After the Trainer saved a checkpoint whole, record its files (`_CHECKPOINT_RECORD`)."""

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if folder.is_dir():
                record_checkpoint_files(folder)


def record_checkpoint_files(folder: Path) -> None:
    files = {path.relative_to(folder).as_posix(): [path.stat().st_size, _file_sha256(path)]
             for path in sorted(folder.rglob("*"))
             if path.is_file() and path.name != _CHECKPOINT_RECORD}
    partial = folder / f"{_CHECKPOINT_RECORD}.partial"
    partial.write_text(json.dumps(files, indent=1) + "\n")
    partial.replace(folder / _CHECKPOINT_RECORD)


def _resume_checkpoint(knobs: TrainingKnobs, checkpoints: Path) -> str | None:
    """The latest complete checkpoint of this same run, or None to start fresh.

    `checkpoints` is this job's own folder (`checkpoint_folder`): its checkpoints come first (a
    job restarted after an interruption); then those of the other jobs of the same run beside it
    (a retry's predecessor, an earlier execution of the same work), which it only reads: it keeps
    writing into its own folder. A folder that holds another configuration's checkpoints is an
    error rather than a silent fresh start (which would mix both runs' checkpoints) or a resume
    into the wrong run; another job's folder of other settings is passed over.
    """
    if knobs.checkpoint_steps == 0:
        return None
    checkpoints.mkdir(parents=True, exist_ok=True)
    fingerprint = _fingerprint(knobs)
    digest = hashlib.sha256(json.dumps(fingerprint, sort_keys=True, default=str).encode())
    record = {"sha256": digest.hexdigest(), "config": fingerprint}
    recorded_path = checkpoints / _FINGERPRINT_FILE
    latest = _latest_complete_checkpoint(checkpoints)
    if latest and recorded_path.exists():
        recorded = json.loads(recorded_path.read_text())
        if recorded.get("sha256") != record["sha256"]:
            changed = sorted(k for k in fingerprint
                             if recorded.get("config", {}).get(k) != fingerprint[k])
            raise StageError(
                f"checkpoint folder {checkpoints} holds checkpoints of a run with other settings "
                f"({', '.join(changed) or 'stage'} differ); empty it or give the job a fresh "
                "checkpoint location"
            )
    if latest is None:
        latest = _latest_of_other_jobs(checkpoints, record["sha256"])
    if is_main_process():
        # Written whole then renamed: the other processes of a torchrun job read it meanwhile.
        partial = recorded_path.with_suffix(".partial")
        partial.write_text(json.dumps(record, indent=2, default=str) + "\n")
        partial.replace(recorded_path)
    if latest:
        print(f"resuming from {latest} (optimizer, scheduler and data position restored)",
              flush=True)
    return latest


def _latest_of_other_jobs(own: Path, fingerprint_sha256: str) -> str | None:
    """The newest complete checkpoint in the other job folders of the same run key."""
    found = []
    for folder in own.parent.iterdir() if own.parent.is_dir() else []:
        recorded = folder / _FINGERPRINT_FILE
        if folder == own or not recorded.is_file():
            continue
        if json.loads(recorded.read_text()).get("sha256") != fingerprint_sha256:
            continue
        latest = _latest_complete_checkpoint(folder)
        if latest:
            found.append((_step_of(Path(latest)), latest))
    return max(found)[1] if found else None


def _step_of(checkpoint: Path) -> int:
    return int(checkpoint.name.split("-")[-1])


def _latest_complete_checkpoint(checkpoints: Path) -> str | None:
    """The newest checkpoint-N folder that was written to the end.

    A job killed while saving (a spot interruption), or while SageMaker was still uploading the
    files of its newest checkpoint, leaves a newest folder that does not match its file record
    (or has none yet): resuming from it would fail, from the one before it only repeats a few
    steps. (The Trainer overwrites the incomplete folder when it gets there.)
    """
    if not checkpoints.is_dir():
        return None
    found = [(int(m.group(1)), path) for path in checkpoints.iterdir()
             if path.is_dir() and (m := re.fullmatch(r"checkpoint-(\d+)", path.name))]
    for _, path in sorted(found, reverse=True):
        if _is_complete(path):
            return str(path)
        print(f"ignoring the incomplete checkpoint {path}", flush=True)
    return None


def _is_complete(checkpoint: Path) -> bool:
    record = checkpoint / _CHECKPOINT_RECORD
    if not record.is_file():
        return False
    try:
        files = json.loads(record.read_text())
    except ValueError:
        return False
    for name, (size, sha256) in files.items():
        path = checkpoint / name
        if not path.is_file() or path.stat().st_size != size or _file_sha256(path) != sha256:
            return False
    return True


def training_summary(stage: str, config: TrainingKnobs, base_model: str, precision: str,
                     report: TrainingReport, **extra: Any) -> dict[str, Any]:
    """What training_summary.json in a model folder records: the stage, method, base model,
    every hyperparameter, the precision used, and the run's figures (`report`).

    Evaluation reads base_model from it; the registry attaches it to the model package.
    """
    return {
        "stage": stage,
        "peft_method": getattr(config, "peft_method", "none"),
        "base_model": base_model,
        "precision": precision,
        "sharded": sharding.is_sharded(config),  # FSDP ran: asked, and on GPUs
        "hyperparameters": dataclasses.asdict(config),
        **extra,
        "training": report.as_summary(),
    }


def save_training_record(folder: Path, summary: dict[str, Any], started_from: str | None) -> None:
    """Write into a model folder what it records about how it was made (no weights: a few kB):

        training_summary.json   this stage's `training_summary`
        training_metrics.jsonl  this stage's metric history: the lines of its metrics.jsonl
        lineage.json            every training stage that made the model, oldest first, one line
                                each: {"stage", "base_model", "summary", "metrics"} (the summary
                                and the history of that stage)

    `started_from`: the model this stage's weights began from. When it is an earlier stage's
    output (the `model` channel), its lineage comes first; a hub id, a builtin spec or None (a
    model built from a config) starts a new one. Evaluation reads the lineage for its report and
    the model card.
    """
    history = read_history(contract.output_data_dir() / METRICS_FILE)
    lineage = [*read_lineage(started_from), {
        "stage": summary["stage"],
        "base_model": summary["base_model"],
        "summary": summary,
        "metrics": history,
    }]
    (folder / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    (folder / HISTORY_FILE).write_text("".join(json.dumps(line) + "\n" for line in history))
    (folder / LINEAGE_FILE).write_text(
        "[\n" + ",\n".join(json.dumps(stage) for stage in lineage) + "\n]\n"
    )


def read_lineage(model: str | Path | None) -> list[dict[str, Any]]:
    """The training stages that made `model` (a model folder or a model.tar.gz), oldest first.

    Its lineage.json; for a model saved without one, a single stage from its training_summary.json
    (and training_metrics.jsonl, if any); [] for a model no stage of this project trained (a hub
    id, a builtin spec, a folder without a training record).
    """
    if model is None or str(model).startswith("s3://") or not Path(model).exists():
        return []
    folder = local_model_folder(str(model))
    if folder is None:
        return []
    if (folder / LINEAGE_FILE).exists():
        lineage = json.loads((folder / LINEAGE_FILE).read_text())
        if not isinstance(lineage, list) or not all(isinstance(s, dict) for s in lineage):
            raise StageError(f"{folder / LINEAGE_FILE} is not a list of training stages; remove "
                             "it, or save the model again with a training stage")
        return lineage
    if not (folder / SUMMARY_FILE).exists():
        return []
    summary = json.loads((folder / SUMMARY_FILE).read_text())
    return [{
        "stage": summary.get("stage", "unknown"),
        "base_model": summary.get("base_model"),
        "summary": summary,
        "metrics": read_history(folder / HISTORY_FILE),
    }]


def read_history(path: Path) -> list[dict[str, Any]]:
    """The metric lines of a metrics.jsonl (or training_metrics.jsonl); [] if there is none."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

"""The training knobs every stage shares (steps.common.training), shown through the SFT stage:
gradient accumulation, checkpoints that survive a killed job, precision."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from steps.common import training
from steps.common.contract import StageError
from steps.common.training import TrainingKnobs

from .conftest import counting_records
from .stage_runs import run_as_program, run_sft, run_stage, sft_job

TINY_LORA = {"base_model": "builtin:tiny", "peft_method": "lora", "learning_rate": 1e-2,
             "precision": "fp32", "logging_steps": 1}


def _max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[name] - b[name]).abs().max().item() for name in a)


def test_accumulating_2x4_matches_one_batch_of_8_in_losses_and_weights(tmp_path):
    # The loss is normalised over the whole accumulated batch (num_items_in_batch), not averaged
    # per micro-batch, so 4 micro-batches of 2 are one batch of 8 up to float rounding.
    runs = {
        (batch, steps): run_sft(tmp_path / f"b{batch}x{steps}" / "opt-ml", counting_records(24),
                                **TINY_LORA, lora_dropout=0.0, max_steps=4,
                                per_device_batch_size=batch, gradient_accumulation_steps=steps)
        for batch, steps in ((8, 1), (2, 4))
    }
    large, accumulated = runs[(8, 1)], runs[(2, 4)]

    assert len(large.losses) == 4
    assert accumulated.losses == pytest.approx(large.losses, abs=1e-5)
    assert large.losses[-1] < large.losses[0]
    weights = [load_file(run.model_dir / "adapter_model.safetensors") for run in (large, accumulated)]
    assert _max_difference(*weights) < 1e-5


def test_gradient_checkpointing_recomputes_activations_and_changes_no_number(tmp_path):
    runs = [run_sft(tmp_path / f"gc-{on}" / "opt-ml", counting_records(16), **TINY_LORA,
                    lora_dropout=0.0, max_steps=3, gradient_checkpointing=on)
            for on in (False, True)]

    assert runs[1].losses == pytest.approx(runs[0].losses, abs=1e-5)
    weights = [load_file(run.model_dir / "adapter_model.safetensors") for run in runs]
    assert _max_difference(*weights) < 1e-5
    assert runs[1].summary["hyperparameters"]["gradient_checkpointing"] is True



def test_gradient_checkpointing_auto_turns_on_only_when_the_device_memory_is_too_small(
        tmp_path, monkeypatch):
    roomy = run_sft(tmp_path / "roomy" / "opt-ml", counting_records(8), **TINY_LORA, max_steps=1,
                    gradient_checkpointing="auto")
    decided = roomy.summary["gradient_checkpointing"]
    needed = decided["estimated_peak_bytes_without"]
    # A device with half the memory the stage needs without checkpointing (and more than with it).
    monkeypatch.setattr(training, "usable_device_bytes", lambda model: needed / 2)
    small = run_sft(tmp_path / "small" / "opt-ml", counting_records(8), **TINY_LORA, max_steps=1,
                    gradient_checkpointing="auto")

    assert decided["asked"] == "auto" and decided["on"] is False
    assert decided["usable_bytes"] > needed > decided["estimated_peak_bytes_with"]
    assert roomy.summary["hyperparameters"]["gradient_checkpointing"] is False
    assert "gradient_checkpointing auto: off" in roomy.stdout
    assert small.summary["gradient_checkpointing"] == {**decided, "on": True,
                                                       "usable_bytes": needed / 2}
    assert small.summary["hyperparameters"]["gradient_checkpointing"] is True
    assert "gradient_checkpointing auto: on" in small.stdout


def test_gradient_checkpointing_takes_auto_true_or_false_and_refuses_anything_else():
    assert [TrainingKnobs(gradient_checkpointing=value).gradient_checkpointing
            for value in ("auto", "true", "False", True)] == ["auto", True, False, True]
    with pytest.raises(StageError, match="gradient_checkpointing 'maybe' is not one of auto"):
        TrainingKnobs(gradient_checkpointing="maybe")

class KillAfterStep6(TrainerCallback):
    """SIGKILLs its own process after optimizer step 6: no handler runs, nothing is flushed, as
    when an instance is reclaimed."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 6:
            os.kill(os.getpid(), signal.SIGKILL)


def _kill_after_step_6() -> None:
    """In the job's process, before the stage runs: every training it starts has the callback."""
    original_train = training.train

    def train(trainer, *args, **kwargs):
        trainer.add_callback(KillAfterStep6())
        return original_train(trainer, *args, **kwargs)

    training.train = train


def test_a_killed_job_restarted_on_its_checkpoints_resumes_and_ends_as_an_uninterrupted_one(
    tmp_path,
):
    knobs = {**TINY_LORA, "max_steps": 10, "checkpoint_steps": 4, "per_device_batch_size": 4}
    uninterrupted = run_sft(tmp_path / "uninterrupted" / "opt-ml", counting_records(24), **knobs)

    # The same job, killed after step 6: the checkpoint of step 4 is all that is left.
    root = tmp_path / "restarted" / "opt-ml"
    with sft_job(root, counting_records(24), **knobs) as job:
        # As SageMaker runs the stage: a process of its own, which the kill ends.
        killed = run_as_program("steps.sft", tmp_path / "killed", before=_kill_after_step_6)
        assert killed.status == -signal.SIGKILL, killed.stderr[-2000:]
        assert "step=5 " in killed.stdout and "step=6 " not in killed.stdout
        # The job writes below <run key>/<job name> of the checkpoint folder.
        checkpoints = sorted(job.checkpoint_dir.glob("*/job/checkpoint-*"))
        assert [p.name for p in checkpoints] == ["checkpoint-4"] and not job.model_dir.exists()
        state = json.loads((checkpoints[0] / "trainer_state.json").read_text())

        # The restarted job: same configuration, same checkpoint folder (SageMaker restores it).
        restarted = run_stage(job)

    assert f"resuming from {checkpoints[0]}" in restarted.stdout
    # Trained: its checkpoints are gone, so no later job of the step downloads them.
    assert not checkpoints[0].parent.exists()
    assert [m["step"] for m in restarted.metrics if "train_loss" in m] == [5, 6, 7, 8, 9, 10]
    report = restarted.summary["training"]
    assert report["resumed_from_step"] == 4 and report["global_step"] == 10
    assert restarted.losses == pytest.approx(uninterrupted.losses[4:], abs=1e-3)
    weights = [load_file(run.model_dir / "adapter_model.safetensors")
               for run in (uninterrupted, restarted)]
    assert _max_difference(*weights) < 1e-3
    # Throughput counts this process's tokens only: the checkpoint's count is subtracted.
    seen_before = state["num_input_tokens_seen"]
    assert 0 < seen_before < uninterrupted.summary["training"]["tokens"]
    assert report["tokens"] == uninterrupted.summary["training"]["tokens"] - seen_before


def saved_checkpoint(folder: Path, step: int, complete: bool = True) -> Path:
    """A checkpoint-N folder as the Trainer leaves it; `complete`: its file record written too."""
    checkpoint = folder / f"checkpoint-{step}"
    checkpoint.mkdir(parents=True)
    (checkpoint / "model.safetensors").write_bytes(b"w" * 100)
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    if complete:
        training.record_checkpoint_files(checkpoint)
    return checkpoint


def test_a_checkpoint_folder_of_another_configuration_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("SM_CHECKPOINT_DIR", str(tmp_path))
    saved_checkpoint(tmp_path, 4)
    training._resume_checkpoint(TrainingKnobs(learning_rate=1e-3), tmp_path)

    with pytest.raises(StageError, match=r"holds checkpoints of a run with other settings "
                       r"\(learning_rate differ\); empty it or give the job a fresh"):
        training._resume_checkpoint(TrainingKnobs(learning_rate=2e-3), tmp_path)
    # What only changes how a run is observed does not make it another run.
    resumed = training._resume_checkpoint(TrainingKnobs(learning_rate=1e-3, logging_steps=1),
                                          tmp_path)
    assert resumed == str(tmp_path / "checkpoint-4")


def test_a_checkpoint_cut_short_by_the_kill_is_passed_over_for_the_one_before(tmp_path):
    saved_checkpoint(tmp_path, 4)
    saved_checkpoint(tmp_path, 8, complete=False)  # killed before its file record was written
    assert training._resume_checkpoint(TrainingKnobs(), tmp_path) == str(tmp_path / "checkpoint-4")


def test_a_checkpoint_whose_upload_was_cut_short_is_passed_over(tmp_path):
    # SageMaker uploads checkpoint files in no promised order: the record may be in S3 before
    # the weights are whole.
    saved_checkpoint(tmp_path, 4)
    cut = saved_checkpoint(tmp_path, 8)
    (cut / "model.safetensors").write_bytes(b"w" * 40)
    assert training._resume_checkpoint(TrainingKnobs(), tmp_path) == str(tmp_path / "checkpoint-4")


def test_a_retry_resumes_from_the_jobs_of_the_same_run_and_writes_only_its_own(
        tmp_path, training_job, monkeypatch):
    training_job.channel("train", counting_records(8))
    knobs = TrainingKnobs(learning_rate=1e-3)
    monkeypatch.setenv("TRAINING_JOB_NAME", "pipelines-a1-SFT")
    first = training.checkpoint_folder(knobs)
    training._resume_checkpoint(knobs, first)  # records the run's settings
    saved_checkpoint(first, 4)
    saved_checkpoint(first, 8, complete=False)

    # The retry (a new job) of the same run takes the first job's newest complete checkpoint,
    # and writes in a folder of its own: two jobs of one run never write the same file.
    monkeypatch.setenv("TRAINING_JOB_NAME", "pipelines-a1-SFT-2")
    retry = training.checkpoint_folder(knobs)
    assert retry.parent == first.parent and retry != first
    assert training._resume_checkpoint(knobs, retry) == str(first / "checkpoint-4")

    # Other settings, or other data, are another run: another folder, nothing to resume from.
    other = training.checkpoint_folder(TrainingKnobs(learning_rate=2e-3))
    assert other.parent != first.parent
    assert training._resume_checkpoint(TrainingKnobs(learning_rate=2e-3), other) is None
    training_job.channel("train", counting_records(9))
    assert training.checkpoint_folder(knobs).parent != first.parent


def test_bf16_on_a_cpu_is_autocast_on_the_cpu_and_fp16_is_refused():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    args = training.trainer_arguments(TrainingKnobs(checkpoint_steps=0), "bf16")

    assert args.bf16 and not args.fp16 and args.use_cpu
    with pytest.raises(StageError, match="precision 'fp16' needs a CUDA GPU; use precision "
                       "'bf16' or 'fp32' on the CPU"):
        training.prepare_precision(TrainingKnobs(precision="fp16"))


def test_the_knobs_reach_the_trainer():
    knobs = TrainingKnobs(epochs=2, max_steps=7, learning_rate=3e-4, lr_scheduler_type="linear",
                          warmup_ratio=0.1, per_device_batch_size=3,
                          gradient_accumulation_steps=5, gradient_checkpointing=True, seed=7,
                          checkpoint_steps=0)
    args = training.trainer_arguments(knobs, "fp32")

    assert (args.max_steps, args.learning_rate, args.lr_scheduler_type, args.warmup_steps) == (
        7, 3e-4, "linear", 0.1)
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (3, 5)
    assert args.gradient_checkpointing and args.seed == 7 and args.data_seed == 7
    assert args.save_strategy == "no" and not args.bf16
    assert Path(args.output_dir) == training.contract.checkpoint_dir()


def test_the_schedulers_the_knobs_allow_are_transformers_own():
    # Written out in steps.common.knobs so that reading them needs no torch; kept equal here.
    import transformers

    from steps.common.knobs import LR_SCHEDULERS

    assert LR_SCHEDULERS == tuple(s.value for s in transformers.SchedulerType)

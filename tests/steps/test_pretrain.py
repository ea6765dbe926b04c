"""The pre-training stage, run as SageMaker runs it: hyperparameters.json, SM_* folders, no args."""

import contextlib
import io
import json
import math
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from steps import pretrain
from steps.common import contract, training
from steps.common.contract import StageError
from steps.common.demo_data import demo_corpus

from .conftest import TrainingJob

# A model small enough to train for a few dozen steps in seconds on one thread.
TINY_CONFIG = {
    "vocab_size": 512, "hidden_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
    "intermediate_size": 128, "max_seq_length": 64, "per_device_batch_size": 8,
    "precision": "fp32",
}


def as_hyperparameters(**values) -> dict[str, str]:
    return {name: str(value) for name, value in values.items()}


@dataclass
class PretrainRun:
    model_dir: Path
    output_data_dir: Path
    stdout: str


@pytest.fixture(scope="module")
def pretrain_run(tmp_path_factory: pytest.TempPathFactory) -> PretrainRun:
    corpus = demo_corpus(max_documents=48)
    root = tmp_path_factory.mktemp("pretrain-run") / "opt-ml"
    stdout = io.StringIO()
    with pytest.MonkeyPatch.context() as monkeypatch, contextlib.redirect_stdout(stdout):
        job = TrainingJob(root, monkeypatch)
        job.channel("train", corpus[:40])
        job.channel("validation", corpus[40:])
        job.hyperparameters(**as_hyperparameters(
            **TINY_CONFIG, max_steps=50, learning_rate=1e-2, logging_steps=10, checkpoint_steps=0,
        ))
        contract.run(pretrain.main, pretrain.PretrainStageConfig, job="training")
    return PretrainRun(job.model_dir, job.output_data_dir, stdout.getvalue())


def test_pretraining_saves_a_model_and_its_tokenizer_that_reload_and_generate(pretrain_run):
    files = {p.name for p in pretrain_run.model_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json",
            "training_summary.json"} <= files

    model = AutoModelForCausalLM.from_pretrained(pretrain_run.model_dir)
    tokenizer = AutoTokenizer.from_pretrained(pretrain_run.model_dir)
    inputs = tokenizer("The assert statement", return_tensors="pt")
    output = model.generate(**inputs, max_new_tokens=8, do_sample=False)

    assert type(model).__name__ == "LlamaForCausalLM"
    assert len(tokenizer) == model.config.vocab_size == 512
    assert model.config.max_position_embeddings == 64 and model.config.hidden_size == 64
    assert output.shape[1] == inputs["input_ids"].shape[1] + 8


def test_the_loss_falls_well_below_that_of_a_random_guess(pretrain_run):
    history = [json.loads(line) for line in
               (pretrain_run.output_data_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [m["train_loss"] for m in history if "train_loss" in m]
    summary = json.loads((pretrain_run.model_dir / "training_summary.json").read_text())

    assert losses[0] == pytest.approx(math.log(512), abs=0.3)  # random weights: a uniform guess
    # Past the frequencies of single tokens (a 55% cut in perplexity) in 50 steps.
    assert losses[-1] < losses[0] - 0.8
    assert summary["training"]["eval_loss"] < math.log(512) - 0.8
    assert summary["stage"] == "pretrain" and summary["base_model"] == "none"
    assert summary["training"]["global_step"] == 50
    assert summary["hyperparameters"]["hidden_size"] == 64


def test_the_run_logs_throughput_parameters_memory_and_a_loss_curve(pretrain_run):
    def values(name: str) -> list[float]:
        return [float(v) for v in re.findall(rf"[ ]{name}=([0-9.eE+-]+)", pretrain_run.stdout)]

    model = AutoModelForCausalLM.from_pretrained(pretrain_run.model_dir)
    assert all(v > 0 for v in values("tokens_per_second")) and values("tokens_per_second")
    assert values("trainable_parameters") == [model.num_parameters()]
    assert values("peak_memory_mb")[0] > 0
    assert (pretrain_run.output_data_dir / "loss_curve.png").read_bytes().startswith(b"\x89PNG")


def test_a_bad_record_fails_the_job_with_one_line_naming_file_and_line_and_no_model(
    training_job, capsys
):
    training_job.channel("train", [{"text": "Fine."}, {"messages": [{"role": "user"}]}])
    training_job.hyperparameters(**as_hyperparameters(**TINY_CONFIG))

    with pytest.raises(SystemExit) as exited:
        contract.run(pretrain.main, pretrain.PretrainStageConfig, job="training")

    assert exited.value.code == 2
    reason = training_job.failure_file.read_text()
    assert re.fullmatch(r"ERROR: \S+train\.jsonl:2: field 'text': missing; every record "
                        r"needs the first one's fields: text", reason)
    assert capsys.readouterr().err.strip().splitlines()[-1] == reason
    assert not training_job.model_dir.exists()


def test_model_shapes_that_cannot_work_are_refused_by_name():
    with pytest.raises(StageError, match="hidden_size 100 must divide into num_heads 4 heads"):
        pretrain.PretrainStageConfig(hidden_size=100)
    with pytest.raises(StageError, match="num_heads 4 must be a multiple of num_kv_heads 3"):
        pretrain.PretrainStageConfig(num_kv_heads=3)
    with pytest.raises(StageError, match="packing=false is not supported by pre-training"):
        pretrain.PretrainStageConfig(packing=False)


def test_a_restarted_job_resumes_from_its_last_checkpoint(training_job, monkeypatch):
    training_job.channel("train", demo_corpus(max_documents=8))
    config = pretrain.PretrainStageConfig(
        **TINY_CONFIG, max_steps=6, checkpoint_steps=3, logging_steps=1
    )
    with monkeypatch.context() as dying:  # a job that dies never discards its checkpoints
        dying.setattr(training, "_discard_checkpoints", lambda folder: None)
        pretrain.main(config)
    first = json.loads((training_job.model_dir / "training_summary.json").read_text())
    # The job dies after step 3's checkpoint: step 6's never reached the checkpoint folder.
    (last,) = training_job.checkpoint_dir.glob("*/job/checkpoint-6")
    shutil.rmtree(last)

    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        pretrain.main(config)
    second = json.loads((training_job.model_dir / "training_summary.json").read_text())

    assert "resuming from" in stdout.getvalue() and "checkpoint-3" in stdout.getvalue()
    assert second["training"]["resumed_from_step"] == 3
    assert second["training"]["global_step"] == 6
    # Steps 4-6 retrace the first run: same data order, optimizer state and RNG.
    assert second["training"]["final_train_loss"] == pytest.approx(
        first["training"]["final_train_loss"], rel=1e-4
    )
    reloaded = AutoModelForCausalLM.from_pretrained(training_job.model_dir)
    assert torch.isfinite(reloaded.model.embed_tokens.weight).all()

"""Running the alignment stages (reward model, DPO, PPO) as SageMaker runs them, from a test."""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from steps.common import contract, models
from steps.common.datasets import Record, validate_records
from steps.common.demo_data import demo_preferences
from steps.common.peft_methods import PeftKnobs, apply_peft, save_model
from steps.common.preference import PreferencePair, preference_pairs

from .conftest import TrainingJob

TRAIN = demo_preferences(48, seed=0)
# Held out: other prompts (another seed), none of them seen in training.
VALIDATION = [r for r in demo_preferences(60, seed=1)
              if r["prompt"] not in {t["prompt"] for t in TRAIN}][:24]


@dataclass
class AlignmentRun:
    model_dir: Path
    output_data_dir: Path
    stdout: str

    @property
    def summary(self) -> dict[str, Any]:
        return json.loads((self.model_dir / "training_summary.json").read_text())

    @property
    def metrics(self) -> list[dict[str, Any]]:
        lines = (self.output_data_dir / "metrics.jsonl").read_text().splitlines()
        return [json.loads(line) for line in lines]


def run_stage(main: Callable, config_class: type, root: Path, channels: dict[str, list | Path],
              **hyperparameters: Any) -> AlignmentRun:
    """One training job of a stage under `root`: `channels` are records (written as JSONL) or
    folders (a model), the hyperparameters are written as SageMaker writes them."""
    stdout = io.StringIO()
    with pytest.MonkeyPatch.context() as monkeypatch, contextlib.redirect_stdout(stdout):
        job = TrainingJob(root, monkeypatch)
        for name, value in channels.items():
            if isinstance(value, Path):
                monkeypatch.setenv(f"SM_CHANNEL_{name.upper()}", str(value))
            else:
                job.channel(name, value)
        job.hyperparameters(**{key: str(value) for key, value in hyperparameters.items()})
        try:
            contract.run(main, config_class, job="training")
        except SystemExit as exited:
            raise AssertionError(
                f"the stage exited with {exited.code}:\n{stdout.getvalue()[-3000:]}"
            ) from None
    return AlignmentRun(job.model_dir, job.output_data_dir, stdout.getvalue())


def run_failing_stage(main: Callable, config_class: type, root: Path,
                      channels: dict[str, list | Path], capsys: pytest.CaptureFixture,
                      **hyperparameters: Any) -> tuple[int, str, TrainingJob]:
    """A job that must fail: (exit status, last stderr line, the job's folders)."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        job = TrainingJob(root, monkeypatch)
        for name, value in channels.items():
            if isinstance(value, Path):
                monkeypatch.setenv(f"SM_CHANNEL_{name.upper()}", str(value))
            else:
                job.channel(name, value)
        job.hyperparameters(**{key: str(value) for key, value in hyperparameters.items()})
        with pytest.raises(SystemExit) as exited:
            contract.run(main, config_class, job="training")
    return exited.value.code, capsys.readouterr().err.strip().splitlines()[-1], job


def pairs(records: list[dict], chat_template: bool = True) -> list[PreferencePair]:
    """The records as the stages read them (the tiny model's tokenizer has a chat template)."""
    as_records = [Record(data, f"test:{i}") for i, data in enumerate(records)]
    return preference_pairs(as_records, validate_records(as_records), chat_template)


def lora_adapter(folder: Path, seed: int = 0) -> Path:
    """A LoRA adapter over builtin:tiny with non-zero weights, as SFT with LoRA leaves one."""
    tokenizer = models.load_tokenizer(models.TINY)
    knobs = PeftKnobs(peft_method="lora", lora_r=4, lora_alpha=8)
    model = apply_peft(models.load_model(models.TINY), knobs, tokenizer)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(0.05 * torch.randn(param.shape, generator=generator))
    save_model(model, tokenizer, folder, knobs)
    (folder / "training_summary.json").write_text(json.dumps({"stage": "sft"}))
    return folder


def generates(folder: Path) -> bool:
    """Whether the model in `folder` reloads and writes something for a prompt."""
    model = models.load_model(str(folder)).eval()
    tokenizer = models.load_tokenizer(str(folder))
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of Peru?"}], add_generation_prompt=True,
        return_tensors="pt", return_dict=True,
    )
    output = model.generate(**prompt, max_new_tokens=6, do_sample=False,
                            pad_token_id=tokenizer.pad_token_id)
    return output.shape[1] > prompt["input_ids"].shape[1]


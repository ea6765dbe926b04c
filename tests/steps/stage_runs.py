"""Running the SFT stage as SageMaker runs it (hyperparameters.json, SM_* folders) from a test."""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from .conftest import TrainingJob


@dataclass
class StageRun:
    model_dir: Path
    output_data_dir: Path
    checkpoint_dir: Path
    stdout: str

    @property
    def summary(self) -> dict[str, Any]:
        return json.loads((self.model_dir / "training_summary.json").read_text())

    @property
    def metrics(self) -> list[dict[str, Any]]:
        lines = (self.output_data_dir / "metrics.jsonl").read_text().splitlines()
        return [json.loads(line) for line in lines]

    @property
    def losses(self) -> list[float]:
        return [m["train_loss"] for m in self.metrics if "train_loss" in m]


@contextlib.contextmanager
def sft_job(root: Path, train: list[dict], **hyperparameters: Any) -> Iterator[TrainingJob]:
    """The folders, variables and hyperparameters.json of one SFT training job under `root`."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        job = TrainingJob(root, monkeypatch)
        job.channel("train", train)
        job.hyperparameters(**{key: str(value) for key, value in hyperparameters.items()})
        yield job


def run_stage(job: TrainingJob) -> StageRun:
    """Run steps.sft in this process as the container would, its output captured."""
    from steps import sft
    from steps.common import contract

    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        try:
            contract.run(sft.main, sft.SFTStageConfig, job="training")
        except SystemExit as exited:
            raise AssertionError(
                f"the stage exited with {exited.code}:\n{stdout.getvalue()[-3000:]}"
            ) from None
    return StageRun(job.model_dir, job.output_data_dir, job.checkpoint_dir, stdout.getvalue())


def run_sft(root: Path, train: list[dict], **hyperparameters: Any) -> StageRun:
    """One SFT training job under `root`, its hyperparameters written as SageMaker writes them."""
    with sft_job(root, train, **hyperparameters) as job:
        return run_stage(job)

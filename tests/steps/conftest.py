"""Fixtures of the stage tests: a SageMaker training-job layout in a temporary folder, and data."""

import contextlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest

# Before transformers is imported: nothing in these tests may reach a model hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

import torch

# Tiny models gain nothing from a second thread, and when another process holds a core (other tests
# on a 2-core machine) torch's OpenMP threads wait on each other: 30 tiny steps took 0.5 s on one
# thread and 9-16 s on two.
torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[2]


def write_jsonl(path: Path, records: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


def counting_records(n: int = 24) -> list[dict]:
    """Short, repetitive prompt/completion pairs that a tiny model learns in a few dozen steps."""
    return [
        {"prompt": f"Count to {k % 4 + 2}.", "completion": " ".join("abcdef"[: k % 4 + 2])}
        for k in range(n)
    ]


class TrainingJob:
    """The folders and variables SageMaker gives a training container, under one root."""

    def __init__(self, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.root = root
        self.config_dir = root / "input" / "config"
        self.model_dir = root / "model"
        self.output_dir = root / "output"
        self.output_data_dir = self.output_dir / "data"
        self.failure_file = self.output_dir / "failure"
        self.message_file = self.output_dir / "message"  # a processing job's
        self.checkpoint_dir = root / "checkpoints"
        self.config_dir.mkdir(parents=True)
        self.monkeypatch = monkeypatch
        monkeypatch.setenv("SM_INPUT_CONFIG_DIR", str(self.config_dir))
        monkeypatch.setenv("SM_MODEL_DIR", str(self.model_dir))
        monkeypatch.setenv("SM_OUTPUT_DIR", str(self.output_dir))
        monkeypatch.setenv("SM_OUTPUT_DATA_DIR", str(self.output_data_dir))
        monkeypatch.setenv("SM_CHECKPOINT_DIR", str(self.checkpoint_dir))
        monkeypatch.setattr("sys.argv", ["steps.sft"])

    def channel(self, name: str, records: list, file_name: str | None = None) -> Path:
        folder = self.root / "input" / "data" / name
        write_jsonl(folder / (file_name or f"{name}.jsonl"), records)
        self.monkeypatch.setenv(f"SM_CHANNEL_{name.upper()}", str(folder))
        # SageMaker lists a job's channels in inputdataconfig.json.
        listing = self.config_dir / "inputdataconfig.json"
        channels = json.loads(listing.read_text()) if listing.exists() else {}
        listing.write_text(json.dumps({**channels, name: {"TrainingInputMode": "File"}}))
        return folder

    def hyperparameters(self, **values: str) -> None:
        """Written as SageMaker writes them: every value a string."""
        assert all(isinstance(v, str) for v in values.values())
        (self.config_dir / "hyperparameters.json").write_text(json.dumps(values))


@pytest.fixture
def training_job(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> TrainingJob:
    return TrainingJob(tmp_path / "opt-ml", monkeypatch)


@dataclass
class SFTRun:
    job_root: Path
    model_dir: Path
    output_data_dir: Path
    stdout: str


@pytest.fixture(scope="session")
def sft_run(tmp_path_factory: pytest.TempPathFactory) -> SFTRun:
    """One tiny SFT run through the training contract, shared by the sft and evaluate tests."""
    from steps import sft
    from steps.common import contract

    root = tmp_path_factory.mktemp("sft-run") / "opt-ml"
    stdout = io.StringIO()
    with pytest.MonkeyPatch.context() as monkeypatch, contextlib.redirect_stdout(stdout):
        job = TrainingJob(root, monkeypatch)
        job.channel("train", counting_records(32))
        job.channel("validation", counting_records(8))
        job.hyperparameters(
            base_model='"builtin:tiny"',  # JSON-encoded, as the SageMaker SDK writes some strings
            max_steps="30",
            learning_rate="1e-2",
            logging_steps="5",
            lora_dropout="0.0",
            sagemaker_program="sft.py",  # the SDK's own keys are ignored
        )
        contract.run(sft.main, sft.SFTStageConfig, job="training")
    return SFTRun(root, job.model_dir, job.output_data_dir, stdout.getvalue())

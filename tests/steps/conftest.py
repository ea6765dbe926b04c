"""Fixtures of the stage tests: a SageMaker training-job layout in a temporary folder, and data."""

import contextlib
import io
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.conftest import built_once
from tests.pipelines.conftest import forked  # noqa: F401 (a job forked as the local server forks it)

if TYPE_CHECKING:
    from .preference_runs import AlignmentRun

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
    """One tiny SFT run through the training contract, shared by the sft, evaluate, distill and
    gate tests (built once per session: tests/conftest.py's built_once)."""
    from steps import sft
    from steps.common import contract

    def build(folder: Path) -> None:
        stdout = io.StringIO()
        with pytest.MonkeyPatch.context() as monkeypatch, contextlib.redirect_stdout(stdout):
            job = TrainingJob(folder / "opt-ml", monkeypatch)
            job.channel("train", counting_records(32))
            job.channel("validation", counting_records(8))
            job.hyperparameters(
                # JSON-encoded, as the SageMaker SDK writes some strings
                base_model='"builtin:tiny"',
                max_steps="30",
                learning_rate="1e-2",
                logging_steps="5",
                lora_dropout="0.0",
                sagemaker_program="sft.py",  # the SDK's own keys are ignored
            )
            contract.run(sft.main, sft.SFTStageConfig, job="training")
        (folder / "stdout.txt").write_text(stdout.getvalue())

    folder = built_once(tmp_path_factory, "sft-run", build)
    root = folder / "opt-ml"
    return SFTRun(root, root / "model", root / "output" / "data",
                  (folder / "stdout.txt").read_text())


@pytest.fixture(scope="session")
def preference_judge(tmp_path_factory: pytest.TempPathFactory) -> "AlignmentRun":
    """A 30-step tiny reward model (all weights) that ranks the demo preference pairs (capital
    letters win; held-out pairwise accuracy 1.0): test_reward_model's full run, the reward of the
    PPO tests and the judge of the preference evaluation and gate tests."""
    from steps import reward_model

    return _shared_alignment_run(
        tmp_path_factory, "reward-model", reward_model.main, reward_model.RewardModelStageConfig,
        base_model="builtin:tiny", peft_method="none", max_steps=30, logging_steps=10,
        checkpoint_steps=0, learning_rate=1e-3)


@pytest.fixture(scope="session")
def dpo_lora_run(tmp_path_factory: pytest.TempPathFactory) -> "AlignmentRun":
    """24 steps of DPO with LoRA (r 4) from builtin:tiny towards the demo pairs' chosen answers:
    test_dpo's LoRA run and the tuned policy of the preference evaluation tests."""
    from steps import dpo

    return _shared_alignment_run(
        tmp_path_factory, "dpo-lora", dpo.main, dpo.DPOStageConfig,
        base_model="builtin:tiny", peft_method="lora", beta=0.1, max_steps=24, logging_steps=8,
        checkpoint_steps=0, learning_rate=1e-2, lora_r=4, lora_alpha=8, lora_dropout=0.0)


def _shared_alignment_run(tmp_path_factory: pytest.TempPathFactory, name: str, main: Callable,
                          config_class: type, **hyperparameters: Any) -> "AlignmentRun":
    """A training job of an alignment stage on the demo pairs (preference_runs' TRAIN and
    VALIDATION), run once per session and shared by the workers; its log kept in stdout.txt."""
    from .preference_runs import TRAIN, VALIDATION, AlignmentRun, run_stage

    def build(folder: Path) -> None:
        run = run_stage(main, config_class, folder / "opt-ml",
                        {"train": TRAIN, "validation": VALIDATION}, **hyperparameters)
        (folder / "stdout.txt").write_text(run.stdout)

    folder = built_once(tmp_path_factory, name, build)
    root = folder / "opt-ml"
    return AlignmentRun(root / "model", root / "output" / "data",
                        (folder / "stdout.txt").read_text())

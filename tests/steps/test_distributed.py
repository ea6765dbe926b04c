"""The SFT stage under torchrun: two CPU processes (gloo) train as one process with their batch."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from .conftest import ROOT, counting_records
from .stage_runs import StageRun, run_sft, sft_job

KNOBS = {"base_model": "builtin:tiny", "peft_method": "lora", "lora_dropout": 0.0,
         "learning_rate": 1e-2, "precision": "fp32", "max_steps": 6, "logging_steps": 1,
         "checkpoint_steps": 0, "seed": 3}


def test_two_processes_with_batch_2_train_as_one_process_with_batch_4(tmp_path):
    # Same seed, same global batch: accelerate hands each rank its share of every global batch in
    # order, DDP averages the gradients, and the Trainer normalises the loss by the tokens of all
    # ranks (num_items_in_batch gathered). What is left to differ is float rounding: the order of
    # the all-reduce sums and each rank's own padding, about 1e-7 relative in float32.
    with sft_job(tmp_path / "torchrun" / "opt-ml", counting_records(24), **KNOBS) as job:
        launched = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone",
             "--nproc_per_node", "2", "-m", "steps.sft", "--per_device_batch_size", "2"],
            check=False, cwd=ROOT, capture_output=True, text=True, timeout=300,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        assert launched.returncode == 0, launched.stdout[-2000:] + launched.stderr[-3000:]
        two = StageRun(job.model_dir, job.output_data_dir, job.checkpoint_dir, launched.stdout)
    one = run_sft(tmp_path / "single" / "opt-ml", counting_records(24), **KNOBS,
                  per_device_batch_size=4)

    assert "2 per process x 1 accumulation steps x 2 processes = 4 sequences" in two.stdout
    assert "4 per process x 1 accumulation steps x 1 processes = 4 sequences" in one.stdout
    assert len(two.losses) == 6 and two.losses == pytest.approx(one.losses, abs=1e-5)
    assert two.summary["training"]["tokens"] == one.summary["training"]["tokens"]  # all ranks'
    weights = [load_file(run.model_dir / "adapter_model.safetensors") for run in (two, one)]
    assert max((weights[0][k] - weights[1][k]).abs().max().item() for k in weights[0]) < 1e-5
    # Rank 0 alone logs and saves.
    assert two.stdout.count("[metrics] step=1 ") == 1 and two.stdout.count("saved the adapter") == 1
    # Each torchrun process is a fresh interpreter that imported the stage and its libraries itself:
    # none logs bitsandbytes' import-time warning about fetching a kernel from the Hub (the rest of
    # a job's log is read in test_sft, in a job forked as the local server forks it).
    assert "kernels-community" not in launched.stdout + launched.stderr

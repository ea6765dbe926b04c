"""A training job lost part-way through `llm-pipeline run` is retried, and the retry resumes from
the checkpoint the lost job had synced to S3 (CheckpointConfig), as SageMaker's would."""

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pipelines.definition import DEFAULT_BUCKET
from tests.pipelines.conftest import ROOT, clean_env
from tests.pipelines.test_cache import write_sums

PIPELINE = "llm-resume-test"
MAX_STEPS, CHECKPOINT_STEPS = 8, 2
RETRY_SECONDS = 2


def write_recipe(folder: Path) -> Path:
    """The sft recipe, a checkpoint every 2 of 8 steps, every step's loss in the log, and a lost
    job retried after 2 s (the recipe's default is SageMaker's minute)."""
    recipe = yaml.safe_load((ROOT / "pipelines/recipes/sft.yaml").read_text())
    recipe["name"] = "resume-test"
    recipe["lost_job_retry_seconds"] = RETRY_SECONDS
    recipe["stages"]["sft"].update(max_steps=MAX_STEPS, checkpoint_steps=CHECKPOINT_STEPS,
                                   logging_steps=1, per_device_batch_size=2)
    recipe["stages"]["evaluate"].update(max_samples=4, max_new_tokens=8)
    path = folder / "resume-test.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def wait_for(what: str, found, timeout_s: float, run: subprocess.Popen):
    """Poll `found()` until it returns something; fail if the run ends or time runs out first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if (value := found()):
            return value
        if run.poll() is not None:
            pytest.fail(f"the run ended before {what}: {run.stdout.read()[-3000:]}")
        time.sleep(0.02)
    pytest.fail(f"no {what} within {timeout_s:g} s")


def process_in(folder: Path) -> int | None:
    """The process whose working folder is `folder`: a job runs in its job folder."""
    for cwd in Path("/proc").glob("[0-9]*/cwd"):
        with contextlib.suppress(OSError):
            if Path(os.readlink(cwd)) == folder:
                return int(cwd.parent.name)
    return None


def complete_checkpoints(s3, job_name: str) -> list[int]:
    """The steps of the checkpoints of job `job_name` that reached S3 whole (their file record,
    written after the Trainer saved the checkpoint, is there)."""
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=DEFAULT_BUCKET,
                                                         Prefix=f"{PIPELINE}/checkpoints/")
    keys = [o["Key"] for page in pages for o in page.get("Contents", [])]
    return sorted(int(m.group(1)) for key in keys
                  if (m := re.search(rf"/{re.escape(job_name)}/checkpoint-(\d+)/checkpoint_files\.json$",
                                     key)))


def trained_steps(log: str) -> list[int]:
    """The optimizer steps whose training loss the job logged, in order."""
    return [int(step) for step in
            re.findall(r"^\[metrics\] step=(\d+) .*train_loss=", log, re.MULTILINE)]


@pytest.mark.e2e
def test_a_training_job_lost_after_a_synced_checkpoint_is_retried_and_resumes_from_it(
        tmp_path, local_home, clients):
    """One `llm-pipeline run` of the sft recipe whose SFT job is SIGKILLed (as a lost instance)
    once a checkpoint of it is in S3: the step's retry policy retries it (SageMaker.
    JOB_INTERNAL_ERROR, after the recipe's lost_job_retry_seconds), the retry restores the
    checkpoints into its own fresh folder, trains only the remaining steps, and the execution
    registers a package.

    The job is frozen (SIGSTOP) as soon as its first checkpoint is written, so that the kill falls
    before the end of training however fast or slow the machine is."""
    _, s3 = clients
    env = clean_env(local_home)
    # EvalThreshold 0: whether 8 steps of a tiny model pass the gate is not the question here.
    run = subprocess.Popen(
        [sys.executable, "-m", "pipelines.cli", "run", "--recipe", str(write_recipe(tmp_path)),
         "-p", "BaseModel=builtin:tiny", "-p", f"InputData={write_sums(tmp_path)}",
         "-p", "ModelPackageGroup=resume-test", "-p", "EvalThreshold=0"],
        env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    job_group = None
    try:
        # The SFT job writes its first checkpoint (its files, then their record) ...
        executions = local_home / "executions" / PIPELINE
        record = wait_for("a checkpoint of the SFT job", lambda: next(executions.glob(
            "*/SFT/opt_ml/checkpoints/*/*/checkpoint-*/checkpoint_files.json"), None), 300, run)
        job_dir, job_name = record.parents[5], record.parents[1].name
        job = process_in(job_dir)
        assert job is not None, f"no process runs in {job_dir}"
        # ... and is frozen there, while the engine keeps syncing its checkpoint folder to S3; once
        # a checkpoint is there whole, the job is lost as an instance is: SIGKILL, nothing flushed.
        job_group = os.getpgid(job)
        os.killpg(job_group, signal.SIGSTOP)
        wait_for("a checkpoint synced to S3", lambda: complete_checkpoints(s3, job_name), 60, run)
        os.killpg(job_group, signal.SIGKILL)
        output, _ = run.communicate(timeout=600)
    finally:
        if job_group is not None:  # never leave a frozen job behind
            with contextlib.suppress(ProcessLookupError):
                os.killpg(job_group, signal.SIGKILL)
        if run.poll() is None:
            run.kill()
    assert run.returncode == 0, output[-3000:]

    execution = json.loads(next(executions.glob("*/execution.json")).read_text())
    assert execution["status"] == "Succeeded"
    sft = execution["steps"]["SFT"]
    lost, retry = sft["attempts"]
    assert lost["job_name"] == job_name and lost["failure_reason"].startswith("exit code -9")
    assert lost["cause"] == "SageMaker.JOB_INTERNAL_ERROR" and retry["failure_reason"] == ""
    assert retry["started"] - lost["ended"] >= RETRY_SECONDS  # the retry policy's wait

    # The retry resumes from the newest checkpoint the lost job had in S3, and trains only the
    # steps after it: its log and its summary say so.
    resumed = max(complete_checkpoints(s3, job_name))
    assert 0 < resumed < MAX_STEPS
    first_log = (job_dir / "log.txt").read_text()
    assert trained_steps(first_log)[:resumed] == list(range(1, resumed + 1))
    retry_dir = job_dir / "attempt-2"
    retry_log = (retry_dir / "log.txt").read_text()
    assert trained_steps(retry_log) == list(range(resumed + 1, MAX_STEPS + 1)), retry_log
    summary = json.loads((retry_dir / "opt_ml/model/training_summary.json").read_text())
    assert summary["training"]["resumed_from_step"] == resumed
    assert summary["training"]["global_step"] == MAX_STEPS
    # The retry is a new job in a fresh folder: the checkpoint came from S3, and it says so.
    assert (f"resuming from {retry_dir}/opt_ml/checkpoints/{record.parents[2].name}/{job_name}/"
            f"checkpoint-{resumed} (optimizer") in retry_log, retry_log
    restored = re.compile(r"restored \d+ checkpoint files from s3://\S+/checkpoints/\S+/SFT\b")
    assert restored.search(retry_log) and restored.search(output), retry_log

    assert execution["steps"]["Register"]["status"] == "Succeeded"
    sagemaker, _ = clients
    packages = sagemaker.list_model_packages(ModelPackageGroupName="resume-test")
    assert len(packages["ModelPackageSummaryList"]) == 1

"""Running the SFT stage as SageMaker runs it (hyperparameters.json, SM_* folders) from a test."""

from __future__ import annotations

import contextlib
import io
import json
import os
import runpy
import sys
from collections.abc import Callable, Iterator
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


@dataclass
class Program:
    status: int  # as subprocess reports it: -N when killed by signal N
    stdout: str
    stderr: str


def run_as_program(module: str, folder: Path, *argv: str, env: dict[str, str] | None = None,
                   before: Callable[[], object] = lambda: None) -> Program:
    """`python -m <module> ARGV` as a process of its own, forked from this one, which has imported
    torch and transformers already (a fresh interpreter spends seconds on them): the child takes
    `env` as its whole environment (else this process's), calls `before()`, then runs the module
    as `python -m` does, its stdout and stderr in files of `folder`. For what needs a process
    (a job killed with SIGKILL, an exit status); not for what a fresh interpreter alone shows,
    such as warnings printed once per process."""
    return _finish(_start(module, folder, argv, env, before), folder)


def run_as_programs(module: str, folders: list[Path], *argv: str, envs: list[dict[str, str]],
                    timeout: float = 120) -> list[Program]:
    """run_as_program's programs, one per (folder, env), all running at once (the processes of
    one distributed job); once one fails, or after `timeout` seconds (a collective that waits
    forever), those still running are killed. None outlives the call, whatever ends it."""
    import signal
    import time

    started: list[int] = []
    finished = False
    try:
        for folder, env in zip(folders, envs, strict=True):
            started.append(_start(module, folder, argv, env, lambda: None))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ended = [os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
                     for pid in started]  # WNOWAIT: an ended one stays a zombie, its pid ours
            if all(ended) or any(info and (info.si_code != os.CLD_EXITED or info.si_status)
                                 for info in ended):
                break
            time.sleep(0.05)
        finished = True
    finally:
        for pid in started:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)  # only those still running: the others are zombies
        if not finished:
            for pid in started:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, 0)
    return [_finish(pid, folder) for pid, folder in zip(started, folders)]


def _start(module: str, folder: Path, argv: tuple[str, ...], env: dict[str, str] | None,
           before: Callable[[], object]) -> int:
    import torch

    # A child forked from a process whose OpenMP pool has threads hangs at its first parallel
    # operation; tests/steps/conftest.py keeps torch on one thread.
    assert torch.get_num_threads() == 1, "fork only from a process with torch on one thread"
    out, err = folder / "stdout.txt", folder / "stderr.txt"
    folder.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: never returns into the test
        code = 1
        try:
            for fd, path in ((1, out), (2, err)):
                handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(handle, fd)
                os.close(handle)
            sys.stdout = os.fdopen(1, "w", buffering=1, closefd=False)
            sys.stderr = os.fdopen(2, "w", buffering=1, closefd=False)
            if env is not None:
                os.environ.clear()
                os.environ.update(env)
            before()
            sys.argv = [module, *argv]
            sys.modules.pop(module, None)  # run afresh as __main__, as `python -m` does
            runpy.run_module(module, run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as exited:
            code = (exited.code if isinstance(exited.code, int)
                    else 0 if exited.code is None else 1)
        except BaseException:  # noqa: BLE001 (reported as Python reports an uncaught exception)
            import traceback

            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    return pid


def _finish(pid: int, folder: Path) -> Program:
    _, status = os.waitpid(pid, 0)
    return Program(os.waitstatus_to_exitcode(status), (folder / "stdout.txt").read_text(),
                   (folder / "stderr.txt").read_text())

import contextlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
import yaml

from pipelines import tracking
from pipelines.local import jobs, runner
from tests.conftest import built_once

ROOT = Path(__file__).resolve().parents[2]


def clean_env(home: Path, **extra: str) -> dict[str, str]:
    """An environment with no AWS settings of the developer's, and a private engine home.

    The local server started in it gives its jobs one OpenMP thread each (OMP_NUM_THREADS, which
    the engine passes to its jobs): the session's two pytest-xdist workers run jobs at once on a
    2-CPU machine, and two such jobs of two threads each spun waiting for each other's cores
    (a tiny training step took 20 times the CPU it takes on one thread each)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update({"LLM_PIPELINE_HOME": str(home), "HF_HUB_OFFLINE": "1",
                "TOKENIZERS_PARALLELISM": "false", **extra})
    return env


def derived_recipe(folder: Path, recipe: str, name: str | None = None,
                   **stages: dict[str, object]) -> Path:
    """The shipped `recipe` with some stages' settings changed (`sft={"max_steps": 4}`), written
    into `folder` as <name>.yaml: the same DAG, parameters, wiring and gate, on fewer steps and
    samples, as a user trying a recipe quickly would write it. Named as the recipe by default, so
    that its pipeline is the recipe's (llm-<name>); a setting the stage lacks is refused when the
    recipe loads."""
    written = yaml.safe_load((ROOT / "pipelines/recipes" / f"{recipe}.yaml").read_text())
    written["name"] = name = name or recipe
    for stage, settings in stages.items():
        written["stages"][stage].update(settings)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(written, sort_keys=False))
    return path


def write_quick_recipe(folder: Path, name: str) -> Path:
    """The sft recipe with a few training steps and evaluation samples: the same DAG, faster."""
    return derived_recipe(folder, "sft", name, sft={"max_steps": 4},
                          evaluate={"max_samples": 4, "max_new_tokens": 8})


@contextlib.contextmanager
def child_never_reaped(*command: str) -> Iterator[int]:
    """The pid of `command` run as the child of a process that never collects its exit status:
    once it ends, it stays a zombie, as an ended server does where the first process of a
    container reaps no orphans."""
    never_reaps = ("import subprocess, sys, time\n"
                   "child = subprocess.Popen(sys.argv[1:])\n"
                   "print(child.pid, flush=True)\n"
                   "time.sleep(600)\n")
    parent = subprocess.Popen([sys.executable, "-c", never_reaps, *command],
                              stdout=subprocess.PIPE, text=True)
    try:
        yield int(parent.stdout.readline())
    finally:
        parent.kill()
        parent.wait()


def cli(env: dict[str, str], *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, check=False, timeout=timeout)


def cli_here(capsys: pytest.CaptureFixture, env: dict[str, str],
             *args: str) -> subprocess.CompletedProcess:
    """`llm-pipeline args` run in this process (pipelines.cli.main) with environment `env`, what it
    printed captured: for tests of what a command answers where a process of its own would spend
    seconds importing the SageMaker SDK again to build a definition. The command starts with
    boto3's state of a new process (no default session: its region, credentials and endpoint are
    read from `env`), and this process's environment and session are given back whole afterwards
    (a command points its own at the local server). Tests of the command as a program use
    `cli`."""
    import boto3

    from pipelines import cli as command

    saved, session = dict(os.environ), boto3.DEFAULT_SESSION
    os.environ.clear()
    os.environ.update(env)
    boto3.DEFAULT_SESSION = None
    capsys.readouterr()
    try:
        status = command.main(list(args))
    finally:
        os.environ.clear()
        os.environ.update(saved)
        boto3.DEFAULT_SESSION = session
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(["llm-pipeline", *args], status, out, err)


@pytest.fixture(scope="session")
def new_tracking_store(tmp_path_factory) -> Path:
    """The local MLflow store a new engine home's first run makes (its tables: MLflow migrates a
    new SQLite database, 1.6 CPU s in the local server), made once per session and copied into
    each module's home. Made in a process of its own, so that no open connection of this one
    keeps part of it in the write-ahead log; making it is tested in test_tracking_runs."""
    script = ("import sys; from pathlib import Path; from pipelines import tracking; "
              "tracking.prepare_local_store(Path(sys.argv[1]))")

    def build(folder: Path) -> None:
        subprocess.run([sys.executable, "-c", script, str(folder)], env=clean_env(folder),
                       cwd=ROOT, check=True, timeout=600)

    return tracking.local_store(built_once(tmp_path_factory, "new-tracking-store", build))


@pytest.fixture(scope="module")
def local_home(tmp_path_factory, new_tracking_store):
    """A private engine home, its local MLflow store made, whose moto server is stopped when
    the module's tests end."""
    home = tmp_path_factory.mktemp("llm-pipeline-home")
    shutil.copytree(new_tracking_store, tracking.local_store(home))
    yield home
    cli(clean_env(home), "server", "stop")


@pytest.fixture(scope="module")
def clients(local_home):
    """boto3 SageMaker and S3 clients of the module's local server (started if needed)."""
    url = cli(clean_env(local_home), "server", "start").stdout.strip()
    kwargs = {"endpoint_url": url, "region_name": "us-east-1", "aws_access_key_id": "local",
              "aws_secret_access_key": "local"}
    return boto3.client("sagemaker", **kwargs), boto3.client("s3", **kwargs)


@pytest.fixture
def forked(monkeypatch) -> jobs.JobControl:
    """Jobs started as the local server starts them: forked by the warm job runner that the
    session's servers share (tests/conftest.py), which has imported what the stages import (a
    fresh `python -m steps.sft` spent about 6 CPU s importing it). The server's environment has
    one OpenMP thread (tests/pipelines/conftest.py's clean_env), and so has this one: a runner
    imports under one environment, and another would replace it."""
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
    warm = runner.WarmStart()

    def start(command: list[str], env: dict[str, str], cwd):
        job = warm(command, env, cwd)
        assert isinstance(job, runner.Job), next(job.stdout)  # the line saying why not
        return job

    return jobs.JobControl(start=start)

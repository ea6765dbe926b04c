"""`llm-pipeline` as a program: it leaves as soon as its work is done, with its whole output and
its exit status, and without the interpreter's teardown (a tenth of a second or more after every
command).

The interpreter's teardown is seen through an exit handler that a `sitecustomize` module on
PYTHONPATH registers in the command's process before the command starts: it runs only where the
interpreter is torn down.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from pipelines.cli import EXIT_USAGE
from tests.pipelines.conftest import clean_env

TEARDOWN = "the interpreter was torn down"


@pytest.fixture
def program(tmp_path):
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(
        f"import atexit, sys\natexit.register(lambda: print({TEARDOWN!r}, file=sys.stderr))\n")
    env = clean_env(tmp_path / "home", PYTHONPATH=str(hooks))

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], env=env,
                              capture_output=True, text=True, check=False, timeout=300)

    return run


def test_a_command_leaves_with_its_whole_output_and_no_teardown_after_its_work(program):
    done = program("recipes")

    assert done.returncode == 0, done.stderr
    listed = [line.split()[0] for line in done.stdout.splitlines() if line.strip()]
    assert listed == sorted(listed) and {"sft", "dpo", "full-lifecycle", "rlhf-ppo"} <= set(listed)
    assert TEARDOWN not in done.stderr


def test_a_refused_command_leaves_with_its_status_and_its_one_line(program):
    done = program("run", "--recipe", "no-such-recipe")

    assert done.returncode == EXIT_USAGE
    assert done.stderr.strip().splitlines()[-1].startswith("ERROR: recipe 'no-such-recipe' not "
                                                           "found")
    assert TEARDOWN not in done.stderr

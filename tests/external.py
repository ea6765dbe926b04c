"""What a test needs from outside the repository: present, or a loud failure in CI.

Some checks depend on files and tools the repository does not ship: AWS's definition checker in
../shared, a system browser, a Dockerfile linter. On a developer's machine a missing one skips
the test with the reason; in CI (`CI=true`, which `.ci/run` exports) it fails it, so a check
that CI is meant to run can never turn silently into a skip.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.machinery
import importlib.util
import io
import os
import shutil
import subprocess
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHECK_DEFINITION = ROOT.parent / "shared" / "tools" / "check-definition"


def check_definition(path: Path) -> subprocess.CompletedProcess:
    """`check-definition path`: its exit status and what it printed. Run in this process (the
    tool's `main`), as the suite checks some thirty definitions: a process of its own for each
    spent about 0.3 CPU s starting Python and importing botocore."""
    require_file(CHECK_DEFINITION, "check-definition")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        status = _definition_checker().main(str(path))
    return subprocess.CompletedProcess([str(CHECK_DEFINITION), str(path)], status,
                                       printed.getvalue(), "")


@functools.cache
def _definition_checker() -> ModuleType:
    loader = importlib.machinery.SourceFileLoader("check_definition", str(CHECK_DEFINITION))
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(loader.name, loader))
    loader.exec_module(module)
    return module


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def require_file(path: Path, what: str) -> Path:
    """`path`, or fail (CI) / skip (elsewhere) saying what is missing."""
    if not path.exists():
        _missing(f"{what} not found at {path}")
    return path


def require_program(name: str, what: str) -> str:
    """The full path of program `name` on PATH, or fail (CI) / skip (elsewhere)."""
    found = shutil.which(name)
    if found is None:
        _missing(f"{what} ({name}) is not on PATH")
    return found


def _missing(message: str) -> None:
    if in_ci():
        pytest.fail(f"{message}; CI must have it (see .ci/run)", pytrace=False)
    pytest.skip(message)

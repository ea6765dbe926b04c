"""What a test needs from outside the repository: present, or a loud failure in CI.

Some checks depend on files and tools the repository does not ship: AWS's definition checker in
../shared, a system browser, a Dockerfile linter. On a developer's machine a missing one skips
the test with the reason; in CI (`CI=true`, which `.ci/run` exports) it fails it, so a check
that CI is meant to run can never turn silently into a skip.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHECK_DEFINITION = ROOT.parent / "shared" / "tools" / "check-definition"


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

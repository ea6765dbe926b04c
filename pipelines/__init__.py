"""Builds the LLM lifecycle as a SageMaker pipeline definition, and runs it locally or on AWS."""

from __future__ import annotations


class UserError(Exception):
    """A mistake a user can fix (bad recipe, parameter, path, credentials); printed as one line."""


def error_line(message: str) -> str:
    """`ERROR: <message>` on one line, as the stages print theirs."""
    return "ERROR: " + " ".join(message.split())


# A command's exit status when what it did or checked failed (an execution, a plan that does not
# fit); a UserError exits with 2, as argparse does for a usage error.
EXIT_FAILED = 1

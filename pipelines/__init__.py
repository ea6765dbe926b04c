"""Builds the LLM lifecycle as a SageMaker pipeline definition, and runs it locally or on AWS."""

from __future__ import annotations


class UserError(Exception):
    """A mistake a user can fix (bad recipe, parameter, path, credentials); printed as one line."""

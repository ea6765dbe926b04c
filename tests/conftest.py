"""Fixtures of every test."""

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def sagemaker_output_dir(tmp_path_factory):
    """A stage a test runs (in-process or as a program) writes SageMaker's /opt/ml/output files,
    such as a failed job's reason, into a folder of the test session: never into the /opt/ml of
    the machine running the tests. The local engine points its jobs at their own folders; tests
    that look at these files point SM_OUTPUT_DIR at their own folder too."""
    folder = tmp_path_factory.mktemp("opt-ml-output")
    previous = os.environ.get("SM_OUTPUT_DIR")
    os.environ["SM_OUTPUT_DIR"] = str(folder)
    yield folder
    if previous is None:
        os.environ.pop("SM_OUTPUT_DIR", None)
    else:
        os.environ["SM_OUTPUT_DIR"] = previous

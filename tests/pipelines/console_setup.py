"""What the console's tests share: a console served from a thread of the test process against
the module's local server, and the pipeline and model packages it shows."""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipelines.console import api
from pipelines.console.server import ConsoleServer
from tests.pipelines.conftest import clean_env, cli
from tests.pipelines.test_registry import BUCKET, register

__all__ = ["BUCKET", "finished", "package", "quick_pipeline", "serving", "sft_pipeline",
           "upsert_sft"]

ROLE = "arn:aws:iam::123456789012:role/llm-pipeline-execution"
# A pipeline that runs no job, so starting it costs nothing: Check (Epochs >= 10), whose else
# branch is TooFewEpochs (Fail). It succeeds with 10 epochs or more, and fails below.
QUICK_PIPELINE = {"Version": "2020-12-01", "Parameters": [
    {"Name": "Epochs", "Type": "Integer", "DefaultValue": 1}],
    "Steps": [{"Name": "Check", "Type": "Condition", "Arguments": {
        "Conditions": [{"Type": "GreaterThanOrEqualTo", "LeftValue": {"Get": "Parameters.Epochs"},
                        "RightValue": 10}],
        "IfSteps": [],
        "ElseSteps": [{"Name": "TooFewEpochs", "Type": "Fail", "Arguments": {"ErrorMessage": {
            "Std:Join": {"On": " ", "Values": [{"Get": "Parameters.Epochs"}, "epochs: too few"]}}}}],
    }}]}


def package(sagemaker, s3, metrics: dict, group: str = "llm-sft", **metadata: str) -> str:
    """A package as the pipeline's Register step makes it, with an evaluation of its own."""
    return register(sagemaker, s3, group, metrics, version=uuid.uuid4().hex[:8], **metadata)


@contextlib.contextmanager
def serving(endpoint_url: str, home: Path) -> Iterator[ConsoleServer]:
    """A console of the local target whose endpoint is `endpoint_url`, on 127.0.0.1."""
    with pytest.MonkeyPatch.context() as patch:  # only while the clients are made
        for name in [n for n in os.environ if n.startswith("AWS_")]:
            patch.delenv(name)
        patch.setenv("LLM_PIPELINE_HOME", str(home))
        patch.setenv("AWS_ENDPOINT_URL", endpoint_url)
        patch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        patch.setenv("AWS_ACCESS_KEY_ID", "local")
        patch.setenv("AWS_SECRET_ACCESS_KEY", "local")
        target = api.connect("local")
    console = ConsoleServer(target)
    # shutdown() waits for serve_forever's next poll: every 0.05 s, not its default 0.5 s.
    thread = threading.Thread(target=console.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    try:
        yield console
    finally:
        console.shutdown()
        console.server_close()


def quick_pipeline(sagemaker, name: str = "llm-console-quick") -> str:
    """QUICK_PIPELINE on the endpoint (created once); its name."""
    if name not in [p["PipelineName"] for p in sagemaker.list_pipelines()["PipelineSummaries"]]:
        sagemaker.create_pipeline(PipelineName=name, PipelineDefinition=json.dumps(QUICK_PIPELINE),
                                  RoleArn=ROLE, PipelineDescription="a check and its failure")
    return name


def finished(sagemaker, arn: str, timeout: float = 60) -> dict:
    """The execution's description once it no longer runs."""
    deadline = time.monotonic() + timeout
    while True:
        described = sagemaker.describe_pipeline_execution(PipelineExecutionArn=arn)
        if described["PipelineExecutionStatus"] not in ("Executing", "Stopping"):
            return described
        assert time.monotonic() < deadline, f"{arn} still {described['PipelineExecutionStatus']}"
        time.sleep(0.05)


def sft_pipeline(sagemaker, recipe_definitions: dict[tuple[str, str], Path]) -> str:
    """The sft recipe's pipeline on the local server, created (or updated) from the session's
    build of its local definition (tests/conftest.py; the bytes `llm-pipeline definition` prints,
    tests/pipelines/test_definition.py); its name. For what the console shows of a recipe's
    pipeline, without a process that imports the SageMaker SDK to build it again; a test that
    runs the pipeline upserts it as a user does (upsert_sft)."""
    name, text = "llm-sft", recipe_definitions["sft", "local"].read_text()
    if name in [p["PipelineName"] for p in sagemaker.list_pipelines()["PipelineSummaries"]]:
        sagemaker.update_pipeline(PipelineName=name, PipelineDefinition=text, RoleArn=ROLE)
    else:
        sagemaker.create_pipeline(PipelineName=name, PipelineDefinition=text, RoleArn=ROLE)
    return name


def upsert_sft(home: Path) -> str:
    """Create the sft recipe's pipeline on the local server, as a user would; its name.
    Nothing here starts it: an execution of it trains a model."""
    result = cli(clean_env(home), "upsert", "--recipe", "sft")
    assert result.returncode == 0, result.stderr
    return "llm-sft"

"""The local endpoint answers the SageMaker Pipelines API for real, to boto3 and the SageMaker SDK.

These executions run no job (a condition on a parameter, and the Fail steps it leads to), so they
take a second; tests/pipelines/test_local_sagemaker_runs.py runs a real recipe. Every answer of
the local service goes through `strict_client`, which fails a call whose answer is outside
botocore's output shape.
"""

import configparser
import importlib.util
import json
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from botocore.exceptions import ClientError

from pipelines.local import server
from tests.pipelines.conftest import clean_env, cli
from tests.pipelines.output_shapes import strict_client

ROLE = "arn:aws:iam::123456789012:role/llm-pipeline-execution"


def gate_pipeline(threshold_default: int = 1) -> dict:
    """Gate: Threshold > 5 takes TooHigh (Fail); otherwise Check: Label == demo, else BadLabel."""
    def fail(name: str, *message) -> dict:
        return {"Name": name, "Type": "Fail",
                "Arguments": {"ErrorMessage": {"Std:Join": {"On": " ", "Values": list(message)}}}}

    check = {"Name": "Check", "Type": "Condition", "Arguments": {
        "Conditions": [{"Type": "Equals", "LeftValue": {"Get": "Parameters.Label"},
                        "RightValue": "demo"}],
        "IfSteps": [], "ElseSteps": [fail("BadLabel", "label", {"Get": "Parameters.Label"})]}}
    return {"Version": "2020-12-01", "Parameters": [
        {"Name": "Threshold", "Type": "Integer", "DefaultValue": threshold_default},
        {"Name": "Label", "Type": "String", "DefaultValue": "demo"}],
        "Steps": [{"Name": "Gate", "Type": "Condition", "DisplayName": "Threshold gate",
                   "Arguments": {
                       "Conditions": [{"Type": "GreaterThan", "RightValue": 5,
                                       "LeftValue": {"Get": "Parameters.Threshold"}}],
                       "IfSteps": [fail("TooHigh", "threshold", {"Get": "Parameters.Threshold"},
                                        "is over 5")],
                       "ElseSteps": [check]}}]}


@pytest.fixture(scope="module")
def url(local_home):
    started = cli(clean_env(local_home), "server", "start")
    assert started.returncode == 0, started.stderr
    return started.stdout.strip()


@pytest.fixture(scope="module")
def sagemaker(url):
    return strict_client(url)


@pytest.fixture(scope="module")
def pipeline(sagemaker):
    sagemaker.create_pipeline(PipelineName="gate", PipelineDefinition=json.dumps(gate_pipeline()),
                              RoleArn=ROLE, PipelineDescription="a gate and its failures")
    return "gate"


def finished(sagemaker, arn: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        described = sagemaker.describe_pipeline_execution(PipelineExecutionArn=arn)
        if described["PipelineExecutionStatus"] not in ("Executing", "Stopping"):
            return described
        assert time.monotonic() < deadline, f"{arn} still {described['PipelineExecutionStatus']}"
        time.sleep(0.05)


def start(sagemaker, pipeline, **parameters) -> str:
    return sagemaker.start_pipeline_execution(
        PipelineName=pipeline,
        PipelineParameters=[{"Name": k, "Value": str(v)} for k, v in parameters.items()],
    )["PipelineExecutionArn"]


def steps(sagemaker, arn: str) -> dict[str, dict]:
    listed = sagemaker.list_pipeline_execution_steps(PipelineExecutionArn=arn)
    return {step["StepName"]: step for step in listed["PipelineExecutionSteps"]}


def test_a_created_pipeline_is_listed_and_described_with_its_definition_as_sent(sagemaker,
                                                                              pipeline):
    summaries = sagemaker.list_pipelines()["PipelineSummaries"]
    assert [s["PipelineName"] for s in summaries] == ["gate"]
    described = sagemaker.describe_pipeline(PipelineName="gate")
    assert described["PipelineArn"] == "arn:aws:sagemaker:us-east-1:123456789012:pipeline/gate"
    assert described["PipelineDefinition"] == json.dumps(gate_pipeline())
    assert described["PipelineStatus"] == "Active" and described["RoleArn"] == ROLE
    assert sagemaker.describe_pipeline(PipelineName=described["PipelineArn"])["PipelineName"] == \
        "gate"


def test_creating_a_pipeline_twice_is_refused_in_the_words_sagemaker_uses(sagemaker, pipeline):
    with pytest.raises(ClientError) as refused:
        sagemaker.create_pipeline(PipelineName="gate", RoleArn=ROLE,
                                  PipelineDefinition=json.dumps(gate_pipeline()))
    error = refused.value.response["Error"]
    # The SageMaker SDK's upsert takes this code and message to mean "update instead".
    assert error["Code"] == "ValidationException" and "already exists" in error["Message"]


def test_an_execution_runs_with_its_parameters_and_reports_each_step_it_ran(sagemaker, pipeline):
    arn = start(sagemaker, pipeline, Threshold=3)
    assert arn.startswith("arn:aws:sagemaker:us-east-1:123456789012:pipeline/gate/execution/")
    described = finished(sagemaker, arn)
    assert described["PipelineExecutionStatus"] == "Succeeded"
    assert "FailureReason" not in described
    ran = steps(sagemaker, arn)
    assert set(ran) == {"Gate", "Check"}  # steps on branches not taken are not listed
    assert ran["Gate"]["Metadata"] == {"Condition": {"Outcome": "False"}}
    assert ran["Check"]["Metadata"] == {"Condition": {"Outcome": "True"}}
    assert ran["Gate"]["StepDisplayName"] == "Threshold gate"
    assert all(s["StepStatus"] == "Succeeded" and s["AttemptCount"] == 1 for s in ran.values())
    assert ran["Gate"]["StartTime"] <= ran["Check"]["StartTime"]
    parameters = sagemaker.list_pipeline_parameters_for_execution(PipelineExecutionArn=arn)
    assert {p["Name"]: p["Value"] for p in parameters["PipelineParameters"]} == {
        "Threshold": "3", "Label": "demo"}  # the default too, as the execution used it


def test_a_fail_step_fails_the_execution_with_its_message(sagemaker, pipeline):
    arn = start(sagemaker, pipeline, Threshold=9)
    described = finished(sagemaker, arn)
    assert described["PipelineExecutionStatus"] == "Failed"
    assert "threshold 9 is over 5" in described["FailureReason"]
    failed = steps(sagemaker, arn)["TooHigh"]
    assert failed["StepStatus"] == "Failed"
    assert failed["FailureReason"] == "threshold 9 is over 5"
    assert failed["Metadata"] == {"Fail": {"ErrorMessage": "threshold 9 is over 5"}}
    summaries = sagemaker.list_pipeline_executions(PipelineName=pipeline)
    latest = summaries["PipelineExecutionSummaries"][0]  # newest first
    assert latest["PipelineExecutionArn"] == arn
    assert latest["PipelineExecutionStatus"] == "Failed"


def raw_call(url: str, operation: str, request: dict, **headers: str) -> tuple[int, dict]:
    """A request as it goes over the wire, without botocore filling in or checking anything."""
    call = urllib.request.Request(url + "/", data=json.dumps(request).encode(), method="POST",
                                  headers={"X-Amz-Target": f"SageMaker.{operation}",
                                           "Content-Type": "application/x-amz-json-1.1",
                                           **headers})
    try:
        with urllib.request.urlopen(call, timeout=10) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_what_sagemaker_refuses_is_refused_before_anything_runs(url, sagemaker, pipeline):
    before = len(sagemaker.list_pipeline_executions(
        PipelineName=pipeline, MaxResults=100)["PipelineExecutionSummaries"])
    for parameters, message in (({"Threshold": "many"}, "Threshold='many' is not a valid Integer"),
                                ({"Colour": "red"}, "unknown pipeline parameter(s) Colour")):
        with pytest.raises(ClientError) as refused:
            start(sagemaker, pipeline, **parameters)
        assert refused.value.response["Error"]["Code"] == "ValidationException"
        assert message in refused.value.response["Error"]["Message"]
    # What the API model says beyond types, which botocore's client does not check.
    with pytest.raises(ClientError) as refused:
        sagemaker.create_pipeline(PipelineName="gate_2", RoleArn=ROLE,
                                  PipelineDefinition=json.dumps(gate_pipeline()))
    assert refused.value.response["Error"]["Code"] == "ValidationException"
    assert "PipelineName: 'gate_2' does not match" in refused.value.response["Error"]["Message"]
    # What botocore's input shape requires (boto3 would have filled the token in).
    status, answer = raw_call(url, "StartPipelineExecution", {"PipelineName": pipeline})
    assert status == 400 and answer["__type"] == "ValidationException"
    assert 'Missing required parameter in input: "ClientRequestToken"' in answer["message"]
    after = sagemaker.list_pipeline_executions(PipelineName=pipeline, MaxResults=100)
    assert len(after["PipelineExecutionSummaries"]) == before


def test_what_does_not_exist_is_resource_not_found(sagemaker, pipeline):
    missing = "arn:aws:sagemaker:us-east-1:123456789012:pipeline/gate/execution/000000000000"
    for call in (lambda: sagemaker.describe_pipeline(PipelineName="no-such-pipeline"),
                 lambda: sagemaker.describe_pipeline_execution(PipelineExecutionArn=missing),
                 lambda: sagemaker.list_pipeline_execution_steps(PipelineExecutionArn=missing),
                 lambda: start(sagemaker, "no-such-pipeline")):
        with pytest.raises(ClientError) as refused:
            call()
        assert refused.value.response["Error"]["Code"] == "ResourceNotFound"


def test_the_same_start_request_sent_twice_is_one_execution(sagemaker, pipeline):
    request = {"PipelineName": pipeline, "ClientRequestToken": "a-client-retry-" + "0" * 20}
    first = sagemaker.start_pipeline_execution(**request)["PipelineExecutionArn"]
    assert sagemaker.start_pipeline_execution(**request)["PipelineExecutionArn"] == first


def test_an_updated_pipeline_keeps_its_versions_and_an_execution_runs_the_one_it_names(
        sagemaker, pipeline):
    updated = sagemaker.update_pipeline(PipelineName=pipeline,
                                        PipelineDefinition=json.dumps(gate_pipeline(9)))
    assert updated["PipelineVersionId"] == 2
    versions = sagemaker.list_pipeline_versions(PipelineName=pipeline)["PipelineVersionSummaries"]
    assert [v["PipelineVersionId"] for v in versions] == [2, 1]
    latest = start(sagemaker, pipeline)  # Threshold defaults to 9 now
    first = sagemaker.start_pipeline_execution(PipelineName=pipeline, PipelineVersionId=1)[
        "PipelineExecutionArn"]
    assert finished(sagemaker, latest)["PipelineExecutionStatus"] == "Failed"
    assert finished(sagemaker, first)["PipelineExecutionStatus"] == "Succeeded"
    ran = sagemaker.describe_pipeline_definition_for_execution(PipelineExecutionArn=first)
    assert ran["PipelineDefinition"] == json.dumps(gate_pipeline())
    sagemaker.update_pipeline(PipelineName=pipeline, PipelineDefinition=json.dumps(gate_pipeline()))


def test_a_selective_execution_runs_the_selected_steps_and_reuses_the_others(sagemaker,
                                                                           pipeline):
    source = start(sagemaker, pipeline, Label="other")
    assert finished(sagemaker, source)["PipelineExecutionStatus"] == "Failed"  # BadLabel
    selective = sagemaker.start_pipeline_execution(
        PipelineName=pipeline, PipelineParameters=[{"Name": "Label", "Value": "demo"}],
        SelectiveExecutionConfig={"SourcePipelineExecutionArn": source,
                                  "SelectedSteps": [{"StepName": "Check"},
                                                    {"StepName": "BadLabel"}]},
        ParallelismConfiguration={"MaxParallelExecutionSteps": 2})["PipelineExecutionArn"]
    described = finished(sagemaker, selective)
    assert described["PipelineExecutionStatus"] == "Succeeded"
    assert described["SelectiveExecutionConfig"]["SourcePipelineExecutionArn"] == source
    assert described["ParallelismConfiguration"] == {"MaxParallelExecutionSteps": 2}
    ran = steps(sagemaker, selective)
    assert ran["Gate"]["SelectiveExecutionResult"] == {"SourcePipelineExecutionArn": source}
    assert "SelectiveExecutionResult" not in ran["Check"]
    assert ran["Check"]["Metadata"] == {"Condition": {"Outcome": "True"}}

    with pytest.raises(ClientError) as refused:  # Check lies between Gate and BadLabel
        sagemaker.start_pipeline_execution(
            PipelineName=pipeline, SelectiveExecutionConfig={
                "SourcePipelineExecutionArn": source,
                "SelectedSteps": [{"StepName": "Gate"}, {"StepName": "BadLabel"}]})
    assert "step Check lies between the selected steps Gate and BadLabel" in str(refused.value)


def test_the_sagemaker_sdk_describes_lists_the_steps_of_and_waits_for_an_execution(
        url, pipeline):
    import boto3

    from pipelines.definition import prepare_sdk_environment

    prepare_sdk_environment("us-east-1")  # telemetry off: it would call AWS itself
    from sagemaker.core.helper.session_helper import Session
    from sagemaker.mlops.workflow.pipeline import Pipeline

    boto_session = boto3.Session(region_name="us-east-1", aws_access_key_id="local",
                                 aws_secret_access_key="local")
    session = Session(boto_session=boto_session, default_bucket="llm-pipeline-123456789012",
                      sagemaker_client=strict_client(url))
    sdk_pipeline = Pipeline(name=pipeline, sagemaker_session=session)
    assert sdk_pipeline.describe()["PipelineName"] == pipeline
    execution = sdk_pipeline.start(parameters={"Threshold": 2})
    execution.wait(delay=0.1, max_attempts=600)  # 60 s at most, looking every 0.1 s
    assert execution.describe()["PipelineExecutionStatus"] == "Succeeded"
    assert {s["StepName"] for s in execution.list_steps()} == {"Gate", "Check"}
    assert sdk_pipeline.list_executions(max_results=1)["PipelineExecutionSummaries"][0][
        "PipelineExecutionArn"] == execution.arn


def test_a_web_page_cannot_reach_the_local_server(url, sagemaker, pipeline):
    """A page in the user's browser (another origin, or a DNS-rebound host name) gets nothing:
    no execution started, no bucket listed."""
    before = sagemaker.list_pipeline_executions(PipelineName=pipeline, MaxResults=100)
    request = {"PipelineName": pipeline, "ClientRequestToken": "x" * 32}
    for headers in ({"Origin": "https://example.com"}, {"Host": "attacker.example:80"}):
        status, answer = raw_call(url, "StartPipelineExecution", request, **headers)
        assert status == 403 and answer["__type"] == "AccessDeniedException"
        listing = urllib.request.Request(url + "/", headers=headers)  # S3 ListBuckets
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(listing, timeout=5)
        assert refused.value.code == 403
    after = sagemaker.list_pipeline_executions(PipelineName=pipeline, MaxResults=100)
    assert after["PipelineExecutionSummaries"] == before["PipelineExecutionSummaries"]


def test_pipelines_and_executions_survive_a_restart_of_the_server(local_home, sagemaker,
                                                                 pipeline):
    # Last in this module: it replaces the module's server.
    arn = start(sagemaker, pipeline, Threshold=9)
    before = finished(sagemaker, arn)
    env = clean_env(local_home)
    assert cli(env, "server", "stop").returncode == 0
    restarted = strict_client(cli(env, "server", "start").stdout.strip())

    assert restarted.describe_pipeline(PipelineName=pipeline)["PipelineDefinition"] == \
        json.dumps(gate_pipeline())
    again = restarted.describe_pipeline_execution(PipelineExecutionArn=arn)
    assert {k: again[k] for k in ("PipelineExecutionStatus", "FailureReason", "CreationTime")} == \
        {k: before[k] for k in ("PipelineExecutionStatus", "FailureReason", "CreationTime")}
    assert steps(restarted, arn)["TooHigh"]["FailureReason"] == "threshold 9 is over 5"
    assert finished(restarted, start(restarted, pipeline, Threshold=2))[
        "PipelineExecutionStatus"] == "Succeeded"


def test_the_server_leaves_modules_compiled_for_the_jobs_which_may_not_write_bytecode(tmp_path):
    # A job's image environment sets PYTHONDONTWRITEBYTECODE: without this, every job compiled
    # the stage modules it imports from their source.
    package = tmp_path / "stages"
    package.mkdir()
    source = package / "sft.py"
    source.write_text("ANSWER = 42\n")

    server.compile_modules([package])

    with open(importlib.util.cache_from_source(str(source)), "rb") as compiled:
        magic, flags, mtime, size = (compiled.read(4), *(int.from_bytes(compiled.read(4),
                                                                         "little")
                                                          for _ in range(3)))
    # What Python checks before it takes the bytecode instead of compiling the source.
    assert magic == importlib.util.MAGIC_NUMBER and flags == 0
    assert (mtime, size) == (int(source.stat().st_mtime), source.stat().st_size)


def test_the_server_compiles_every_package_the_project_installs_and_only_those():
    # The list is read back from the install, so a package added to setup.cfg is compiled too.
    setup = configparser.ConfigParser()
    setup.read(Path(__file__).parents[2] / "setup.cfg")
    installed = {name for name in setup["options.packages.find"]["include"].split()
                 if "." not in name}

    folders = server.project_folders()

    assert {folder.name for folder in folders} == installed
    assert all((folder / "__init__.py").is_file() for folder in folders)

"""The web console's API and who may use it (pipelines/console/), against a real local server.

The console acts with the user's credentials: a request without its token, or from another
origin or host, must change nothing. The local server runs the executions the console starts;
what only AWS gives (CloudWatch Logs, a training job's archive on S3) is fed in SageMaker's own
shapes through botocore's Stubber, which checks every response against botocore's output shapes.
"""

import http.client
import io
import json
import signal
import socket
import subprocess
import sys
import tarfile
import urllib.parse
from datetime import UTC, datetime, timedelta

import boto3
import pytest
from botocore.exceptions import ClientError
from botocore.stub import Stubber

from pipelines import cost
from pipelines import graph as definition_graph
from pipelines.console import api
from pipelines.console.server import ConsoleServer
from tests.pipelines.conftest import ROOT, clean_env
from tests.pipelines.console_setup import (
    BUCKET,
    finished,
    package,
    quick_pipeline,
    serving,
    sft_pipeline,
)

ACCOUNT = "123456789012"
EXECUTION = f"arn:aws:sagemaker:us-east-1:{ACCOUNT}:pipeline/llm-sft/execution/exec1"


@pytest.fixture(scope="module")
def bucket(clients):
    """The bucket the packages' evaluations and the jobs' outputs are in."""
    clients[1].create_bucket(Bucket=BUCKET)
    return BUCKET


@pytest.fixture(scope="module")
def console(clients, local_home, bucket):
    with serving(clients[0].meta.endpoint_url, local_home) as served:
        yield served


def request(console: ConsoleServer, method: str, path: str, body=None, **headers: str):
    """One HTTP request to the console; (status, JSON or text, response headers)."""
    connection = http.client.HTTPConnection("127.0.0.1", console.port, timeout=60)
    headers = {"Host": f"127.0.0.1:{console.port}", **headers}
    if body is not None:
        headers.setdefault("Content-Type", "application/json")
    connection.request(method, path, body=None if body is None else json.dumps(body),
                       headers={k.replace("_", "-"): v for k, v in headers.items()})
    response = connection.getresponse()
    text = response.read().decode()
    try:
        content = json.loads(text)
    except ValueError:
        content = text
    return response.status, content, response.headers


def token(console) -> dict[str, str]:
    return {"X_Console_Token": console.token}


def status_of(sagemaker, arn: str) -> tuple[str, str]:
    package = sagemaker.describe_model_package(ModelPackageName=arn)
    return package["ModelApprovalStatus"], package.get("ApprovalDescription", "")


# -- nobody else drives it -------------------------------------------------------------------

def test_an_approval_without_the_token_is_refused_and_the_package_stays_pending(console, clients):
    sagemaker, s3 = clients
    arn = package(sagemaker, s3, {"perplexity": 12.0})
    approval = {"arn": arn, "status": "Approved", "reason": "looks fine"}

    status, answer, _ = request(console, "POST", "/api/approval", approval)
    wrong, _, _ = request(console, "POST", "/api/approval", approval, X_Console_Token="guess")

    assert (status, wrong) == (403, 403) and "X-Console-Token" in answer["error"]
    assert status_of(sagemaker, arn) == ("PendingManualApproval", "")


@pytest.mark.parametrize("forged", [
    {"Origin": "http://127.0.0.1:9"},  # another port of the same machine: another origin
    {"Origin": "https://attacker.example"},
    {"Origin": "null"},  # a sandboxed frame, such as the evaluation report
    {"Sec_Fetch_Site": "same-site"},
    {"Sec_Fetch_Site": "cross-site"},
], ids=["other-port", "other-site", "null-origin", "same-site", "cross-site"])
def test_a_cross_origin_approval_is_refused_even_with_the_token(console, clients, forged):
    sagemaker, s3 = clients
    arn = package(sagemaker, s3, {"perplexity": 12.0})

    status, answer, headers = request(console, "POST", "/api/approval",
                                      {"arn": arn, "status": "Approved", "reason": "forged"},
                                      **token(console), **forged)

    assert status == 403 and answer["error"].startswith("refused:")
    assert headers.get("Access-Control-Allow-Origin") is None
    assert status_of(sagemaker, arn) == ("PendingManualApproval", "")


def test_the_cookie_alone_cannot_change_anything(console, clients):
    """Browsers send a SameSite=Strict cookie from any page of 127.0.0.1, whatever its port."""
    sagemaker, s3 = clients
    arn = package(sagemaker, s3, {"perplexity": 12.0})
    cookie = f"{console.cookie_name}={console.token}"

    status, _, _ = request(console, "POST", "/api/approval",
                           {"arn": arn, "status": "Rejected", "reason": "forged"}, Cookie=cookie)
    form, _, _ = request(console, "POST", "/api/approval", None, Cookie=cookie, **token(console),
                         Content_Type="text/plain")  # what an HTML form can send

    assert (status, form) == (403, 415)
    assert status_of(sagemaker, arn) == ("PendingManualApproval", "")


def test_a_request_naming_another_host_is_refused(console):
    """A page on a DNS name rebound to 127.0.0.1 sends its own name as Host."""
    status, answer, _ = request(console, "GET", "/api/packages", **token(console),
                                Host=f"attacker.example:{console.port}")

    assert status == 403 and "is not this console" in answer["error"]


def test_reads_need_the_token_too_and_cors_is_never_allowed(console):
    without, _, _ = request(console, "GET", "/api/packages")
    preflight, _, headers = request(console, "OPTIONS", "/api/approval",
                                    Origin="https://attacker.example",
                                    Access_Control_Request_Method="POST")
    with_token, packages, _ = request(console, "GET", "/api/packages", **token(console))

    assert (without, preflight, with_token) == (403, 405, 200) and isinstance(packages, list)
    assert not [h for h in headers if h.lower().startswith("access-control-")]


def test_the_printed_url_sets_a_strict_cookie_and_the_page_needs_it(console):
    opened, _, headers = request(console, "GET", f"/?token={console.token}", Sec_Fetch_Site="none")
    locked, page_without, _ = request(console, "GET", "/")
    status, page, page_headers = request(console, "GET", "/",
                                         Cookie=f"{console.cookie_name}={console.token}")

    cookie = headers["Set-Cookie"]
    assert opened == 303 and headers["Location"] == "/"  # the token leaves the address bar
    assert cookie.startswith(f"{console.cookie_name}={console.token};")
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
    assert locked == 403 and console.token not in page_without and "?token=" in page_without
    assert status == 200 and f'content="{console.token}"' in page
    assert "frame-ancestors 'none'" in page_headers["Content-Security-Policy"]
    assert page_headers["X-Frame-Options"] == "DENY"


def test_the_console_listens_on_loopback_unless_told_otherwise(console):
    server = ConsoleServer(console.target)
    try:
        assert server.server_address[0] == "127.0.0.1"
        assert server.url.startswith("http://127.0.0.1:") and server.token != console.token
    finally:
        server.server_close()


def test_the_console_command_prints_a_loopback_url_whose_token_opens_it(local_home):
    command = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "console", "--port", "0"],
                               env=clean_env(local_home), cwd=ROOT, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        printed = [command.stdout.readline(), command.stdout.readline()]
        url = urllib.parse.urlsplit(printed[1].removeprefix("open ").strip())
        connection = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
        connection.request("GET", f"/?{url.query}")
        opened = connection.getresponse()
        opened.read()
        connection.request("GET", "/api/overview", headers={
            "X-Console-Token": urllib.parse.parse_qs(url.query)["token"][0]})
        overview = json.loads(connection.getresponse().read())
    finally:
        command.send_signal(signal.SIGINT)
        command.wait(timeout=30)

    assert printed[0].startswith("llm-pipeline console (local: http://127.0.0.1:")
    assert url.hostname == "127.0.0.1" and url.path == "/" and url.query.startswith("token=")
    assert opened.status == 303 and "SameSite=Strict" in opened.headers["Set-Cookie"]
    assert overview["target"] == "local" and overview["region"] == "us-east-1"
    assert command.returncode == 0


# -- what the page shows and does ----------------------------------------------------------

def test_approve_and_reject_keep_the_reason_and_a_missing_reason_changes_nothing(console, clients):
    sagemaker, s3 = clients
    approved = package(sagemaker, s3, {"perplexity": 12.0})
    rejected = package(sagemaker, s3, {"perplexity": 30.0})

    refused, answer, _ = request(console, "POST", "/api/approval",
                                 {"arn": approved, "status": "Approved", "reason": "  "},
                                 **token(console))
    unchanged = status_of(sagemaker, approved)
    ok, shown, _ = request(console, "POST", "/api/approval",
                           {"arn": approved, "status": "Approved", "reason": "beats v1 on held-out"},
                           **token(console))
    request(console, "POST", "/api/approval",
            {"arn": rejected, "status": "Rejected", "reason": "perplexity regressed"},
            **token(console))

    assert refused == 400 and "say why" in answer["error"] and "\n" not in answer["error"]
    assert unchanged == ("PendingManualApproval", "")
    assert ok == 200 and shown["status"] == "Approved" and shown["metrics"] == {"perplexity": 12.0}
    assert status_of(sagemaker, approved) == ("Approved", "beats v1 on held-out")
    assert status_of(sagemaker, rejected) == ("Rejected", "perplexity regressed")
    # registry.set_status keeps the package's lineage (moto would clear it)
    assert shown["metadata"]["recipe"] == "sft"


def test_promote_and_compare_from_the_api(console, clients):
    sagemaker, s3 = clients
    older = package(sagemaker, s3, {"perplexity": 12.0})
    newer = package(sagemaker, s3, {"perplexity": 9.5}, code_version="newer")
    request(console, "POST", "/api/approval", {"arn": newer, "status": "Approved", "reason": "ok"},
            **token(console))

    status, promoted, _ = request(console, "POST", "/api/promote",
                                  {"arn": newer, "group": "llm-sft-prod", "reason": "release"},
                                  **token(console))
    again, repeated, _ = request(console, "POST", "/api/promote",
                                 {"arn": newer, "group": "llm-sft-prod"}, **token(console))
    _, rows, _ = request(console, "GET", f"/api/diff?a={older}&b={newer}", **token(console))

    assert status == again == 200 and promoted["created"] and not repeated["created"]
    assert repeated["arn"] == promoted["arn"]
    assert status_of(sagemaker, promoted["arn"])[0] == "Approved"
    metric = next(r for r in rows if r["field"] == "metric.perplexity")
    assert (metric["a"], metric["b"], metric["delta"]) == (12.0, 9.5, -2.5)


def test_a_start_with_an_ill_typed_parameter_is_refused_and_starts_nothing(console, clients):
    sagemaker, _ = clients
    name = quick_pipeline(sagemaker)
    before = sagemaker.list_pipeline_executions(PipelineName=name)["PipelineExecutionSummaries"]

    status, answer, _ = request(console, "POST", "/api/start",
                                {"pipeline": name, "parameters": {"Epochs": "two"}},
                                **token(console))
    started, execution, _ = request(console, "POST", "/api/start",
                                    {"pipeline": name, "parameters": {"Epochs": "12"}},
                                    **token(console))

    assert status == 400 and answer["error"] == \
        "pipeline parameter Epochs='two' is not a valid Integer"
    assert started == 200 and execution["arn"].startswith(
        f"arn:aws:sagemaker:us-east-1:{ACCOUNT}:pipeline/{name}/execution/")
    after = sagemaker.list_pipeline_executions(PipelineName=name)["PipelineExecutionSummaries"]
    assert len(after) == len(before) + 1
    parameters = sagemaker.list_pipeline_parameters_for_execution(
        PipelineExecutionArn=execution["arn"])["PipelineParameters"]
    assert {"Name": "Epochs", "Value": "12"} in parameters
    assert finished(sagemaker, execution["arn"])["PipelineExecutionStatus"] == "Succeeded"


def test_rerun_from_a_step_selects_it_and_everything_downstream_with_the_same_parameters(
        console, clients):
    sagemaker, _ = clients
    name = quick_pipeline(sagemaker)
    source = sagemaker.start_pipeline_execution(
        PipelineName=name, PipelineParameters=[{"Name": "Epochs", "Value": "3"}])
    source = source["PipelineExecutionArn"]
    finished(sagemaker, source)

    status, rerun, _ = request(console, "POST", "/api/rerun", {"arn": source, "step": "Check"},
                               **token(console))
    unknown, answer, _ = request(console, "POST", "/api/rerun", {"arn": source, "step": "Nope"},
                                 **token(console))

    assert status == 200, rerun
    assert rerun["selected"] == ["Check", "TooFewEpochs"]
    assert {"Name": "Epochs", "Value": "3"} in sagemaker.list_pipeline_parameters_for_execution(
        PipelineExecutionArn=rerun["arn"])["PipelineParameters"]
    assert unknown == 400 and answer["error"] == \
        "no step 'Nope' in this pipeline; its steps are Check, TooFewEpochs"


def test_a_failed_execution_shows_its_steps_and_is_retried_from_the_console(console, clients):
    sagemaker, _ = clients
    name = quick_pipeline(sagemaker)
    arn = sagemaker.start_pipeline_execution(
        PipelineName=name, PipelineParameters=[{"Name": "Epochs", "Value": "3"}])
    arn = arn["PipelineExecutionArn"]
    assert finished(sagemaker, arn)["PipelineExecutionStatus"] == "Failed"

    _, shown, _ = request(console, "GET", f"/api/execution?{urllib.parse.urlencode({'arn': arn})}",
                          **token(console))
    status, _, _ = request(console, "POST", "/api/retry", {"arn": arn}, **token(console))
    again = finished(sagemaker, arn)

    steps = {s["name"]: s for s in shown["steps"]}
    assert shown["error"] == "" and shown["failure_reason"].endswith("3 epochs: too few")
    assert (steps["Check"]["status"], steps["Check"]["outcome"]) == ("Succeeded",
                                                                    "condition False")
    assert (steps["TooFewEpochs"]["status"], steps["TooFewEpochs"]["failure_reason"]) == (
        "Failed", "3 epochs: too few")
    assert status == 200 and again["PipelineExecutionStatus"] == "Failed"


def test_the_dag_the_page_draws_follows_the_definition(console, clients, recipe_definitions):
    name = sft_pipeline(clients[0], recipe_definitions)

    _, shown, _ = request(console, "GET", f"/api/pipeline?name={name}", **token(console))

    graph = {node["name"]: node for node in shown["graph"]}
    assert [n["name"] for n in shown["graph"]] == [
        "DataPrep", "SFT", "Evaluate", "CompareWithApproved", "EvaluationGate", "Register",
        "EvaluationGateFailed"]
    assert "DataPrep" in graph["SFT"]["depends"] and "SFT" in graph["Evaluate"]["depends"]
    assert graph["Register"]["branch"] == {"condition": "EvaluationGate", "if": True}
    assert graph["EvaluationGateFailed"]["branch"] == {"condition": "EvaluationGate", "if": False}
    assert {"EvalThreshold", "BaseModel", "Epochs"} <= {p["Name"] for p in shown["parameters"]}


def test_the_report_is_served_sandboxed_and_nothing_else_from_s3(console, clients):
    _, s3 = clients
    s3.put_object(Bucket=BUCKET, Key="eval/report.html",
                  Body=b"<h1>Evaluation report</h1><script>fetch('/api/approval')</script>")
    s3.put_object(Bucket=BUCKET, Key="secrets.txt", Body=b"not for the page")

    status, body, headers = request(console, "GET",
                                    f"/api/report?uri=s3://{BUCKET}/eval/report.html",
                                    **token(console))
    _, other, _ = request(console, "GET", f"/api/report?uri=s3://{BUCKET}/secrets.txt",
                          **token(console))

    policy = headers["Content-Security-Policy"]
    assert status == 200 and "<h1>Evaluation report</h1>" in body
    assert policy.startswith("sandbox;") and "allow-scripts" not in policy
    assert "allow-same-origin" not in policy and "frame-ancestors 'self'" in policy
    assert "not for the page" not in other and "serves only evaluation reports" in other


# -- SageMaker's shapes: steps, costs, logs, metrics -----------------------------------------

def stubbed_target(tmp_path, kind="aws") -> api.Target:
    kwargs = {"region_name": "us-east-1", "aws_access_key_id": "x", "aws_secret_access_key": "x"}
    return api.Target(kind, "AWS", "us-east-1", boto3.client("sagemaker", **kwargs),
                      boto3.client("s3", **kwargs), boto3.client("logs", **kwargs), tmp_path,
                      cost.load_prices())


def definition() -> dict:
    return {"Version": "2020-12-01", "Parameters": [], "Steps": [
        {"Name": "DataPrep", "Type": "Processing", "Arguments": {}},
        {"Name": "SFT", "Type": "Training", "DependsOn": ["DataPrep"], "Arguments": {}},
        {"Name": "Evaluate", "Type": "Processing", "DependsOn": ["SFT"], "Arguments": {}},
        {"Name": "Gate", "Type": "Condition", "DependsOn": ["Evaluate"], "Arguments": {
            "Conditions": [], "IfSteps": [{"Name": "Register", "Type": "RegisterModel",
                                           "Arguments": {}}], "ElseSteps": []}}]}


def training_job(name: str, start: datetime, status: str = "Completed") -> dict:
    return {"TrainingJobName": name, "TrainingJobStatus": status, "SecondaryStatus": status,
            "TrainingJobArn": f"arn:aws:sagemaker:us-east-1:{ACCOUNT}:training-job/{name}",
            "AlgorithmSpecification": {"TrainingInputMode": "File"},
            "ModelArtifacts": {"S3ModelArtifacts": "s3://b/m.tar.gz"},
            "OutputDataConfig": {"S3OutputPath": f"s3://{BUCKET}/jobs"},
            "ResourceConfig": {"InstanceType": "ml.g5.xlarge", "InstanceCount": 1,
                               "VolumeSizeInGB": 30},
            "StoppingCondition": {}, "CreationTime": start, "BillableTimeInSeconds": 3600,
            "FinalMetricDataList": [{"MetricName": "train_loss", "Value": 1.25}]}


def processing_job(name: str, start: datetime, minutes: float | None) -> dict:
    """DescribeProcessingJob of a job that ran `minutes` (None: still running)."""
    described = {
        "ProcessingJobName": name, "AppSpecification": {"ImageUri": "img"}, "CreationTime": start,
        "ProcessingJobStatus": "InProgress" if minutes is None else "Completed",
        "ProcessingJobArn": f"arn:aws:sagemaker:us-east-1:{ACCOUNT}:processing-job/{name}",
        "ProcessingResources": {"ClusterConfig": {
            "InstanceType": "ml.m5.xlarge", "InstanceCount": 1, "VolumeSizeInGB": 30}},
        "ProcessingStartTime": start}
    if minutes is not None:
        described["ProcessingEndTime"] = start + timedelta(minutes=minutes)
    return described


def test_the_execution_view_reads_status_duration_cache_hit_and_cost_per_step(tmp_path):
    target = stubbed_target(tmp_path)
    start = datetime(2026, 1, 1, tzinfo=UTC)
    job = f"arn:aws:sagemaker:us-east-1:{ACCOUNT}:{{}}/{{}}"
    with Stubber(target.sagemaker) as stub:
        stub.add_response("describe_pipeline_execution", {
            "PipelineExecutionArn": EXECUTION, "PipelineExecutionStatus": "Executing",
            "CreationTime": start}, {"PipelineExecutionArn": EXECUTION})
        stub.add_response("describe_pipeline_definition_for_execution", {
            "PipelineDefinition": json.dumps(definition())}, {"PipelineExecutionArn": EXECUTION})
        stub.add_response("list_pipeline_parameters_for_execution", {"PipelineParameters": [
            {"Name": "Epochs", "Value": "2"}]}, {"PipelineExecutionArn": EXECUTION})
        stub.add_response("list_pipeline_execution_steps", {"PipelineExecutionSteps": [
            {"StepName": "DataPrep", "StepStatus": "Succeeded", "StartTime": start,
             "EndTime": start + timedelta(minutes=5),
             "CacheHitResult": {"SourcePipelineExecutionArn": EXECUTION.replace("exec1", "exec0")},
             "Metadata": {"ProcessingJob": {"Arn": job.format("processing-job", "prep")}}},
            {"StepName": "SFT", "StepStatus": "Succeeded", "StartTime": start,
             "EndTime": start + timedelta(hours=1), "AttemptCount": 2,
             "Metadata": {"TrainingJob": {"Arn": job.format("training-job", "sft")}}},
            {"StepName": "Evaluate", "StepStatus": "Executing", "StartTime": start,
             "Metadata": {"ProcessingJob": {"Arn": job.format("processing-job", "eval")}}},
        ]}, {"PipelineExecutionArn": EXECUTION, "SortOrder": "Ascending"})
        stub.add_response("describe_processing_job", processing_job("prep", start, 5),
                          {"ProcessingJobName": "prep"})
        stub.add_response("describe_training_job", training_job("sft", start),
                          {"TrainingJobName": "sft"})
        stub.add_response("describe_processing_job", processing_job("eval", start, None),
                          {"ProcessingJobName": "eval"})
        shown = api.execution(target, EXECUTION)

    steps = {s["name"]: s for s in shown["steps"]}
    assert shown["status"] == "Executing" and shown["parameters"] == {"Epochs": "2"}
    assert [n["name"] for n in shown["graph"]] == ["DataPrep", "SFT", "Evaluate", "Gate",
                                                   "Register"]
    assert steps["DataPrep"]["seconds"] == 300 and steps["DataPrep"]["usd"] == 0
    assert steps["DataPrep"]["cache"] == "cache hit: execution exec0"
    assert steps["SFT"]["seconds"] == 3600 and steps["SFT"]["attempts"] == 2
    assert steps["SFT"]["usd"] == pytest.approx(1.408)  # an hour of ml.g5.xlarge
    assert steps["SFT"]["job"] == {"kind": "Training", "name": "sft"}
    # a running job is priced once it ends
    assert steps["Evaluate"]["seconds"] > 0 and steps["Evaluate"]["usd"] is None
    assert shown["cost"]["total_usd"] == pytest.approx(1.408) and shown["error"] == ""
    # finished jobs' descriptions are kept: the next poll describes only the running one
    assert sorted(target.jobs) == ["prep", "sft"]


def test_a_step_shows_its_cloudwatch_log_final_metrics_and_loss_curve_on_aws(tmp_path, clients,
                                                                            bucket):
    _, s3 = clients
    history = b"".join(json.dumps(r).encode() + b"\n" for r in [
        {"step": 1, "train_loss": 3.0}, {"step": 2, "train_loss": 2.0, "learning_rate": 1e-4},
        {"step": 2, "eval_loss": 2.5}])
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w:gz") as tar:
        info = tarfile.TarInfo("metrics.jsonl")
        info.size = len(history)
        tar.addfile(info, io.BytesIO(history))
    s3.put_object(Bucket=BUCKET, Key="jobs/sft/output/output.tar.gz", Body=archive.getvalue())
    target = stubbed_target(tmp_path)
    target.s3 = s3
    start = datetime(2026, 1, 1, tzinfo=UTC)
    group = "/aws/sagemaker/TrainingJobs"
    with Stubber(target.sagemaker) as stub, Stubber(target.logs) as logs:
        stub.add_response("describe_pipeline_definition_for_execution", {
            "PipelineDefinition": json.dumps(definition())}, {"PipelineExecutionArn": EXECUTION})
        stub.add_response("list_pipeline_execution_steps", {"PipelineExecutionSteps": [
            {"StepName": "SFT", "StepStatus": "Succeeded", "StartTime": start, "Metadata": {
                "TrainingJob": {"Arn": f"arn:aws:sagemaker:us-east-1:{ACCOUNT}:training-job/sft"}}}
        ]}, {"PipelineExecutionArn": EXECUTION, "SortOrder": "Ascending"})
        stub.add_response("describe_training_job", training_job("sft", start),
                          {"TrainingJobName": "sft"})
        logs.add_response("describe_log_streams", {"logStreams": [
            {"logStreamName": "sft/algo-1-1767225600"}]},
            {"logGroupName": group, "logStreamNamePrefix": "sft/"})
        logs.add_response("get_log_events", {"events": [
            {"timestamp": 1, "message": "[metrics] step=1 train_loss=3.0"},
            {"timestamp": 2, "message": "training done"}]},
            {"logGroupName": group, "logStreamName": "sft/algo-1-1767225600",
             "startFromHead": False, "limit": 500})
        shown = api.step(target, EXECUTION, "SFT")

    assert shown["status"] == "Succeeded"
    assert shown["rerun_steps"] == ["SFT", "Evaluate", "Gate", "Register"]
    assert shown["log"]["text"] == "[metrics] step=1 train_loss=3.0\ntraining done"
    assert shown["log"]["source"] == f"CloudWatch Logs {group} sft/*"
    assert shown["metrics"] == [{"name": "train_loss", "value": 1.25}]
    assert shown["history"] == [{"step": 1, "train_loss": 3.0},
                                {"step": 2, "train_loss": 2.0, "learning_rate": 1e-4},
                                {"step": 2, "eval_loss": 2.5}]
    assert shown["job"]["instance"] == "ml.g5.xlarge × 1"


def test_a_local_step_shows_the_engine_log_and_live_metrics_of_its_newest_attempt(tmp_path):
    target = stubbed_target(tmp_path, kind="local")
    folder = tmp_path / "executions" / "llm-sft" / "exec1" / "SFT"
    (folder / "attempt-2" / "opt_ml" / "output" / "data").mkdir(parents=True)
    (folder / "log.txt").write_text("first attempt, killed\n")
    (folder / "attempt-2" / "log.txt").write_text("resumed from checkpoint-4\n")
    (folder / "attempt-2" / "opt_ml" / "output" / "data" / "metrics.jsonl").write_text(
        '{"step": 5, "train_loss": 1.5}\n')
    start = datetime(2026, 1, 1, tzinfo=UTC)
    with Stubber(target.sagemaker) as stub:
        stub.add_response("describe_pipeline_definition_for_execution", {
            "PipelineDefinition": json.dumps(definition())}, {"PipelineExecutionArn": EXECUTION})
        stub.add_response("list_pipeline_execution_steps", {"PipelineExecutionSteps": [
            {"StepName": "SFT", "StepStatus": "Executing", "StartTime": start, "Metadata": {
                "TrainingJob": {"Arn": f"arn:aws:sagemaker:us-east-1:{ACCOUNT}:training-job/sft"}}}
        ]}, {"PipelineExecutionArn": EXECUTION, "SortOrder": "Ascending"})
        stub.add_response("describe_training_job", training_job("sft", start, "InProgress"),
                          {"TrainingJobName": "sft"})
        shown = api.step(target, EXECUTION, "SFT")

    assert shown["log"]["text"] == "resumed from checkpoint-4\n"
    assert shown["history"] == [{"step": 5, "train_loss": 1.5}]


# -- errors are one line ---------------------------------------------------------------------

def test_an_unreachable_endpoint_is_one_line_saying_what_to_check(local_home):
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{free.getsockname()[1]}"
    with serving(dead, local_home) as console:
        sent = []  # said at once: no retry after a back-off (the page's next poll is the retry)
        console.target.sagemaker.meta.events.register(
            "before-send", lambda request, **_: sent.append(request))
        status, answer, _ = request(console, "GET", "/api/pipelines", **token(console))

    assert status == 502 and len(sent) == 1
    assert answer["error"].startswith(f"cannot reach {dead}/")
    assert "llm-pipeline server status" in answer["error"] and "\n" not in answer["error"]
    assert "Traceback" not in answer["error"]


DENIED = f"User: arn:aws:iam::{ACCOUNT}:user/dev is not authorized to perform: " \
    "sagemaker:DescribePipeline"


@pytest.mark.parametrize(("code", "message", "expected"), [
    ("AccessDeniedException", DENIED,
     (f"DescribePipeline: AccessDeniedException: {DENIED}; your credentials are not allowed "
      "this action")),
    ("ExpiredTokenException", "The security token included in the request is\nexpired",
     ("DescribePipeline: ExpiredTokenException: The security token included in the request is "
      "expired; your credentials are invalid or expired: renew them (aws sso login, aws "
      "configure; keys from the environment need a console restart) and reload")),
])
def test_aws_refusals_are_one_line_with_what_to_do(code, message, expected):
    error = ClientError({"Error": {"Code": code, "Message": message},
                         "ResponseMetadata": {"HTTPStatusCode": 400}}, "DescribePipeline")

    assert api.error_line(error) == expected


def test_step_graph_lists_branch_steps_after_their_condition():
    graph = definition_graph.step_graph(definition())

    assert [(n["name"], n["depends"]) for n in graph] == [
        ("DataPrep", []), ("SFT", ["DataPrep"]), ("Evaluate", ["SFT"]), ("Gate", ["Evaluate"]),
        ("Register", ["Gate"])]
    assert graph[4]["branch"] == {"condition": "Gate", "if": True}

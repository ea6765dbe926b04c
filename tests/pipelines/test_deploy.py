"""`llm-pipeline deploy | invoke | endpoints | undeploy`: packages in the local registry served by
local endpoints, and the AWS path's requests against SageMaker's API model and the local server."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import boto3
import pytest
from botocore.exceptions import ClientError
from botocore.stub import Stubber

from containers import images
from pipelines import UserError, deploy, validation
from pipelines.definition import DEFAULT_BUCKET, DEFAULT_ROLE_ARN, LOCAL_ACCOUNT
from pipelines.local import processes
from serving import tenants
from steps.common import models
from steps.common.archives import pack_folder

from .conftest import ROOT, clean_env, cli, write_quick_recipe

SERVING_IMAGE = images.image_uri(f"{images.REPOSITORY_PREFIX}-serving", LOCAL_ACCOUNT,
                                 "us-east-1", "test")
TRAINING_IMAGE = images.image_uri(f"{images.REPOSITORY_PREFIX}-training", LOCAL_ACCOUNT,
                                  "us-east-1", "test")


def register(clients, folder: Path, group: str, *, image: str = SERVING_IMAGE,
             instance_types: tuple[str, ...] = ("ml.m5.xlarge", "ml.g5.xlarge"),
             metadata: dict[str, str] | None = None) -> str:
    """`folder` packed, uploaded and registered as the Register step does it (Pending)."""
    sagemaker, s3 = clients
    try:
        s3.head_bucket(Bucket=DEFAULT_BUCKET)
    except ClientError:
        s3.create_bucket(Bucket=DEFAULT_BUCKET)
    key = f"packages/{group}/{uuid.uuid4().hex[:8]}/model.tar.gz"
    archive = folder.parent / f"{folder.name}-{uuid.uuid4().hex[:8]}.tar.gz"
    pack_folder(folder, archive)
    s3.upload_file(str(archive), DEFAULT_BUCKET, key)
    try:
        sagemaker.describe_model_package_group(ModelPackageGroupName=group)
    except ClientError:
        sagemaker.create_model_package_group(ModelPackageGroupName=group)
    return sagemaker.create_model_package(
        ModelPackageGroupName=group, ModelApprovalStatus="PendingManualApproval",
        InferenceSpecification={
            "Containers": [{"Image": image, "ModelDataUrl": f"s3://{DEFAULT_BUCKET}/{key}"}],
            "SupportedContentTypes": ["application/json"],
            "SupportedResponseMIMETypes": ["application/json"],
            "SupportedRealtimeInferenceInstanceTypes": list(instance_types)},
        CustomerMetadataProperties=metadata or {"recipe": "test"})["ModelPackageArn"]


def approve(env: dict, arn: str) -> None:
    assert cli(env, "registry", "approve", arn).returncode == 0


def deployed_url(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stderr[-2000:]
    return next(word for line in result.stdout.splitlines() if " is InService at " in line
                for word in line.split() if word.startswith("http://127.0.0.1:"))


def http(url: str, body: dict, headers: dict | None = None) -> tuple[int, object]:
    request = urllib.request.Request(f"{url}/invocations", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def answers_ping(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/ping", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def env(local_home):
    return clean_env(local_home)


@pytest.fixture(scope="module")
def sft_package(clients, env, lora_adapter) -> str:
    """The LoRA package, approved."""
    arn = register(clients, lora_adapter, "llm-serving-sft")
    approve(env, arn)
    return arn


@pytest.fixture(scope="module")
def sft_endpoint(env, sft_package):
    url = deployed_url(cli(env, "deploy", sft_package, "--name", "sft"))
    yield url
    cli(env, "undeploy", "sft")


# --- Local endpoints ------------------------------------------------------------------------------


def test_a_package_that_is_not_approved_is_refused_naming_its_status_and_the_approve_command(
        clients, env, local_home, lora_adapter):
    arn = register(clients, lora_adapter, "llm-serving-pending")

    result = cli(env, "deploy", arn)

    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"ERROR: model package {arn} is PendingManualApproval; only Approved packages are "
        f"deployed: `llm-pipeline registry approve {arn}` first")
    assert not list((local_home / "endpoints").glob("*.json"))


def test_an_approved_sft_package_answers_both_request_formats(env, local_home, sft_package,
                                                              sft_endpoint, shared_job_runner):
    chat = cli(env, "invoke", "sft", "--prompt", "Question 3?", "--max-new-tokens", "12")
    assert chat.returncode == 0 and chat.stdout.strip() == "ok ok ok"

    status, answer = http(sft_endpoint, {"inputs": "Question 3?",
                                         "parameters": {"max_new_tokens": 4}})
    assert status == 200 and isinstance(answer[0]["generated_text"], str)

    listing = cli(env, "endpoints").stdout
    assert f"sft  InService  {sft_endpoint}" in listing and sft_package in listing
    # Its server was forked by the warm job runner that the home's jobs fork from (the session's,
    # tests/conftest.py): a process of its own, leading its own session, that outlived the deploy.
    pid = json.loads((local_home / "endpoints" / "sft.json").read_text())["pid"]
    parent = processes.stat(pid).parent
    assert parent == json.loads((shared_job_runner / "job-runner.json").read_text())["pid"]
    assert os.getsid(pid) == pid


def test_a_bad_request_through_invoke_is_one_error_line_with_the_limit(env, sft_endpoint):
    result = cli(env, "invoke", "sft", "--prompt", "Hi", "--max-new-tokens", "100000")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "ERROR: endpoint sft answered 422: field \"max_tokens\" is 100000; it must be >= 1 and "
        "<= 512 (SERVING_MAX_NEW_TOKENS)")


def test_deploying_another_package_to_the_name_updates_it_while_the_old_server_answers(
        clients, env, local_home, sft_endpoint):
    base_arn = register(clients, _base_of(env, sft_endpoint), "llm-serving-base")
    approve(env, base_arn)
    record = local_home / "endpoints" / "sft.json"
    old = json.loads(record.read_text())

    update = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "deploy", base_arn,
                               "--name", "sft"], env=env, cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    pings = []
    while json.loads(record.read_text())["url"] == old["url"] and update.poll() is None:
        pings.append(answers_ping(old["url"]))
        time.sleep(0.2)
    stdout, stderr = update.communicate(timeout=300)

    assert update.returncode == 0, stderr
    assert pings and all(pings)  # the old server answered until the new one took the name
    new = json.loads(record.read_text())
    assert new["url"] != old["url"] and new["package_arn"] == base_arn
    assert not answers_ping(old["url"]) and not Path(old["deployment"]).exists()
    answer = cli(env, "invoke", "sft", "--prompt", "Question 3?", "--max-new-tokens", "8")
    assert answer.returncode == 0 and answer.stdout.strip() != "ok ok ok"  # the base answers
    assert "stopped the previous server of sft" in stdout


def _base_of(env: dict, url: str) -> Path:
    """The base model the LoRA package carries, as a folder to register on its own."""
    record = json.loads((Path(env["LLM_PIPELINE_HOME"]) / "endpoints" / "sft.json").read_text())
    assert record["url"] == url
    return Path(record["deployment"]) / "model" / models.BUNDLED_BASE


@pytest.fixture(scope="module")
def int8_package(clients, env, quantized_models):
    """The int8 package, registered and approved."""
    arn = register(clients, quantized_models / "int8", "llm-serving-int8",
                   metadata={"quantization": "int8"})
    approve(env, arn)
    yield arn
    cli(env, "undeploy", "llm-serving-int8")  # still there when a test failed before


@pytest.fixture
def int8_endpoint(env, local_home, int8_package):
    """The int8 package served under its group's name (deploy's default). The serving test and
    the undeploy test (which stops it) share one server where they run in that order (one
    serving process fewer: seconds of CPU); whichever finds none answering deploys it."""
    record = local_home / "endpoints" / "llm-serving-int8.json"
    if record.exists():
        url = json.loads(record.read_text())["url"]
        if answers_ping(url):
            return url
    return deployed_url(cli(env, "deploy", int8_package))


def test_a_quantized_package_serves(int8_endpoint):
    status, answer = http(int8_endpoint, {"messages": [{"role": "user", "content": "Hi"}],
                                          "max_tokens": 3})
    assert status == 200 and answer["usage"]["completion_tokens"] == 3


def test_undeploy_stops_the_server_and_frees_its_port(env, local_home, int8_endpoint):
    port = int(int8_endpoint.rsplit(":", 1)[1])

    result = cli(env, "undeploy", "llm-serving-int8")

    assert result.returncode == 0 and not answers_ping(int8_endpoint)
    with socket.socket() as sock:  # another server can listen there again
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do (TIME_WAIT)
        sock.bind(("127.0.0.1", port))
        sock.listen()
    assert not (local_home / "endpoints" / "llm-serving-int8.json").exists()
    assert not (local_home / "endpoints" / "llm-serving-int8").exists()
    gone = cli(env, "invoke", "llm-serving-int8", "--prompt", "Hi")
    assert gone.returncode == 2 and "no local endpoint llm-serving-int8" in gone.stderr


def test_where_the_warm_runner_cannot_start_the_server_is_a_fresh_process_saying_why(
        env, local_home, sft_package, tmp_path):
    # A runner folder that others can enter is never used (pipelines/local/runner.py).
    shared = tmp_path / "open-runner-folder"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    fresh = {**env, "LLM_PIPELINE_JOB_RUNNER_HOME": str(shared)}

    deployed = cli(fresh, "deploy", sft_package, "--name", "sft-fresh")
    try:
        url = deployed_url(deployed)
        answer = cli(env, "invoke", "sft-fresh", "--prompt", "Question 3?",
                     "--max-new-tokens", "12")
        record = json.loads((local_home / "endpoints" / "sft-fresh.json").read_text())
        command = Path(f"/proc/{record['pid']}/cmdline").read_bytes().split(b"\0")
        log = Path(record["deployment"], "log.txt").read_text().splitlines()
    finally:
        stopped = cli(env, "undeploy", "sft-fresh")
    assert "(pid " in deployed.stdout and ", a fresh process); log: " in deployed.stdout
    assert command[1:4] == [b"-m", b"serving", b"serve"]
    assert log[0] == (f"runs as a fresh process: {shared} is not a private folder of this "
                      "user's; remove it, or unset LLM_PIPELINE_JOB_RUNNER_HOME")
    assert answer.returncode == 0 and answer.stdout.strip() == "ok ok ok"
    assert stopped.returncode == 0 and not answers_ping(url)


# End to end (a server of its own, a fresh serving process: about 12 s): the rule itself is
# test_job_runner's, for both reasons; this checks deploy hands it the home's choice.
@pytest.mark.e2e
def test_where_the_homes_server_runs_its_jobs_as_fresh_processes_so_does_the_endpoint_saying_why(
        lora_adapter, tmp_path):
    home = tmp_path / "home"
    fresh = clean_env(home)
    try:
        url = cli(fresh, "server", "start", "--job-runner", "subprocess").stdout.strip()
        kwargs = {"endpoint_url": url, "region_name": "us-east-1", "aws_access_key_id": "local",
                  "aws_secret_access_key": "local"}
        arn = register((boto3.client("sagemaker", **kwargs), boto3.client("s3", **kwargs)),
                       lora_adapter, "llm-serving-fresh")
        approve(fresh, arn)

        deployed = cli(fresh, "deploy", arn, "--name", "sft-fresh")

        deployed_url(deployed)
        record = json.loads((home / "endpoints" / "sft-fresh.json").read_text())
        log = Path(record["deployment"], "log.txt").read_text().splitlines()
        stopped = cli(fresh, "undeploy", "sft-fresh")
    finally:
        cli(fresh, "server", "stop")
    assert ", a fresh process); log: " in deployed.stdout
    assert log[0] == ("runs as a fresh process: the local server runs its jobs as fresh processes "
                      "(--job-runner subprocess)")
    assert stopped.returncode == 0 and not processes.running(record["pid"], record["started"])


def test_a_two_tenant_prompt_tuning_package_answers_as_the_tenant_named(
        clients, env, tenant_adapters, tmp_path):
    folder = tenants.assemble(tenant_adapters, tmp_path / "model")
    arn = register(clients, folder, "llm-serving-tenants")
    approve(env, arn)
    deployed_url(cli(env, "deploy", arn, "--name", "tenants"))
    try:
        a, b, neither = (cli(env, "invoke", "tenants", "--prompt", "Question 3?",
                             "--max-new-tokens", "6", *tenant)
                         for tenant in (["--tenant", "tenantA"], ["--tenant", "tenantB"], []))
    finally:
        cli(env, "undeploy", "tenants")
    assert a.stdout.startswith("aa") and b.stdout.startswith("z"), (a.stdout, b.stdout)
    assert neither.returncode == 2 and "serves tenants tenantA, tenantB: name one" in neither.stderr


def test_where_bitsandbytes_is_missing_a_quantized_package_is_refused_before_serving(
        clients, env, local_home, quantized_models, monkeypatch):
    arn = register(clients, quantized_models / "nf4", "llm-serving-nf4",
                   metadata={"quantization": "nf4"})
    approve(env, arn)
    sagemaker, s3 = clients
    monkeypatch.setenv("LLM_PIPELINE_HOME", str(local_home))
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # a machine without it
    package = deploy.Package.describe(sagemaker, arn)

    with pytest.raises(UserError, match="this machine cannot serve the package's model: a 4-bit "
                                        "bitsandbytes model needs the bitsandbytes package"):
        deploy.deploy_local(s3, package, "nf4", deploy.check_deployable(package, None),
                            say=lambda line: None)
    assert not (local_home / "endpoints" / "nf4.json").exists()
    assert not list((local_home / "endpoints" / "nf4").glob("*/model"))


# --- What deploy refuses before anything runs -----------------------------------------------------


def package(**changes) -> deploy.Package:
    fields = {"arn": "arn:aws:sagemaker:us-east-1:123456789012:model-package/g/1",
              "status": "Approved", "group": "g", "image": SERVING_IMAGE,
              "model_data_url": "s3://b/model.tar.gz", "environment": {},
              "instance_types": ("ml.m5.xlarge", "ml.g5.xlarge"), "metadata": {}}
    return deploy.Package(**{**fields, **changes})


def test_the_instance_type_defaults_to_the_packages_first_and_another_gets_a_note():
    assert deploy.check_deployable(package(), None) == "ml.m5.xlarge"
    assert deploy.check_deployable(package(), "ml.g5.xlarge") == "ml.g5.xlarge"
    assert deploy.unlisted_note(package(), "ml.g5.xlarge") is None
    # SageMaker deploys a registry package on a type it does not list: so does deploy, saying so.
    assert deploy.check_deployable(package(), "ml.p4d.24xlarge") == "ml.p4d.24xlarge"
    assert deploy.unlisted_note(package(), "ml.p4d.24xlarge").startswith(
        "note: ml.p4d.24xlarge is not among the instance types model package")


@pytest.mark.parametrize("changes, instance_type, says", [
    ({"image": TRAINING_IMAGE}, None,
     ("names image .*llm-lifecycle-training:test, which does not serve .*register it with the "
      "llm-lifecycle-serving image")),
    ({"instance_types": ()}, "ml.m7g.xlarge",
     "ml.m7g.xlarge is an Arm .Graviton. instance; the serving image is built for linux/amd64"),
    ({"instance_types": (), "metadata": {"quantization": "nf4"}}, "ml.inf2.xlarge",
     (r"is quantized \(nf4, bitsandbytes\), whose 4/8-bit kernels run on x86 CPUs and NVIDIA "
      "GPUs; ml.inf2.xlarge is neither")),
])
def test_a_package_that_cannot_serve_there_is_refused_saying_what_to_do(changes, instance_type,
                                                                         says):
    with pytest.raises(UserError, match=says):
        deploy.check_deployable(package(**changes), instance_type)


# --- AWS ------------------------------------------------------------------------------------------

ARN = "arn:aws:sagemaker:us-east-1:123456789012:model-package/llm-sft/3"


def checked(client) -> list[str]:
    """The operations `client` sends from now on, each checked against SageMaker's API model
    (lengths, patterns, enums, ranges: pipelines.validation) as it is sent."""
    sent = []

    def check(params, model, **kwargs) -> None:
        sent.append(model.name)
        assert validation.problems(model.name, params) == [], (model.name, params)

    client.meta.events.register("provide-client-params.sagemaker.*", check)
    return sent


def test_the_aws_requests_are_valid_for_sagemakers_api():
    name = deploy.deployment_names("llm-sft", when=0)
    assert validation.problems("CreateModel",
                               deploy.model_request(name, ARN, DEFAULT_ROLE_ARN)) == []
    assert validation.problems("CreateEndpointConfig", deploy.endpoint_config_request(
        name, name, "ml.m5.xlarge")) == []
    long = deploy.deployment_names("x" * 63, when=0)
    assert len(long) <= 63 and deploy.ENDPOINT_NAME.fullmatch(long)


def test_a_request_sagemaker_would_refuse_is_refused_before_anything_is_created(clients,
                                                                              sft_package):
    sagemaker, _ = clients
    package = deploy.Package.describe(sagemaker, sft_package)

    with pytest.raises(UserError, match=r"deploy sft-bad: CreateModel ExecutionRoleArn: "):
        deploy.deploy_aws(sagemaker, package, "sft-bad", "ml.m5.xlarge", "not-a-role",
                          poll_seconds=0, say=lambda line: None)
    assert not [m for m in sagemaker.list_models()["Models"]
                if m["ModelName"].startswith("sft-bad")]


def test_deploy_to_aws_makes_model_config_and_endpoint_from_the_package(clients, sft_package):
    sagemaker, _ = clients
    package = deploy.Package.describe(sagemaker, sft_package)
    sent = checked(sagemaker)

    described = deploy.deploy_aws(sagemaker, package, "sft-aws", "ml.m5.xlarge",
                                  DEFAULT_ROLE_ARN, poll_seconds=0, say=lambda line: None)

    assert described["EndpointStatus"] == "InService"
    config = sagemaker.describe_endpoint_config(EndpointConfigName=described["EndpointConfigName"])
    variant = config["ProductionVariants"][0]
    assert variant["InstanceType"] == "ml.m5.xlarge" and variant["InitialInstanceCount"] == 1
    model = sagemaker.describe_model(ModelName=variant["ModelName"])
    assert model["PrimaryContainer"]["ModelPackageName"] == sft_package
    listed = {row["name"]: row for row in deploy.aws_endpoints(sagemaker)}
    assert listed["sft-aws"]["package"] == sft_package
    assert listed["sft-aws"]["url"].endswith("/endpoints/sft-aws/invocations")

    deleted = deploy.undeploy_aws(sagemaker, "sft-aws")

    created = variant["ModelName"]  # the deployment's model and config share their name
    assert deleted == ["sft-aws", created, created]
    with pytest.raises(ClientError):
        sagemaker.describe_endpoint(EndpointName="sft-aws")
    with pytest.raises(ClientError):
        sagemaker.describe_endpoint_config(EndpointConfigName=created)
    with pytest.raises(ClientError):
        sagemaker.describe_model(ModelName=created)
    assert {"CreateModel", "CreateEndpointConfig", "CreateEndpoint", "DeleteEndpoint",
            "DeleteEndpointConfig", "DeleteModel"} <= set(sent)


def test_the_deploy_command_on_aws_creates_lists_and_deletes_the_endpoint(clients, env,
                                                                         sft_package):
    sagemaker, _ = clients
    url = sagemaker.meta.endpoint_url
    aws = {**env, "AWS_ENDPOINT_URL": url, "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ACCESS_KEY_ID": "local", "AWS_SECRET_ACCESS_KEY": "local"}

    refused = cli(aws, "deploy", sft_package, "--target", "aws")
    created = cli(aws, "deploy", sft_package, "--target", "aws", "--name", "sft-cli",
                  "--role-arn", DEFAULT_ROLE_ARN, "--poll-seconds", "0")
    listing = cli(aws, "endpoints", "--target", "aws")
    deleted = cli(aws, "undeploy", "sft-cli", "--target", "aws")

    assert refused.returncode == 2 and "--target aws needs --role-arn" in refused.stderr
    assert created.returncode == 0, created.stderr
    assert "Endpoint sft-cli is InService" in created.stdout
    assert "sft-cli  InService" in listing.stdout and sft_package in listing.stdout
    assert deleted.returncode == 0 and "deleted endpoint sft-cli" in deleted.stdout


def test_an_aws_update_switches_the_endpoint_then_deletes_what_the_old_one_used(monkeypatch):
    # moto has no UpdateEndpoint: SageMaker's answers are stubbed, and botocore checks each
    # request the deploy sends against SageMaker's API model.
    import boto3

    new = "llm-sft-20261205120000"
    monkeypatch.setattr(deploy, "deployment_names", lambda name, when=None: new)

    sagemaker = boto3.client("sagemaker", region_name="us-east-1", aws_access_key_id="x",
                             aws_secret_access_key="x")
    endpoint = {"EndpointName": "llm-sft", "EndpointArn":
                "arn:aws:sagemaker:us-east-1:123456789012:endpoint/llm-sft",
                "CreationTime": 0, "LastModifiedTime": 0}
    sent = checked(sagemaker)
    stub = Stubber(sagemaker)
    stub.add_response("describe_endpoint", {**endpoint, "EndpointConfigName": "llm-sft-old",
                                            "EndpointStatus": "InService"})
    stub.add_response("create_model", {"ModelArn": f"arn:aws:sagemaker:us-east-1:123456789012:"
                                                   f"model/{new}"},
                      deploy.model_request(new, ARN, DEFAULT_ROLE_ARN))
    stub.add_response("create_endpoint_config",
                      {"EndpointConfigArn": "arn:aws:sagemaker:us-east-1:123456789012:"
                                            f"endpoint-config/{new}"},
                      deploy.endpoint_config_request(new, new, "ml.m5.xlarge"))
    stub.add_response("update_endpoint", {"EndpointArn": endpoint["EndpointArn"]},
                      {"EndpointName": "llm-sft", "EndpointConfigName": new})
    stub.add_response("describe_endpoint", {**endpoint, "EndpointConfigName": "llm-sft-old",
                                            "EndpointStatus": "Updating"})
    stub.add_response("describe_endpoint", {**endpoint, "EndpointConfigName": new,
                                            "EndpointStatus": "InService"})
    stub.add_response("describe_endpoint_config", {
        "EndpointConfigName": "llm-sft-old", "EndpointConfigArn":
        "arn:aws:sagemaker:us-east-1:123456789012:endpoint-config/llm-sft-old", "CreationTime": 0,
        "ProductionVariants": [{"VariantName": "AllTraffic", "ModelName": "llm-sft-old"}]},
        {"EndpointConfigName": "llm-sft-old"})
    stub.add_response("delete_endpoint_config", {}, {"EndpointConfigName": "llm-sft-old"})
    stub.add_response("delete_model", {}, {"ModelName": "llm-sft-old"})
    said = []

    with stub:
        deploy.deploy_aws(sagemaker, package(arn=ARN), "llm-sft", "ml.m5.xlarge",
                          DEFAULT_ROLE_ARN, poll_seconds=0, say=said.append)

    stub.assert_no_pending_responses()
    assert "UpdateEndpoint" in sent and "CreateEndpoint" not in sent
    assert any("the current model answers until the new one is InService" in s for s in said)


def test_a_failed_aws_endpoint_is_refused_naming_undeploy_before_anything_is_created():
    # SageMaker allows only DeleteEndpoint on a failed endpoint; moto's never fail: stubbed.
    import boto3

    sagemaker = boto3.client("sagemaker", region_name="us-east-1", aws_access_key_id="x",
                             aws_secret_access_key="x")
    stub = Stubber(sagemaker)
    stub.add_response("describe_endpoint", {
        "EndpointName": "llm-sft", "EndpointConfigName": "llm-sft-old",
        "EndpointArn": "arn:aws:sagemaker:us-east-1:123456789012:endpoint/llm-sft",
        "EndpointStatus": "Failed", "FailureReason": "the container did not pass /ping",
        "CreationTime": 0, "LastModifiedTime": 0})

    with stub, pytest.raises(UserError, match=r"endpoint llm-sft is Failed \(the container did "
                                              r"not pass /ping\) and cannot be updated: "
                                              r"`llm-pipeline undeploy llm-sft --target aws`"):
        deploy.deploy_aws(sagemaker, package(arn=ARN), "llm-sft", "ml.m5.xlarge",
                          DEFAULT_ROLE_ARN, poll_seconds=0, say=lambda line: None)
    stub.assert_no_pending_responses()  # and nothing was created: no other call was answered


# --- The whole path -------------------------------------------------------------------------------


@pytest.mark.e2e
def test_the_package_an_sft_run_registers_is_approved_deployed_and_answers(env, tmp_path):
    # The sft recipe on a few steps: any package it registers is what the commands serve.
    run = cli(env, "run", "--recipe", str(write_quick_recipe(tmp_path, "sft")),
              "-p", "BaseModel=builtin:tiny",
              "-p", "ModelPackageGroup=llm-serving-e2e", "-p", "EvalThreshold=0")
    assert run.returncode == 0, run.stderr[-3000:]
    # The summary ends with the two commands that serve the model.
    approve_line, deploy_line = run.stdout.strip().splitlines()[-2:]
    assert approve_line.strip().startswith("llm-pipeline registry approve arn:aws:sagemaker:")
    arn = approve_line.split()[-1]
    assert deploy_line.strip() == f"llm-pipeline deploy {arn}"

    approved = cli(env, *approve_line.split()[1:])
    deployed = cli(env, *deploy_line.split()[1:])
    try:
        answer = cli(env, "invoke", "llm-serving-e2e", "--prompt", "Count to 3.",
                     "--max-new-tokens", "8")
    finally:
        cli(env, "undeploy", "llm-serving-e2e")
    assert approved.returncode == 0 and deployed.returncode == 0, deployed.stderr[-2000:]
    assert "Endpoint llm-serving-e2e is InService at http://127.0.0.1:" in deployed.stdout
    assert answer.returncode == 0, answer.stderr

"""From an Approved model package to an endpoint that answers: `llm-pipeline deploy | invoke |
endpoints | undeploy`.

On AWS, as SageMaker's hosting documents it: CreateModel from the package (a container naming
``ModelPackageName``, so the image, artifact and environment are the package's own),
CreateEndpointConfig with one variant, then CreateEndpoint, or UpdateEndpoint when the name is
taken (SageMaker starts the new instances, moves traffic once they pass /ping, and rolls back if
they never do); InvokeEndpoint answers through sagemaker-runtime.

Locally, as the engine runs jobs: no Docker, the serving image's entry point (``python -m
serving serve``) as a background process of the project's Python, over the layout SageMaker gives
the container (the package's ModelDataUrl, from the local S3, extracted into
``$SAGEMAKER_BASE_DIR/model``) and with a container's environment, as a job gets it
(pipelines.local.jobs.job_environment: the image's ENV, the package's container Environment, the
local AWS endpoint), on a free port of 127.0.0.1 (SAGEMAKER_BIND_TO_PORT, SERVING_HOST). The
server's process starts as the home's jobs do, by the same rules (runner.WarmStart): forked by
the warm job runner, which has imported the ML stack already (pipelines/local/runner.py; a
process of its own all the same, with its own session, environment, folder, log and exit, which
outlives the command and the runner), or, where the home's server runs its jobs as fresh
processes, the runner cannot start or the server's environment differs from the runner's, as a
fresh interpreter whose log says why first. Each endpoint is a record in
$LLM_PIPELINE_HOME/endpoints/NAME.json and a folder of deployments beside it. Deploying to a name
that answers already starts the new server, waits for its /ping, then stops the old one: requests
never meet a gap.

Both refuse up front what the endpoint could not run: a package that is not Approved, one whose
image is not the serving image, an Arm instance type (the image is built for linux/amd64), and a
quantized model where bitsandbytes' kernels are missing. An instance type the package does not
list is deployed with a note: SageMaker does not refuse it for a registry package, and a
BaseModel overridden at run time keeps the types sized for the recipe's default.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from botocore.exceptions import ClientError

from containers import images
from pipelines import UserError, files, registry, validation
from pipelines.local import processes, runner, server

SERVING_REPOSITORY = f"{images.REPOSITORY_PREFIX}-serving"
DEFAULT_INSTANCE_TYPE = "ml.m5.xlarge"  # a package that lists no inference instance types
VARIANT = "AllTraffic"
# botocore's EndpointName pattern (EndpointConfigName's is the same; ModelName's is looser).
ENDPOINT_NAME = re.compile(r"[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}")
STARTUP_TIMEOUT_S = 600.0  # a local server that has not answered /ping 200 by then is stopped
STOP_GRACE_S = 30.0  # SageMaker's SIGTERM-to-SIGKILL delay
AWS_BUSY = ("Creating", "Updating", "SystemUpdating", "RollingBack", "Deleting")


@dataclass(frozen=True)
class Package:
    """What deploying needs from DescribeModelPackage."""

    arn: str
    status: str
    group: str
    image: str
    model_data_url: str
    environment: dict[str, str]
    instance_types: tuple[str, ...]
    metadata: dict[str, str]

    @classmethod
    def describe(cls, sagemaker, arn: str) -> Package:
        described = registry.describe(sagemaker, arn)
        specification = described.get("InferenceSpecification", {})
        containers = specification.get("Containers", [])
        if len(containers) != 1:
            raise UserError(f"model package {arn} has {len(containers)} inference containers; "
                            "deploy serves packages with one (the serving image)")
        container = containers[0]
        return cls(arn=described["ModelPackageArn"], status=described.get("ModelApprovalStatus", ""),
                   group=described.get("ModelPackageGroupName", ""),
                   image=container.get("Image", ""),
                   model_data_url=container.get("ModelDataUrl", ""),
                   environment=container.get("Environment", {}),
                   instance_types=tuple(
                       specification.get("SupportedRealtimeInferenceInstanceTypes", [])),
                   metadata=described.get("CustomerMetadataProperties", {}))


def check_deployable(package: Package, instance_type: str | None) -> str:
    """The instance type to deploy `package` on; UserError, naming what to do, when the
    package cannot be served there."""
    if package.status != "Approved":
        raise UserError(f"model package {package.arn} is {package.status or 'without a status'}; "
                        "only Approved packages are deployed: `llm-pipeline registry approve "
                        f"{package.arn}` first")
    if images.repository_of(package.image) != SERVING_REPOSITORY:
        raise UserError(f"model package {package.arn} names image {package.image}, which does not "
                        f"serve (SageMaker starts it as `serve`); register it with the "
                        f"{SERVING_REPOSITORY} image (packages registered by this version of the "
                        "pipeline are)")
    if not package.model_data_url.startswith("s3://"):
        raise UserError(f"model package {package.arn} has no ModelDataUrl (an s3:// model.tar.gz) "
                        "to serve")
    chosen = instance_type or (package.instance_types[0] if package.instance_types
                               else DEFAULT_INSTANCE_TYPE)
    if _is_arm(chosen):
        raise UserError(f"{chosen} is an Arm (Graviton) instance; the serving image is built for "
                        "linux/amd64: pick an x86 CPU or GPU instance type")
    scheme = package.metadata.get("quantization")
    if scheme in ("int8", "nf4") and not _is_x86_cpu_or_nvidia(chosen):
        raise UserError(f"model package {package.arn} is quantized ({scheme}, bitsandbytes), "
                        f"whose 4/8-bit kernels run on x86 CPUs and NVIDIA GPUs; {chosen} is "
                        "neither: pick an ml.m/ml.c (CPU) or ml.g/ml.p (GPU) instance type")
    return chosen


def unlisted_note(package: Package, instance_type: str) -> str | None:
    """What to say when `instance_type` is not one the package lists (None when it is)."""
    if not package.instance_types or instance_type in package.instance_types:
        return None
    return (f"note: {instance_type} is not among the instance types model package {package.arn} "
            f"lists ({', '.join(package.instance_types)}); deploying on it as asked")


def endpoint_name(package: Package, name: str | None) -> str:
    """`name`, or by default the package's group: each new version of a group deployed without
    --name replaces the one before it."""
    chosen = name or package.group
    if not ENDPOINT_NAME.fullmatch(chosen or ""):
        raise UserError(f"endpoint name {chosen!r} must be 1-63 letters, digits and hyphens, "
                        "starting and ending with a letter or digit; pass --name")
    return chosen


def _is_arm(instance_type: str) -> bool:
    family = instance_type.removeprefix("ml.").split(".")[0]
    return re.fullmatch(r"[a-z]+\d+g[a-z]*", family) is not None  # m7g, c6gn, r7gd...


def _is_x86_cpu_or_nvidia(instance_type: str) -> bool:
    family = instance_type.removeprefix("ml.").split(".")[0]
    return family[:1] in ("m", "c", "r", "t", "g", "p") and not _is_arm(instance_type)


def request_body(prompt: str, max_new_tokens: int | None, raw: bool) -> dict:
    """What `invoke` sends: the messages format (the model's chat template applies), or with
    `raw` the prompt as given in the text generation format."""
    if raw:
        parameters = {"max_new_tokens": max_new_tokens} if max_new_tokens else {}
        return {"inputs": prompt, "parameters": parameters}
    body: dict = {"messages": [{"role": "user", "content": prompt}]}
    if max_new_tokens:
        body["max_tokens"] = max_new_tokens
    return body


def answer_text(answer: object) -> str:
    """The generated text of either format's answer."""
    if isinstance(answer, list) and answer and isinstance(answer[0], dict):
        return str(answer[0].get("generated_text", ""))
    if isinstance(answer, dict) and answer.get("choices"):
        return str(answer["choices"][0]["message"]["content"])
    raise UserError(f"the endpoint answered with neither format: {json.dumps(answer)[:200]}")


def tenant_attribute(tenant: str | None) -> str | None:
    return f"tenant={tenant}" if tenant else None


# --- Local endpoints ------------------------------------------------------------------------------


@dataclass
class LocalEndpoint:
    """A local endpoint's record: $LLM_PIPELINE_HOME/endpoints/NAME.json."""

    name: str
    package_arn: str
    model_data_url: str
    instance_type: str
    url: str
    pid: int
    deployment: str  # its folder: the SAGEMAKER_BASE_DIR the server was given
    created: str
    # The server process's start time (clock ticks after boot, /proc/PID/stat): with `pid`, it
    # names that process alone, forked (whose command line is the runner's) or not. 0 in the
    # records of earlier versions, whose servers are known by their command line.
    started: int = 0

    @property
    def log(self) -> Path:
        return Path(self.deployment) / "log.txt"


def endpoints_dir() -> Path:
    return server.home() / "endpoints"


def local_endpoint(name: str) -> LocalEndpoint | None:
    try:
        return LocalEndpoint(**json.loads((endpoints_dir() / f"{name}.json").read_text()))
    except (OSError, ValueError, TypeError):
        return None


def local_endpoints() -> list[LocalEndpoint]:
    found = (local_endpoint(path.stem) for path in sorted(endpoints_dir().glob("*.json")))
    return [endpoint for endpoint in found if endpoint is not None]


def local_status(endpoint: LocalEndpoint) -> str:
    """InService when its server answers /ping 200, Failed when the server is gone or ailing."""
    if not _is_our_server(endpoint.pid, endpoint.started):
        return "Failed"
    status, _ = _ping(endpoint.url)
    return "InService" if status == 200 else "Failed"


def deploy_local(s3, package: Package, name: str, instance_type: str,
                 say: Callable[[str], None] = print) -> LocalEndpoint:
    """Serve `package` at `name` on this machine; the old server of `name`, if any, answers until
    the new one is ready, then is stopped."""
    with _name_lock(name):
        previous = local_endpoint(name)
        deployment = endpoints_dir() / name / uuid.uuid4().hex[:12]
        model_dir = deployment / "model"
        try:
            _download_model(s3, package.model_data_url, model_dir, say)
            _check_quantized_locally(model_dir)
            endpoint = _start(s3, package, name, instance_type, deployment, say)
        except BaseException:
            # Nothing of a failed deployment stays but its log, which says why.
            shutil.rmtree(model_dir, ignore_errors=True)
            if deployment.exists() and not (deployment / "log.txt").exists():
                shutil.rmtree(deployment, ignore_errors=True)
            raise
        _write_record(endpoint)
        if previous is not None:
            _stop(previous.pid, previous.started)
            shutil.rmtree(previous.deployment, ignore_errors=True)
            say(f"stopped the previous server of {name} ({previous.package_arn})")
        return endpoint


def undeploy_local(name: str) -> LocalEndpoint:
    with _name_lock(name):
        endpoint = local_endpoint(name)
        if endpoint is None:
            raise UserError(f"no local endpoint {name}; `llm-pipeline endpoints` lists them")
        _stop(endpoint.pid, endpoint.started)
        shutil.rmtree(endpoints_dir() / name, ignore_errors=True)
        (endpoints_dir() / f"{name}.json").unlink(missing_ok=True)
        return endpoint


def invoke_local(name: str, body: dict, tenant: str | None) -> object:
    endpoint = local_endpoint(name)
    if endpoint is None:
        raise UserError(f"no local endpoint {name}; `llm-pipeline deploy ARN --name {name}` "
                        "first, or see `llm-pipeline endpoints`")
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if tenant:
        headers["X-Amzn-SageMaker-Custom-Attributes"] = tenant_attribute(tenant)
    request = urllib.request.Request(f"{endpoint.url}/invocations", method="POST",
                                     data=json.dumps(body).encode(), headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as err:
        raise UserError(f"endpoint {name} answered {err.code}: {_error_message(err.read())}"
                        ) from None
    except OSError as err:
        raise UserError(f"endpoint {name} at {endpoint.url} does not answer ({err}); see its log "
                        f"{endpoint.log}, or deploy it again") from None


def _download_model(s3, uri: str, model_dir: Path, say: Callable[[str], None]) -> None:
    """The package's ModelDataUrl extracted into `model_dir`, as SageMaker prepares
    /opt/ml/model (safely: no path escapes the folder)."""
    from steps.common.contract import StageError
    from steps.common.models import safe_extract

    bucket, _, key = uri[len("s3://"):].partition("/")
    say(f"downloading {uri}")
    with tempfile.TemporaryDirectory(prefix="model-data-") as tmp:
        archive = Path(tmp) / "model.tar.gz"
        try:
            s3.download_file(bucket, key, str(archive))
        except ClientError as err:
            raise UserError(f"cannot download the package's ModelDataUrl {uri}: "
                            f"{err.response['Error'].get('Message', err)}") from None
        say(f"extracting {archive.stat().st_size / 2**20:.0f} MiB into {model_dir}")
        try:
            safe_extract(archive, model_dir)
        except StageError as err:
            raise UserError(str(err)) from None


def _check_quantized_locally(model_dir: Path) -> None:
    config_path = model_dir / "config.json"
    if not config_path.exists():
        return
    config = json.loads(config_path.read_text())
    if not config.get("quantization_config"):
        return
    import torch

    from serving.model import quantization_problem

    problem = quantization_problem(config, "cuda" if torch.cuda.is_available() else "cpu")
    if problem:
        raise UserError(f"this machine cannot serve the package's model: {problem}")


def _start(s3, package: Package, name: str, instance_type: str, deployment: Path,
           say: Callable[[str], None]) -> LocalEndpoint:
    from pipelines.local import jobs

    port = server.free_port()
    url = f"http://127.0.0.1:{port}"
    # A container's environment, not this shell's: the package's Environment is what SageMaker
    # gives the model's container; the rest stands in for /opt/ml and the instance's port.
    env = jobs.job_environment(s3, {"Environment": package.environment}, package.image, {}, {
        "SAGEMAKER_BASE_DIR": str(deployment),
        "SAGEMAKER_BIND_TO_PORT": str(port),
        "SERVING_HOST": "127.0.0.1",  # a local endpoint is for this machine only
    })
    log_path = deployment / "log.txt"
    # As the home's server starts its jobs (forked by the warm job runner, else a fresh process
    # whose log says first why), detached: the server outlives this command and the runner.
    start = runner.WarmStart(server.running_job_runner())
    with open(log_path, "ab") as log:
        process = start([sys.executable, "-m", "serving", "serve"], env, deployment, log=log)
    how = (f"forked by the warm job runner {start.runner.pid}" if isinstance(process, runner.Job)
           else "a fresh process")
    found = processes.stat(process.pid)
    process_started = found.started if found else 0
    say(f"started the serving container's entry point (pid {process.pid}, {how}); log: "
        f"{log_path}")
    started = time.monotonic()
    try:
        _wait_for_ping(process, url, log_path, started, say)
    except UserError as err:
        _stop(process.pid, process_started)
        raise UserError(f"endpoint {name} did not start: {err} (log: {log_path})") from None
    except BaseException:  # interrupted: no server is left running unrecorded
        _stop(process.pid, process_started)
        raise
    say(f"{name}: /ping answers 200 after {time.monotonic() - started:.1f} s")
    return LocalEndpoint(name=name, package_arn=package.arn, model_data_url=package.model_data_url,
                         instance_type=instance_type, url=url, pid=process.pid,
                         deployment=str(deployment),
                         created=time.strftime("%Y-%m-%dT%H:%M:%S%z"), started=process_started)


def _wait_for_ping(process: subprocess.Popen | runner.Job, url: str, log_path: Path, started: float,
                   say: Callable[[str], None]) -> None:
    """Until /ping answers 200; UserError with the reason when the server exits, reports that the
    model failed to load (a 5xx other than 503, "loading"), or takes too long."""
    next_note = started + 15
    delay = 0.05
    while True:
        status, body = _ping(url)
        if status == 200:
            return
        if process.poll() is not None:
            raise UserError(_last_error(log_path)
                            or f"the server exited with status {process.returncode}")
        if status is not None and status >= 500 and status != 503:
            raise UserError(_error_message(body))
        if time.monotonic() - started > STARTUP_TIMEOUT_S:
            raise UserError(f"GET /ping did not answer 200 within {STARTUP_TIMEOUT_S:.0f} s")
        if time.monotonic() > next_note:
            say(f"  still loading the model ({time.monotonic() - started:.0f} s)")
            next_note += 15
        # Soon after the model is ready for a tiny model, no more than twice a second for a large
        # one: the server logs each 503 /ping while it loads, in the log deploy points to.
        time.sleep(delay)
        delay = min(0.5, delay * 1.5)


def _write_record(endpoint: LocalEndpoint) -> None:
    path = endpoints_dir() / f"{endpoint.name}.json"
    files.write_whole(path, json.dumps(asdict(endpoint), indent=1))


@contextlib.contextmanager
def _name_lock(name: str) -> Iterator[None]:
    """One deploy or undeploy of a name at a time, across processes."""
    with files.locked(endpoints_dir() / f".{name}.lock"):
        yield


def _ping(url: str) -> tuple[int | None, bytes]:
    try:
        with urllib.request.urlopen(f"{url}/ping", timeout=2) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()
    except OSError:
        return None, b""


def _is_our_server(pid: int, started: int) -> bool:
    """Whether the endpoint's serving process `pid`, started at `started`, still runs (a pid is
    reused by another process once its own has ended)."""
    if started:
        return processes.running(pid, started)
    # A record of an earlier version, whose servers were fresh interpreters.
    command = processes.command_line(pid) or []
    return b"serving" in command and b"serve" in command and processes.running(pid)


def _stop(pid: int, started: int) -> None:
    """SIGTERM, then SIGKILL after SageMaker's grace period, as SageMaker stops a container."""
    if _is_our_server(pid, started):
        processes.terminate(pid, STOP_GRACE_S, started or None)


def _last_error(log_path: Path) -> str | None:
    try:
        lines = [line for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return None
    for line in reversed(lines):
        if "ERROR:" in line:
            return line.split("ERROR:", 1)[1].strip()
    return lines[-1].strip() if lines else None


def _error_message(body: bytes) -> str:
    try:
        return str(json.loads(body)["error"])
    except (ValueError, KeyError, TypeError):
        return body.decode(errors="replace").strip()[:300] or "no message"


# --- AWS endpoints --------------------------------------------------------------------------------


def model_request(model_name: str, package_arn: str, role_arn: str) -> dict:
    """CreateModel from a model package: its container names the package, so SageMaker takes
    the image, ModelDataUrl and Environment from the package (SageMaker developer guide,
    "Deploy a Model from the Registry")."""
    return {"ModelName": model_name, "ExecutionRoleArn": role_arn,
            "PrimaryContainer": {"ModelPackageName": package_arn}}


def endpoint_config_request(config_name: str, model_name: str, instance_type: str) -> dict:
    return {"EndpointConfigName": config_name,
            "ProductionVariants": [{"VariantName": VARIANT, "ModelName": model_name,
                                    "InstanceType": instance_type, "InitialInstanceCount": 1,
                                    "InitialVariantWeight": 1.0}]}


def deployment_names(name: str, when: float | None = None) -> str:
    """The Model's and EndpointConfig's name for one deployment of endpoint `name`: unique per
    deployment (an update needs new ones), within the 63 characters both allow."""
    stamp = time.strftime("%Y%m%d%H%M%S", time.gmtime(when))
    return f"{name[:63 - len(stamp) - 1].rstrip('-')}-{stamp}"


def deploy_aws(sagemaker, package: Package, name: str, instance_type: str, role_arn: str,
               poll_seconds: float = 30.0, say: Callable[[str], None] = print) -> dict:
    """Create (or update) endpoint `name` serving `package` and wait until it is InService;
    DescribeEndpoint's answer. What this deployment created is deleted if it fails; after a
    successful update, what the previous deployment used is deleted."""
    created = deployment_names(name)
    previous = _describe_endpoint(sagemaker, name)
    if previous is not None and previous["EndpointStatus"] in AWS_BUSY:
        raise UserError(f"endpoint {name} is {previous['EndpointStatus']}; wait until it is "
                        "InService or Failed, then deploy again")
    if previous is not None and previous["EndpointStatus"] == "Failed":
        # DeleteEndpoint is the only operation SageMaker allows on a failed endpoint.
        raise UserError(f"endpoint {name} is Failed ({previous.get('FailureReason', 'no reason')})"
                        f" and cannot be updated: `llm-pipeline undeploy {name} --target aws`, "
                        "then deploy again")
    # Checked against SageMaker's API model before anything is created: one line naming the field.
    model = model_request(created, package.arn, role_arn)
    config = endpoint_config_request(created, created, instance_type)
    endpoint = {"EndpointName": name, "EndpointConfigName": created}
    for operation, request in (("CreateModel", model), ("CreateEndpointConfig", config),
                               ("UpdateEndpoint" if previous else "CreateEndpoint", endpoint)):
        validation.check_request(operation, request, f"deploy {name}")
    try:
        sagemaker.create_model(**model)
        sagemaker.create_endpoint_config(**config)
        if previous is None:
            say(f"creating endpoint {name} ({instance_type}, model {created})")
            sagemaker.create_endpoint(**endpoint)
        else:
            say(f"updating endpoint {name} to model {created} ({instance_type}); the current "
                "model answers until the new one is InService")
            sagemaker.update_endpoint(**endpoint)
        described = _wait(sagemaker, name, poll_seconds, say)
        if described["EndpointStatus"] != "InService" or described.get(
                "EndpointConfigName") != created:
            reason = described.get("FailureReason") or described["EndpointStatus"]
            raise UserError(f"endpoint {name} did not start model {created}: {reason}; see its "
                            f"CloudWatch log group /aws/sagemaker/Endpoints/{name}")
    except Exception:  # not on Ctrl-C: the endpoint goes on coming up, `endpoints` shows it
        if previous is None:
            _delete_endpoint(sagemaker, name)
        _delete_deployment(sagemaker, created, [created])
        raise
    if previous is not None:
        _delete_deployment(sagemaker, previous["EndpointConfigName"],
                           _variant_models(sagemaker, previous["EndpointConfigName"]))
    return described


def undeploy_aws(sagemaker, name: str) -> list[str]:
    """Delete endpoint `name`, its config and its models; the names deleted."""
    described = _describe_endpoint(sagemaker, name)
    if described is None:
        raise UserError(f"no endpoint {name} in this account and region; `llm-pipeline endpoints "
                        "--target aws` lists them")
    config = described["EndpointConfigName"]
    model_names = _variant_models(sagemaker, config)
    _delete_endpoint(sagemaker, name)
    _delete_deployment(sagemaker, config, model_names)
    return [name, config, *model_names]


def aws_endpoints(sagemaker) -> list[dict]:
    """Every endpoint of the account and region, with the model package it serves (or -)."""
    rows = []
    for page in sagemaker.get_paginator("list_endpoints").paginate():
        for summary in page["Endpoints"]:
            name = summary["EndpointName"]
            package = "-"
            with contextlib.suppress(ClientError, KeyError, IndexError):
                config = sagemaker.describe_endpoint(EndpointName=name)["EndpointConfigName"]
                model = sagemaker.describe_model(ModelName=_variant_models(sagemaker, config)[0])
                package = model.get("PrimaryContainer", {}).get("ModelPackageName", "-")
            rows.append({"name": name, "package": package, "status": summary["EndpointStatus"],
                         "url": f"https://runtime.sagemaker.{sagemaker.meta.region_name}."
                                f"amazonaws.com/endpoints/{name}/invocations"})
    return rows


def invoke_aws(runtime, name: str, body: dict, tenant: str | None) -> object:
    request = {"EndpointName": name, "Body": json.dumps(body).encode(),
               "ContentType": "application/json", "Accept": "application/json"}
    if tenant:
        request["CustomAttributes"] = tenant_attribute(tenant)
    try:
        response = runtime.invoke_endpoint(**request)
    except ClientError as err:
        error = err.response.get("Error", {})
        # A container's 4xx/5xx arrives as ModelError, its own body in OriginalMessage.
        original = err.response.get("OriginalMessage")
        message = _error_message(original.encode()) if original else error.get("Message", err)
        raise UserError(f"endpoint {name}: {message}") from None
    return json.loads(response["Body"].read())


def _describe_endpoint(sagemaker, name: str) -> dict | None:
    try:
        return sagemaker.describe_endpoint(EndpointName=name)
    except ClientError as err:
        if "Could not find" in err.response["Error"].get("Message", ""):
            return None
        raise


def _variant_models(sagemaker, config_name: str) -> list[str]:
    try:
        variants = sagemaker.describe_endpoint_config(
            EndpointConfigName=config_name)["ProductionVariants"]
    except ClientError:
        return []
    return [variant["ModelName"] for variant in variants]


def _wait(sagemaker, name: str, poll_seconds: float, say: Callable[[str], None]) -> dict:
    """DescribeEndpoint once the endpoint is no longer being created or updated, saying each
    status change (creating an endpoint takes minutes)."""
    status, started = "", time.monotonic()
    while True:
        described = sagemaker.describe_endpoint(EndpointName=name)
        if described["EndpointStatus"] != status:
            status = described["EndpointStatus"]
            say(f"[{time.monotonic() - started:5.0f} s] {name}: {status}")
        if status not in AWS_BUSY:
            return described
        time.sleep(poll_seconds)


def _delete_endpoint(sagemaker, name: str) -> None:
    with contextlib.suppress(ClientError):
        sagemaker.delete_endpoint(EndpointName=name)


def _delete_deployment(sagemaker, config_name: str, model_names: list[str]) -> None:
    with contextlib.suppress(ClientError):
        sagemaker.delete_endpoint_config(EndpointConfigName=config_name)
    for model_name in model_names:
        with contextlib.suppress(ClientError):
            sagemaker.delete_model(ModelName=model_name)


# --- The commands ---------------------------------------------------------------------------------


def cmd_deploy(args, region: str) -> int:
    import boto3

    sagemaker = boto3.client("sagemaker", region_name=region)
    package = Package.describe(sagemaker, args.arn)
    instance_type = check_deployable(package, args.instance_type)
    name = endpoint_name(package, args.name)
    note = unlisted_note(package, instance_type)
    if note:
        print(note)
    if args.target == "local":
        endpoint = deploy_local(boto3.client("s3", region_name=region), package, name,
                                instance_type)
        print(f"\nEndpoint {name} is InService at {endpoint.url}\n"
              f"  serving {package.arn}\n"
              f"  llm-pipeline invoke {name} --prompt 'Hello'\n"
              f"  curl {endpoint.url}/invocations -H 'Content-Type: application/json' "
              "-d '{\"inputs\": \"Hello\"}'")
        return 0
    role_arn = args.role_arn or os.environ.get("LLM_PIPELINE_ROLE_ARN")
    if not role_arn:
        raise UserError("--target aws needs --role-arn (or LLM_PIPELINE_ROLE_ARN): the role "
                        "SageMaker hosts the model with, which reads the package's artifact and "
                        "pulls its image (the pipeline's execution role does both)")
    try:
        described = deploy_aws(sagemaker, package, name, instance_type, role_arn,
                               args.poll_seconds)
    except ClientError as err:
        raise UserError(f"deploy {name}: {err.response['Error'].get('Message', err)}") from None
    print(f"\nEndpoint {name} is InService: {described['EndpointArn']}\n"
          f"  serving {package.arn} on {instance_type}\n"
          f"  llm-pipeline invoke {name} --prompt 'Hello' --target aws")
    return 0


def cmd_invoke(args, region: str | None) -> int:
    body = request_body(args.prompt, args.max_new_tokens, args.raw)
    if args.target == "local":
        answer = invoke_local(args.name, body, args.tenant)
    else:
        import boto3

        answer = invoke_aws(boto3.client("sagemaker-runtime", region_name=region), args.name,
                            body, args.tenant)
    print(answer_text(answer))
    return 0


def cmd_endpoints(args, region: str | None) -> int:
    if args.target == "local":
        rows = [{"name": e.name, "package": e.package_arn, "status": local_status(e),
                 "url": e.url} for e in local_endpoints()]
    else:
        import boto3

        rows = aws_endpoints(boto3.client("sagemaker", region_name=region))
    if not rows:
        print("no endpoints" + (" (local)" if args.target == "local" else ""))
        return 0
    for row in rows:
        print(f"{row['name']}  {row['status']}  {row['url']}\n  package {row['package']}")
    return 0


def cmd_undeploy(args, region: str | None) -> int:
    if args.target == "local":
        endpoint = undeploy_local(args.name)
        print(f"stopped endpoint {args.name} ({endpoint.url} no longer answers)")
        return 0
    import boto3

    try:
        deleted = undeploy_aws(boto3.client("sagemaker", region_name=region), args.name)
    except ClientError as err:
        raise UserError(f"undeploy {args.name}: {err.response['Error'].get('Message', err)}"
                        ) from None
    print(f"deleted endpoint {deleted[0]}, endpoint config {deleted[1]} and model(s) "
          f"{', '.join(deleted[2:]) or '-'}")
    return 0

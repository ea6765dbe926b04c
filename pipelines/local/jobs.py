"""Processing and training jobs under the SageMaker container contract, as local processes.

Each job gets its own folder standing in for the container's `/opt/ml`: inputs are staged
from S3 into it, the configuration files are written as SageMaker writes them, the image's stage
entry point runs with the project's Python, and on success outputs (and `model.tar.gz`) are
uploaded back to S3. A failed job uploads nothing; its reason is read where SageMaker reads it
(`/opt/ml/output/failure` of a training job, `/opt/ml/output/message` of a processing job).

A job's environment is what SageMaker gives a container, and nothing of the shell that started
the engine (`job_environment`):
  - the image's own `ENV` (the ENV instructions of its Dockerfile, containers/images.py);
  - the request's `Environment`;
  - what SageMaker sets itself: `AWS_REGION`; for a training job `TRAINING_JOB_NAME` and
    `TRAINING_JOB_ARN`. SageMaker's files: `/opt/ml/config/processingjobconfig.json` and
    `resourceconfig.json` (processing), `/opt/ml/input/config/hyperparameters.json`,
    `inputdataconfig.json` and `resourceconfig.json` (training).
The only differences are what running without a container on this machine needs:
  - `/opt/ml` is the job's folder: processing arguments naming `/opt/ml/...` are rewritten, and
    `SM_OUTPUT_DIR` (both kinds), `SM_MODEL_DIR`, `SM_OUTPUT_DATA_DIR`, `SM_INPUT_CONFIG_DIR`,
    `SM_CHECKPOINT_DIR` and `SM_CHANNEL_<NAME>` (training) point the stage into it. They carry the
    names SageMaker's training toolkit gives these folders; the project's images run the stage
    without that toolkit, so on SageMaker they are unset and the stage uses `/opt/ml` itself
    (steps/common/contract.py). `SM_PROCESSES_PER_HOST` plays `InstanceCount` instances as that
    many processes on this one machine (torchrun, gloo).
  - AWS: the local endpoint (`AWS_ENDPOINT_URL*` as the engine has them) and the engine's own
    credentials (the local server's dummy ones), in place of the execution role's credentials
    SageMaker serves a container; `AWS_CONFIG_FILE` and `AWS_SHARED_CREDENTIALS_FILE` point at
    nothing, so that no `~/.aws` file of the developer's gives a job a region or an identity.
  - Tracking into the local MLflow store: `LLM_PIPELINE_MLFLOW_RUN_ID` and
    `LLM_PIPELINE_MLFLOW_PARENT_RUN_ID`, the step's run and its execution's, which the local
    server made for the job, and `LLM_PIPELINE_MLFLOW_RUN_END`, the file where the job leaves its
    run's end for the server, which ends the run once the job's process has ended (on SageMaker
    the step makes and ends them itself: steps/common/tracking.py).
  - This machine: `PATH` (the project's Python first), `HOME` (where caches live: the converted
    SmolLM2, Hugging Face's), and, when set, `LLM_PIPELINE_CACHE` (the model cache),
    `LLM_PIPELINE_NATIVE_BF16` (what the CPU is taken to be) and `OMP_NUM_THREADS` (the threads a
    job computes on: SageMaker gives each job an instance of its own, while here parallel steps,
    concurrent executions and other work share this machine's cores, and OpenMP threads that
    outnumber the free cores spin waiting for one another: on a 2-CPU machine running two tiny
    trainings at once, a step took 20 times the CPU on 2 threads each that it took on 1).

A training job's `CheckpointConfig` is honoured as SageMaker does it: the S3 checkpoints are
restored into the checkpoint folder before the stage starts, and the folder is synced back to S3
while it runs and once more when it ends (also when it fails or is killed), so a restarted job
resumes. `InstanceCount` > 1 runs that many processes on this machine (torchrun, gloo) in place of
that many instances. The values of credential variables in the job's environment (AWS keys, API
keys) are masked in what a job prints, before it reaches the log or the display, and in the
failure reason.

A job's process is started through its execution's `JobControl`: the one place that decides how
a job's process comes to be (a plain subprocess, or a child forked by the warm job runner, which
has imported the ML stack already: pipelines/local/runner.py; either way a new process of its own
with exactly the environment above) and where a stop request reaches the job, which is then
stopped as SageMaker stops one: SIGTERM to the job's process group, SIGKILL after the grace period.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import boto3

from containers import dockerfile, images
from pipelines.local import processes
from steps.common.archives import pack_folder

CONTAINER_ROOT = "/opt/ml"


@dataclass
class JobResult:
    succeeded: bool
    description: dict  # the Describe*Job response the pipeline's properties read
    failure_reason: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    stopped: bool = False  # stopped on request (StopPipelineExecution), not failed


# How long a job may take to end after SIGTERM before it is killed, stopped on request or at its
# StoppingCondition: "SageMaker sends the algorithm the SIGTERM signal, which delays job
# termination for 120 seconds" (StopTrainingJob,
# https://docs.aws.amazon.com/sagemaker/latest/APIReference/API_StopTrainingJob.html, and
# https://docs.aws.amazon.com/sagemaker/latest/APIReference/API_StoppingCondition.html). A job
# stopped at MaxRuntimeInSeconds is Stopped with the secondary status MaxRuntimeExceeded.
STOP_GRACE_SECONDS = 120.0
# How often a running job is checked for a stop request or its MaxRuntimeInSeconds.
STOP_CHECK_SECONDS = 0.2
MAX_RUNTIME_EXCEEDED = "MaxRuntimeExceeded"
STOPPED_ON_REQUEST = "StopRequested"


def start_process(command: list[str], env: dict[str, str], cwd: Path) -> subprocess.Popen:
    """A job's process, leading its own process group (stopping the job stops all of it: torchrun
    and its workers, a stage's helpers), its output a text pipe of lines."""
    return subprocess.Popen(command, env=env, cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
                            errors="replace", bufsize=1, start_new_session=True,
                            preexec_fn=_die_with_parent)  # noqa: PLW1509 (prctl only)


@dataclass
class JobControl:
    """How an execution's jobs are started and asked to stop.

    `start` is the seam for a warm runner: anything that returns an object with `pid` (the leader
    of the job's own process group), `stdout` (its output, text lines), `poll()` and `wait()`
    (exit status, negative for a signal), as `subprocess.Popen` does, can start the jobs. A job
    must still be a fresh process with the environment, folder and output given here.
    """

    start: Callable[[list[str], dict[str, str], Path], subprocess.Popen] = start_process
    stop_requested: threading.Event = field(default_factory=threading.Event)
    stop_grace_seconds: float = STOP_GRACE_SECONDS
    # Given a job's environment, variables to add to it, made while its inputs are staged: the
    # local server hands a tracked job the MLflow run it made for the step (pipelines/tracking.py).
    job_variables: Callable[[dict[str, str]], dict[str, str]] | None = None
    # Given those variables and whether the job succeeded, once its process has ended (before
    # its outputs are uploaded): the local server ends the step's MLflow run in the background.
    job_ended: Callable[[dict[str, str], bool], None] | None = None


def split_s3(uri: str) -> tuple[str, str]:
    if not uri.startswith("s3://"):
        raise ValueError(f"{uri!r} is not an s3:// URI")
    bucket, _, key = uri[5:].partition("/")
    return bucket, key


def download_prefix(s3, uri: str, destination: Path) -> int:
    """Stage an S3Prefix input: every object under the prefix, keyed relative to it."""
    bucket, prefix = split_s3(uri)
    destination.mkdir(parents=True, exist_ok=True)
    count = 0
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            key = obj["Key"]
            relative = key[len(prefix):].lstrip("/") if key != prefix else key.rsplit("/", 1)[-1]
            if not relative or key.endswith("/"):
                continue
            target = (destination / relative).resolve()
            if not target.is_relative_to(destination.resolve()):
                raise ValueError(f"S3 key {key!r} would be staged outside {destination}")
            target.parent.mkdir(parents=True, exist_ok=True)
            # One GetObject streamed to the file: download_file first asks for the object's
            # size (HeadObject) and starts a pool of transfer threads for each file, which took
            # three times as long for the small files a job stages (15 against 4 ms a file here).
            body = s3.get_object(Bucket=bucket, Key=key)["Body"]
            with open(target, "wb") as staged:
                shutil.copyfileobj(body, staged, 1 << 20)
            count += 1
    if count == 0:
        raise FileNotFoundError(f"no S3 objects under {uri}")
    return count


def upload_folder(s3, folder: Path, uri: str) -> None:
    bucket, prefix = split_s3(uri)
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        key = "/".join(filter(None, [prefix.rstrip("/"), path.relative_to(folder).as_posix()]))
        s3.upload_file(str(path), bucket, key)


class CheckpointSync:
    """Mirrors a checkpoint folder to S3 every few seconds while a job runs, and on `stop`.

    Files are uploaded when their size or modification time changed since the last upload;
    files deleted locally (checkpoints rotated out by the trainer) are deleted from S3 too.
    """

    def __init__(self, s3, folder: Path, uri: str, interval_s: float = 5.0) -> None:
        self.s3, self.folder, self.interval_s = s3, folder, interval_s
        self.bucket, prefix = split_s3(uri)
        self.prefix = prefix.rstrip("/")
        self._uploaded: dict[str, tuple[int, int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def restore(self) -> int:
        """Download what an earlier attempt left in S3; the number of files restored."""
        try:
            count = download_prefix(self.s3, f"s3://{self.bucket}/{self.prefix}/", self.folder)
        except FileNotFoundError:
            return 0
        for path in self.folder.rglob("*"):
            if path.is_file():
                stat = path.stat()
                self._uploaded[self._key(path)] = (stat.st_size, stat.st_mtime_ns)
        return count

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sync()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.sync()
            except (OSError, ValueError):  # a file rotated away mid-upload: the next pass settles
                pass

    def _key(self, path: Path) -> str:
        return f"{self.prefix}/{path.relative_to(self.folder).as_posix()}"

    def sync(self) -> None:
        present = {}
        for path in sorted(p for p in self.folder.rglob("*") if p.is_file()):
            stat = path.stat()
            key = self._key(path)
            present[key] = (stat.st_size, stat.st_mtime_ns)
            if self._uploaded.get(key) != present[key]:
                self.s3.upload_file(str(path), self.bucket, key)
                self._uploaded[key] = present[key]
        for key in set(self._uploaded) - set(present):
            self.s3.delete_object(Bucket=self.bucket, Key=key)
            del self._uploaded[key]


# Variables whose values are credentials: a value of one of them that a job prints (a library's
# debug output, a stage printing its environment) is masked before it reaches the log or display.
_SECRET_NAME = re.compile(r"(^|_)(SECRET|TOKEN|PASSWORD|PASSWD|API_?KEY|ACCESS_KEY|ACCESS_KEY_ID|"
                          r"CREDENTIALS?|PRIVATE_KEY|AUTH)(_|$)", re.IGNORECASE)
_MASK = "****"


def secret_values(env: dict[str, str]) -> list[str]:
    """The values of `env` that are credentials, longest first (short ones, such as the local
    server's 'local', would mask ordinary words)."""
    values = {v for k, v in env.items() if _SECRET_NAME.search(k) and len(v) >= 8}
    return sorted(values, key=len, reverse=True)


def redact(text: str, secrets: list[str]) -> str:
    for value in secrets:
        text = text.replace(value, _MASK)
    return text


def _run(command: list[str], env: dict[str, str], cwd: Path, log_path: Path,
         on_line: Callable[[str], None], control: JobControl | None = None,
         max_seconds: float | None = None) -> tuple[int, str]:
    """Run the job's command to its end; (exit status, why it was stopped: "" when it was not,
    STOPPED_ON_REQUEST, or MAX_RUNTIME_EXCEEDED after `max_seconds`)."""
    control = control or JobControl()
    secrets = secret_values(env)
    with open(log_path, "a", encoding="utf-8") as log:
        process = control.start(command, env, cwd)
        stopped: list[str] = []
        ended = threading.Event()
        watcher = threading.Thread(target=_stop_when_asked,
                                   args=(process, control, max_seconds, stopped, ended),
                                   daemon=True)
        watcher.start()
        assert process.stdout is not None
        try:
            for line in process.stdout:
                line = redact(line, secrets)
                log.write(line)
                log.flush()
                on_line(line.rstrip("\n"))
            code = process.wait()
        finally:
            ended.set()
        watcher.join()
        return code, stopped[0] if stopped else ""


def _job_variables(control: JobControl | None, env: dict[str, str]) -> Callable[[], dict]:
    """`control.job_variables(env)`, made in the background while the job's inputs are staged
    (the local server's MLflow run for the step is a database write); call the result for them
    when the job starts."""
    if control is None or control.job_variables is None:
        return dict
    made: dict[str, str] = {}
    thread = threading.Thread(target=lambda: made.update(control.job_variables(env)),
                              name="job-variables", daemon=True)
    thread.start()

    def variables() -> dict[str, str]:
        thread.join()
        return made

    return variables


def _job_ended(control: JobControl | None, variables: dict[str, str], succeeded: bool) -> None:
    if control is not None and control.job_ended is not None:
        control.job_ended(variables, succeeded)


def _stop_when_asked(process: subprocess.Popen, control: JobControl, max_seconds: float | None,
                     stopped: list[str], ended: threading.Event) -> None:
    """While the job runs (until `ended`): when its execution is asked to stop, or it has run
    `max_seconds`, SIGTERM its process group, and SIGKILL it after the grace period. It leaves
    as soon as the job has ended, not at its next look: the engine waits for it before the job's
    outputs, and each job of a run waited a tenth of a second on average."""
    deadline = time.monotonic() + max_seconds if max_seconds else None
    why = STOPPED_ON_REQUEST
    while not ended.wait(STOP_CHECK_SECONDS):
        if control.stop_requested.is_set():
            break
        if deadline is not None and time.monotonic() >= deadline:
            why = MAX_RUNTIME_EXCEEDED
            break
    if ended.is_set() or process.poll() is not None:
        return
    stopped.append(why)
    processes.signal_group(process.pid, signal.SIGTERM)
    grace = control.stop_grace_seconds if why == STOPPED_ON_REQUEST else STOP_GRACE_SECONDS
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        processes.signal_group(process.pid, signal.SIGKILL)


def billed_seconds(elapsed: float) -> int:
    """A training job's TrainingTimeInSeconds and BillableTimeInSeconds: whole seconds, at least 1
    (SageMaker's API model: both fields have a minimum of 1, so a job stopped in its first second
    still reports 1)."""
    return max(1, math.ceil(elapsed))


def _max_runtime(request: dict) -> float | None:
    seconds = (request.get("StoppingCondition") or {}).get("MaxRuntimeInSeconds")
    return float(seconds) if seconds else None


def _stopped_reason(request: dict) -> str:
    return (f"{MAX_RUNTIME_EXCEEDED}: the job ran past StoppingCondition.MaxRuntimeInSeconds "
            f"({request['StoppingCondition']['MaxRuntimeInSeconds']} s) and was stopped; give "
            "it more (MaxRuntimeSeconds) or less work")


# Loaded here, not in the child: a child forked from a threaded process (the local server) must
# not load libraries between fork and exec.
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def _die_with_parent() -> None:
    """In the job's process: ask Linux to SIGTERM it when the engine dies, however it dies.

    Otherwise a killed engine (the local server, or a program running the engine itself) leaves
    its job training on (and, under torchrun, holding a port); SageMaker stops a job's container
    when the job is stopped.
    """
    if _LIBC is not None:
        PR_SET_PDEATHSIG = 1
        _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _last_error(log_path: Path) -> str:
    lines = [ln for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()]
    for line in reversed(lines):
        if line.startswith("ERROR:"):
            return line[len("ERROR:"):].strip()
    return lines[-1].strip() if lines else "the job printed nothing"


def _read_reason(path: Path) -> str:
    """The first 1 KB of a job's failure or message file, as SageMaker keeps it; "" if absent."""
    if not path.is_file():
        return ""
    return path.read_bytes()[:1024].decode("utf-8", errors="replace").strip()


def _failure_reason(code: int, reason_file: Path, log_path: Path, env: dict[str, str]) -> str:
    """`exit code N: <reason>`: the stage's own file, else its log's last error line."""
    reason = _read_reason(reason_file) or _last_error(log_path)
    reason = " ".join(reason.removeprefix("ERROR:").split())  # the stage's own prefix
    return f"exit code {code}: {redact(reason, secret_values(env))}"


@cache
def image_environment(repository: str) -> dict[str, str]:
    """What the image sets for every container: its Dockerfile's ENV instructions."""
    return dockerfile.environment(dockerfile.parse(images.dockerfile(repository)))


def _local_aws() -> dict[str, str]:
    """The engine's AWS endpoint (the local server, or the one the user named: AWS_ENDPOINT_URL
    and its per-service forms) and the engine's credentials, standing in for the execution
    role's."""
    env = {k: v for k, v in os.environ.items() if k.startswith("AWS_ENDPOINT_URL")}
    credentials = boto3.Session().get_credentials()
    if credentials is not None:
        frozen = credentials.get_frozen_credentials()
        env.update(AWS_ACCESS_KEY_ID=frozen.access_key, AWS_SECRET_ACCESS_KEY=frozen.secret_key)
        if frozen.token:
            env["AWS_SESSION_TOKEN"] = frozen.token
    # No ~/.aws file of the developer's: its region or profile would make a job work here that
    # fails in a SageMaker container.
    env.update(AWS_CONFIG_FILE=os.devnull, AWS_SHARED_CREDENTIALS_FILE=os.devnull)
    return env


def _this_machine() -> dict[str, str]:
    """What running the project's Python here, without the image, needs."""
    env = {"PATH": os.pathsep.join([str(Path(sys.executable).parent),
                                    "/usr/local/bin", "/usr/bin", "/bin"])}
    for name in ("HOME", "LLM_PIPELINE_CACHE", "LLM_PIPELINE_NATIVE_BF16", "OMP_NUM_THREADS"):
        if os.environ.get(name):
            env[name] = os.environ[name]
    return env


def job_environment(s3, request: dict, image: str, sagemaker: dict[str, str],
                    local_paths: dict[str, str]) -> dict[str, str]:
    """The environment of a job's process: see the module's docstring for each part.

    `sagemaker` holds what SageMaker sets for this kind of job besides the region, `local_paths`
    the folders that stand in for `/opt/ml`. The request's Environment overrides the image's ENV,
    as `docker run -e` does. Nothing is taken from the engine's environment but what `_local_aws`
    and `_this_machine` name.

    The region is the engine's clients' (the region of the local server's state, which a job's
    clients must share). SageMaker documents TRAINING_JOB_NAME and TRAINING_JOB_ARN for training
    containers (https://docs.aws.amazon.com/sagemaker/latest/dg/your-algorithms-training-algo-running-container.html);
    AWS_REGION is how a container learns its region (the SageMaker SDK's own local mode,
    sagemaker/core/local/image.py, sets it the same way), and boto3 does not read it: stages
    resolve it with steps.common.contract.aws_region.
    """
    return {**image_environment(images.repository_of(image)),
            **{k: str(v) for k, v in request.get("Environment", {}).items()},
            **sagemaker, "AWS_REGION": s3.meta.region_name,
            **local_paths, **_local_aws(), **_this_machine()}


def warm_environment() -> dict[str, str]:
    """The environment the warm job runner imports its libraries under: what every job of the
    project's images gets besides the request's Environment and the per-job variables (the ENV
    the images share, and this machine's part)."""
    shared: dict[str, str] | None = None
    for repository in images.IMAGES:
        env = image_environment(repository)
        shared = env if shared is None else {k: v for k, v in shared.items() if env.get(k) == v}
    return {**(shared or {}), **_this_machine()}


def _job_arn(request: dict, kind: str, job_name: str, region: str) -> str:
    """The job's ARN, in the account of the role it runs as (the engine plays that account)."""
    account = request["RoleArn"].split(":")[4]
    return f"arn:aws:sagemaker:{region}:{account}:{kind}-job/{job_name.lower()}"


def _command(image: str, entrypoint: list[str] | None, arguments: list[str]) -> list[str]:
    module = images.entry_module(image, entrypoint)
    return [sys.executable, "-m", module, *arguments]


def run_processing_job(s3, request: dict, job_name: str, job_dir: Path,
                       on_line: Callable[[str], None], control: JobControl | None = None
                       ) -> JobResult:
    root = job_dir / "opt_ml"

    def local(path: str) -> str:
        return str(root) + path[len(CONTAINER_ROOT):] if path.startswith(CONTAINER_ROOT + "/") else path

    app = request["AppSpecification"]
    arguments = [local(a) for a in app.get("ContainerArguments", [])]
    command = _command(app["ImageUri"], app.get("ContainerEntrypoint"), arguments)
    config_dir, output_dir = root / "config", root / "output"
    env = job_environment(s3, request, app["ImageUri"], {},
                          {"SM_OUTPUT_DIR": str(output_dir)})
    variables = _job_variables(control, env)
    for item in request.get("ProcessingInputs", []):
        download_prefix(s3, item["S3Input"]["S3Uri"], Path(local(item["S3Input"]["LocalPath"])))
    outputs = request.get("ProcessingOutputConfig", {}).get("Outputs", [])
    for item in outputs:
        Path(local(item["S3Output"]["LocalPath"])).mkdir(parents=True, exist_ok=True)

    # What SageMaker Processing gives a container: the request's Environment and two files
    # (https://docs.aws.amazon.com/sagemaker/latest/dg/build-your-own-processing-container.html,
    # "How Amazon SageMaker Processing Configures Your Processing Container").
    arn = _job_arn(request, "processing", job_name, s3.meta.region_name)
    for folder in (config_dir, output_dir):
        folder.mkdir(parents=True, exist_ok=True)
    (config_dir / "processingjobconfig.json").write_text(json.dumps(
        {"ProcessingJobArn": arn, "ProcessingJobName": job_name, **request}, indent=1))
    (config_dir / "resourceconfig.json").write_text(json.dumps(
        {"current_host": "algo-1", "hosts": ["algo-1"]}, indent=1))

    log_path = job_dir / "log.txt"
    code, stopped = _run(command, {**env, **variables()}, job_dir, log_path, on_line, control,
                         _max_runtime(request))
    _job_ended(control, variables(), code == 0 and not stopped)
    description = {**request, "ProcessingJobName": job_name, "ProcessingJobArn": arn,
                   "ProcessingJobStatus": "Completed" if code == 0 else "Failed"}
    if stopped == STOPPED_ON_REQUEST:  # nothing is uploaded: the job did not finish
        return JobResult(False, {**description, "ProcessingJobStatus": "Stopped"}, stopped=True)
    # SageMaker returns the first 1 KB of /opt/ml/output/message as the job's ExitMessage, in any
    # terminal status; a failed stage leaves its reason there (steps/common/contract.py).
    message = redact(_read_reason(output_dir / "message"), secret_values(env))
    if message:
        description["ExitMessage"] = message
    if stopped:  # as a training job is stopped (a processing job's StoppingCondition is alike)
        reason = _stopped_reason(request)
        return JobResult(False, {**description, "ProcessingJobStatus": "Stopped",
                                 "ExitMessage": reason, "FailureReason": reason}, reason)
    if code != 0:
        reason = _failure_reason(code, output_dir / "message", log_path, env)
        return JobResult(False, {**description, "FailureReason": reason}, reason)
    for item in outputs:
        upload_folder(s3, Path(local(item["S3Output"]["LocalPath"])), item["S3Output"]["S3Uri"])
    return JobResult(True, description)


def run_training_job(s3, request: dict, job_name: str, job_dir: Path,
                     on_line: Callable[[str], None], control: JobControl | None = None
                     ) -> JobResult:
    root = job_dir / "opt_ml"
    config_dir, data_dir = root / "input" / "config", root / "input" / "data"
    model_dir, output_dir = root / "model", root / "output"
    for folder in (config_dir, data_dir, model_dir, output_dir / "data", root / "checkpoints"):
        folder.mkdir(parents=True, exist_ok=True)

    # What SageMaker gives a training container under /opt/ml/input/config
    # (https://docs.aws.amazon.com/sagemaker/latest/dg/your-algorithms-training-algo-running-container.html).
    hyperparameters = {k: str(v) for k, v in request.get("HyperParameters", {}).items()}
    channels = [c["ChannelName"] for c in request.get("InputDataConfig", [])]
    (config_dir / "hyperparameters.json").write_text(json.dumps(hyperparameters, indent=1))
    (config_dir / "inputdataconfig.json").write_text(json.dumps(
        {c["ChannelName"]: {"TrainingInputMode": c.get("InputMode", "File")}
         for c in request.get("InputDataConfig", [])}, indent=1))
    # One host standing in for InstanceCount instances, each played by one process.
    instances = int(request["ResourceConfig"].get("InstanceCount", 1))
    hosts = ["algo-1"]
    (config_dir / "resourceconfig.json").write_text(json.dumps(
        {"current_host": hosts[0], "hosts": hosts}, indent=1))

    algorithm = request["AlgorithmSpecification"]
    sagemaker = {"TRAINING_JOB_NAME": job_name,
                 "TRAINING_JOB_ARN": _job_arn(request, "training", job_name, s3.meta.region_name)}
    local_paths = {
        "SM_MODEL_DIR": str(model_dir),
        "SM_OUTPUT_DIR": str(output_dir),
        "SM_OUTPUT_DATA_DIR": str(output_dir / "data"),
        "SM_INPUT_CONFIG_DIR": str(config_dir),
        "SM_CHECKPOINT_DIR": str(root / "checkpoints"),
        **{f"SM_CHANNEL_{name.upper()}": str(data_dir / name) for name in channels},
        "SM_PROCESSES_PER_HOST": str(instances),
    }
    env = job_environment(s3, request, algorithm["TrainingImage"], sagemaker, local_paths)
    variables = _job_variables(control, env)
    for channel in request.get("InputDataConfig", []):
        source = channel["DataSource"]["S3DataSource"]["S3Uri"]
        download_prefix(s3, source, data_dir / channel["ChannelName"])
    command = _command(algorithm["TrainingImage"], algorithm.get("ContainerEntrypoint"),
                       algorithm.get("ContainerArguments", []))
    patterns = [(m["Name"], re.compile(m["Regex"])) for m in algorithm.get("MetricDefinitions", [])]
    metrics: dict[str, float] = {}

    def watch(line: str) -> None:
        for name, pattern in patterns:
            match = pattern.search(line)
            if match:
                try:
                    metrics[name] = float(match.group(1))
                except (ValueError, IndexError):
                    pass
        on_line(line)

    log_path = job_dir / "log.txt"
    checkpoints = None
    if request.get("CheckpointConfig", {}).get("S3Uri"):
        checkpoints = CheckpointSync(s3, root / "checkpoints", request["CheckpointConfig"]["S3Uri"])
        restored = checkpoints.restore()
        if restored:
            # Into the job's log too: `run`, `watch` and the console show a job's log, not the
            # engine's own lines, and a resumed job should say where its checkpoints came from.
            line = f"restored {restored} checkpoint files from {request['CheckpointConfig']['S3Uri']}"
            with open(log_path, "a", encoding="utf-8") as log:
                log.write(line + "\n")
            on_line(line)
        checkpoints.start()
    started = time.time()
    try:
        code, stopped = _run(command, {**env, **variables()}, job_dir, log_path, watch, control,
                             _max_runtime(request))
    finally:
        if checkpoints is not None:
            checkpoints.stop()
    _job_ended(control, variables(), code == 0 and not stopped)
    # Locally every second of the job is billed: with managed spot SageMaker would bill fewer
    # (BillableTimeInSeconds below TrainingTimeInSeconds); this machine cannot.
    seconds = billed_seconds(time.time() - started)
    description = {**request, "TrainingJobName": job_name,
                   "TrainingJobArn": sagemaker["TRAINING_JOB_ARN"],
                   "TrainingJobStatus": "Completed" if code == 0 else "Failed",
                   "TrainingTimeInSeconds": seconds, "BillableTimeInSeconds": seconds,
                   "FinalMetricDataList": [{"MetricName": k, "Value": v} for k, v in metrics.items()]}
    if stopped == MAX_RUNTIME_EXCEEDED:
        reason = _stopped_reason(request)
        return JobResult(False, {**description, "TrainingJobStatus": "Stopped",
                                 "SecondaryStatus": MAX_RUNTIME_EXCEEDED, "FailureReason": reason},
                         reason, metrics)
    if stopped:  # on request: checkpoints were synced above; the model is not uploaded
        return JobResult(False, {**description, "TrainingJobStatus": "Stopped",
                                 "SecondaryStatus": "Stopped"}, metrics=metrics, stopped=True)
    if code != 0:
        # SageMaker's FailureReason is the first 1024 characters of /opt/ml/output/failure
        # (https://docs.aws.amazon.com/sagemaker/latest/dg/your-algorithms-training-algo-output.html).
        reason = _failure_reason(code, output_dir / "failure", log_path, env)
        return JobResult(False, {**description, "FailureReason": reason}, reason, metrics)

    artifacts = job_dir / "artifacts"
    artifacts.mkdir(exist_ok=True)
    pack_folder(model_dir, artifacts / "model.tar.gz")
    pack_folder(output_dir / "data", artifacts / "output.tar.gz")
    prefix = f"{request['OutputDataConfig']['S3OutputPath'].rstrip('/')}/{job_name}/output"
    bucket, key = split_s3(prefix)
    for name in ("model.tar.gz", "output.tar.gz"):
        s3.upload_file(str(artifacts / name), bucket, f"{key}/{name}")
    description["ModelArtifacts"] = {"S3ModelArtifacts": f"{prefix}/model.tar.gz"}
    return JobResult(True, description, metrics=metrics)

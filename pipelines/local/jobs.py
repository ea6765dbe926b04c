"""Processing and training jobs under the SageMaker container contract, as local subprocesses.

Each job gets its own folder standing in for the container's `/opt/ml`: inputs are staged
from S3 into it, `SM_*` variables and `hyperparameters.json` are written as SageMaker
writes them, the image's stage entry point runs with the project's Python, and on success
outputs (and `model.tar.gz`) are uploaded back to S3. A failed job uploads nothing.

A training job's `CheckpointConfig` is honoured as SageMaker does it: the S3 checkpoints are
restored into the checkpoint folder before the stage starts, and the folder is synced back to S3
while it runs and once more when it ends (also when it fails or is killed), so a restarted job
resumes. `InstanceCount` > 1 runs that many processes on this machine (torchrun, gloo) in place of
that many instances. The values of credential variables in the job's environment (AWS keys,
HF_TOKEN, API keys) are masked in what a job prints, before it reaches the log or the display.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from containers import images
from steps.common.archives import pack_folder

CONTAINER_ROOT = "/opt/ml"


@dataclass
class JobResult:
    succeeded: bool
    description: dict  # the Describe*Job response the pipeline's properties read
    failure_reason: str = ""
    metrics: dict[str, float] = field(default_factory=dict)


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
            s3.download_file(bucket, key, str(target))
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
         on_line: Callable[[str], None]) -> int:
    secrets = secret_values(env)
    with open(log_path, "a", encoding="utf-8") as log:
        process = subprocess.Popen(command, env=env, cwd=cwd, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   text=True, errors="replace", bufsize=1,
                                   preexec_fn=_die_with_parent)  # noqa: PLW1509 (prctl only)
        assert process.stdout is not None
        for line in process.stdout:
            line = redact(line, secrets)
            log.write(line)
            log.flush()
            on_line(line.rstrip("\n"))
        return process.wait()


def _die_with_parent() -> None:
    """In the job's process: ask Linux to SIGTERM it when the engine dies, however it dies.

    Otherwise a killed `llm-pipeline run` leaves its job training on (and, under torchrun,
    holding a port); SageMaker stops a job's container when the job is stopped.
    """
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _last_error(log_path: Path) -> str:
    lines = [ln for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()]
    for line in reversed(lines):
        if line.startswith("ERROR:"):
            return line[len("ERROR:"):].strip()
    return lines[-1].strip() if lines else "the job printed nothing"


def _job_environment(extra: dict[str, str]) -> dict[str, str]:
    env = dict(os.environ)
    env.update({k: str(v) for k, v in extra.items()})
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _command(image: str, entrypoint: list[str] | None, arguments: list[str]) -> list[str]:
    module = images.entry_module(image, entrypoint)
    return [sys.executable, "-m", module, *arguments]


def run_processing_job(s3, request: dict, job_name: str, job_dir: Path,
                       on_line: Callable[[str], None]) -> JobResult:
    root = job_dir / "opt_ml"

    def local(path: str) -> str:
        return str(root) + path[len(CONTAINER_ROOT):] if path.startswith(CONTAINER_ROOT + "/") else path

    app = request["AppSpecification"]
    arguments = [local(a) for a in app.get("ContainerArguments", [])]
    command = _command(app["ImageUri"], app.get("ContainerEntrypoint"), arguments)
    for item in request.get("ProcessingInputs", []):
        download_prefix(s3, item["S3Input"]["S3Uri"], Path(local(item["S3Input"]["LocalPath"])))
    outputs = request.get("ProcessingOutputConfig", {}).get("Outputs", [])
    for item in outputs:
        Path(local(item["S3Output"]["LocalPath"])).mkdir(parents=True, exist_ok=True)

    log_path = job_dir / "log.txt"
    code = _run(command, _job_environment(request.get("Environment", {})), job_dir, log_path, on_line)
    description = {**request, "ProcessingJobName": job_name,
                   "ProcessingJobStatus": "Completed" if code == 0 else "Failed"}
    if code != 0:
        reason = f"exit code {code}: {_last_error(log_path)}"
        return JobResult(False, {**description, "FailureReason": reason}, reason)
    for item in outputs:
        upload_folder(s3, Path(local(item["S3Output"]["LocalPath"])), item["S3Output"]["S3Uri"])
    return JobResult(True, description)


def run_training_job(s3, request: dict, job_name: str, job_dir: Path,
                     on_line: Callable[[str], None]) -> JobResult:
    root = job_dir / "opt_ml"
    config_dir, data_dir = root / "input" / "config", root / "input" / "data"
    model_dir, output_dir = root / "model", root / "output"
    for folder in (config_dir, data_dir, model_dir, output_dir / "data", root / "checkpoints"):
        folder.mkdir(parents=True, exist_ok=True)

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
    for channel in request.get("InputDataConfig", []):
        source = channel["DataSource"]["S3DataSource"]["S3Uri"]
        download_prefix(s3, source, data_dir / channel["ChannelName"])

    env = {
        **request.get("Environment", {}),
        "SM_MODEL_DIR": str(model_dir),
        "SM_OUTPUT_DIR": str(output_dir),
        "SM_OUTPUT_DATA_DIR": str(output_dir / "data"),
        "SM_INPUT_DIR": str(root / "input"),
        "SM_INPUT_CONFIG_DIR": str(config_dir),
        "SM_CHECKPOINT_DIR": str(root / "checkpoints"),
        "SM_CHANNELS": json.dumps(channels),
        "SM_HPS": json.dumps(hyperparameters),
        "SM_CURRENT_HOST": hosts[0],
        "SM_HOSTS": json.dumps(hosts),
        "SM_NUM_CPUS": str(os.cpu_count() or 1),
        "SM_NUM_GPUS": "0",
        "SM_PROCESSES_PER_HOST": str(instances),
        "TRAINING_JOB_NAME": job_name,
        **{f"SM_CHANNEL_{name.upper()}": str(data_dir / name) for name in channels},
    }
    algorithm = request["AlgorithmSpecification"]
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

    checkpoints = None
    if request.get("CheckpointConfig", {}).get("S3Uri"):
        checkpoints = CheckpointSync(s3, root / "checkpoints", request["CheckpointConfig"]["S3Uri"])
        restored = checkpoints.restore()
        if restored:
            on_line(f"restored {restored} checkpoint files from {request['CheckpointConfig']['S3Uri']}")
        checkpoints.start()
    log_path = job_dir / "log.txt"
    try:
        code = _run(command, _job_environment(env), job_dir, log_path, watch)
    finally:
        if checkpoints is not None:
            checkpoints.stop()
    description = {**request, "TrainingJobName": job_name,
                   "TrainingJobStatus": "Completed" if code == 0 else "Failed",
                   "FinalMetricDataList": [{"MetricName": k, "Value": v} for k, v in metrics.items()]}
    if code != 0:
        failure_file = output_dir / "failure"
        reason = failure_file.read_text().strip() if failure_file.is_file() else _last_error(log_path)
        reason = reason.removeprefix("ERROR:").strip()  # the stage's own prefix, as _last_error
        reason = redact(reason, secret_values(_job_environment(env)))
        reason = f"exit code {code}: {reason}"
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

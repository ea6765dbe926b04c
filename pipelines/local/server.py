"""The local SageMaker: one server on 127.0.0.1 that runs pipelines and serves S3 and the registry.

It answers the SageMaker Pipelines API itself (pipelines/local/sagemaker_api.py: pipelines,
executions that the local engine really runs, their steps and jobs) and hands every other
request (S3, the model registry, endpoints) to moto, in the same process. So boto3, the AWS CLI,
the SageMaker SDK and `llm-pipeline upsert/start` use it exactly as they use SageMaker: only the
endpoint differs.

The server runs as a background process so its state outlives a single command: `llm-pipeline
run` registers a package, a later `registry list` sees it. It lives until `llm-pipeline server
stop` or a reboot. What survives its end: pipelines and executions (with their logs and job
folders), kept under $LLM_PIPELINE_HOME; what does not: moto's state (S3 objects, model packages),
which lives in the process's memory. Commands started at once (two `llm-pipeline run`s) share
one server: whoever finds none starts it while holding a lock on the home, and the others wait
for it and use it.

The server runs each job as a process of its own. With the warm job runner (the default;
`--job-runner`, LLM_PIPELINE_JOB_RUNNER) it starts that runner beside itself with its first job, a
process that imports the ML stack once, and forks the jobs from it (pipelines/local/runner.py); with
`subprocess`, each job is a fresh Python process. The choice is the server's, made when it starts.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from pipelines import UserError, files
from pipelines.local import processes

ENDPOINT_VARIABLES = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL_SAGEMAKER")
LOCAL_REGION = "us-east-1"


def home() -> Path:
    """Where the local engine keeps its server record and executions."""
    return Path(os.environ.get("LLM_PIPELINE_HOME", Path.home() / ".llm-pipeline"))


def endpoint_configured() -> bool:
    return any(os.environ.get(name) for name in ENDPOINT_VARIABLES)


def _record() -> Path:
    return home() / "server.json"


def log_path() -> Path:
    return home() / "server.log"


@contextlib.contextmanager
def _lock() -> Iterator[None]:
    """Held while the server is started or stopped: one at a time per home, across processes."""
    with files.locked(home() / "server.lock"):
        yield


def _alive(url: str) -> bool:
    # The dashboard root, not /moto-api/data.json: that one serialises every backend's state
    # and answers 500 once S3 holds a multipart upload, which would look like a dead server
    # and start a new, empty one.
    try:
        with urllib.request.urlopen(f"{url}/moto-api/", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def running_url() -> str | None:
    try:
        url = json.loads(_record().read_text())["url"]
    except (OSError, ValueError, KeyError):
        return None
    return url if _alive(url) else None


def ensure_running(job_runner: str | None = None) -> str:
    """The URL of the local server, starting it when none is running; its jobs run with
    `job_runner` (runner.CHOICES; None: whatever the running server uses, warm for a new one)."""
    url = running_url()
    if not url:
        with _lock():
            # Another command may have started one while this one waited for the lock: without
            # the lock both would start their own, and one's S3 objects and model packages would
            # go to a server the home no longer records (and `server stop` does not stop).
            url = running_url() or _start(job_runner or "warm")
    running = running_job_runner()
    if job_runner and running != job_runner:
        raise UserError(f"the local server (home {home()}) runs its jobs with the {running} job "
                        f"runner, not {job_runner}; stop it first (llm-pipeline server stop)")
    return url


def running_job_runner() -> str:
    """How the home's server starts its jobs (runner.CHOICES); its endpoints' servers start so
    too (pipelines/deploy.py)."""
    try:
        return json.loads(_record().read_text()).get("job_runner", "warm")
    except (OSError, ValueError):
        return "warm"


def _server_environment() -> dict[str, str]:
    """The server's environment: the caller's, without its AWS credentials, profile or endpoints
    (the server is its own AWS; its jobs must not reach the caller's account)."""
    return {k: v for k, v in os.environ.items()
            if not k.startswith("AWS_") or k == "AWS_DEFAULT_REGION"}


def _start(job_runner: str) -> str:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with open(log_path(), "ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "pipelines.local.server", "--port", str(port),
             "--home", str(home()), "--job-runner", job_runner],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=_server_environment(),
            start_new_session=True,  # survives the command that started it
        )
    deadline = time.monotonic() + 60
    while not _alive(url):
        if process.poll() is not None or time.monotonic() > deadline:
            raise UserError(f"the local AWS server did not start; see {log_path()}")
        time.sleep(0.05)  # a refused connection costs nothing; the caller waits on this
    files.write_whole(_record(), json.dumps({"url": url, "pid": process.pid,
                                             "job_runner": job_runner}))
    return url


def stop() -> bool:
    """Stop the home's server (and its warm job runner, unless other homes share it); executions
    it was running end Failed, saying so."""
    from pipelines.local import runner

    with _lock():
        if not runner.shared():  # a shared runner goes on serving the other homes' servers
            runner.stop()  # it takes no more jobs, and leaves when the server's jobs have ended
        # moto-server.json: the record of a plain moto server, which earlier versions started.
        stopped = False
        for record_path in (_record(), home() / "moto-server.json"):
            try:
                record = json.loads(record_path.read_text())
            except (OSError, ValueError):
                continue
            _terminate(record.get("pid"))
            record_path.unlink(missing_ok=True)
            stopped = True
        return stopped


def _terminate(pid: int | None, timeout: float = 15.0) -> None:
    if not pid:
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    # So that a `server start` right after gets a new one. An ended server that no one reaps
    # (where the first process of a container does not reap orphans) is a zombie, which still
    # answers signal 0: `processes.running` counts it as ended.
    processes.wait_ended(pid, timeout)


def local_environment(url: str) -> dict[str, str]:
    """Variables that point boto3, the AWS CLI and the SDK at the local server."""
    return {
        "AWS_ENDPOINT_URL": url,
        "AWS_ACCESS_KEY_ID": "local",
        "AWS_SECRET_ACCESS_KEY": "local",
        "AWS_DEFAULT_REGION": LOCAL_REGION,
    }


def use_local_aws(job_runner: str | None = None) -> str:
    """Start (or reuse) the local server and point this process's AWS clients at it."""
    url = ensure_running(job_runner)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", *ENDPOINT_VARIABLES):
        os.environ.pop(name, None)
    os.environ.update(local_environment(url))
    return url


def project_folders() -> list[Path]:
    """The folders of the project's top-level packages, whose modules the commands and the jobs
    import: the packages its install lists (setup.cfg's [options.packages.find], read back from
    the installed metadata so the list lives once); run from a checkout that is not installed,
    this package's folders only."""
    import importlib.metadata
    import importlib.util

    packages = ["pipelines"]
    for distribution in importlib.metadata.distributions():
        listed = (distribution.read_text("top_level.txt") or "").split()
        if "pipelines" in listed:
            packages = listed
            break
    return [Path(folder) for package in packages
            if (spec := importlib.util.find_spec(package)) and spec.submodule_search_locations
            for folder in spec.submodule_search_locations]


def compile_modules(folders: list[Path] | None = None) -> None:
    """Write the bytecode of the Python modules under `folders` where it is missing or stale,
    as `python -m compileall` does; what cannot be written (a read-only install) is left.

    A job's environment is its image's, which sets PYTHONDONTWRITEBYTECODE, so a job never
    writes the bytecode of the stage modules it imports, and an editable install (`make
    install`) has none of its own: every job compiled the project's modules it imports from
    source (about 0.05 s a job here, a third of what a forked job spends before its stage
    starts), and so did every command in a shell that sets the variable too. Written once here,
    the jobs and the commands read it; Python checks it against each source file's time and
    size, so an edit between two jobs is compiled afresh in memory until the next server."""
    import compileall

    for folder in project_folders() if folders is None else folders:
        with contextlib.suppress(OSError):
            compileall.compile_dir(folder, quiet=2)


def serve(port: int, job_runner: str = "warm") -> None:
    """The server process: the SageMaker service of pipelines/local/sagemaker_api.py in front of
    moto, on 127.0.0.1:`port`, until SIGTERM; its jobs start with `job_runner`."""
    import logging

    import boto3
    from moto.moto_server.werkzeug_app import (
        DomainDispatcherApplication,
        MotoRequestHandler,
        create_backend_app,
    )
    from werkzeug.serving import make_server

    from pipelines.definition import LOCAL_ACCOUNT
    from pipelines.local.executions import Executions
    from pipelines.local.sagemaker_api import LocalEndpoint, LocalSageMaker

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    threading.Thread(target=compile_modules, name="compile-modules", daemon=True).start()
    url = f"http://127.0.0.1:{port}"
    # The engine's clients and the jobs it starts reach S3 and the registry here.
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", *ENDPOINT_VARIABLES):
        os.environ.pop(name, None)
    os.environ.update(local_environment(url))

    def read_s3_object(region: str, bucket: str, key: str) -> str:
        s3 = boto3.session.Session(region_name=region).client("s3")
        return s3.get_object(Bucket=bucket, Key=key)["Body"].read().decode("utf-8")

    executions = Executions(home(), _job_start(job_runner))
    api = LocalSageMaker(home(), LOCAL_ACCOUNT, executions, read_s3_object)
    application = LocalEndpoint(api, DomainDispatcherApplication(create_backend_app), LOCAL_REGION)
    http = make_server("127.0.0.1", port, application, threaded=True,
                       request_handler=MotoRequestHandler)

    def end(signum, frame) -> None:
        executions.shutdown("the local server was stopped while this execution ran "
                            "(`llm-pipeline server stop`); retry it (RetryPipelineExecution) or "
                            "start a new one")
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, end)
    logging.getLogger(__name__).info("serving the local SageMaker on %s (home %s)", url, home())
    http.serve_forever()


def _job_start(job_runner: str):
    """How the server starts its jobs (jobs.JobControl.start): forked by the warm job runner,
    which the first job starts, or each a fresh subprocess."""
    import logging

    from pipelines.local import jobs, runner

    if job_runner == "subprocess":
        logging.getLogger(__name__).info("jobs run as fresh processes (--job-runner subprocess)")
        return jobs.start_process
    return runner.WarmStart()


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m pipelines.local.server")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--home", type=Path, required=True)
    parser.add_argument("--job-runner", choices=("warm", "subprocess"), default="warm")
    args = parser.parse_args(argv)
    os.environ["LLM_PIPELINE_HOME"] = str(args.home)
    serve(args.port, args.job_runner)


if __name__ == "__main__":
    main()

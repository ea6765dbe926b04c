"""Local AWS: a moto server on 127.0.0.1 that serves S3 and the SageMaker model registry.

The server runs as a background process so its state (buckets, model packages) outlives a
single command: `llm-pipeline run` registers a package, a later `registry list` sees it.
It lives until `llm-pipeline server stop` or a reboot (moto keeps state in memory only).
Commands started at once (two `llm-pipeline run`s) share one server: whoever finds none starts
it while holding a lock on the home, and the others wait for it and use it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from pipelines import UserError

ENDPOINT_VARIABLES = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL_SAGEMAKER")
LOCAL_REGION = "us-east-1"


def home() -> Path:
    """Where the local engine keeps its server record and executions."""
    return Path(os.environ.get("LLM_PIPELINE_HOME", Path.home() / ".llm-pipeline"))


def endpoint_configured() -> bool:
    return any(os.environ.get(name) for name in ENDPOINT_VARIABLES)


def _record() -> Path:
    return home() / "moto-server.json"


@contextlib.contextmanager
def _lock() -> Iterator[None]:
    """Held while the server is started or stopped: one at a time per home, across processes."""
    home().mkdir(parents=True, exist_ok=True)
    with open(home() / "moto-server.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file is closed
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


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def running_url() -> str | None:
    try:
        url = json.loads(_record().read_text())["url"]
    except (OSError, ValueError, KeyError):
        return None
    return url if _alive(url) else None


def ensure_running() -> str:
    """The URL of the local server, starting it when none is running."""
    url = running_url()
    if url:
        return url
    with _lock():
        # Another command may have started one while this one waited for the lock: without
        # the lock both would start their own, and one's S3 objects and model packages would
        # go to a server the home no longer records (and `server stop` does not stop).
        return running_url() or _start()


def _start() -> str:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    with open(home() / "moto-server.log", "ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,  # survives the command that started it
        )
    deadline = time.monotonic() + 30
    while not _alive(url):
        if process.poll() is not None or time.monotonic() > deadline:
            raise UserError(f"the local AWS server did not start; see {home() / 'moto-server.log'}")
        time.sleep(0.2)
    partial = _record().with_suffix(f".{os.getpid()}.partial")  # readers see whole records
    partial.write_text(json.dumps({"url": url, "pid": process.pid}))
    partial.replace(_record())
    return url


def stop() -> bool:
    with _lock():
        try:
            record = json.loads(_record().read_text())
        except (OSError, ValueError):
            return False
        try:
            os.kill(record["pid"], signal.SIGTERM)
        except (ProcessLookupError, KeyError):
            pass
        _record().unlink(missing_ok=True)
        return True


def local_environment(url: str) -> dict[str, str]:
    """Variables that point boto3, the AWS CLI and the SDK at the local server."""
    return {
        "AWS_ENDPOINT_URL": url,
        "AWS_ACCESS_KEY_ID": "local",
        "AWS_SECRET_ACCESS_KEY": "local",
        "AWS_DEFAULT_REGION": LOCAL_REGION,
    }


def use_local_aws() -> str:
    """Start (or reuse) the local server and point this process's AWS clients at it."""
    url = ensure_running()
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", *ENDPOINT_VARIABLES):
        os.environ.pop(name, None)
    os.environ.update(local_environment(url))
    return url

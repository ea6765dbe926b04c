"""The warm job runner: local jobs forked from a process that has already imported the ML stack.

A local job runs its stage as `python -m steps.<stage>`, and a fresh interpreter spends most of a
small job importing torch, transformers, TRL, PEFT and datasets (about 6 s on a quiet 2-CPU
machine; two thirds of a tiny `sft` run, benchmarks/BENCHMARKS.md). The runner is a long-lived
process that imports those libraries once (`WARM_IMPORTS`) and, for each job, forks a child that
becomes the job's process, then runs the stage module as `__main__` (runpy, as `python -m` does).

What a forked job has of its own, as a new process would:
  - its pid, session and process group (the engine's signals go to the group), exit status;
  - exactly the job's environment (os.environ cleared and replaced, which sets the C environment
    too), working folder, argv, sys.path[0] (the working folder, as `python -m` puts it), umask;
  - stdin, stdout and stderr: the descriptors the engine passed over the socket (SCM_RIGHTS);
    every other descriptor of the runner is closed (its socket, other jobs' connections);
  - signal handlers and mask as the interpreter set them at start-up;
  - random state: Python's `random` (CPython reseeds it in a forked child), numpy's global
    generator and torch's default generator reseeded from the OS, as a new process seeds them;
  - torch's thread pools: the runner never runs a torch operation, so there is no intra-op or
    inter-op pool to inherit (fork copies only the calling thread; OpenBLAS stops its own
    threads around a fork); the job sizes them at first use, from its environment;
  - the project's own modules: the runner imports third-party libraries only, so `steps.*`
    (the contract's load policy, any module-level cache) is imported afresh by every job.
What it shares with the runner, by construction:
  - the preloaded libraries as they are right after import. Libraries read some environment
    variables when imported (HF_HOME, OMP_NUM_THREADS, PYTHONHASHSEED...): a job whose
    environment differs from the runner's in any variable but those read at run time
    (`RUN_TIME_VARIABLES`) runs as a fresh process instead (pipelines/local/jobs.py);
  - CPython's string-hash secret, fixed at interpreter start: the jobs of one runner iterate a
    set of strings in the same order, as processes given the same PYTHONHASHSEED do;
  - the objects created by those imports sit in the garbage collector's permanent generation
    (gc.freeze, as Python advises before forking without exec): a job's collections skip them
    and leave their memory pages shared (measured here: the collector's time in a job's loop
    fell from about 3 s to 0.4 s);
  - pyarrow's jemalloc background thread is not re-created in the child: it purges memory
    inline instead, which changes speed, not results.

Lifetime: one runner per engine home ($LLM_PIPELINE_HOME/job-runner.json), started by the local
server (pipelines/local/server.py) when it starts, so that it outlives any one command, and
stopped by `llm-pipeline server stop`. Several homes may share one runner instead: each names its
folder in LLM_PIPELINE_JOB_RUNNER_HOME (`folder`). The runner holds nothing of any home (a job's
home, environment and working folder all come with its request), so each job is the same fresh
process whichever home's server asked for it; such a runner outlives the servers, and leaves when
its socket is removed or after an hour without jobs. The server starts its jobs through `WarmStart`, the
`jobs.JobControl.start` that forks them here. The runner is keyed by what its preloaded state
depends on (the code digest of the images, this module, the Python executable, the installed
distributions and the environment it imported under): a server whose key differs starts a new
runner, and the old one stops taking jobs and leaves when its running jobs end. It also leaves
after an hour without jobs, or when its socket is removed. A runner that dies is started again
by the server for the jobs after the one that found it gone.

A job ends when its engine ends (as `prctl(PR_SET_PDEATHSIG)` ends a subprocess job): the
runner sends SIGTERM to the job's process group when the engine's connection closes, and a
job's child process gets SIGTERM when the runner itself dies. The engine stops a job as it stops
a subprocess one, by signalling its process group: the runner reports the job's pid only once
the job leads that group. A local endpoint's serving process (pipelines/deploy.py) is started
by `WarmStart` too, by the same rules, as a detached job: its output goes to the endpoint's log,
and it outlives the command that deployed it and the runner, as a serving process started in a
session of its own does (the runner neither waits for it nor counts it as work that keeps the
runner). Linux only (fork, pidfd).
"""

from __future__ import annotations

import codecs
import contextlib
import gc
import hashlib
import io
import itertools
import json
import logging
import os
import select
import selectors
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, NoReturn

from pipelines import UserError, files
from pipelines.local import processes

# Imported once by the runner (`ensure_running` names them on its command line): the ML stack,
# and what the stages import from it at module level or lazily in `main` (trainers, model
# classes, metrics), measured by benchmarks/orchestration.py.
# MLflow and its SQL store (SQLAlchemy, alembic): a tracked job's first seconds otherwise, the
# cost of tracking a tiny run (benchmarks/tracking.py).
WARM_IMPORTS = (
    "torch", "numpy", "transformers", "transformers.trainer", "transformers.models.llama",
    "datasets", "accelerate", "peft", "trl", "trl.trainer.sft_trainer", "trl.trainer.dpo_trainer",
    "trl.trainer.reward_trainer", "safetensors.torch", "scipy", "sklearn", "rouge_score.rouge_scorer",
    "matplotlib", "matplotlib.pyplot", "pandas", "pyarrow", "markdown_it", "mlflow",
    "mlflow.store.tracking.sqlalchemy_store",
)
# Variables that only code a job imports itself reads, or that libraries read when called, not
# when imported: a job may differ from the runner in these and still be forked.
# MLFLOW_TRACKING_URI (the MlflowTrackingUri parameter): MLflow reads it when a run starts; other
# MLFLOW_ variables (logging, telemetry) are read when MLflow is imported.
# The serving container's settings (serving/settings.py) are read by the project's serving
# package when it starts.
RUN_TIME_VARIABLES = ("SM_", "TRAINING_JOB_", "AWS_", "LLM_PIPELINE_", "MLFLOW_TRACKING_URI",
                      "SERVING_", "SAGEMAKER_BASE_DIR", "SAGEMAKER_BIND_TO_PORT",
                      "SAGEMAKER_MAX_PAYLOAD_IN_MB")
# Signals whose start-up disposition a job gets back (the runner changes SIGTERM and SIGINT).
_RESET_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD, signal.SIGPIPE, signal.SIGHUP,
                  signal.SIGXFSZ, signal.SIGUSR1, signal.SIGUSR2)
# `llm-pipeline run --job-runner`, whose default this variable sets.
CHOICES, VARIABLE = ("warm", "subprocess"), "LLM_PIPELINE_JOB_RUNNER"
SHARED_VARIABLE = "LLM_PIPELINE_JOB_RUNNER_HOME"  # a runner folder several homes share: `folder`
IDLE_EXIT_S = 3600.0
READY_TIMEOUT_S = 300.0  # the runner's imports take 10-60 s on a busy 2-CPU machine
_SOCKET_PATH_MAX = 107  # sun_path holds 108 bytes, one of them the terminating NUL
_HEADER = struct.Struct("!I")
_log = logging.getLogger(__name__)


class Unavailable(Exception):
    """The warm runner cannot take jobs; the message says why, in one line."""


# --- The runner process ---------------------------------------------------------------------


@dataclass(frozen=True)
class _StartUp:
    """What a new interpreter has, recorded before the runner changes it: each job gets it back."""

    signal_handlers: dict
    library_fds: frozenset[int]  # descriptors the preloaded libraries hold, as a new process would
    # What the interpreter adds to its own environment at start-up (PEP 538's locale coercion
    # sets LC_CTYPE in the C locale), which a job's own interpreter would have added too.
    interpreter_environment: dict[str, str]
    # What importing the libraries set in the environment (sklearn sets KMP_DUPLICATE_LIB_OK,
    # torch's inductor TORCHINDUCTOR_CACHE_DIR): a job that imports them itself has it too.
    library_environment: dict[str, str]

    def environment(self, job: dict[str, str]) -> dict[str, str]:
        """The environment a new interpreter given `job` has once it imported the libraries."""
        return {**self.interpreter_environment, **job, **self.library_environment}


def serve(socket_path: Path, preload: list[str]) -> None:
    """Import the ML stack (`preload`: the modules `ensure_running` named, WARM_IMPORTS), then
    fork a job for each request on `socket_path` until stopped."""
    os.close(os.pidfd_open(os.getpid()))  # Linux 5.3 or later, or leave now rather than mid-job
    handlers = {s: signal.getsignal(s) for s in _RESET_SIGNALS}
    environment = dict(os.environ)
    import importlib

    for name in preload:
        importlib.import_module(name)
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # A forked child cannot use a CUDA context its parent created.
        raise SystemExit("an import initialised CUDA in the runner; jobs must run as fresh "
                         "processes")
    # Python's advice for a process that forks without exec: the import-time objects go to the
    # permanent generation, so that a job's collections neither walk them nor write to their
    # pages (which fork shares with every job until written).
    gc.collect()
    gc.freeze()
    start_up = _StartUp(handlers, frozenset(_open_fds() - {0, 1, 2}),
                        {k: environment[k] for k in ("LC_CTYPE",) if k in environment},
                        {k: v for k, v in os.environ.items() if environment.get(k) != v})

    stopping = []
    wake_read, wake_write = os.pipe()
    for fd in (wake_read, wake_write):
        os.set_blocking(fd, False)
    signal.set_wakeup_fd(wake_write)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stopping.append(True))

    previous = os.umask(0o077)  # only this user may connect
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(socket_path))
    os.umask(previous)
    listener.listen(16)
    socket_id = os.stat(socket_path).st_ino
    print(f"[{time.strftime('%H:%M:%S')}] runner {os.getpid()} ready on {socket_path}", flush=True)

    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ, "accept")
    selector.register(wake_read, selectors.EVENT_READ, "wake")
    jobs: dict[int, _RunningJob] = {}  # by pid
    last_job = time.monotonic()
    while True:
        working = any(not job.detached for job in jobs.values())  # detached jobs keep no runner
        idle = not working and time.monotonic() - last_job > IDLE_EXIT_S
        if not stopping and (idle or not _is_our_socket(socket_path, socket_id)):
            stopping.append(True)
        if stopping and listener.fileno() >= 0:
            selector.unregister(listener)
            listener.close()
            if _is_our_socket(socket_path, socket_id):
                socket_path.unlink()
        if stopping and not working:
            return
        for key, _ in selector.select(timeout=5.0):
            if key.data == "wake":
                with contextlib.suppress(BlockingIOError):
                    os.read(wake_read, 512)
            elif key.data == "accept":
                with contextlib.suppress(BlockingIOError):
                    connection, _ = listener.accept()
                    job = _accept(connection, start_up)
                    if job is not None:
                        jobs[job.pid] = job
                        selector.register(job.connection, selectors.EVENT_READ, ("engine", job))
                        selector.register(job.pidfd, selectors.EVENT_READ, ("exit", job))
                        last_job = time.monotonic()
            elif key.data[0] == "engine":
                key.data[1].engine_message(selector)
            else:
                job = key.data[1]
                job.reap(selector)
                del jobs[job.pid]
                last_job = time.monotonic()


class _RunningJob:
    """A forked job as the runner tracks it: its process, and the engine's connection."""

    def __init__(self, pid: int, connection: socket.socket, detached: bool) -> None:
        self.pid, self.connection, self.detached = pid, connection, detached
        self.pidfd = os.pidfd_open(pid)
        self.exited = False

    def signal_group(self, signum: int) -> None:
        if not self.exited:  # not reaped yet: the pid (and its group) is still this job's
            processes.signal_group(self.pid, signum)
            with contextlib.suppress(ProcessLookupError):  # before the job's setsid, too
                signal.pidfd_send_signal(self.pidfd, signum)

    def engine_message(self, selector: selectors.BaseSelector) -> None:
        if self.connection.fileno() < 0:  # reaped in the same round: its connection is closed
            return
        try:
            data = self.connection.recv(4096)
        except OSError:
            data = b""
        if not data:  # the engine is gone: so is its job, unless detached
            if not self.detached:
                self.signal_group(signal.SIGTERM)
            selector.unregister(self.connection)
            self.connection.close()

    def reap(self, selector: selectors.BaseSelector) -> None:
        _, status = os.waitpid(self.pid, 0)
        self.exited = True
        print(f"[{time.strftime('%H:%M:%S')}] job {self.pid} exited: "
              f"{os.waitstatus_to_exitcode(status)}", flush=True)
        selector.unregister(self.pidfd)
        os.close(self.pidfd)
        if self.connection.fileno() >= 0:
            with contextlib.suppress(OSError):
                self.connection.sendall(_line({"exit": os.waitstatus_to_exitcode(status)}))
            selector.unregister(self.connection)
            self.connection.close()


def _accept(connection: socket.socket, start_up: _StartUp) -> _RunningJob | None:
    """Read one job request and fork it; None when the request is refused."""
    fds: list[int] = []
    try:
        connection.setblocking(True)
        connection.settimeout(10.0)
        credentials = connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                            struct.calcsize("3i"))
        if struct.unpack("3i", credentials)[1] != os.getuid():
            raise ValueError("the request comes from another user")
        data, fds, flags, _ = socket.recv_fds(connection, 1 << 16, 2)
        if len(fds) != 2 or flags & socket.MSG_CTRUNC:
            raise ValueError("the request must carry the job's stdin and stdout")
        while len(data) < _HEADER.size or len(data) < _HEADER.size + _HEADER.unpack_from(data)[0]:
            more = connection.recv(1 << 16)
            if not more:
                raise ValueError("the request ended early")
            data += more
        request = json.loads(data[_HEADER.size:_HEADER.size + _HEADER.unpack_from(data)[0]])
        connection.settimeout(None)
        _open_tracking_store(request["env"].get("MLFLOW_TRACKING_URI", ""))
        print(f"[{time.strftime('%H:%M:%S')}] job {request['module']} in {request['cwd']}",
              flush=True)
        sys.stderr.flush()
        runner = os.getpid()
        # The pid is sent once the job leads its own process group, so that the engine's first
        # signal to that group (a stop) cannot come before the group exists.
        in_group, grouped = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(in_group)
            _become_job(request, fds, runner, start_up, grouped)
        os.close(grouped)
        try:
            os.read(in_group, 1)  # end of file: the job closed its end after setsid, or died
        finally:
            os.close(in_group)
        job = _RunningJob(pid, connection, bool(request.get("detached")))
        connection.sendall(_line({"pid": pid}))
        return job
    except (OSError, ValueError) as exc:
        with contextlib.suppress(OSError):
            connection.sendall(_line({"error": str(exc)}))
        connection.close()
        return None
    finally:
        for fd in fds:
            os.close(fd)


_opened_stores: set[str] = set()


def _open_tracking_store(uri: str) -> None:
    """Open a job's SQLite tracking store once in the runner, so that the jobs forked after find
    it open: MLflow keeps one store per URI, and opening one checks the database's schema against
    its migrations (a tenth of a second to a second a job, on a busy machine). Only a database
    that exists (the local server creates it before an execution's first step); the store's
    pooled connections are closed before any fork, so that each job opens its own (an SQLite
    connection must not cross a fork). Any failure leaves each job to open the store itself."""
    if not uri.startswith("sqlite:///") or uri in _opened_stores:
        return
    if not Path(uri.removeprefix("sqlite:///")).is_file():
        return
    _opened_stores.add(uri)
    try:
        from mlflow.tracking._tracking_service.utils import _get_store

        _get_store(uri).engine.dispose()
    except Exception as exc:  # noqa: BLE001 (the job opens the store itself, and says why)
        print(f"[{time.strftime('%H:%M:%S')}] tracking store {uri} not opened ahead of jobs: "
              f"{exc}", flush=True)


def _become_job(request: dict, fds: list[int], runner: int, start_up: _StartUp,
                grouped: int) -> NoReturn:
    """In the forked child: become the job's process as a new one would be, run its stage."""
    code = 1
    try:
        signal.set_wakeup_fd(-1)  # the runner's: a signal must not write into a job's file
        os.setsid()
        os.close(grouped)
        if not request.get("detached"):
            _die_with_runner(runner)
        os.dup2(fds[0], 0)
        os.dup2(fds[1], 1)
        os.dup2(fds[1], 2)
        # The runner's socket, pipe, pidfds and other jobs' connections: closed by number. Their
        # Python objects stay referenced by the runner's frames and are never finalised (the
        # child leaves through os._exit), so nothing closes a reused number later.
        for fd in sorted(_open_fds() - {0, 1, 2} - start_up.library_fds):
            with contextlib.suppress(OSError):
                os.close(fd)
        for signum, handler in start_up.signal_handlers.items():
            signal.signal(signum, handler)
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
        os.umask(request["umask"])
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(start_up.environment(request["env"]))
        if not sys.flags.safe_path:
            sys.path[0] = os.getcwd()
        for name in [m for m in sys.modules if m.partition(".")[0] == "pipelines"]:
            del sys.modules[name]  # the engine's modules: a stage's process has none
        import numpy
        import torch

        numpy.random.seed()
        torch.default_generator.seed()  # a new process's is seeded from the OS (torch 2.13)
        sys.argv = [request["module"], *request["arguments"]]
        import runpy

        runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as exc:  # as the interpreter turns SystemExit into a status
        if exc.code is None or isinstance(exc.code, int):
            code = exc.code or 0
        else:
            print(exc.code, file=sys.stderr)
            code = 1
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # Python's exit by SIGINT
        os.kill(os.getpid(), signal.SIGINT)
    except BaseException:  # noqa: BLE001 (the job's uncaught exception: its traceback, status 1)
        import traceback

        traceback.print_exc()
    finally:
        # What the interpreter does at exit: wait for the job's threads, run its atexit
        # handlers, flush. A stage normally leaves before this through contract._exit.
        import atexit
        import threading

        with contextlib.suppress(BaseException):
            threading._shutdown()  # the interpreter's own exit steps, in its order
            atexit._run_exitfuncs()
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code & 0xFF)


def _die_with_runner(runner: int) -> None:
    """Linux sends the job SIGTERM when the runner dies, however it dies."""
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != runner:  # it died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _open_fds() -> set[int]:
    found = set()
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the listing's own descriptor, closed by now
            os.fstat(int(name))
            found.add(int(name))
    return found


def _is_our_socket(path: Path, inode: int) -> bool:
    try:
        return path.stat().st_ino == inode
    except OSError:
        return False


def _close(fd: int) -> None:
    if fd >= 0:
        os.close(fd)


def _line(message: dict) -> bytes:
    return json.dumps(message).encode() + b"\n"


# --- The engine's side ----------------------------------------------------------------------


class Job:
    """A job forked by the runner, read as the engine reads a `subprocess.Popen` job
    (jobs.JobControl): `pid` (the leader of the job's process group), `stdout` (its output, text
    lines), `poll()` and `wait()` (exit status, negative for a signal)."""

    def __init__(self, connection: socket.socket, pending: bytes, pid: int,
                 output: IO[str] | None) -> None:
        self.connection, self._buffer, self.pid, self._output = connection, pending, pid, output
        self.returncode: int | None = None
        self.runner_lost = False  # the runner ended before it reported the job's status
        self._lock = threading.Lock()  # the engine reads the output and polls from two threads
        self.stdout = self._lines() if output is not None else iter(())  # detached: in its log

    def _lines(self) -> Iterator[str]:
        # Read as a text file reads (universal newlines), but never wait on the output alone: a
        # job whose runner died got SIGTERM (PDEATHSIG), yet a process it started may still hold
        # the output open. Its process group goes then, as the engine ends a subprocess job's.
        fd = self._output.fileno()
        decoder = io.IncrementalNewlineDecoder(
            codecs.getincrementaldecoder("utf-8")(errors="replace"), translate=True)
        pending = ""
        with self._output:
            while True:
                if not select.select([fd], [], [], 0.5)[0]:
                    if self.poll() is not None and self.runner_lost:
                        processes.signal_group(self.pid, signal.SIGKILL)
                    continue
                chunk = os.read(fd, 65536)
                pending += decoder.decode(chunk, final=not chunk)
                *complete, pending = pending.split("\n")
                yield from (line + "\n" for line in complete)
                if not chunk:
                    break
        if pending:
            yield pending
        if self.wait() and self.runner_lost:
            yield (f"ERROR: the warm job runner stopped while the job ran, and the job with it; "
                   f"see {log_path()}\n")

    def poll(self) -> int | None:
        return self._read_status(0.0)

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._read_status(0.2 if deadline is None else
                                max(0.0, min(0.2, deadline - time.monotonic()))) is None:
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(f"job {self.pid}", timeout or 0.0)
        assert self.returncode is not None
        return self.returncode

    def _read_status(self, timeout: float) -> int | None:
        """The exit status once the runner has sent it, reading for at most `timeout` seconds."""
        with self._lock:
            if self.returncode is None and b"\n" not in self._buffer:
                try:
                    ready, _, _ = select.select([self.connection], [], [], timeout)
                    data = self.connection.recv(4096) if ready else None
                except OSError:
                    data = b""
                if data == b"":  # the runner died; the job got SIGTERM with it (PDEATHSIG)
                    self.runner_lost, self.returncode = True, -signal.SIGTERM
                elif data:
                    self._buffer += data
            while self.returncode is None and b"\n" in self._buffer:
                line, self._buffer = self._buffer.split(b"\n", 1)
                message = json.loads(line)
                if "exit" in message:
                    self.returncode = int(message["exit"])
            if self.returncode is not None and self.connection.fileno() >= 0:
                self.connection.close()
            return self.returncode


class Runner:
    """The engine's handle on a running warm runner."""

    def __init__(self, pid: int, socket_path: Path, environment: dict[str, str]) -> None:
        self.pid, self.socket_path = pid, socket_path
        self.import_environment = _import_environment(environment)

    def differences(self, env: dict[str, str]) -> list[str]:
        """The variables a job's environment sets otherwise than the runner imported under."""
        job = _import_environment(env)
        return sorted(k for k in set(job) | set(self.import_environment)
                      if job.get(k) != self.import_environment.get(k))

    def start_job(self, module: str, arguments: list[str], env: dict[str, str],
                  cwd: Path, log: IO | None = None) -> Job:
        """Fork `python -m module arguments` in `cwd` with exactly `env`; Unavailable when the
        runner cannot (then nothing was started). With `log` (an open file), the job is detached:
        its output goes there, and it outlives this process and the runner (a local endpoint's
        server)."""
        connection = self._connect()
        read_end, write_end = (-1, os.dup(log.fileno())) if log is not None else os.pipe()
        stdin = os.open(os.devnull, os.O_RDONLY)
        try:
            payload = json.dumps({"module": module, "arguments": list(arguments), "env": env,
                                  "cwd": str(cwd), "umask": _umask(),
                                  "detached": log is not None}).encode()
            data = _HEADER.pack(len(payload)) + payload
            sent = socket.send_fds(connection, [data], [stdin, write_end])
            connection.sendall(data[sent:])
            reply, pending = b"", b""
            while b"\n" not in reply:
                more = connection.recv(4096)
                if not more:
                    raise ValueError("the runner closed the connection")
                reply += more
            reply, pending = reply.split(b"\n", 1)
            answer = json.loads(reply)
        except (OSError, ValueError) as exc:
            connection.close()
            _close(read_end)
            raise Unavailable(f"the warm job runner did not take the job ({exc})") from None
        finally:
            os.close(write_end)  # the job holds the only writer: its end is the pipe's end
            os.close(stdin)
        if "pid" not in answer:
            connection.close()
            _close(read_end)
            raise Unavailable(f"the warm job runner refused the job: {answer.get('error')}")
        # As subprocess.Popen(text=True, errors="replace", bufsize=1) reads a job's output.
        return Job(connection, pending, int(answer["pid"]),
                   open(read_end, errors="replace", buffering=1) if read_end >= 0 else None)

    def _connect(self) -> socket.socket:
        """A connection, waiting while the runner is still importing (a fresh process would
        spend that time importing too)."""
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                connection.connect(str(self.socket_path))
                return connection
            except OSError as exc:
                connection.close()
                if not _is_runner(self.pid):
                    raise Unavailable(f"the warm job runner (pid {self.pid}) is not running; "
                                      f"see {log_path()}") from None
                if (_read_record() or {}).get("pid") != self.pid:  # stopping: it takes no jobs
                    raise Unavailable(f"the warm job runner (pid {self.pid}) was stopped "
                                      "(llm-pipeline server stop, or a newer one replaced "
                                      "it)") from None
                if time.monotonic() > deadline:
                    raise Unavailable(f"the warm job runner did not get ready in "
                                      f"{READY_TIMEOUT_S:.0f} s ({exc}); see {log_path()}") from None
                time.sleep(0.1)


def needs_fresh_process(command: list[str], env: dict[str, str], runner: Runner) -> str:
    """Why the runner cannot fork this job as a fresh process would start; "" when it can."""
    if command[:2] != [sys.executable, "-m"] or len(command) < 3:
        return "its command is not `python -m MODULE` with the runner's Python"
    # A job of several processes (SM_PROCESSES_PER_HOST > 1) is forked too: its stage execs
    # torchrun as soon as it has read its settings (contract.distributed_launch_command), and
    # torchrun starts each process as a fresh interpreter; forked, the job does not first import
    # the ML stack itself for nothing (importing steps.cpt: about 8 CPU s on a busy 2-CPU machine,
    # of the four interpreters' start-up the job paid; the CPT step of the cpt e2e test took 30
    # s against 38 s).
    differing = runner.differences(env)
    if differing:
        return (f"its environment sets {', '.join(differing)} otherwise than the warm job runner "
                "imported its libraries under")
    return ""


class _FreshProcess:
    """A job started as a fresh subprocess although a warm runner was asked for: its output
    starts with the line saying why."""

    def __init__(self, process: subprocess.Popen, why: str) -> None:
        assert process.stdout is not None
        self._process, self.pid = process, process.pid
        self.stdout = itertools.chain([_fresh_line(why)], process.stdout)

    def poll(self) -> int | None:
        return self._process.poll()

    def wait(self, timeout: float | None = None) -> int:
        return self._process.wait(timeout)


def _fresh_line(why: str) -> str:
    return f"runs as a fresh process: {why}\n"


class WarmStart:
    """How the local server starts its jobs with the warm runner (jobs.JobControl.start), and
    `llm-pipeline deploy` a local endpoint's server (pipelines/deploy.py): each forked by the
    runner when it can be, otherwise a fresh subprocess whose log says why first. The runner is
    started with the first job (a server that runs none imports nothing; the first job waits for
    the imports it would have made itself), and again for the jobs after one that found it gone.
    With `job_runner` "subprocess" (the home's server runs its jobs as fresh processes), no runner
    is started, and each job is a fresh process that says so."""

    def __init__(self, job_runner: str = "warm") -> None:
        from pipelines.local import jobs

        self._start_process, self._environment = jobs.start_process, jobs.warm_environment()
        self._lock = threading.Lock()
        self._started = False
        self.runner: Runner | None = None
        self.unavailable = ""  # why there is no runner
        if job_runner == "subprocess":  # none is started: each job runs fresh, saying so
            self._started = True
            self.unavailable = ("the local server runs its jobs as fresh processes (--job-runner "
                                "subprocess)")

    def _current(self) -> tuple[Runner | None, str]:
        with self._lock:
            if not self._started:
                self._started = True
                try:
                    self.runner, self.unavailable = ensure_running(self._environment), ""
                    _log.info("jobs fork from the warm job runner (pid %d, log %s)",
                              self.runner.pid, log_path())
                except Unavailable as exc:
                    self.runner, self.unavailable = None, str(exc)
                    _log.info("jobs run as fresh processes: %s", exc)
            return self.runner, self.unavailable

    def __call__(self, command: list[str], env: dict[str, str], cwd: Path,
                 log: IO[bytes] | None = None) -> Job | _FreshProcess | subprocess.Popen:
        """Start `command` (`python -m MODULE ...`) in `cwd` with exactly `env`. With `log` (an
        open file) the job is detached, as a local endpoint's server is: its output goes to
        `log`, it leads a session of its own, and it outlives this process and the runner (which
        neither waits for it nor counts it as work that keeps the runner)."""
        runner, why = self._current()
        if runner is not None:
            why = needs_fresh_process(command, env, runner)
            if not why:
                try:
                    return runner.start_job(command[2], command[3:], env, cwd, log=log)
                except Unavailable as exc:
                    why = str(exc)
                    with self._lock:
                        if self.runner is runner:  # a new one for the jobs after this one
                            self._started = False
        if log is None:
            return _FreshProcess(self._start_process(command, env, cwd), why)
        log.write(_fresh_line(why).encode())
        log.flush()
        return subprocess.Popen(command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)


def _umask() -> int:
    """This process's umask, which a subprocess job inherits (read, not set: another thread
    may be creating files)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("Umask:"):
            return int(line.split()[1], 8)
    return 0o022


def _import_environment(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if not k.startswith(RUN_TIME_VARIABLES)}


def shared() -> bool:
    """Whether this home's jobs go to a runner that other homes share (LLM_PIPELINE_JOB_RUNNER_HOME)."""
    return bool(os.environ.get(SHARED_VARIABLE))


def folder() -> Path:
    """Where the runner's socket, record, lock and log are: the engine home, or the folder named
    by LLM_PIPELINE_JOB_RUNNER_HOME, whose runner serves every home that names it. A shared
    folder receives the jobs' environments (credentials included): it must be this user's
    alone, as the private socket folder of `_socket_path` must."""
    if not shared():
        from pipelines.local import server

        return server.home()
    return _private_folder(Path(os.environ[SHARED_VARIABLE]).absolute(),
                           f"or unset {SHARED_VARIABLE}")


def _private_folder(path: Path, remedy: str) -> Path:
    """`path`, created for this user alone if missing; Unavailable when others could enter it
    (and so replace the runner's socket with their own, to receive the jobs' environments)."""
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700, parents=True)
    status = os.lstat(path)
    if (not stat.S_ISDIR(status.st_mode) or status.st_uid != os.getuid()
            or status.st_mode & 0o077):
        raise Unavailable(f"{path} is not a private folder of this user's; remove it, {remedy}")
    return path


def _record() -> Path:
    return folder() / "job-runner.json"


def log_path() -> Path:
    return folder() / "job-runner.log"


@contextlib.contextmanager
def _lock() -> Iterator[None]:
    """Held while a runner is started or stopped: one at a time per runner folder, across
    processes."""
    with files.locked(folder() / "job-runner.lock"):
        yield


def _key(environment: dict[str, str]) -> str:
    """What the runner's preloaded state depends on; a different key needs another runner. The
    modules it preloads count apart from this file's text: a test's runner preloads fewer
    (tests/pipelines/test_job_runner.py)."""
    import site

    from containers import images

    installed = sorted(name for folder in site.getsitepackages() if os.path.isdir(folder)
                       for name in os.listdir(folder) if name.endswith(".dist-info"))
    digest = hashlib.sha256()
    for part in (images.code_digest(), Path(__file__).read_bytes(), sys.executable,
                 json.dumps(installed), json.dumps(WARM_IMPORTS),
                 json.dumps(_import_environment(environment), sort_keys=True)):
        digest.update(part if isinstance(part, bytes) else part.encode())
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def _is_runner(pid: int) -> bool:
    """Whether `pid` is a live runner process (not a reused pid)."""
    command = processes.command_line(pid) or []
    # An empty command line: the process is between fork and exec, as right after its start.
    return (command == [b""] or b"pipelines.local.runner" in command) and processes.running(pid)


def _read_record() -> dict | None:
    try:
        return json.loads(_record().read_text())
    except (OSError, ValueError):
        return None


def requested(flag: str | None) -> str | None:
    """The job runner asked for: `--job-runner`, else LLM_PIPELINE_JOB_RUNNER; None when neither
    says (a new local server then uses the warm runner)."""
    choice = flag or os.environ.get(VARIABLE) or None
    if choice is not None and choice not in CHOICES:  # from the variable: argparse checks the flag
        raise UserError(f"{VARIABLE}={choice!r} is not a job runner; use one of "
                        f"{', '.join(CHOICES)}")
    return choice


def _socket_path(home: Path, key: str) -> Path:
    """Where the runner of folder `home` listens: in it, or, where that path is longer than a
    Unix socket's address allows (a deep LLM_PIPELINE_HOME, such as a test's temporary folder),
    in a folder of this user's own under the temporary folder, named after `home`."""
    socket_path = home / f"job-runner-{key}.sock"
    if len(os.fsencode(socket_path)) <= _SOCKET_PATH_MAX:
        return socket_path
    # Another user could have made it first, to receive the jobs' environments: it must be a
    # real folder of ours that nobody else can enter.
    private = _private_folder(Path(tempfile.gettempdir()) / f"llm-pipeline-{os.getuid()}",
                              "or set LLM_PIPELINE_HOME to a shorter folder")
    digest = hashlib.sha256(os.fsencode(home)).hexdigest()[:16]
    socket_path = private / f"{digest}-{key}.sock"
    if len(os.fsencode(socket_path)) > _SOCKET_PATH_MAX:
        raise Unavailable(f"its socket path {socket_path} is longer than the {_SOCKET_PATH_MAX} "
                          "bytes a Unix socket allows; set TMPDIR or LLM_PIPELINE_HOME to a "
                          "shorter folder")
    return socket_path


def ensure_running(environment: dict[str, str]) -> Runner:
    """The runner of this home (or of its shared runner folder) for this code, Python and
    environment, started when there is none (it may still be importing: `Runner.start_job`
    waits for it). Unavailable when it cannot run here."""
    if not sys.platform.startswith("linux") or not hasattr(os, "pidfd_open"):
        raise Unavailable("the warm job runner needs Linux 5.3 or later (fork, pidfd)")
    key = _key(environment)
    runner_folder = folder().absolute()
    socket_path = _socket_path(runner_folder, key)
    with _lock():
        record = _read_record()
        if record and _is_runner(record["pid"]):
            if record["key"] == key:
                return Runner(record["pid"], Path(record["socket"]), environment)
            # Another code version or Python: it stops taking jobs and leaves when its own end.
            os.kill(record["pid"], signal.SIGTERM)
        socket_path.unlink(missing_ok=True)  # left by a runner that was killed
        # Its own empty folder: `python -m` puts the working folder first on sys.path, and the
        # home holds folders (pipelines/) that would shadow the project's packages.
        working = runner_folder / "job-runner"
        working.mkdir(exist_ok=True)
        with open(log_path(), "ab") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "pipelines.local.runner", str(socket_path), *WARM_IMPORTS],
                env=environment, cwd=working, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True)  # outlives this command
        files.write_whole(_record(), json.dumps({"pid": process.pid, "socket": str(socket_path),
                                                 "key": key, "python": sys.executable}))
    return Runner(process.pid, socket_path, environment)


def stop() -> bool:
    """Stop the runner of this home (or of its shared runner folder): it takes no more jobs and
    leaves when its running jobs end."""
    with _lock():
        record = _read_record()
        _record().unlink(missing_ok=True)
        if not record or not _is_runner(record["pid"]):
            return False
        os.kill(record["pid"], signal.SIGTERM)
        return True


if __name__ == "__main__":
    serve(Path(sys.argv[1]), sys.argv[2:])
    # As a stage leaves (steps/common/contract.py): the interpreter's teardown of the ML stack
    # takes seconds, and minutes on a busy machine, with nothing left to close.
    sys.stdout.flush()
    os._exit(0)

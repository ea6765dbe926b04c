"""What the engine knows of the processes it starts and stops, read from Linux's /proc.

The local server, its warm job runner and the local endpoints' servers are processes that outlive
the command that started them; later commands find them again by pid, and a pid is reused once its
process has ended. So a process is known by its pid together with its start time (the kernel's
clock ticks after boot, /proc/PID/stat), and a process that has exited but is not yet reaped (a
zombie: where nothing reaps orphans, as the first process of a container may not) counts as ended.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

_POLL_S = 0.02  # between looks at /proc while waiting for a process to end: a look costs microseconds


@dataclass(frozen=True)
class Stat:
    """What /proc/PID/stat says of one process (proc(5))."""

    comm: str  # the command's name, as the kernel keeps it: any characters, ")" and spaces too
    state: str  # R running, S sleeping, D in I/O, Z exited but not reaped, X dead...
    parent: int
    started: int  # clock ticks after boot: with the pid, it names this process alone
    cpu_s: float  # user and system CPU seconds so far

    @property
    def ended(self) -> bool:
        return self.state in ("Z", "X")


def stat(pid: int) -> Stat | None:
    """Process `pid` as /proc/PID/stat describes it; None when there is no such process (or it
    vanished while being read)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # "PID (COMM) STATE PPID ...": the name may hold ") " itself, so the fields are counted after
    # the last ")".
    head, _, tail = text.rpartition(")")
    fields = tail.split()
    try:
        return Stat(comm=head.partition("(")[2], state=fields[0], parent=int(fields[1]),
                    started=int(fields[19]),  # the 22nd field, starttime
                    cpu_s=(int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"))
    except (IndexError, ValueError):
        return None


def command_line(pid: int) -> list[bytes] | None:
    """Process `pid`'s arguments, program first; [b""] between its fork and its exec; None when
    there is no such process."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None


def running(pid: int, started: int | None = None) -> bool:
    """Whether process `pid` runs (a zombie has ended); with `started`, whether it is still the
    process that started then, not another given the same pid since. Collects `pid`'s exit status
    when it is an ended child of this process, so that none is left a zombie: so not for the pid
    of a subprocess.Popen whose exit status is still wanted (its poll() would find none)."""
    _reap(pid)
    found = stat(pid)
    return found is not None and not found.ended and (started is None or found.started == started)


def wait_ended(pid: int, timeout_s: float, started: int | None = None) -> bool:
    """Wait until process `pid` (started at `started`, when given) no longer runs, for at most
    `timeout_s`; whether it ended."""
    deadline = time.monotonic() + timeout_s
    while running(pid, started):
        if time.monotonic() >= deadline:
            return False
        time.sleep(_POLL_S)
    return True


def terminate(pid: int, grace_s: float, started: int | None = None) -> None:
    """Stop process `pid` (started at `started`, when given) as SageMaker stops a container:
    SIGTERM, then SIGKILL if it still runs after `grace_s`. Nothing when it does not run."""
    if not running(pid, started):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    if not wait_ended(pid, grace_s, started):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        _reap(pid)


def signal_group(pid: int, signum: int) -> None:
    """Send `signum` to the process group `pid` leads (a job: its stage, torchrun and its workers,
    its helpers); nothing when the group is gone."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signum)


def _reap(pid: int) -> None:
    with contextlib.suppress(OSError):  # ChildProcessError: not this process's child
        os.waitpid(pid, os.WNOHANG)

"""How the engine knows its long-lived processes (the local server, the warm job runner, the local
endpoints' servers) by pid and start time, from /proc (pipelines/local/processes.py)."""

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator

from pipelines.local import processes
from tests.pipelines.conftest import child_never_reaped

# A process that names itself as `sys.argv[1]` (its command name in /proc/PID/stat), says so,
# then waits; with `--ignore-sigterm` it does not end on SIGTERM.
NAMED = """
import signal, sys, time
if "--ignore-sigterm" in sys.argv:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
with open("/proc/self/comm", "w") as comm:
    comm.write(sys.argv[1])
print("named", flush=True)
time.sleep(600)
"""


@contextlib.contextmanager
def named_process(name: str, *flags: str) -> Iterator[subprocess.Popen]:
    process = subprocess.Popen([sys.executable, "-c", NAMED, name, *flags],
                               stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline() == "named\n"
        yield process
    finally:
        process.kill()
        process.wait()


def test_a_process_whose_name_holds_a_parenthesis_and_spaces_is_read_field_by_field():
    # Read from the first ")", this name would make the process a zombie (Z) whose parent is 1.
    with named_process("a) Z 1 (b") as process:
        found = processes.stat(process.pid)

        assert found is not None and found.comm == "a) Z 1 (b"
        assert found.state in ("R", "S") and not found.ended
        assert found.parent == os.getpid()
        assert processes.stat(os.getpid()).started <= found.started  # its parent started first
        assert found.cpu_s >= 0.0
        assert processes.running(process.pid) and processes.running(process.pid, found.started)


def test_a_pid_is_known_with_its_start_time_alone_not_after_it_is_reused():
    with named_process("reused") as process:
        started = processes.stat(process.pid).started
        # Another process given the same pid later started later.
        assert not processes.running(process.pid, started + 1)


def test_a_vanished_process_has_no_stat_or_command_line_and_does_not_run():
    with named_process("gone") as process:
        process.kill()
        process.wait()

        assert processes.stat(process.pid) is None
        assert processes.command_line(process.pid) is None
        assert not processes.running(process.pid)
        assert processes.wait_ended(process.pid, timeout_s=0.0)


def test_a_process_that_exited_but_that_its_parent_never_reaps_has_ended():
    with child_never_reaped("true") as pid:
        assert processes.wait_ended(pid, timeout_s=30.0)

        assert processes.stat(pid).state == "Z" and processes.stat(pid).ended
        assert not processes.running(pid)


def test_an_exited_child_of_this_process_has_ended_and_is_reaped():
    with named_process("zombie") as process:
        process.kill()
        while processes.stat(process.pid).state != "Z":  # exited, its status not collected yet
            time.sleep(0.01)

        assert not processes.running(process.pid)
        assert processes.stat(process.pid) is None  # collected: no zombie is left behind


def test_terminate_kills_what_ignores_sigterm_after_the_grace_period():
    with named_process("stubborn", "--ignore-sigterm") as process:
        started = processes.stat(process.pid).started
        assert not processes.wait_ended(process.pid, timeout_s=0.3, started=started)

        begun = time.monotonic()
        processes.terminate(process.pid, grace_s=0.5, started=started)

        assert processes.wait_ended(process.pid, timeout_s=5.0)  # SIGKILL is delivered at once
        assert time.monotonic() - begun >= 0.5


def test_terminate_ends_on_sigterm_and_leaves_another_process_given_the_pid_alone():
    with named_process("polite") as process:
        started = processes.stat(process.pid).started
        processes.terminate(process.pid, grace_s=30.0, started=started + 1)  # another process
        assert processes.running(process.pid)

        begun = time.monotonic()
        processes.terminate(process.pid, grace_s=30.0, started=started)

        assert time.monotonic() - begun < 10.0 and not processes.running(process.pid)

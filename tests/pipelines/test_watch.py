"""What `start --wait` and `run` show of a local step's logs while it runs, and how soon they see
a local execution change."""

import threading
import time

from pipelines.local.executions import META_FILE
from pipelines.watch import Changes, StepLogs


def test_a_steps_log_lines_are_shown_once_whole_and_across_its_attempts(tmp_path):
    logs = StepLogs(tmp_path)
    first = tmp_path / "SFT" / "log.txt"
    first.parent.mkdir()
    first.write_text("cache miss: no earlier run\nstep 1 loss 2.")  # the job is mid-line
    assert logs.new_lines("SFT") == ["cache miss: no earlier run"]

    with open(first, "a") as log:
        log.write("5\nERROR: exit code -9\n")
    for attempt in (2, 10):  # retries write to their own folders, in order
        later = tmp_path / "SFT" / f"attempt-{attempt}" / "log.txt"
        later.parent.mkdir()
        later.write_text(f"attempt {attempt}: restored 3 checkpoint files\n")
    assert logs.new_lines("SFT") == ["step 1 loss 2.5", "ERROR: exit code -9",
                                     "attempt 2: restored 3 checkpoint files",
                                     "attempt 10: restored 3 checkpoint files"]
    assert logs.new_lines("SFT") == []
    assert logs.new_lines("Evaluate") == []  # not started: no log yet


def test_a_remote_execution_has_no_local_logs(tmp_path):
    assert StepLogs(None).new_lines("SFT") == [] and StepLogs(None).files("SFT") == []


def test_the_wait_between_looks_at_a_local_execution_ends_when_the_server_rewrites_a_record(
        tmp_path):
    # The local server replaces an execution's records whole (a step started or ended, the
    # execution ended): `run` sees it then, not at its next poll (half a second later).
    record = tmp_path / META_FILE
    assert record.name in Changes.RECORDS
    record.write_text('{"status": "Executing"}')
    changes = Changes(tmp_path)
    changes.mark()

    def end() -> None:
        partial = tmp_path / ".pipeline-execution.json.partial"
        partial.write_text('{"status": "Succeeded"}')
        partial.replace(record)

    threading.Timer(0.2, end).start()
    started = time.monotonic()
    changes.wait(60)
    assert 0.15 < time.monotonic() - started < 30


def test_with_nothing_changed_the_wait_lasts_its_poll(tmp_path):
    (tmp_path / "execution.json").write_text("{}")
    changes = Changes(tmp_path)
    changes.mark()

    started = time.monotonic()
    changes.wait(0.3)
    assert time.monotonic() - started >= 0.3

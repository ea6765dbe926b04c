"""What `start --wait` and `run` show of a local step's logs while it runs."""

from pipelines.watch import StepLogs


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

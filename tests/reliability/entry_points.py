"""Run one stage entry point exactly as `python -m steps.<stage> ARGS` runs it, with its stdout and
stderr in files of their own, as a job of the session's warm job runner.

    python -m tests.reliability.entry_points CASE_JSON

The warm runner (pipelines/local/runner.py) forks each job from a process that imported torch
and transformers once (a fresh interpreter spends seconds on them), gives it the job's own
environment, and sends its stdout and stderr down one pipe, as a job's log holds them. The
malformed-input tests read stderr alone, so this module, run as the job, first points its stdout
and stderr at the case's two files, then moves into the case's folder, sets argv and runs the
stage module as `python -m` does (`runpy.run_module(name, run_name="__main__")`: the module's own
`if __name__ == "__main__"` entry point, `contract.run`). The job's exit status, an uncaught
exception's traceback (on stderr) included, is the runner's, as for any job.

A case: {"module": "steps.data_prep", "argv": [...], "cwd": "...", "stdout": "path",
         "stderr": "path"}; its environment is the job's.
"""

from __future__ import annotations

import json
import os
import runpy
import sys


def main() -> None:
    case = json.loads(sys.argv[1])
    for fd, path in ((1, case["stdout"]), (2, case["stderr"])):
        handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(handle, fd)
        os.close(handle)
    os.chdir(case["cwd"])
    sys.path[0] = os.getcwd()  # as `python -m` puts the working folder first
    sys.argv = [case["module"], *case["argv"]]
    runpy.run_module(case["module"], run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()

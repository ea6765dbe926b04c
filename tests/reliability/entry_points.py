"""Run many stage entry points, each exactly as `python -m steps.<stage> ARGS` runs it, paying
the imports (torch, transformers: seconds each) once.

    python -m tests.reliability.entry_points < cases.json > results.json

This process imports the stage modules, then forks one child per case. The child sets its
environment, working folder and argv, and runs the module as `python -m` does
(`runpy.run_module(name, run_name="__main__")`: the module's own `if __name__ == "__main__"`
entry point, `contract.run`), with stdout and stderr in files. The parent records each child's
exit status. Cases run one at a time: the machine may have two cores, and other tests.

A case: {"module": "steps.data_prep", "argv": [...], "env": {...}, "cwd": "...",
         "stdout": "path", "stderr": "path"}. The result: the list of exit statuses, in order.
"""

from __future__ import annotations

import importlib
import json
import os
import runpy
import sys


def _child(case: dict) -> None:
    for fd, path in ((1, case["stdout"]), (2, case["stderr"])):
        handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(handle, fd)
        os.close(handle)
    sys.stdout = os.fdopen(1, "w", buffering=1, closefd=False)
    sys.stderr = os.fdopen(2, "w", buffering=1, closefd=False)
    os.environ.update(case.get("env", {}))
    os.chdir(case.get("cwd", os.getcwd()))
    sys.argv = [case["module"], *case["argv"]]
    # Run afresh as __main__, as `python -m` does (runpy warns when the module itself is loaded).
    sys.modules.pop(case["module"], None)
    code = 0
    try:
        runpy.run_module(case["module"], run_name="__main__", alter_sys=True)
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    except BaseException:  # noqa: BLE001 (reported as Python reports an uncaught exception)
        import traceback

        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main() -> None:
    cases = json.load(sys.stdin)
    for module in dict.fromkeys(case["module"] for case in cases):
        importlib.import_module(module)  # its dependencies stay imported in every child
    statuses = []
    for case in cases:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _child(case)
        _, status = os.waitpid(pid, 0)
        statuses.append(os.waitstatus_to_exitcode(status))
    json.dump(statuses, sys.stdout)


if __name__ == "__main__":
    main()

"""Orchestration: what building the definition and running it on the local engine cost beside
the stages' own work.

(a) Definition build: `pipelines.definition.definition_json` for every shipped recipe, in this
    process, offline (no credentials, every AWS endpoint unreachable), as `llm-pipeline
    definition` builds it; the median of the repeats, after a first build in a fresh process that
    also pays the SageMaker SDK's import.
(b) Local-engine overhead: the sft recipe on the builtin tiny model, end to end through the
    command line exactly as a user runs it (`llm-pipeline run --recipe sft -p BaseModel=builtin:tiny
    -p InputData=FILE ...`), each repeat on new data so that every step runs, with each job
    runner in turn, each on a local server (and LLM_PIPELINE_HOME) of its own, started once
    beforehand: `--job-runner subprocess` (a fresh Python process per job, the baseline) and
    `--job-runner warm` (jobs forked from the warm job runner that the local server started
    beside itself), alternating, after a warm-up run of each. Overhead = the command's wall time
    minus the sum of the steps' compute. To tell the two apart, the runs carry timing hooks (a
    `sitecustomize` module on PYTHONPATH, active only where LLM_BENCH_HOOKS is set) that record
    when each process starts (or is forked) and exits and how long named functions of the
    command, the local server (which executes the pipeline) and the stages take: the stage's
    `contract.run` (its `main`), the engine's `run_execution`, each job's input staging, process
    and output upload. The server writes its record when it stops; its calls are matched to each
    command by time. The engine gives jobs none of its environment, so the hooks add their own
    variables to what `job_environment` and `warm_environment` return. Nothing else changes: the
    command, its arguments and the code are the user's.
(c) A fully cached re-run: the same command again, with each job runner; every cached step reuses
    the earlier run and only the never-cached registry comparison runs.

The machine's load (1-minute load average) is recorded beside every run.

    python -m benchmarks.orchestration [--quick]
    python -m benchmarks.orchestration --render   # the section again from the saved figures
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import common

NAME, TITLE, ORDER = "orchestration", "Orchestration", 60
# Targets of a fresh run with the warm job runner (issue 19): its wall time against a fresh
# process per job, its overhead beyond the stages' own work, and a fully cached re-run.
SPEEDUP_TARGET = 0.5  # at most half the wall time of fresh processes
OVERHEAD_TARGET = 0.35  # at most 35% of the wall time
CACHED_TARGET_S = 5.0
JOB_RUNNERS = ("subprocess", "warm")  # llm-pipeline run --job-runner; the first is the baseline
QUICK = {"definition_repeats": 1, "cold_definitions": 1, "fresh_runs": 1, "cached_runs": 1}
FULL = {"definition_repeats": 2, "cold_definitions": 2, "fresh_runs": 3, "cached_runs": 2}
GROUP = "bench-orchestration"

HOOKS = {
    # module -> functions (or Class.method) whose calls the hooks time (a name missing from the
    # module is skipped)
    "timed": {
        "pipelines.cli": ["main"],
        "pipelines.definition": ["cached_definition_json"],
        "pipelines.pipeline": ["_upsert", "_start"],
        "pipelines.watch": ["follow", "summary"],
        "pipelines.local.server": ["use_local_aws"],
        "pipelines.local.engine": ["run_execution"],
        "pipelines.local.jobs": ["run_processing_job", "run_training_job", "download_prefix",
                                 "_run"],
        "steps.common.contract": ["run"],
    },
    # module -> functions returning a job's (or the warm runner's) environment: the hooks' own
    # variables are added to it, so that the jobs' processes carry the hooks too
    "environment": {"pipelines.local.jobs": ["job_environment", "warm_environment"]},
}

SITECUSTOMIZE = '''\
"""Timing hooks of benchmarks/orchestration.py; active only where LLM_BENCH_HOOKS is set."""
import atexit
import json
import os
import sys
import time

_START = time.time()
if os.environ.get("LLM_BENCH_HOOKS"):
    _HOOKS = json.loads(os.environ["LLM_BENCH_HOOKS"])
    # The engine gives a job (and the warm runner) none of its own environment; these functions'
    # results get the hooks' variables added, so that the jobs' processes are timed too.
    _BENCH_ENV = {k: os.environ[k] for k in ("PYTHONPATH", "LLM_BENCH_HOOKS", "LLM_BENCH_TIMINGS")
                  if k in os.environ}
    _CALLS = []

    def _forked():  # a job forked by the warm runner: its process starts here
        global _START
        _START = time.time()
        del _CALLS[:]

    os.register_at_fork(after_in_child=_forked)

    def _timed(qualname, function):
        def timed(*args, **kwargs):
            call = [qualname, time.time(), None]
            _CALLS.append(call)
            try:
                return function(*args, **kwargs)
            finally:
                call[2] = time.time()
        timed.__name__, timed.__doc__ = function.__name__, function.__doc__
        timed.__wrapped__ = function
        return timed

    def _with_bench_environment(function):
        def environment(*args, **kwargs):
            return {**function(*args, **kwargs), **_BENCH_ENV}
        environment.__name__, environment.__doc__ = function.__name__, function.__doc__
        environment.__wrapped__ = function
        return environment

    class _Finder:
        busy = False

        def find_spec(self, name, path=None, target=None):
            if (name not in _HOOKS["timed"] and name not in _HOOKS["environment"]) or self.busy:
                return None
            self.busy = True
            try:
                for finder in sys.meta_path:
                    if finder is not self and hasattr(finder, "find_spec"):
                        spec = finder.find_spec(name, path, target)
                        if spec is not None:
                            break
                else:
                    return None
            finally:
                self.busy = False
            original = spec.loader.exec_module

            def exec_module(module):
                original(module)
                for attr in _HOOKS["timed"].get(name, []):
                    # "function", or "Class.method"
                    owner, _, leaf = attr.rpartition(".")
                    holder = getattr(module, owner, None) if owner else module
                    function = getattr(holder, leaf, None)
                    if callable(function):
                        setattr(holder, leaf, _timed(name + "." + attr, function))
                for attr in _HOOKS["environment"].get(name, []):
                    function = getattr(module, attr, None)
                    if callable(function):
                        setattr(module, attr, _with_bench_environment(function))
                if callable(getattr(module, "_exit", None)):
                    # A stage run as a program leaves through contract._exit (os._exit): no
                    # atexit, no return from run(). Close the open calls and write here.
                    leave = module._exit

                    def _exit(*args, **kwargs):
                        now = time.time()
                        for call in _CALLS:
                            if call[2] is None:
                                call[2] = now
                        _write()
                        leave(*args, **kwargs)
                    module._exit = _exit
            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, _Finder())

    def _write():
        folder = os.environ.get("LLM_BENCH_TIMINGS")  # a job's is the job's environment's
        if not folder:
            return
        for call in _CALLS:  # a call still open when the process leaves ends with it
            if call[2] is None:
                call[2] = time.time()
        main = sys.modules.get("__main__")
        spec = getattr(main, "__spec__", None)
        # CPU seconds of the process (a forked job's count from its fork, as Linux resets them)
        times = os.times()
        record = {"pid": os.getpid(), "cwd": os.getcwd(), "argv": sys.argv,
                  "module": getattr(spec, "name", None), "start": _START, "exit": time.time(),
                  "cpu_s": times.user + times.system, "calls": _CALLS}
        with open(os.path.join(folder, "%d.json" % os.getpid()), "w") as handle:
            json.dump(record, handle)

    atexit.register(_write)
'''


# --- (a) Definition build -------------------------------------------------------------------------


def offline_environment(home: Path) -> dict[str, str]:
    """As tests/pipelines/test_definition.py builds: no AWS settings, endpoints unreachable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update({"LLM_PIPELINE_HOME": str(home), "HF_HUB_OFFLINE": "1",
                "TOKENIZERS_PARALLELISM": "false", "AWS_ENDPOINT_URL": "http://127.0.0.1:9",
                "AWS_DEFAULT_REGION": "us-east-1"})
    return env


def cold_definition() -> None:
    """In a fresh process: import the builder, build sft twice; print the times as JSON."""
    started = time.perf_counter()
    from pipelines import definition, recipe

    imported = time.perf_counter()
    chosen = recipe.load("sft")
    first = definition.definition_json(chosen)
    built = time.perf_counter()
    second = definition.definition_json(chosen)
    again = time.perf_counter()
    print(json.dumps({"import_s": imported - started, "first_build_s": built - imported,
                      "second_build_s": again - built, "same_bytes": first == second}))


def measure_definitions(home: Path, sizes: dict[str, int]) -> dict[str, Any]:
    env = offline_environment(home)
    cold = []
    for i in range(sizes["cold_definitions"]):
        common.progress(f"definition: first build in a fresh process ({i + 1}/"
                        f"{sizes['cold_definitions']})")
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "benchmarks.orchestration",
                               "--cold-definition"], cwd=common.ROOT, check=False,
                              env={**env, "PYTHONPATH": str(common.ROOT)},
                              capture_output=True, text=True)
        wall = time.perf_counter() - started
        if done.returncode != 0:
            raise SystemExit(f"cold definition build failed:\n{done.stderr[-3000:]}")
        cold.append({**json.loads(done.stdout.strip().splitlines()[-1]), "process_wall_s": wall})

    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        from pipelines import definition, recipe

        names = recipe.available()
        builds: dict[str, list[float]] = {name: [] for name in names}
        texts: dict[str, set[str]] = {name: set() for name in names}
        steps: dict[str, int] = {}
        common.progress("definition: first in-process build (SDK import, discarded)")
        definition.definition_json(recipe.load(names[0]))
        for repeat in range(sizes["definition_repeats"]):
            common.progress(f"definition: every recipe, repeat {repeat + 1}/"
                            f"{sizes['definition_repeats']}")
            for name in names[repeat % len(names):] + names[:repeat % len(names)]:
                started = time.perf_counter()
                text = definition.definition_json(recipe.load(name))
                builds[name].append(time.perf_counter() - started)
                texts[name].add(text)
                document = json.loads(text)
                steps[name] = _count_steps(document["Steps"])
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return {"cold": cold, "builds": builds, "steps": steps,
            "same_bytes": {name: len(t) == 1 for name, t in texts.items()}}


def _count_steps(steps: list[dict]) -> int:
    count = 0
    for step in steps:
        count += 1
        arguments = step.get("Arguments", {})
        if step.get("Type") == "Condition":
            count += _count_steps(arguments.get("IfSteps", []))
            count += _count_steps(arguments.get("ElseSteps", []))
    return count


# --- (b), (c) Runs through the command line -------------------------------------------------------


def run_records(variant: int) -> list[dict[str, str]]:
    """The sums of tests/pipelines/test_local_run.py; `variant` shifts them, so that a new
    variant is new data and no step of its run can be a cache hit."""
    return [{"prompt": f"What is {a} + {b + 6 * variant}?",
             "completion": f"{a} + {b + 6 * variant} = {a + b + 6 * variant}."}
            for a in range(6) for b in range(6)]


class Session:
    """`llm-pipeline` commands with the timing hooks, one at a time: for each job runner, an engine
    home whose local server runs its jobs with that runner, started once beforehand as a user's
    first command starts it (the warm one with its job runner beside it)."""

    def __init__(self, root: Path, hooks: dict[str, dict[str, list[str]]] = HOOKS) -> None:
        self.root = root
        self.hooks = root / "hooks"
        self.hooks.mkdir()
        (self.hooks / "sitecustomize.py").write_text(SITECUSTOMIZE)
        # Every process writes its record here (a forked job cannot be given a folder of its
        # own command's); each command takes those written while it ran, one command at a time.
        # The servers write theirs when they stop.
        self.timings = root / "timings"
        self.timings.mkdir()
        self.cli = str(Path(sys.executable).with_name("llm-pipeline"))
        self.base_env = {k: v for k, v in os.environ.items()
                         if not k.startswith(("AWS_", "LLM_PIPELINE_"))}
        self.base_env.update({"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                              "PYTHONPATH": os.pathsep.join(filter(None, [
                                  str(self.hooks), os.environ.get("PYTHONPATH")])),
                              "LLM_BENCH_HOOKS": json.dumps(hooks),
                              "LLM_BENCH_TIMINGS": str(self.timings)})
        self.count = 0
        self.variants = 0

    def home(self, job_runner: str) -> Path:
        return self.root / f"home-{job_runner}"

    def env(self, job_runner: str) -> dict[str, str]:
        return {**self.base_env, "LLM_PIPELINE_HOME": str(self.home(job_runner))}

    def command(self, job_runner: str, *args: str) -> dict[str, Any]:
        self.count += 1
        load_before = os.getloadavg()[0]
        started = time.time()
        done = subprocess.run([self.cli, *args], cwd=self.root, env=self.env(job_runner),
                              capture_output=True, text=True, stdin=subprocess.DEVNULL,
                              check=False)
        ended = time.time()
        if done.returncode != 0:
            sys.stderr.write(done.stdout[-3000:] + done.stderr[-3000:])
            raise SystemExit(f"`llm-pipeline {' '.join(args)}` failed ({done.returncode})")
        taken = self.root / f"timings-{self.count}"
        taken.mkdir()
        records = []
        for path in sorted(self.timings.glob("*.json")):
            records.append(json.loads(path.read_text()))
            path.rename(taken / path.name)
        return {"args": list(args), "started": started, "ended": ended, "wall_s": ended - started,
                "load_before": load_before, "load_after": os.getloadavg()[0],
                "records": records, "stdout": done.stdout}

    def start_server(self, job_runner: str) -> dict[str, Any]:
        result = self.command(job_runner, "server", "start", "--job-runner", job_runner)
        result["server_pid"] = json.loads(
            (self.home(job_runner) / "server.json").read_text())["pid"]
        return result

    def stop_servers(self, servers: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        """Stop each job runner's server; its record of calls (written as it stops)."""
        records = {}
        for job_runner, server in servers.items():
            subprocess.run([self.cli, "server", "stop"], env=self.env(job_runner),
                           capture_output=True, check=False)
            path = self.timings / f"{server['server_pid']}.json"
            deadline = time.monotonic() + 30
            while not path.exists() and time.monotonic() < deadline:
                time.sleep(0.2)
            if not path.exists():
                raise SystemExit(f"the {job_runner} server wrote no timing record; see "
                                 f"{self.home(job_runner) / 'server.log'}")
            records[job_runner] = json.loads(path.read_text())
        return records

    def run(self, job_runner: str, variant: int | None = None,
            parameters: tuple[str, ...] = ()) -> dict[str, Any]:
        """A run of the sft recipe; on new data unless `variant` names an earlier run's;
        `parameters`: more pipeline parameters, as `Name=Value`."""
        if variant is None:
            variant, self.variants = self.variants, self.variants + 1
        data = common.write_jsonl(self.root / f"data-{variant}" / "sums.jsonl",
                                  run_records(variant))
        home = self.home(job_runner)
        cached_definition = any((home / "definitions").glob("*.json"))
        result = self.command(job_runner, "run", "--recipe", "sft", "--job-runner", job_runner,
                              "-p", "BaseModel=builtin:tiny", "-p", f"InputData={data}",
                              "-p", f"ModelPackageGroup={GROUP}", "-p", "LearningRate=0.005",
                              *(a for parameter in parameters for a in ("-p", parameter)))
        forked = "jobs fork from the warm job runner" in (home / "server.log").read_text()
        fresh_processes = [line for line in result["stdout"].splitlines()
                           if "runs as a fresh process:" in line]
        if forked != (job_runner == "warm") or (job_runner == "warm" and fresh_processes):
            logs = "".join(f"\n--- {path.name}:\n" + path.read_text()[-3000:]
                           for path in (home / "server.log", home / "job-runner.log")
                           if path.exists())
            raise SystemExit(f"the {job_runner} run did not start its jobs as asked: "
                             + (fresh_processes or ["see the logs"])[0] + logs)
        executions = sorted((home / "executions" / "llm-sft").iterdir(),
                            key=lambda p: (p / "execution.json").stat().st_mtime)
        result.update(job_runner=job_runner, variant=variant,
                      definition_cached=cached_definition)
        result["execution"] = json.loads((executions[-1] / "execution.json").read_text())
        return result


def calls(record: dict[str, Any], name: str) -> list[tuple[float, float]]:
    return [(start, end) for qualname, start, end in record["calls"] if qualname == name]


def breakdown(result: dict[str, Any], server: dict[str, Any]) -> dict[str, Any]:
    """Split the command's wall time into parts that add up to it, from the hooks' records: the
    command's, its jobs', and the calls its local server (`server`) made while it ran."""
    records = result["records"]
    command = next((r for r in records if calls(r, "pipelines.cli.main")), None)
    if command is None:
        raise SystemExit("the timing hooks saw no call of pipelines.cli.main; has it moved?")
    # One record of the command's calls and the server's calls made during the command.
    cli = {**command, "calls": command["calls"] + [
        call for call in server["calls"] if result["started"] <= call[1] <= result["ended"]]}
    stages = [r for r in records if calls(r, "steps.common.contract.run")]

    def total(name: str) -> float:
        return sum(end - start for start, end in calls(cli, name))

    def one(name: str) -> tuple[float, float]:
        found = calls(cli, name)
        if not found:
            raise SystemExit(f"the timing hooks saw no call of {name}; has it moved? (HOOKS)")
        return found[0]

    main_start, _main_end = one("pipelines.cli.main")
    execution_start, execution_end = one("pipelines.local.engine.run_execution")
    # The summary after the execution ended: the command's report.
    server, definition, report = (total("pipelines.local.server.use_local_aws"),
                                  total("pipelines.definition.cached_definition_json"),
                                  total("pipelines.watch.summary"))
    job_calls = sorted(calls(cli, "pipelines.local.jobs.run_processing_job")
                       + calls(cli, "pipelines.local.jobs.run_training_job"))
    runs = sorted(calls(cli, "pipelines.local.jobs._run"))
    staging = total("pipelines.local.jobs.download_prefix")

    origin = result["started"]
    # (part, start, end) in seconds from the command's start, for the timeline plot
    segments: list[tuple[str, float, float]] = [("cli_start", 0.0, main_start - origin)]
    for key, name in (("server", "pipelines.local.server.use_local_aws"),
                      ("definition", "pipelines.definition.cached_definition_json"),
                      ("staging", "pipelines.local.jobs.download_prefix"),
                      ("report", "pipelines.watch.summary")):
        segments += [(key, start - origin, end - origin) for start, end in calls(cli, name)]
    jobs: list[dict[str, Any]] = []
    for job_start, job_end in job_calls:
        run = next(((s, e) for s, e in runs if job_start <= s and e <= job_end), None)
        process = next((r for r in stages if run and run[0] <= r["start"] <= run[1]), None)
        entry: dict[str, Any] = {"step": "?", "job_s": job_end - job_start}
        if process is not None:
            entry["step"] = Path(process["cwd"]).name
            entry["module"] = process["module"]
            main = calls(process, "steps.common.contract.run")[0]
            entry.update({
                "spawn_s": process["start"] - run[0],
                "imports_s": main[0] - process["start"],
                "main_s": main[1] - main[0],
                # after main: the other atexit handlers (the hooks' own runs last), then the
                # interpreter's teardown until the engine has read the last line and reaped it
                "exit_handlers_s": process["exit"] - main[1],
                "teardown_s": run[1] - process["exit"],
                "exit_s": run[1] - main[1],
                "process_s": run[1] - run[0],
            })
            segments += [(key, start - origin, end - origin) for key, start, end in (
                ("spawn", run[0], process["start"]), ("imports", process["start"], main[0]),
                ("compute", main[0], main[1]), ("exit_handlers", main[1], process["exit"]),
                ("teardown", process["exit"], run[1]), ("outputs", run[1], job_end))]
        downloads = [(s, e) for s, e in calls(cli, "pipelines.local.jobs.download_prefix")
                     if job_start <= s <= job_end]
        entry["staging_s"] = sum(e - s for s, e in downloads)
        entry["outputs_s"] = entry["job_s"] - entry["staging_s"] - entry.get("process_s", 0.0)
        jobs.append(entry)

    compute = sum(j.get("main_s", 0.0) for j in jobs)
    processes = sum(j.get("process_s", 0.0) for j in jobs)
    wall = result["wall_s"]
    parts = {
        "cli_start": main_start - result["started"],
        "server": server,
        "definition": definition,
        "setup": execution_start - main_start - server - definition,
        "staging": staging,
        "spawn": sum(j.get("spawn_s", 0.0) for j in jobs),
        "imports": sum(j.get("imports_s", 0.0) for j in jobs),
        "compute": compute,
        "exit_handlers": sum(j.get("exit_handlers_s", 0.0) for j in jobs),
        "teardown": sum(j.get("teardown_s", 0.0) for j in jobs),
        "outputs": sum(j["outputs_s"] for j in jobs),
        "engine": (execution_end - execution_start) - sum(j["job_s"] for j in jobs),
        "report": report,
        "cli_end": result["ended"] - execution_end - report,
    }
    return {"wall_s": wall, "parts": parts, "jobs": jobs, "compute_s": compute,
            "processes_s": processes, "overhead_s": wall - compute,
            "overhead_fraction": (wall - compute) / wall,
            "overhead_beyond_processes_s": wall - processes,
            "overhead_beyond_processes_fraction": (wall - processes) / wall,
            "execution_wall_s": execution_end - execution_start,
            "segments": segments}


PARTS = [
    ("cli_start", "command start: Python, imports of the CLI"),
    ("server", "reaching the local server (already running)"),
    ("definition", "the definition (built, or read from the definition cache)"),
    ("setup", "other setup: boto3, data checks, upsert, data upload, StartPipelineExecution"),
    ("staging", "jobs: staging inputs from S3 into the job folder"),
    ("spawn", "jobs: starting the job's process (a new Python, or a fork of the warm runner)"),
    ("imports", "jobs: the stage module's imports (in a fork, what the runner has not imported)"),
    ("compute", "**jobs: the stage's `main` (step compute)**"),
    ("exit_handlers", "jobs: after `main`, the process's exit handlers (atexit)"),
    ("teardown", "jobs: interpreter teardown until the process is reaped"),
    ("outputs", "jobs: packing and uploading outputs to S3"),
    ("engine", "engine between jobs: cache lookups, validation, conditions, registration"),
    ("report", "the final report"),
    ("cli_end", "the command seeing the end (the server's records change), its exit"),
]


def measure_runs(root: Path, sizes: dict[str, int]) -> dict[str, Any]:
    session = Session(root)
    runs: dict[str, dict[str, list]] = {name: {"warmup": [], "fresh": [], "cached": []}
                                        for name in JOB_RUNNERS}
    uptime = [_uptime()]
    servers: dict[str, dict[str, Any]] = {}
    try:
        for job_runner in JOB_RUNNERS:
            common.progress(f"starting the local server, --job-runner {job_runner}")
            servers[job_runner] = session.start_server(job_runner)
        for job_runner in JOB_RUNNERS:
            common.progress(f"warm-up run, --job-runner {job_runner}")
            runs[job_runner]["warmup"].append(session.run(job_runner))
        for i in range(sizes["fresh_runs"]):
            for job_runner in JOB_RUNNERS:  # alternating: the machine's load drifts
                common.progress(f"fresh run {i + 1}/{sizes['fresh_runs']}, --job-runner "
                                f"{job_runner} (new data: every step runs)")
                runs[job_runner]["fresh"].append(session.run(job_runner))
        for i in range(sizes["cached_runs"]):
            for job_runner in JOB_RUNNERS:
                common.progress(f"cached re-run {i + 1}/{sizes['cached_runs']}, --job-runner "
                                f"{job_runner} (its last fresh run's data)")
                runs[job_runner]["cached"].append(
                    session.run(job_runner, runs[job_runner]["fresh"][-1]["variant"]))
    finally:
        server_records = session.stop_servers(servers)
    uptime.append(_uptime())
    for job_runner, kinds in runs.items():
        for result in (r for results in kinds.values() for r in results):
            result["breakdown"] = breakdown(result, server_records[job_runner])
            result["breakdown"]["definition_cached"] = result.pop("definition_cached")
            result["steps"] = {name: {"status": s["status"], "cache": s["cache"],
                                      "seconds": (s["ended"] - s["started"]) if s["ended"]
                                      else None}
                               for name, s in result["execution"]["steps"].items()}
            for key in ("records", "execution"):
                result.pop(key)
            result["stdout_tail"] = result.pop("stdout")[-1500:]
    return {"server_start_s": {j: servers[j]["wall_s"] for j in JOB_RUNNERS}, "uptime": uptime,
            "runs": runs}


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


# --- The section ----------------------------------------------------------------------------------


def median_parts(results: list[dict[str, Any]]) -> dict[str, float]:
    return {key: common.median([r["breakdown"]["parts"][key] for r in results]) for key, _ in PARTS}


def median_run(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The run whose wall time is the median (the lower middle one of an even count)."""
    ordered = sorted(results, key=lambda r: r["wall_s"])
    return ordered[(len(ordered) - 1) // 2]


def plot(measured: dict[str, Any]) -> str:
    """Timelines of the median fresh run and the median cached re-run of each job runner; the
    fresh runs share one scale, the cached ones another."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    colours = dict(zip([key for key, _ in PARTS], plt.get_cmap("tab20").colors))
    names = dict(PARTS)
    runs = measured["runs"]
    rows = [(f"{kind}, {job_runner}", median_run(runs[job_runner][kind]))
            for kind in ("fresh", "cached") for job_runner in JOB_RUNNERS]
    fig, axes = plt.subplots(len(rows), 1, figsize=(12.5, 1.3 * len(rows) + 0.8))
    seen: set[str] = set()
    for ax, (label, result) in zip(axes, rows):
        wall = result["breakdown"]["wall_s"]
        ax.barh(0, wall, color="#eeeeee", edgecolor="grey")  # the rest: setup, engine, exit
        for key, start, end in result["breakdown"]["segments"]:
            if end > start:
                ax.barh(0, end - start, left=start, color=colours[key],
                        edgecolor="black" if key == "compute" else None, linewidth=0.5)
                seen.add(key)
        ax.set_yticks([0], [f"{label}\n{wall:.1f} s"])
    for kind, pair in (("fresh", axes[:len(JOB_RUNNERS)]), ("cached", axes[len(JOB_RUNNERS):])):
        longest = max(median_run(runs[j][kind])["breakdown"]["wall_s"] for j in JOB_RUNNERS)
        for ax in pair:
            ax.set_xlim(0, longest * 1.01)
    axes[-1].set_xlabel("seconds from the command's start")
    handles = [Patch(color=colours[k], label=names[k].replace("*", "").replace("`", ""))
               for k, _ in PARTS if k in seen]
    handles.append(Patch(facecolor="#eeeeee", edgecolor="grey",
                         label="the rest: setup, engine between jobs, command exit"))
    fig.legend(handles=handles, fontsize=7, loc="center left", bbox_to_anchor=(0.62, 0.5))
    fig.suptitle("llm-pipeline run --recipe sft (builtin:tiny), each job runner: where the time "
                 "goes", fontsize=10)
    return common.save_figure(fig, NAME, rect=(0, 0, 0.62, 1))


def _plain(name: str) -> str:
    return name.replace("*", "").replace("`", "")


def render(definitions: dict[str, Any], measured: dict[str, Any], sizes: dict[str, int],
           quick: bool) -> str:
    cold = definitions["cold"]
    medians = {name: common.median(times) for name, times in definitions["builds"].items()}
    runs = measured["runs"]
    base, warm = JOB_RUNNERS
    lines = [
        ("**What is measured.** (a) Building each shipped recipe's definition JSON with "
        "`pipelines.definition.definition_json`, offline (no credentials; every AWS endpoint "
        "unreachable), in this process after one discarded build, the median of "
        f"{sizes['definition_repeats']} build(s) per recipe, the recipes interleaved; and the "
        f"first build in a fresh process ({len(cold)} process(es)), which also imports the "
        "SageMaker SDK, as each `llm-pipeline definition` does. (b) `llm-pipeline run --recipe "
        "sft --job-runner R -p BaseModel=builtin:tiny -p InputData=FILE -p ModelPackageGroup=... "
        "-p LearningRate=0.005` (the arguments of tests/pipelines/test_local_run.py) run as a "
        "subprocess, stdout not a terminal (plain progress lines), with each job runner R on a "
        "LLM_PIPELINE_HOME and local server of its own (the server executes the pipeline; the "
        f"command upserts, starts and follows it): `{base}` (a fresh Python process per job, the "
        f"baseline) and `{warm}` (jobs forked from the warm job runner that the server started "
        "beside itself, pipelines/local/runner.py). Each server is started once beforehand "
        f"(`server start`: {measured['server_start_s'][base]:.1f} s and "
        f"{measured['server_start_s'][warm]:.1f} s; the warm one starts its runner with the "
        "warm-up run's first job). "
        f"After one warm-up run with each, {sizes['fresh_runs']} run(s) with each on new data so that no "
        "step is a cache hit, the two alternating. Timing hooks on PYTHONPATH (a "
        "`sitecustomize`, active only in these runs) record when every process starts (or is "
        "forked) and exits and how long the command's and the engine's functions and each "
        "stage's `contract.run` (which calls its `main`) take. **Step compute** is the time "
        "inside the stages' `main`: the work a step exists to do (reading data, loading models, "
        "training, evaluating, writing outputs); everything else is overhead, the job's process "
        "start and imports included, though a SageMaker container pays those too. (c) The same "
        f"command again on each runner's last data, {sizes['cached_runs']} time(s) each: every "
        "cached step is reused."),
        "",
        "| recipe | steps | build (median, min–max, ms) | same bytes every build |",
        "|---|---|---|---|",
    ]
    for name, times in definitions["builds"].items():
        lines.append(f"| {name} | {definitions['steps'][name]} | "
                     f"{common.spread([1000 * t for t in times])} | "
                     f"{'yes' if definitions['same_bytes'][name] else '**no**'} |")
    slowest = max(medians, key=medians.get)
    lines += [
        "",
        (f"**Definition build.** In a process that has built one already, a recipe's definition "
        f"takes {1000 * min(medians.values()):,.0f}–{1000 * max(medians.values()):,.0f} ms "
        f"(slowest: {slowest}, {definitions['steps'][slowest]} steps). The first build in a "
        f"fresh process takes {common.median([c['first_build_s'] for c in cold]):.1f} s "
        f"(importing `pipelines.definition`: {common.median([c['import_s'] for c in cold]):.2f} s; "
        f"the whole process: {common.median([c['process_wall_s'] for c in cold]):.1f} s) against "
        f"{1000 * common.median([c['second_build_s'] for c in cold]):,.0f} ms for a second build "
        "in that process: the first build's extra "
        f"{common.median([c['first_build_s'] - c['second_build_s'] for c in cold]):.1f} s is the "
        "SageMaker SDK's import and set-up, paid once per process. `llm-pipeline run` keeps the "
        "built text under $LLM_PIPELINE_HOME/definitions, so only the first run after a change "
        "of the recipe or the builder pays it."),
    ]

    parts = {(j, kind): median_parts(runs[j][kind]) for j in JOB_RUNNERS
             for kind in ("fresh", "cached")}
    walls = {(j, kind): common.median([r["wall_s"] for r in runs[j][kind]]) for j in JOB_RUNNERS
             for kind in ("fresh", "cached")}
    columns = [(j, kind) for kind in ("fresh", "cached") for j in JOB_RUNNERS]
    lines += ["", "| where the command's wall time goes (median of each part, s and % of the "
              "median wall time) | " + " | ".join(f"{kind}, {j}" for j, kind in columns) + " |",
              "|---" * (len(columns) + 1) + "|"]
    for key, name in PARTS:
        lines.append(f"| {name} | " + " | ".join(
            f"{parts[c][key]:.2f} ({100 * parts[c][key] / walls[c]:.0f}%)" for c in columns) + " |")
    lines.append("| **wall time (median)** | " + " | ".join(f"**{walls[c]:.2f}**"
                                                            for c in columns) + " |")

    lines += ["", ("| run | job runner | definition | wall (s) | Σ step compute (s) | overhead "
              "(s, % of wall) | Σ job processes (s) | overhead beyond job processes (s, %) | "
              "load before → after |"),
              "|---|---|---|---|---|---|---|---|---|"]
    for kind in ("warmup", "fresh", "cached"):
        for j in JOB_RUNNERS:
            for i, result in enumerate(runs[j][kind], 1):
                b = result["breakdown"]
                lines.append(
                    f"| {kind} {i} | {j} | {'cached' if b['definition_cached'] else 'built'} | "
                    f"{b['wall_s']:.1f} | {b['compute_s']:.1f} | {b['overhead_s']:.1f} "
                    f"({100 * b['overhead_fraction']:.1f}%) | {b['processes_s']:.1f} | "
                    f"{b['overhead_beyond_processes_s']:.1f} "
                    f"({100 * b['overhead_beyond_processes_fraction']:.1f}%) | "
                    f"{result['load_before']:.1f} → {result['load_after']:.1f} |")

    lines += ["", ("Per job of the median fresh run of each job runner (process start + imports: "
                   "from the engine's request to the stage's `main`):"), "",
              ("| step | job runner | staging inputs (s) | process start + imports (s) | stage "
               "`main` (s) | exit (s) | outputs (s) | job (s) |"),
              "|---|---|---|---|---|---|---|---|"]
    for j in JOB_RUNNERS:
        for job in median_run(runs[j]["fresh"])["breakdown"]["jobs"]:
            lines.append(
                f"| {job['step']} | {j} | {job['staging_s']:.2f} | "
                f"{job.get('spawn_s', 0) + job.get('imports_s', 0):.2f} | "
                f"{job.get('main_s', 0):.2f} | {job.get('exit_s', 0):.2f} | "
                f"{job['outputs_s']:.2f} | {job['job_s']:.2f} |")

    fresh_ratio = walls[(warm, "fresh")] / walls[(base, "fresh")]
    overhead = {j: common.median([r["breakdown"]["overhead_fraction"] for r in runs[j]["fresh"]])
                for j in JOB_RUNNERS}
    ratios = [w["wall_s"] / b["wall_s"] for w, b in zip(runs[warm]["fresh"], runs[base]["fresh"])]
    met = fresh_ratio <= SPEEDUP_TARGET
    text = (f"**Fresh run with the warm job runner: target at most {SPEEDUP_TARGET:g}× the wall "
            f"time of a fresh process per job — {'met' if met else 'missed'}** "
            f"({fresh_ratio:.2f}×: {walls[(warm, 'fresh')]:.1f} s against "
            f"{walls[(base, 'fresh')]:.1f} s, medians of {len(runs[warm]['fresh'])}; run by run, "
            f"alternating: {', '.join(f'{r:.2f}×' for r in ratios)}). Per job, process start and "
            f"imports took {parts[(warm, 'fresh')]['spawn'] + parts[(warm, 'fresh')]['imports']:.1f}"
            f" s in all with the runner against "
            f"{parts[(base, 'fresh')]['spawn'] + parts[(base, 'fresh')]['imports']:.1f} s; the "
            f"stages' own work, {parts[(warm, 'fresh')]['compute']:.1f} s against "
            f"{parts[(base, 'fresh')]['compute']:.1f} s.")
    if not met:
        removable = parts[(base, "fresh")]["spawn"] + parts[(base, "fresh")]["imports"]
        text += (" What the runner saves is the fresh processes' start and imports (and the "
                 "imports of preloaded libraries a stage's `main` makes): "
                 f"{removable:.1f} s, {100 * removable / walls[(base, 'fresh')]:.0f}% of their "
                 "median wall time here. The rest is the stages' own work, which this load "
                 "stretches most (training on two threads of an oversubscribed CPU).")
    lines += ["", text]

    met = overhead[warm] <= OVERHEAD_TARGET
    ranked = sorted(((parts[(warm, 'fresh')][k], n) for k, n in PARTS if k != "compute"),
                    reverse=True)
    top = "; ".join(f"{_plain(n)} {v:.1f} s" for v, n in ranked[:3])
    lines += ["", (f"**Overhead with the warm job runner: target at most "
                   f"{100 * OVERHEAD_TARGET:.0f}% of the wall time — {'met' if met else 'missed'}"
                   f"** ({100 * overhead[warm]:.1f}%, median of {len(runs[warm]['fresh'])}; "
                   f"with a fresh process per job: {100 * overhead[base]:.1f}%). Overhead is the "
                   "wall time minus the sum of the stages' `main`. Its largest parts with the "
                   f"runner: {top}.")]

    cached = {j: walls[(j, "cached")] for j in JOB_RUNNERS}
    met = cached[warm] <= CACHED_TARGET_S
    steps = runs[warm]["cached"][0]["steps"]
    hits = [n for n, s in steps.items() if s["cache"].startswith("hit")]
    ran = [n for n, s in steps.items() if s["status"] == "Succeeded" and n not in hits]
    ranked = sorted(((parts[(warm, 'cached')][k], n) for k, n in PARTS), reverse=True)
    top = "; ".join(f"{_plain(n)} {v:.1f} s" for v, n in ranked[:3])
    lines += ["", (f"**Fully cached re-run with the warm job runner: target at most "
                   f"{CACHED_TARGET_S:g} s — {'met' if met else 'missed'}** ({cached[warm]:.1f} s, "
                   f"median of {len(runs[warm]['cached'])}; with a fresh process per job: "
                   f"{cached[base]:.1f} s). Cache hits: {', '.join(hits) or 'none'}; run: "
                   f"{', '.join(ran) or 'none'} (the registry comparison is never cached, its "
                   f"answer depends on the registry's state). Largest parts: {top}.")]

    loads = [x for j in JOB_RUNNERS for kind in ("fresh", "cached") for r in runs[j][kind]
             for x in (r["load_before"], r["load_after"])]
    lines += ["", (f"**Machine load.** The 1-minute load average on this {os.cpu_count()}-CPU "
                   f"machine, before and after each measured run: median {common.median(loads):.1f}"
                   f" ({min(loads):.1f}–{max(loads):.1f}); `uptime` at the start: "
                   f"`{measured['uptime'][0]}`, at the end: `{measured['uptime'][-1]}`. Other "
                   "work on the machine slows both job runners alike within a pair of runs; the "
                   "ratios above compare runs made side by side, the absolute times are inflated "
                   "by that load.")]
    if quick:
        lines += ["", ("_Quick mode: one run of each kind on a shared, busy machine; the figures "
                  "show that the benchmark works, not what the engine costs._")]
    return "\n".join(lines)


def rerender() -> None:
    """The section again from results/orchestration.json's figures (after a change to its text)."""
    saved = json.loads((common.RESULTS_DIR / f"{NAME}.json").read_text())
    data = saved["data"]
    common.save_result(NAME, saved["title"],
                       render(data["definitions"], data["runs"], data["sizes"], data["quick"]),
                       data, saved["order"], [plot(data["runs"])],
                       environment=saved["environment"], command=saved["command"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one run of each kind")
    parser.add_argument("--render", action="store_true",
                        help="re-render results/orchestration.json from its saved figures")
    parser.add_argument("--cold-definition", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.cold_definition:
        cold_definition()
        return
    if args.render:
        rerender()
        return
    sizes = QUICK if args.quick else FULL
    with tempfile.TemporaryDirectory(prefix="bench-orchestration-") as tmp:
        root = Path(tmp)
        definitions = measure_definitions(root / "definition-home", sizes)
        runs = measure_runs(root, sizes)
    common.save_result(NAME, TITLE, render(definitions, runs, sizes, args.quick),
                       {"quick": args.quick, "sizes": sizes, "definitions": definitions,
                        "runs": runs, "speedup_target": SPEEDUP_TARGET,
                        "overhead_target": OVERHEAD_TARGET, "cached_target_s": CACHED_TARGET_S},
                       ORDER, [plot(runs)])


if __name__ == "__main__":
    main()

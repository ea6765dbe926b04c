"""Orchestration: what building the definition and running it on the local engine cost beside
the stages' own work.

(a) Definition build: `pipelines.definition.definition_json` for every shipped recipe, in this
    process, offline (no credentials, every AWS endpoint unreachable), as `llm-pipeline
    definition` builds it; the median of the repeats, after a first build in a fresh process that
    also pays the SageMaker SDK's import.
(b) Local-engine overhead: the sft recipe on the builtin tiny model, end to end through the
    command line exactly as a user runs it (`llm-pipeline run --recipe sft -p BaseModel=builtin:tiny
    -p InputData=FILE ...`, with its own LLM_PIPELINE_HOME), each repeat on new data so that every
    step runs. Overhead = the command's wall time minus the sum of the steps' compute. To tell the
    two apart, the runs carry timing hooks (a `sitecustomize` module on PYTHONPATH, active only
    where LLM_BENCH_TIMINGS is set) that record when each process starts and exits and how long
    named functions of the command, the local server and the stages take: the stage's
    `contract.run` (its `main`), the engine's `run_execution` (in the local server, which executes
    the pipeline), each job's input staging, subprocess and output upload. Nothing else changes:
    the command, its arguments and the code are the user's.
(c) A fully cached re-run: the same command again; every cached step reuses the earlier run and
    only the never-cached registry comparison runs.

    python -m benchmarks.orchestration [--quick]
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
OVERHEAD_TARGET = 0.05  # at most 5% of the wall time
CACHED_TARGET_S = 10.0
QUICK = {"definition_repeats": 1, "cold_definitions": 1, "fresh_runs": 1, "cached_runs": 1}
FULL = {"definition_repeats": 2, "cold_definitions": 2, "fresh_runs": 2, "cached_runs": 2}
GROUP = "bench-orchestration"

# module -> functions whose calls the hooks time (a name missing from the module is skipped).
HOOKS = {
    "pipelines.cli": ["main", "_build_cached", "_upsert", "_start"],
    "pipelines.watch": ["follow", "summary"],
    "pipelines.local.server": ["use_local_aws"],
    "pipelines.local.engine": ["run_execution"],
    "pipelines.local.jobs": ["run_processing_job", "run_training_job", "download_prefix", "_run"],
    "steps.common.contract": ["run"],
}

SITECUSTOMIZE = '''\
"""Timing hooks of benchmarks/orchestration.py; active only where LLM_BENCH_TIMINGS is set."""
import atexit
import json
import os
import sys
import time

_START = time.time()
_DIR = os.environ.get("LLM_BENCH_TIMINGS")
if _DIR:
    _HOOKS = json.loads(os.environ.get("LLM_BENCH_HOOKS", "{}"))
    _CALLS = []

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

    class _Finder:
        busy = False

        def find_spec(self, name, path=None, target=None):
            if name not in _HOOKS or self.busy:
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
                for attr in _HOOKS[name]:
                    function = getattr(module, attr, None)
                    if callable(function):
                        setattr(module, attr, _timed(name + "." + attr, function))
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
        for call in _CALLS:  # a call still open when the process leaves ends with it
            if call[2] is None:
                call[2] = time.time()
        main = sys.modules.get("__main__")
        spec = getattr(main, "__spec__", None)
        record = {"pid": os.getpid(), "cwd": os.getcwd(), "argv": sys.argv,
                  "module": getattr(spec, "name", None), "start": _START, "exit": time.time(),
                  "calls": _CALLS}
        with open(os.path.join(_DIR, "%d.json" % os.getpid()), "w") as handle:
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


class Runner:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.hooks = root / "hooks"
        self.hooks.mkdir()
        (self.hooks / "sitecustomize.py").write_text(SITECUSTOMIZE)
        self.home = root / "home"
        self.cli = str(Path(sys.executable).with_name("llm-pipeline"))
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        self.env.update({"LLM_PIPELINE_HOME": str(self.home), "HF_HUB_OFFLINE": "1",
                         "TOKENIZERS_PARALLELISM": "false",
                         "PYTHONPATH": os.pathsep.join(filter(None, [
                             str(self.hooks), os.environ.get("PYTHONPATH")])),
                         "LLM_BENCH_HOOKS": json.dumps(HOOKS)})
        self.count = 0

    def command(self, *args: str, timed: bool = True) -> dict[str, Any]:
        self.count += 1
        timings = self.root / f"timings-{self.count}"
        timings.mkdir()
        env = dict(self.env)
        if timed:
            env["LLM_BENCH_TIMINGS"] = str(timings)
        started = time.time()
        done = subprocess.run([self.cli, *args], cwd=self.root, env=env, capture_output=True,
                              text=True, stdin=subprocess.DEVNULL, check=False)
        ended = time.time()
        if done.returncode != 0:
            sys.stderr.write(done.stdout[-3000:] + done.stderr[-3000:])
            raise SystemExit(f"`llm-pipeline {' '.join(args)}` failed ({done.returncode})")
        records = [json.loads(p.read_text()) for p in sorted(timings.glob("*.json"))]
        return {"args": list(args), "started": started, "ended": ended, "wall_s": ended - started,
                "records": records, "stdout": done.stdout}

    def run(self, variant: int) -> dict[str, Any]:
        data = common.write_jsonl(self.root / f"data-{variant}" / "sums.jsonl",
                                  run_records(variant))
        cached_definition = any((self.home / "definitions").glob("*.json"))
        result = self.command("run", "--recipe", "sft", "-p", "BaseModel=builtin:tiny",
                              "-p", f"InputData={data}", "-p", f"ModelPackageGroup={GROUP}",
                              "-p", "LearningRate=0.005")
        executions = sorted((self.home / "executions" / "llm-sft").iterdir(),
                            key=lambda p: (p / "execution.json").stat().st_mtime)
        result["execution"] = json.loads((executions[-1] / "execution.json").read_text())
        result["definition_cached"] = cached_definition
        return result


def _calls(record: dict[str, Any], name: str) -> list[tuple[float, float]]:
    return [(start, end) for qualname, start, end in record["calls"] if qualname == name]


def breakdown(result: dict[str, Any], server: dict[str, Any]) -> dict[str, Any]:
    """Split the command's wall time into parts that add up to it, from the hooks' records: the
    command's, its jobs', and the calls the local server (`server`) made while it ran."""
    records = result["records"]
    command = next((r for r in records if _calls(r, "pipelines.cli.main")), None)
    if command is None:
        raise SystemExit("the timing hooks saw no call of pipelines.cli.main; has it moved?")
    # One record of the command's calls and the server's calls made during the command.
    cli = {**command, "calls": command["calls"] + [
        call for call in server["calls"] if result["started"] <= call[1] <= result["ended"]]}
    stages = [r for r in records if _calls(r, "steps.common.contract.run")]

    def total(name: str) -> float:
        return sum(end - start for start, end in _calls(cli, name))

    def one(name: str) -> tuple[float, float]:
        found = _calls(cli, name)
        if not found:
            raise SystemExit(f"the timing hooks saw no call of {name}; has it moved? (HOOKS)")
        return found[0]

    main_start, _main_end = one("pipelines.cli.main")
    execution_start, execution_end = one("pipelines.local.engine.run_execution")
    # The summary after the execution ended: the command's report.
    server_reached, definition, report = (total("pipelines.local.server.use_local_aws"),
                                          total("pipelines.cli._build_cached"),
                                          total("pipelines.watch.summary"))
    job_calls = sorted(_calls(cli, "pipelines.local.jobs.run_processing_job")
                       + _calls(cli, "pipelines.local.jobs.run_training_job"))
    runs = sorted(_calls(cli, "pipelines.local.jobs._run"))
    staging = total("pipelines.local.jobs.download_prefix")

    origin = result["started"]
    # (part, start, end) in seconds from the command's start, for the timeline plot
    segments: list[tuple[str, float, float]] = [("cli_start", 0.0, main_start - origin)]
    for key, name in (("server", "pipelines.local.server.use_local_aws"),
                      ("definition", "pipelines.cli._build_cached"),
                      ("staging", "pipelines.local.jobs.download_prefix"),
                      ("report", "pipelines.watch.summary")):
        segments += [(key, start - origin, end - origin) for start, end in _calls(cli, name)]
    jobs: list[dict[str, Any]] = []
    for job_start, job_end in job_calls:
        run = next(((s, e) for s, e in runs if job_start <= s and e <= job_end), None)
        process = next((r for r in stages if run and run[0] <= r["start"] <= run[1]), None)
        entry: dict[str, Any] = {"step": "?", "job_s": job_end - job_start}
        if process is not None:
            entry["step"] = Path(process["cwd"]).name
            entry["module"] = process["module"]
            main = _calls(process, "steps.common.contract.run")[0]
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
        downloads = [(s, e) for s, e in _calls(cli, "pipelines.local.jobs.download_prefix")
                     if job_start <= s <= job_end]
        entry["staging_s"] = sum(e - s for s, e in downloads)
        entry["outputs_s"] = entry["job_s"] - entry["staging_s"] - entry.get("process_s", 0.0)
        jobs.append(entry)

    compute = sum(j.get("main_s", 0.0) for j in jobs)
    processes = sum(j.get("process_s", 0.0) for j in jobs)
    wall = result["wall_s"]
    parts = {
        "cli_start": main_start - result["started"],
        "server": server_reached,
        "definition": definition,
        "setup": execution_start - main_start - server_reached - definition,
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
    ("server", "reaching the local AWS server (already running)"),
    ("definition", "the definition (built, or read from the definition cache)"),
    ("setup", "other setup: boto3, data checks, bucket, data upload"),
    ("staging", "jobs: staging inputs from S3 into the job folder"),
    ("spawn", "jobs: starting the job's Python process"),
    ("imports", "jobs: the stage module's imports (torch, transformers, ...)"),
    ("compute", "**jobs: the stage's `main` (step compute)**"),
    ("exit_handlers", "jobs: after `main`, the process's exit handlers (atexit)"),
    ("teardown", "jobs: interpreter teardown until the process is reaped"),
    ("outputs", "jobs: packing and uploading outputs to S3"),
    ("engine", "engine between jobs: cache lookups, validation, conditions, registration"),
    ("report", "the final report and cost ledger"),
    ("cli_end", "command exit"),
]


def measure_runs(root: Path, sizes: dict[str, int]) -> dict[str, Any]:
    runner = Runner(root)
    server_timings = root / "server-timings"  # the server's record, written when it stops
    server_timings.mkdir()
    try:
        common.progress("starting the local AWS server")
        started = time.time()
        subprocess.run([runner.cli, "server", "start"], cwd=root, capture_output=True, check=True,
                       env={**runner.env, "LLM_BENCH_TIMINGS": str(server_timings)})
        server = {"wall_s": time.time() - started}
        fresh, cached = [], []
        for i in range(sizes["fresh_runs"]):
            common.progress(f"fresh run {i + 1}/{sizes['fresh_runs']} (new data: every step runs)")
            fresh.append(runner.run(i))
        for i in range(sizes["cached_runs"]):
            common.progress(f"cached re-run {i + 1}/{sizes['cached_runs']} (the last run's data)")
            cached.append(runner.run(sizes["fresh_runs"] - 1))
    finally:
        subprocess.run([runner.cli, "server", "stop"], env=runner.env, capture_output=True,
                       check=False)
    # The server's process (and the `server start` command's): their calls, by time.
    server_record = {"calls": [call for path in server_timings.glob("*.json")
                               for call in json.loads(path.read_text())["calls"]]}
    for result in (*fresh, *cached):
        result["breakdown"] = breakdown(result, server_record)
        result["breakdown"]["definition_cached"] = result.pop("definition_cached")
        result["steps"] = {name: {"status": s["status"], "cache": s["cache"],
                                  "seconds": (s["ended"] - s["started"]) if s["ended"] else None}
                           for name, s in result["execution"]["steps"].items()}
        for key in ("records", "execution"):
            result.pop(key)
        result["stdout_tail"] = result.pop("stdout")[-1500:]
    return {"server_start_s": server["wall_s"], "fresh": fresh, "cached": cached}


# --- The section ----------------------------------------------------------------------------------


def median_parts(results: list[dict[str, Any]]) -> dict[str, float]:
    return {key: common.median([r["breakdown"]["parts"][key] for r in results]) for key, _ in PARTS}


def median_run(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The run whose wall time is the median (the lower middle one of an even count)."""
    ordered = sorted(results, key=lambda r: r["wall_s"])
    return ordered[(len(ordered) - 1) // 2]


def plot(runs: dict[str, Any]) -> str:
    """Timelines of the median fresh run and the median cached re-run, each on its own scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    colours = dict(zip([key for key, _ in PARTS], plt.get_cmap("tab20").colors))
    names = dict(PARTS)
    columns = [("fresh run", median_run(runs["fresh"])),
               ("fully cached re-run", median_run(runs["cached"]))]
    fig, axes = plt.subplots(2, 1, figsize=(12.5, 3.8))
    seen: set[str] = set()
    for ax, (label, result) in zip(axes, columns):
        wall = result["breakdown"]["wall_s"]
        ax.barh(0, wall, color="#eeeeee", edgecolor="grey")  # the rest: setup, engine, exit
        for key, start, end in result["breakdown"]["segments"]:
            if end > start:
                ax.barh(0, end - start, left=start, color=colours[key],
                        edgecolor="black" if key == "compute" else None, linewidth=0.5)
                seen.add(key)
        ax.set_yticks([0], [f"{label}\n{wall:.1f} s"])
        ax.set_xlim(0, wall * 1.01)
    axes[-1].set_xlabel("seconds from the command's start")
    handles = [Patch(color=colours[k], label=names[k].replace("*", "").replace("`", ""))
               for k, _ in PARTS if k in seen]
    handles.append(Patch(facecolor="#eeeeee", edgecolor="grey",
                         label="the rest: setup, engine between jobs, command exit"))
    fig.legend(handles=handles, fontsize=7, loc="center left", bbox_to_anchor=(0.64, 0.5))
    fig.suptitle("llm-pipeline run --recipe sft (builtin:tiny): where the time goes", fontsize=10)
    return common.save_figure(fig, NAME, rect=(0, 0, 0.64, 1))


def render(definitions: dict[str, Any], runs: dict[str, Any], sizes: dict[str, int],
           quick: bool) -> str:
    cold = definitions["cold"]
    medians = {name: common.median(times) for name, times in definitions["builds"].items()}
    lines = [
        ("**What is measured.** (a) Building each shipped recipe's definition JSON with "
        "`pipelines.definition.definition_json`, offline (no credentials; every AWS endpoint "
        "unreachable), in this process after one discarded build, the median of "
        f"{sizes['definition_repeats']} build(s) per recipe, the recipes interleaved; and the "
        f"first build in a fresh process ({len(cold)} process(es)), which also imports the "
        "SageMaker SDK, as each `llm-pipeline definition` does. (b) `llm-pipeline run --recipe "
        "sft -p BaseModel=builtin:tiny -p InputData=FILE -p ModelPackageGroup=... -p "
        "LearningRate=0.005` (the arguments of tests/pipelines/test_local_run.py) run as a "
        "subprocess with its own LLM_PIPELINE_HOME, stdout not a terminal (plain progress lines), "
        f"{sizes['fresh_runs']} time(s) on new data so that no step is a cache hit; the local AWS "
        f"server is started once beforehand ({runs['server_start_s']:.1f} s, once per boot). "
        "Timing hooks on PYTHONPATH (a `sitecustomize`, active only in these runs) record when "
        "every process starts and exits and how long the command's and the engine's functions "
        "and each stage's `contract.run` (which calls its `main`) take. **Step compute** is the "
        "time inside the stages' `main`: the work a step exists to do (reading data, loading "
        "models, training, evaluating, writing outputs). The per-job interpreter start and "
        "imports are counted as overhead, though a SageMaker container pays them too; the "
        "overhead beyond whole job processes is shown beside it. (c) The same command again on "
        f"the last run's data, {sizes['cached_runs']} time(s): every cached step is reused."),
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

    fresh_parts, cached_parts = median_parts(runs["fresh"]), median_parts(runs["cached"])
    fresh_wall = common.median([r["wall_s"] for r in runs["fresh"]])
    cached_wall = common.median([r["wall_s"] for r in runs["cached"]])
    lines += [
        "",
        ("| where the command's wall time goes (median of each part) | fresh run, s | % | "
        "cached re-run, s | % |"),
        "|---|---|---|---|---|",
    ]
    for key, name in PARTS:
        lines.append(f"| {name} | {fresh_parts[key]:.2f} | "
                     f"{100 * fresh_parts[key] / fresh_wall:.1f} | {cached_parts[key]:.2f} | "
                     f"{100 * cached_parts[key] / cached_wall:.1f} |")
    lines.append(f"| **wall time (median)** | **{fresh_wall:.2f}** | 100 | **{cached_wall:.2f}** | "
                 "100 |")

    lines += ["", ("| run | definition | wall (s) | Σ step compute (s) | overhead (s, % of wall) | "
              "Σ job processes (s) | overhead beyond job processes (s, %) |"),
              "|---|---|---|---|---|---|---|"]
    for label, results in (("fresh", runs["fresh"]), ("cached", runs["cached"])):
        for i, result in enumerate(results, 1):
            b = result["breakdown"]
            lines.append(
                f"| {label} {i} | {'cached' if b['definition_cached'] else 'built'} | "
                f"{b['wall_s']:.1f} | {b['compute_s']:.1f} | {b['overhead_s']:.1f} "
                f"({100 * b['overhead_fraction']:.1f}%) | {b['processes_s']:.1f} | "
                f"{b['overhead_beyond_processes_s']:.1f} "
                f"({100 * b['overhead_beyond_processes_fraction']:.1f}%) |")

    typical = median_run(runs["fresh"])
    lines += ["", f"Per job of the median fresh run ({typical['wall_s']:.1f} s):", "",
              ("| step | staging inputs (s) | process start + imports (s) | stage `main` (s) | "
              "exit handlers (s) | teardown (s) | outputs (s) | job (s) |"),
              "|---|---|---|---|---|---|---|---|"]
    for job in typical["breakdown"]["jobs"]:
        lines.append(
            f"| {job['step']} | {job['staging_s']:.2f} | "
            f"{job.get('spawn_s', 0) + job.get('imports_s', 0):.2f} | {job.get('main_s', 0):.2f} "
            f"| {job.get('exit_handlers_s', 0):.2f} | {job.get('teardown_s', 0):.2f} | "
            f"{job['outputs_s']:.2f} | {job['job_s']:.2f} |")

    overhead = common.median([r["breakdown"]["overhead_fraction"] for r in runs["fresh"]])
    beyond = common.median([r["breakdown"]["overhead_beyond_processes_fraction"]
                            for r in runs["fresh"]])
    ranked = sorted(((fresh_parts[k], n) for k, n in PARTS if k != "compute"), reverse=True)
    top = "; ".join(f"{n.replace('*', '').replace('`', '')} {s:.1f} s" for s, n in ranked[:3])
    job_count = len(typical["breakdown"]["jobs"])
    per_job_imports = fresh_parts["imports"] / job_count if job_count else float("nan")
    met = overhead <= OVERHEAD_TARGET
    text = (f"**Local-engine overhead: target at most {100 * OVERHEAD_TARGET:.0f}% — "
            f"{'met' if met else 'missed'}.** Overhead (wall time minus the sum of step compute) "
            f"is {100 * overhead:.1f}% of the fresh run's wall time (median of "
            f"{len(runs['fresh'])}). The largest parts besides compute: {top}. ")
    if not met:
        text += (f"Each of the {job_count} jobs starts a Python process that imports the stage's "
                 f"libraries before its `main` runs ({per_job_imports:.1f} s per job here), as a "
                 "SageMaker container also does; the tiny model's steps compute for only "
                 f"{fresh_parts['compute']:.0f} s in all, so these fixed costs weigh "
                 "heavily. ")
    text += (f"Counting whole job processes as the steps' work, what the engine and the command "
             f"add is {100 * beyond:.1f}% "
             f"({'within' if beyond <= OVERHEAD_TARGET else 'above'} the target).")
    lines += ["", text]

    cached_met = cached_wall < CACHED_TARGET_S
    ranked = sorted(((cached_parts[k], n) for k, n in PARTS), reverse=True)
    top = "; ".join(f"{n.replace('*', '').replace('`', '')} {s:.1f} s" for s, n in ranked[:3])
    steps = runs["cached"][0]["steps"]
    hits = [n for n, s in steps.items() if s["cache"].startswith("hit")]
    ran = [n for n, s in steps.items() if s["status"] == "Succeeded" and n not in hits]
    text = (f"**Fully cached re-run: target under {CACHED_TARGET_S:.0f} s — "
            f"{'met' if cached_met else 'missed'}** ({cached_wall:.1f} s, median of "
            f"{len(runs['cached'])}; the fresh run took {fresh_wall:.1f} s). Cache hits: "
            f"{', '.join(hits) or 'none'}; run: {', '.join(ran) or 'none'} (the registry "
            "comparison is never cached, its answer depends on the registry's state). Largest "
            f"parts: {top}.")
    if not cached_met:
        text += (" The uncached CompareWithApproved job pays a Python process and its imports, "
                 "and the command itself pays its imports and the report.")
    lines += ["", text]
    if quick:
        lines += ["", ("_Quick mode: one run of each kind on a shared, busy machine; the figures "
                  "show that the benchmark works, not what the engine costs._")]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one run of each kind")
    parser.add_argument("--cold-definition", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.cold_definition:
        cold_definition()
        return
    sizes = QUICK if args.quick else FULL
    with tempfile.TemporaryDirectory(prefix="bench-orchestration-") as tmp:
        root = Path(tmp)
        definitions = measure_definitions(root / "definition-home", sizes)
        runs = measure_runs(root, sizes)
    plots = [plot(runs)]
    common.save_result(NAME, TITLE, render(definitions, runs, sizes, args.quick),
                       {"quick": args.quick, "sizes": sizes, "definitions": definitions,
                        "runs": runs, "overhead_target": OVERHEAD_TARGET,
                        "cached_target_s": CACHED_TARGET_S}, ORDER, plots)


if __name__ == "__main__":
    main()

"""Experiment tracking: what MLflow tracking costs a tiny run's wall time.

The sft recipe on the builtin tiny model, end to end through the command line as a user runs it
(`llm-pipeline run --recipe sft -p BaseModel=builtin:tiny -p InputData=FILE ...`, the runs of
benchmarks/orchestration.py, on one local server with the warm job runner, started once
beforehand), with tracking at its local default (the SQLite store under LLM_PIPELINE_HOME: every
step a nested run with params, metric histories and artifacts, the execution's run closed by the
local server) and with `-p MlflowTrackingUri=none`, alternately, the order swapped each repeat, each
run on new data so that no step is a cache hit, after one discarded warm-up run of each (the
definition cache, the store's creation, the page cache). Reported: the median wall time of each,
their ratio, the median of the pairs' ratios (each tracked run against the untracked run of the
same repeat), the same for CPU seconds, the machine's 1-minute load average around the runs, and
where tracking's time goes (from the timing hooks of benchmarks/orchestration.py): the steps'
`tracking.start` (settings held) and `tracking.end` (their run's end, with what they held, the
training's metrics too, left to the local server), the stages' own work, and the local server creating the store, making
the steps' runs, ending them after their jobs (in the background, while the next step runs),
waiting for the last before it closes the execution's run, and closing it (the command imports no
MLflow). The local server's CPU seconds during each run are reported apart (it imports MLflow
once, during the warm-up).

    python -m benchmarks.tracking [--quick | --repeats N]
    python -m benchmarks.tracking --render   # the section again from the saved figures
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks import common
from benchmarks.orchestration import HOOKS, Session, calls
from pipelines.local import processes

NAME, TITLE, ORDER = "tracking", "Experiment tracking (MLflow) on and off", 65
TARGET = 0.05  # tracking may add at most 5% to the wall time
QUICK, FULL = 1, 3
OFF = ("MlflowTrackingUri=none",)
TRACKING_HOOKS = {
    "timed": {**HOOKS["timed"],
              "steps.common.tracking": ["start", "end"],
              "pipelines.tracking": ["prepare_local_store", "StepRuns.variables",
                                     "StepRuns._end_run", "StepRuns.wait",
                                     "close_execution_run"]},
    "environment": HOOKS["environment"],
}
# What the hooks time, as the table names it.
PARTS = {
    "steps.common.contract.run": "stages' `contract.run` (their `main`, tracking included), Σ jobs",
    "steps.common.tracking.start": "steps' `tracking.start`, Σ jobs",
    "steps.common.tracking.end": "steps' `tracking.end`, Σ jobs",
    "pipelines.tracking.prepare_local_store": "local server: `prepare_local_store`",
    "pipelines.tracking.StepRuns.variables": ("local server: making the steps' runs, Σ jobs "
                                              "(while each job's inputs are staged)"),
    "pipelines.tracking.StepRuns._end_run": ("local server: ending the steps' runs, Σ jobs "
                                             "(in the background, after each job ended; not on "
                                             "the critical path)"),
    "pipelines.tracking.StepRuns.wait": ("local server: waiting for the steps' runs to end, "
                                         "before closing the execution's"),
    "pipelines.tracking.close_execution_run": "local server: `close_execution_run`",
}
# Called by the local server, whose record of calls comes when it stops (`add_server_parts`).
SERVER_PARTS = ("pipelines.tracking.prepare_local_store", "pipelines.tracking.StepRuns.variables",
                "pipelines.tracking.StepRuns._end_run", "pipelines.tracking.StepRuns.wait",
                "pipelines.tracking.close_execution_run")
# Parts that are not tracking's time on the run's critical path: the stages' own work (tracking
# inside it is timed apart), and what runs beside the next step.
NOT_OWN = ("steps.common.contract.run", "pipelines.tracking.StepRuns._end_run")


def process_cpu_s(pid: int) -> float:
    """User and system CPU seconds of process `pid` so far (Linux)."""
    found = processes.stat(pid)
    if found is None:
        raise SystemExit(f"process {pid} (the local server) has ended; see its log")
    return found.cpu_s


def run(session: Session, tracked: bool, server_pid: int) -> dict[str, Any]:
    server_cpu = process_cpu_s(server_pid)
    result = session.run("warm", parameters=() if tracked else OFF)
    server_cpu = process_cpu_s(server_pid) - server_cpu
    parts = {name: round(sum(end - start for record in result["records"]
                             for start, end in calls(record, name)), 2) for name in PARTS}
    tracked_line = any(line.startswith("MLflow run ") for line in result["stdout"].splitlines())
    if tracked_line != tracked:
        raise SystemExit(f"a run with tracking {'on' if tracked else 'off'} "
                         f"{'did not close' if tracked else 'closed'} an MLflow run")
    return {"tracked": tracked, "started": result["started"], "ended": result["ended"],
            "wall_s": round(result["wall_s"], 2),
            "cpu_s": round(sum(record.get("cpu_s", 0.0) for record in result["records"]), 2),
            "server_cpu_s": round(server_cpu, 2),
            "load_before": result["load_before"], "load_after": result["load_after"],
            "parts": parts}


def add_server_parts(runs: list[dict[str, Any]], server: dict[str, Any]) -> None:
    """The local server's tracking calls made while each run's command ran, into its parts."""
    for result in runs:
        for name in SERVER_PARTS:
            result["parts"][name] = round(sum(
                end - start for start, end in calls(server, name)
                if result["started"] <= start <= result["ended"]), 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one run of each (minutes)")
    parser.add_argument("--repeats", type=int, default=None,
                        help=f"runs of each (default {FULL}); more where the machine is noisy")
    parser.add_argument("--render", action="store_true",
                        help="the section again from the saved figures")
    args = parser.parse_args()
    if args.render:
        saved = json.loads((common.RESULTS_DIR / f"{NAME}.json").read_text())
        common.save_result(NAME, TITLE, render(saved["data"]["runs"]), saved["data"], ORDER,
                           environment=saved["environment"], command=saved["command"])
        return
    repeats = args.repeats or (QUICK if args.quick else FULL)
    with tempfile.TemporaryDirectory(prefix="bench-tracking-") as folder:
        session = Session(Path(folder), hooks=TRACKING_HOOKS)
        server = session.start_server("warm")
        try:
            common.progress("warm-up: one run tracked, one not (discarded)")
            run(session, True, server["server_pid"])
            run(session, False, server["server_pid"])
            runs = []
            for repeat in range(repeats):
                # Alternated, the order swapped each repeat: drift in the machine's load falls on
                # both alike.
                for tracked in ((True, False) if repeat % 2 == 0 else (False, True)):
                    common.progress(f"run {repeat + 1}/{repeats}, tracking "
                                    f"{'on' if tracked else 'off'}")
                    runs.append(run(session, tracked, server["server_pid"]))
                    common.progress(f"  {runs[-1]['wall_s']:.1f} s, load "
                                    f"{runs[-1]['load_before']:.1f} → "
                                    f"{runs[-1]['load_after']:.1f}")
        finally:
            records = session.stop_servers({"warm": server})
        add_server_parts(runs, records["warm"])
    common.save_result(NAME, TITLE, render(runs), {"runs": runs}, ORDER)


def render(runs: list[dict[str, Any]]) -> str:
    on = [r for r in runs if r["tracked"]]
    off = [r for r in runs if not r["tracked"]]

    def med(group: list[dict[str, Any]], key: str) -> float:
        return common.median([r[key] for r in group])

    def cpu_range(group: list[dict[str, Any]]) -> str:
        return f"{min(r['cpu_s'] for r in group):.1f}–{max(r['cpu_s'] for r in group):.1f}"

    def part(group: list[dict[str, Any]], name: str) -> float:
        return common.median([r["parts"].get(name, 0.0) for r in group])

    extra = med(on, "wall_s") / med(off, "wall_s") - 1
    # Run by run: each tracked run against the untracked one of the same repeat, which ran just
    # before or after it, under about the same load: their median is less at the mercy of a
    # burst of the machine's other work than the medians' ratio.
    paired = [a["wall_s"] / b["wall_s"] - 1 for a, b in zip(on, off)]
    paired_cpu = [a["cpu_s"] / b["cpu_s"] - 1 for a, b in zip(on, off)]
    loads = [r[key] for r in runs for key in ("load_before", "load_after")]
    # Tracking's own time on the run's critical path (its jobs run one after another).
    # (runs saved before a part was timed have none of it)
    own = [sum(r["parts"].get(name, 0.0) for name in PARTS if name not in NOT_OWN) for r in on]
    cpu_extra = med(on, "cpu_s") / med(off, "cpu_s") - 1
    rows = [[label, f"{med(group, 'wall_s'):.1f}",
             f"{min(r['wall_s'] for r in group):.1f}–{max(r['wall_s'] for r in group):.1f}",
             f"{med(group, 'cpu_s'):.1f}",
             # runs saved before the server's CPU time was read have none
             f"{common.median([r['server_cpu_s'] for r in group]):.1f}"
             if all("server_cpu_s" in r for r in group) else "—", len(group),
             f"{med(group, 'load_before'):.1f} → {med(group, 'load_after'):.1f}"]
            for label, group in (("tracking on (local SQLite store)", on),
                                 ("tracking off (`MlflowTrackingUri=none`)", off))]
    part_rows = [[label, f"{part(on, name):.2f}", f"{part(off, name):.2f}"]
                 for name, label in PARTS.items()]
    spread = (max(r["wall_s"] for r in off) - min(r["wall_s"] for r in off)) / med(off, "wall_s")
    verdict = "met" if extra <= TARGET else "not met"
    if all(p > TARGET for p in paired) or all(p <= TARGET for p in paired):
        verdict += " in every pair of runs"
    elif spread > TARGET:
        verdict += "; the pairs disagree, and the runs spread wider than the target"
    return "\n\n".join([
        "**What is measured.** " + " ".join(__doc__.split("\n\n")[1].split())
        + " CPU seconds: user and system time of the command and its jobs' processes.",
        common.table(["run", "wall time (median, s)", "min–max", "CPU s (median)",
                      "local server CPU s (median)", "runs",
                      "load average before → after (median)"], rows),
        (f"**Tracking adds {100 * extra:+.1f}% to the tiny run's median wall time** (target: at "
         f"most {100 * TARGET:.0f}%; "
         f"{verdict}); run by run, "
         f"against the untracked run of the same repeat: "
         f"{', '.join(f'{100 * p:+.1f}%' for p in paired)} (median of the pairs "
         f"{100 * common.median(paired):+.1f}%; of their CPU seconds "
         f"{100 * common.median(paired_cpu):+.1f}%). The machine's 1-minute load "
         f"average over the runs: {min(loads):.1f}–{max(loads):.1f} on "
         f"{common.environment()['cpus']} CPUs; the untracked runs alone spread over "
         f"{100 * spread:.0f}% of their median. Tracking's own time on the run's critical path "
         f"(the steps' `tracking.start` and `tracking.end`, the local server making the steps' "
         f"runs, though while their inputs are staged, waiting for their ends and closing the "
         f"execution's run; not the steps' runs ended beside the next step) is "
         f"{common.median(own):.1f} s, {100 * common.median(own) / med(off, 'wall_s'):.1f}% of "
         f"the untracked median wall time. The CPU seconds of the command and its jobs change by "
         f"{100 * cpu_extra:+.1f}% ({med(on, 'cpu_s') - med(off, 'cpu_s'):+.1f} s; run by run "
         f"{cpu_range(on)} tracked, {cpu_range(off)} untracked): on an oversubscribed machine "
         f"each CPU second costs the run several seconds of wall time, and where the two ranges "
         f"overlap the difference is within this machine's noise."),
        common.table(["where the time goes (median, s)", "tracking on", "tracking off"],
                     part_rows),
    ])


if __name__ == "__main__":
    sys.exit(main())

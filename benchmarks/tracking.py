"""Experiment tracking: what MLflow tracking costs a tiny run's wall time.

The sft recipe on the builtin tiny model, end to end through the command line as a user runs it
(`llm-pipeline run --recipe sft -p BaseModel=builtin:tiny -p InputData=FILE ...`, the runs of
benchmarks/orchestration.py), with tracking at its local default (the SQLite store under
LLM_PIPELINE_HOME: every step a nested run with params, metric histories and artifacts) and with
`-p MlflowTrackingUri=none`, alternately, each run on new data so that no step is a cache hit,
after one discarded warm-up run of each (the definition cache, the store's first migration, the
page cache). Reported: the median wall time of each and their ratio, and the per-job time in the
stage processes (from the jobs' start to their end, as the execution records it).

    python -m benchmarks.tracking [--quick]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks import common
from benchmarks.orchestration import GROUP, Runner, run_records

NAME, TITLE, ORDER = "tracking", "Experiment tracking (MLflow) on and off", 65
TARGET = 0.05  # tracking may add at most 5% to the wall time
QUICK, FULL = 1, 3


def run(runner: Runner, variant: int, tracked: bool) -> dict[str, Any]:
    data = common.write_jsonl(runner.root / f"data-{variant}" / "sums.jsonl",
                              run_records(variant))
    result = runner.command("run", "--recipe", "sft", "-p", "BaseModel=builtin:tiny",
                            "-p", f"InputData={data}", "-p", f"ModelPackageGroup={GROUP}",
                            "-p", "LearningRate=0.005",
                            *([] if tracked else ["-p", "MlflowTrackingUri=none"]), timed=False)
    executions = sorted((runner.home / "executions" / "llm-sft").iterdir(),
                        key=lambda p: (p / "execution.json").stat().st_mtime)
    execution = json.loads((executions[-1] / "execution.json").read_text())
    return {"tracked": tracked, "wall_s": result["wall_s"], "steps": _step_seconds(execution)}


def _step_seconds(execution: dict[str, Any]) -> dict[str, float]:
    """Seconds each step's job took, from the execution record."""
    return {name: round(step["ended"] - step["started"], 2)
            for name, step in execution.get("steps", {}).items()
            if step.get("started") and step.get("ended") and step.get("type") != "Condition"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one run of each (minutes)")
    repeats = QUICK if parser.parse_args().quick else FULL
    with tempfile.TemporaryDirectory(prefix="bench-tracking-") as folder:
        runner = Runner(Path(folder))
        runner.command("server", "start", timed=False)
        try:
            common.progress("warm-up: one run tracked, one not (discarded)")
            run(runner, 100, True)
            run(runner, 101, False)
            runs = []
            for repeat in range(repeats):
                # Alternated, the order swapped each repeat: drift in the machine's load falls on
                # both alike.
                for tracked in ((True, False) if repeat % 2 == 0 else (False, True)):
                    common.progress(f"run {repeat + 1}/{repeats}, tracking "
                                    f"{'on' if tracked else 'off'}")
                    runs.append(run(runner, 2 * repeat + tracked, tracked))
        finally:
            runner.command("server", "stop", timed=False)
    on = [r["wall_s"] for r in runs if r["tracked"]]
    off = [r["wall_s"] for r in runs if not r["tracked"]]
    extra = common.median(on) / common.median(off) - 1
    rows = [["tracking on (local SQLite store)", f"{common.median(on):.1f}", common.spread(on),
             len(on)],
            ["tracking off (`MlflowTrackingUri=none`)", f"{common.median(off):.1f}",
             common.spread(off), len(off)]]
    markdown = "\n\n".join([
        "**What is measured.** " + __doc__.split("\n\n")[1].replace("\n", " "),
        common.table(["run", "wall time (median, s)", "min–max", "runs"], rows),
        (f"**Tracking adds {100 * extra:+.1f}% to the tiny run's wall time** (target: at most "
        f"{100 * TARGET:.0f}%; {'met' if extra <= TARGET else 'not met'}). Each of the four jobs "
        "imports MLflow and opens the store once; on a real model the same fixed cost is a "
        "smaller share."),
    ])
    common.save_result(NAME, TITLE, markdown, {"runs": runs, "extra": extra}, ORDER)


if __name__ == "__main__":
    sys.exit(main())

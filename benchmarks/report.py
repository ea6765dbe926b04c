"""BENCHMARKS.md from the results the benchmark scripts saved (benchmarks/results/*.json).

    python -m benchmarks.report

Every figure in it comes from a results file, beside the machine and versions that produced it
and the command that reproduces it; nothing is typed by hand.
"""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks import common

OUTPUT = Path(__file__).resolve().parent / "BENCHMARKS.md"
# Sections whose results may be missing, with how to produce them.
EXPECTED = {
    "throughput": "python -m benchmarks.throughput",
    "memory": "python -m benchmarks.memory",
    "memory-plan": "python -m benchmarks.memory --plan",
    "memory-loss": "python -m benchmarks.memory --loss",
    "gpu": "python -m benchmarks.gpu --prepare .gpu/smollm2-135m, then on a GPU machine "
           "python -m benchmarks.gpu --model .gpu/smollm2-135m",
    "precision": "python -m benchmarks.precision",
    "scaling": "python -m benchmarks.scaling",
    "orchestration": "python -m benchmarks.orchestration",
    "serving": "python -m benchmarks.serving",
    "distillation": "python -m benchmarks.distillation",
    "distillation-settings": "python -m benchmarks.distillation --work DIR --setting alpha=1 "
                             "--setting alpha=0.8,temperature=2 ... (once per --seed)",
    "tracking": "python -m benchmarks.tracking",
}


def render(results_dir: Path = common.RESULTS_DIR) -> str:
    results = [json.loads(path.read_text()) for path in sorted(results_dir.glob("*.json"))]
    results.sort(key=lambda r: (r.get("order", 99), r["name"]))
    found = {r["name"] for r in results}
    parts = [
        "# Benchmarks",
        "",
        ("Generated: `make benchmarks` runs every CPU benchmark and rewrites this file; "
         "`python -m benchmarks.report` rewrites it from the saved results "
         "(`benchmarks/results/*.json`). Do not edit by hand: each section is rendered from the "
         "figures its script measured, on the machine and versions printed under its title. "
         "Figures are medians of repeated runs, and ratios compare runs made in the same process "
         "or session on the same machine; absolute times on another machine will differ."),
        "",
        "Contents: " + ", ".join(f"[{r['title']}](#{_anchor(r['title'])})" for r in results),
    ]
    for result in results:
        parts += [
            "", f"## {result['title']}", "",
            f"*{common.environment_line(result['environment'])}*", "",
            f"Reproduce: `{result['command']}`", "",
            result["markdown"].strip(),
        ]
        parts += [f"\n![{result['title']}](results/{plot})" for plot in result.get("plots", [])]
    missing = [name for name in EXPECTED if name not in found]
    if missing:
        parts += ["", "## Not measured yet", ""]
        parts += [f"- {name}: `{EXPECTED[name]}`" for name in missing]
    return "\n".join(parts) + "\n"


def _anchor(title: str) -> str:
    kept = "".join(c for c in title.lower() if c.isalnum() or c in " -")
    return kept.replace(" ", "-")


def main() -> None:
    OUTPUT.write_text(render())
    print(f"wrote {OUTPUT}")


if __name__ == "__main__":
    main()

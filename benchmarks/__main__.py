"""Every CPU benchmark in turn, then BENCHMARKS.md: ``python -m benchmarks`` (``make benchmarks``).

``python -m benchmarks --quick`` runs each in its quick mode (minutes: does everything run?).
The GPU benchmark runs on a GPU machine on its own: see benchmarks/gpu.py.
"""

from __future__ import annotations

import subprocess
import sys

from benchmarks import common, report

SCRIPTS = ("throughput", "memory", "precision", "scaling", "orchestration", "serving",
           "distillation", "tracking")


def main() -> int:
    quick = ["--quick"] if "--quick" in sys.argv[1:] else []
    failed = []
    for name in SCRIPTS:
        common.progress(f"benchmarks.{name} {' '.join(quick)}")
        # One process each: one benchmark's memory and threads do not weigh on the next.
        if subprocess.run([sys.executable, "-m", f"benchmarks.{name}", *quick],
                          cwd=common.ROOT, check=False).returncode:
            failed.append(name)
    report.main()
    if failed:
        print(f"failed: {', '.join(failed)} (their sections keep the last saved results)",
              file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

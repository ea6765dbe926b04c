"""What every benchmark shares: the machine and versions printed beside each figure, medians,
results files, running a stage in this process as SageMaker would, models and data to run on.

A benchmark script measures and writes ``benchmarks/results/<name>.json``: the machine, the
versions, the command that produced it, its figures (`data`) and a Markdown section (`markdown`)
rendered from those figures; ``python -m benchmarks.report`` assembles BENCHMARKS.md from the
sections. No figure is typed by hand.

Benchmarks are not tests: they assert nothing, and a figure only means something beside the
baseline measured in the same process (or session) on the same machine.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any, Self

# Before transformers is imported: nothing here may reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = Path(__file__).resolve().parent / "results"
PACKAGES = ("torch", "transformers", "peft", "trl", "datasets", "accelerate", "bitsandbytes",
            "sagemaker")

# The small model of the CPU benchmarks: the builtin tiny model's byte-level tokenizer and chat
# template under a body large enough that the matrix work, not Python, sets the pace (~3.4M
# parameters). Sizes are multiples of 32, as bitsandbytes' 4-bit CPU path needs.
SMALL = {"hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 4,
         "num_attention_heads": 4, "num_key_value_heads": 2}


# --- The machine ----------------------------------------------------------------------------------


def environment() -> dict[str, Any]:
    """What a figure depends on: machine, accelerator, threads, versions, code version."""
    import torch

    env: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": _cpu_name(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "accelerator": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
        "python": platform.python_version(),
        "code_version": _git_commit(),
    }
    for package in PACKAGES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            env[package] = metadata.version(package)
    return env


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _git_commit() -> str:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                                capture_output=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "steps", "pipelines"],
                               cwd=ROOT, text=True, capture_output=True, check=False).stdout.strip()
        return commit + ("+changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def environment_line(env: dict[str, Any]) -> str:
    versions = ", ".join(f"{p} {env[p]}" for p in PACKAGES if p in env)
    return (f"{env['date']} · {env['machine']}, {env['cpus']} CPUs ({env['torch_threads']} torch "
            f"threads), {env['memory_gib']} GiB · accelerator: {env['accelerator']} · Python "
            f"{env['python']}, {versions} · code {env['code_version']}")


# --- Figures --------------------------------------------------------------------------------------


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def spread(values: list[float]) -> str:
    """'median (min–max, n runs)' for a table cell."""
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:,.0f}"
    return f"{median(values):,.0f} ({min(values):,.0f}–{max(values):,.0f})"


def ratio(value: float, baseline: float) -> str:
    return f"{value / baseline:.2f}×" if baseline and not math.isnan(baseline) else "—"


def table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def save_result(name: str, title: str, markdown: str, data: Any, order: int,
                plots: list[str] | None = None, environment: dict[str, Any] | None = None,
                command: str | None = None) -> Path:
    """Write results/<name>.json (what BENCHMARKS.md is made of) and print the section.

    `environment` and `command`: those of the run that measured, when the section is rendered
    again later from its saved figures (default: this process's).
    """
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    env = environment or globals()["environment"]()
    payload = {
        "name": name, "title": title, "order": order, "environment": env,
        "command": command or "python -m " + sys.argv[0].replace(str(ROOT) + "/", "")
        .removesuffix(".py").replace("/", ".") + "".join(f" {a}" for a in sys.argv[1:]),
        "markdown": markdown, "plots": plots or [], "data": data,
    }
    path = RESULTS_DIR / f"{name}.json"
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    partial.replace(path)
    print(f"\n## {title}\n{environment_line(env)}\n\n{markdown}\n\nwritten: {path}", flush=True)
    return path


def plot_path(name: str) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    return RESULTS_DIR / f"{name}.png"


def save_figure(fig: Any, name: str, **layout: Any) -> str:
    """Lay out and save a matplotlib figure as results/<name>.png, close it; its file name."""
    import matplotlib.pyplot as plt

    fig.tight_layout(**layout)
    path = plot_path(name)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# --- Memory ---------------------------------------------------------------------------------------


def rss_mb() -> float:
    """This process's resident memory now."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_rss_mb() -> float:
    """This process's peak resident memory since start or the last `reset_peak_rss`."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class PeakAnonymousMemory:
    """The peak of this process's anonymous resident memory (RssAnon) while the block runs,
    sampled every `interval` seconds by a thread.

    Unlike VmHWM it leaves out file-backed pages: safetensors weights are memory-mapped while a
    model loads, so the peak resident memory counts the whole file (540 MB for SmolLM2) even for
    a QLoRA run that keeps only its 4-bit copy. Anonymous memory is what the process itself holds:
    weights, gradients, optimizer state, activations. Samples can miss a peak shorter than the
    interval; a training step's peak lasts its backward pass.
    """

    def __init__(self, interval: float = 0.01) -> None:
        self.interval, self.before_mb, self.peak_mb = interval, 0.0, 0.0
        self.mark_mb = self.peak_since_mark_mb = None
        self._done = None

    def mark(self) -> None:
        """Start a second peak from here (`peak_since_mark_mb`), e.g. once a model has loaded."""
        self.mark_mb = self.peak_since_mark_mb = _anonymous_mb()

    def __enter__(self) -> Self:
        import threading

        gc.collect()
        self.before_mb = self.peak_mb = _anonymous_mb()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._done.wait(self.interval):
            now = _anonymous_mb()
            self.peak_mb = max(self.peak_mb, now)
            if self.peak_since_mark_mb is not None:
                self.peak_since_mark_mb = max(self.peak_since_mark_mb, now)

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()
        now = _anonymous_mb()
        self.peak_mb = max(self.peak_mb, now)
        if self.peak_since_mark_mb is not None:
            self.peak_since_mark_mb = max(self.peak_since_mark_mb, now)


def _anonymous_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    return rss_mb()


def reset_peak_rss() -> None:
    """Start the peak (VmHWM) afresh from the current resident memory (Linux: clear_refs 5)."""
    gc.collect()
    with contextlib.suppress(OSError):
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)  # give freed heap back, so it is not counted
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


# --- Models and data ------------------------------------------------------------------------------


def small_model_folder(root: Path, **sizes: int) -> Path:
    """A config-built model (the tiny tokenizer, SMALL's sizes unless given) saved as a folder that
    every stage loads like any other model folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from steps.common import models

    folder = root / ("small-" + "-".join(f"{v}" for v in {**SMALL, **sizes}.values()))
    if folder.exists():
        return folder
    tokenizer = models.load_tokenizer(models.TINY)
    config = LlamaConfig(
        vocab_size=288, max_position_embeddings=2048, tie_word_embeddings=False,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None, **{**SMALL, **sizes},
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


# --- Running a stage ------------------------------------------------------------------------------


@contextlib.contextmanager
def stage_job(channels: dict[str, Path]) -> Iterator[Path]:
    """The SM_* folders of one training job in a fresh temporary folder; the channels as given."""
    names = ["SM_MODEL_DIR", "SM_OUTPUT_DATA_DIR", "SM_CHECKPOINT_DIR", "SM_INPUT_CONFIG_DIR",
             *(f"SM_CHANNEL_{c.upper()}" for c in channels)]
    saved = {name: os.environ.get(name) for name in names}
    with tempfile.TemporaryDirectory(prefix="bench-job-") as tmp:
        root = Path(tmp)
        os.environ.update({
            "SM_MODEL_DIR": str(root / "model"), "SM_OUTPUT_DATA_DIR": str(root / "output"),
            "SM_CHECKPOINT_DIR": str(root / "checkpoints"),
            "SM_INPUT_CONFIG_DIR": str(root / "config"),
            **{f"SM_CHANNEL_{c.upper()}": str(p) for c, p in channels.items()},
        })
        try:
            yield root
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


def run_stage(main: Callable[[Any], None], config: Any, channels: dict[str, Path],
              quiet: bool = True, keep: Path | None = None) -> dict[str, Any]:
    """Run a training stage's `main(config)` in this process; its training_summary.json.

    The stage's own figures (tokens/s over `trainer.train()`, peak memory, trainable parameters)
    are what its jobs log; the benchmarks read them from the summary. `keep`: where to copy the
    model folder the stage wrote, for a later stage to start from.
    """
    import shutil

    with stage_job(channels) as root:
        with _maybe_quiet(quiet):
            main(config)
        if keep is not None:
            shutil.copytree(root / "model", keep)
        return json.loads((root / "model" / "training_summary.json").read_text())


@contextlib.contextmanager
def _maybe_quiet(quiet: bool) -> Iterator[None]:
    if not quiet:
        yield
        return
    import io

    sink = io.StringIO()
    try:
        with contextlib.redirect_stdout(sink):
            yield
    except BaseException:
        sys.stdout.write(sink.getvalue()[-4000:])
        raise

"""Metric lines for SageMaker, a metrics.jsonl file and a loss-curve plot.

Each log is printed as one line, such as
``[metrics] step=10 epoch=0.5 train_loss=2.3456 learning_rate=0.0002 tokens_per_second=350.1``,
which a training job's metric_definitions read with a regex such as ``[ ]train_loss=([0-9.eE+-]+)``
(the leading space keeps it from also matching a longer name that ends in ``train_loss``). The
same values are appended, one JSON object a line, to metrics.jsonl, from which the loss curve is
drawn.
"""

from __future__ import annotations

import json
import math
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from steps.common import tracking


def format_metrics_line(metrics: dict[str, Any]) -> str:
    parts = []
    for name, value in metrics.items():
        if isinstance(value, float):
            value = f"{value:.6g}" if math.isfinite(value) else str(value)
        parts.append(f"{name}={value}")
    return "[metrics] " + " ".join(parts)


def log_metrics(metrics: dict[str, Any], jsonl_path: Path | None = None,
                tracked: bool = True) -> None:
    """Print one metrics line, append the same values to `jsonl_path`, and (`tracked`) log them
    in the step's MLflow run when it has one, at their "step"."""
    print(format_metrics_line(metrics), flush=True)
    if jsonl_path is not None:
        with open(jsonl_path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(metrics) + "\n")
    run = tracking.current()
    if tracked and run is not None:
        run.log_metrics(metrics)


def peak_memory_mb() -> float:
    """Peak accelerator memory if training ran on a GPU, else the process's peak resident memory."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is in bytes on macOS, in KiB on Linux.
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


class MetricsCallback(TrainerCallback):
    """Turns each Trainer log into a metrics line, and keeps the values for the loss curve.

    Throughput counts non-padding tokens (the Trainer's ``num_input_tokens_seen`` with
    ``include_num_input_tokens_seen="non_padding"``) between two logs.

    `renamed` passes more of a trainer's log entries through, under metric names: for DPO,
    ``{"rewards/margins": "reward_margin"}`` makes ``reward_margin=...`` part of each training line
    and ``eval_reward_margin=...`` part of the evaluation line.
    """

    def __init__(self, jsonl_path: Path | None = None,
                 renamed: dict[str, str] | None = None) -> None:
        self.jsonl_path = jsonl_path
        self.renamed = dict(renamed or {})
        self.history: list[dict[str, Any]] = []
        self._last_time = time.perf_counter()
        self._last_tokens = 0
        self.tokens_at_start = 0  # tokens a resumed run had already seen before this process

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs
    ) -> None:
        self._last_time, self._last_tokens = time.perf_counter(), state.num_input_tokens_seen
        self.tokens_at_start = state.num_input_tokens_seen

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs,
    ) -> None:
        if not state.is_world_process_zero or not logs:
            return
        metrics: dict[str, Any] = {
            "step": state.global_step,
            "epoch": round(float(state.epoch or 0.0), 4),
        }
        if "loss" in logs:
            now, tokens = time.perf_counter(), state.num_input_tokens_seen
            metrics["train_loss"] = float(logs["loss"])
            metrics["learning_rate"] = float(logs.get("learning_rate", 0.0))
            if "grad_norm" in logs:
                metrics["grad_norm"] = float(logs["grad_norm"])
            metrics["tokens_per_second"] = round(
                (tokens - self._last_tokens) / max(now - self._last_time, 1e-9), 1
            )
            self._last_time, self._last_tokens = now, tokens
            metrics.update({name: float(logs[key]) for key, name in self.renamed.items()
                            if key in logs})
        elif "eval_loss" in logs:
            metrics["eval_loss"] = float(logs["eval_loss"])
            metrics.update({f"eval_{name}": float(logs[f"eval_{key}"])
                            for key, name in self.renamed.items() if f"eval_{key}" in logs})
        else:
            return  # the end-of-training summary: the stage logs its own final line
        self.history.append(metrics)
        # The Trainer's own entries reach the step's MLflow run through transformers'
        # MLflowCallback (steps.common.tracking.trainer_callback); only what this line adds does
        # from here.
        log_metrics(metrics, self.jsonl_path, tracked=False)
        run = tracking.current()
        if run is not None and "tokens_per_second" in metrics:
            run.log_metrics({"tokens_per_second": metrics["tokens_per_second"]},
                            step=state.global_step, synchronous=False)


def plot_loss_curve(history: list[dict[str, Any]], path: Path) -> None:
    """Training (and evaluation) loss of one stage against step, as a PNG."""
    plot_loss_curves([("", history)], path)


def plot_loss_curves(
    stages: list[tuple[str, list[dict[str, Any]]]], path: Path
) -> dict[str, dict[str, list[tuple[float, float]]]]:
    """Training (and evaluation) loss against step of one or more stages, as a PNG.

    `stages`: (label, metric history) in training order; with several, each stage's steps follow
    the last step drawn before it, one colour per stage, the names prefixed by its label. Returns
    the points drawn, {label: {"train_loss": [(x, loss), ...], "eval_loss": [...]}}, for the stages
    that have any loss (a stage without is left out).
    """
    import matplotlib

    matplotlib.use("Agg")  # no display in a container
    import matplotlib.pyplot as plt

    drawn: dict[str, dict[str, list[tuple[float, float]]]] = {}
    # Fixed margins (inches of the 7 x 4 figure) that fit the axis labels and tick labels of up to
    # 6 characters: tight_layout's extra draw to measure them was a third of the plot's CPU.
    figure, axes = plt.subplots(figsize=(7, 4), gridspec_kw={
        "left": 0.85 / 7, "right": 1 - 0.15 / 7, "bottom": 0.55 / 4, "top": 1 - 0.15 / 4})
    offset = 0.0
    for index, (label, history) in enumerate(stages):
        points = {name: [(offset + m["step"], m[name]) for m in history
                         if name in m and "step" in m]
                  for name in ("train_loss", "eval_loss")}
        if not any(points.values()):
            continue
        if drawn:
            axes.axvline(offset, color="#9e9e9e", linestyle=":", linewidth=1)
        for name, style in (("train_loss", "-o"), ("eval_loss", "s")):
            if points[name]:
                steps, values = zip(*points[name])
                axes.plot(steps, values, style, markersize=3,
                          label=f"{label}: {name}" if label else name,
                          color=f"C{index}" if label else None)
        drawn[label] = points
        offset = max(x for line in points.values() for x, _ in line)
    axes.set_xlabel("step" if len(stages) == 1 else "step (each stage after the one before)")
    axes.set_ylabel("loss")
    axes.grid(alpha=0.3)
    if drawn:
        axes.legend()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return drawn

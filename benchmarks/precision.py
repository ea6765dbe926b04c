"""Mixed precision and gradient accumulation: what bf16 autocast buys over fp32 on this machine,
and whether gradient accumulation is exact and saves memory.

(a) SFT of the small config-built model (common.SMALL), full fine-tuning and LoRA, in fp32 and in
    bf16 autocast, same data, steps and seed: tokens/s (median of repeats, the variants interleaved)
    and the final train loss.
(b) SFT in fp32 with one global batch split as B x 1, B/2 x 2, B/4 x 4 and B/8 x 8 (micro-batch x
    accumulation steps), same seed and optimizer steps: the train loss against the unsplit batch,
    and the peak resident memory of training, each run in its own process (a process's peak
    memory only grows, so runs sharing one would hide each other's peaks).

    python -m benchmarks.precision [--quick]

The data are text records cut from the demo corpus (CPython's language reference) to exactly
max_seq_length tokens each, so every row is full and no padding is counted or shifts the loss.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks import common

NAME, TITLE, ORDER = "precision", "Mixed precision and gradient accumulation", 40
RESULT_PREFIX = "ACCUMULATION-RESULT "
ACCUMULATION_STEPS = (1, 2, 4, 8)
LEARNING_RATE = 1e-3  # large enough that a few steps move the loss, so differences show

QUICK = {"batch": 2, "seq": 64, "steps": 2, "repeats": 1, "warm_up": False,
         "global_batch": 8, "accumulation_seq": 32, "accumulation_steps": 2,
         "accumulation_repeats": 1}
FULL = {"batch": 8, "seq": 256, "steps": 6, "repeats": 2, "warm_up": True,
        "global_batch": 16, "accumulation_seq": 256, "accumulation_steps": 4,
        "accumulation_repeats": 1}


# --- Shared pieces --------------------------------------------------------------------------------


def text_records(count: int, length: int) -> list[dict[str, str]]:
    """`count` text records of `length` characters, consecutive slices of the demo corpus (the
    tiny tokenizer is byte-level: at least `length` tokens each, so truncation fills the row)."""
    from steps.common.demo_data import demo_corpus

    text = "\n\n".join(record["text"] for record in demo_corpus())
    slices = [text[i:i + length] for i in range(0, len(text) - length, length)]
    return [{"text": slices[i % len(slices)]} for i in range(count)]


def quiet_libraries() -> None:
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def run_sft(config: Any, train_dir: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """common.run_stage, also returning the stage's metric history (training_metrics.jsonl)."""
    from steps import sft

    with common.stage_job({"train": train_dir}) as root:
        sink = io.StringIO()
        try:
            with contextlib.redirect_stdout(sink):
                sft.main(config)
        except BaseException:
            sys.stdout.write(sink.getvalue()[-4000:])
            raise
        model = root / "model"
        summary = json.loads((model / "training_summary.json").read_text())
        history = [json.loads(line) for line in
                   (model / "training_metrics.jsonl").read_text().splitlines() if line.strip()]
    return summary, history


def sft_config(model: Path, **settings: Any):
    from steps.sft import SFTStageConfig

    return SFTStageConfig(base_model=str(model), checkpoint_steps=0, logging_steps=1, seed=42,
                          learning_rate=LEARNING_RATE, packing=False, **settings)


def times(value: float, baseline: float) -> str:
    """'1.40× faster' / '2.10× slower' (value and baseline are rates: higher is faster)."""
    if not baseline or math.isnan(value) or math.isnan(baseline):
        return "—"
    r = value / baseline
    return f"{r:.2f}× faster" if r >= 1 else f"{1 / r:.2f}× slower"


def cpu_bf16_flags() -> list[str]:
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return []
    return sorted(flags & {"avx512_bf16", "amx_bf16", "amx_tile"})


# --- (a) bf16 autocast against fp32 ---------------------------------------------------------------


def measure_precision(root: Path, sizes: dict[str, int]) -> dict[str, Any]:
    from steps.common.models import resolve_precision

    model = common.small_model_folder(root)
    train = root / "train-precision"
    common.write_jsonl(train / "train.jsonl",
                       text_records(sizes["batch"] * sizes["steps"], sizes["seq"]))
    variants = [(method, precision) for method in ("none", "lora")
                for precision in ("fp32", "bf16")]

    def run(method: str, precision: str, steps: int) -> tuple[dict, list]:
        config = sft_config(model, peft_method=method, precision=precision, max_steps=steps,
                            per_device_batch_size=sizes["batch"], max_seq_length=sizes["seq"])
        return run_sft(config, train)

    # One discarded step per precision first: kernels and the allocator warm up there, not in the
    # first measured variant.
    for precision in ("fp32", "bf16") if sizes["warm_up"] else ():
        common.progress(f"warm-up: {precision}")
        run("none", precision, 1)
    runs: dict[str, list[dict[str, Any]]] = {f"{m}/{p}": [] for m, p in variants}
    for repeat in range(sizes["repeats"]):
        # Rotated each repeat, so no variant always runs first or last.
        order = variants[repeat % len(variants):] + variants[:repeat % len(variants)]
        for method, precision in order:
            common.progress(f"repeat {repeat + 1}/{sizes['repeats']}: {method} {precision}")
            summary, history = run(method, precision, sizes["steps"])
            training = summary["training"]
            runs[f"{method}/{precision}"].append({
                "tokens_per_second": training["tokens_per_second"],
                "final_train_loss": training["final_train_loss"],
                "runtime_s": training["runtime_s"],
                "tokens": training["tokens"],
                "trainable_parameters": training["trainable_parameters"],
                "precision_used": summary["precision"],
                "losses": [h["train_loss"] for h in history if "train_loss" in h],
            })
    return {"runs": runs, "auto_picks": resolve_precision("auto"), "cpu_flags": cpu_bf16_flags(),
            "settings": {"per_device_batch_size": sizes["batch"], "max_seq_length": sizes["seq"],
                         "max_steps": sizes["steps"], "repeats": sizes["repeats"],
                         "warm_up": sizes["warm_up"],
                         "learning_rate": LEARNING_RATE, "seed": 42}}


# --- (b) gradient accumulation: one process per run ----------------------------------------------


def one_accumulation_run(accumulation: int, work: Path, global_batch: int, seq: int,
                         steps: int) -> None:
    """In a fresh process: train with `accumulation` steps, print the figures as one JSON line."""
    import torch  # noqa: F401 (imported before the baseline, as the stage imports it)

    from steps import sft  # noqa: F401

    quiet_libraries()
    model, train = work / "model", work / "train"
    config = sft_config(model, peft_method="none", precision="fp32", max_steps=steps,
                        per_device_batch_size=global_batch // accumulation,
                        gradient_accumulation_steps=accumulation, max_seq_length=seq)
    common.reset_peak_rss()
    before = common.rss_mb()
    summary, history = run_sft(config, train)
    peak = common.peak_rss_mb()
    print(RESULT_PREFIX + json.dumps({
        "accumulation": accumulation,
        "micro_batch": global_batch // accumulation,
        "rss_before_mb": round(before, 1),
        "peak_rss_mb": round(peak, 1),
        "peak_increase_mb": round(peak - before, 1),
        "final_train_loss": summary["training"]["final_train_loss"],
        "tokens_per_second": summary["training"]["tokens_per_second"],
        "global_step": summary["training"]["global_step"],
        "losses": [h["train_loss"] for h in history if "train_loss" in h],
    }), flush=True)


def measure_accumulation(root: Path, sizes: dict[str, int]) -> dict[str, Any]:
    work = root / "accumulation"
    model = common.small_model_folder(root)
    work.mkdir(parents=True, exist_ok=True)
    (work / "model").symlink_to(model, target_is_directory=True)
    common.write_jsonl(work / "train" / "train.jsonl",
                       text_records(sizes["global_batch"] * sizes["accumulation_steps"],
                                    sizes["accumulation_seq"]))
    runs: dict[int, list[dict[str, Any]]] = {a: [] for a in ACCUMULATION_STEPS}
    for repeat in range(sizes["accumulation_repeats"]):
        order = list(ACCUMULATION_STEPS)
        if repeat % 2:
            order.reverse()  # interleaved both ways: drift on the machine spreads over all
        for accumulation in order:
            common.progress(f"repeat {repeat + 1}/{sizes['accumulation_repeats']}: "
                            f"{sizes['global_batch'] // accumulation} x {accumulation} "
                            "(own process)")
            command = [sys.executable, "-m", "benchmarks.precision", "--one-accumulation-run",
                       str(accumulation), "--work", str(work),
                       "--global-batch", str(sizes["global_batch"]),
                       "--seq", str(sizes["accumulation_seq"]),
                       "--steps", str(sizes["accumulation_steps"])]
            path = [str(common.ROOT), os.environ.get("PYTHONPATH")]
            done = subprocess.run(command, cwd=common.ROOT, capture_output=True, text=True,
                                  check=False,
                                  env={**os.environ,
                                       "PYTHONPATH": os.pathsep.join(filter(None, path))})
            lines = [ln for ln in done.stdout.splitlines() if ln.startswith(RESULT_PREFIX)]
            if done.returncode != 0 or not lines:
                sys.stderr.write(done.stdout[-3000:] + done.stderr[-3000:])
                raise SystemExit(f"accumulation run {accumulation} failed ({done.returncode})")
            runs[accumulation].append(json.loads(lines[-1][len(RESULT_PREFIX):]))
    return {"runs": {str(a): r for a, r in runs.items()},
            "settings": {"global_batch": sizes["global_batch"],
                         "max_seq_length": sizes["accumulation_seq"],
                         "max_steps": sizes["accumulation_steps"],
                         "repeats": sizes["accumulation_repeats"], "precision": "fp32",
                         "peft_method": "none", "learning_rate": LEARNING_RATE, "seed": 42}}


# --- Figures, plots and the section ---------------------------------------------------------------


def summarise(precision: dict[str, Any], accumulation: dict[str, Any]) -> dict[str, Any]:
    figures: dict[str, Any] = {"precision": {}, "accumulation": {}}
    for key, runs in precision["runs"].items():
        rates = [r["tokens_per_second"] for r in runs]
        figures["precision"][key] = {
            "tokens_per_second": common.median(rates), "all": rates,
            "final_train_loss": common.median([r["final_train_loss"] for r in runs]),
            "trainable_parameters": runs[0]["trainable_parameters"],
        }
    base = accumulation["runs"]["1"]
    base_losses = base[0]["losses"]
    for key, runs in accumulation["runs"].items():
        losses = runs[0]["losses"]
        figures["accumulation"][key] = {
            "micro_batch": runs[0]["micro_batch"],
            "final_train_loss": runs[0]["final_train_loss"],
            "final_loss_difference": abs(runs[0]["final_train_loss"] - base[0]["final_train_loss"]),
            "max_loss_difference": max((abs(a - b) for a, b in zip(losses, base_losses)),
                                       default=float("nan")),
            "peak_rss_mb": common.median([r["peak_rss_mb"] for r in runs]),
            "peak_increase_mb": common.median([r["peak_increase_mb"] for r in runs]),
            "increases": [r["peak_increase_mb"] for r in runs],
            "tokens_per_second": common.median([r["tokens_per_second"] for r in runs]),
        }
    return figures


def plot(precision: dict[str, Any], accumulation: dict[str, Any], figures: dict[str, Any]
         ) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    # bf16 against fp32
    fig, ax = plt.subplots(figsize=(6, 3.6))
    methods = [("none", "full fine-tuning"), ("lora", "LoRA")]
    colours = [("fp32", "tab:blue"), ("bf16", "tab:orange")]
    for offset, (precision_name, colour) in enumerate(colours):
        values = [figures["precision"][f"{m}/{precision_name}"] for m, _ in methods]
        medians = [v["tokens_per_second"] for v in values]
        low = [m - min(v["all"]) for m, v in zip(medians, values)]
        high = [max(v["all"]) - m for m, v in zip(medians, values)]
        ax.bar([i + offset * 0.38 for i in range(len(methods))], medians, width=0.38,
               yerr=[low, high], capsize=3, label=precision_name, color=colour)
    ax.set_xticks([i + 0.19 for i in range(len(methods))], [label for _, label in methods])
    ax.set_ylabel("tokens/s (median, min–max)")
    ax.set_title("SFT of the small model: fp32 vs bf16 autocast")
    ax.legend()
    names.append(common.save_figure(fig, f"{NAME}-bf16"))

    # gradient accumulation: loss curves, their difference from GA=1, memory
    fig, (curves, differences, memory) = plt.subplots(1, 3, figsize=(13, 3.8))
    base = accumulation["runs"]["1"][0]["losses"]
    markers = {"1": "o", "2": "s", "4": "^", "8": "x"}
    for key, runs in accumulation["runs"].items():
        losses = runs[0]["losses"]
        label = f"{runs[0]['micro_batch']} × {key}"
        curves.plot(range(1, len(losses) + 1), losses, marker=markers.get(key, "."),
                    linestyle="-" if key == "1" else "--", label=label, alpha=0.8)
        if key != "1":
            gaps = [max(abs(a - b), 1e-9) for a, b in zip(losses, base)]
            differences.plot(range(1, len(gaps) + 1), gaps, marker=markers.get(key, "."),
                             label=label)
    from matplotlib.ticker import MaxNLocator

    for axis in (curves, differences):
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    curves.set_xlabel("optimizer step")
    curves.set_ylabel("train loss")
    curves.set_title("loss per step (micro-batch × GA)")
    curves.legend()
    differences.set_yscale("log")
    differences.set_xlabel("optimizer step")
    differences.set_ylabel("|loss − loss at GA=1| (floor 1e-9)")
    differences.set_title("difference from the unsplit batch")
    differences.legend()
    keys = list(accumulation["runs"])
    increases = [figures["accumulation"][k]["peak_increase_mb"] for k in keys]
    bars = memory.bar([f"{figures['accumulation'][k]['micro_batch']} × {k}" for k in keys],
                      increases, color="tab:green")
    for bar, key in zip(bars, keys):
        memory.annotate(f"peak {figures['accumulation'][key]['peak_rss_mb']:,.0f} MB",
                        (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=8)
    memory.set_ylabel("peak RSS increase in training (MB)")
    memory.set_title("training memory per GA value")
    names.append(common.save_figure(fig, f"{NAME}-accumulation"))
    return names


def render(precision: dict[str, Any], accumulation: dict[str, Any], figures: dict[str, Any],
           quick: bool) -> str:
    p, a = figures["precision"], figures["accumulation"]
    ps, acs = precision["settings"], accumulation["settings"]
    native = bool({"avx512_bf16", "amx_bf16"} & set(precision["cpu_flags"]))
    lines = [
        "**What is measured.** (a) SFT of the small config-built Llama "
        f"({p['none/fp32']['trainable_parameters']:,} parameters; the tiny byte-level "
        "tokenizer) with full fine-tuning and with LoRA "
        f"({p['lora/fp32']['trainable_parameters']:,} trainable parameters), each in fp32 and "
        f"in bf16 autocast: {ps['max_steps']} optimizer steps of "
        f"{ps['per_device_batch_size']} rows × {ps['max_seq_length']} tokens, learning rate "
        f"{ps['learning_rate']:g}, seed {ps['seed']}. Tokens/s is the stage's own figure "
        "(non-padding tokens over `trainer.train()`), the median of "
        f"{ps['repeats']} run(s) per variant, the variants interleaved in one process"
        + (" after one discarded warm-up run per precision. " if ps.get("warm_up") else ". ")
        + "(b) SFT in fp32 (full fine-tuning) with one global batch of "
        f"{acs['global_batch']} rows × {acs['max_seq_length']} tokens, split into micro-batch × "
        f"gradient-accumulation (GA) steps, {acs['max_steps']} optimizer steps, same seed; "
        "each run in its own process, whose peak resident memory (VmHWM, reset just before the "
        "stage's `main`) is compared with its resident memory at that moment (after imports and "
        f"data writing), the median of {acs['repeats']} run(s) per GA value. The data are text "
        "records cut from the demo corpus to exactly the sequence length: every row is full, "
        "nothing is padding.",
        "",
        ("| method | precision | tokens/s (median, min–max) | vs fp32 | final train loss "
        "| loss − fp32 |"),
        "|---|---|---|---|---|---|",
    ]
    for method, label in (("none", "full fine-tuning"), ("lora", "LoRA")):
        for precision_name in ("fp32", "bf16"):
            v, base = p[f"{method}/{precision_name}"], p[f"{method}/fp32"]
            lines.append(
                f"| {label} | {precision_name} | {common.spread(v['all'])} | "
                f"{common.ratio(v['tokens_per_second'], base['tokens_per_second'])} | "
                f"{v['final_train_loss']:.5f} | "
                f"{v['final_train_loss'] - base['final_train_loss']:+.2e} |")
    full_ratio = p["none/bf16"]["tokens_per_second"] / p["none/fp32"]["tokens_per_second"]
    lora_ratio = p["lora/bf16"]["tokens_per_second"] / p["lora/fp32"]["tokens_per_second"]
    flags = ", ".join(precision["cpu_flags"]) or "neither avx512_bf16 nor amx_bf16"
    lines += [
        "",
        (f"**bf16.** bf16 autocast is "
        f"{times(p['none/bf16']['tokens_per_second'], p['none/fp32']['tokens_per_second'])} than "
        f"fp32 for full fine-tuning (bf16/fp32 = {full_ratio:.2f}) and "
        f"{times(p['lora/bf16']['tokens_per_second'], p['lora/fp32']['tokens_per_second'])} for "
        f"LoRA ({lora_ratio:.2f}). The CPU flags show {flags}: this CPU "
        f"{'has' if native else 'has no'} native bf16 arithmetic, and `precision=auto` picks "
        f"**{precision['auto_picks']}** here."),
    ]
    best_is_bf16 = full_ratio > 1 and lora_ratio > 1
    if precision["auto_picks"] == "bf16" and not best_is_bf16:
        lines[-1] += (" That choice costs speed on this machine: bf16 is not faster in both "
                      "methods.")
    elif precision["auto_picks"] == "fp32" and best_is_bf16:
        lines[-1] += (" That choice leaves speed unused on this machine: bf16 is faster in both "
                      "methods.")
    else:
        lines[-1] += " That choice is the faster one in these figures."
    if not native and min(full_ratio, lora_ratio) < 1:
        lines[-1] += (" Without native bf16 instructions the CPU converts between bf16 and fp32 "
                      "around fp32 arithmetic: autocast adds that work instead of saving any.")
    first_gaps, final_gaps = [], []
    for method in ("none", "lora"):
        low = precision["runs"][f"{method}/bf16"][0]["losses"]
        full = precision["runs"][f"{method}/fp32"][0]["losses"]
        if low and full:
            first_gaps.append(abs(low[0] - full[0]))
            final_gaps.append(abs(low[-1] - full[-1]))
    if first_gaps:
        lines[-1] += (f" bf16's train loss differs from fp32's by at most {max(first_gaps):.1e} at "
                      f"the first step and {max(final_gaps):.1e} at step {ps['max_steps']}: "
                      "autocast rounds the matrix products to bf16's 8-bit significand, so the "
                      "runs are close but not the same computation.")

    lines += [
        "",
        ("| micro-batch × GA | final train loss | Δ vs GA=1, final step (abs) | "
        "largest Δ over the run (abs) | peak RSS (MB) | training increase (MB) | tokens/s |"),
        "|---|---|---|---|---|---|---|",
    ]
    for key, v in a.items():
        lines.append(
            f"| {v['micro_batch']} × {key} | {v['final_train_loss']:.6f} | "
            f"{v['final_loss_difference']:.1e} | {v['max_loss_difference']:.1e} | "
            f"{v['peak_rss_mb']:,.0f} | {common.spread(v['increases'])} | "
            f"{v['tokens_per_second']:,.0f} |")
    others = [v for k, v in a.items() if k != "1"]
    worst = max(v["max_loss_difference"] for v in others)
    verdict = ("within" if worst <= 1e-4 else "outside")
    increases = [a[k]["peak_increase_mb"] for k in a]
    first, last = increases[0], increases[-1]
    # "flat or falling": no step up by more than 5% of GA=1's increase (RSS moves by a few MB).
    tolerance = max(0.05 * abs(first), 5.0)
    non_increasing = all(b <= x + tolerance for x, b in itertools.pairwise(increases))
    keys = list(a)
    speed = a[keys[-1]]["tokens_per_second"] / a[keys[0]]["tokens_per_second"]
    lines += [
        "",
        f"**Gradient accumulation.** Splitting the batch changes the train loss by at most "
        f"{worst:.1e} over the whole run (final step: at most "
        f"{max(v['final_loss_difference'] for v in others):.1e}), {verdict} the 1e-4 "
        "that fp32 rounding explains (the same sums taken in another order; 1e-6…1e-4 expected)"
        + (": accumulation is exact, as `steps/common/training.py` promises (the loss is "
           "normalised over the whole accumulated batch)." if verdict == "within" else
           ": larger than rounding alone explains, so the accumulated runs are not the same "
           "computation as the unsplit batch.")
        + f" The memory that training adds goes from {first:,.0f} MB at "
        f"{a[keys[0]]['micro_batch']} × {keys[0]} to {last:,.0f} MB at "
        f"{a[keys[-1]]['micro_batch']} × {keys[-1]} "
        + (f"({first / last:.1f}× less)" if last > 0 and first >= last else
           f"({last / first:.1f}× more)" if first > 0 else "")
        + (": flat or falling in GA, as expected, since only one micro-batch's activations are "
           "alive at a time while weights, gradients and optimizer state stay the same."
           if non_increasing else
           ": not flat or falling in GA; resident memory also holds allocator caches, which do "
           "not shrink with the micro-batch.")
        + f" Tokens/s goes from {a[keys[0]]['tokens_per_second']:,.0f} to "
        f"{a[keys[-1]]['tokens_per_second']:,.0f} ({speed:.2f}×)"
        + (": smaller micro-batches make smaller matrix products, which a CPU runs less "
           "efficiently, so accumulation trades speed for memory." if speed < 0.9 else
           ": accumulation costs no speed here (within 10%)." if speed <= 1.1 else
           ": faster with the smaller micro-batch here (it fits the caches better)."),
    ]
    if quick:
        lines += ["", ("_Quick mode: small sizes and one run per variant; the figures show that "
                  "the benchmark works, not what the machine does._")]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, one repeat")
    parser.add_argument("--one-accumulation-run", type=int, metavar="GA", help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--global-batch", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--seq", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one_accumulation_run:
        one_accumulation_run(args.one_accumulation_run, args.work, args.global_batch, args.seq,
                             args.steps)
        return

    sizes = QUICK if args.quick else FULL
    quiet_libraries()
    with tempfile.TemporaryDirectory(prefix="bench-precision-") as tmp:
        root = Path(tmp)
        precision = measure_precision(root, sizes)
        accumulation = measure_accumulation(root, sizes)
    figures = summarise(precision, accumulation)
    plots = plot(precision, accumulation, figures)
    markdown = render(precision, accumulation, figures, args.quick)
    common.save_result(NAME, TITLE, markdown,
                       {"quick": args.quick, "figures": figures, "bf16": precision,
                        "accumulation": accumulation}, ORDER, plots)


if __name__ == "__main__":
    main()

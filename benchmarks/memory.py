"""Peak memory and trainable parameters of full fine-tuning and each PEFT method, on SmolLM2-135M
and on the small config-built model, through the SFT stage itself.

Each (model, method) trains in a process of its own, so that one run's peak cannot hide another's.
On a GPU the figure is the stage's own `torch.cuda.max_memory_allocated`; on a CPU it is the
peak of the process's anonymous resident memory while the stage loads the model and trains
(common.PeakAnonymousMemory: memory-mapped weight files left out), reported both whole and above
what the process held before the stage started (the interpreter and imported libraries, the same
for every method): the ratios to full fine-tuning use the latter, the memory the training itself
needs.

    python -m benchmarks.memory              # both models, every method
    python -m benchmarks.memory --quick      # the small model only
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from benchmarks import common

METHODS = ("none", "lora", "qlora", "prompt_tuning", "p_tuning", "prefix_tuning")
MODELS = {"smollm2-135m": "builtin:smollm2-135m-instruct", "small": "small"}
# Targets on SmolLM2-135M, as a fraction of full fine-tuning's peak.
TARGETS = {"qlora": 0.35, "lora": 0.6}


def one_run(model: str, method: str, steps: int, batch: int, length: int) -> dict:
    """Train `method` on `model` through steps.sft in this process; its memory figures."""
    import torch

    from steps import demo_data, sft

    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        root = Path(tmp)
        spec = str(common.small_model_folder(root)) if model == "small" else model
        data = common.write_jsonl(root / "train" / "train.jsonl", demo_data.demo_records(64))
        config = sft.SFTStageConfig(base_model=spec, peft_method=method, max_steps=steps,
                                    per_device_batch_size=batch, max_seq_length=length,
                                    checkpoint_steps=0, logging_steps=steps)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        common.reset_peak_rss()
        with common.PeakAnonymousMemory() as anonymous, _marked_at_training(anonymous):
            summary = common.run_stage(sft.main, config, {"train": data.parent})
        training = summary["training"]
        peak_rss = common.peak_rss_mb()
    return {
        "model": model, "method": method,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "peak_mb": training["peak_memory_mb"] if torch.cuda.is_available() else anonymous.peak_mb,
        "before_mb": 0.0 if torch.cuda.is_available() else anonymous.before_mb,
        "peak_rss_mb": peak_rss,
        # On a CPU: the peak from the start of trainer.train() (the model loaded), and what the
        # process held then; loading can peak higher (QLoRA quantizes a float32 copy).
        "training_peak_mb": None if torch.cuda.is_available() else anonymous.peak_since_mark_mb,
        "trainable": training["trainable_parameters"], "total": training["total_parameters"],
        "tokens_per_second": training["tokens_per_second"], "precision": summary["precision"],
    }


@contextlib.contextmanager
def _marked_at_training(anonymous: common.PeakAnonymousMemory) -> Iterator[None]:
    """Marks `anonymous` when trainer.train() starts."""
    import transformers

    original = transformers.Trainer.train

    def train(self, *args, **kwargs):
        anonymous.mark()
        return original(self, *args, **kwargs)

    transformers.Trainer.train = train
    try:
        yield
    finally:
        transformers.Trainer.train = original


def measure(models: list[str], steps: int, batch: int, length: int) -> list[dict]:
    results = []
    for model in models:
        for method in METHODS:
            common.progress(f"{model} {method} ...")
            command = [sys.executable, "-m", "benchmarks.memory", "--one", model, method,
                       "--steps", str(steps), "--batch", str(batch), "--length", str(length)]
            done = subprocess.run(command, cwd=common.ROOT, text=True, capture_output=True,
                                  env={**os.environ, "PYTHONUNBUFFERED": "1"}, check=False)
            lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            if done.returncode or not lines:
                error = (done.stderr.strip().splitlines() or ["no output"])[-1][:200]
                common.progress(f"{model} {method}: failed ({error})")
                results.append({"model": model, "method": method, "error": error})
                continue
            result = json.loads(lines[-1][len("RESULT "):])
            result["training_mb"] = result["peak_mb"] - result["before_mb"]
            if result.get("training_peak_mb") is not None:
                result["training_phase_mb"] = result["training_peak_mb"] - result["before_mb"]
            common.progress(f"{model} {method}: peak {result['peak_mb']:,.0f} MB, "
                            f"{result['training_mb']:,.0f} MB for training")
            results.append(result)
    return results


def render(results: list[dict], steps: int, batch: int, length: int) -> str:
    """The table; targets are judged on the training phase where it was measured (a CPU)."""
    rows, verdicts = [], []
    for model in dict.fromkeys(r["model"] for r in results):
        full = next((r for r in results if r["model"] == model and r["method"] == "none"
                     and "error" not in r), None)
        for r in (r for r in results if r["model"] == model):
            if "error" in r:
                rows.append([model, r["method"], "failed: " + r["error"], "", "", "", "", "", ""])
                continue
            share = r["training_mb"] / full["training_mb"] if full else float("nan")
            phase = r.get("training_phase_mb")
            phase_share = (phase / full["training_phase_mb"]
                           if phase is not None and full and full.get("training_phase_mb")
                           else None)
            judged = phase_share if phase_share is not None else share
            target = TARGETS.get(r["method"]) if model == "smollm2-135m" else None
            verdict = ""
            if target is not None:
                met = "met" if judged <= target else "**missed**"
                verdict = f"≤ {target}×: {met}"
                verdicts.append(f"{r['method']} on SmolLM2-135M needs {judged:.2f}× of full "
                                f"fine-tuning's memory while training (target ≤ {target}×: "
                                f"{met.strip('*')}) and {share:.2f}× over the whole job")
            rows.append([
                model, r["method"], f"{r['peak_mb']:,.0f}", f"{r['training_mb']:,.0f}",
                f"{share:.2f}×", f"{phase:,.0f}" if phase is not None else "—",
                f"{phase_share:.2f}×" if phase_share is not None else "—",
                (f"{r['trainable']:,} of {r['total']:,} "
                 f"({100 * r['trainable'] / r['total']:.3g}%)"), verdict])
    device = results[0].get("device", "cpu") if results else "cpu"
    what = ("peak GPU memory allocated" if device == "cuda" else
            "the peak of the process's anonymous resident memory (RssAnon, sampled every 10 ms: "
            "weights, gradients, optimizer state, activations; not the memory-mapped weight "
            "files, which VmHWM would count whole while a model loads). *Job*: from the stage's "
            "start (loading included) to its end; *training*: from `trainer.train()`'s start; "
            "both above what the process held before the stage started (the interpreter and "
            "libraries)")
    return (
        f"SFT stage, {steps} optimizer steps of batch {batch} × up to {length} tokens on the demo "
        f"SFT records, in the stage's default precision; {what}. Ratios are to full fine-tuning "
        "(`none`); the targets are judged on the training phase.\n\n"
        + common.table(["model", "method", "job peak MB", "job MB", "job vs full",
                        "training MB", "training vs full", "trainable parameters", "target"],
                       rows)
        + ("\n\n" + "; ".join(verdicts) + "." if verdicts else "")
        + (" Why QLoRA misses here (the likely cause, not isolated by this script): at 135M "
           "parameters the frozen weights are a small part of what training holds, so storing "
           "them in 4 bits saves little, while bitsandbytes dequantizes each 4-bit weight for "
           "every matrix product, forward and backward, which adds float32 copies; QLoRA pays "
           "off where the weights dominate, on models many times larger."
           if any("qlora" in v and "missed" in v for v in verdicts) else "")
        + "\n\nQLoRA holds the frozen base in 4-bit NF4 (embeddings and the output head stay in "
        "float32, as bitsandbytes quantizes linear layers only); LoRA holds it in float32 but "
        "needs gradients and AdamW state for the adapters alone; full fine-tuning holds "
        "weights, gradients and two AdamW moments for every parameter. On a CPU, QLoRA's job "
        "peak includes loading: bitsandbytes quantizes each float32 weight after reading it (on "
        "a GPU it quantizes while moving it there)."
    )


def plot(results: list[dict]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in results))
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 3.8), squeeze=False)
    for ax, model in zip(axes[0], models):
        rows = [r for r in results if r["model"] == model and "error" not in r]
        ax.bar([r["method"] for r in rows],
               [r.get("training_phase_mb") or r["training_mb"] for r in rows], color="#4c72b0")
        ax.set_title(f"{model}: memory while training")
        ax.set_ylabel("MB above the process's start")
        ax.tick_params(axis="x", rotation=30)
    return common.save_figure(fig, "memory")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "METHOD"), help=argparse.SUPPRESS)
    parser.add_argument("--models", default=",".join(MODELS), help="smollm2-135m,small")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--quick", action="store_true", help="the small model only, 2 steps")
    parser.add_argument("--render", action="store_true",
                        help="re-render results/memory.json from its saved figures")
    args = parser.parse_args()
    if args.render:
        saved = json.loads((common.RESULTS_DIR / "memory.json").read_text())
        data = saved["data"]
        common.save_result("memory", saved["title"], render(data["results"], data["steps"],
                                                           data["batch"], data["length"]),
                           data, order=saved["order"], plots=saved["plots"],
                           environment=saved["environment"], command=saved["command"])
        return
    if args.one:
        model, method = args.one
        result = one_run(MODELS.get(model, model), method, args.steps, args.batch, args.length)
        result["model"] = model
        print("RESULT " + json.dumps(result), flush=True)
        return
    models = ["small"] if args.quick else [m for m in args.models.split(",") if m]
    steps = 2 if args.quick else args.steps
    results = measure(models, steps, args.batch, args.length)
    common.save_result("memory", "Peak memory per method", render(results, steps, args.batch,
                                                                  args.length),
                       {"results": results, "steps": steps, "batch": args.batch,
                        "length": args.length}, order=20, plots=[plot(results)])


if __name__ == "__main__":
    main()

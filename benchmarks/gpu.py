"""SFT, LoRA and QLoRA on SmolLM2-135M on one GPU: throughput against TRL's defaults and a plain
Trainer, peak GPU memory, and model FLOPs utilisation (MFU). One call, well inside ten minutes on
an H100.

The model is SmolLM2-135M's architecture and tokenizer with random weights: throughput, memory and
MFU depend on the shapes, not the values, and the weights (540 MB) need not travel to the GPU
machine. Data: the demo corpus as text, packed into full rows (`packing=true`), so every token of
every row is work.

    python -m benchmarks.gpu --prepare DIR   # here: SmolLM2's config and tokenizer into DIR
    python -m benchmarks.gpu --model DIR     # there: the benchmark; results/gpu.json
    python -m benchmarks.gpu --model DIR --quick   # does it run? (also on a CPU)

MFU = tokens/s × FLOPs per token / the GPU's peak dense bf16 FLOP/s, FLOPs per token by the usual
convention 6·N + 12·layers·hidden·sequence (N: parameters, the tied output head counted once; the
second term is attention's score and value products). PEFT methods do less work than 6·N (no
weight gradients for the frozen base), so their MFU by this convention says how fast the same model
trains, not how busy the GPU is.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import tempfile
from pathlib import Path

from benchmarks import common

METHODS = ("none", "lora", "qlora")
# Peak dense bf16 FLOP/s by GPU name (vendor data sheets).
PEAK_BF16 = {"H100 80GB HBM3": 989e12, "H100 PCIe": 756e12, "H100 NVL": 835e12, "H200": 989e12,
             "A100": 312e12, "L4": 121e12, "A10G": 70e12}


def prepare(folder: Path) -> None:
    """SmolLM2-135M's config and tokenizer (no weights) into `folder`, a few MB."""
    from steps.common import models

    source = models._smollm2_folder()
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json", "chat_template.jinja"):
        if (source / name).exists():
            shutil.copy(source / name, folder / name)
    print(f"wrote SmolLM2-135M's config and tokenizer to {folder}")


def random_weights_model(spec: Path, root: Path) -> Path:
    """A model folder: `spec`'s config and tokenizer, seeded random weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = root / "smollm2-135m-random"
    shutil.copytree(spec, folder)
    config = AutoConfig.from_pretrained(spec)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


def flops_per_token(config, length: int) -> tuple[float, int]:
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        parameters = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    attention = 12 * config.num_hidden_layers * config.hidden_size * length
    return 6 * parameters + attention, parameters


def peak_flops() -> tuple[float | None, str]:
    import torch

    if not torch.cuda.is_available():
        return None, "cpu"
    name = torch.cuda.get_device_name(0)
    for key, value in PEAK_BF16.items():
        if key in name:
            return value, name
    return None, name


def run_once(way: str, method: str, model: Path, corpus: Path, shape, out: str) -> dict:
    import torch
    from datasets import Dataset

    from benchmarks import throughput as tp
    from steps import sft

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    if way == "project":
        config = sft.SFTStageConfig(base_model=str(model), peft_method=method, packing=True,
                                    max_steps=shape.steps, per_device_batch_size=shape.batch,
                                    max_seq_length=shape.length, checkpoint_steps=0,
                                    logging_steps=shape.steps)
        summary = common.run_stage(sft.main, config, {"train": corpus.parent})
        tps = summary["training"]["tokens_per_second"]
    else:
        from steps.common.models import load_tokenizer

        tokenizer = load_tokenizer(str(model))
        texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
        loaded = tp.load(model, method)
        if way == "trl":
            from trl import SFTConfig, SFTTrainer

            trainer = SFTTrainer(
                model=loaded, peft_config=tp.adapter_config(loaded, method), processing_class=tokenizer,
                train_dataset=Dataset.from_list([{"text": t} for t in texts]),
                args=tp.baseline_arguments(SFTConfig, shape, out, max_length=shape.length,
                                           packing=True))
        else:
            from peft import get_peft_model
            from transformers import Trainer, default_data_collator

            dataset = tp.blocks_dataset(tokenizer, texts, shape.length)
            if method != "none":
                loaded = get_peft_model(loaded, tp.adapter_config(loaded, method))
            trainer = Trainer(model=loaded, args=tp.plain_arguments(shape, out),
                              train_dataset=dataset, data_collator=default_data_collator)
        tps = tp.tokens_per_second(trainer)
        del trainer, loaded
    peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    return {"way": way, "method": method, "tokens_per_second": tps, "peak_mb": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prepare", type=Path, help="write SmolLM2's config and tokenizer here")
    parser.add_argument("--model", type=Path, help="a folder --prepare wrote")
    parser.add_argument("--render", type=Path, help="re-render a saved results/gpu.json")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated")
    parser.add_argument("--quick", action="store_true", help="1 repeat of 2 steps, batch 2")
    args = parser.parse_args()
    if args.prepare:
        prepare(args.prepare)
        return
    if args.render:
        saved = json.loads(args.render.read_text())
        data = saved["data"]
        if data["methods"] and isinstance(data["methods"][0], dict):  # as rendered: the names
            data["methods"] = [m["method"] for m in data["methods"]]
        environment = saved["environment"]
        text, rendered = render(data)
        common.save_result("gpu", saved["title"], text, rendered, order=saved["order"],
                           environment=environment, command=saved["command"])
        return
    if not args.model or not (args.model / "config.json").exists():
        parser.error("--model needs a folder written by --prepare")

    from transformers import AutoConfig

    from benchmarks.throughput import Shape
    from steps.common import demo_data

    shape = (Shape(2, args.length, 2) if args.quick
             else Shape(args.batch, args.length, args.steps))
    repeats = 1 if args.quick else args.repeats
    methods = [m for m in args.methods.split(",") if m in METHODS]
    peak, device = peak_flops()
    per_token, parameters = flops_per_token(AutoConfig.from_pretrained(args.model), shape.length)
    runs: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        root = Path(tmp)
        model = random_weights_model(args.model, root)
        corpus = common.write_jsonl(root / "corpus" / "train.jsonl",
                                    [{"text": d["text"]} for d in demo_data.demo_corpus()])
        # One untimed run first: CUDA's start-up and kernel loading are nobody's throughput.
        with tempfile.TemporaryDirectory(dir=tmp) as out:
            run_once("plain", "none", model, corpus, Shape(2, shape.length, 2), out)
        for repeat in range(repeats):
            for method in methods:
                for way in ("project", "trl", "plain"):
                    with tempfile.TemporaryDirectory(dir=tmp) as out:
                        try:
                            run = run_once(way, method, model, corpus, shape, out)
                        except Exception as err:  # noqa: BLE001 (a run that cannot run here)
                            run = {"way": way, "method": method,
                                   "error": f"{type(err).__name__}: {str(err)[:200]}"}
                    runs.append(run)
                    common.progress(f"repeat {repeat + 1}/{repeats} {method:6s} {way:8s} "
                                    + (f"{run['tokens_per_second']:,.0f} tokens/s, peak "
                                       f"{run['peak_mb'] or 0:,.0f} MB" if "error" not in run
                                       else run["error"]))
    save(render({"device": device, "shape": shape.__dict__, "repeats": repeats,
                 "flops_per_token": per_token, "parameters": parameters, "peak_flops": peak,
                 "methods": methods, "runs": runs}))


def render(measured: dict) -> tuple[str, dict]:
    """The section's Markdown and data from the runs (also `--render` of a saved gpu.json)."""
    from benchmarks.throughput import TARGET_VS_PLAIN, TARGET_VS_TRL

    runs, shape = measured["runs"], measured["shape"]
    per_token, peak = measured["flops_per_token"], measured["peak_flops"]
    rows, data, misses = [], [], []
    for method in measured["methods"]:
        cell = {}
        for way in ("project", "trl", "plain"):
            mine = [r for r in runs if r["method"] == method and r["way"] == way]
            done = [r for r in mine if "error" not in r]
            cell[way] = {"tps": [r["tokens_per_second"] for r in done],
                         "peak_mb": common.median([r["peak_mb"] for r in done
                                                   if r["peak_mb"] is not None]),
                         "error": next((r["error"] for r in mine if "error" in r), None)
                         if not done else None}
        tps = common.median(cell["project"]["tps"])
        vs_trl = tps / common.median(cell["trl"]["tps"]) if cell["trl"]["tps"] else None
        vs_plain = tps / common.median(cell["plain"]["tps"]) if cell["plain"]["tps"] else None
        mfu = tps * per_token / peak if peak and cell["project"]["tps"] else None
        full = next((d for d in data if d["method"] == "none"), None)
        if vs_trl is not None and vs_trl < TARGET_VS_TRL:
            misses.append(f"{method} vs TRL ({vs_trl:.2f}×)")
        if vs_plain is not None and vs_plain < TARGET_VS_PLAIN:
            misses.append(f"{method} vs plain ({vs_plain:.2f}×)")
        rows.append([
            method, common.spread(cell["project"]["tps"]) if cell["project"]["tps"]
            else f"failed: {cell['project']['error']}",
            common.spread(cell["trl"]["tps"]) if cell["trl"]["tps"] else "failed",
            common.spread(cell["plain"]["tps"]) if cell["plain"]["tps"] else "failed",
            f"{vs_trl:.2f}×" if vs_trl else "—", f"{vs_plain:.2f}×" if vs_plain else "—",
            f"{cell['project']['peak_mb']:,.0f}" if cell["project"]["tps"] else "—",
            f"{cell['trl']['peak_mb']:,.0f}" if cell["trl"]["tps"] else "—",
            "1.00×" if method == "none" else
            common.ratio(cell["project"]["peak_mb"], full["peak_mb"]) if full else "—",
            f"{100 * mfu:.1f}%" if mfu is not None else "—",
        ])
        data.append({"method": method, **cell, "mfu": mfu, "vs_trl": vs_trl,
                     "vs_plain": vs_plain, "peak_mb": cell["project"]["peak_mb"]})
    text = (
        f"{measured['device']}; SmolLM2-135M architecture ({measured['parameters'] / 1e6:.1f}M "
        f"parameters, random weights), SFT on packed demo-corpus text, {shape['steps']} optimizer "
        f"steps of batch {shape['batch']} × {shape['length']} tokens, stage default precision; "
        f"median (min–max) of {measured['repeats']} interleaved runs after one untimed warm-up. "
        "Peak memory: `torch.cuda.max_memory_allocated` during the run. MFU: "
        f"{per_token / 1e6:.0f} MFLOPs per token against "
        + (f"{peak / 1e12:.0f} TFLOP/s dense bf16." if peak else "no known peak (not a GPU).")
        + "\n\n" + common.table(["method", "project tokens/s", "TRL defaults", "plain Trainer",
                                 "vs TRL", "vs plain", "project peak MB", "TRL peak MB",
                                 "vs full", "MFU"], rows)
        + f"\n\nTargets: at least {TARGET_VS_TRL}× TRL's defaults and {TARGET_VS_PLAIN}× a "
        "plain Trainer. "
        + (("Missed here: " + ", ".join(misses) + ". Why: on this GPU, bf16 is native and TRL's "
            "activation checkpointing and chunked output head cost it far less than on a CPU "
            "(they also keep its peak memory several times lower, the column beside). Against "
            "the plain Trainer the likely cause, not isolated by this script: the plain "
            "Trainer cuts the text into blocks in which documents attend to each other, which "
            "SDPA runs with its fused causal kernel; the stage keeps each packed document to "
            "itself (position ids restart per document), which SDPA runs as a masked attention, "
            "without the fused causal kernel: the price of not training on text that crosses "
            "document boundaries. ") if misses else "Both are met. ")
        + "A 135M-parameter model cannot fill an H100: kernel launches and the optimizer step, "
        "not the matrix units, bound the step, so MFU stays low; it grows with batch, sequence "
        "and model size."
    )
    return text, {**measured, "methods": data}


def save(rendered: tuple[str, dict]) -> None:
    text, data = rendered
    common.save_result("gpu", "GPU: SFT, LoRA and QLoRA on SmolLM2-135M", text, data, order=30)


if __name__ == "__main__":
    main()

"""Quantization (processing stage): 8-bit and 4-bit weight-only versions of a model, measured
against the full-precision model they came from.

    python -m steps.quantize --model-dir MODEL --output-dir OUT [--scheme int8|nf4|both]
        [--data-dir DATA] [--max-samples 16] [--max-new-tokens 32] [--speed-runs 3]

--model-dir holds a model folder, a LoRA adapter folder (merged into its full-precision base first:
merging into already-quantized weights would bake the rounding error into the adapter's update),
a model.tar.gz or a folder holding one, or a builtin spec. An already-quantized model is refused:
quantizing it again compounds the error, and there is no full-precision reference to measure
against. --data-dir (a data preparation output's validation.jsonl, or a data file or folder) is
optional: without it only size, load time and speed are measured.

Schemes, both with bitsandbytes through transformers' BitsAndBytesConfig, on a CPU or a GPU:
  int8  LLM.int8(): every linear layer's weights in 8 bits (Linear8bitLt), activations with
        outlier features kept in 16 bits;
  nf4   4-bit NormalFloat with double quantization (the QLoRA format, Linear4bit): about 4.4 bits
        per weight; computes in `compute_dtype`.
transformers keeps the output head (lm_head) and the embeddings in full precision. Each variant is
saved as a real quantized checkpoint (transformers 5.24 saves and reloads both bitsandbytes formats
in safetensors; the quantization config goes into its config.json, so from_pretrained reloads it
quantized with no extra argument), with the tokenizer and a training_summary.json carrying a
`quantization` record (scheme, library, version) for the registry.

Per variant, and for the full-precision reference, it measures: size on disk of the weights, load
time, memory footprint, generation speed (new tokens per second, greedy, batch 1, the median of
`speed_runs` runs after a warm-up) and, with data, the mean token loss and perplexity on the
responses and ROUGE-L / exact match of greedy answers against the references, as steps.evaluate
measures them (steps.common.scoring), and agreement with the reference model's own answers.

Writes to --output-dir, all or nothing: int8/ and/or nf4/ (each a loadable model folder),
quantization.json and quantization_comparison.png. quantization.json:

    {"source_model", "merged_adapter", "library", "library_version", "device", "data",
     "num_loss_examples", "num_samples", "speed": {"runs", "new_tokens"},
     "variants": {"reference" | "int8" | "nf4": {
         "scheme", "folder", "size_bytes", "load_s", "memory_bytes", "tokens_per_second",
         "eval_loss", "perplexity", "rouge_l", "exact_match", "agreement",
         and for int8 / nf4: "size_ratio", "eval_loss_delta", "perplexity_delta",
         "perplexity_ratio", "rouge_l_delta", "tokens_per_second_ratio"}}}
"""

from __future__ import annotations

import json
import logging
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, PreTrainedModel

from steps.common import contract
from steps.common.archives import pack_folder
from steps.common.contract import StageError
from steps.common.datasets import load_records, sft_example
from steps.common.models import (
    SMOLLM2,
    TINY,
    adapter_base,
    load_model,
    load_tokenizer,
    local_model_folder,
    resolve_model_source,
)
from steps.common.peft_methods import merge_adapter
from steps.common.scoring import (
    exact_match,
    example_losses,
    generate,
    mean_loss,
    perplexity,
    prompt_and_completion,
    response_text,
    rouge_l,
)
from steps.common.training import HISTORY_FILE, LINEAGE_FILE
from steps.quantize_config import QuantizeConfig

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SPEED_PROMPT = "Tell me about the sea."




def main(config: QuantizeConfig) -> None:
    # bitsandbytes logs a line at every 8-bit matmul whose input is not float16 (on a CPU, all of
    # them): information about its kernel, nothing a user acts on.
    logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
    source = (config.model_dir if config.model_dir in (TINY, SMOLLM2)
              else resolve_model_source(Path(config.model_dir), config.model_dir))
    _refuse_quantized(source, config.base_model)
    examples, pairs = _evaluation_data(config, source)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    import bitsandbytes

    with tempfile.TemporaryDirectory(prefix="quantize-") as work:
        # 1. The full-precision reference as a folder: bitsandbytes quantizes while loading files.
        reference_dir, merged = _full_precision_folder(source, config.base_model, Path(work))
        tokenizer = load_tokenizer(str(reference_dir))
        print(f"reference: {source}{' (adapter merged into its base)' if merged else ''}",
              flush=True)
        results = {"reference": _measure("reference", reference_dir, tokenizer, examples, pairs,
                                         None, config)}
        reference_answers = results["reference"].pop("answers")
        summary_path = reference_dir / "training_summary.json"
        source_summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}

        # 2. Each scheme: quantize from the reference files, save, reload from what was saved.
        output_dir = Path(config.output_dir)
        with contract.atomic_output(output_dir) as staging:
            for scheme in config.schemes:
                quantization = _bnb_config(scheme, config.compute_dtype)
                print(f"{scheme}: quantizing", flush=True)
                model = load_model(str(reference_dir), quantization_config=quantization)
                folder = staging / scheme
                model.save_pretrained(folder)
                tokenizer.save_pretrained(folder)
                record = {
                    "scheme": scheme,
                    "library": "bitsandbytes",
                    "version": bitsandbytes.__version__,
                    "weights": {"int8": "8-bit LLM.int8 (Linear8bitLt)",
                                "nf4": "4-bit NF4, double quantization (Linear4bit)"}[scheme],
                    "compute_dtype": str(quantization.bnb_4bit_compute_dtype).replace("torch.", "")
                    if scheme == "nf4" else "float16",
                    "full_precision_modules": _full_precision_linear_layers(model),
                    "source_model": source,
                    "merged_adapter": merged,
                }
                del model
                summary = {**source_summary, "stage": source_summary.get("stage", "quantize"),
                           "base_model": source_summary.get("base_model", source),
                           "quantization": record}
                (folder / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
                for name in (HISTORY_FILE, LINEAGE_FILE):  # how the model was made travels on
                    if (reference_dir / name).exists():
                        shutil.copy2(reference_dir / name, folder / name)
                results[scheme] = _measure(scheme, folder, tokenizer, examples, pairs,
                                           reference_answers, config)
                results[scheme].pop("answers")
                results[scheme]["folder"] = scheme
                _add_deltas(results[scheme], results["reference"])
                if config.archive:
                    pack_folder(folder, staging / f"{scheme}.tar.gz")

            report = {
                "source_model": source,
                "merged_adapter": merged,
                "library": "bitsandbytes",
                "library_version": bitsandbytes.__version__,
                "device": device,
                "data": config.data_dir,
                "num_loss_examples": len(examples),
                "num_samples": len(pairs),
                "speed": {"runs": config.speed_runs, "new_tokens": config.speed_tokens},
                "variants": results,
            }
            (staging / "quantization.json").write_text(json.dumps(report, indent=2) + "\n")
            _plot(results, staging / "quantization_comparison.png")
    for name, result in results.items():
        ppl = f", perplexity {result['perplexity']:.4g}" if result["perplexity"] else ""
        print(f"{name}: {result['size_bytes'] / 2**20:.2f} MiB on disk, load "
              f"{result['load_s']:.2f} s, {result['tokens_per_second']:.1f} tokens/s{ppl}",
              flush=True)
    print(f"wrote {', '.join(config.schemes)}, quantization.json and quantization_comparison.png "
          f"to {output_dir}", flush=True)


# --- Inputs ---------------------------------------------------------------------------------------


def _refuse_quantized(source: str, base_model: str | None) -> None:
    """Refuse a quantized model, or an adapter over one, before anything loads."""
    folder = local_model_folder(source) if source not in (TINY, SMOLLM2) else None
    if folder is None:
        return
    if (folder / "adapter_config.json").exists():
        adapter = json.loads((folder / "adapter_config.json").read_text())
        if adapter.get("peft_type") != "LORA":
            raise StageError(
                f"{source} is a {adapter.get('peft_type')} adapter, which has no weights to merge; "
                "quantize its base model and serve the adapter over it"
            )
        base = base_model or adapter_base(folder)
        if base and base not in (TINY, SMOLLM2) and Path(base).exists():
            _refuse_quantized(base, None)
        return
    config_path = folder / "config.json"
    quantization = (json.loads(config_path.read_text()).get("quantization_config")
                    if config_path.exists() else None)
    if quantization:
        method = quantization.get("quant_method", "unknown")
        bits = ("4-bit" if quantization.get("load_in_4bit")
                else "8-bit" if quantization.get("load_in_8bit") else "")
        raise StageError(
            f"model {source} is already quantized ({method} {bits}".rstrip() + "); quantize the "
            "full-precision model it came from: quantizing again compounds the rounding error and "
            "leaves nothing to measure against"
        )


def _full_precision_folder(source: str, base_model: str | None, work: Path) -> tuple[Path, bool]:
    """A folder with the full-precision model and tokenizer, and whether an adapter was merged."""
    folder = local_model_folder(source) if source not in (TINY, SMOLLM2) else None
    if folder is not None and (folder / "adapter_config.json").exists():
        print(f"merging the LoRA adapter {source} into its full-precision base", flush=True)
        return merge_adapter(folder, work / "merged", base_model=base_model), True
    if folder is not None:
        return folder, False
    target = work / "reference"
    load_model(source).save_pretrained(target, safe_serialization=True)
    load_tokenizer(source).save_pretrained(target)
    return target, False


def _evaluation_data(config: QuantizeConfig, source: str) -> tuple[list[dict], list[tuple]]:
    """What SFT trains on (for the loss) and prompt/reference pairs (for generation)."""
    if config.data_dir is None:
        return [], []
    data_path = Path(config.data_dir)
    if (data_path / "validation.jsonl").exists():
        data_path = data_path / "validation.jsonl"
    fmt, records = load_records(data_path)
    chat_template = bool(load_tokenizer(source).chat_template)
    examples = [sft_example(record.data, fmt, chat_template) for record in records]
    examples = [example for example in examples if example is not None]
    pairs = [pair for pair in map(prompt_and_completion, examples) if pair is not None]
    print(f"evaluating on {len(examples)} {fmt.name} records from {data_path}", flush=True)
    return examples, pairs[:config.max_samples]


def _bnb_config(scheme: str, compute_dtype: str) -> BitsAndBytesConfig:
    if scheme == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    if compute_dtype == "auto":
        compute_dtype = ("bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported()
                         else "fp32")
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,  # quantizes the quantization constants too: ~0.4 bit/weight
        bnb_4bit_compute_dtype=DTYPES[compute_dtype],
    )


# --- Measuring ------------------------------------------------------------------------------------


def _measure(name: str, folder: Path, tokenizer, examples: list[dict], pairs: list[tuple],
             reference_answers: list[str] | None, config: QuantizeConfig) -> dict[str, Any]:
    quantized = name != "reference"
    if not quantized:
        _load(folder)  # warm-up: the first load in a process also pays one-time set-up
    model, load_s = _load(folder)
    if quantized and not any("bitsandbytes" in type(m).__module__ for m in model.modules()):
        raise RuntimeError(f"{folder} reloaded without bitsandbytes layers")
    result: dict[str, Any] = {
        "scheme": name if quantized else "none",
        "folder": None,
        "size_bytes": sum(p.stat().st_size for p in folder.glob("*.safetensors")),
        "load_s": round(load_s, 3),
        "memory_bytes": model.get_memory_footprint(),
        "tokens_per_second": round(_tokens_per_second(model, tokenizer, config), 2),
        "eval_loss": None, "perplexity": None, "rouge_l": None, "exact_match": None,
        "agreement": None, "answers": [],
    }
    if examples:
        print(f"{name}: loss on {len(examples)} examples", flush=True)
        losses = example_losses(model, tokenizer, examples, config.batch_size,
                                config.max_seq_length)
        loss = mean_loss(losses)
        result["eval_loss"], result["perplexity"] = loss, perplexity(loss)
    if pairs:
        print(f"{name}: generating {len(pairs)} answers", flush=True)
        answers = generate(model, tokenizer, [p for p, _ in pairs], config.max_new_tokens,
                           config.batch_size)
        references = [response_text(completion) for _, completion in pairs]
        result["rouge_l"] = statistics.fmean(rouge_l(references, answers))
        result["exact_match"] = statistics.fmean(exact_match(references, answers))
        # How often the quantized model says exactly what the full-precision one says.
        result["agreement"] = statistics.fmean(
            float(a == b) for a, b in zip(answers, reference_answers or answers))
        result["answers"] = answers
    del model
    return result


def _load(folder: Path) -> tuple[PreTrainedModel, float]:
    """The model in `folder` as a server loads it (the quantization config read from config.json),
    and the seconds it took."""
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, use_safetensors=True, trust_remote_code=False,
        device_map={"": 0} if torch.cuda.is_available() else None,
    ).eval()
    return model, time.perf_counter() - started


def _tokens_per_second(model: PreTrainedModel, tokenizer, config: QuantizeConfig) -> float:
    """New tokens per second of greedy generation, batch 1, exactly speed_tokens new tokens."""
    text = (tokenizer.apply_chat_template([{"role": "user", "content": SPEED_PROMPT}],
                                          tokenize=False, add_generation_prompt=True)
            if tokenizer.chat_template else SPEED_PROMPT)
    inputs = tokenizer(text, add_special_tokens=False, return_tensors="pt").to(model.device)

    def run() -> float:
        started = time.perf_counter()
        with torch.no_grad():
            model.generate(**inputs, do_sample=False, max_new_tokens=config.speed_tokens,
                           min_new_tokens=config.speed_tokens,
                           pad_token_id=tokenizer.pad_token_id)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return config.speed_tokens / (time.perf_counter() - started)

    run()  # warm-up: first-call allocations and kernel selection
    return statistics.median(run() for _ in range(config.speed_runs))


def _full_precision_linear_layers(model: PreTrainedModel) -> list[str]:
    """Linear layers bitsandbytes left unquantized (transformers keeps the output head)."""
    return sorted(name for name, module in model.named_modules()
                  if type(module) is torch.nn.Linear)


def _add_deltas(result: dict[str, Any], reference: dict[str, Any]) -> None:
    result["size_ratio"] = result["size_bytes"] / max(reference["size_bytes"], 1)
    result["tokens_per_second_ratio"] = (result["tokens_per_second"]
                                         / max(reference["tokens_per_second"], 1e-9))
    for name in ("eval_loss", "perplexity", "rouge_l", "exact_match"):
        if result[name] is not None and reference[name] is not None:
            result[f"{name}_delta"] = result[name] - reference[name]
    if result["perplexity"] is not None and reference["perplexity"]:
        result["perplexity_ratio"] = result["perplexity"] / reference["perplexity"]


def _plot(results: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("size (MiB)", lambda r: r["size_bytes"] / 2**20),
              ("load (s)", lambda r: r["load_s"]),
              ("tokens/s", lambda r: r["tokens_per_second"])]
    if results["reference"]["perplexity"] is not None:
        panels.append(("perplexity", lambda r: r["perplexity"]))
    if results["reference"]["rouge_l"] is not None:
        panels.append(("ROUGE-L", lambda r: r["rouge_l"]))
    names = list(results)
    figure, axes = plt.subplots(1, len(panels), figsize=(3 * len(panels), 3.5), squeeze=False)
    for axis, (title, value) in zip(axes[0], panels):
        values = [value(results[name]) for name in names]
        axis.bar(names, values, color=["#9e9e9e", "#1f77b4", "#ff7f0e"][:len(names)])
        axis.set_title(title)
        for x, v in enumerate(values):
            axis.annotate(f"{v:.3g}", (x, v), ha="center", va="bottom", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


if __name__ == "__main__":
    contract.run(main, QuantizeConfig, job="processing")

"""Scaling: how SFT throughput changes with sequence length and with model size, beside the
arithmetic each token costs.

SFT with full fine-tuning in fp32 on config-built Llama models (the tiny byte-level tokenizer),
in this process, through the stage's own `main`:

- against sequence length (SMALL's model): 128, 256, 512, 1024 tokens per row with the batch
  adjusted so that every optimizer step trains the same number of tokens;
- against model size (one sequence length and batch): about 1M, 3M, 10M and 25M parameters.

Tokens/s is the stage's own figure (non-padding tokens over `trainer.train()`), the median of the
repeats, every configuration interleaved with the others. Beside it, the approximate training
FLOPs per token: 6 x N + 6 x layers x sequence length x attention width (Kaplan et al. 2020: 2N
per token for the matrix products of the forward pass plus 2 x layers x context x width for
attention scores and their weighted sum; the backward pass costs twice the forward), where N
counts every weight a token is multiplied by (all but the input embedding, which is a lookup).

    python -m benchmarks.scaling [--quick]

The data are text records cut from the demo corpus (CPython's language reference) to the row
length, so every row is full: no padding, no packing.
"""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path
from typing import Any

from benchmarks import common

# The SFT runner and data of the precision benchmark (sft_config sets LEARNING_RATE).
from benchmarks.precision import LEARNING_RATE, quiet_libraries, run_sft, sft_config, text_records

NAME, TITLE, ORDER = "scaling", "Scaling", 50

# Model bodies from ~1M to ~25M parameters (head width 64 from 256 up; multiples of 32).
MODELS = {
    "xs": {"hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 4,
           "num_attention_heads": 4, "num_key_value_heads": 2},
    "s": dict(common.SMALL),
    "m": {"hidden_size": 384, "intermediate_size": 1152, "num_hidden_layers": 6,
          "num_attention_heads": 6, "num_key_value_heads": 2},
    "l": {"hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 8,
          "num_attention_heads": 8, "num_key_value_heads": 4},
}
FULL = {"lengths": (128, 256, 512, 1024), "tokens_per_step": 2048, "models": ("xs", "s", "m", "l"),
        "model_length": 256, "steps": 4, "repeats": 2, "warm_up": True}
QUICK = {"lengths": (64, 128, 256), "tokens_per_step": 256, "models": ("xs", "s"),
         "model_length": 64, "steps": 2, "repeats": 1, "warm_up": False}


def flops_per_token(model: Path, length: int) -> dict[str, float]:
    """Approximate training FLOPs per token of the model at `length` (see the module doc)."""
    import json

    config = json.loads((model / "config.json").read_text())
    hidden, layers = config["hidden_size"], config["num_hidden_layers"]
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    vocab = config["vocab_size"]
    kv = config.get("num_key_value_heads") or heads
    inter = config["intermediate_size"]
    per_layer = (hidden * heads * head_dim * 2 + hidden * kv * head_dim * 2  # q, o; k, v
                 + 3 * hidden * inter + 2 * hidden)  # gate, up, down; two norms
    total = vocab * hidden * (1 if config.get("tie_word_embeddings") else 2) + layers * per_layer \
        + hidden
    matmul = total - vocab * hidden  # the input embedding is a lookup, not a product
    dense = 6 * matmul
    attention = 6 * layers * length * heads * head_dim
    return {"parameters": total, "matmul_parameters": matmul, "dense": dense,
            "attention": attention, "total": dense + attention}


def measure(root: Path, sizes: dict[str, Any]) -> dict[str, Any]:
    # Every distinct (model, length, batch) once per repeat: the sequence sweep runs on "s", the
    # size sweep at model_length; where the two meet the run is shared.
    configurations: dict[str, dict[str, Any]] = {}
    for length in sizes["lengths"]:
        batch = max(1, sizes["tokens_per_step"] // length)
        configurations[f"s/{length}/{batch}"] = {"model": "s", "length": length, "batch": batch}
    model_batch = max(1, sizes["tokens_per_step"] // sizes["model_length"])
    for name in sizes["models"]:
        configurations[f"{name}/{sizes['model_length']}/{model_batch}"] = {
            "model": name, "length": sizes["model_length"], "batch": model_batch}
    folders = {name: common.small_model_folder(root, **MODELS[name]) for name in sizes["models"]}
    folders.setdefault("s", common.small_model_folder(root))
    data: dict[tuple[int, int], Path] = {}
    for configuration in configurations.values():
        shape = (configuration["length"], configuration["batch"])
        if shape not in data:
            folder = root / f"data-{shape[0]}-{shape[1]}"
            common.write_jsonl(folder / "train.jsonl",
                               text_records(shape[1] * sizes["steps"], shape[0]))
            data[shape] = folder

    def run(configuration: dict[str, Any], steps: int) -> dict[str, Any]:
        config = sft_config(folders[configuration["model"]], peft_method="none", precision="fp32",
                            max_steps=steps, per_device_batch_size=configuration["batch"],
                            max_seq_length=configuration["length"])
        summary, _ = run_sft(config, data[(configuration["length"], configuration["batch"])])
        return summary["training"]

    if sizes["warm_up"]:
        common.progress("warm-up (discarded)")
        run(next(iter(configurations.values())), 1)
    keys = list(configurations)
    for repeat in range(sizes["repeats"]):
        order = keys[repeat % len(keys):] + keys[:repeat % len(keys)]
        for key in order:
            configuration = configurations[key]
            common.progress(f"repeat {repeat + 1}/{sizes['repeats']}: model "
                            f"{configuration['model']}, {configuration['batch']} x "
                            f"{configuration['length']} tokens")
            training = run(configuration, sizes["steps"])
            configuration.setdefault("tokens_per_second", []).append(training["tokens_per_second"])
            configuration.setdefault("runtime_s", []).append(training["runtime_s"])
            configuration["tokens"] = training["tokens"]
            configuration["final_train_loss"] = training["final_train_loss"]
    for configuration in configurations.values():
        folder = folders[configuration["model"]]
        configuration["flops"] = flops_per_token(folder, configuration["length"])
        configuration["sizes"] = MODELS[configuration["model"]]
        rate = common.median(configuration["tokens_per_second"])
        configuration["median_tokens_per_second"] = rate
        configuration["gflops_per_second"] = rate * configuration["flops"]["total"] / 1e9
    return {"configurations": configurations,
            "settings": {**{k: v for k, v in sizes.items()}, "precision": "fp32",
                         "peft_method": "none", "learning_rate": LEARNING_RATE,
                         "model_batch": model_batch}}


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of log y against log x."""
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    den = sum((x - mx) ** 2 for x in lx)
    return sum((x - mx) * (y - my) for x, y in zip(lx, ly)) / den if den else float("nan")


def sweeps(measured: dict[str, Any]) -> tuple[list[dict], list[dict]]:
    settings, configurations = measured["settings"], measured["configurations"].values()
    by_length = sorted((c for c in configurations if c["model"] == "s"
                        and c["batch"] == max(1, settings["tokens_per_step"] // c["length"])),
                       key=lambda c: c["length"])
    by_size = sorted((c for c in configurations if c["length"] == settings["model_length"]
                      and c["batch"] == settings["model_batch"]),
                     key=lambda c: c["flops"]["parameters"])
    return by_length, by_size


def plot(measured: dict[str, Any]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_length, by_size = sweeps(measured)
    fig, (sizes_ax, lengths_ax) = plt.subplots(1, 2, figsize=(11, 4))
    params = [c["flops"]["parameters"] / 1e6 for c in by_size]
    rates = [c["median_tokens_per_second"] for c in by_size]
    sizes_ax.loglog(params, rates, "o-", label="measured (median)")
    for c, p in zip(by_size, params):
        sizes_ax.annotate(f"{c['median_tokens_per_second']:,.0f} tok/s, "
                          f"{c['gflops_per_second']:.2f} GFLOP/s",
                          (p, c["median_tokens_per_second"]),
                          textcoords="offset points", xytext=(4, 4), fontsize=8)
    if rates:  # cost per token ∝ parameters: the line a pure matrix-product workload would follow
        sizes_ax.loglog(params, [rates[0] * params[0] / p for p in params], ":", color="grey",
                        label="∝ 1 / parameters")
    sizes_ax.set_xticks(params, [f"{p:.2g}" for p in params])
    sizes_ax.minorticks_off()
    sizes_ax.set_xlabel("parameters (millions)")
    sizes_ax.set_ylabel("tokens/s")
    sizes_ax.set_title(f"model size ({measured['settings']['model_batch']} × "
                       f"{measured['settings']['model_length']} tokens per step)")
    sizes_ax.legend(fontsize=8)
    lengths = [c["length"] for c in by_length]
    rates = [c["median_tokens_per_second"] for c in by_length]
    lengths_ax.loglog(lengths, rates, "o-", label="measured (median)")
    if rates:  # what the FLOPs per token predict, anchored at the shortest length
        first = by_length[0]["flops"]["total"]
        lengths_ax.loglog(lengths, [rates[0] * first / c["flops"]["total"] for c in by_length],
                          ":", color="grey", label="∝ 1 / FLOPs per token")
    for c in by_length:
        lengths_ax.annotate(f"{c['median_tokens_per_second']:,.0f} tok/s",
                            (c["length"], c["median_tokens_per_second"]),
                            textcoords="offset points", xytext=(4, 4), fontsize=8)
    lengths_ax.set_xscale("log", base=2)
    lengths_ax.set_xticks(lengths, [str(length) for length in lengths])
    lengths_ax.minorticks_off()
    lengths_ax.set_xlabel("sequence length (tokens)")
    lengths_ax.set_ylabel("tokens/s")
    lengths_ax.set_title(f"sequence length ({measured['settings']['tokens_per_step']:,} tokens "
                         "per step)")
    lengths_ax.legend(fontsize=8)
    from matplotlib.ticker import ScalarFormatter

    for axis in (sizes_ax, lengths_ax):
        axis.yaxis.set_major_formatter(ScalarFormatter())
        axis.yaxis.set_minor_formatter(ScalarFormatter())
    return common.save_figure(fig, NAME)


def render(measured: dict[str, Any], quick: bool) -> str:
    settings = measured["settings"]
    by_length, by_size = sweeps(measured)
    lines = [
        "**What is measured.** SFT with full fine-tuning in fp32, through the stage's own `main` "
        f"in one process: {settings['steps']} optimizer steps per run, learning rate "
        f"{settings['learning_rate']:g}, tokens/s the stage's own figure (non-padding tokens over "
        f"`trainer.train()`), the median of {settings['repeats']} run(s) per configuration, all "
        "configurations interleaved"
        + (" after one discarded warm-up run" if settings["warm_up"] else "") + ". "
        "Rows are text cut from the demo corpus to exactly the sequence length (byte-level "
        "tokenizer): every row is full, nothing is padding or packed. FLOPs per token ≈ 6·N + "
        "6·layers·length·width (N: every weight a token is multiplied by, i.e. all but the input "
        "embedding; the second term is attention's scores and weighted sum, computed over the "
        "full length as the kernels do); achieved GFLOP/s = tokens/s × FLOPs per token.",
        "",
        (f"Against model size, {settings['model_batch']} rows × {settings['model_length']} tokens "
        "per step:"),
        "",
        ("| model (hidden, intermediate, layers, heads/kv) | parameters | FLOPs/token (attention "
        "share) | tokens/s (median, min–max) | vs smallest | GFLOP/s |"),
        "|---|---|---|---|---|---|",
    ]
    for c in by_size:
        s, f, rate = c["sizes"], c["flops"], c["median_tokens_per_second"]
        lines.append(
            f"| {s['hidden_size']}, {s['intermediate_size']}, {s['num_hidden_layers']}, "
            f"{s['num_attention_heads']}/{s['num_key_value_heads']} | "
            f"{f['parameters'] / 1e6:.2f}M | "
            f"{f['total'] / 1e6:,.1f}M ({100 * f['attention'] / f['total']:.0f}%) | "
            f"{common.spread(c['tokens_per_second'])} | "
            f"{common.ratio(rate, by_size[0]['median_tokens_per_second'])} | "
            f"{c['gflops_per_second']:.2f} |")
    lines += [
        "",
        (f"Against sequence length, the {by_length[0]['flops']['parameters'] / 1e6:.2f}M model, "
        f"{settings['tokens_per_step']:,} tokens per optimizer step (the batch shrinks as the rows "
        "grow):"),
        "",
        ("| length × batch | FLOPs/token (attention share) | tokens/s (median, min–max) | "
        "vs shortest | predicted by FLOPs | GFLOP/s |"),
        "|---|---|---|---|---|---|",
    ]
    for c in by_length:
        f, rate = c["flops"], c["median_tokens_per_second"]
        lines.append(
            f"| {c['length']} × {c['batch']} | {f['total'] / 1e6:,.1f}M "
            f"({100 * f['attention'] / f['total']:.0f}%) | "
            f"{common.spread(c['tokens_per_second'])} | "
            f"{common.ratio(rate, by_length[0]['median_tokens_per_second'])} | "
            f"{by_length[0]['flops']['total'] / f['total']:.2f}× | {c['gflops_per_second']:.2f} |")

    size_slope = slope([c["flops"]["parameters"] for c in by_size],
                       [c["median_tokens_per_second"] for c in by_size])
    small, large = by_size[0], by_size[-1]
    param_growth = large["flops"]["parameters"] / small["flops"]["parameters"]
    rate_fall = small["median_tokens_per_second"] / large["median_tokens_per_second"]
    text = (
        f"**Model size.** From {small['flops']['parameters'] / 1e6:.2f}M to "
        f"{large['flops']['parameters'] / 1e6:.2f}M parameters ({param_growth:.1f}× the "
        f"parameters, {large['flops']['total'] / small['flops']['total']:.1f}× the FLOPs per "
        f"token) tokens/s falls {rate_fall:.1f}×: tokens/s ∝ parameters^{size_slope:.2f} "
        "(least-squares on log-log; pure matrix work would give −1). ")
    efficiency = large["gflops_per_second"] / small["gflops_per_second"]
    if efficiency > 1.2:
        text += ("The fall is slower than the work grows because the small models do not keep "
                 "the CPU busy: per-step costs that do not scale with size (Python, the "
                 "optimizer's per-tensor loop, kernel launches, data collation) weigh most on "
                 f"them, and the achieved rate climbs from {small['gflops_per_second']:.2f} to "
                 f"{large['gflops_per_second']:.2f} GFLOP/s ({efficiency:.1f}×) as the matrices "
                 "grow.")
    elif efficiency < 1 / 1.2:
        text += ("The fall is faster than the work grows: the achieved rate drops from "
                 f"{small['gflops_per_second']:.2f} to {large['gflops_per_second']:.2f} GFLOP/s "
                 "as the larger models' weights, gradients and optimizer state outgrow the CPU's "
                 "caches and the optimizer step's memory traffic grows with them.")
    else:
        text += ("Cost per token follows the arithmetic: the achieved rate stays between "
                 f"{min(c['gflops_per_second'] for c in by_size):.2f} and "
                 f"{max(c['gflops_per_second'] for c in by_size):.2f} GFLOP/s.")
    lines += ["", text]

    short, long = by_length[0], by_length[-1]
    measured_fall = short["median_tokens_per_second"] / long["median_tokens_per_second"]
    predicted_fall = long["flops"]["total"] / short["flops"]["total"]
    share = {c["length"]: 100 * c["flops"]["attention"] / c["flops"]["total"] for c in by_length}
    text = (
        f"**Sequence length.** With the tokens per step held at {settings['tokens_per_step']:,}, "
        "the matrix products per token stay the same and only attention grows: its share of the "
        f"FLOPs goes from {share[short['length']]:.0f}% at {short['length']} tokens to "
        f"{share[long['length']]:.0f}% at {long['length']}, so the FLOPs predict tokens/s "
        f"{'falling' if predicted_fall >= 1 else 'rising'} "
        f"{max(predicted_fall, 1 / predicted_fall):.2f}×; "
        f"measured, tokens/s {'falls' if measured_fall >= 1 else 'rises'} "
        f"{max(measured_fall, 1 / measured_fall):.2f}× from {short['length']} to {long['length']} "
        "tokens. ")
    if measured_fall < predicted_fall * 0.9:
        text += ("Less than predicted: with the tokens per step fixed the dense products are "
                 "the same size at every length, so attention's growth is offset by costs per "
                 "row that shrink as the rows get fewer and longer, and the estimate counts "
                 "attention over the whole square where causal kernels may skip the masked half.")
    elif measured_fall > predicted_fall * 1.1:
        text += ("More than predicted: attention on the CPU runs further from peak than the "
                 "dense products (its score matrices grow with the square of the length and "
                 "leave the caches).")
    else:
        text += "Within 10% of the prediction: cost per token follows the FLOPs."
    lines += ["", text]
    if quick:
        lines += ["", ("_Quick mode: small sizes, few steps and one run per configuration; the "
                  "figures show that the benchmark works, not what the machine does._")]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="two models, short rows, one repeat")
    args = parser.parse_args()
    sizes = QUICK if args.quick else FULL
    quiet_libraries()
    with tempfile.TemporaryDirectory(prefix="bench-scaling-") as tmp:
        measured = measure(Path(tmp), sizes)
    plots = [plot(measured)]
    common.save_result(NAME, TITLE, render(measured, args.quick),
                       {"quick": args.quick, **measured}, ORDER, plots)


if __name__ == "__main__":
    main()

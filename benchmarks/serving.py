"""Serving SmolLM2-135M-Instruct on the CPU: time to first token and tokens/s per request of the
serving container against a plain transformers ``generate`` loop, in the same run.

Each served variant runs the serving image's entry point (``python -m serving serve``, the process
`llm-pipeline deploy` starts) over HTTP, one streamed chat request at a time: the time to first
token is when the first piece of text arrives, tokens/s is the request's new tokens over its whole
time (the time to first token included). The plain loop is ``model.generate`` on the same weights
in this process, greedy, the same prompt and limit, its first token timed by a streamer that only
notes the time. Variants:

  plain fp32             the baseline: generate in this process
  served fp32            the full model behind the server
  served LoRA, merged    a LoRA adapter as SFT saves it (r 8, every linear layer, its base
                         bundled), merged into its base at load (the default)
  served LoRA, unmerged  the same adapter through PEFT (SERVING_MERGE_LORA=false)
  plain int8             generate over the bitsandbytes int8 model (the int8 baseline)
  served int8            the int8 package behind the server

Every variant answers the same request once to warm up, then the variants take turns (the order
rotating each round) for `repeats` rounds; figures are medians, ratios compare variants measured in
alternation in the same run. Every process computes on one thread (torch.set_num_threads(1), and
OMP_NUM_THREADS=1 for the servers): on a machine shared with other work, two OpenMP threads per
process stall on each other whenever one of them is descheduled, which measured the scheduler
rather than the server.

    python -m benchmarks.serving [--quick] [--repeats 5] [--new-tokens 64] [--render]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from benchmarks import common

NAME, TITLE, ORDER = "serving", "Serving: time to first token and tokens/s on the CPU", 70
PROMPT = "Write a long story about a lighthouse keeper and the sea."
TARGET = 1.0  # served fp32 against the plain loop, tokens/s
# variant -> (how it runs, which plain loop it is compared with)
VARIANTS = {
    "plain fp32": ("plain", "plain fp32"),
    "served fp32": ("served", "plain fp32"),
    "served LoRA, merged": ("served", "plain fp32"),
    "served LoRA, unmerged": ("served", "plain fp32"),
    "plain int8": ("plain", "plain int8"),
    "served int8": ("served", "plain int8"),
}


# --- The models -----------------------------------------------------------------------------------


def prepare(work: Path) -> dict[str, Path]:
    """Each variant's model folder, as SageMaker would extract it (a folder named model)."""
    import torch
    from transformers import BitsAndBytesConfig

    from steps.common import models, peft_methods

    smollm2 = models._smollm2_folder()  # the one-time conversion, outside any timing
    folders = {"fp32": work / "fp32" / "model", "lora": work / "lora" / "model",
               "int8": work / "int8" / "model"}
    folders["fp32"].parent.mkdir(parents=True)
    folders["fp32"].symlink_to(smollm2, target_is_directory=True)

    # A LoRA adapter as the SFT stage saves one, with non-zero weights (a trained adapter's cost).
    knobs = peft_methods.PeftKnobs(peft_method="lora")
    tokenizer = models.load_tokenizer(models.SMOLLM2)
    model = peft_methods.apply_peft(models.load_model(models.SMOLLM2), knobs, tokenizer)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(0)
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.01)
    with contextlib.redirect_stdout(sys.stderr):
        peft_methods.save_model(model, tokenizer, folders["lora"], knobs)

    # The int8 variant as steps.quantize writes it.
    quantized = models.load_model(str(smollm2),
                                  quantization_config=BitsAndBytesConfig(load_in_8bit=True))
    quantized.save_pretrained(folders["int8"])
    tokenizer.save_pretrained(folders["int8"])
    return folders


# --- Served: the entry point over HTTP ------------------------------------------------------------


@contextlib.contextmanager
def server(folder: Path, log: Path, **env: str) -> Iterator[str]:
    """`python -m serving serve` over `folder` on a free port, until the block ends; its URL."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    variables = {**os.environ, "SAGEMAKER_BASE_DIR": str(folder.parent),
                 "SAGEMAKER_BIND_TO_PORT": str(port), "SERVING_HOST": "127.0.0.1",
                 "OMP_NUM_THREADS": "1", **env}
    with open(log, "ab") as output:
        process = subprocess.Popen([sys.executable, "-m", "serving", "serve"], env=variables,
                                   stdout=output, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 600
        while not _ready(url):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server over {folder} did not start; see {log}")
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=60)


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/ping", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def served_request(url: str, new_tokens: int) -> dict[str, float]:
    """One streamed chat request: seconds to the first text, whole seconds, new tokens."""
    body = json.dumps({"messages": [{"role": "user", "content": PROMPT}],
                       "max_tokens": new_tokens, "stream": True}).encode()
    request = urllib.request.Request(f"{url}/invocations", data=body,
                                     headers={"Content-Type": "application/json"})
    started = time.perf_counter()
    first = None
    tokens = 0
    with urllib.request.urlopen(request, timeout=600) as response:
        for raw in response:
            line = raw.decode().strip()
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[len("data: "):])
            choice = event["choices"][0]
            if first is None and choice["delta"].get("content"):
                first = time.perf_counter() - started
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    total = time.perf_counter() - started
    return {"ttft_s": first if first is not None else total, "total_s": total,
            "new_tokens": tokens}


# --- Plain: generate in this process --------------------------------------------------------------


class FirstToken:
    """A generate streamer that only notes when the first new token came."""

    def __init__(self) -> None:
        self.calls, self.first = 0, None

    def put(self, value) -> None:
        self.calls += 1
        if self.calls == 2:  # the first call carries the prompt
            self.first = time.perf_counter()

    def end(self) -> None:
        pass


def plain_loop(folder: Path):
    """A request function over the model in `folder`, loaded as transformers loads it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    text = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False,
                                         add_generation_prompt=True)
    inputs = tokenizer(text, add_special_tokens=False, return_tensors="pt")

    def request(new_tokens: int) -> dict[str, float]:
        streamer = FirstToken()
        started = time.perf_counter()
        with torch.no_grad():
            output = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False,
                                    streamer=streamer, pad_token_id=tokenizer.eos_token_id)
        total = time.perf_counter() - started
        return {"ttft_s": (streamer.first or time.perf_counter()) - started, "total_s": total,
                "new_tokens": output.shape[1] - inputs["input_ids"].shape[1]}

    return request


# --- The run --------------------------------------------------------------------------------------


def measure(repeats: int, new_tokens: int) -> dict[str, Any]:
    import logging

    import torch
    import transformers

    torch.set_num_threads(1)
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in VARIANTS}
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp:
        work = Path(tmp)
        common.progress("preparing the fp32, LoRA and int8 folders of SmolLM2-135M-Instruct")
        folders = prepare(work)
        log = work / "servers.log"
        with contextlib.ExitStack() as stack:
            common.progress("starting the servers")
            urls = {
                "served fp32": stack.enter_context(server(folders["fp32"], log)),
                "served LoRA, merged": stack.enter_context(server(folders["lora"], log)),
                "served LoRA, unmerged": stack.enter_context(
                    server(folders["lora"], log, SERVING_MERGE_LORA="false")),
                "served int8": stack.enter_context(server(folders["int8"], log)),
            }
            requests = {name: (lambda n, url=url: served_request(url, n))
                        for name, url in urls.items()}
            requests["plain fp32"] = plain_loop(folders["fp32"])
            requests["plain int8"] = plain_loop(folders["int8"])
            for name in VARIANTS:  # warm-up: first-call allocations, kernel selection
                requests[name](new_tokens)
            names = list(VARIANTS)
            for repeat in range(repeats):
                common.progress(f"round {repeat + 1} of {repeats}")
                for name in names[repeat % len(names):] + names[:repeat % len(names)]:
                    runs[name].append(requests[name](new_tokens))
    return {"runs": runs, "repeats": repeats, "new_tokens": new_tokens, "prompt": PROMPT}


def summarise(data: dict[str, Any]) -> dict[str, dict[str, float]]:
    rows = {}
    for name, runs in data["runs"].items():
        rates = [r["new_tokens"] / r["total_s"] for r in runs if r["total_s"] > 0]
        rows[name] = {"ttft_ms": [1000 * r["ttft_s"] for r in runs], "tokens_per_s": rates,
                      "new_tokens": common.median([r["new_tokens"] for r in runs])}
    return rows


def render(data: dict[str, Any]) -> str:
    rows = summarise(data)
    table = []
    for name, (_, baseline) in VARIANTS.items():
        row, base = rows[name], rows[baseline]
        table.append([
            name, common.spread(row["ttft_ms"]), _rate_spread(row["tokens_per_s"]),
            "—" if name == baseline else common.ratio(common.median(row["tokens_per_s"]),
                                                      common.median(base["tokens_per_s"])),
            f"{row['new_tokens']:.0f}"])
    served = common.median(rows["served fp32"]["tokens_per_s"])
    plain = common.median(rows["plain fp32"]["tokens_per_s"])
    merged = common.median(rows["served LoRA, merged"]["tokens_per_s"])
    unmerged = common.median(rows["served LoRA, unmerged"]["tokens_per_s"])
    int8 = common.median(rows["served int8"]["tokens_per_s"])
    within_spread = _overlap(rows["served fp32"]["tokens_per_s"], rows["plain fp32"]["tokens_per_s"])
    if served / plain >= TARGET:
        verdict = "met" + (", within the runs' spread" if within_spread else "")
    else:
        verdict = "missed" + (" by less than the runs' spread" if within_spread else "")
    lora_note = ("; the adapter's extra matmuls on every linear layer cost each token, which is "
                 "why the server merges a lone LoRA adapter by default" if merged > unmerged
                 else "")
    int8_note = ("; on this CPU bitsandbytes' int8 matmul is slower than fp32's: int8 buys memory "
                 "here, not speed" if int8 < served else "")
    lines = [
        (f"SmolLM2-135M-Instruct, one streamed chat request at a time, greedy, up to "
         f"{data['new_tokens']} new tokens; medians (min–max) of {data['repeats']} requests per "
         "variant, the variants taking turns. Tokens/s is new tokens over the whole request; "
         "\"vs plain\" divides it by the plain generate loop's on the same weights."),
        "",
        common.table(["variant", "time to first token (ms)", "tokens/s", "vs plain",
                      "new tokens"], table),
        "",
        (f"- Target: the served model at least {TARGET:.1f}× the plain loop's tokens/s: "
         f"**{served / plain:.2f}×, {verdict}**. The server adds HTTP, JSON and a streaming "
         "thread around the same `generate`."),
        (f"- LoRA merged at load against served through PEFT: {common.ratio(merged, unmerged)} "
         f"the tokens/s{lora_note}."),
        f"- int8 against fp32, both served: {common.ratio(int8, served)} the tokens/s{int8_note}.",
        ("- The machine is shared with other work and noisy (2 CPUs, one torch thread per "
         "process): absolute figures move between runs; compare the ratios, measured in "
         "alternation within one run."),
    ]
    return "\n".join(lines)


def _rate_spread(values: list[float]) -> str:
    if not values:
        return "—"
    return f"{common.median(values):.1f} ({min(values):.1f}–{max(values):.1f})"


def _overlap(a: list[float], b: list[float]) -> bool:
    return bool(a and b) and min(a) <= max(b) and min(b) <= max(a)


def plot(data: dict[str, Any]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summarise(data)
    names = list(VARIANTS)
    colours = ["#9e9e9e" if VARIANTS[n][0] == "plain" else "#1f77b4" for n in names]
    figure, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for axis, key, title in ((axes[0], "ttft_ms", "time to first token (ms)"),
                             (axes[1], "tokens_per_s", "tokens/s per request")):
        values = [common.median(rows[n][key]) for n in names]
        axis.barh(names, values, color=colours)
        axis.invert_yaxis()
        axis.set_title(title)
        for y, value in enumerate(values):
            axis.annotate(f"{value:.3g}", (value, y), va="center", fontsize=8)
    return common.save_figure(figure, NAME)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--quick", action="store_true", help="1 round of 8 tokens: does it run?")
    parser.add_argument("--render", action="store_true",
                        help="re-render results/serving.json from its saved figures")
    args = parser.parse_args()
    if args.render:
        saved = json.loads((common.RESULTS_DIR / f"{NAME}.json").read_text())
        common.save_result(NAME, saved["title"], render(saved["data"]), saved["data"],
                           order=saved["order"], plots=saved["plots"],
                           environment=saved["environment"], command=saved["command"])
        return
    repeats, new_tokens = (1, 8) if args.quick else (args.repeats, args.new_tokens)
    # A stopped benchmark (timeout, kill) still stops the servers it started.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    data = measure(repeats, new_tokens)
    common.save_result(NAME, TITLE, render(data), data, ORDER, plots=[plot(data)])


if __name__ == "__main__":
    main()

"""A few steps of training of builtin:tiny, sharded with FSDP2 across two processes (gloo, on
CPUs) or whole in one process, then saved as the stages save: the two runs
tests/steps/test_sharding.py compares.

accelerate applies its FSDP plugin only on GPUs, so this shards the model as it would there
(`fully_shard` on each of steps.common.sharding's decoder layers, then on the whole model) and
trains it with a plain AdamW loop; each process takes its half of every global batch. What the
test checks is what sharding must not change: the losses, and a saved model that loads on its own.

The two processes are forked from the test's own (`train_sharded`), which has imported torch,
transformers and PEFT already: two fresh interpreters under torchrun spent about 6 CPU s each
importing them, for a second of training. The stage under torchrun has its own test
(tests/steps/test_distributed.py); test_contract's processes are forked as these are.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from steps.common import sharding
from steps.common.models import TINY, load_model, load_tokenizer
from steps.common.peft_methods import apply_peft, save_model
from steps.sft_config import SFTStageConfig

STEPS, GLOBAL_BATCH, LENGTH = 4, 4, 24


def batches() -> list[torch.Tensor]:
    """The same token rows in every process and every run: GLOBAL_BATCH rows a step."""
    generator = torch.Generator().manual_seed(7)
    return [torch.randint(0, 256, (GLOBAL_BATCH, LENGTH), generator=generator)
            for _ in range(STEPS)]


def train(peft_method: str, out: Path) -> list[float]:
    """Train and save; the losses of the global batches, as every process computes them."""
    import torch.distributed as dist

    distributed = dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    knobs = SFTStageConfig(base_model=TINY, peft_method=peft_method, lora_dropout=0.0,
                           precision="fp32", sharding="fsdp" if distributed else "none")
    tokenizer = load_tokenizer(TINY)
    torch.manual_seed(0)  # the same LoRA initialisation in every process and run
    model = apply_peft(load_model(TINY), knobs, tokenizer)
    if distributed:
        from torch.distributed.fsdp import fully_shard

        for layer in sharding.decoder_layers(model):
            fully_shard(layer)
        fully_shard(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for rows in batches():
        mine = rows.chunk(world)[rank]
        loss = model(input_ids=mine, labels=mine).loss  # the mean over this process's tokens
        loss.backward()  # FSDP averages the gradients over the processes: equal token counts
        optimizer.step()
        optimizer.zero_grad()
        both = loss.detach().clone()
        if distributed:
            dist.all_reduce(both)
        losses.append(both.item() / world)
    weights = sharding.gather_trained_model(model)
    assert (weights is not None) == distributed, "a sharded model's weights are gathered"
    if rank == 0:  # alone, as a stage measures its trained model
        save_model(model, tokenizer, out, knobs, state_dict=weights)
        (out / "losses.json").write_text(json.dumps(losses))
        with torch.no_grad():
            logits = model(input_ids=batches()[0]).logits
        torch.save(logits, out / "logits.pt")
    return losses


def train_sharded(peft_methods: tuple[str, ...], out: Path, timeout: float = 300) -> None:
    """Train each method sharded across two processes forked from this one, each saved (by the
    first process) into out/METHOD; an error names the process and its traceback, and processes
    still running after `timeout` seconds (a collective that waits forever) are killed."""
    import time

    import torch.multiprocessing

    started = torch.multiprocessing.start_processes(
        _sharded_process, args=(peft_methods, out), nprocs=2, join=False, start_method="fork")
    deadline = time.monotonic() + timeout
    while not started.join(timeout=1):  # raises as soon as one process fails
        if time.monotonic() > deadline:
            for process in started.processes:
                process.kill()
            raise TimeoutError(f"sharded training still running after {timeout:g} s")


def _sharded_process(rank: int, peft_methods: tuple[str, ...], out: Path) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)  # two processes on what may be two cores
    dist.init_process_group("gloo", init_method=f"file://{out / 'rendezvous'}", rank=rank,
                            world_size=2)
    try:
        for method in peft_methods:
            train(method, out / method)
    finally:
        dist.destroy_process_group()

"""A few steps of training of builtin:tiny, sharded with FSDP2 across the processes of a torchrun
(gloo, on CPUs) or whole in one process, then saved as the stages save: the two runs
tests/steps/test_sharding.py compares.

    python -m torch.distributed.run --standalone --nproc_per_node 2 \\
        -m tests.steps.sharded_training PEFT_METHOD[,PEFT_METHOD...] OUT_FOLDER

accelerate applies its FSDP plugin only on GPUs, so this shards the model as it would there
(`fully_shard` on each of steps.common.sharding's decoder layers, then on the whole model) and
trains it with a plain AdamW loop; each process takes its half of every global batch. What the
test checks is what sharding must not change: the losses, and a saved model that loads on its own.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

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

    distributed = "WORLD_SIZE" in os.environ
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


if __name__ == "__main__":
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        for method in sys.argv[1].split(","):
            train(method, Path(sys.argv[2]) / method)
    finally:
        dist.destroy_process_group()

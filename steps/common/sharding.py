"""Sharded training (the `sharding` knob): FSDP across every GPU of every instance of a job.

With `sharding: fsdp` a stage trains as before, through transformers' Trainer, and only the
Trainer's arguments change (`fsdp_arguments`): accelerate wraps every decoder layer (the model's
`_no_split_modules`, `decoder_layers`) in PyTorch's FSDP2 (`torch.distributed.fsdp.fully_shard`),
so that each of the job's processes holds 1/N of the weights, gradients and optimizer state and
gathers one layer's weights at a time for its forward and backward passes. The processes are the
job's torchrun processes, one per GPU on every host SageMaker lists (steps.common.contract's
`distributed_launch_command`), so one setting covers the GPUs of one instance and of several.

What the stages' other code relies on stays true:
- The model loads on the first process only (`cpu_ram_efficient_loading`: the others start from
  empty weights and receive theirs when FSDP shards the model), so an instance's memory holds one
  copy of the model at loading, not one per GPU (`prepare_sharding` sets it before loading).
- FSDP2 shards each parameter on its own (a DTensor), so frozen base weights and trainable LoRA
  adapters share a layer without FSDP1's `use_orig_params` (transformers 5 defaults to FSDP2 and
  calls FSDP1 deprecated).
- QLoRA: FSDP shards only floating-point tensors, so the 4-bit weights are stored in the compute
  dtype (`bnb_4bit_quant_storage`, steps.common.peft_methods) as bitsandbytes' FSDP-QLoRA guide
  says (huggingface.co/docs/bitsandbytes/main/fsdp_qlora).
- Checkpoints during training are sharded (`SHARDED_STATE_DICT`: each process writes its own
  shard, fast, and a restarted job resumes from them with the same number of processes); the
  model a stage saves is whole: `gather_trained_model` collects the full state dict into the
  first process's CPU memory, and the stage saves it as it saves an unsharded model (full
  safetensors, or PEFT's adapter), which later stages and serving load unchanged; it also leaves
  the model whole in every process, so that the first one alone can measure it afterwards.

Where FSDP cannot run the stage says so in one line and trains unsharded: on a CPU, where
accelerate does not apply its FSDP plugin. The same FSDP2 sharding and gathering are tested on two
CPU processes (gloo) by tests/steps/test_sharding.py, which shards the decoder layers named here
with `fully_shard` directly and checks the losses and the saved model against an unsharded run.
The CUDA path follows accelerate's FSDP guide (huggingface.co/docs/accelerate/usage_guides/fsdp)
and transformers' `fsdp_config` (huggingface.co/docs/transformers/main_classes/trainer); on
SageMaker it runs under the torchrun the stage starts itself, as SageMaker's own torchrun
support does (docs.aws.amazon.com/sagemaker/latest/dg/distributed-training.html). It is not run
here, which has no GPU.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from steps.common.knobs import ShardingKnob


def _processes() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))  # torchrun's (steps.common.contract)


def is_sharded(knobs: Any) -> bool:
    """Whether the stage trains with FSDP: asked (`sharding: fsdp`), on CUDA GPUs, by several
    processes (one GPU in all has nothing to share the model with)."""
    return (getattr(knobs, "sharding", "none") == "fsdp" and torch.cuda.is_available()
            and _processes() > 1)


def prepare_sharding(knobs: ShardingKnob) -> bool:
    """Before the model loads: under FSDP, have only the first process read the weights; where
    FSDP cannot run, say so in one line. Returns whether the stage trains sharded."""
    if knobs.sharding != "fsdp":
        return False
    if not torch.cuda.is_available():
        print("sharding: fsdp needs CUDA GPUs (accelerate applies FSDP only there); training "
              "unsharded on the CPU", flush=True)
        return False
    if _processes() == 1:
        print("sharding: fsdp across one GPU shares the model with no other; training unsharded "
              "(an instance type with several GPUs, or TrainingInstanceCount > 1, shards it)",
              flush=True)
        return False
    # What transformers reads while loading (transformers.integrations.fsdp.is_fsdp_enabled)
    # and what TrainingArguments(fsdp=...) would set, only later: process 0 loads the weights,
    # the others build the model on the meta device and receive theirs from FSDP.
    os.environ["ACCELERATE_USE_FSDP"] = "true"
    os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] = "true"
    from accelerate import PartialState

    PartialState()  # the process group, which transformers' loading needs to know the rank
    print(f"sharding: fsdp across {_processes()} processes", flush=True)
    return True


def fsdp_arguments(knobs: Any) -> dict[str, Any]:
    """The TrainingArguments that turn on FSDP, or none where the stage trains unsharded."""
    if not is_sharded(knobs):
        return {}
    return {
        "fsdp": "full_shard auto_wrap",
        "fsdp_config": {
            "version": 2,
            # Each decoder layer is one FSDP unit: the model's _no_split_modules, which accelerate
            # reads when no class is named (decoder_layers says which they are).
            "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "reshard_after_forward": True,  # full_shard: weights gathered per layer, both passes
            "cpu_ram_efficient_loading": True,
            "state_dict_type": "SHARDED_STATE_DICT",  # checkpoints; the saved model is gathered
            # Activation checkpointing through FSDP's own wrapper (the Trainer's would gather
            # every layer's weights once more in the backward pass).
            "activation_checkpointing": knobs.gradient_checkpointing is True,
        },
    }


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules FSDP shards as units: every instance of the model's `_no_split_modules` (its
    decoder layer class, for transformers' decoders), as accelerate's transformer-based wrap
    policy picks them."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or [])
    if not names:
        raise ValueError(f"{type(base).__name__} names no decoder layer class "
                         "(_no_split_modules); FSDP has no unit to shard it by")
    return [module for module in model.modules() if type(module).__name__ in names]


def gather_trained_model(model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """After sharded training: the whole model's state dict, gathered into the first process's
    CPU memory, for saving (the other processes get an empty dict); and the model made whole in
    every process, so that the first process alone can measure it afterwards (held-out figures,
    samples) while the others are done: a forward pass of a sharded model would wait for them.
    Every process must call it. None for a model that is not sharded, whose own state dict is
    whole.

    The gathering is what accelerate's `get_state_dict` does for FSDP2, called directly so that
    the CPU test runs what the GPU path runs. Each GPU then holds the whole weights (the
    optimizer state and gradients are not gathered): a model that trains only sharded can be
    measured when its weights alone fit one GPU.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(model, FSDPModule):
        return None
    weights = get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    units = [module for module in model.modules() if isinstance(module, FSDPModule)]
    for unit in units:  # gathered once, kept so: forward passes need no other process
        unit.set_reshard_after_forward(False, recurse=False)
    for unit in units:
        unit.unshard()
    return weights

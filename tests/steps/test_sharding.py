"""Sharded training (the `sharding` knob): FSDP must change where the weights live, not what is
learnt or what is saved. accelerate applies FSDP only on GPUs, so the sharding itself is tested
on two CPU processes (gloo) with FSDP2's `fully_shard` over the decoder layers the stages shard by
(tests/steps/sharded_training.py); a stage asked to shard on a CPU says so and trains unsharded."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from steps.common import sharding
from steps.common.models import TINY, load_model, load_tokenizer
from steps.sft_config import SFTStageConfig

from . import sharded_training
from .conftest import counting_records
from .stage_runs import run_sft

METHODS = ("none", "lora")
WEIGHTS = {"none": "model.safetensors", "lora": "adapter_model.safetensors"}


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """Two processes trained builtin:tiny with FSDP, fully and with LoRA, and saved it."""
    out = tmp_path_factory.mktemp("sharded")
    sharded_training.train_sharded(METHODS, out)
    return out


@pytest.fixture(scope="module")
def unsharded(tmp_path_factory):
    """The same training, whole in this process, fully and with LoRA, and saved."""
    out = tmp_path_factory.mktemp("unsharded")
    for method in METHODS:
        sharded_training.train(method, out / method)
    return out


@pytest.mark.parametrize("method", METHODS)
def test_two_processes_sharded_with_fsdp_learn_as_one_unsharded_process(sharded, unsharded,
                                                                         method):
    whole = json.loads((unsharded / method / "losses.json").read_text())
    split = json.loads((sharded / method / "losses.json").read_text())
    # Same rows, same initialisation: what is left to differ is the order of float sums (each
    # process's own mean, the reduce-scatter of the gradients), about 1e-7 relative in float32.
    assert len(split) == sharded_training.STEPS and split == pytest.approx(whole, abs=1e-5)
    assert split[0] != split[-1]  # it trained: the weights moved between the steps
    weights = [load_file(folder / method / WEIGHTS[method]) for folder in (sharded, unsharded)]
    assert weights[0].keys() == weights[1].keys()
    # AdamW divides by the root of the squared gradients, which turns the rounding differences
    # of near-zero gradients into step-sized ones: 4e-5 at most measured, where 4 steps at 1e-2
    # moved the weights by about 4e-2.
    assert max((weights[0][k] - weights[1][k]).abs().max().item() for k in weights[0]) < 2e-4


@pytest.mark.parametrize("method", METHODS)
def test_after_sharded_training_the_first_process_alone_runs_the_whole_trained_model(
        sharded, unsharded, method):
    alone = torch.load(sharded / method / "logits.pt")  # rank 0's, the other process gone on
    whole = torch.load(unsharded / method / "logits.pt")
    # The weights differ by the rounding AdamW amplifies (above): logits of about 1 by 1e-4.
    torch.testing.assert_close(alone, whole, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("method", METHODS)
def test_what_a_sharded_run_saves_loads_on_its_own_as_an_unsharded_model(sharded, method):
    model = load_model(str(sharded / method)).eval()  # a full model, or the adapter and its base
    rows = load_tokenizer(TINY)("Count to 3.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=rows).logits
    untrained = load_model(TINY).eval()
    with torch.no_grad():
        assert not torch.allclose(logits, untrained(input_ids=rows).logits)
    assert hasattr(model, "peft_config") == (method == "lora")


def test_the_units_fsdp_shards_are_the_decoder_layers_of_a_model_and_of_its_adapter():
    model = load_model(TINY)
    layers = sharding.decoder_layers(model)
    assert len(layers) == model.config.num_hidden_layers
    assert {type(layer).__name__ for layer in layers} == {"LlamaDecoderLayer"}
    from steps.common.peft_methods import apply_peft

    tuned = apply_peft(load_model(TINY), SFTStageConfig(base_model=TINY), load_tokenizer(TINY))
    assert len(sharding.decoder_layers(tuned)) == model.config.num_hidden_layers


def test_a_stage_asked_to_shard_on_a_cpu_says_so_in_one_line_and_trains_unsharded(tmp_path):
    run = run_sft(tmp_path / "opt-ml", counting_records(8), base_model=TINY, peft_method="lora",
                  precision="fp32", max_steps=2, checkpoint_steps=0, sharding="fsdp")
    said = [line for line in run.stdout.splitlines() if line.startswith("sharding:")]
    assert said == [("sharding: fsdp needs CUDA GPUs (accelerate applies FSDP only there); "
                     "training unsharded on the CPU")]
    assert run.summary["hyperparameters"]["sharding"] == "fsdp" and run.summary["sharded"] is False
    assert (run.model_dir / "adapter_model.safetensors").is_file()

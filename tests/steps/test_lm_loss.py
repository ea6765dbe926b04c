"""The next-token loss without full logits (steps.common.lm_loss) is the model's own loss, with the
same gradients, in chunks that never hold more than one chunk's logits."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, PromptTuningConfig, get_peft_model

from steps.common import lm_loss
from steps.common.models import load_model


def batch() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, 260, (3, 17), generator=generator)
    labels = input_ids.clone()
    labels[0, :5] = lm_loss.IGNORE_INDEX  # a prompt, not trained
    labels[2, 12:] = lm_loss.IGNORE_INDEX  # padding
    attention_mask = (labels != lm_loss.IGNORE_INDEX).long()
    attention_mask[0] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def loss_and_gradients(model: torch.nn.Module, inputs: dict, **extra) -> tuple[float, dict]:
    model.zero_grad()
    loss = model(**inputs, **extra).loss
    loss.backward()
    return loss.item(), {name: p.grad.clone() for name, p in model.named_parameters()
                         if p.grad is not None}


@pytest.mark.parametrize("method", ["none", "lora", "prompt_tuning"])
@pytest.mark.parametrize("num_items_in_batch", [None, 40])
def test_the_chunked_loss_and_its_gradients_equal_the_models_own(monkeypatch, method,
                                                                 num_items_in_batch):
    # 288 vocabulary entries: 7 positions per chunk, so the batch's 38 scored positions take 6.
    monkeypatch.setattr(lm_loss, "CHUNK_ELEMENTS", 7 * 288)
    plain, chunked = load_model("builtin:tiny"), load_model("builtin:tiny")
    assert lm_loss.add_memory_light_loss(chunked, "cpu") == "chunked"
    if method != "none":
        peft = (LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.0)
                if method == "lora" else PromptTuningConfig(task_type="CAUSAL_LM",
                                                            num_virtual_tokens=3))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            plain = get_peft_model(plain, peft)
            torch.manual_seed(0)
            chunked = get_peft_model(chunked, peft)
    extra = {} if num_items_in_batch is None else {"num_items_in_batch": num_items_in_batch}

    own, own_gradients = loss_and_gradients(plain, batch(), **extra)
    light, light_gradients = loss_and_gradients(chunked, batch(), **extra)

    assert light == pytest.approx(own, rel=1e-6)
    assert own_gradients.keys() == light_gradients.keys() and own_gradients
    for name, gradient in own_gradients.items():
        torch.testing.assert_close(light_gradients[name], gradient, rtol=1e-5, atol=1e-7,
                                   msg=name)


def test_the_chunked_loss_returns_no_logits_and_leaves_generation_alone():
    model = load_model("builtin:tiny")
    lm_loss.add_memory_light_loss(model, "cpu")
    inputs = batch()
    assert model(**inputs).logits is None
    inputs.pop("labels")
    assert model(**inputs).logits.shape == (3, 17, 288)
    generated = model.generate(inputs["input_ids"][:1, :4], max_new_tokens=3, do_sample=False)
    assert generated.shape == (1, 7)


def test_a_batch_with_nothing_to_score_gives_a_zero_loss_that_backpropagates():
    model = load_model("builtin:tiny")
    lm_loss.add_memory_light_loss(model, "cpu")
    inputs = batch()
    inputs["labels"][:] = lm_loss.IGNORE_INDEX
    loss = model(**inputs).loss
    loss.backward()
    assert loss.item() == 0.0

"""The next-token loss without the full-vocabulary float32 logits.

A causal LM's own loss materialises its logits for every position of the batch, upcasts them to
float32 and keeps their log-softmax for the backward pass: 12 bytes a position per vocabulary entry
(SmolLM2's 49,152 entries: 2.3 GiB at 4 x 1,024 tokens), often more than the rest of training
together (issue 17; pipelines/memory_plan.py counts it). `add_memory_light_loss(model)` makes the
model's forward return the same loss, with its gradients, without them:

- where TRL's fused LM head runs its Triton kernel (CUDA), through that head
  (`trl.trainer.utils.add_fused_lm_head`, which TRL's SFTTrainer uses by default): the log-
  probabilities are computed a tile at a time inside the kernel. Not run here (no GPU in this
  project's CI); it is TRL's own default path for SFT on a GPU.
- elsewhere (a CPU), by `chunked_cross_entropy` below. TRL's torch fallback of the same head holds
  float32 temporaries of a 4,096 x 32,768 tile (about 2.7 GiB on a CPU, more than the logits it
  replaces at usual batches, and twice as slow), and transformers and accelerate have no chunked
  loss, so this one is written here: the scored positions go through the output layer a chunk at
  a time, each chunk under activation checkpointing, so that only one chunk's logits exist at once
  and the backward pass recomputes them (one more output-layer product per step).

The loss is the model's own: the sum of the scored positions' cross-entropy, divided by
`num_items_in_batch` (the Trainer's count over the whole accumulated batch) or else by this batch's
scored positions; the logits are not returned (`None`) when labels are given. Liger-kernel's fused
linear cross-entropy is not used: TRL 1.16 refuses it beside its own fused head.
"""

from __future__ import annotations

import functools
import types

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils import is_triton_available

# Logits (positions x vocabulary entries) of one chunk: 16 Mi elements, 64 MiB in float32 per
# tensor (the logits, their float32 copy, the log-softmax, its gradient).
CHUNK_ELEMENTS = 2**24
IGNORE_INDEX = -100
# Settings that scale or cap the logits before the softmax: TRL's head applies them, the chunked
# loss does not, so a model that has one keeps its own loss on a CPU.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier",
                     "lm_head_multiplier", "logits_scaling")


def chunk_positions(vocabulary: int) -> int:
    """Positions per chunk of the chunked loss for a vocabulary of `vocabulary` entries."""
    return max(1, CHUNK_ELEMENTS // vocabulary)


def uses_fused_kernel(device: torch.device | str) -> bool:
    """Whether TRL's fused LM head runs its Triton kernel on `device`."""
    return is_triton_available() and torch.device(device).type in ("cuda", "xpu")


def chunked_cross_entropy(hidden: torch.Tensor, head: torch.nn.Module, vocabulary: int,
                          labels: torch.Tensor) -> torch.Tensor:
    """The summed cross-entropy of `labels` under the logits `head(hidden)` (`vocabulary` wide),
    in float32, computed a chunk of positions at a time; positions labelled IGNORE_INDEX add 0.
    `head` is called as a module, so that what wraps the output layer (PEFT's trainable new-token
    rows, an adapter) takes part."""
    hidden = hidden.reshape(-1, hidden.size(-1))
    labels = labels.reshape(-1).to(hidden.device)
    scored = labels != IGNORE_INDEX
    hidden, labels = hidden[scored], labels[scored]
    if not len(labels):  # nothing scored: a zero still connected to the graph, as backward needs
        return hidden.sum() * 0.0
    total = None
    positions = chunk_positions(vocabulary)
    parts = list(zip(hidden.split(positions), labels.split(positions)))
    for index, (part, targets) in enumerate(parts):
        # The last chunk's logits are the first the backward pass uses, so keeping them costs no
        # more than recomputing them would: only the others are recomputed (and a batch that
        # fits one chunk, every small model's, costs no extra forward pass at all).
        if index == len(parts) - 1:
            loss = _chunk_loss(head, part, targets)
        else:
            loss = checkpoint(_chunk_loss, head, part, targets, use_reentrant=False)
        total = loss if total is None else total + loss
    return total


def _chunk_loss(head: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    # As transformers' own causal-LM loss: the product in the compute dtype (autocast), the
    # softmax in float32.
    return F.cross_entropy(head(hidden).float(), labels, reduction="sum")


def add_memory_light_loss(model: torch.nn.Module, device: torch.device | str | None = None) -> str:
    """Make `model`'s forward, given labels, return its loss without the full logits (see the
    module docstring), on `device` (where it will train: CUDA when there is one); how, as the
    stage prints it: "fused" (TRL's kernel), "chunked", or "materialised" (a model whose logits
    are scaled or capped, on a CPU). `model`: a transformers causal LM or a PEFT model around one
    (the transformers model is changed; PEFT passes its calls through)."""
    if hasattr(model, "get_base_model"):  # PEFT
        model = model.get_base_model()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    text_config = model.config.get_text_config()
    if uses_fused_kernel(device):
        from trl.trainer.utils import add_fused_lm_head

        add_fused_lm_head(model)  # `fused_lm_head=True` in the call below selects it
        how = "fused"
    elif any(getattr(text_config, name, None) for name in _LOGIT_TRANSFORMS):
        return "materialised"
    else:
        how = "chunked"
    original = model.forward

    # The original signature, so that the Trainer sees that the model takes num_items_in_batch.
    @functools.wraps(type(model).forward)
    def forward(self, *args, labels=None, num_items_in_batch=None, **kwargs):
        if labels is None:
            return original(*args, **kwargs)
        if how == "fused":
            return original(*args, labels=labels, num_items_in_batch=num_items_in_batch,
                            fused_lm_head=True, **kwargs)
        kwargs["use_cache"] = False  # training: no key/value cache
        hidden = self.base_model(*args, **kwargs).last_hidden_state[:, :-1]
        targets = labels[:, 1:]
        total = chunked_cross_entropy(hidden, self.get_output_embeddings(),
                                      self.config.get_text_config().vocab_size, targets)
        count = (num_items_in_batch if num_items_in_batch is not None
                 else (targets != IGNORE_INDEX).sum().clamp(min=1))
        return CausalLMOutputWithPast(loss=total / count)

    model.forward = types.MethodType(forward, model)
    return how

"""Proximal policy optimisation against a reward model (training stage): the RL step of RLHF.

TRL 1.16 has no PPO trainer (the last one shipped in 1.12), so the algorithm is written out here,
on transformers' generation, PEFT's adapters and the reward model steps.reward_model trains. It
follows the PPO-for-language-models recipe of Ziegler et al. 2019 / Ouyang et al. 2022 as TRL's
former PPOTrainer implemented it ("The N+ implementation details of RLHF with PPO", Huang et al.
2024).

In a SageMaker training container: ``python -m steps.ppo`` with hyperparameters.json and the
channels ``train`` (required: prompts, from preference, prompt-completion, conversational or
prompt-only {"prompt"} records), ``reward_model`` (required: steps.reward_model's output),
``model`` (optional: the policy to start from, typically SFT's output, instead of ``base_model``)
and ``validation`` (optional: held-out prompts, whose reward is measured before and after).
Locally: ``python -m steps.ppo --base_model builtin:tiny --max_steps 20`` with
SM_CHANNEL_TRAIN and SM_CHANNEL_REWARD_MODEL set.

One iteration (``max_steps`` of them; ``per_device_batch_size`` x ``gradient_accumulation_steps``
x ``num_mini_batches`` prompts each):

  1. Rollout: the policy pi samples a response y = (y_1..y_T) to each prompt x, at most
     ``response_length`` tokens at ``temperature``.
  2. Score: s = RM(x, y), the reward model's score of the whole response, less
     ``missing_eos_penalty`` where the response ran out of tokens before its stop token (the reward
     model would score the unfinished answer as if complete; Huang et al.'s detail, TRL's former
     PPOConfig.missing_eos_penalty). With the policy frozen as it is now (pi_old), the per-token
     log-probabilities log pi_old(y_t | x, y_<t), those of the reference log ref(y_t | ...) and
     the values V(s_t) of the states before each token.
  3. Per-token reward, the KL penalty to the reference on every token and the score at the last:
         r_t = -kl_coef * (log pi_old(y_t) - log ref(y_t)) + [t = T] * s
  4. Advantages by generalised advantage estimation (Schulman et al. 2016):
         delta_t = r_t + gamma * V(s_{t+1}) - V(s_t)          (V(s_{T+1}) = 0)
         A_t = delta_t + gamma * lam * A_{t+1},  returns R_t = A_t + V(s_t)
     A is whitened over the batch (mean 0, variance 1).
  5. ``ppo_epochs`` passes over the batch in ``num_mini_batches`` minibatches, one optimizer step
     each, minimising L = L_policy + vf_coef * L_value with the ratio rho_t = pi(y_t)/pi_old(y_t):
         L_policy = mean_t max(-A_t * rho_t, -A_t * clip(rho_t, 1 - cliprange, 1 + cliprange))
         V_clip   = V_old + clip(V - V_old, -cliprange_value, cliprange_value)
         L_value  = 1/2 mean_t max((V - R_t)^2, (V_clip - R_t)^2)
     (means over the response tokens of the minibatch, accumulated exactly over micro-batches).
     The value head learns at its own ``value_learning_rate``: it starts at zero and must fit the
     returns within a few iterations, while the policy must move little.

The reference is the starting policy. With peft_method lora it costs no copy: the policy is the
base model plus a LoRA adapter, and the reference is the same weights with the adapter switched
off (or, when the 'model' channel holds SFT's LoRA adapter and training continues it, a frozen
copy of that adapter: adapter-sized). With peft_method none it is a frozen in-memory copy.

The value function is a linear head on the policy's last hidden state, not a separate critic
model: one forward pass gives both log-probabilities and values, and with LoRA the critic costs
hidden_size + 1 weights instead of a second model. Its loss also trains the shared adapter (or
weights), scaled by vf_coef, as in Ziegler et al. A separate critic (TRL's former PPOTrainer
initialised one from the reward model) is steadier on large models but doubles the memory.

Logged every ``logging_steps`` iterations: mean_reward (the reward model's score), kl (sequence
KL to the reference, summed over tokens), policy_loss, value_loss, clip_fraction, entropy,
approx_kl (between pi_old and pi after the update), response_length, truncated_fraction (responses
cut before their stop token), learning_rate (the policy's). Writes the
policy (a LoRA adapter, or a full model), the tokenizer and training_summary.json to SM_MODEL_DIR,
metrics.jsonl and loss_curve.png to SM_OUTPUT_DATA_DIR. No mid-run checkpoints: a restarted job
starts over.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import transformers
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from steps.common import contract
from steps.common.contract import StageError
from steps.common.metrics import log_metrics, peak_memory_mb, plot_loss_curve
from steps.common.models import load_tokenizer, resolve_model_source, stop_token_ids
from steps.common.peft_methods import (
    apply_peft,
    save_model,
)
from steps.common.preference import (
    is_peft_model,
    load_policy,
    load_prompts,
    load_reward_model,
    reward_scores,
)
from steps.common.scoring import generate
from steps.common.training import (
    TrainingReport,
    metrics_callback,
    prepare_precision,
    resolve_checkpointing,
    save_training_record,
    trainable_parameters,
    training_summary,
    world_size,
)
from steps.ppo_config import PPOStageConfig


class ValueHead(nn.Module):
    """V(s_t): one linear layer on the policy's last hidden state; starts at 0 everywhere."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden_states.to(self.linear.weight.dtype)).squeeze(-1)


@dataclass
class Rollout:
    """One batch of sampled responses and what PPO needs of them; [B, T] tensors over responses."""

    input_ids: torch.Tensor  # [B, P + T]: prompts left-padded to P, responses right-padded to T
    attention_mask: torch.Tensor  # [B, P + T]
    prompt_length: int  # P
    response_mask: torch.Tensor  # 1 up to and including the stop token, 0 after
    scores: torch.Tensor  # [B] reward model scores
    truncated: torch.Tensor  # [B] True where response_length ran out before a stop token
    logprobs: torch.Tensor  # log pi_old(y_t)
    ref_logprobs: torch.Tensor  # log ref(y_t)
    values: torch.Tensor  # V_old(s_t)
    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None


def main(config: PPOStageConfig) -> None:
    if world_size() > 1:
        raise StageError("the PPO stage trains in one process; run it with InstanceCount 1 and "
                         "one GPU (or CPU)")
    if config.precision == "fp16":
        raise StageError("precision 'fp16' is not supported by the PPO stage (no loss scaling); "
                         "use bf16 or fp32")
    transformers.set_seed(config.seed)
    model_dir = contract.model_dir()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    # 1. Prompts and the reward model: checked before the policy loads.
    source = resolve_model_source(contract.optional_channel_dir("model"), config.base_model)
    tokenizer = load_tokenizer(source)
    chat_template = bool(tokenizer.chat_template)
    prompts = load_prompts(contract.channel_dir("train"), chat_template)
    validation_dir = contract.optional_channel_dir("validation")
    validation_prompts = load_prompts(validation_dir, chat_template) if validation_dir else []
    print(f"train: {len(prompts)} distinct prompts; validation: {len(validation_prompts)}",
          flush=True)
    reward_source = resolve_model_source(contract.channel_dir("reward_model"), "")
    reward_model = load_reward_model(reward_source).to(device)
    reward_tokenizer = load_tokenizer(reward_source)
    print(f"reward model: {reward_source}", flush=True)

    # 2. Policy, reference and value head.
    precision = prepare_precision(config)
    print(f"peft_method: {config.peft_method}; {config.learning_rate_line()}, of the value head "
          f"{config.value_learning_rate:g}", flush=True)
    print(f"loading policy {source}", flush=True)
    policy = load_policy(source, config)
    reference, reference_note = make_reference(policy, config, tokenizer)
    print(f"reference model: {reference_note}", flush=True)
    policy = reference.policy
    policy.to(device)
    if reference.model is not None:
        reference.model.to(device)
    _disable_dropout(policy)  # dropout would make pi differ from pi_old at the first update
    checkpointing = resolve_checkpointing(config, "ppo", policy, precision)  # auto: fits without?
    if config.gradient_checkpointing is True:  # non-reentrant: works with a frozen base under LoRA
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    hidden_size = policy.config.get_text_config().hidden_size
    value_head = ValueHead(hidden_size).to(device)
    policy_parameters = [p for p in policy.parameters() if p.requires_grad]
    trainable = policy_parameters + list(value_head.parameters())
    in_memory = _parameters_in_memory([policy, reference.model, value_head])

    iterations = config.max_steps if config.max_steps > 0 else max(
        1, math.ceil(config.epochs * len(prompts) / config.rollout_batch_size))
    optimizer_steps = iterations * config.ppo_epochs * config.num_mini_batches
    optimizer = torch.optim.AdamW(
        [{"params": policy_parameters, "lr": config.learning_rate},
         {"params": list(value_head.parameters()), "lr": config.value_learning_rate}],
        weight_decay=config.weight_decay,
    )
    scheduler = transformers.get_scheduler(
        config.lr_scheduler_type, optimizer,
        num_warmup_steps=int(config.warmup_ratio * optimizer_steps),
        num_training_steps=optimizer_steps,
    )
    autocast = _autocast(device, precision)
    stops = stop_token_ids(policy, tokenizer)
    prompt_ids = [_prompt_tokens(tokenizer, prompt, config) for prompt in prompts]
    trained, total = trainable_parameters(policy)
    print(f"trainable parameters: {trained + sum(p.numel() for p in value_head.parameters()):,} "
          f"(policy {trained:,} of {total:,}, value head {hidden_size + 1}); "
          f"parameters in memory: {in_memory:,}; rollout: {config.rollout_batch_size} prompts, "
          f"{config.ppo_epochs} epochs x {config.num_mini_batches} minibatches per iteration; "
          f"{iterations} iterations", flush=True)

    validation_before = None
    if validation_prompts:
        validation_before = _validation_reward(policy, tokenizer, validation_prompts, reward_model,
                                               reward_tokenizer, config, autocast)
        print(f"validation: mean reward before training {validation_before:.4f}", flush=True)

    # 3. The PPO loop.
    _, metrics_path = metrics_callback()  # a fresh metrics.jsonl; this loop logs its own lines
    history: list[dict[str, Any]] = []
    order = torch.Generator().manual_seed(config.seed)
    batches = _prompt_batches(len(prompts), config.rollout_batch_size, order)
    started, tokens = time.perf_counter(), 0
    for iteration in range(1, iterations + 1):
        batch = next(batches)
        rollout = collect_rollout(
            policy, reference, value_head, reward_model, tokenizer, reward_tokenizer,
            [prompt_ids[i] for i in batch], [prompts[i] for i in batch], stops, config, autocast,
        )
        compute_advantages(rollout, config)
        stats = ppo_update(policy, value_head, rollout, optimizer, scheduler, trainable, config,
                           autocast)
        tokens += int(rollout.attention_mask.sum())
        line = {"step": iteration,
                "epoch": round(iteration * config.rollout_batch_size / len(prompts), 4),
                **_iteration_metrics(rollout, stats),
                "learning_rate": scheduler.get_last_lr()[0],
                "tokens_per_second": round(tokens / max(time.perf_counter() - started, 1e-9), 1)}
        history.append(line)
        if iteration == 1 or iteration % config.logging_steps == 0 or iteration == iterations:
            log_metrics(line, metrics_path)
    runtime = time.perf_counter() - started

    validation_after = None
    if validation_prompts:
        validation_after = _validation_reward(policy, tokenizer, validation_prompts, reward_model,
                                              reward_tokenizer, config, autocast)
        print(f"validation: mean reward {validation_before:.4f} -> {validation_after:.4f}",
              flush=True)

    # 4. Report and save, all or nothing.
    report = _report(history, iterations, tokens, runtime, trainable, total)
    window = max(1, min(5, len(history) // 4))
    first = sum(m["mean_reward"] for m in history[:window]) / window
    last = sum(m["mean_reward"] for m in history[-window:]) / window
    log_metrics({"step": iterations, "train_runtime_s": report.runtime_s, "total_tokens": tokens,
                 "mean_tokens_per_second": report.tokens_per_second,
                 "trainable_parameters": report.trainable_parameters,
                 "peak_memory_mb": report.peak_memory_mb,
                 **({"validation_reward": validation_after} if validation_prompts else {})},
                metrics_path)
    plot_loss_curve(history, metrics_path.parent / "loss_curve.png")
    print(f"mean reward: first {window} iterations {first:.4f}, last {window} {last:.4f}; "
          f"KL to the reference at the end {history[-1]['kl']:.4f}", flush=True)
    summary = training_summary(
        "ppo", config, source, precision, report,
        gradient_checkpointing=checkpointing,
        reward_model=reward_source,
        reference_model=reference_note,
        parameters_in_memory=in_memory,
        prompts=len(prompts),
        rollout_batch_size=config.rollout_batch_size,
        mean_reward_first=first, mean_reward_last=last,
        kl_last=history[-1]["kl"],
        validation_reward_before=validation_before,
        validation_reward_after=validation_after,
    )
    if reference.adapter_name and reference.adapter_name in policy.peft_config:
        policy.delete_adapter(reference.adapter_name)  # the frozen reference copy: not output
    with contract.atomic_output(model_dir) as staging:
        save_model(policy, tokenizer, staging, config)
        save_training_record(staging, summary, started_from=source)
    what = "adapter" if is_peft_model(policy) else "model"
    print(f"saved the policy {what}, tokenizer and training_summary.json to {model_dir}",
          flush=True)


# --- The reference ---------------------------------------------------------------------------------


@dataclass
class Reference:
    """How to run the reference: the policy with an adapter off or swapped, or a frozen copy."""

    policy: PreTrainedModel
    model: PreTrainedModel | None = None  # a separate frozen copy (full fine-tuning)
    adapter_name: str | None = None  # a frozen copy of a pretrained adapter

    @contextlib.contextmanager
    def active(self) -> Iterator[PreTrainedModel]:
        """The model to run as the reference, for the duration of the block."""
        if self.model is not None:
            yield self.model
        elif self.adapter_name is not None:
            self.policy.set_adapter(self.adapter_name)
            try:
                yield self.policy
            finally:
                self.policy.set_adapter("default")
        else:
            with self.policy.disable_adapter():
                yield self.policy


def make_reference(policy: PreTrainedModel, config: PPOStageConfig,
                   tokenizer: PreTrainedTokenizerBase) -> tuple[Reference, str]:
    """The trainable policy and its reference, with no second model wherever LoRA allows."""
    if config.peft_method == "none":
        frozen = copy.deepcopy(policy).eval().requires_grad_(False)
        return Reference(policy, model=frozen), "a frozen in-memory copy of the starting model"
    if not is_peft_model(policy):
        policy = apply_peft(policy, config, tokenizer)
        return Reference(policy), "the policy with its LoRA adapter disabled (no copy)"
    # Training continues a LoRA adapter (SFT's): its starting state is the reference, which the
    # base alone is not. Keep a frozen copy of the adapter, as TRL's DPOTrainer does.
    policy.add_adapter("reference", policy.peft_config["default"])
    reference_state = {name.replace(".default.", ".reference."): param.detach()
                       for name, param in policy.named_parameters() if ".default." in name}
    for name, param in policy.named_parameters():
        if name in reference_state:
            param.data.copy_(reference_state[name])
            param.requires_grad_(False)
    policy.set_adapter("default")
    return (Reference(policy, adapter_name="reference"),
            "a frozen copy of the starting LoRA adapter (adapter-sized)")


# --- Rollouts ---------------------------------------------------------------------------------------


def _prompt_tokens(tokenizer: PreTrainedTokenizerBase, prompt: Any,
                   config: PPOStageConfig) -> list[int]:
    if isinstance(prompt, list):
        ids = tokenizer.apply_chat_template(prompt, tokenize=True, return_dict=True,
                                            add_generation_prompt=True)["input_ids"]
    else:
        ids = tokenizer(text=prompt)["input_ids"]
    room = config.max_seq_length - config.response_length
    return ids[-room:]  # a prompt too long for the sequence keeps its end, next to the response


def _prompt_batches(count: int, size: int, generator: torch.Generator) -> Iterator[list[int]]:
    """Prompt indices, `size` at a time, reshuffled on every pass (with wrap-around)."""
    pending: list[int] = []
    while True:
        while len(pending) < size:
            pending += torch.randperm(count, generator=generator).tolist()
        yield pending[:size]
        pending = pending[size:]


@torch.no_grad()
def collect_rollout(policy: PreTrainedModel, reference: Reference, value_head: ValueHead,
                    reward_model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                    reward_tokenizer: PreTrainedTokenizerBase, prompt_ids: list[list[int]],
                    prompts: list[Any], stops: list[int], config: PPOStageConfig,
                    autocast: contextlib.AbstractContextManager) -> Rollout:
    """Steps 1-2: sample responses, score them, and record pi_old, ref and V_old per token."""
    policy.eval()  # dropout is off anyway; eval lets generation use its cache under checkpointing
    device = next(policy.parameters()).device
    width = max(len(ids) for ids in prompt_ids)
    pad = tokenizer.pad_token_id
    query = torch.tensor([[pad] * (width - len(ids)) + ids for ids in prompt_ids], device=device)
    query_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in prompt_ids],
                              device=device)
    sequences = []
    for first in range(0, len(prompt_ids), config.per_device_batch_size):
        rows = slice(first, first + config.per_device_batch_size)
        with autocast:
            output = policy.generate(
                input_ids=query[rows], attention_mask=query_mask[rows], do_sample=True,
                temperature=config.temperature, top_k=0, top_p=1.0,
                max_new_tokens=config.response_length, eos_token_id=stops, pad_token_id=pad,
            )
        response = output[:, width:]
        sequences.append(torch.nn.functional.pad(
            response, (0, config.response_length - response.shape[1]), value=pad))
    responses = torch.cat(sequences)

    # The response ends at its first stop token (kept: the policy learns to stop); what generate
    # wrote after it is padding.
    is_stop = torch.isin(responses, torch.tensor(stops, device=device))
    after_stop = (is_stop.cumsum(1) - is_stop.long()) > 0
    response_mask = (~after_stop).long()
    responses = responses.masked_fill(after_stop, pad)
    truncated = ~is_stop.any(1)
    lengths = response_mask.sum(1)

    input_ids = torch.cat([query, responses], dim=1)
    attention_mask = torch.cat([query_mask, response_mask], dim=1)
    texts = [tokenizer.decode(responses[row, :lengths[row]], skip_special_tokens=True)
             for row in range(len(prompt_ids))]
    scores = torch.tensor(
        reward_scores(reward_model, reward_tokenizer, prompts, texts, config.per_device_batch_size),
        device=device,
    )

    logprobs, values, ref_logprobs = [], [], []
    for first in range(0, len(prompt_ids), config.per_device_batch_size):
        rows = slice(first, first + config.per_device_batch_size)
        with autocast:
            lp, v, _ = policy_forward(policy, value_head, input_ids[rows], attention_mask[rows],
                                      width, config.temperature)
            with reference.active() as reference_model:
                ref_lp, _, _ = policy_forward(reference_model, None, input_ids[rows],
                                              attention_mask[rows], width, config.temperature)
        logprobs.append(lp)
        values.append(v)
        ref_logprobs.append(ref_lp)
    mask = response_mask.float()
    return Rollout(input_ids, attention_mask, width, mask, scores, truncated,
                   torch.cat(logprobs) * mask, torch.cat(ref_logprobs) * mask,
                   torch.cat(values) * mask)


def policy_forward(model: PreTrainedModel, value_head: ValueHead | None, input_ids: torch.Tensor,
                   attention_mask: torch.Tensor, prompt_length: int, temperature: float,
                   ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Per response token: log pi(y_t | x, y_<t) at `temperature`, V(s_t) and the entropy.

    The logits at position i predict token i + 1, so the response's tokens (from `prompt_length`
    on) are scored by positions prompt_length - 1 to the second last, and the value of the state
    before token t is read at the same position (only those positions go through the LM head). Position ids count only real tokens, as
    generation counted them for the left-padded prompts.
    """
    position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
    response_length = input_ids.shape[1] - prompt_length
    output = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                   output_hidden_states=value_head is not None, use_cache=False,
                   logits_to_keep=response_length + 1)  # no LM head over the prompt
    logits = output.logits[:, :-1].float() / temperature
    log_softmax = logits.log_softmax(-1)
    logprobs = log_softmax.gather(-1, input_ids[:, prompt_length:, None])[..., 0]
    entropy = -(log_softmax.exp() * log_softmax).sum(-1)
    values = None
    if value_head is not None:
        values = value_head(output.hidden_states[-1][:, prompt_length - 1:-1]).float()
    return logprobs, values, entropy


# --- Advantages and the update ----------------------------------------------------------------------


def compute_advantages(rollout: Rollout, config: PPOStageConfig) -> None:
    """Steps 3-4: per-token rewards (KL penalty + score at the last token), then GAE.

    A response cut before its stop token scores missing_eos_penalty less: the reward model scored
    it as if complete, and the policy must not learn that running on pays.
    """
    mask = rollout.response_mask
    rewards = -config.kl_coef * (rollout.logprobs - rollout.ref_logprobs) * mask
    last = (mask.sum(1).long() - 1).clamp(min=0)
    scores = rollout.scores - config.missing_eos_penalty * rollout.truncated.to(rollout.scores.dtype)
    rewards[torch.arange(len(last)), last] += scores
    values = rollout.values * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(running)
        delta = rewards[:, t] + config.gamma * next_value - values[:, t]
        running = delta + config.gamma * config.lam * running
        advantages[:, t] = running
    rollout.returns = (advantages + values) * mask
    rollout.advantages = _whiten(advantages, mask) * mask


def ppo_update(policy: PreTrainedModel, value_head: ValueHead, rollout: Rollout,
               optimizer: torch.optim.Optimizer, scheduler: Any, trainable: list[nn.Parameter],
               config: PPOStageConfig, autocast: contextlib.AbstractContextManager,
               ) -> dict[str, float]:
    """Step 5: ppo_epochs x num_mini_batches optimizer steps on the clipped objectives."""
    policy.train()
    batch = rollout.input_ids.shape[0]
    minibatch = batch // config.num_mini_batches
    sums: dict[str, float] = {}
    count = 0
    for _ in range(config.ppo_epochs):
        order = torch.randperm(batch, device=rollout.input_ids.device)
        for start in range(0, batch, minibatch):
            rows_of_minibatch = order[start:start + minibatch]
            tokens = rollout.response_mask[rows_of_minibatch].sum().clamp(min=1)
            optimizer.zero_grad(set_to_none=True)
            step: dict[str, float] = {}
            for micro in rows_of_minibatch.split(config.per_device_batch_size):
                with autocast:
                    logprobs, values, entropy = policy_forward(
                        policy, value_head, rollout.input_ids[micro],
                        rollout.attention_mask[micro], rollout.prompt_length, config.temperature)
                losses = ppo_losses(logprobs, values, entropy, rollout, micro, config)
                # Each micro-batch adds its share of the minibatch's token mean: the gradient is
                # that of the whole minibatch, however it is split.
                ((losses["policy_loss"] + config.vf_coef * losses["value_loss"]) / tokens).backward()
                for name, value in losses.items():
                    step[name] = step.get(name, 0.0) + value.item() / tokens.item()
            if config.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            step["loss"] = step["policy_loss"] + config.vf_coef * step["value_loss"]
            for name, value in step.items():
                sums[name] = sums.get(name, 0.0) + value
            count += 1
    return {name: value / count for name, value in sums.items()}


def ppo_losses(logprobs: torch.Tensor, values: torch.Tensor, entropy: torch.Tensor,
               rollout: Rollout, rows: torch.Tensor, config: PPOStageConfig,
               ) -> dict[str, torch.Tensor]:
    """The clipped policy and value losses of `rows`, summed over their response tokens (the
    caller divides by the minibatch's token count), and statistics summed the same way."""
    mask = rollout.response_mask[rows]
    advantages, returns = rollout.advantages[rows], rollout.returns[rows]
    old_logprobs, old_values = rollout.logprobs[rows], rollout.values[rows]

    log_ratio = (logprobs - old_logprobs) * mask
    ratio = log_ratio.exp()
    policy_losses = torch.max(-advantages * ratio,
                              -advantages * ratio.clamp(1 - config.cliprange, 1 + config.cliprange))
    values_clipped = old_values + (values - old_values).clamp(-config.cliprange_value,
                                                              config.cliprange_value)
    value_losses = 0.5 * torch.max((values - returns) ** 2, (values_clipped - returns) ** 2)
    with torch.no_grad():
        stats = {
            "clip_fraction": (((ratio - 1).abs() > config.cliprange).float() * mask).sum(),
            "value_clip_fraction": (((values - old_values).abs() > config.cliprange_value).float()
                                    * mask).sum(),
            "entropy": (entropy * mask).sum(),
            "approx_kl": (0.5 * log_ratio ** 2 * mask).sum(),
        }
    return {"policy_loss": (policy_losses * mask).sum(), "value_loss": (value_losses * mask).sum(),
            **stats}


def _whiten(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    count = mask.sum().clamp(min=1)
    mean = (values * mask).sum() / count
    variance = (((values - mean) * mask) ** 2).sum() / count
    return (values - mean) * torch.rsqrt(variance + 1e-8)


# --- Helpers of this stage ----------------------------------------------------------------------


def _iteration_metrics(rollout: Rollout, stats: dict[str, float]) -> dict[str, float]:
    """One iteration's metrics line: the rollout's reward and KL, the update's losses."""
    kl = ((rollout.logprobs - rollout.ref_logprobs) * rollout.response_mask).sum(1)
    return {
        "train_loss": stats["loss"],
        "mean_reward": rollout.scores.mean().item(),
        "kl": kl.mean().item(),  # nats per response: sum over its tokens of log pi_old - log ref
        "policy_loss": stats["policy_loss"],
        "value_loss": stats["value_loss"],
        "clip_fraction": stats["clip_fraction"],
        "value_clip_fraction": stats["value_clip_fraction"],
        "entropy": stats["entropy"],
        "approx_kl": stats["approx_kl"],
        "response_length": rollout.response_mask.sum(1).mean().item(),
        # Responses cut at response_length before a stop token, which missing_eos_penalty costs.
        "truncated_fraction": rollout.truncated.float().mean().item(),
    }


def _report(history: list[dict[str, Any]], iterations: int, tokens: int, runtime: float,
            trainable: list[nn.Parameter], total: int) -> TrainingReport:
    losses = [m["train_loss"] for m in history]
    return TrainingReport(
        global_step=iterations, resumed_from_step=0, first_train_loss=losses[0],
        final_train_loss=losses[-1], mean_train_loss=sum(losses) / len(losses), eval_loss=None,
        tokens=tokens, runtime_s=round(runtime, 2),
        tokens_per_second=round(tokens / max(runtime, 1e-9), 1),
        trainable_parameters=sum(p.numel() for p in trainable), total_parameters=total,
        peak_memory_mb=round(peak_memory_mb(), 1),
    )


@torch.no_grad()
def _validation_reward(policy: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                       prompts: list[Any], reward_model: PreTrainedModel,
                       reward_tokenizer: PreTrainedTokenizerBase,
                       config: PPOStageConfig, autocast: contextlib.AbstractContextManager,
                       ) -> float:
    """The mean reward of the policy's greedy responses to `prompts`."""
    with autocast:
        responses = generate(policy, tokenizer, prompts, config.response_length,
                             config.per_device_batch_size)
    scores = reward_scores(reward_model, reward_tokenizer, prompts, responses,
                           config.per_device_batch_size)
    return sum(scores) / len(scores)


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _disable_dropout(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


def _parameters_in_memory(modules: list[nn.Module | None]) -> int:
    """Parameters held by `modules`, each tensor counted once (a shared base counts once)."""
    seen: dict[int, int] = {}
    for module in modules:
        if module is not None:
            for param in module.parameters():
                seen[id(param)] = param.numel()
    return sum(seen.values())


if __name__ == "__main__":
    contract.run(main, PPOStageConfig, job="training")

"""The memory one device needs to train a stage, from the model's sizes alone: no torch.

The estimate that the memory plan (pipelines/memory_plan.py, whose docstring explains each part of
the breakdown and the measurements behind it) prints before anything runs, and that a training
job reads to decide `gradient_checkpointing: auto` from the model it loaded, its settings and its
device's memory (steps.common.training.resolve_checkpointing): one estimate for both, so the plan
and the job decide alike. It imports nothing heavier than the standard library, since the training
image does not ship `pipelines/`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from steps.common.knobs import StageError

GIB = 2**30
# Of a device's memory, what the training's tensors may use: the driver reports less than the
# documented figure (an A10G's 24 GiB shows as 22.5), the CUDA context takes about 0.5 GiB and the
# caching allocator fragments.
USABLE_FRACTION = 0.90

# How each stage computes its loss over the vocabulary: "chunked", the next-token loss of
# steps.common.lm_loss (TRL's fused LM head on a GPU, chunks of positions elsewhere); "fused",
# TRL's fused LM head, which computes log-probabilities in tiles (DPO); or over materialised
# float32 logits; a reward model has a one-output head. The factor is bytes per logit element at
# the loss's peak when materialised: measured for the model's own loss (12, in fp32 and under bf16
# autocast alike) and for distillation (16 to 18 on config-built students: the logits, the trained positions' copy, the
# cross-entropy's and the softened log-softmaxes); counted from the stage's code, not measured, for
# PPO (the response positions' float32 copy, its scaling, log-softmax and exponential for the
# entropy, and their gradients).
LOGITS = {"pretrain": ("chunked", 12), "cpt": ("chunked", 12), "sft": ("chunked", 12),
          "dpo": ("fused", 12), "ppo": ("materialised", 24), "distill": ("materialised", 20),
          "reward_model": ("none", 0)}
# steps.common.lm_loss's chunks on a CPU: CHUNK_ELEMENTS logits (positions x vocabulary) at a
# time, each element held as the logits, their float32 copy, log-softmax and gradients
# (tests/pipelines/test_memory_plan.py checks the constant against the module).
LOSS_CHUNK_ELEMENTS = 2**24
LOSS_CHUNK_BYTES = 16
# TRL's fused LM head (trl/kernels/chunked_logprob.py): a tile buffer of up to 4096 tokens x 32768
# vocabulary entries, in the compute dtype.
CHUNK_TOKENS, CHUNK_VOCABULARY = 4096, 32768
CPU_TILE_BYTES = 20  # its torch fallback's float32 temporaries per tile element (measured)

# Bytes autograd keeps per token and decoder layer, as (x hidden, x key/value width,
# x intermediate), measured with saved-tensor hooks on transformers' Llama without an attention
# mask; with one the key/value term counts the hidden size (the heads are repeated). LoRA and
# QLoRA are without their dropout masks, added per adapter input by `_activation_bytes`. Every
# method also keeps 4 bytes per head (the attention's log-sum-exp).
ACTIVATION_BYTES = {  # (method family, 16-bit autocast) -> coefficients
    ("full", False): (32, 8, 16), ("full", True): (30, 4, 8),
    ("lora", False): (40, 8, 16), ("lora", True): (24, 4, 8),
    ("qlora", False): (40, 8, 16), ("qlora", True): (24, 4, 14),
    ("prompt", False): (16, 8, 12), ("prompt", True): (12, 4, 6),
}
# x hidden per token, outside the decoder layers: the embeddings' output, the final norm, the head's
# input.
OUTSIDE_LAYERS_BYTES = 16
NF4_BYTES = 0.516  # bytes a weight in 4-bit NF4 with double quantization (see the docstring)
PROMPT_METHODS = ("prompt_tuning", "p_tuning", "prefix_tuning")

# --- Model shapes ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a decoder-only transformer that memory depends on, from its config.json."""

    source: str
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    tie_word_embeddings: bool
    gated_mlp: bool = True
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    experts: int = 1  # mixture of experts: experts per layer, and how many each token goes through
    experts_per_token: int = 1
    classifier: bool = False  # a reward model: a one-output score head instead of the LM head

    @property
    def kv_width(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def attention_width(self) -> int:
        return self.num_heads * self.head_dim

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(inputs, outputs) of each linear layer of one decoder layer, by PEFT's module names."""
        h, inner = self.hidden_size, self.intermediate_size
        shapes = {"q_proj": (h, self.attention_width), "k_proj": (h, self.kv_width),
                  "v_proj": (h, self.kv_width), "o_proj": (self.attention_width, h),
                  "up_proj": (h, inner), "down_proj": (inner, h)}
        if self.gated_mlp:
            shapes["gate_proj"] = (h, inner)
        return shapes

    @property
    def layer_linear_parameters(self) -> int:
        """Weights of one decoder layer's linear layers (what 4-bit quantization stores)."""
        total = 0
        for name, (inputs, outputs) in self.linear_shapes().items():
            total += inputs * outputs * (self.experts if name.endswith(("up_proj", "down_proj",
                                                                          "gate_proj")) else 1)
        return total

    @property
    def layer_parameters(self) -> int:
        h = self.hidden_size
        biases = ((self.attention_width + 2 * self.kv_width) * self.qkv_bias + h * self.o_bias
                  + self.experts * ((1 + self.gated_mlp) * self.intermediate_size + h)
                  * self.mlp_bias)
        router = h * self.experts if self.experts > 1 else 0
        return self.layer_linear_parameters + biases + router + 2 * h  # two norms

    @property
    def embedding_parameters(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def head_parameters(self) -> int:
        """The output layer's own weights: none when tied to the embeddings; a reward model's
        one-output score head."""
        if self.classifier:
            return self.hidden_size
        return 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size

    @property
    def parameters(self) -> int:
        return (self.embedding_parameters + self.head_parameters
                + self.num_layers * self.layer_parameters + self.hidden_size)

    @property
    def quantized_parameters(self) -> int:
        """Weights bitsandbytes stores in 4 bits: every decoder layer's linear layers."""
        return self.num_layers * self.layer_linear_parameters

    def as_classifier(self) -> ModelShape:
        return replace(self, classifier=True)

    def with_vocabulary(self, added: int) -> ModelShape:
        return replace(self, vocab_size=self.vocab_size + added) if added else self


# Model types whose MLP has two matrices (no gate), and those that tie the output layer to the
# embeddings when the config does not say.
_UNGATED = {"gpt2", "gpt_neox", "gptj", "opt", "falcon", "phi", "bloom", "starcoder2"}
_TIED_BY_DEFAULT = {"gpt2", "gemma", "gemma2", "gemma3_text", "opt", "bloom"}


def shape_from_config(config: dict[str, Any], source: str) -> ModelShape:
    """The shape of the model a Hugging Face config.json describes."""
    config = config.get("text_config") or config

    def first(*names: str, default: Any = None) -> Any:
        return next((config[n] for n in names if config.get(n) is not None), default)

    model_type = str(config.get("model_type", "unknown"))
    hidden = first("hidden_size", "n_embd", "d_model")
    layers = first("num_hidden_layers", "n_layer", "num_layers")
    heads = first("num_attention_heads", "n_head", "num_heads")
    vocab = first("vocab_size")
    if not all(isinstance(v, int) and v > 0 for v in (hidden, layers, heads, vocab)):
        raise StageError(f"{source}: config.json lacks the sizes the memory plan needs "
                        "(vocab_size, hidden_size, num_hidden_layers, num_attention_heads)")
    kv_heads = 1 if config.get("multi_query") else first("num_key_value_heads", default=heads)
    experts = int(first("num_local_experts", "num_experts", default=1) or 1)
    inner = first("moe_intermediate_size") if experts > 1 else None
    return ModelShape(
        source=source, model_type=model_type, vocab_size=int(vocab), hidden_size=int(hidden),
        intermediate_size=int(inner or first("intermediate_size", "n_inner", "ffn_dim",
                                             default=4 * hidden)),
        num_layers=int(layers), num_heads=int(heads), num_kv_heads=int(kv_heads),
        head_dim=int(first("head_dim", default=hidden // heads)),
        tie_word_embeddings=bool(config.get("tie_word_embeddings",
                                            model_type in _TIED_BY_DEFAULT)),
        gated_mlp=model_type not in _UNGATED,
        qkv_bias=bool(config.get("attention_bias", model_type == "qwen2")),
        o_bias=bool(config.get("attention_bias", False)),
        mlp_bias=bool(config.get("mlp_bias", False)),
        experts=experts,
        experts_per_token=int(first("num_experts_per_tok", default=1)) if experts > 1 else 1,
    )


# --- What a stage does on one device --------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """What one training stage does on one device, as far as memory goes."""

    stage: str
    model: ModelShape
    method: str  # none | lora | qlora | prompt_tuning | p_tuning | prefix_tuning
    precision: str  # fp32 | bf16 | fp16 (resolved)
    device: str  # cuda | cpu
    batch: int  # sequences per forward pass per device
    seq_len: int
    gradient_accumulation: int = 1
    checkpointing: bool = False
    logits: str = "materialised"  # materialised | chunked | fused | none
    logits_bytes: int = 12  # bytes per logit element when materialised
    sharding: str = "none"
    world_size: int = 1  # processes training together (GPUs x instances)
    lora_r: int = 8
    lora_dropout: float = 0.05
    lora_targets: str = "all-linear"
    virtual_tokens: int = 20
    encoder: str = "MLP"
    encoder_hidden_size: int | None = None
    prefix_projection: bool = False
    sequences_per_example: int = 1  # 2 for preference pairs: chosen and rejected together
    scored_tokens: int | None = None  # tokens per sequence the loss scores (default: all)
    other_models: tuple[tuple[str, ModelShape], ...] = ()  # frozen models held in float32
    generation_tokens: int = 0  # a rollout's sequence length (PPO, on-policy distillation)
    notes: tuple[str, ...] = ()

    @property
    def autocast(self) -> bool:
        return self.precision in ("bf16", "fp16")

    @property
    def tokens(self) -> int:
        """Tokens through the model per forward pass on this device."""
        extra = self.virtual_tokens if self.method in ("prompt_tuning", "p_tuning") else 0
        return self.batch * self.sequences_per_example * (self.seq_len + extra)


def trainable_parameters(work: Workload) -> int:
    model = work.model
    if work.method == "none":
        return model.parameters
    if work.method in ("lora", "qlora"):
        shapes = model.linear_shapes()
        targets = (list(shapes) if work.lora_targets.strip() == "all-linear" else
                   [t.strip() for t in work.lora_targets.split(",") if t.strip() in shapes])
        per_layer = sum(work.lora_r * sum(shapes[t]) * (model.experts if t in (
            "gate_proj", "up_proj", "down_proj") else 1) for t in targets)
        score = 2 * model.hidden_size if model.classifier else 0  # PEFT trains a copy of it
        return model.num_layers * per_layer + score
    h, n = model.hidden_size, work.virtual_tokens
    e = work.encoder_hidden_size or h
    if work.method == "prompt_tuning":
        return n * h
    if work.method == "p_tuning":
        if work.encoder == "LSTM":  # two bidirectional layers, then a two-layer MLP (PEFT)
            lstm = 2 * 4 * (e * h + e * e + 2 * e) + 2 * 4 * (e * 2 * e + e * e + 2 * e)
            return n * h + lstm + (4 * e * e + 2 * e) + (2 * e * h + h)
        return n * h + (h * e + e) + (e * e + e) + (e * h + h)
    # Prefix tuning: keys and values for every layer; its projection's width is theirs unless set.
    prefixes = model.num_layers * 2 * model.kv_width
    if work.prefix_projection:
        e = work.encoder_hidden_size or model.kv_width
        return n * model.kv_width + (model.kv_width * e + e) + (e * prefixes + prefixes)
    return n * prefixes


# --- The estimate ---------------------------------------------------------------------------------


@dataclass
class MemoryEstimate:
    """Bytes per device; `peak` is what the device must hold at the step's highest moment."""

    parameters: int
    trainable: int
    weights: float
    gradients: float
    optimizer: float
    weight_copies: float
    activations: float  # as the stage runs (checkpointing as set)
    activations_without_checkpointing: float
    activations_with_checkpointing: float
    logits: float  # as the stage computes them
    logits_materialised: float
    logits_chunked: float
    other_models: dict[str, float]
    buffers: float  # DDP's gradient buckets, FSDP's gathered layers
    generation: float  # a rollout's key/value cache
    host_per_instance: float  # the instance's memory while the model loads
    peak: float
    checkpointing: bool
    notes: list[str] = field(default_factory=list)


def estimate(work: Workload) -> MemoryEstimate:
    """The peak memory of one device running `work` (see the module docstring)."""
    model = work.model
    trainable = trainable_parameters(work)
    shards = work.world_size if work.sharding == "fsdp" else 1
    compute_bytes = 2 if work.autocast else 4
    # A QLoRA adapter is kept in bf16 where the base computes in bf16, else float32
    # (steps.common.peft_methods.set_quantized_adapter_dtype).
    trained_bytes = 2 if work.method == "qlora" and work.precision == "bf16" else 4
    if work.method == "qlora":
        frozen = (model.quantized_parameters * NF4_BYTES
                  + (model.parameters - model.quantized_parameters) * 4)
    else:
        frozen = model.parameters * 4 if work.method != "none" else 0
    weights = (frozen + trainable * trained_bytes) / shards
    gradients = trainable * trained_bytes / shards
    optimizer = 2 * trainable * trained_bytes / shards

    # Under autocast each linear layer's weight is cast to 16 bits and the copy kept for the
    # backward pass; 4-bit layers dequantize one layer at a time; FSDP gathers 16-bit layers.
    head = model.vocab_size * model.hidden_size if not model.classifier else 0
    linear = model.num_layers * model.layer_linear_parameters
    if not work.autocast or work.sharding == "fsdp":
        weight_copies = 0.0
    elif work.method == "qlora":  # one matrix dequantized at a time, and the 16-bit head
        weight_copies = 2 * (head + max(i * o for i, o in model.linear_shapes().values()))
    elif work.checkpointing:
        weight_copies = 2 * (head + model.layer_linear_parameters)
    else:
        weight_copies = 2 * (head + linear)

    per_layer, mask = _activation_bytes(work)
    tokens = work.tokens
    outside = tokens * OUTSIDE_LAYERS_BYTES * model.hidden_size
    without = model.num_layers * (tokens * per_layer + mask) + outside
    # Checkpointing keeps each layer's input (the float32 residual stream) and recomputes one
    # layer at a time in the backward pass.
    with_checkpointing = (model.num_layers * tokens * 4 * model.hidden_size
                          + tokens * per_layer + mask + outside)
    activations = with_checkpointing if work.checkpointing else without

    scored = (work.scored_tokens or work.seq_len) * work.batch * work.sequences_per_example
    materialised = scored * model.vocab_size * work.logits_bytes
    # TRL's tile buffer is CHUNK_VOCABULARY wide whatever the vocabulary; its backward pass adds
    # the hidden states' gradient in float32. Without Triton (a CPU) each tile is worked on by
    # torch operations, whose float32 temporaries come to about 20 bytes a tile element.
    tile_tokens = min(scored, CHUNK_TOKENS)
    fused = (tile_tokens * CHUNK_VOCABULARY * compute_bytes + scored * model.hidden_size * 4
               + (0 if work.device == "cuda" else
                  CPU_TILE_BYTES * tile_tokens * min(model.vocab_size, CHUNK_VOCABULARY)))
    trains_head = work.method == "none" and not model.classifier
    if trains_head:  # the fused head accumulates the output layer's gradient in float32
        fused += head * 4
    # steps.common.lm_loss: TRL's fused head on a GPU; elsewhere one chunk's logits at a time, and
    # the scored positions' hidden states copied (and their gradient) in float32.
    chunk_positions = min(scored, max(1, LOSS_CHUNK_ELEMENTS // model.vocab_size))
    chunked = fused if work.device == "cuda" else (
        chunk_positions * model.vocab_size * LOSS_CHUNK_BYTES + scored * model.hidden_size * 8)
    if work.logits == "fused":
        chunked = fused
    logits = {"materialised": materialised, "chunked": chunked, "fused": fused,
              "none": 0.0}[work.logits]

    other = {name: shape.parameters * 4 / shards for name, shape in work.other_models}
    buffers = 0.0
    if work.sharding == "none" and work.world_size > 1:
        buffers = gradients  # DDP's gradient buckets (gradient_as_bucket_view is off)
    elif work.sharding == "fsdp":
        unit = max(model.layer_parameters, model.embedding_parameters)
        gathered_bytes = NF4_BYTES if work.method == "qlora" else compute_bytes
        buffers = 2 * unit * gathered_bytes  # the layer in use and the one prefetched
    generation = 0.0
    if work.generation_tokens:
        cache_bytes = compute_bytes
        generation = (2 * model.num_layers * model.kv_width * cache_bytes
                      * work.batch * work.generation_tokens)

    head_gradient = head * 4 if trains_head else 0
    held = gradients if work.gradient_accumulation > 1 else head_gradient / shards
    resident = weights + optimizer + sum(other.values()) + buffers
    backward_start = weight_copies + activations + logits + held
    # The end of the backward pass and the optimizer step (fused AdamW: in place) hold every
    # gradient; a rollout (PPO, on-policy distillation) its key/value cache and a forward pass.
    backward_end = gradients
    rollout = generation + (tokens * per_layer if generation else 0)
    peak = resident + max(backward_start, backward_end, rollout)
    host = _host_bytes(work)
    return MemoryEstimate(
        parameters=model.parameters + (trainable if work.method != "none" else 0),
        trainable=trainable, weights=weights, gradients=gradients, optimizer=optimizer,
        weight_copies=weight_copies, activations=activations,
        activations_without_checkpointing=without,
        activations_with_checkpointing=with_checkpointing, logits=logits,
        logits_materialised=materialised, logits_chunked=chunked, other_models=other,
        buffers=buffers, generation=generation, host_per_instance=host, peak=peak,
        checkpointing=work.checkpointing, notes=list(work.notes))


def _activation_bytes(work: Workload) -> tuple[float, float]:
    """(bytes per token and decoder layer, bytes of the attention mask per decoder layer)."""
    model = work.model
    family = ("lora" if work.method == "lora" else "qlora" if work.method == "qlora"
              else "prompt" if work.method in PROMPT_METHODS else "full")
    per_h, per_kv, per_inner = ACTIVATION_BYTES[(family, work.autocast)]
    # Batches carry an attention mask (padding, or packed rows kept apart), so grouped-query
    # attention repeats the key/value heads; prefix tuning always attends to its prefixes too.
    kv = model.hidden_size
    inner = model.intermediate_size * model.experts_per_token
    per_token = per_h * model.hidden_size + per_kv * kv + per_inner * inner + 4 * model.num_heads
    if family in ("lora", "qlora") and work.lora_dropout > 0:
        # Dropout's mask on each adapter's input: one byte an element on a GPU (fused dropout),
        # the input's float32 on a CPU.
        mask_bytes = 1 if work.device == "cuda" else 4
        shapes = model.linear_shapes()
        inputs = sum(shapes[t][0] for t in shapes) if work.lora_targets.strip() == "all-linear" \
            else sum(shapes[t.strip()][0] for t in work.lora_targets.split(",")
                     if t.strip() in shapes)
        per_token += mask_bytes * inputs
    queries = work.seq_len + (work.virtual_tokens if work.method in ("prompt_tuning", "p_tuning")
                              else 0)
    keys = queries + (work.virtual_tokens if work.method == "prefix_tuning" else 0)
    mask = work.batch * work.sequences_per_example * queries * keys * (2 if work.autocast else 4)
    return per_token, mask


def _host_bytes(work: Workload) -> float:
    """An instance's memory while its processes load the model. Each loads it in float32 on the
    host before it moves to its GPU, and a full-model reference is copied there; QLoRA quantizes
    straight onto the GPU, a layer at a time. With FSDP one process per instance loads it (the
    CPU-RAM-efficient loading of issue 17, item 2), QLoRA's already quantized."""
    model = work.model
    layer = model.layer_parameters * 4
    if work.method == "qlora":
        one = (model.quantized_parameters * NF4_BYTES + layer if work.sharding == "fsdp"
               else layer)
    else:
        references = sum(1 for name, _ in work.other_models if name.startswith("reference"))
        one = model.parameters * 4 * (1 + references)
    one += sum(s.parameters * 4 for name, s in work.other_models
               if not name.startswith("reference"))
    return one * (1 if work.sharding == "fsdp" else max(work.world_size, 1))


def as_bool(value: Any) -> bool:
    """A boolean setting as a recipe, a pipeline parameter or a hyperparameter writes it."""
    return value if isinstance(value, bool) else str(value).strip().lower() == "true"


def workload(stage: str, settings: dict[str, Any], model: ModelShape, start: ModelShape | None,
             *, precision: str, device: str, world_size: int,
             teacher: ModelShape | None = None) -> Workload:
    """What `stage` does on one device with `settings` (its knobs, resolved): `model` the shape it
    trains, `start` the one it starts from (the reference and reward model of DPO and PPO),
    `precision` and `device` resolved, `world_size` processes training together; `teacher` a
    distillation teacher's shape where the stage has one."""
    method = "none" if stage == "pretrain" else str(settings["peft_method"])
    sharding = str(settings.get("sharding", "none"))
    batch, seq_len = int(settings["per_device_batch_size"]), int(settings["max_seq_length"])
    others: list[tuple[str, ModelShape]] = []
    notes: list[str] = []
    pairs, scored, generation = 1, None, 0
    if stage == "cpt" and int(settings.get("extend_vocabulary", 0)):
        notes.append(f"the vocabulary grows by up to {settings['extend_vocabulary']} tokens")
    if stage in ("reward_model", "dpo"):
        pairs = 2  # chosen and rejected go through the model together
    if stage in ("dpo", "ppo") and method == "none":
        others.append(("reference (frozen copy)", start))
    if stage == "ppo":
        others.append(("reward model", start.as_classifier()))
        scored = int(settings["response_length"]) + 1  # the head runs over the response only
        generation = seq_len
    if stage == "distill" and teacher is not None:
        if as_bool(settings.get("on_policy", False)):
            others.append(("teacher (live)", teacher))
            generation = seq_len
            if float(settings.get("alpha", 0.5)) > 0:
                batch *= 2  # the data's graph and the samples' are both kept for backward
                notes.append("on-policy: the data's and the student's samples' activations")
        else:
            notes.append("the teacher runs once over the data before training, then is freed")
    logits, logits_bytes = LOGITS[stage]
    return Workload(
        stage=stage, model=model, method=method, precision=precision, device=device,
        batch=batch, seq_len=seq_len,
        gradient_accumulation=int(settings["gradient_accumulation_steps"]),
        checkpointing=as_bool(settings["gradient_checkpointing"]),
        logits=logits, logits_bytes=logits_bytes, sharding=sharding,
        world_size=world_size, lora_r=int(settings["lora_r"]),
        lora_dropout=float(settings["lora_dropout"]),
        lora_targets=str(settings["lora_target_modules"]),
        virtual_tokens=int(settings["num_virtual_tokens"]),
        encoder=str(settings["encoder_reparameterization_type"]),
        encoder_hidden_size=(None if settings["encoder_hidden_size"] in (None, "", "none")
                             else int(settings["encoder_hidden_size"])),
        prefix_projection=as_bool(settings["prefix_projection"]),
        sequences_per_example=pairs, scored_tokens=scored, other_models=tuple(others),
        generation_tokens=generation, notes=tuple(notes))

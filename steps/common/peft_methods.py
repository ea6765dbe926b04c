"""Parameter-efficient tuning, shared by the stages that tune a model: one `peft_method` knob.

  none           full fine-tuning: every weight trains, the output is a full model
  lora           low-rank adapters (r x (in + out) weights per targeted linear layer)
  qlora          LoRA over a base loaded in 4-bit NF4 with double quantization (bitsandbytes);
                 the adapters stay in 16 bits
  prompt_tuning  num_virtual_tokens trainable embeddings prepended to every input
  p_tuning       virtual-token embeddings produced by a small MLP or LSTM prompt encoder
  prefix_tuning  trainable key/value prefixes in every attention layer

PEFT does the work; this module maps the knobs to its configs, loads the model each method needs
(4-bit for QLoRA), saves in PEFT's layout, and merges LoRA adapters into their base for serving.

A stage config inherits `PeftKnobs` next to `TrainingKnobs` (both in steps.common.knobs, with the
values each knob takes: ``class SFTStageConfig(PeftKnobs, TrainingKnobs)``) and calls both
``__post_init__``s. A stage then runs ``load_model_for_training`` -> ``apply_peft`` -> a Trainer ->
``save_model``.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from steps.common import models, sharding
from steps.common.contract import StageError
from steps.common.knobs import PeftKnobs, target_modules
from steps.common.training import TRAINING_RECORD_FILES

if TYPE_CHECKING:
    from peft import PeftConfig
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


# --- Loading --------------------------------------------------------------------------------------


def load_model_for_training(source: str, knobs: PeftKnobs, precision: str) -> PreTrainedModel:
    """The model `source` names, loaded as `knobs.peft_method` trains it.

    Full precision (float32; bf16/fp16 is autocast) for every method but qlora, whose base weights
    load in 4-bit NF4 with double quantization and are prepared for k-bit training (frozen, norms
    in float32). `precision` is the resolved one ('fp32', 'bf16', 'fp16'): QLoRA computes in it.
    """
    builtin = source in (models.TINY, models.SMOLLM2)
    folder = None if builtin else models.local_model_folder(source)
    if folder is not None and (folder / "adapter_config.json").exists():
        peft_type = json.loads((folder / "adapter_config.json").read_text()).get("peft_type")
        raise StageError(
            f"model {source} is a PEFT adapter ({peft_type}), not a model to tune further; give "
            "the stage a full model (train the earlier stage with merge_lora=true, or merge a LoRA "
            "adapter with `python -m steps.common.peft_methods merge ADAPTER OUT`)"
        )
    if knobs.peft_method != "qlora":
        return models.load_model(source)

    from peft import prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig

    require_4bit_backend()
    compute_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    sharded = sharding.is_sharded(knobs)
    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,  # quantizes the quantization constants too: ~0.4 bit/weight
        bnb_4bit_compute_dtype=compute_dtype,
        # FSDP shards floating-point tensors only, all of one dtype: the packed 4-bit weights are
        # stored as the compute dtype and the rest of the model loads in it (bitsandbytes'
        # FSDP-QLoRA guide, huggingface.co/docs/bitsandbytes/main/fsdp_qlora). Not run here.
        **({"bnb_4bit_quant_storage": compute_dtype} if sharded else {}),
    )
    model = models.load_model(source, quantization_config=quantization,
                              dtype=compute_dtype if sharded else torch.float32)
    print(f"qlora: base weights in 4-bit NF4 (double quantization), compute in {compute_dtype}, "
          f"{model.get_memory_footprint() / 2**20:.1f} MiB", flush=True)
    if sharded:  # norms and embeddings stay in the compute dtype, as FSDP needs (above)
        return model
    # Checkpointing is the Trainer's business (the gradient_checkpointing knob), not PEFT's default.
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def require_4bit_backend() -> None:
    """Raise one StageError line unless bitsandbytes can quantize to 4 bits on this machine's device.

    QLoRA must not quietly become LoRA in full precision: its memory figures and results would be
    someone else's. The probe quantizes and dequantizes a small matrix on the device training uses.
    """
    device = "cuda" if torch.cuda.is_available() else "cpu"
    alternative = "use peft_method=lora (the same adapters over a full-precision base)"
    try:
        import bitsandbytes
        import bitsandbytes.functional as bnb_functional
    except Exception as err:  # noqa: BLE001 (ImportError, or a broken native library at import)
        raise StageError(
            f"peft_method 'qlora' needs bitsandbytes, which cannot be imported here "
            f"({type(err).__name__}: {_first_line(err)}); install bitsandbytes, or {alternative}"
        ) from None
    try:
        weight = torch.randn(64, 64, device=device)
        packed, state = bnb_functional.quantize_4bit(
            weight, quant_type="nf4", compress_statistics=True
        )
        error = (bnb_functional.dequantize_4bit(packed, state) - weight).abs().max().item()
        if not math.isfinite(error) or error > 1.0:
            raise RuntimeError(f"4-bit round trip is off by {error:.3g}")
    except Exception as err:  # noqa: BLE001 (whatever the missing backend raises)
        raise StageError(
            f"peft_method 'qlora' needs 4-bit kernels for the {device}, which bitsandbytes "
            f"{bitsandbytes.__version__} lacks here ({type(err).__name__}: "
            f"{_first_line(err)}); {alternative}"
        ) from None


# --- The adapters ---------------------------------------------------------------------------------


def peft_config(knobs: PeftKnobs, model: PreTrainedModel) -> PeftConfig | None:
    """PEFT's config for `knobs.peft_method` (None for full fine-tuning).

    A prompt_tuning_init_text is recorded here but applied by `apply_peft`: PEFT's own text
    initialisation loads the tokenizer by name, which fails for builtin specs and archives.
    """
    from peft import (
        LoraConfig,
        PrefixTuningConfig,
        PromptEncoderConfig,
        PromptEncoderReparameterizationType,
        PromptTuningConfig,
        PromptTuningInit,
    )

    method = knobs.peft_method
    if method == "none":
        return None
    if method in ("lora", "qlora"):
        _check_target_modules(knobs, model)
        return LoraConfig(
            r=knobs.lora_r,
            lora_alpha=knobs.lora_alpha,
            lora_dropout=knobs.lora_dropout,
            target_modules=target_modules(knobs.lora_target_modules),
            task_type="CAUSAL_LM",
        )
    if method == "prompt_tuning":
        return PromptTuningConfig(
            task_type="CAUSAL_LM",
            num_virtual_tokens=knobs.num_virtual_tokens,
            prompt_tuning_init=PromptTuningInit.RANDOM,
            prompt_tuning_init_text=knobs.prompt_tuning_init_text,
        )
    if method == "p_tuning":
        return PromptEncoderConfig(
            task_type="CAUSAL_LM",
            num_virtual_tokens=knobs.num_virtual_tokens,
            encoder_reparameterization_type=PromptEncoderReparameterizationType(
                knobs.encoder_reparameterization_type
            ),
            encoder_hidden_size=knobs.encoder_hidden_size,
        )
    return PrefixTuningConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=knobs.num_virtual_tokens,
        prefix_projection=knobs.prefix_projection,
        encoder_hidden_size=knobs.encoder_hidden_size,
    )


def _check_target_modules(knobs: PeftKnobs, model: PreTrainedModel) -> None:
    # PEFT's own error for a misspelt name does not say which names the model has.
    targets = target_modules(knobs.lora_target_modules)
    if isinstance(targets, str):
        return
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [target for target in targets if target not in names]
    if missing:
        linear = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                         if isinstance(module, torch.nn.Linear) and name})
        raise StageError(
            f"lora_target_modules {', '.join(missing)}: no such layer in this model; its linear "
            f"layers are {', '.join(linear)} (or use 'all-linear')"
        )


def apply_peft(
    model: PreTrainedModel,
    knobs: PeftKnobs,
    tokenizer: PreTrainedTokenizerBase,
    *,
    new_token_ids: list[int] | None = None,
) -> PreTrainedModel:
    """`model` ready to train with `knobs.peft_method`: a PeftModel, or `model` itself for none.

    `new_token_ids`: tokens a stage added to the vocabulary (continued pre-training). With lora or
    qlora their rows train too, in the input embeddings and the output head, and are saved with
    the adapter (PEFT's trainable_token_indices; a tied head stays tied); the other rows stay
    frozen. Prompt-learning methods cannot train them: refused.
    """
    config = peft_config(knobs, model)
    if config is None:
        return model
    from peft import get_peft_model

    if new_token_ids:
        if knobs.peft_method not in ("lora", "qlora"):
            raise StageError(
                f"peft_method '{knobs.peft_method}' cannot train the rows of new tokens; use "
                "lora, qlora or none"
            )
        layers = [model.get_input_embeddings(), model.get_output_embeddings()]
        names = [name for name, module in model.named_modules()
                 if any(module is layer for layer in layers)]
        config.trainable_token_indices = {name: list(new_token_ids) for name in names}

    try:
        tuned = get_peft_model(model, config)
    except ValueError as err:  # PEFT names what is wrong, such as a target module it did not find
        raise StageError(
            f"peft_method '{knobs.peft_method}' cannot be applied to this model: "
            f"{_first_line(err)}; check lora_target_modules / num_virtual_tokens"
        ) from None
    if knobs.prompt_tuning_init_text:
        _init_prompt_from_text(tuned, tokenizer, knobs.prompt_tuning_init_text)
    if knobs.peft_method == "qlora":
        set_quantized_adapter_dtype(tuned)
    return tuned


def set_quantized_adapter_dtype(model: PreTrainedModel) -> None:
    """A 4-bit base's trainable weights in bf16 where the base computes in bf16, else float32.

    The QLoRA recipe keeps the adapters in bf16 where the base computes in bf16. Otherwise they
    stay in float32: fp16 adapters would break AMP's gradient scaler, and bf16 ones run emulated
    where bf16 is not native (12x slower than fp32 on the CPU benchmarks/BENCHMARKS.md measured).
    Every stage applies it through apply_peft; SFT again after TRL's SFTTrainer, which casts them
    to bf16 whatever the precision. Models without a 4-bit base are left alone.
    """
    compute = _compute_dtype(model)
    if compute is None:
        return
    dtype = torch.bfloat16 if compute == torch.bfloat16 else torch.float32
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.to(dtype)


def _compute_dtype(model: PreTrainedModel) -> torch.dtype | None:
    """The dtype a 4-bit base computes in (its bitsandbytes config), None for other models."""
    quantization = getattr(model.config, "quantization_config", None)
    dtype = getattr(quantization, "bnb_4bit_compute_dtype", None)
    if isinstance(quantization, dict):
        dtype = quantization.get("bnb_4bit_compute_dtype")
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."), None)
    return dtype


def _init_prompt_from_text(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                           text: str) -> None:
    # What PEFT's PromptTuningInit.TEXT does, with the tokenizer we already hold: the text's token
    # embeddings, repeated or cut to the number of virtual tokens.
    embedding = model.prompt_encoder[model.active_adapter].embedding
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise StageError(f"prompt_tuning_init_text {text!r} has no tokens; give some text")
    total = embedding.num_embeddings
    ids = (ids * math.ceil(total / len(ids)))[:total]
    word_embeddings = model.get_input_embeddings()
    with torch.no_grad():
        vectors = word_embeddings(torch.tensor(ids, device=word_embeddings.weight.device))
        embedding.weight.copy_(vectors.to(embedding.weight.dtype))


# --- Saving and merging ---------------------------------------------------------------------------


def save_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    folder: Path,
    knobs: PeftKnobs,
    *,
    save_embedding_layers: bool = False,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> None:
    """The tuned model in `folder`: PEFT's adapter layout, or a full model for none; the tokenizer
    (with its chat template) beside it, so that the folder loads on its own.

    `save_embedding_layers` saves the embedding matrices with a LoRA adapter, for a stage that
    changed them (new tokens); otherwise PEFT would look the base model up on the Hub to decide.
    `state_dict`: the model's weights gathered whole when it trained sharded
    (steps.common.sharding.gather_trained_model); None: the model's own.
    """
    folder = Path(folder)
    if hasattr(model, "peft_config"):
        model.save_pretrained(folder, save_embedding_layers=save_embedding_layers,
                              state_dict=state_dict)
        if models.bundle_base(folder):
            print(f"copied the adapter's base model into {folder / models.BUNDLED_BASE}, so that "
                  "later steps and endpoints load the adapter from its folder alone", flush=True)
    elif knobs.peft_method != "none":
        raise ValueError(f"peft_method '{knobs.peft_method}' but the model has no adapter")
    else:
        model.save_pretrained(folder, safe_serialization=True, state_dict=state_dict)
    tokenizer.save_pretrained(folder)


def merge_adapter(adapter_dir: Path | str, out_dir: Path | str, *,
                  base_model: str | None = None) -> Path:
    """Merge the LoRA (or QLoRA) adapter in `adapter_dir` into its base and save a full model.

    The base is loaded afresh in full precision (a QLoRA adapter was trained over 4-bit weights,
    but merging into those would bake the quantization error into the served model); the tokenizer
    and its training record (training_summary.json, lineage.json, ...) come along. Prompt-learning adapters have nothing to merge: they
    are served with their base (serving.model; several tenants' at once: serving.tenants).
    """
    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    config_path = adapter_dir / "adapter_config.json"
    if not config_path.exists():
        raise StageError(f"{adapter_dir} is not a PEFT adapter folder (no adapter_config.json)")
    peft_type = json.loads(config_path.read_text()).get("peft_type")
    if peft_type != "LORA":
        raise StageError(
            f"{adapter_dir} holds a {peft_type} adapter, which has no weights to merge into the "
            "base model; serve it with its base (`llm-pipeline deploy` serves adapter packages)"
        )
    model = models.load_model(str(adapter_dir), base_model=base_model)
    merged = model.merge_and_unload()
    out_dir.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out_dir, safe_serialization=True)
    models.load_tokenizer(str(adapter_dir)).save_pretrained(out_dir)
    for name in TRAINING_RECORD_FILES:  # how the model was made travels with it
        if (adapter_dir / name).exists():
            shutil.copy(adapter_dir / name, out_dir / name)
    return out_dir


def _merge_command(argv: list[str]) -> None:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m steps.common.peft_methods merge",
        description="Merge a LoRA/QLoRA adapter folder into its base model and save a full model.",
    )
    parser.add_argument("adapter_dir")
    parser.add_argument("out_dir")
    parser.add_argument("--base-model", default=None,
                        help="base model spec; default: the one adapter_config.json records")
    args = parser.parse_args(argv)
    out = merge_adapter(args.adapter_dir, args.out_dir, base_model=args.base_model)
    print(f"merged {args.adapter_dir} into its base: {out}", flush=True)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] != ["merge"]:
        print("usage: python -m steps.common.peft_methods merge ADAPTER_DIR OUT_DIR "
              "[--base-model SPEC]", file=sys.stderr)
        sys.exit(2)
    try:
        _merge_command(sys.argv[2:])
    except StageError as err:
        print(f"ERROR: {err}", file=sys.stderr)
        sys.exit(2)

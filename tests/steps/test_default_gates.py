"""No default gate is a formality: each recipe's own EvaluationGate, as its definition holds it
with the default EvalThreshold, evaluated by the local engine's expression evaluator on the
evaluation.json that steps.evaluate writes for a deliberately broken model, refuses it; and lets
through a model that is not worse than what it replaces."""

import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from pipelines.local.expressions import Scope, evaluate_condition
from steps import evaluate, sft
from steps.common import models
from steps.common.demo_data import demo_corpus
from steps.common.lm_data import train_tokenizer

from .conftest import counting_records, write_jsonl
from .preference_runs import TRAIN, VALIDATION, run_stage

# What CompareWithApproved writes while the group has no Approved package: nothing to beat, so
# the gate's verdict is the EvalThreshold condition's alone.
NO_APPROVED_PACKAGE = {"beats_approved": 1, "reason": "no Approved package in the group"}


@pytest.fixture(scope="module")
def gate_registers(recipe_definitions):
    """gate_registers(recipe_name, evaluation_json): whether the recipe's gate registers it."""
    return lambda recipe_name, evaluation_json: gate_takes_register_branch(
        recipe_definitions[recipe_name, "local"], evaluation_json)


def gate_takes_register_branch(definition_json: Path, evaluation_json: Path) -> bool:
    """Whether the EvaluationGate of the definition (the session's build of a recipe's, as the
    local engine runs it), on its default parameters, takes the Register branch."""
    definition = json.loads(definition_json.read_text())
    gate = next(step for step in definition["Steps"] if step["Type"] == "Condition")
    evaluation = json.loads(evaluation_json.read_text())
    files = {"Evaluation": evaluation, "ApprovedGate": NO_APPROVED_PACKAGE}
    scope = Scope(parameters={p["Name"]: p["DefaultValue"] for p in definition["Parameters"]},
                  execution={}, read_property_file=lambda step, name: files[name])
    return all(evaluate_condition(condition, scope)
               for condition in gate["Arguments"]["Conditions"])


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("data")
    write_jsonl(folder / "validation.jsonl", counting_records(8))
    # Pairs whose chosen answer is the one the SFT teacher learnt to give.
    write_jsonl(folder / "preferences.jsonl", [
        {"prompt": record["prompt"], "chosen": record["completion"],
         "rejected": record["completion"][::-1].upper()} for record in counting_records(8)])
    return folder


@pytest.fixture(scope="module")
def broken_student(sft_run, tmp_path_factory) -> Path:
    """A student well below its teacher: the teacher with its output logits halved. It ranks
    tokens as the teacher does, but its distributions are so flat that its held-out perplexity is
    about 7x the teacher's, as a student distilled far too little."""
    folder = tmp_path_factory.mktemp("broken-student")
    model = models.load_model(str(sft_run.model_dir)).merge_and_unload()
    with torch.no_grad():
        model.get_output_embeddings().weight /= 2
    model.save_pretrained(folder)
    models.load_tokenizer(str(sft_run.model_dir)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def teacher_copy(sft_run, tmp_path_factory) -> Path:
    """The SFT teacher merged into a full model: a student exactly as good as its teacher."""
    folder = tmp_path_factory.mktemp("teacher-copy")
    models.load_model(str(sft_run.model_dir)).merge_and_unload().save_pretrained(folder)
    models.load_tokenizer(str(sft_run.model_dir)).save_pretrained(folder)
    return folder


def evaluation_of(model: Path, base: Path | str, data: Path, output: Path,
                  **options: str | int) -> Path:
    """steps.evaluate's evaluation.json of `model` against `base` (a folder, a builtin spec, or
    `none`: the model alone, as pretrain evaluates it)."""
    where = ({"base_model": base} if str(base).startswith("builtin:") or base == "none"
             else {"base_dir": str(base)})
    settings = {"max_samples": 2, "max_new_tokens": 4, **options}
    evaluate.main(evaluate.EvaluateConfig(model_dir=str(model), data_dir=str(data),
                                          output_dir=str(output), **where, **settings))
    return output / "evaluation.json"


@pytest.mark.parametrize("recipe_name", ["distill", "full-lifecycle"])
def test_the_default_gate_refuses_a_broken_student_and_registers_one_as_good_as_its_teacher(
    recipe_name, broken_student, teacher_copy, sft_run, data_dir, tmp_path, gate_registers):
    validation = data_dir / "validation.jsonl"
    broken = evaluation_of(broken_student, sft_run.model_dir, validation, tmp_path / "broken")
    fine = evaluation_of(teacher_copy, sft_run.model_dir, validation, tmp_path / "fine")

    # A gate at perplexity_ratio >= 0.01 would have registered it.
    assert 0.01 < json.loads(broken.read_text())["metrics"]["perplexity_ratio"]["value"] < 0.3
    assert json.loads(fine.read_text())["metrics"]["perplexity_ratio"]["value"] == \
        pytest.approx(1.0, abs=1e-3)
    assert not gate_registers(recipe_name, broken)
    assert gate_registers(recipe_name, fine)


@pytest.mark.parametrize("recipe_name", ["sft", "cpt"])
def test_the_default_gate_refuses_a_model_that_fits_the_data_worse_than_its_base(
    recipe_name, broken_student, teacher_copy, sft_run, data_dir, tmp_path, gate_registers):
    validation = data_dir / "validation.jsonl"
    # A model worse than the one it would replace.
    broken = evaluation_of(broken_student, teacher_copy, validation, tmp_path / "broken")
    tuned = evaluation_of(teacher_copy, models.TINY, validation, tmp_path / "tuned")

    assert not gate_registers(recipe_name, broken)
    assert gate_registers(recipe_name, tuned)


@pytest.mark.parametrize("recipe_name", ["dpo", "constitutional"])
def test_the_default_gate_refuses_a_model_that_prefers_the_chosen_answers_less_than_its_base(
    recipe_name, broken_student, teacher_copy, data_dir, tmp_path, gate_registers):
    preferences = data_dir / "preferences.jsonl"
    broken = evaluation_of(broken_student, teacher_copy, preferences, tmp_path / "broken")
    aligned = evaluation_of(teacher_copy, broken_student, preferences, tmp_path / "aligned")

    assert json.loads(broken.read_text())["metrics"]["logprob_margin_delta"]["value"] < 0
    assert not gate_registers(recipe_name, broken)
    assert gate_registers(recipe_name, aligned)


def test_the_pretrain_gate_refuses_a_model_that_learnt_nothing(teacher_copy, data_dir, tmp_path,
                                                                gate_registers):
    # What pretrain would register had its training done nothing: its own tokenizer of the
    # recipe's VocabSize over the demo corpus, and a model of random weights.
    corpus = [document["text"] for document in demo_corpus(max_documents=240)]
    tokenizer = train_tokenizer(corpus[:200], vocab_size=4096, model_max_length=128)
    untrained = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    untrained.save_pretrained(tmp_path / "untrained")
    tokenizer.save_pretrained(tmp_path / "untrained")
    held_out = write_jsonl(tmp_path / "held-out.jsonl", [{"text": text} for text in corpus[200:]])

    broken = evaluation_of(tmp_path / "untrained", "none", held_out, tmp_path / "broken")
    # A model that fits its held-out data: the SFT teacher on its own task's validation split.
    trained = evaluation_of(teacher_copy, "none", data_dir / "validation.jsonl",
                            tmp_path / "trained")

    assert json.loads(broken.read_text())["metrics"]["perplexity"]["value"] > 1000
    assert not gate_registers("pretrain", broken)
    assert gate_registers("pretrain", trained)


def policy_answering(answers: str, root: Path) -> Path:
    """A tiny policy trained (all its weights) to answer the demo prompts with the pairs'
    `answers`: chosen or rejected. In fp32 on every CPU: the policies are the gate's inputs, not
    what is tested, and bf16 autocast took 2.3x the CPU seconds on builtin:tiny."""
    records = [{"prompt": pair["prompt"], "completion": pair[answers]} for pair in TRAIN]
    run = run_stage(sft.main, sft.SFTStageConfig, root / "opt-ml", {"train": records},
                    base_model="builtin:tiny", peft_method="none", max_steps=60,
                    learning_rate=3e-3, checkpoint_steps=0, precision="fp32")
    return run.model_dir


def test_the_rlhf_ppo_gate_refuses_a_policy_whose_answers_the_reward_model_likes_less_than_its_base(
    preference_judge, tmp_path, gate_registers):
    # A policy that learnt the answers the reward model rejects, as PPO against a wrong reward
    # would; and one that learnt the answers it prefers.
    rejected = policy_answering("rejected", tmp_path / "rejected")
    chosen = policy_answering("chosen", tmp_path / "chosen")
    held_out = write_jsonl(tmp_path / "pairs" / "validation.jsonl", VALIDATION)
    judged = {"reward_model_dir": str(preference_judge.model_dir), "max_samples": 16, "max_new_tokens": 16}

    broken = evaluation_of(rejected, chosen, held_out, tmp_path / "broken", **judged)
    aligned = evaluation_of(chosen, rejected, held_out, tmp_path / "aligned", **judged)

    assert json.loads(broken.read_text())["metrics"]["win_rate"]["value"] < 0.5
    assert not gate_registers("rlhf-ppo", broken)
    assert gate_registers("rlhf-ppo", aligned)

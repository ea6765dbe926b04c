"""The reward model stage on the tiny model and the demo preference task (capital letters win):
it learns to rank held-out pairs, saves a sequence classifier that reloads and scores, and
refuses data that is not preference pairs."""

from __future__ import annotations

import json
import re

import pytest
import torch

from steps import reward_model
from steps.common import models
from steps.common.contract import StageError
from steps.common.demo_data import demo_preferences, follows_demo_preference
from steps.common.preference import load_reward_model, reward_accuracy, reward_scores, win_rate

from .conftest import counting_records
from .preference_runs import (
    TRAIN,
    VALIDATION,
    AlignmentRun,
    lora_adapter,
    pairs,
    run_failing_stage,
    run_stage,
)

METHODS = ("none", "lora")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, preference_judge) -> dict[str, AlignmentRun]:
    """A 30-step reward model per method (a few seconds each): all the weights, the session's
    that the PPO and preference evaluation tests use too (tests/steps/conftest.py), and LoRA."""
    lora = run_stage(
        reward_model.main, reward_model.RewardModelStageConfig,
        tmp_path_factory.mktemp("rm-lora") / "opt-ml", {"train": TRAIN, "validation": VALIDATION},
        base_model="builtin:tiny", peft_method="lora", max_steps=30, logging_steps=10,
        checkpoint_steps=0, learning_rate=3e-3, lora_r=4, lora_alpha=8, lora_dropout=0.0,
    )
    return {"none": preference_judge, "lora": lora}


@pytest.mark.parametrize("method", METHODS)
def test_the_reward_model_ranks_held_out_pairs_well_above_chance(runs, method):
    run = runs[method]
    accuracy = [float(v) for v in re.findall(r"[ ]pairwise_accuracy=([0-9.eE+-]+)", run.stdout)]

    assert len(accuracy) == 1 and accuracy[0] >= 0.8
    summary = run.summary
    assert summary["stage"] == "reward_model" and summary["peft_method"] == method
    assert summary["pairwise_accuracy"] == pytest.approx(accuracy[0], abs=1e-4)
    assert summary["pairwise_accuracy_on"] == "validation" and summary["reward_margin"] > 0
    losses = [m["train_loss"] for m in run.metrics if "train_loss" in m]
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("method", METHODS)
def test_the_output_is_a_full_sequence_classifier_that_reloads_and_scores(runs, method):
    folder = runs[method].model_dir
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"]
    assert not (folder / "adapter_config.json").exists()  # LoRA is merged: a model to load as is

    model = load_reward_model(str(folder))
    tokenizer = models.load_tokenizer(str(folder))
    accuracy, _ = reward_accuracy(model, tokenizer, pairs(VALIDATION))
    prompt = [{"role": "user", "content": "Name the capital city of Norway."}]
    upper, lower = reward_scores(model, tokenizer, [prompt, prompt],
                                 ["THE CAPITAL OF NORWAY IS OSLO.", "The capital of Norway is Oslo."])

    assert accuracy == pytest.approx(runs[method].summary["pairwise_accuracy"])
    assert upper > lower


def test_training_lines_log_the_batch_accuracy_and_margin(runs):
    stdout = runs["lora"].stdout

    assert len(re.findall(r"[ ]reward_accuracy=", stdout)) == 4  # step 1, 10, 20, 30
    assert len(re.findall(r"[ ]reward_margin=", stdout)) == 4
    assert len(re.findall(r"[ ]eval_reward_accuracy=", stdout)) == 1


def test_a_lora_adapter_in_the_model_channel_is_merged_into_the_starting_model(tmp_path):
    adapter = lora_adapter(tmp_path / "sft-adapter")
    run = run_stage(
        reward_model.main, reward_model.RewardModelStageConfig, tmp_path / "opt-ml",
        {"train": TRAIN[:16], "model": adapter},
        base_model="builtin:tiny", peft_method="none", max_steps=2, checkpoint_steps=0,
    )

    assert "is a LoRA adapter: merged into its base" in run.stdout
    assert run.summary["base_model"] == str(adapter)
    assert run.summary["pairwise_accuracy_on"] == "train"
    # The backbone is the merged one: its weights differ from the bare base's.
    scored = load_reward_model(str(run.model_dir))
    base = models.load_model(models.TINY)
    assert not torch.equal(scored.model.layers[0].self_attn.q_proj.weight,
                           base.model.layers[0].self_attn.q_proj.weight)


@pytest.mark.parametrize("records, message", [
    (counting_records(8),
     "the 'train' data is prompt_completion records, but this stage trains on preference pairs"),
    ([{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "p", "chosen": "a"}],
     "field 'rejected': missing"),
])
def test_data_that_is_not_preference_pairs_fails_in_one_line_and_writes_nothing(
    tmp_path, capsys, records, message
):
    status, last_line, job = run_failing_stage(
        reward_model.main, reward_model.RewardModelStageConfig, tmp_path / "opt-ml",
        {"train": records}, capsys, base_model="builtin:tiny",
    )

    assert status == 2 and last_line.startswith("ERROR: ") and message in last_line
    assert job.failure_file.read_text() == last_line
    assert not job.model_dir.exists()


@pytest.mark.parametrize("knobs, message", [
    ({"peft_method": "prompt_tuning"}, "peft_method 'prompt_tuning' is not one of none, lora"),
    ({"packing": True}, "packing does not apply"),
    ({"center_rewards_coefficient": -1.0}, "center_rewards_coefficient must be >= 0"),
])
def test_bad_settings_are_refused_by_name(knobs, message):
    with pytest.raises(StageError, match=message):
        reward_model.RewardModelStageConfig(**knobs)


def test_a_causal_lm_is_refused_as_a_reward_model(tmp_path):
    models.load_model(models.TINY).save_pretrained(tmp_path / "lm")

    with pytest.raises(StageError, match="not a reward model"):
        load_reward_model(str(tmp_path / "lm"))


def test_the_win_rate_counts_how_often_the_reward_model_prefers_one_set_of_answers(runs):
    folder = runs["none"].model_dir
    model, tokenizer = load_reward_model(str(folder)), models.load_tokenizer(str(folder))
    held_out = pairs(VALIDATION)
    prompts = [pair.prompt for pair in held_out]
    chosen = [pair.chosen[0]["content"] for pair in held_out]
    rejected = [pair.rejected[0]["content"] for pair in held_out]

    assert win_rate(model, tokenizer, prompts, chosen, rejected) >= 0.8
    assert win_rate(model, tokenizer, prompts, rejected, chosen) <= 0.2
    assert win_rate(model, tokenizer, prompts, chosen, chosen) == 0.5


def test_the_demo_preferences_have_one_known_right_answer():
    records = demo_preferences(120, seed=3)

    assert records == demo_preferences(120, seed=3) != demo_preferences(120, seed=4)
    assert len({r["prompt"] for r in records}) == 120
    assert all(follows_demo_preference(r["chosen"]) for r in records)
    assert not any(follows_demo_preference(r["rejected"]) for r in records)
    assert all(r["chosen"] == r["rejected"].upper() for r in records)  # capitals: the only change

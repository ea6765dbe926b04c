"""The DPO stage on the tiny model and the demo preference task (capital letters win): it raises
the held-out log-probability margin of chosen over rejected, against the starting model as its
reference, with LoRA and with full fine-tuning, and saves a model that reloads and generates."""

from __future__ import annotations

import json
import re

import pytest

from steps import dpo
from steps.common import models
from steps.common.contract import StageError
from steps.common.preference import (
    logprob_margins,
    preference_accuracy,
    sequence_kl,
)

from .conftest import counting_records
from .preference_runs import (
    TRAIN,
    VALIDATION,
    AlignmentRun,
    generates,
    lora_adapter,
    pairs,
    run_failing_stage,
    run_stage,
)

BETA = 0.1
METHODS = ("none", "lora")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, dpo_lora_run) -> dict[str, AlignmentRun]:
    """A 24-step DPO run per method (a few seconds each): all the weights, and LoRA (r 4), the
    session's run that the preference evaluation tests evaluate too (tests/steps/conftest.py)."""
    full = run_stage(
        dpo.main, dpo.DPOStageConfig, tmp_path_factory.mktemp("dpo-none") / "opt-ml",
        {"train": TRAIN, "validation": VALIDATION},
        base_model="builtin:tiny", peft_method="none", beta=BETA, max_steps=24,
        logging_steps=8, checkpoint_steps=0, learning_rate=1e-3,
    )
    return {"none": full, "lora": dpo_lora_run}


@pytest.mark.parametrize("method", METHODS)
def test_dpo_raises_the_held_out_margin_of_chosen_over_rejected(runs, method):
    held_out = pairs(VALIDATION)
    tokenizer = models.load_tokenizer(models.TINY)
    base = models.load_model(models.TINY).eval()
    tuned = models.load_model(str(runs[method].model_dir)).eval()

    before = logprob_margins(base, tokenizer, held_out)
    after = logprob_margins(tuned, tokenizer, held_out)

    mean_before, mean_after = sum(before) / len(before), sum(after) / len(after)
    assert mean_after > mean_before + 5.0, (mean_before, mean_after)
    assert preference_accuracy(tuned, tokenizer, held_out) >= 0.9
    recorded = runs[method].summary["held_out"]
    assert recorded["before"]["logprob_margin"] == pytest.approx(mean_before, abs=1e-3)
    assert recorded["after"]["logprob_margin"] == pytest.approx(mean_after, abs=1e-3)


@pytest.mark.parametrize("method", METHODS)
def test_the_reference_is_the_starting_model(runs, method):
    # DPO's implicit reward margin is beta x (policy margin - reference margin). The trainer's own
    # figure on the held-out pairs matches beta x (after - before) only if the reference it used
    # is the model before training: with LoRA the adapter switched off, in full fine-tuning the
    # frozen copy (not the policy, and not weights reloaded from disk).
    held_out = runs[method].summary["held_out"]
    trainer_margin = [m for m in runs[method].metrics if "eval_reward_margin" in m][-1]

    expected = BETA * (held_out["after"]["logprob_margin"] - held_out["before"]["logprob_margin"])
    assert trainer_margin["eval_reward_margin"] == pytest.approx(expected, rel=1e-3, abs=1e-3)
    assert "copy" in runs[method].summary["reference_model"] or method == "lora"


@pytest.mark.parametrize("method", METHODS)
def test_each_training_line_logs_dpos_rewards(runs, method):
    stdout = runs[method].stdout
    for name in ("train_loss", "reward_chosen", "reward_rejected", "reward_margin",
                 "reward_accuracy"):
        assert len(re.findall(rf"[ ]{name}=([0-9.eE+-]+)", stdout)) == 4, name  # 1, 8, 16, 24
    margins = [float(v) for v in re.findall(r"[ ]reward_margin=([0-9.eE+-]+)", stdout)]
    assert margins[-1] > margins[0]


@pytest.mark.parametrize("method", METHODS)
def test_the_output_reloads_and_generates(runs, method):
    folder = runs[method].model_dir
    summary = runs[method].summary

    assert summary["stage"] == "dpo" and summary["peft_method"] == method
    assert summary["hyperparameters"]["beta"] == BETA
    if method == "lora":
        adapter = json.loads((folder / "adapter_config.json").read_text())
        assert adapter["base_model_name_or_path"] == models.BUNDLED_BASE  # carried with it
    else:
        assert (folder / "model.safetensors").exists()
    assert generates(folder)


def test_dpo_continues_an_sft_lora_adapter_against_a_frozen_copy_of_it(tmp_path):
    adapter = lora_adapter(tmp_path / "sft-adapter")
    tokenizer = models.load_tokenizer(models.TINY)
    start = models.load_model(str(adapter)).eval()
    before = logprob_margins(start, tokenizer, pairs(VALIDATION))

    run = run_stage(
        dpo.main, dpo.DPOStageConfig, tmp_path / "opt-ml",
        {"train": TRAIN, "validation": VALIDATION, "model": adapter},
        base_model="builtin:tiny", peft_method="lora", beta=BETA, max_steps=12,
        learning_rate=1e-2, checkpoint_steps=0,
    )

    assert "training continues it" in run.stdout
    assert run.summary["reference_model"].startswith("a frozen copy of the starting LoRA adapter")
    assert not (run.model_dir / "ref").exists()  # TRL's reference adapter is not saved
    config = json.loads((run.model_dir / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == models.BUNDLED_BASE and config["r"] == 4
    tuned = models.load_model(str(run.model_dir)).eval()
    after = logprob_margins(tuned, tokenizer, pairs(VALIDATION))
    assert sum(after) / len(after) > sum(before) / len(before) + 2.0
    assert run.summary["held_out"]["before"]["logprob_margin"] == pytest.approx(
        sum(before) / len(before), abs=1e-3)


def test_another_loss_type_trains_too(tmp_path):
    run = run_stage(
        dpo.main, dpo.DPOStageConfig, tmp_path / "opt-ml", {"train": TRAIN[:16]},
        base_model="builtin:tiny", peft_method="lora", loss_type="ipo", max_steps=4,
        learning_rate=1e-2, checkpoint_steps=0,
    )

    assert run.summary["hyperparameters"]["loss_type"] == "ipo"
    assert run.summary["held_out"]["on"] == "train"


def test_data_that_is_not_preference_pairs_fails_in_one_line_and_writes_nothing(tmp_path, capsys):
    status, last_line, job = run_failing_stage(
        dpo.main, dpo.DPOStageConfig, tmp_path / "opt-ml",
        {"train": TRAIN[:8], "validation": counting_records(4)}, capsys, base_model="builtin:tiny",
    )

    assert status == 2
    assert last_line.startswith("ERROR: ") and "validation.jsonl:1: the 'validation' data is " \
        "prompt_completion records, but this stage trains on preference pairs" in last_line
    assert not job.model_dir.exists()


@pytest.mark.parametrize("knobs, message", [
    ({"loss_type": "kto"}, "loss_type 'kto' is not one of sigmoid"),
    ({"beta": 0.0}, "beta must be > 0"),
    ({"peft_method": "qlora"}, "peft_method 'qlora' is not one of none, lora"),
])
def test_bad_settings_are_refused_by_name(knobs, message):
    with pytest.raises(StageError, match=message):
        dpo.DPOStageConfig(**knobs)


def test_a_lora_policy_moves_away_from_its_base_towards_the_chosen_responses(runs):
    tuned = models.load_model(str(runs["lora"].model_dir)).eval()
    tokenizer = models.load_tokenizer(models.TINY)
    held_out = pairs(VALIDATION)
    prompts = [pair.prompt for pair in held_out]

    towards_chosen = sequence_kl(tuned, tokenizer, prompts, [p.chosen for p in held_out])
    towards_rejected = sequence_kl(tuned, tokenizer, prompts, [p.rejected for p in held_out])

    # log pi - log ref, the reference being the same weights with the adapter off.
    assert sum(towards_chosen) / len(held_out) > 0 > sum(towards_rejected) / len(held_out)

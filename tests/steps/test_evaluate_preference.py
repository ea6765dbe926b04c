"""The evaluation stage on preference pairs (the demo task: capital letters win): how much the tuned
model prefers the chosen responses, how far it moved from its base, and how a reward model judges
its answers against the base model's."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from steps import evaluate
from steps.common import contract, models

from .conftest import write_jsonl
from .preference_runs import TRAIN, VALIDATION

PREFERENCE_METRICS = {"preference_accuracy", "logprob_margin"}
REWARD_METRICS = {"reward_mean"}
COMPARISONS = {"logprob_margin_delta", "kl_to_base", "reward_margin", "win_rate"}


def run_evaluation(model_dir: Path, data_dir: Path, output_dir: Path, **options) -> dict:
    evaluate.main(evaluate.EvaluateConfig(
        model_dir=str(model_dir), data_dir=str(data_dir), output_dir=str(output_dir),
        max_new_tokens=8, max_samples=6, batch_size=8, **options,
    ))
    return json.loads((output_dir / "evaluation.json").read_text())


def values(evaluation: dict) -> dict[str, float]:
    return {name: metric["value"] for name, metric in evaluation["metrics"].items()}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data preparation output of preference pairs: 24 held-out pairs and a manifest beside."""
    folder = tmp_path_factory.mktemp("pairs")
    write_jsonl(folder / "train.jsonl", TRAIN)
    write_jsonl(folder / "validation.jsonl", VALIDATION)
    (folder / "manifest.json").write_text(json.dumps({"format": "preference"}))
    return folder


@pytest.fixture(scope="module")
def reward_model_dir(preference_judge) -> Path:
    """The session's 30-step tiny reward model that ranks the demo pairs (tests/steps/conftest.py),
    the one the PPO tests train against."""
    return preference_judge.model_dir


@pytest.fixture(scope="module")
def dpo_adapter(dpo_lora_run) -> Path:
    """The session's LoRA adapter over builtin:tiny after 24 DPO steps towards the chosen
    responses (tests/steps/conftest.py), test_dpo's LoRA run."""
    return dpo_lora_run.model_dir


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """builtin:tiny saved as an ordinary model folder."""
    folder = tmp_path_factory.mktemp("tiny") / "model"
    models.load_model(models.TINY).save_pretrained(folder)
    models.load_tokenizer(models.TINY).save_pretrained(folder)
    return folder


def test_a_model_judged_against_itself_gains_nothing_and_wins_half(
    tiny_folder, data_dir, reward_model_dir, tmp_path
):
    evaluation = run_evaluation(tiny_folder, data_dir, tmp_path / "out", base_model=models.TINY,
                                reward_model_dir=str(reward_model_dir))
    m = values(evaluation)

    expected = PREFERENCE_METRICS | REWARD_METRICS | {"reward_model_accuracy"}
    assert expected | {f"base_{name}" for name in expected - {"reward_model_accuracy"}} \
        | COMPARISONS <= set(m)
    for name in ("logprob_margin_delta", "kl_to_base", "reward_margin"):
        assert m[name] == pytest.approx(0.0, abs=1e-5), name
        assert evaluation["metrics"][name]["standard_deviation"] == pytest.approx(0.0, abs=1e-5)
    assert m["win_rate"] == 0.5  # every answer the same as the base's: a tie, counted half
    for name in ("preference_accuracy", "logprob_margin", "reward_mean"):
        assert m[name] == pytest.approx(m[f"base_{name}"], abs=1e-5), name
    assert evaluation["num_preference_pairs"] == len(VALIDATION)
    assert evaluation["reward_model"] == str(reward_model_dir)
    for metric in evaluation["metrics"].values():
        assert set(metric) == {"value", "standard_deviation"}
        assert all(isinstance(v, float) and math.isfinite(v) for v in metric.values())


def test_a_policy_trained_towards_chosen_widens_the_margin_and_the_reward_model_is_trusted(
    dpo_adapter, data_dir, reward_model_dir, tmp_path
):
    # The base is the adapter switched off (builtin:tiny, named in training_summary.json).
    evaluation = run_evaluation(dpo_adapter, data_dir, tmp_path / "out",
                                reward_model_dir=str(reward_model_dir))
    m = values(evaluation)

    assert m["logprob_margin_delta"] > 0
    assert m["logprob_margin_delta"] == pytest.approx(m["logprob_margin"] - m["base_logprob_margin"])
    assert m["preference_accuracy"] >= m["base_preference_accuracy"]
    assert m["kl_to_base"] > 0  # its own answers are likelier under it than under its base
    assert m["reward_model_accuracy"] >= 0.8  # the judge ranks the held-out pairs
    assert m["reward_margin"] == pytest.approx(m["reward_mean"] - m["base_reward_mean"])
    assert 0.0 <= m["win_rate"] <= 1.0
    assert (tmp_path / "out" / "metrics_comparison.png").read_bytes().startswith(b"\x89PNG")


def test_alone_the_preferred_response_is_the_reference_and_only_tuned_metrics_are_reported(
    tiny_folder, data_dir, reward_model_dir, tmp_path
):
    evaluation = run_evaluation(tiny_folder, data_dir, tmp_path / "pairs", base_model="none",
                                reward_model_dir=str(reward_model_dir))
    # The same prompts with the chosen responses, as prompt-completion records.
    chosen = [{"prompt": r["prompt"], "completion": r["chosen"]} for r in VALIDATION]
    as_completions = run_evaluation(tiny_folder, write_jsonl(tmp_path / "chosen.jsonl", chosen),
                                    tmp_path / "chosen", base_model="none")

    assert set(evaluation["metrics"]) == {
        "eval_loss", "perplexity", "bits_per_byte", "rouge_l", "exact_match", "eos_rate",
        "preference_accuracy", "logprob_margin", "reward_mean", "reward_model_accuracy",
    }
    for name, metric in as_completions["metrics"].items():
        assert evaluation["metrics"][name] == pytest.approx(metric, rel=1e-6), name
    assert [s["reference"] for s in evaluation["samples"]] == [r["chosen"] for r in VALIDATION[:5]]


@pytest.mark.parametrize("which", ["causal_lm", "missing"])
def test_a_wrong_reward_model_fails_in_one_line_and_writes_nothing(
    which, tiny_folder, data_dir, tmp_path, monkeypatch, capsys
):
    reward_dir = tiny_folder if which == "causal_lm" else tmp_path / "no-such-folder"
    monkeypatch.setattr("sys.argv", [
        "steps.evaluate", "--model-dir", str(tiny_folder), "--data-dir", str(data_dir),
        "--output-dir", str(tmp_path / "out"), "--base-model", "none",
        "--reward-model-dir", str(reward_dir),
    ])

    with pytest.raises(SystemExit) as exited:
        contract.run(evaluate.main, evaluate.EvaluateConfig, job="processing")

    assert exited.value.code == 2
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    expected = {"causal_lm": "holds a LlamaForCausalLM, not a reward model",
                "missing": "--reward-model-dir " + str(reward_dir) + " does not exist"}[which]
    assert last_line.startswith("ERROR: ") and expected in last_line
    assert not (tmp_path / "out").exists()

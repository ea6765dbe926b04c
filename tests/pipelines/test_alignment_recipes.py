"""End to end: the alignment recipes (dpo, rlhf-ppo, constitutional) through the local engine on
tiny models, on the built-in demo data (SFT records, preference pairs preferring capitals, and
red-team / helpful prompts)."""

import hashlib
import json
from collections import Counter

import pytest

from tests.pipelines.conftest import clean_env, cli, derived_recipe

pytestmark = pytest.mark.e2e

TINY = ("-p", "BaseModel=builtin:tiny")


@pytest.fixture(scope="module")
def env(local_home):
    return clean_env(local_home)


def run(env, recipe: str, *parameters: str):
    result = cli(env, "run", "--recipe", recipe, *TINY, *parameters)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def latest_execution(home, pipeline):
    folders = sorted((home / "executions" / pipeline).iterdir(), key=lambda p: p.stat().st_mtime)
    return folders[-1], json.loads((folders[-1] / "execution.json").read_text())


def evaluation_of(folder) -> dict[str, float]:
    evaluation = json.loads(next(folder.glob("Evaluate/**/evaluation.json")).read_text())
    return {name: metric["value"] for name, metric in evaluation["metrics"].items()}


def only_package(env, group: str) -> dict:
    packages = json.loads(cli(env, "registry", "list", "--group", group, "--json").stdout)
    assert len(packages) == 1, packages
    return packages[0]


def test_dpo_recipe_widens_the_held_out_preference_margin_and_registers(
        env, local_home, tmp_path):
    # What is asserted is what DPO adds over the base model: DPO trains as the parameters below
    # say, the SFT it starts from 4 steps, and the held-out answers that measure the policy's
    # distance from its base are 8 tokens long.
    recipe = derived_recipe(tmp_path, "dpo", sft={"max_steps": 4},
                            evaluate={"max_new_tokens": 8})
    result = run(env, str(recipe), "-p", "LearningRate=0.01", "-p", "DPOSteps=24",
                 "-p", "EvalThreshold=0.0", "-p", "ModelPackageGroup=e2e-dpo")

    folder, execution = latest_execution(local_home, "llm-dpo")
    assert [s for s in execution["steps"] if execution["steps"][s]["status"] == "Succeeded"] == [
        "DataPrep", "DataPrepPreference", "SFT", "DPO", "Evaluate", "CompareWithApproved",
        "EvaluationGate", "Register"]
    metrics = evaluation_of(folder)
    # Judged on held-out pairs: the aligned policy prefers the chosen answers more than its base.
    assert metrics["logprob_margin_delta"] > 0
    # The summary shows the number that decided registration.
    assert "  logprob_margin_delta" in result.stdout
    assert "(registration gate: logprob_margin_delta)" in result.stdout
    assert metrics["preference_accuracy"] >= metrics["base_preference_accuracy"]
    assert metrics["kl_to_base"] > 0  # it moved away from its base (0 only for the same model)
    package = only_package(env, "e2e-dpo")
    assert package["metadata"]["training_stages"] == "sft+dpo"
    assert package["metadata"]["gate_metric"] == "logprob_margin_delta"
    assert package["metadata"]["param_Beta"] == "0.1"
    assert len(package["metadata"]["data_manifest_sha256_preference"]) == 64


def test_rlhf_ppo_recipe_trains_a_reward_model_then_ppo_and_passes_a_win_rate_gate(
        env, local_home, tmp_path):
    # The recipe's own gate (EvalThreshold=0.5): registered only when the reward model prefers the
    # tuned policy's answers to the base model's more often than not. The reward model and PPO
    # train as the parameters below say and the evaluation is the recipe's; the SFT both start
    # from runs 4 steps (what is asserted is what they add over the base model).
    recipe = derived_recipe(tmp_path, "rlhf-ppo", sft={"max_steps": 4})
    run(env, str(recipe), "-p", "RewardLearningRate=0.003", "-p", "RewardModelSteps=24",
        "-p", "PPOLearningRate=0.03", "-p", "PPOSteps=12", "-p", "ResponseLength=8",
        "-p", "Temperature=1.0", "-p", "EvalThreshold=0.5", "-p", "ModelPackageGroup=e2e-rlhf")

    folder, execution = latest_execution(local_home, "llm-rlhf-ppo")
    assert execution["steps"]["Register"]["status"] == "Succeeded"
    # PPO's policy started from SFT's model and was scored by the reward model.
    ppo_log = next(folder.glob("PPO/**/log.txt")).read_text()
    assert "mean_reward=" in ppo_log
    metrics = evaluation_of(folder)
    assert metrics["reward_model_accuracy"] > 0.5  # the judge itself learnt the preference
    assert metrics["win_rate"] > 0.5
    assert metrics["reward_mean"] > metrics["base_reward_mean"]
    assert metrics["kl_to_base"] > 0
    package = only_package(env, "e2e-rlhf")
    assert package["metadata"]["training_stages"] == "sft+reward_model+ppo"
    assert package["metadata"]["gate_metric"] == "win_rate"
    assert float(package["metadata"]["eval_win_rate"]) == pytest.approx(metrics["win_rate"])


def jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_constitutional_recipe_writes_both_datasets_then_sft_and_dpo_train_on_them(
        env, local_home, tmp_path):
    # What is checked is the data the stage writes and that both trainings take it: the recipe's
    # SFT on a few steps, evaluated on a few short answers.
    recipe = derived_recipe(tmp_path, "constitutional", sft={"max_steps": 4},
                            evaluate={"max_samples": 4, "max_new_tokens": 8})
    run(env, str(recipe), "-p", "MaxNewTokens=8", "-p", "LearningRate=0.01",
        "-p", "DPOSteps=4", "-p", "EvalThreshold=-1000", "-p", "ModelPackageGroup=e2e-cai")

    folder, execution = latest_execution(local_home, "llm-constitutional")
    assert execution["steps"]["Register"]["status"] == "Succeeded"
    output = next(folder.glob("Constitutional/**/processing/output"))
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["critic"]
    records = {f"{dataset}/{split}": jsonl(output / dataset / f"{split}.jsonl")
               for dataset in ("sft", "preferences") for split in ("train", "validation")}
    # Every file is the one the manifest names, with as many records as it counts: one SFT example
    # and one pair per prompt kept, each prompt kept or dropped for a counted reason.
    for name in records:
        assert manifest["outputs"][f"{name}.jsonl"] == hashlib.sha256(
            (output / f"{name}.jsonl").read_bytes()).hexdigest()
    counts = manifest["counts"]
    for dataset in ("sft", "preferences"):
        for split in ("train", "validation"):
            assert len(records[f"{dataset}/{split}"]) == manifest["datasets"][dataset][split] > 0
        assert sum(manifest["datasets"][dataset][s] for s in ("train", "validation")) == \
            counts["kept"]
    assert counts["kept"] + sum(counts["dropped"].values()) == counts["prompts"]
    pairs = records["preferences/train"] + records["preferences/validation"]
    assert dict(Counter(pair["principle"] for pair in pairs)) == counts["principles"]
    judge = manifest["judge"]
    assert judge["revision_preferred"] + judge["initial_preferred"] + judge["unparsed"] == \
        counts["kept"]
    assert sum(pair["judge_fallback"] for pair in pairs) == judge["unparsed"]
    assert {"prompt", "chosen", "rejected", "principle", "judge_rationale"} <= set(pairs[0])
    assert {"prompt", "completion"} <= set(records["sft/train"][0])
    # SFT trained on the revisions and DPO on the AI preferences (the definition tests check the
    # wiring), and the result was judged on the held-out AI-labelled pairs.
    assert execution["steps"]["SFT"]["status"] == execution["steps"]["DPO"]["status"] == "Succeeded"
    assert "logprob_margin_delta" in evaluation_of(folder)

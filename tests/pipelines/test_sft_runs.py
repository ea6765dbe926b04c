"""End to end: the sft recipe through `llm-pipeline run` with every PEFT method on the tiny model,
and once on the recipe's default model, SmolLM2-135M-Instruct: a few training steps each (the
stage tests measure what training achieves; these show that each method's model goes through the
whole pipeline: trained, archived, evaluated against its base, gated and registered)."""

import json
from pathlib import Path

import pytest

from steps.common.archives import open_archive
from tests.pipelines.conftest import clean_env, cli, derived_recipe, write_quick_recipe
from tests.pipelines.test_cache import write_sums

pytestmark = pytest.mark.e2e

# What each method's SFT job leaves in its model.tar.gz: a PEFT adapter of its type, or (none) a
# whole model. LoRA's run is tests/pipelines/test_local_run.py's.
PEFT_TYPES = {"qlora": "LORA", "prompt_tuning": "PROMPT_TUNING", "p_tuning": "P_TUNING",
              "prefix_tuning": "PREFIX_TUNING"}


@pytest.fixture(scope="module")
def env(local_home):
    return clean_env(local_home)


@pytest.fixture(scope="module")
def quick_recipe(tmp_path_factory):
    return write_quick_recipe(tmp_path_factory.mktemp("recipe"), "sft-methods")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_sums(tmp_path_factory.mktemp("data"))


def run(env, recipe, data, group, *parameters):
    result = cli(env, "run", "--recipe", str(recipe), "-p", f"InputData={data}",
                 "-p", f"ModelPackageGroup={group}", "-p", "EvalThreshold=0", *parameters)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    execution_id = result.stdout.split("\nExecution ", 1)[1].split(":", 1)[0]
    # A recipe's pipeline is llm-<its name>; the recipe file is named after it.
    return Path(env["LLM_PIPELINE_HOME"]) / "executions" / f"llm-{recipe.stem}" / execution_id


def model_archive(folder) -> dict[str, bytes]:
    """The small files of the SFT job's model.tar.gz, by name: read as they come, in one pass
    (SmolLM2's package holds its 540 MB base)."""
    archive = next(folder.glob("SFT/**/artifacts/model.tar.gz"))
    with open_archive(archive) as tar:
        return {member.name.removeprefix("./"): tar.extractfile(member).read()
                for member in tar if member.isfile() and member.size < 1_000_000}


def evaluation_of(folder) -> dict[str, float]:
    evaluation = json.loads(next(folder.glob("Evaluate/**/evaluation.json")).read_text())
    return {name: metric["value"] for name, metric in evaluation["metrics"].items()}


def registered(env, group: str) -> dict:
    packages = json.loads(cli(env, "registry", "list", "--group", group, "--json").stdout)
    assert len(packages) == 1, packages
    return packages[0]


@pytest.mark.parametrize("method", ["none", *PEFT_TYPES])
def test_every_peft_method_trains_evaluates_and_registers_through_the_pipeline(
        env, quick_recipe, data, method):
    group = f"e2e-{method.replace('_', '-')}"
    folder = run(env, quick_recipe, data, group, "-p", "BaseModel=builtin:tiny",
                 "-p", f"PeftMethod={method}")

    execution = json.loads((folder / "execution.json").read_text())
    assert execution["status"] == "Succeeded"
    files = model_archive(folder)
    summary = json.loads(files["training_summary.json"])
    assert summary["peft_method"] == method and summary["training"]["global_step"] == 4
    if method == "none":
        assert "adapter_config.json" not in files and "config.json" in files
    else:
        assert json.loads(files["adapter_config.json"])["peft_type"] == PEFT_TYPES[method]
    # Evaluate loaded this method's model and its base, and compared them.
    assert evaluation_of(folder)["perplexity_ratio"] > 0
    package = registered(env, group)
    assert package["metadata"]["param_PeftMethod"] == method
    assert package["model_data"][0] == \
        execution["steps"]["SFT"]["properties"]["ModelArtifacts"]["S3ModelArtifacts"]


def test_the_default_model_smollm2_fine_tunes_evaluates_and_registers(env, tmp_path):
    # The recipe's own BaseModel (builtin:smollm2-135m-instruct, converted once from the wheel's
    # GGUF into the machine's cache), LoRA, one step on two short examples; evaluated on the
    # two held-out examples with 4-token answers (what is checked is that the model goes through
    # every stage, not what it learns: tests/steps measure that).
    recipe = derived_recipe(tmp_path, "sft", "sft-smollm2",
                            sft={"max_steps": 1, "per_device_batch_size": 2, "max_seq_length": 64},
                            evaluate={"max_samples": 2, "max_new_tokens": 4})
    folder = run(env, recipe, write_sums(tmp_path), "e2e-smollm2")

    files = model_archive(folder)
    summary = json.loads(files["training_summary.json"])
    assert summary["base_model"] == "builtin:smollm2-135m-instruct"
    assert summary["training"]["global_step"] == 1
    adapter = json.loads(files["adapter_config.json"])
    assert adapter["peft_type"] == "LORA"
    assert evaluation_of(folder)["perplexity_ratio"] > 0
    assert registered(env, "e2e-smollm2")["metadata"]["param_BaseModel"] == \
        "builtin:smollm2-135m-instruct"

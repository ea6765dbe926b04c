"""End to end: the pretrain, cpt, distill and full-lifecycle recipes through the local engine on
tiny models."""

import json

import pytest

from steps.common.demo_data import demo_corpus
from tests.pipelines.conftest import clean_env, cli, derived_recipe
from tests.pipelines.test_cache import write_sums

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def env(local_home):
    return clean_env(local_home)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in demo_corpus(max_documents=60)))
    return path


# Evaluation and the distilled student's comparison on a few short answers: what these tests
# check is that each stage ran and reported, not how well a few steps of a tiny model answer.
FEW_ANSWERS = {"max_samples": 4, "max_new_tokens": 8}
FEW_COMPARISONS = {"compare_students": True, "comparison_samples": 4, "comparison_new_tokens": 8}


def latest_execution(home, pipeline):
    folders = sorted((home / "executions" / pipeline).iterdir(), key=lambda p: p.stat().st_mtime)
    return folders[-1], json.loads((folders[-1] / "execution.json").read_text())


def package_of(env, group):
    packages = json.loads(cli(env, "registry", "list", "--group", group, "--json").stdout)
    assert len(packages) == 1, packages
    return packages[0]


def test_pretrain_recipe_trains_a_tokenizer_and_model_from_nothing_and_registers_it(
        env, corpus, local_home):
    result = cli(env, "run", "--recipe", "pretrain", "-p", f"InputData={corpus}",
                 "-p", "VocabSize=512", "-p", "HiddenSize=64", "-p", "NumLayers=2",
                 "-p", "Epochs=1", "-p", "ModelPackageGroup=e2e-pretrain")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    folder, execution = latest_execution(local_home, "llm-pretrain")
    assert [s for s in execution["steps"] if execution["steps"][s]["status"] == "Succeeded"] == [
        "DataPrep", "Pretrain", "Evaluate", "CompareWithApproved", "EvaluationGate", "Register"]
    evaluation = json.loads(next(folder.glob("Evaluate/**/evaluation.json")).read_text())
    # Evaluated alone (there is no base model) on held-out text: likelihood metrics only.
    assert set(evaluation["metrics"]) == {"eval_loss", "perplexity", "bits_per_byte"}
    assert evaluation["metrics"]["perplexity"]["value"] < 512  # better than a uniform guess
    package = package_of(env, "e2e-pretrain")
    assert package["metadata"]["training_stages"] == "pretrain"
    assert package["metadata"]["gate_metric"] == "perplexity"


def test_cpt_recipe_with_lora_vocabulary_extension_on_two_processes_beats_its_base(
        env, corpus, local_home):
    # TrainingInstanceCount=2 runs the stage as two processes (torchrun, gloo) in place of two
    # instances, as the SageMaker job would run on two.
    result = cli(env, "run", "--recipe", "cpt", "-p", "BaseModel=builtin:tiny",
                 "-p", f"InputData={corpus}", "-p", "PeftMethod=lora", "-p", "LearningRate=0.01",
                 "-p", "ExtendVocabulary=20", "-p", "TrainingInstanceCount=2",
                 "-p", "ModelPackageGroup=e2e-cpt")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    folder, execution = latest_execution(local_home, "llm-cpt")
    assert execution["steps"]["Register"]["status"] == "Succeeded"
    log = next(folder.glob("CPT/**/log.txt")).read_text()
    assert "torch.distributed.run" in log and "--nproc_per_node=2" in log
    # Forked from the warm job runner, the job execs torchrun without importing the ML stack.
    assert "runs as a fresh process" not in log
    evaluation = json.loads(next(folder.glob("Evaluate/**/evaluation.json")).read_text())
    metrics = {name: m["value"] for name, m in evaluation["metrics"].items()}
    assert metrics["perplexity_ratio"] > 1.0
    assert metrics["bits_per_byte"] < metrics["base_bits_per_byte"]
    package = package_of(env, "e2e-cpt")
    assert package["metadata"]["param_PeftMethod"] == "lora"
    assert package["metadata"]["param_ExtendVocabulary"] == "20"


def test_distill_recipe_caches_teacher_outputs_so_a_second_student_costs_no_teacher_pass(
        env, local_home, tmp_path):
    # The default student: the SFT teacher with half its layers (one of builtin:tiny's two). A
    # tiny teacher learns little in a test's steps, so its student's quality says nothing: the
    # gate is opened here, and test_default_gates shows the default one refusing a bad student.
    # So the recipe runs a few steps, on the 36 sums records (the teacher's outputs are computed
    # for every training record).
    recipe = derived_recipe(tmp_path, "distill", sft={"max_steps": 4},
                            distill={"max_steps": 4, **FEW_COMPARISONS}, evaluate=FEW_ANSWERS)
    data = write_sums(tmp_path)
    first = cli(env, "run", "--recipe", str(recipe), "-p", "BaseModel=builtin:tiny",
                "-p", f"InputData={data}",
                "-p", "EvalThreshold=0.0", "-p", "ModelPackageGroup=e2e-distill")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    folder, execution = latest_execution(local_home, "llm-distill")
    assert execution["steps"]["Register"]["status"] == "Succeeded"
    summary = json.loads(_model_file(folder, "Distill", "training_summary.json"))
    # Trained from the cached teacher outputs: no teacher forward pass in the student job; the
    # teacher's weights (its 'teacher_model' channel) only gave the student its layers.
    assert summary["distillation"]["teacher_forward_passes"] == 0
    assert summary["distillation"]["student"]["kept_layers"] == [1]
    # Evaluated against its teacher, its start and a hard-label student.
    metrics = json.loads(next(folder.glob("Evaluate/**/evaluation.json")).read_text())["metrics"]
    assert {"base_perplexity", "initial_student_perplexity", "hard_label_student_perplexity",
            "perplexity_ratio_vs_hard_label"} <= set(metrics)

    # Another student: the teacher and its outputs are reused from the step cache.
    second = cli(env, "run", "--recipe", str(recipe), "-p", "BaseModel=builtin:tiny",
                 "-p", f"InputData={data}",
                 "-p", "StudentModel=teacher:keep_layers=0", "-p", "EvalThreshold=0.0",
                 "-p", "ModelPackageGroup=e2e-distill")
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    _, execution = latest_execution(local_home, "llm-distill")
    outcomes = {name: step["cache"] for name, step in execution["steps"].items()}
    assert outcomes["SFT"].startswith("hit") and outcomes["TeacherLogits"].startswith("hit"), outcomes
    assert outcomes["Distill"].startswith("miss: arguments changed: HyperParameters.student_model")
    assert len(json.loads(cli(env, "registry", "list", "--group", "e2e-distill",
                              "--json").stdout)) == 2


def _model_file(folder, step: str, name: str) -> str:
    import tarfile

    archive = next(folder.glob(f"{step}/**/artifacts/model.tar.gz"))
    with tarfile.open(archive) as tar:
        return tar.extractfile(name).read().decode()


def test_full_lifecycle_registers_a_quantized_student_with_its_lineage_and_report(
        env, corpus, local_home, tmp_path):
    # CPT -> SFT (LoRA) -> DPO -> teacher outputs -> distilled student -> quantized -> evaluated
    # (student vs its teacher) -> registered: every stage of the product on tiny models.
    # The gate opened, as for distill: a tiny teacher's student proves the plumbing, not quality;
    # and a few steps of each stage on the sums records, for the same reason.
    recipe = derived_recipe(tmp_path, "full-lifecycle", cpt={"max_steps": 4},
                            sft={"max_steps": 4}, dpo={"max_steps": 4},
                            distill={"max_steps": 4, **FEW_COMPARISONS},
                            quantize={"max_samples": 2, "max_new_tokens": 4, "speed_runs": 1},
                            evaluate=FEW_ANSWERS)
    result = cli(env, "run", "--recipe", str(recipe), "-p", "BaseModel=builtin:tiny",
                 "-p", f"InputData={write_sums(tmp_path)}",
                 "-p", f"CorpusData={corpus}", "-p", "EvalThreshold=0.0",
                 "-p", "ModelPackageGroup=e2e-full")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    folder, execution = latest_execution(local_home, "llm-full-lifecycle")
    assert [name for name, step in execution["steps"].items() if step["status"] == "Succeeded"] == [
        "DataPrepCorpus", "DataPrep", "DataPrepPreference", "CPT", "SFT", "DPO", "TeacherLogits",
        "Distill", "Quantize", "Evaluate", "CompareWithApproved", "EvaluationGate", "Register"]
    package = package_of(env, "e2e-full")
    meta = package["metadata"]
    assert meta["training_stages"] == "cpt+sft+dpo+distill"
    assert meta["quantization"] == "int8" and meta["parent_model"] == "builtin:tiny"
    assert meta["unquantized_model"].endswith("model.tar.gz")
    assert {"data_manifest_sha256_corpus", "data_manifest_sha256_preference"} <= set(meta)
    # The registered artifact is the quantized student, and it knows how it was made.
    described = cli(env, "registry", "list", "--group", "e2e-full", "--json")
    assert json.loads(described.stdout)[0]["model_data"][0].endswith("/int8.tar.gz")
    lineage = json.loads(_file_in(next(folder.glob("Quantize/**/output/int8.tar.gz")),
                                  "lineage.json"))
    assert [stage["stage"] for stage in lineage][-1] == "distill"
    # The report and model card the package links to, with their plots.
    evaluation = next(folder.glob("Evaluate/**/evaluation/evaluation.json")).parent
    for name in ("report.html", "report.md", "model_card.md", "metrics_comparison.png"):
        assert (evaluation / name).is_file(), name
    assert meta["model_card"].endswith("/model_card.md")
    assert meta["evaluation_report"].endswith("/report.html")
    # What each stage bought, on held-out data, in one table of the report and the card.
    effects = json.loads((evaluation / "evaluation.json").read_text())["stage_effects"]
    figures = {effect["stage"]: {f["name"]: f for f in effect["figures"]} for effect in effects}
    assert list(figures) == ["cpt", "sft", "dpo", "distill", "quantize (int8)"]
    assert set(figures["cpt"]) == {"perplexity"} and set(figures["sft"]) == {"perplexity"}
    assert set(figures["dpo"]) == {"logprob_margin", "preference_accuracy"}
    assert {"perplexity", "rouge_l"} <= set(figures["distill"])
    assert set(figures["quantize (int8)"]) == {"size_mb", "tokens_per_second", "perplexity"}
    assert figures["quantize (int8)"]["size_mb"]["after"] < figures["quantize (int8)"][
        "size_mb"]["before"]
    assert all(f["before"] is not None and f["after"] is not None
               for stage in figures.values() for f in stage.values())
    for document in ("report.md", "model_card.md"):
        assert "What each stage bought" in (evaluation / document).read_text()


def _file_in(archive, name: str) -> str:
    import tarfile

    with tarfile.open(archive) as tar:
        return tar.extractfile(name).read().decode()

"""The continued pre-training stage, run as SageMaker runs it, on builtin:tiny and demo text."""

import contextlib
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from steps import cpt
from steps.common import contract, lm_data, models
from steps.common.contract import StageError
from steps.common.demo_data import demo_corpus

from .conftest import TrainingJob, write_jsonl

CORPUS = demo_corpus(max_documents=48)
COMMON = {
    "base_model": "builtin:tiny", "max_seq_length": 64, "per_device_batch_size": 8,
    "logging_steps": 10, "checkpoint_steps": 0, "precision": "fp32", "lora_dropout": 0.0,
}


@dataclass
class CPTRun:
    job: TrainingJob
    stdout: str

    @property
    def summary(self) -> dict:
        return json.loads((self.job.model_dir / "training_summary.json").read_text())

    def metrics(self) -> list[dict]:
        lines = (self.job.output_data_dir / "metrics.jsonl").read_text().splitlines()
        return [json.loads(line) for line in lines]


def run_cpt(root: Path, **hyperparameters) -> CPTRun:
    stdout = io.StringIO()
    with pytest.MonkeyPatch.context() as monkeypatch, contextlib.redirect_stdout(stdout):
        job = TrainingJob(root, monkeypatch)
        job.channel("train", CORPUS[:40])
        job.channel("validation", CORPUS[40:])
        job.hyperparameters(**{k: str(v) for k, v in {**COMMON, **hyperparameters}.items()})
        contract.run(cpt.main, cpt.CPTStageConfig, job="training")
    return CPTRun(job, stdout.getvalue())


@pytest.fixture(scope="module")
def full_run(tmp_path_factory: pytest.TempPathFactory) -> CPTRun:
    root = tmp_path_factory.mktemp("cpt-full") / "opt-ml"
    return run_cpt(root, peft_method="none", extend_vocabulary=40, max_steps=30,
                   learning_rate=1e-3)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory: pytest.TempPathFactory) -> CPTRun:
    root = tmp_path_factory.mktemp("cpt-lora") / "opt-ml"
    return run_cpt(root, peft_method="lora", extend_vocabulary=40, max_steps=30,
                   learning_rate=1e-2)


def validation_loss(model: torch.nn.Module, tokenizer, block_size: int = 64) -> float:
    """The mean loss of the validation blocks, as the Trainer's evaluation computes it."""
    blocks = lm_data.pack_blocks([r["text"] for r in CORPUS[40:]], tokenizer, block_size)
    model.eval()
    total = 0.0
    with torch.no_grad():
        for start in range(0, len(blocks), 8):
            batch = blocks[start:start + 8]
            ids = torch.tensor(batch["input_ids"])
            total += model(input_ids=ids, labels=ids).loss.item() * len(ids)
    return total / len(blocks)


def test_full_cpt_lowers_the_domain_loss_and_saves_a_model_with_the_grown_vocabulary(full_run):
    summary = full_run.summary
    model_dir = full_run.job.model_dir
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = models.load_tokenizer(str(model_dir))
    output = model.generate(**tokenizer("The assert", return_tensors="pt"), max_new_tokens=5,
                            do_sample=False)

    assert summary["stage"] == "cpt" and summary["peft_method"] == "none"
    assert summary["base_model"] == "builtin:tiny"
    assert summary["training"]["eval_loss"] < summary["eval_loss_before"] - 1.0
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {
        p.name for p in model_dir.iterdir()
    }
    # builtin:tiny has 288 embedding rows for 260 tokens; 40 more tokens need 300.
    assert len(tokenizer) == 300 == model.get_input_embeddings().weight.shape[0]
    assert model.get_output_embeddings().weight.shape[0] == 300
    assert output.shape[1] > 1
    assert validation_loss(model, tokenizer) == pytest.approx(
        summary["training"]["eval_loss"], rel=1e-4
    )


def test_lora_cpt_lowers_the_domain_loss_and_its_adapter_reloads_over_the_grown_base(lora_run):
    summary = lora_run.summary
    model_dir = lora_run.job.model_dir
    model = models.load_model(str(model_dir))
    tokenizer = models.load_tokenizer(str(model_dir))

    assert summary["peft_method"] == "lora"
    assert summary["training"]["eval_loss"] < summary["eval_loss_before"] - 0.5
    assert (model_dir / "adapter_config.json").exists() and not (model_dir / "config.json").exists()
    assert type(model).__name__ == "PeftModelForCausalLM"
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer) == 300
    # The new tokens' trained rows came back with the adapter: the same loss as at the end of
    # training, to float precision.
    assert validation_loss(model, tokenizer) == pytest.approx(
        summary["training"]["eval_loss"], rel=1e-4
    )


def test_vocabulary_extension_is_reported_as_tokens_saved_per_document(full_run, lora_run):
    for run in (full_run, lora_run):
        first = run.metrics()[0]
        assert first["vocabulary_added_tokens"] == 40 and first["vocabulary_size"] == 300
        assert first["tokens_per_document_after"] < first["tokens_per_document_before"]
        assert first["tokens_per_document_saving"] > 0.1  # byte-level base: a lot to gain
        assert run.summary["tokens_per_document_saving"] == first["tokens_per_document_saving"]
        assert len(run.summary["new_token_ids"]) == 40
        assert re.search(r"\[metrics\] step=0 vocabulary_added_tokens=40 .*"
                         r"tokens_per_document_saving=0\.\d+", run.stdout)


def test_trainable_parameters_are_every_weight_for_full_and_adapters_plus_new_rows_for_lora(
    full_run, lora_run
):
    base = models.load_model(models.TINY)
    hidden = base.config.hidden_size
    lora = sum(
        8 * (module.in_features + module.out_features)  # lora_r=8: A is r x in, B is out x r
        for name, module in base.named_modules()
        if isinstance(module, torch.nn.Linear) and name != "lm_head"
    )
    new_rows = 2 * 40 * hidden  # the embeddings and the untied output head, 40 new tokens each

    assert lora_run.summary["training"]["trainable_parameters"] == lora + new_rows
    full = full_run.summary["training"]
    assert full["trainable_parameters"] == full["total_parameters"]
    assert full["total_parameters"] == base.num_parameters() + 12 * 2 * hidden  # 288 -> 300 rows


@pytest.mark.parametrize("method, peft_type, extra", [
    ("qlora", "LORA", {"extend_vocabulary": 40, "learning_rate": 1e-2}),  # grows a 4-bit model
    ("prompt_tuning", "PROMPT_TUNING", {}),
    ("p_tuning", "P_TUNING", {}),
    ("prefix_tuning", "PREFIX_TUNING", {}),
])
def test_every_peft_method_lowers_the_domain_loss_and_saves_an_adapter_that_reloads(
    tmp_path, method, peft_type, extra
):
    run = run_cpt(tmp_path / "opt-ml", peft_method=method, max_steps=10, **extra)
    adapter_config = json.loads((run.job.model_dir / "adapter_config.json").read_text())
    model = models.load_model(str(run.job.model_dir))

    assert run.summary["training"]["eval_loss"] < run.summary["eval_loss_before"]
    assert adapter_config["peft_type"] == peft_type
    assert type(model).__name__ == "PeftModelForCausalLM"


def test_vocabulary_extension_with_a_soft_prompt_is_refused_in_one_line():
    with pytest.raises(StageError, match="extend_vocabulary needs the new tokens' embeddings to "
                       "train, which peft_method prompt_tuning cannot do; use peft_method none, "
                       "lora or qlora"):
        cpt.CPTStageConfig(peft_method="prompt_tuning", extend_vocabulary=10)


def test_blocks_longer_than_the_model_positions_are_refused(training_job):
    training_job.channel("train", CORPUS[:2])
    with pytest.raises(StageError, match="max_seq_length=1024 exceeds the 512 positions model "
                       "builtin:tiny was trained for; set max_seq_length to at most 512"):
        cpt.main(cpt.CPTStageConfig(base_model="builtin:tiny", max_seq_length=1024))


def test_data_that_is_not_text_fails_the_job_with_one_line_and_no_model(training_job, capsys):
    training_job.channel("train", [{"prompt": "Hi", "completion": "Hello"}])
    training_job.hyperparameters(base_model="builtin:tiny", peft_method="none")

    with pytest.raises(SystemExit) as exited:
        contract.run(cpt.main, cpt.CPTStageConfig, job="training")

    assert exited.value.code == 2
    reason = training_job.failure_file.read_text()
    assert re.fullmatch(r"ERROR: \S+train\.jsonl:1: prompt_completion records, but \(continued\) "
                        r"pre-training reads language-modelling records .* or train on this "
                        r"data with the sft stage", reason)
    assert capsys.readouterr().err.strip().splitlines()[-1] == reason
    assert not training_job.model_dir.exists()


def test_evaluating_a_vocabulary_extending_adapter_scores_the_real_base(lora_run, tmp_path):
    # Switching the adapter off would leave the base with the trained rows of the new tokens; the
    # comparison must be against the base model as it was, reading the text with its own tokenizer.
    from steps import evaluate
    from steps.common.models import load_model, load_tokenizer

    write_jsonl(tmp_path / "data" / "validation.jsonl", CORPUS[40:44])
    evaluate.main(evaluate.EvaluateConfig(
        model_dir=str(lora_run.job.model_dir), data_dir=str(tmp_path / "data"),
        output_dir=str(tmp_path / "out"), base_model="builtin:tiny", max_seq_length=128))
    metrics = json.loads((tmp_path / "out" / "evaluation.json").read_text())["metrics"]

    base_alone_dir = tmp_path / "base"
    load_model("builtin:tiny").save_pretrained(base_alone_dir)
    load_tokenizer("builtin:tiny").save_pretrained(base_alone_dir)
    evaluate.main(evaluate.EvaluateConfig(
        model_dir=str(base_alone_dir), data_dir=str(tmp_path / "data"),
        output_dir=str(tmp_path / "out-base"), base_model="none", max_seq_length=128))
    base_alone = json.loads((tmp_path / "out-base" / "evaluation.json").read_text())["metrics"]
    assert metrics["base_eval_loss"]["value"] == pytest.approx(
        base_alone["eval_loss"]["value"], rel=1e-5)

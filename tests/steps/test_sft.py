"""The SFT training stage, run as SageMaker runs it: hyperparameters.json, SM_* folders, no args."""

import json
import re

import pytest
import torch

from steps import sft
from steps.common import contract, models
from steps.common.contract import StageError

from .conftest import counting_records


def test_a_lora_run_saves_an_adapter_in_peft_layout_that_reloads_and_generates(sft_run):
    files = {p.name for p in sft_run.model_dir.iterdir()}
    assert {
        "adapter_config.json",
        "adapter_model.safetensors",
        "tokenizer.json",
        "chat_template.jinja",
        "training_summary.json",
    } <= files
    adapter_config = json.loads((sft_run.model_dir / "adapter_config.json").read_text())
    assert (
        adapter_config["peft_type"] == "LORA"
        and adapter_config["base_model_name_or_path"] == "builtin:tiny"
    )

    # The base model comes from what adapter_config.json records.
    model = models.load_model(str(sft_run.model_dir))
    tokenizer = models.load_tokenizer(str(sft_run.model_dir))
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Count to 3."}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    output = model.generate(
        **prompt, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id
    )

    assert type(model).__name__ == "PeftModelForCausalLM"
    assert output.shape[1] > prompt["input_ids"].shape[1]


def test_the_training_loss_falls(sft_run):
    history = [
        json.loads(line)
        for line in (sft_run.output_data_dir / "metrics.jsonl").read_text().splitlines()
    ]
    losses = [m["train_loss"] for m in history if "train_loss" in m]

    assert len(losses) == 7  # step 1, then every 5 steps up to 30
    assert losses[-1] < 0.6 * losses[0]
    summary = json.loads((sft_run.model_dir / "training_summary.json").read_text())
    assert summary["base_model"] == "builtin:tiny" and summary["global_steps"] == 30
    assert summary["hyperparameters"]["learning_rate"] == 0.01
    assert summary["eval_loss"] < losses[0]


def test_metric_lines_match_sagemaker_metric_definitions(sft_run):
    def values(name: str) -> list[float]:
        return [float(v) for v in re.findall(rf"[ ]{name}=([0-9.eE+-]+)", sft_run.stdout)]

    assert len(values("train_loss")) == 7
    assert len(values("learning_rate")) == 7 and values("learning_rate")[0] == pytest.approx(0.01)
    assert all(v > 0 for v in values("tokens_per_second"))
    assert len(values("eval_loss")) == 1
    assert values("trainable_parameters")[0] > 0 and values("peak_memory_mb")[0] > 0
    assert (sft_run.output_data_dir / "loss_curve.png").read_bytes().startswith(b"\x89PNG")


def test_an_unknown_hyperparameter_fails_the_job_with_a_clear_reason(training_job, capsys):
    training_job.channel("train", counting_records(8))
    training_job.hyperparameters(base_model="builtin:tiny", lerning_rate="0.1")

    with pytest.raises(SystemExit) as exited:
        contract.run(sft.main, sft.SFTStageConfig, job="training")

    assert exited.value.code == 2
    reason = training_job.failure_file.read_text()
    assert reason.startswith(
        "ERROR: unknown hyperparameter 'lerning_rate' (did you mean 'learning_rate'?)"
    )
    assert capsys.readouterr().err.strip().splitlines()[-1] == reason
    assert not training_job.model_dir.exists()


def test_peft_methods_not_implemented_yet_are_refused_by_name():
    with pytest.raises(
        StageError, match="peft_method 'qlora' is not supported yet; use one of lora"
    ):
        sft.SFTStageConfig(peft_method="qlora")
    with pytest.raises(StageError, match="lora_r must be > 0, got 0"):
        sft.SFTStageConfig(lora_r=0)


def test_gradient_accumulation_reports_the_loss_of_the_equivalent_larger_batch(training_job):
    # The model's own loss is normalised over the whole accumulated batch (num_items_in_batch): 2 x
    # 2 sequences must give the loss of 4 at once, not twice it.
    training_job.channel("train", counting_records(16))
    first_losses = []
    for batch_size, accumulation in ((4, 1), (2, 2)):
        training_job.output_data_dir.joinpath("metrics.jsonl").unlink(missing_ok=True)
        sft.main(
            sft.SFTStageConfig(
                base_model="builtin:tiny",
                max_steps=1,
                logging_steps=1,
                lora_dropout=0.0,
                per_device_batch_size=batch_size,
                gradient_accumulation_steps=accumulation,
            )
        )
        first = json.loads(
            training_job.output_data_dir.joinpath("metrics.jsonl").read_text().splitlines()[0]
        )
        first_losses.append(first["train_loss"])

    assert first_losses[0] == pytest.approx(first_losses[1], rel=1e-4)


def test_fp16_on_a_cpu_fails_before_training(training_job):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    training_job.channel("train", counting_records(8))
    with pytest.raises(StageError, match="precision 'fp16' needs a CUDA GPU"):
        sft.main(sft.SFTStageConfig(base_model="builtin:tiny", precision="fp16"))

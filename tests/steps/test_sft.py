"""The SFT training stage, run as SageMaker runs it: hyperparameters.json, SM_* folders, no args."""

import json
import os
import re
import sys
from collections import Counter

import pytest
import torch
from datasets import Dataset

from pipelines.local import jobs
from steps import sft
from steps.common import contract, models
from steps.common.contract import StageError
from steps.common.datasets import DatasetFormat, sft_example

from .conftest import TrainingJob, counting_records
from .stage_runs import run_sft

PROMPT_COMPLETION = DatasetFormat("prompt_completion", conversational=False)


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
        and adapter_config["base_model_name_or_path"] == models.BUNDLED_BASE
    )
    # The builtin base travels with the adapter, so the folder loads on an endpoint.
    assert (sft_run.model_dir / models.BUNDLED_BASE / "config.json").exists()

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
    report = summary["training"]
    assert summary["base_model"] == "builtin:tiny" and report["global_step"] == 30
    assert summary["hyperparameters"]["learning_rate"] == 0.01
    assert report["first_train_loss"] == losses[0] and report["final_train_loss"] == losses[-1]
    assert report["eval_loss"] < losses[0]


def test_metric_lines_match_sagemaker_metric_definitions(sft_run):
    def values(name: str) -> list[float]:
        return [float(v) for v in re.findall(rf"[ ]{name}=([0-9.eE+-]+)", sft_run.stdout)]

    assert len(values("train_loss")) == 7
    assert len(values("learning_rate")) == 7 and values("learning_rate")[0] == pytest.approx(0.01)
    assert all(v > 0 for v in values("tokens_per_second"))
    # Held out: once before training (what the stage bought is measured against it), once after.
    assert len(values("eval_loss")) == 2 and values("eval_loss")[1] < values("eval_loss")[0]
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


def test_fp16_on_a_cpu_fails_before_training(training_job):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    training_job.channel("train", counting_records(8))
    with pytest.raises(StageError, match="precision 'fp16' needs a CUDA GPU"):
        sft.main(sft.SFTStageConfig(base_model="builtin:tiny", precision="fp16"))


# --- Stopping: the EOS the model generates up to ----------------------------------------------

def _trainer(examples: list[dict], tokenizer=None, max_length: int = 128, packing: bool = False):
    """The stage's trainer on these examples: TRL's tokenized, masked (and packed) dataset."""
    tokenizer = tokenizer or models.load_tokenizer(models.TINY)
    model = models.load_model(models.TINY)
    config = sft.SFTStageConfig(base_model=models.TINY, checkpoint_steps=0,
                                max_seq_length=max_length, packing=packing)
    return sft.sft_trainer(config, "fp32", model, tokenizer, Dataset.from_list(examples), None)


def _tokenized_examples(examples: list[dict], tokenizer=None,
                        max_length: int = 128) -> tuple[Dataset, object]:
    """The training examples as the stage's trainer tokenizes and masks them."""
    trainer = _trainer(examples, tokenizer, max_length)
    return trainer.train_dataset, trainer.model


def test_every_trained_response_ends_with_the_eos_the_generation_config_stops_at():
    tokenizer = models.load_tokenizer(models.TINY)
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"},
            {"role": "user", "content": "Count to 2."}, {"role": "assistant", "content": "a b"}]
    formats = {
        "prompt_completion": [sft_example(counting_records(1)[0], PROMPT_COMPLETION, True)],
        "conversational": [{"messages": chat}],
        "language_modeling": [{"text": "a b c"}],
    }
    for name, examples in formats.items():
        dataset, model = _tokenized_examples(examples, tokenizer)
        eos = model.generation_config.eos_token_id
        assert tokenizer.convert_ids_to_tokens(eos) == "<|im_end|>"
        trained = [token for token in dataset[0]["labels"] if token != -100]
        # Prompts and user turns are not trained; every response ends with EOS (ChatML puts a
        # newline after it, which the prompt of the next turn would hold anyway).
        expected = {"prompt_completion": "a b<|im_end|>\n",
                    "conversational": "Yo<|im_end|>a b<|im_end|>",
                    "language_modeling": "a b c<|im_end|>"}[name]
        assert tokenizer.decode(trained) == expected, name
        assert sft.check_examples_teach_stopping(dataset, model, tokenizer, 128) == ["<|im_end|>"]


def test_a_chat_template_that_leaves_the_end_of_turn_untrained_is_refused():
    tokenizer = models.load_tokenizer(models.TINY)
    # The {% generation %} block stops before <|im_end|>: the assistant mask would never train it.
    tokenizer.chat_template = tokenizer.chat_template.replace(
        "{%- generation %}{{- message['content'] + '<|im_end|>' }}{%- endgeneration %}",
        "{%- generation %}{{- message['content'] }}{%- endgeneration %}{{- '<|im_end|>' }}",
    )
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]
    dataset, model = _tokenized_examples([{"messages": chat}] * 3, tokenizer)

    with pytest.raises(StageError, match=r"3 of 3 tokenized training examples end with 'o' .*not "
                       r"a token generation stops at \(<\|im_end\|>\), so the tuned model would "
                       r"not learn to stop"):
        sft.check_examples_teach_stopping(dataset, model, tokenizer, 128)


def test_examples_cut_at_max_seq_length_are_reported_as_teaching_no_stop(capsys):
    tokenizer = models.load_tokenizer(models.TINY)
    examples = [sft_example(r, PROMPT_COMPLETION, True) for r in counting_records(4)]
    dataset, model = _tokenized_examples(examples, tokenizer, max_length=32)

    sft.check_examples_teach_stopping(dataset, model, tokenizer, 32)

    assert "warning: 4 of 4 training examples are cut at max_seq_length=32 and teach no stop; " \
        "raise max_seq_length" in capsys.readouterr().out


def test_the_tuned_model_stops_after_its_answer(sft_run):
    model = models.load_model(str(sft_run.model_dir))
    tokenizer = models.load_tokenizer(str(sft_run.model_dir))
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Count to 3."}], add_generation_prompt=True,
        return_tensors="pt", return_dict=True,
    )
    output = model.generate(**prompt, max_new_tokens=40, do_sample=False,
                            pad_token_id=tokenizer.pad_token_id)
    answer = output[0, prompt["input_ids"].shape[1]:].tolist()

    assert len(answer) < 40 and answer[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.decode(answer[:-1]).startswith("a b")
    summary = json.loads((sft_run.model_dir / "training_summary.json").read_text())
    assert summary["stop_tokens"] == ["<|im_end|>"]


def test_packing_puts_several_examples_in_a_row_and_trains(tmp_path):
    run = run_sft(tmp_path / "opt-ml", counting_records(32), base_model="builtin:tiny",
                  peft_method="none", learning_rate=1e-3, packing="true", max_seq_length=128,
                  per_device_batch_size=2, max_steps=12, logging_steps=4)
    packed = re.search(r"packing: 32 examples in (\d+) rows of up to 128 tokens", run.stdout)

    assert packed and int(packed.group(1)) <= 32 // 2  # 40-46 tokens each: 2-3 in 128 tokens
    assert run.losses[-1] < 0.8 * run.losses[0]


def test_packed_rows_keep_their_sequences_apart_without_a_batch_sized_mask():
    """A packed batch stays B rows (not one row of B x max_seq_length tokens, which SDPA would
    attend over whole), and each packed sequence sees only itself: the model's outputs on a
    packed row equal its outputs on each sequence alone."""
    model = models.load_model(models.TINY).eval()
    tokenizer = models.load_tokenizer(models.TINY)
    collator = sft.packed_rows_collator(model, tokenizer)
    first, second, third = [5, 6, 7, 8, 9], [10, 11, 12, 13, 14, 15, 16], [20, 21, 22]
    rows = [{"input_ids": first + second, "seq_lengths": [5, 7]},
            {"input_ids": third, "seq_lengths": [3]}]

    batch = collator(rows)

    assert batch["input_ids"].shape == (2, 12)  # two rows, the shorter one padded
    assert "attention_mask" not in batch
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6]
    assert (batch["labels"][1, 3:] == -100).all()  # padding trains nothing
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                       use_cache=False).logits  # as SFTTrainerWithModelLoss calls it
        alone = [model(input_ids=torch.tensor([ids]), use_cache=False).logits[0]
                 for ids in (first, second, third)]
    torch.testing.assert_close(packed[0, :5], alone[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(packed[0, 5:], alone[1], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(packed[1, :3], alone[2], atol=1e-5, rtol=1e-4)


def _trained_targets(trainer) -> Counter:
    """What a trainer's batches train: (the document's tokens up to an input position, the token
    that position is trained to predict), counted. The model predicts labels[j] at position j - 1;
    the context is read from the document that holds position j - 1."""
    rows = list(trainer.train_dataset)
    batch = trainer.data_collator(rows)
    targets = Counter()
    for row, input_ids, labels in zip(rows, batch["input_ids"].tolist(), batch["labels"].tolist()):
        lengths = row.get("seq_lengths") or [len(row["input_ids"])]
        starts = [sum(lengths[:k]) for k in range(len(lengths))]
        for j in range(1, len(labels)):
            if labels[j] != -100:
                start = max(s for s in starts if s <= j - 1)
                targets[tuple(input_ids[start:j]), labels[j]] += 1
    return targets


@pytest.mark.parametrize("data_format", ["text", "prompt_completion", "messages"])
def test_a_packed_batch_trains_the_same_targets_as_its_documents_unpacked(data_format):
    """Packing is a speed-up, not a different objective: no document is trained to predict the
    next document's first token, and every masked prompt or user turn stays masked."""
    records = counting_records(6)
    examples = {
        "text": [{"text": f"{r['prompt']} {r['completion']}"} for r in records],
        "prompt_completion": [sft_example(r, PROMPT_COMPLETION, True) for r in records],
        "messages": [{"messages": [{"role": "user", "content": r["prompt"]},
                                   {"role": "assistant", "content": r["completion"]}]}
                     for r in records],
    }[data_format]

    packed = _trainer(examples, max_length=128, packing=True)
    unpacked = _trainer(examples, max_length=128, packing=False)

    assert len(packed.train_dataset) < len(examples)  # several documents share a row
    assert isinstance(packed.data_collator, sft.PackedRowsCollator)
    assert _trained_targets(packed) == _trained_targets(unpacked)


def test_a_flash_attention_model_keeps_trl_padding_free_batches():
    model = models.load_model(models.TINY)
    model.config._attn_implementation = "flash_attention_2"
    assert sft.packed_rows_collator(model, models.load_tokenizer(models.TINY)) is None


def test_a_job_log_has_no_library_warnings_about_the_hub_or_optional_kernels(tmp_path,
                                                                               monkeypatch,
                                                                               forked):
    # As the local server runs the stage: its own process, forked from the warm job runner, with
    # a job's environment; a LoRA adapter checkpointed during training. The libraries' import-time
    # warnings are in the log of a fresh interpreter instead, which test_distributed reads (each
    # torchrun process imports the stage itself).
    job = TrainingJob(tmp_path / "opt-ml", monkeypatch)
    job.channel("train", counting_records(8))
    job.hyperparameters(base_model="builtin:tiny", max_steps="2", checkpoint_steps="1")
    env = {**jobs.warm_environment(), **{k: v for k, v in os.environ.items()
                                        if k.startswith("SM_")}}

    done = forked.start([sys.executable, "-m", "steps.sft"], env, tmp_path)
    log = "".join(done.stdout)  # stdout and stderr, as a job's log holds them

    assert done.wait(timeout=600) == 0, log
    assert "kernels-community" not in log
    assert "Could not find a config file" not in log

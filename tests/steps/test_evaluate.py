"""The evaluation stage: a tuned adapter against its base model, in the model-quality shape."""

import json
import math
import tarfile
from pathlib import Path

import pytest
import torch
from datasets import Dataset

from steps import evaluate, sft
from steps.common import contract, models
from steps.common.datasets import Record, sft_example, validate_records
from steps.common.scoring import example_losses, mean_loss

from .conftest import counting_records, write_jsonl

METRICS = [
    "eval_loss",
    "perplexity",
    "bits_per_byte",
    "rouge_l",
    "exact_match",
    "eos_rate",
    "base_eval_loss",
    "base_perplexity",
    "base_bits_per_byte",
    "base_rouge_l",
    "base_exact_match",
    "base_eos_rate",
    "rouge_l_delta",
    "perplexity_ratio",
    "kl_to_base",
]


def run_evaluation(model_dir: Path, data_dir: Path, output_dir: Path, **options) -> dict:
    evaluate.main(
        evaluate.EvaluateConfig(
            model_dir=str(model_dir),
            data_dir=str(data_dir),
            output_dir=str(output_dir),
            max_new_tokens=8,
            max_samples=6,
            batch_size=4,
            **options,
        )
    )
    return json.loads((output_dir / "evaluation.json").read_text())


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """A data preparation output: train, validation and a manifest side by side."""
    folder = tmp_path_factory.mktemp("data")
    write_jsonl(folder / "train.jsonl", counting_records(32))
    write_jsonl(folder / "validation.jsonl", counting_records(8))
    (folder / "manifest.json").write_text("{}")
    return folder


@pytest.fixture(scope="module")
def adapter_evaluation(sft_run, data_dir, tmp_path_factory) -> dict:
    """The SFT output as SageMaker hands it to a processing job: a folder with model.tar.gz."""
    root = tmp_path_factory.mktemp("evaluate")
    (root / "model").mkdir()
    with tarfile.open(root / "model" / "model.tar.gz", "w:gz") as archive:
        for path in sorted(sft_run.model_dir.iterdir()):
            archive.add(path, arcname=path.name)
    evaluation = run_evaluation(root / "model", data_dir, root / "out")
    evaluation["_output_dir"] = root / "out"
    return evaluation


def test_evaluation_json_has_every_metric_in_the_model_quality_shape(adapter_evaluation):
    metrics = adapter_evaluation["metrics"]

    assert sorted(metrics) == sorted(METRICS)
    for name, metric in metrics.items():
        assert set(metric) == {"value", "standard_deviation"}, name
        assert all(isinstance(v, float) and math.isfinite(v) for v in metric.values()), name
    assert adapter_evaluation["num_samples"] == 6
    assert {"prompt", "reference", "tuned", "base"} <= set(adapter_evaluation["samples"][0])
    assert adapter_evaluation["base_model"] == "builtin:tiny"  # read from training_summary.json
    png = adapter_evaluation["_output_dir"] / "metrics_comparison.png"
    assert png.read_bytes().startswith(b"\x89PNG")


def test_the_tuned_adapter_beats_its_base_and_the_derived_metrics_agree(adapter_evaluation):
    m = {name: metric["value"] for name, metric in adapter_evaluation["metrics"].items()}

    assert m["eval_loss"] < m["base_eval_loss"]
    assert m["perplexity"] == pytest.approx(math.exp(m["eval_loss"]))
    assert m["perplexity_ratio"] == pytest.approx(m["base_perplexity"] / m["perplexity"])
    assert m["perplexity_ratio"] > 1
    assert m["rouge_l_delta"] == pytest.approx(m["rouge_l"] - m["base_rouge_l"])
    # Tuning moved the model: its own answers are likelier under it than under its base.
    assert m["kl_to_base"] > 0


def test_base_metrics_with_the_adapter_disabled_equal_evaluating_the_base_model_alone(
    adapter_evaluation, data_dir, tmp_path
):
    # The base model saved as an ordinary model folder, evaluated as the "tuned" model of its own
    # run.
    models.load_model(models.TINY).save_pretrained(tmp_path / "base")
    models.load_tokenizer(models.TINY).save_pretrained(tmp_path / "base")

    alone = run_evaluation(tmp_path / "base", data_dir, tmp_path / "out", base_model=models.TINY)

    for name in ("eval_loss", "perplexity", "rouge_l", "exact_match"):
        assert alone["metrics"][name]["value"] == pytest.approx(
            adapter_evaluation["metrics"][f"base_{name}"]["value"], rel=1e-5
        ), name
    assert [s["tuned"] for s in alone["samples"]] == [
        s["base"] for s in adapter_evaluation["samples"]
    ]


def test_a_model_evaluated_alone_on_plain_text_reports_likelihood_metrics_only(tmp_path):
    # What a pre-trained model gets: no base model, and text with no prompts to answer.
    models.load_model(models.TINY).save_pretrained(tmp_path / "model")
    models.load_tokenizer(models.TINY).save_pretrained(tmp_path / "model")
    texts = [{"text": f"Document {k}: the quick brown fox jumps over the lazy dog."}
             for k in range(5)]
    write_jsonl(tmp_path / "data" / "validation.jsonl", texts)

    result = run_evaluation(tmp_path / "model", tmp_path / "data", tmp_path / "out",
                            base_model="none")

    assert sorted(result["metrics"]) == ["bits_per_byte", "eval_loss", "perplexity"]
    m = {name: metric["value"] for name, metric in result["metrics"].items()}
    assert m["perplexity"] == pytest.approx(math.exp(m["eval_loss"]))
    # builtin:tiny reads one byte per token (ASCII text): bits per byte = loss / ln 2, near enough
    # (the EOS token scored at the end of each text adds bytes of its own name).
    assert 0.5 * m["eval_loss"] / math.log(2) < m["bits_per_byte"] < m["eval_loss"] / math.log(2)
    assert (tmp_path / "out" / "metrics_comparison.png").exists()


def test_models_with_different_tokenizers_are_compared_on_the_same_text(tmp_path, data_dir):
    # As after continued pre-training with an extended vocabulary: the tuned model's tokenizer has
    # extra tokens. The comparison must score each model with its own tokenizer.
    tokenizer = models.load_tokenizer(models.TINY)
    tokenizer.add_tokens(["abc", "Count"])
    model = models.load_model(models.TINY)
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")

    result = run_evaluation(tmp_path / "model", data_dir, tmp_path / "out",
                            base_model=models.TINY)

    m = {name: metric["value"] for name, metric in result["metrics"].items()}
    # The base reads the text with its own byte tokenizer: its loss is the base model's own.
    base_alone = run_evaluation(tmp_path / "model", data_dir, tmp_path / "out2",
                                base_model="none")
    assert m["base_eval_loss"] != pytest.approx(m["eval_loss"])
    assert m["eval_loss"] == pytest.approx(base_alone["metrics"]["eval_loss"]["value"], rel=1e-6)
    # Like-for-like: the ratio compares the two models' likelihoods of the same bytes.
    # Like-for-like: the ratio compares the two models' likelihoods of the same bytes, per tuned
    # token: exp((NLL_base - NLL_tuned) / tokens), with NLL = bits per byte * ln 2 * bytes.
    nats_per_byte, base_nats_per_byte = (m[k] * math.log(2)
                                         for k in ("bits_per_byte", "base_bits_per_byte"))
    bytes_per_token = m["eval_loss"] / nats_per_byte
    assert m["perplexity_ratio"] == pytest.approx(
        math.exp((base_nats_per_byte - nats_per_byte) * bytes_per_token), rel=1e-4)


def test_a_model_folder_without_a_model_fails_with_exit_2_and_no_output(
    tmp_path, data_dir, monkeypatch, capsys
):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "README.md").write_text("nothing here")
    monkeypatch.setattr(
        "sys.argv",
        [
            "steps.evaluate",
            "--model-dir",
            str(tmp_path / "model"),
            "--data-dir",
            str(data_dir),
            "--output-dir",
            str(tmp_path / "out"),
        ],
    )

    with pytest.raises(SystemExit) as exited:
        contract.run(evaluate.main, evaluate.EvaluateConfig, job="processing")

    assert exited.value.code == 2
    assert "holds neither a Hugging Face model" in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (tmp_path / "out").exists()


def test_a_model_that_always_ends_its_turn_has_an_eos_rate_of_one(tmp_path, data_dir):
    # builtin:tiny rewired so that <|im_end|> is the most likely next token whatever the input:
    # one residual dimension holds a constant no layer writes to, and only EOS reads it.
    tokenizer = models.load_tokenizer(models.TINY)
    model = models.load_model(models.TINY)
    constant = 0
    with torch.no_grad():
        model.model.embed_tokens.weight[:, constant] = 100.0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[constant] = 0.0
            layer.mlp.down_proj.weight[constant] = 0.0
        model.lm_head.weight.zero_()
        model.lm_head.weight[tokenizer.eos_token_id, constant] = 1.0
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")

    result = run_evaluation(tmp_path / "model", data_dir, tmp_path / "out", base_model=models.TINY)

    assert result["metrics"]["eos_rate"] == {"value": 1.0, "standard_deviation": 0.0}
    assert all(sample["tuned"] == "" for sample in result["samples"])  # stopped at once
    # The untrained tiny model rambles to the length limit.
    assert result["metrics"]["base_eos_rate"]["value"] < 1.0
    assert result["checks"] == {
        "chat_template": True,
        "eos_rate": 1.0,
        "answers": 6,
        "max_new_tokens": 8,
        "stop_tokens": ["<|im_end|>"],
    }


def test_a_tokenizer_without_a_chat_template_fails_the_check_but_not_the_stage(tmp_path):
    tokenizer = models.load_tokenizer(models.TINY)
    tokenizer.chat_template = None
    models.load_model(models.TINY).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    write_jsonl(tmp_path / "data.jsonl", counting_records(4))

    result = run_evaluation(tmp_path / "model", tmp_path / "data.jsonl", tmp_path / "out",
                            base_model="none")

    assert result["checks"]["chat_template"] is False
    assert result["checks"]["eos_rate"] == result["metrics"]["eos_rate"]["value"] < 1.0
    assert evaluate.chat_template_renders(models.load_tokenizer(models.TINY))


def test_prompt_only_data_fails_in_one_line_and_writes_nothing(sft_run, tmp_path, monkeypatch,
                                                               capsys):
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "Count to 3."}, {"prompt": "Count to 4."}])
    monkeypatch.setattr("sys.argv", [
        "steps.evaluate", "--model-dir", str(sft_run.model_dir),
        "--data-dir", str(tmp_path / "prompts.jsonl"), "--output-dir", str(tmp_path / "out"),
    ])

    with pytest.raises(SystemExit) as exited:
        contract.run(evaluate.main, evaluate.EvaluateConfig, job="processing")

    assert exited.value.code == 2
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "prompts.jsonl:1: the data is prompt-only records" in last_line
    assert "this stage needs responses" in last_line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("records", [
    [{"messages": [{"role": "user", "content": f"Count to {n}."},
                   {"role": "assistant", "content": " ".join(map(str, range(1, n + 1)))},
                   {"role": "user", "content": "Again."},
                   {"role": "assistant", "content": "Once more."}]} for n in (2, 3, 4)],
    counting_records(3),
    [{"text": f"The number {n} follows {n - 1}."} for n in (2, 3, 4)],
], ids=["messages", "prompt and completion", "text"])
def test_the_eval_loss_is_the_loss_sft_evaluates_on_the_same_records(records):
    tokenizer = models.load_tokenizer(models.TINY)
    model = models.load_model(models.TINY).eval()
    fmt = validate_records([Record(data, f"x:{i}") for i, data in enumerate(records)])
    examples = [sft_example(data, fmt, chat_template=True) for data in records]
    config = sft.SFTStageConfig(base_model=models.TINY, checkpoint_steps=0,
                                per_device_batch_size=len(examples))
    trainer = sft.sft_trainer(config, "fp32", model, tokenizer, Dataset.from_list(examples),
                              Dataset.from_list(examples))

    losses = example_losses(model, tokenizer, examples, len(examples), 512)

    assert mean_loss(losses) == pytest.approx(trainer.evaluate()["eval_loss"], rel=1e-5)


def test_the_comparison_plot_writes_every_value_also_zero_negative_and_not_a_number(
        tmp_path, monkeypatch, recwarn):
    # Its panels have no y axis: a value is read from its text, so none may go missing.
    from matplotlib.axes import Axes

    texts = []
    annotate = Axes.annotate
    monkeypatch.setattr(Axes, "annotate",
                        lambda axis, text, xy, *args, **kwargs: (texts.append((text, xy[1])),
                                                                 annotate(axis, text, xy, *args,
                                                                          **kwargs))[1])
    metrics = {"perplexity": {"value": math.inf}, "base_perplexity": {"value": 2.5},
               "eval_loss": {"value": math.nan}, "logprob_margin": {"value": -0.25},
               "exact_match": {"value": 0.0}, "base_exact_match": {"value": 0.0}}

    evaluate._plot_comparison(metrics, tmp_path / "plot.png")

    assert sorted(text for text, _ in texts) == sorted(["2.5", "inf", "nan", "-0.25", "0", "0"])
    assert all(math.isfinite(y) for _, y in texts)  # drawn where it can be seen
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]
    assert (tmp_path / "plot.png").read_bytes().startswith(b"\x89PNG")

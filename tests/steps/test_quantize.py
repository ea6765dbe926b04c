"""The quantization stage: 8-bit and 4-bit bitsandbytes versions of a model, measured against it."""

import json
from pathlib import Path

import pytest

from steps import quantize
from steps.common import contract, models
from steps.common.datasets import load_records, sft_example
from steps.common.scoring import example_losses

from .conftest import counting_records, write_jsonl

VARIANT_FIELDS = {"scheme", "folder", "size_bytes", "load_s", "memory_bytes", "tokens_per_second",
                  "eval_loss", "perplexity", "rouge_l", "exact_match", "agreement"}
DELTA_FIELDS = {"size_ratio", "eval_loss_delta", "perplexity_delta", "perplexity_ratio",
                "rouge_l_delta", "exact_match_delta", "tokens_per_second_ratio"}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("data")
    write_jsonl(folder / "train.jsonl", counting_records(32))
    write_jsonl(folder / "validation.jsonl", counting_records(8))
    return folder


@pytest.fixture(scope="module")
def quantized(sft_run, data_dir, tmp_path_factory) -> Path:
    """Both schemes of the SFT stage's LoRA adapter (merged into its base first)."""
    output = tmp_path_factory.mktemp("quantize") / "out"
    quantize.main(quantize.QuantizeConfig(
        model_dir=str(sft_run.model_dir), output_dir=str(output), scheme="both",
        data_dir=str(data_dir), max_samples=4, max_new_tokens=8, batch_size=4, speed_runs=2,
        speed_tokens=8, archive=True,
    ))
    return output


def _report(folder: Path) -> dict:
    return json.loads((folder / "quantization.json").read_text())


def test_quantization_json_has_the_documented_fields_for_every_variant(quantized, sft_run):
    report = _report(quantized)

    assert report["source_model"] == str(sft_run.model_dir) and report["merged_adapter"] is True
    assert report["library"] == "bitsandbytes" and report["library_version"]
    assert report["num_loss_examples"] == 8 and report["num_samples"] == 4
    assert list(report["variants"]) == ["reference", "int8", "nf4"]
    assert set(report["variants"]["reference"]) == VARIANT_FIELDS
    for scheme in ("int8", "nf4"):
        variant = report["variants"][scheme]
        assert set(variant) == VARIANT_FIELDS | DELTA_FIELDS
        assert variant["scheme"] == scheme and variant["folder"] == scheme
        assert variant["tokens_per_second"] > 0 and variant["load_s"] > 0
        assert variant["perplexity_ratio"] == pytest.approx(
            variant["perplexity"] / report["variants"]["reference"]["perplexity"])
    assert (quantized / "quantization_comparison.png").read_bytes().startswith(b"\x89PNG")


def test_each_variant_is_also_one_archive_for_registration_with_its_lineage(quantized):
    # A model package's ModelDataUrl names one .tar.gz: the folder's files at its root.
    import tarfile

    for scheme in ("int8", "nf4"):
        with tarfile.open(quantized / f"{scheme}.tar.gz") as tar:
            names = set(tar.getnames())
        assert {p.name for p in (quantized / scheme).iterdir()} == names
        assert {"config.json", "training_summary.json", "lineage.json"} <= names
        summary = json.loads((quantized / scheme / "training_summary.json").read_text())
        assert summary["quantization"]["scheme"] == scheme


def test_quantized_models_are_smaller_on_disk_and_in_memory(quantized):
    variants = _report(quantized)["variants"]
    reference, int8, nf4 = variants["reference"], variants["int8"], variants["nf4"]

    # builtin:tiny keeps a large share of its weights in the embeddings and output head, which stay
    # in full precision: the ratios are far from 1/4 and 1/8 here, closer on real models.
    assert nf4["size_bytes"] < int8["size_bytes"] < 0.6 * reference["size_bytes"]
    assert nf4["memory_bytes"] < int8["memory_bytes"] < reference["memory_bytes"]


def test_each_variant_reloads_quantized_and_generates(quantized):
    for scheme, layer in (("int8", "Linear8bitLt"), ("nf4", "Linear4bit")):
        model = models.load_model(str(quantized / scheme))
        tokenizer = models.load_tokenizer(str(quantized / scheme))
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Count to 3."}],
                                               add_generation_prompt=True, return_tensors="pt",
                                               return_dict=True)
        output = model.generate(**prompt, max_new_tokens=6, do_sample=False,
                                pad_token_id=tokenizer.pad_token_id)
        record = json.loads((quantized / scheme / "training_summary.json").read_text())

        assert type(model.model.layers[0].self_attn.q_proj).__name__ == layer
        assert output.shape[1] > prompt["input_ids"].shape[1]
        # What the registry records about the package.
        assert record["quantization"]["scheme"] == scheme
        assert record["quantization"]["library"] == "bitsandbytes"
        assert record["quantization"]["full_precision_modules"] == ["lm_head"]
        assert record["stage"] == "sft" and record["base_model"] == "builtin:tiny"


def test_an_adapter_is_merged_into_its_full_precision_base_before_quantizing(
    quantized, sft_run, data_dir
):
    # The reference the variants are measured against is the tuned model, not its base: its loss
    # is the adapter's (merging is exact up to rounding).
    fmt, records = load_records(data_dir / "validation.jsonl")
    tokenizer = models.load_tokenizer(str(sft_run.model_dir))
    examples = [sft_example(r.data, fmt, True) for r in records]
    losses = example_losses(models.load_model(str(sft_run.model_dir)), tokenizer, examples, 4, 512)
    adapter_loss = sum(x for x, _, _ in losses) / sum(n for _, n, _ in losses)

    report = _report(quantized)
    assert report["variants"]["reference"]["eval_loss"] == pytest.approx(adapter_loss, rel=1e-4)
    for scheme in ("int8", "nf4"):
        assert json.loads((quantized / scheme / "training_summary.json").read_text())[
            "quantization"]["merged_adapter"] is True


def test_an_already_quantized_model_is_refused_in_one_line_with_no_output(
    quantized, tmp_path, monkeypatch, capsys
):
    output = tmp_path / "out"
    monkeypatch.setattr("sys.argv", ["steps.quantize", "--model-dir", str(quantized / "nf4"),
                                     "--output-dir", str(output)])

    with pytest.raises(SystemExit) as exited:
        contract.run(quantize.main, quantize.QuantizeConfig, job="processing")

    assert exited.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"ERROR: model {quantized / 'nf4'} is already quantized (bitsandbytes 4-bit); quantize "
        "the full-precision model it came from: quantizing again compounds the rounding error "
        "and leaves nothing to measure against"
    )
    assert not output.exists()

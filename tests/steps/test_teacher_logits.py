"""The teacher-outputs stage: a teacher's top-k log-probabilities, computed once and cached."""

import hashlib
import json
import tarfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from trl import SFTConfig

from steps import sft, teacher_logits
from steps.common import contract, distillation, models, scoring, training
from steps.common.datasets import DatasetFormat, Record

from .conftest import counting_records, write_jsonl


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """A data preparation output: train and validation side by side."""
    folder = tmp_path_factory.mktemp("data")
    write_jsonl(folder / "train.jsonl", counting_records(32))
    write_jsonl(folder / "validation.jsonl", counting_records(8))
    return folder


@pytest.fixture(scope="module")
def cache(sft_run, data_dir, tmp_path_factory) -> Path:
    """The SFT adapter as SageMaker hands it to a processing job (a folder with model.tar.gz) as
    the teacher."""
    root = tmp_path_factory.mktemp("teacher-logits")
    (root / "model").mkdir()
    with tarfile.open(root / "model" / "model.tar.gz", "w:gz") as archive:
        for path in sft_run.model_dir.iterdir():
            archive.add(path, arcname=path.name)
    teacher_logits.main(teacher_logits.TeacherLogitsConfig(
        model_dir=str(root / "model"), data_dir=str(data_dir), output_dir=str(root / "out"),
        top_k=8, batch_size=8,
    ))
    return root / "out"


def test_the_manifest_records_teacher_tokenizer_top_k_counts_and_hashes(cache, data_dir, sft_run):
    manifest = json.loads((cache / "manifest.json").read_text())
    tokenizer = models.load_tokenizer(str(sft_run.model_dir))

    assert manifest["format"] == "llm-pipeline/teacher-top-k" and manifest["version"] == 1
    assert manifest["teacher"]["adapter"] is True
    assert manifest["teacher"]["base_model"] == "builtin:tiny"
    assert manifest["tokenizer"]["vocab_sha256"] == distillation.vocab_fingerprint(tokenizer)
    assert manifest["top_k"] == 8 and manifest["max_seq_length"] == 512
    assert manifest["teacher_forward_passes"] == 4 + 1  # 32 + 8 examples in batches of 8
    for split, count in (("train", 32), ("validation", 8)):
        info = manifest["splits"][split]
        data = (data_dir / f"{split}.jsonl").read_bytes()
        assert info["examples"] == count and info["data_files"] == [f"{split}.jsonl"]
        assert info["data_sha256"] == hashlib.sha256(data).hexdigest()
        assert [shard["file"] for shard in info["shards"]] == [f"{split}-00000.safetensors"]
    # A config-built student can be sized from, and tokenized like, the teacher.
    assert json.loads((cache / "teacher_config.json").read_text())["model_type"] == "llama"
    cached_tokenizer = models.load_tokenizer(str(cache / "tokenizer"))
    assert distillation.vocab_fingerprint(cached_tokenizer) == manifest["tokenizer"]["vocab_sha256"]


def test_the_cache_holds_the_teachers_top_k_log_probs_at_every_loss_position(cache, sft_run):
    examples = distillation.read_cache(cache, "validation", top_k=8)
    teacher = models.load_model(str(sft_run.model_dir)).eval()

    for example in examples:
        with torch.no_grad():
            logits = teacher(input_ids=torch.tensor([example.input_ids])).logits[0]
        trained = torch.tensor(example.labels[1:]) != -100
        expected = F.log_softmax(logits[:-1][trained], dim=-1).topk(8, dim=-1)

        assert example.top_k_ids.shape == (example.loss_positions, 8)
        assert torch.equal(example.top_k_ids[:, 0], expected.indices[:, 0])
        torch.testing.assert_close(example.top_k_logprobs, expected.values, atol=2e-2, rtol=0)
        assert (example.top_k_logprobs.diff(dim=-1) <= 0).all()  # sorted, largest first


# --- Tokenization: the same examples the SFT stage trains on ---------------------------------

def _sft_dataset(examples: list[dict], tokenizer) -> Dataset:
    config = sft.SFTStageConfig(base_model=models.TINY, checkpoint_steps=0)
    args = training.trainer_arguments(
        config, "fp32", SFTConfig, max_length=512, packing=False, completion_only_loss=None,
        assistant_only_loss="messages" in examples[0] and bool(tokenizer.chat_template),
    )
    trainer = sft.SFTTrainerWithModelLoss(
        model=models.load_model(models.TINY), args=args, train_dataset=Dataset.from_list(examples),
        processing_class=tokenizer,
    )
    return trainer.train_dataset


@pytest.mark.parametrize("fmt, record, chat_template", [
    ("prompt_completion", counting_records(1)[0], True),
    ("prompt_completion", counting_records(1)[0], False),
    ("conversational", {"messages": [
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"},
        {"role": "user", "content": "Count to 2."}, {"role": "assistant", "content": "a b"}]}, True),
    ("language_modeling", {"text": "a b c"}, True),
])
def test_examples_are_tokenized_and_masked_as_the_sft_stage_does(fmt, record, chat_template):
    from steps.common.datasets import sft_example

    tokenizer = models.load_tokenizer(models.TINY)
    if not chat_template:
        tokenizer.chat_template = None
    data_format = DatasetFormat(fmt, conversational="messages" in record)
    sft_row = _sft_dataset([sft_example(record, data_format, chat_template)], tokenizer)[0]

    [ours] = distillation.tokenize_examples([Record(record, "x:1")], data_format, tokenizer, 512)

    assert ours.input_ids == sft_row["input_ids"]
    assert ours.labels == sft_row["labels"]


def test_a_top_k_larger_than_the_vocabulary_fails_in_one_line_with_no_output(
    data_dir, tmp_path, monkeypatch, capsys
):
    output = tmp_path / "out"
    monkeypatch.setattr("sys.argv", [
        "steps.teacher_logits", "--model-dir", "builtin:tiny", "--data-dir", str(data_dir),
        "--output-dir", str(output), "--top-k", "1000",
    ])

    with pytest.raises(SystemExit) as exited:
        contract.run(teacher_logits.main, teacher_logits.TeacherLogitsConfig, job="processing")

    assert exited.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "ERROR: top_k=1000 exceeds the teacher's 288 output tokens; lower top_k"
    )
    assert not output.exists()


# --- Prompts without reference answers: the teacher answers them ------------------------------

# Two new prompts (one given twice), and two the labelled data has: one as it is written there, one
# in other spacing and capitals.
UNLABELLED = [{"prompt": "Count to 6."}, {"prompt": "Count to 7."}, {"prompt": "Count to 6."},
              {"prompt": "Count to 2."}, {"prompt": "count  to 3."}]


@pytest.fixture(scope="module")
def answered(sft_run, data_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("answered")
    write_jsonl(root / "prompts" / "prompts.jsonl", UNLABELLED)
    teacher_logits.main(teacher_logits.TeacherLogitsConfig(
        model_dir=str(sft_run.model_dir), data_dir=str(data_dir), output_dir=str(root / "out"),
        prompts_dir=str(root / "prompts"), max_new_tokens=16, top_k=8))
    return root / "out"


def test_the_teacher_answers_only_the_prompts_the_labelled_data_does_not_have(answered, sft_run):
    manifest = json.loads((answered / "manifest.json").read_text())
    info = manifest["splits"][distillation.TEACHER_ANSWERED]
    records = [json.loads(line) for line in
               (answered / distillation.TEACHER_ANSWERS_FILE).read_text().splitlines()]
    tokenizer = models.load_tokenizer(str(sft_run.model_dir))
    teacher = models.load_model(str(sft_run.model_dir)).eval()
    expected = scoring.generate(teacher, tokenizer, [[{"role": "user", "content": p}] for p in
                                                     ("Count to 6.", "Count to 7.")], 16, 8)

    assert info["prompts"] == 2 and info["max_new_tokens"] == 16
    assert info["examples"] == len(records) >= 1
    # The teacher's own greedy answers, to the new prompts only.
    for record in records:
        assert record["completion"] == dict(zip(("Count to 6.", "Count to 7."), expected))[
            record["prompt"]]
    # Tokenized as the student stage tokenizes labelled records, with the teacher's top-k.
    examples = distillation.read_cache(answered, distillation.TEACHER_ANSWERED, top_k=8)
    fmt = DatasetFormat("prompt_completion", conversational=False)
    ours = distillation.tokenize_examples([Record(r, "x") for r in records], fmt, tokenizer, 512)
    assert [e.input_ids for e in examples] == [e.input_ids for e in ours]
    assert all(e.top_k_ids.shape == (e.loss_positions, 8) for e in examples)
    # The labelled splits are cached as they are without prompts.
    assert manifest["splits"]["train"]["examples"] == 32


def test_prompts_that_are_all_labelled_already_add_no_split(sft_run, data_dir, tmp_path, capsys):
    write_jsonl(tmp_path / "prompts.jsonl", UNLABELLED[3:])
    teacher_logits.main(teacher_logits.TeacherLogitsConfig(
        model_dir=str(sft_run.model_dir), data_dir=str(data_dir), output_dir=str(tmp_path / "out"),
        prompts_dir=str(tmp_path / "prompts.jsonl"), top_k=8))

    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert set(manifest["splits"]) == {"train", "validation"}
    assert "prompts: 0 to answer" in capsys.readouterr().out

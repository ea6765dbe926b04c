"""The data preparation stage: de-duplication, a seeded split by prompt, the manifest; nothing on
bad data."""

import hashlib
import json
from pathlib import Path

import pandas as pd
import pytest

from steps import data_prep
from steps.common.contract import StageError
from steps.common.demo_data import (
    demo_records,
    write_demo_constitutional_prompts,
    write_demo_corpus,
    write_demo_dataset,
    write_demo_preferences,
)

from .conftest import write_jsonl
from .stage_runs import run_as_program


def prepare(input_path: Path, output_dir: Path, **options) -> dict:
    data_prep.main(
        data_prep.DataPrepConfig(input_dir=str(input_path), output_dir=str(output_dir), **options)
    )
    return json.loads((output_dir / "manifest.json").read_text())


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_duplicates_are_removed_and_the_split_is_deterministic(tmp_path):
    source = write_demo_dataset(tmp_path / "raw" / "demo.jsonl", n=120, seed=3)
    unique = {json.dumps(r, sort_keys=True) for r in demo_records(120, seed=3)}

    manifest = prepare(source, tmp_path / "a", seed=7)
    prepare(source, tmp_path / "b", seed=7)
    prepare(source, tmp_path / "c", seed=8)

    counts = manifest["counts"]
    train, validation = (
        read_jsonl(tmp_path / "a" / "train.jsonl"),
        read_jsonl(tmp_path / "a" / "validation.jsonl"),
    )
    assert (counts["records_read"], counts["duplicates_removed"]) == (120, 120 - len(unique))
    assert counts["duplicates_removed"] > 0
    assert (counts["train"], counts["validation"]) == (len(train), len(validation))
    assert {json.dumps(r, sort_keys=True) for r in train + validation} == unique
    assert counts["train_prompts"] == len({r["prompt"] for r in train})
    assert counts["validation_prompts"] == len({r["prompt"] for r in validation})
    assert 0.03 < counts["validation_prompts"] / len({r["prompt"] for r in train + validation}) < 0.2
    assert (tmp_path / "a" / "validation.jsonl").read_bytes() == (
        tmp_path / "b" / "validation.jsonl"
    ).read_bytes()
    assert (tmp_path / "a" / "validation.jsonl").read_bytes() != (
        tmp_path / "c" / "validation.jsonl"
    ).read_bytes()


def test_the_manifest_hashes_what_was_read_and_written(tmp_path):
    source = write_demo_dataset(tmp_path / "raw" / "demo.jsonl", n=40)
    out = tmp_path / "out"

    manifest = prepare(tmp_path / "raw", out)

    def sha256(path: Path) -> str:
        return hashlib.sha256(path.read_bytes()).hexdigest()

    assert manifest["inputs"] == [{"path": "demo.jsonl", "sha256": sha256(source), "records": 40}]
    assert manifest["outputs"] == {
        name: sha256(out / name) for name in ("train.jsonl", "validation.jsonl")
    }
    listing = "".join(f"{name} {digest}\n" for name, digest in sorted(manifest["outputs"].items()))
    assert manifest["dataset_sha256"] == hashlib.sha256(listing.encode()).hexdigest()
    assert manifest["format"] == "prompt_completion" and manifest["tokenizer"] == "builtin:tiny"
    for split in ("train", "validation"):
        stats = manifest["token_lengths"][split]
        assert 0 < stats["min"] <= stats["p50"] <= stats["p95"] <= stats["max"]


def test_csv_message_columns_are_written_as_message_lists(tmp_path):
    rows = [
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
        [{"role": "user", "content": "Yo"}, {"role": "assistant", "content": "Hey"}],
    ]
    pd.DataFrame({"messages": [json.dumps(row) for row in rows]}).to_csv(
        tmp_path / "chat.csv", index=False
    )
    manifest = prepare(tmp_path / "chat.csv", tmp_path / "out")

    records = read_jsonl(tmp_path / "out" / "train.jsonl") + read_jsonl(
        tmp_path / "out" / "validation.jsonl"
    )
    assert manifest["format"] == "conversational" and manifest["conversational"] is True
    assert sorted(r["messages"][1]["content"] for r in records) == ["Hello", "Hey"]


def test_max_records_caps_the_prepared_data(tmp_path):
    source = write_demo_dataset(tmp_path / "demo.jsonl", n=60)
    manifest = prepare(source, tmp_path / "out", max_records=20, validation_fraction=0.25)
    counts = manifest["counts"]
    assert counts["train"] + counts["validation"] == 20 and counts["validation"] > 0


def test_max_record_tokens_passes_a_record_at_the_limit_and_fails_one_over_it(tmp_path):
    records = [{"prompt": f"What is {k} + 1?", "completion": f"{k + 1}"} for k in range(5)]
    records.insert(2, {"prompt": "Tell a story.", "completion": "Once upon a time " * 20})
    source = write_jsonl(tmp_path / "raw" / "long.jsonl", records)
    # The longest record's length as the manifest measures it (every record is kept).
    longest = max(stats["max"] for stats in
                  prepare(source, tmp_path / "unlimited")["token_lengths"].values())

    manifest = prepare(source, tmp_path / "at-limit", max_record_tokens=longest)
    assert manifest["max_record_tokens"] == longest
    assert manifest["counts"]["train"] + manifest["counts"]["validation"] == len(records)

    with pytest.raises(StageError) as caught:
        prepare(source, tmp_path / "over", max_record_tokens=longest - 1)
    message = str(caught.value)
    assert message.startswith(
        f"{source}:3: record is {longest} tokens long (tokenizer builtin:tiny), over "
        f"max_record_tokens {longest - 1};"), message
    assert "raise --max-record-tokens" in message and "shorten or split" in message
    assert "\n" not in message
    # Nothing written, and no staging folder left beside it.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["at-limit", "raw", "unlimited"]

    with pytest.raises(StageError, match="max_record_tokens must be at least 1"):
        data_prep.DataPrepConfig(input_dir="in", output_dir="out", max_record_tokens=0)


def test_fewer_than_two_unique_records_cannot_be_split(tmp_path):
    source = write_jsonl(tmp_path / "one.jsonl", [{"text": "same"}, {"text": "same"}])
    with pytest.raises(StageError, match="at least 2"):
        prepare(source, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_records_of_one_prompt_only_cannot_be_split(tmp_path):
    pairs = [{"prompt": "Sky colour?", "chosen": "Blue.", "rejected": answer}
             for answer in ("Green.", "Red.", "Pink.")]
    with pytest.raises(StageError, match=r"the 3 unique records all answer one prompt; a split by "
                       r"prompt needs at least 2"):
        prepare(write_jsonl(tmp_path / "pairs.jsonl", pairs), tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --- Held out by prompt ---------------------------------------------------------------------------


def _prompts(path: Path, field: str = "prompt") -> set[str]:
    return {" ".join(record[field].casefold().split()) for record in read_jsonl(path)}


def test_every_record_of_a_prompt_is_on_the_same_side(tmp_path):
    # Three pairs a prompt, spread through the file: a split by record would scatter them.
    pairs = [{"prompt": f"Name a colour, {k}.", "chosen": f"Blue {j}.", "rejected": f"No {j}."}
             for j in range(3) for k in range(40)]
    manifest = prepare(write_jsonl(tmp_path / "pairs.jsonl", pairs), tmp_path / "out")

    train, validation = (_prompts(tmp_path / "out" / f"{split}.jsonl")
                         for split in ("train", "validation"))
    assert train and validation and not train & validation
    counts = manifest["counts"]
    assert (counts["train_prompts"], counts["validation_prompts"]) == (len(train), len(validation))
    assert (counts["train"], counts["validation"]) == (3 * len(train), 3 * len(validation))
    assert counts["prompts_moved"] == 0


def test_no_demo_dataset_trains_on_a_prompt_another_one_holds_out(tmp_path):
    """The recipe's DataPrep steps run apart, with the same settings: the demo SFT records, the
    demo preference pairs (most of whose prompts are SFT prompts too), the constitutional AI
    prompts and the text corpus. No validation prompt of one is in another's training split."""
    raw = {
        "sft": write_demo_dataset(tmp_path / "raw" / "sft.jsonl"),
        "preferences": write_demo_preferences(tmp_path / "raw" / "preferences.jsonl"),
        "prompts": write_demo_constitutional_prompts(tmp_path / "raw" / "prompts.jsonl"),
        "corpus": write_demo_corpus(tmp_path / "raw" / "corpus.jsonl", max_documents=60),
    }
    splits, manifests = {}, {}
    for name, path in raw.items():
        manifests[name] = prepare(path, tmp_path / name, validation_fraction=0.1, seed=42)
        field = "text" if name == "corpus" else "prompt"
        splits[name] = {split: _prompts(tmp_path / name / f"{split}.jsonl", field)
                        for split in ("train", "validation")}
    shared = (splits["sft"]["train"] | splits["sft"]["validation"]) & (
        splits["preferences"]["train"] | splits["preferences"]["validation"])
    assert len(shared) > 100  # the overlap the split must respect

    for held_out_of, held_out in splits.items():
        assert held_out["validation"], held_out_of
        for trained_in, trained in splits.items():
            leaked = held_out["validation"] & trained["train"]
            assert not leaked, f"{held_out_of} holds out {len(leaked)} prompts {trained_in} trains on"
    for name, manifest in manifests.items():
        counts = manifest["counts"]
        assert counts["train_prompts"] == len(splits[name]["train"])
        assert counts["validation_prompts"] == len(splits[name]["validation"])
        assert counts["prompts_moved"] == 0
    assert manifests["sft"]["counts"]["duplicates_removed"] == 8


def test_a_split_that_leaves_a_side_empty_moves_one_prompt_and_says_so(tmp_path, capsys):
    records = [{"prompt": f"What is {k} + 1?", "completion": f"{k + 1}"} for k in range(4)]
    manifest = prepare(write_jsonl(tmp_path / "few.jsonl", records), tmp_path / "out",
                       validation_fraction=0.01)

    assert (manifest["counts"]["validation_prompts"], manifest["counts"]["prompts_moved"]) == (1, 1)
    assert "warning: validation_fraction 0.01 put all 4 prompts on one side" in capsys.readouterr().out


def test_validation_fraction_outside_zero_one_names_the_parameter():
    with pytest.raises(StageError, match=r"validation_fraction must be in \(0, 1\), got 1.5"):
        data_prep.DataPrepConfig(input_dir="in", output_dir="out", validation_fraction=1.5)


BAD_DATA = {
    "truncated.jsonl": (b'{"text": "ok"}\n{"text": "cut', "truncated.jsonl:2: not valid JSON"),
    "types.jsonl": (
        b'{"text": "ok"}\n{"text": 42}\n',
        "types.jsonl:2: field 'text': expected a string",
    ),
    "missing.jsonl": (
        b'{"prompt": "a", "completion": "b"}\n{"prompt": "c"}\n',
        "missing.jsonl:2: field 'completion': missing",
    ),
    "empty.jsonl": (b"", "empty.jsonl: file is empty"),
    "latin1.jsonl": (b'{"text": "ok"}\n{"text": "na\xefve"}\n', "latin1.jsonl:2: not valid UTF-8"),
    "role.jsonl": (
        json.dumps(
            {"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}]}
        ).encode(),
        "role.jsonl:1: field 'messages[1].role': unknown role 'bot'",
    ),
    "pair.jsonl": (
        (
            b'{"prompt": "p", "chosen": "a", "rejected": "b"}\n'
            b'{"prompt": "p", "chosen": "c", "rejected": "c"}\n'
        ),
        "pair.jsonl:2: fields 'chosen' and 'rejected' are identical",
    ),
    "cells.csv": (
        (
            b'messages\n"[{""role"": ""user"", ""content"": ""hi""}, '
            b'{""role"": ""assistant"", ""content"": ""yo""}]"\n'
            b'"[{""role"": ""user"""\n'
        ),
        "cells.csv:3: field 'messages': not valid JSON",
    ),
}


@pytest.mark.parametrize("name", list(BAD_DATA))
def test_bad_data_fails_naming_file_line_and_field_and_writes_nothing(tmp_path, name):
    content, expected = BAD_DATA[name]
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / name).write_bytes(content)

    with pytest.raises(StageError) as caught:
        prepare(tmp_path / "raw", tmp_path / "out")

    assert expected in str(caught.value)
    # No output folder, and no staging folder left beside it.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]


def test_the_entry_point_exits_2_with_the_error_as_last_line_and_an_empty_output_folder(tmp_path):
    (tmp_path / "raw.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    (tmp_path / "out").mkdir()  # as SageMaker provides it

    done = run_as_program(
        "steps.data_prep", tmp_path / "program", "--input-dir", str(tmp_path / "raw.jsonl"),
        "--output-dir", str(tmp_path / "out"),
        env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HOME": str(tmp_path),
             "SM_OUTPUT_DIR": str(tmp_path / "output")},  # the local stand-in for /opt/ml/output
    )

    assert done.status == 2, done.stderr
    last_line = done.stderr.strip().splitlines()[-1]
    assert last_line.startswith("ERROR: ")
    assert "raw.jsonl:1: field 'messages': no assistant message" in last_line
    assert list((tmp_path / "out").iterdir()) == []
    # Where SageMaker reads a processing job's ExitMessage.
    assert (tmp_path / "output" / "message").read_text() == last_line


def test_token_lengths_count_the_chat_template_that_training_applies(tmp_path):
    from steps.common.models import load_tokenizer

    record = {"prompt": "What is 2 + 2?", "completion": "2 + 2 = 4."}
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "d.jsonl").write_text(json.dumps(record) + "\n" + json.dumps(record | {
        "prompt": "What is 3 + 3?", "completion": "3 + 3 = 6."}) + "\n")
    manifest = prepare(tmp_path / "raw", tmp_path / "out")
    tokenizer = load_tokenizer("builtin:tiny")
    templated = tokenizer.apply_chat_template(
        [{"role": "user", "content": record["prompt"]},
         {"role": "assistant", "content": record["completion"]}], tokenize=False)
    expected = len(tokenizer(templated, add_special_tokens=False)["input_ids"])
    lengths = [manifest["token_lengths"][split]["max"] for split in ("train", "validation")]
    assert expected in lengths
    assert expected > len(tokenizer(record["prompt"] + record["completion"])["input_ids"])


PROMPTS = [{"prompt": f"What is the capital of {country}?"}
           for country in ("Peru", "Chile", "Kenya", "Japan", "Peru", "Egypt")]


def test_prompt_only_records_are_prepared_with_prompt_token_lengths(tmp_path):
    # TRL's format for online methods: {"prompt": ...} and nothing to learn from.
    from steps.common.models import load_tokenizer

    source = write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)

    manifest = prepare(source, tmp_path / "out", validation_fraction=0.2)

    assert (manifest["format"], manifest["conversational"]) == ("prompt_only", False)
    splits = {name: read_jsonl(tmp_path / "out" / f"{name}.jsonl")
              for name in ("train", "validation")}
    counts = manifest["counts"]
    assert (counts["records_read"], counts["duplicates_removed"]) == (6, 1)
    assert counts["train"] == counts["train_prompts"] == len(splits["train"]) >= 1
    assert counts["validation"] == counts["validation_prompts"] == len(splits["validation"]) >= 1
    written = splits["train"] + splits["validation"]
    assert sorted(r["prompt"] for r in written) == sorted({r["prompt"] for r in PROMPTS})
    # Measured as a policy is prompted: a user turn and the generation prompt.
    tokenizer = load_tokenizer("builtin:tiny")

    def prompted_length(record: dict) -> int:
        text = tokenizer.apply_chat_template([{"role": "user", "content": record["prompt"]}],
                                             tokenize=False, add_generation_prompt=True)
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    for name, records in splits.items():
        lengths = [prompted_length(r) for r in records]
        stats = manifest["token_lengths"][name]
        assert (stats["min"], stats["max"]) == (min(lengths), max(lengths))
        assert stats["min"] > min(len(r["prompt"]) for r in records)  # the template counts


def test_conversational_prompts_have_their_roles_checked(tmp_path):
    good = {"prompt": [{"role": "user", "content": "Hi"}]}
    bad = {"prompt": [{"role": "user", "content": "Hi"}, {"role": "narrator", "content": "..."}]}
    source = write_jsonl(tmp_path / "raw" / "chat.jsonl", [good, bad])

    with pytest.raises(StageError, match=r"chat.jsonl:2: field 'prompt\[1\].role': unknown role"):
        prepare(source, tmp_path / "out")
    assert not (tmp_path / "out").exists()

    write_jsonl(source, [good, {"prompt": [{"role": "user", "content": "Bye"}]}])
    manifest = prepare(source, tmp_path / "out")
    assert (manifest["format"], manifest["conversational"]) == ("prompt_only", True)


def test_prepared_prompts_feed_ppo_and_constitutional_ai_and_sft_refuses_them(tmp_path, capsys):
    from steps import sft
    from steps.common import contract
    from steps.common.datasets import read_prompts
    from steps.common.preference import load_prompts

    from .conftest import TrainingJob

    prepare(write_jsonl(tmp_path / "prompts.jsonl", PROMPTS), tmp_path / "prepared",
            validation_fraction=0.2)
    expected = sorted({r["prompt"] for r in PROMPTS})

    # The whole output folder: train.jsonl and validation.jsonl, and manifest.json left alone.
    ppo_prompts = load_prompts(tmp_path / "prepared", chat_template=True)
    data_format, cai_prompts = read_prompts(tmp_path / "prepared")

    assert sorted(p[0]["content"] for p in ppo_prompts) == expected
    assert sorted(cai_prompts) == expected and data_format.name == "prompt_only"

    with pytest.MonkeyPatch.context() as monkeypatch:
        job = TrainingJob(tmp_path / "opt-ml", monkeypatch)
        monkeypatch.setenv("SM_CHANNEL_TRAIN", str(tmp_path / "prepared"))
        job.hyperparameters(base_model="builtin:tiny", max_steps="1")
        with pytest.raises(SystemExit) as exited:
            contract.run(sft.main, sft.SFTStageConfig, job="training")
    assert exited.value.code == 2
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "is prompt-only records" in last_line and "this stage needs responses" in last_line

"""Reading TRL dataset formats from every supported file type, and what bad records are told."""

import csv
import json
from pathlib import Path

import pandas as pd
import pytest

from steps.common.contract import StageError
from steps.common.datasets import (
    Record,
    data_files,
    load_records,
    prompt_key,
    read_prompts,
    read_records,
    sft_example,
    validate_records,
)

USER_ASSISTANT = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]

# Two records of each TRL format (https://huggingface.co/docs/trl/dataset_formats).
FORMATS = {
    "language_modeling": [{"text": "The sky is blue."}, {"text": "Grass is green."}],
    "conversational": [
        {"messages": USER_ASSISTANT},
        {"messages": [{"role": "system", "content": "Be brief."}, *USER_ASSISTANT]},
    ],
    "prompt_completion": [
        {"prompt": "2 + 2 =", "completion": " 4"},
        {"prompt": "3 + 3 =", "completion": " 6"},
    ],
    "prompt_completion/conversational": [
        {"prompt": [USER_ASSISTANT[0]], "completion": [USER_ASSISTANT[1]]},
        {
            "prompt": [{"role": "user", "content": "Bye"}],
            "completion": [{"role": "assistant", "content": "See you."}],
        },
    ],
    "preference": [
        {"prompt": "Sky colour?", "chosen": "Blue.", "rejected": "Green."},
        {"prompt": "Grass colour?", "chosen": "Green.", "rejected": "Blue."},
    ],
    "preference/implicit-conversational": [
        {
            "chosen": USER_ASSISTANT,
            "rejected": [USER_ASSISTANT[0], {"role": "assistant", "content": "Go."}],
        },
        {
            "chosen": [USER_ASSISTANT[0], {"role": "assistant", "content": "Hey."}],
            "rejected": USER_ASSISTANT,
        },
    ],
    "unpaired_preference": [
        {"prompt": "Sky colour?", "completion": "Blue.", "label": True},
        {"prompt": "Sky colour?", "completion": "Green.", "label": False},
    ],
    # What online methods (PPO, constitutional AI) answer themselves.
    "prompt_only": [{"prompt": "Sky colour?"}, {"prompt": "Grass colour?"}],
    "prompt_only/conversational": [
        {"prompt": [USER_ASSISTANT[0]]},
        {"prompt": [{"role": "system", "content": "Be brief."}, USER_ASSISTANT[0]]},
    ],
}


def write(path: Path, records: list[dict]) -> Path:
    """Write `records` in the file type `path` names, the way people usually store such data."""
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    elif path.suffix == ".json":
        path.write_text(json.dumps(records, indent=2))
    elif path.suffix == ".csv":  # message lists as JSON cells, labels as true/false
        with open(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(records[0]))
            writer.writeheader()
            for r in records:
                writer.writerow(
                    {
                        k: json.dumps(v)
                        if isinstance(v, list)
                        else str(v).lower()
                        if isinstance(v, bool)
                        else v
                        for k, v in r.items()
                    }
                )
    else:
        pd.DataFrame(records).to_parquet(path)
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
@pytest.mark.parametrize("name", list(FORMATS))
def test_every_format_reads_back_from_every_file_type(tmp_path, name, suffix):
    records = FORMATS[name]
    path = write(tmp_path / f"data{suffix}", records)

    fmt, read = load_records(path)

    assert fmt.name == name.split("/")[0]
    assert fmt.conversational == ("conversational" in name)
    assert [r.data for r in read] == records


def test_a_folder_reads_its_files_in_sorted_order_and_skips_other_files(tmp_path, capsys):
    write(tmp_path / "b.jsonl", FORMATS["language_modeling"][1:])
    write(tmp_path / "a.json", FORMATS["language_modeling"][:1])
    (tmp_path / "notes.txt").write_text("not data")
    (tmp_path / ".hidden.jsonl").write_text("{broken")

    _, records = load_records(tmp_path)

    assert [r.data for r in records] == FORMATS["language_modeling"]
    warning = capsys.readouterr().out
    assert "ignoring" in warning and "notes.txt" in warning


def test_a_data_preparation_output_folder_reads_its_splits_and_not_its_manifest(tmp_path, capsys):
    write(tmp_path / "train.jsonl", FORMATS["prompt_only"][:1])
    write(tmp_path / "validation.jsonl", FORMATS["prompt_only"][1:])
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "prompt_only", "counts": {}}))

    fmt, records = load_records(tmp_path)

    assert fmt.name == "prompt_only"
    assert [r.data for r in records] == FORMATS["prompt_only"]
    assert [p.name for p in data_files(tmp_path)] == ["train.jsonl", "validation.jsonl"]
    assert "manifest.json: a stage's manifest, not data" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["prompt_only", "prompt_only/conversational"])
def test_prompt_only_records_give_a_stage_that_needs_responses_a_one_line_error(tmp_path, name):
    fmt, records = load_records(write(tmp_path / "prompts.jsonl", FORMATS[name]))

    with pytest.raises(StageError) as caught:
        sft_example(records[0].data, fmt, chat_template=True)

    message = str(caught.value)
    assert "is prompt-only records" in message and "this stage needs responses" in message
    assert "\n" not in message


def test_one_request_has_one_prompt_key_in_every_format_it_can_be_written_in():
    question, answer = "What is the capital of Peru?", "Lima."
    user = {"role": "user", "content": question}
    written = {  # format name -> a record asking `question`
        "prompt_completion": {"prompt": question, "completion": answer},
        "prompt_completion/conversational": {
            "prompt": [user], "completion": [{"role": "assistant", "content": answer}]},
        "prompt_only": {"prompt": "  what is the CAPITAL of Peru?\n"},  # spacing and capitals
        "conversational": {"messages": [{"role": "system", "content": "Be brief."}, user,
                                        {"role": "assistant", "content": answer}]},
        "preference": {"prompt": question, "chosen": answer, "rejected": "Quito."},
        "preference/implicit-conversational": {
            "chosen": [user, {"role": "assistant", "content": answer}],
            "rejected": [user, {"role": "assistant", "content": "Quito."}]},
        "unpaired_preference": {"prompt": question, "completion": answer, "label": True},
    }
    keys = {}
    for name, data in written.items():
        fmt = validate_records([Record(data, name)])
        keys[name] = prompt_key(data, fmt)

    assert set(keys.values()) == {"user: what is the capital of peru?"}, keys
    other = {"prompt": "What is the capital of Chile?", "completion": answer}
    assert prompt_key(other, validate_records([Record(other, "x")])) not in keys.values()
    # A document answers no prompt: its text is its key.
    text = {"text": "The sky is blue."}
    assert prompt_key(text, validate_records([Record(text, "x")])) == "user: the sky is blue."


def test_a_folder_without_data_files_is_an_error(tmp_path):
    (tmp_path / "notes.txt").write_text("not data")
    with pytest.raises(StageError, match="holds no data files"):
        data_files(tmp_path)


def problem(tmp_path: Path, name: str, content: str | bytes) -> str:
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(StageError) as caught:
        validate_records(read_records(path))
    return str(caught.value)


GOOD = json.dumps({"messages": USER_ASSISTANT})


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("t.jsonl", GOOD + '\n{"messages": [{"role": "user", "con', "t.jsonl:2: not valid JSON"),
        (
            "t.jsonl",
            '{"text": "a"}\n\n{"text": 5}\n',
            "t.jsonl:3: field 'text': expected a string, got a number",
        ),
        (
            "t.jsonl",
            GOOD + "\n" + json.dumps({"messages": "hi"}),
            "t.jsonl:2: field 'messages': expected a list",
        ),
        (
            "t.jsonl",
            '{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n',
            "t.jsonl:2: field 'completion': missing",
        ),
        ("t.jsonl", "", "t.jsonl: file is empty"),
        ("t.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n', "t.jsonl:2: not valid UTF-8"),
        (
            "t.jsonl",
            json.dumps({"messages": [USER_ASSISTANT[0], {"role": "bot", "content": "x"}]}),
            "field 'messages[1].role': unknown role 'bot' (expected system, user, assistant, tool)",
        ),
        (
            "t.jsonl",
            json.dumps({"messages": [USER_ASSISTANT[0]]}),
            "t.jsonl:1: field 'messages': no assistant",
        ),
        ("t.jsonl", '{"text": "a"}\n{"text": "  "}\n', "t.jsonl:2: field 'text': empty string"),
        (
            "t.jsonl",
            json.dumps({"prompt": "p", "chosen": "same", "rejected": "same"}),
            "t.jsonl:1: fields 'chosen' and 'rejected' are identical",
        ),
        (
            "t.jsonl",
            '{"prompt": "p", "completion": "c", "label": "yes"}',
            "field 'label': expected true or false",
        ),
        (
            "t.json",
            '[{"text": "a"}, {"text": ["a"]}]',
            "t.json: record 2: field 'text': expected a string",
        ),
        ("t.json", '[{"text": "a"},\n {"text": "b"', "t.json:2: not valid JSON"),
        (
            "t.csv",
            'messages\n"[{""role"": ""user""}]"\n"[{""role"": ""user"", ""content"""\n',
            "t.csv:3: field 'messages': not valid JSON",
        ),
        ("t.csv", "prompt,completion\na,b\nc\n", "t.csv:3: 1 cells but the header has 2 columns"),
        ('t.jsonl', '{"prompt": "a"}\n{"prompt": " "}\n', "t.jsonl:2: field 'prompt': empty string"),
        (
            "t.jsonl",
            '{"prompt": "a"}\n{"prompt": [{"role": "user", "content": "b"}]}\n',
            "t.jsonl:2: field 'prompt': expected a string like the first record's, got a list",
        ),
        (
            "t.jsonl",
            json.dumps({"prompt": [{"role": "human", "content": "Hi"}]}),
            "t.jsonl:1: field 'prompt[0].role': unknown role 'human'",
        ),
        (
            "t.jsonl",
            json.dumps({"prompt": [USER_ASSISTANT[0], {"role": "system", "content": "Be brief."}]}),
            "t.jsonl:1: field 'prompt[1].role': a prompt must end with a user, tool or assistant",
        ),
        (
            "t.jsonl",
            '{"prompt": "a"}\n{"prompt": "b", "completion": "c"}\n',
            "t.jsonl:2: field 'completion': unexpected",
        ),
        # Half a pair is not taken for prompts.
        ("t.jsonl", '{"prompt": "a", "chosen": "b"}', "cannot tell the dataset format"),
    ],
)
def test_bad_records_are_reported_with_file_line_and_field(tmp_path, name, content, expected):
    assert expected in problem(tmp_path, name, content)


def test_the_first_problem_is_reported_with_a_count_of_the_others(tmp_path):
    message = problem(
        tmp_path, "t.jsonl", '{"text": "a"}\n{"text": ""}\n{"text": 1}\n{"text": null}\n'
    )
    assert "t.jsonl:2: field 'text': empty string" in message
    assert "(2 more records have problems)" in message


def test_a_parquet_row_is_located_by_its_index(tmp_path):
    path = tmp_path / "t.parquet"
    pd.DataFrame([{"text": "a"}, {"text": None}]).to_parquet(path)
    with pytest.raises(
        StageError, match=r"t.parquet: row 1: field 'text': expected a string, got null"
    ):
        validate_records(read_records(path))


# --- Prompts, for the stages that write their own answers ----------------------------------------


@pytest.mark.parametrize(("record", "prompt"), [
    ({"prompt": "Hi?"}, "Hi?"),
    ({"prompt": "Hi?", "completion": "Hello."}, "Hi?"),
    ({"prompt": "Hi?", "completion": "Hello.", "label": True}, "Hi?"),
    ({"prompt": "Hi?", "chosen": "Hello.", "rejected": "Go away."}, "Hi?"),
    ({"chosen": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}],
      "rejected": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "No."}]},
     [{"role": "user", "content": "Hi?"}]),
    ({"messages": [{"role": "user", "content": "Hi?"}]}, [{"role": "user", "content": "Hi?"}]),
    ({"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Yo."}]},
     [{"role": "user", "content": "Hi?"}]),
])
def test_prompts_come_from_every_format_that_has_them(tmp_path, record, prompt):
    path = write(tmp_path / "data.jsonl", [record, record])

    _, prompts = read_prompts(path)

    assert prompts == [prompt, prompt]


@pytest.mark.parametrize(("records", "message"), [
    ([{"text": "Once upon a time."}], r"data.jsonl:1: 'text' records have no prompt to answer"),
    ([{"chosen": "Yes.", "rejected": "No."}],
     r"data.jsonl:1: 'chosen' and 'rejected' share no prompt"),
    ([{"prompt": "Hi?"}, {"question": "Hi?"}], r"data.jsonl:2: field 'prompt': missing"),
    ([{"prompt": "Hi?"}, {"prompt": "  "}], r"data.jsonl:2: field 'prompt': empty string"),
    ([{"prompt": "Hi?"}, {"prompt": [{"role": "user", "content": "Hi?"}]}],
     r"data.jsonl:2: field 'prompt': expected a string like the first record's, got a list"),
    ([{"messages": [{"role": "user", "content": "Hi?"}]},
      {"messages": [{"role": "user", "content": "Hi?"}, {"role": "system", "content": "X"}]}],
     r"data.jsonl:2: field 'messages\[1\].role': a prompt must end with a user, tool or assistant"),
    ([{"messages": "Hi?"}], r"data.jsonl:1: field 'messages': expected a list of messages"),
    ([{"messages": [{"role": "assistant", "content": "Hello."}]}],
     r"data.jsonl:1: field 'messages': only an assistant turn"),
    ([{"prompt": "Hi?", "chosen": "Same.", "rejected": "Same."}],
     r"data.jsonl:1: fields 'chosen' and 'rejected' are identical"),
])
def test_records_without_a_usable_prompt_fail_in_one_line(tmp_path, records, message):
    path = write(tmp_path / "data.jsonl", records)

    with pytest.raises(StageError, match=message) as raised:
        read_prompts(path)

    assert "\n" not in str(raised.value)

"""The shipped demo dataset: deterministic, valid, with short answers and a few exact duplicates;
and its prompts without answers, none of them one of its prompts."""

import json

from steps.common.datasets import load_records
from steps.common.demo_data import (
    demo_records,
    demo_task_prompts,
    demo_task_records,
    write_demo_dataset,
    write_demo_task_prompts,
)


def test_the_demo_dataset_is_deterministic_valid_and_has_a_few_duplicates(tmp_path):
    path = write_demo_dataset(tmp_path / "demo.jsonl", n=400, seed=0)

    fmt, records = load_records(path)
    distinct = {json.dumps(r.data, sort_keys=True) for r in records}

    assert (fmt.name, fmt.conversational, len(records)) == ("prompt_completion", False, 400)
    assert 0 < len(records) - len(distinct) <= 10
    assert [r.data for r in records] == demo_records(400, seed=0)
    assert demo_records(400, seed=1) != demo_records(400, seed=0)
    # Short answers keep evaluation's generation cheap.
    assert max(len(r.data["completion"]) for r in records) < 60


def test_a_small_demo_dataset_has_the_records_asked_for_and_at_most_half_repeated():
    for n in (1, 2, 5, 8):
        records = demo_records(n, seed=0)
        distinct = {json.dumps(r, sort_keys=True) for r in records}
        assert len(records) == n and len(distinct) >= (n + 1) // 2


def test_the_demo_prompts_without_answers_are_distinct_prompt_only_and_none_is_labelled(tmp_path):
    path = write_demo_task_prompts(tmp_path / "prompts.jsonl")

    fmt, records = load_records(path)
    prompts = [" ".join(r.data["prompt"].casefold().split()) for r in records]
    labelled = {" ".join(r["prompt"].casefold().split()) for r in demo_records()}

    assert (fmt.name, len(records)) == ("prompt_only", 640)
    assert len(set(prompts)) == 640 and not set(prompts) & labelled
    assert [r.data for r in records] == demo_task_prompts()
    # The tasks with prompts left to draw: sums, conversions, capital letters.
    assert sum("+" in p or p.startswith("add") for p in prompts) > 100


def test_the_demo_task_records_answer_the_unlabelled_prompts_rightly_and_none_is_labelled():
    records = demo_task_records(200, seed=2)
    labelled = {" ".join(r["prompt"].casefold().split()) for r in demo_records()}

    assert len(records) == 200 and all(set(r) == {"prompt", "completion"} for r in records)
    assert not {" ".join(r["prompt"].casefold().split()) for r in records} & labelled
    # The same draw as the prompt pool, answers kept: a held-out set of the task's own answers.
    assert [{"prompt": r["prompt"]} for r in demo_task_records()] == demo_task_prompts()
    for record in records:
        if record["prompt"].startswith("What is ") and "+" in record["prompt"]:
            a, b = record["prompt"].removeprefix("What is ").removesuffix("?").split(" + ")
            assert record["completion"] == f"{a} + {b} = {int(a) + int(b)}."

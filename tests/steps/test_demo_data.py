"""The shipped demo dataset: deterministic, valid, with short answers and a few exact duplicates."""

import json

from steps.common.datasets import load_records
from steps.common.demo_data import demo_records, write_demo_dataset


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

"""How a model was made travels with it, and evaluation turns that and its metrics into a report
(Markdown and HTML, with the plots as PNG files) and a model card."""

from __future__ import annotations

import json
import math
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image

from steps import evaluate
from steps.common import report
from steps.common.training import read_lineage

from .conftest import counting_records, write_jsonl
from .stage_runs import StageRun, run_stage, sft_job

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
DESCRIPTION = "Counts letters when asked to count."
STEPS = {"checkpoint_steps": "0", "logging_steps": "1", "lora_dropout": "0.0"}


@dataclass
class TwoStages:
    first: StageRun
    second: StageRun
    evaluation: dict
    output_dir: Path


def packed(model_dir: Path, folder: Path) -> Path:
    """`model_dir` as SageMaker hands it to the next job: a folder holding model.tar.gz."""
    folder.mkdir(parents=True)
    with tarfile.open(folder / "model.tar.gz", "w:gz") as archive:
        for path in sorted(model_dir.iterdir()):
            archive.add(path, arcname=path.name)
    return folder


@pytest.fixture(scope="module")
def two_stages(tmp_path_factory: pytest.TempPathFactory) -> TwoStages:
    """Full SFT of builtin:tiny (3 steps), LoRA SFT from its model.tar.gz (2 steps), evaluated."""
    root = tmp_path_factory.mktemp("report")
    with sft_job(root / "sft-1", counting_records(16), base_model="builtin:tiny",
                 peft_method="none", max_steps=3, learning_rate=1e-3, **STEPS) as job:
        job.channel("validation", counting_records(4))
        first = run_stage(job)
    with sft_job(root / "sft-2", counting_records(16), peft_method="lora", lora_r=4, lora_alpha=8,
                 max_steps=2, learning_rate=1e-2, **STEPS) as job:
        job.monkeypatch.setenv("SM_CHANNEL_MODEL", str(packed(first.model_dir, root / "channel")))
        second = run_stage(job)

    data_dir = root / "data"
    write_jsonl(data_dir / "validation.jsonl", counting_records(6))
    output_dir = root / "evaluation"
    evaluate.main(evaluate.EvaluateConfig(
        model_dir=str(packed(second.model_dir, root / "evaluated")), data_dir=str(data_dir),
        output_dir=str(output_dir), max_new_tokens=4, max_samples=3, batch_size=4,
        description=DESCRIPTION,
    ))
    evaluation = json.loads((output_dir / "evaluation.json").read_text())
    return TwoStages(first, second, evaluation, output_dir)


def test_a_model_carries_its_metric_history_and_the_lineage_of_every_stage_before_it(two_stages):
    first, second = two_stages.first, two_stages.second

    history = [json.loads(line)
               for line in (second.model_dir / "training_metrics.jsonl").read_text().splitlines()]
    assert history == second.metrics  # the stage's metrics.jsonl, now inside the model
    lineage = json.loads((second.model_dir / "lineage.json").read_text())
    assert [stage["stage"] for stage in lineage] == ["sft", "sft"]
    assert [stage["summary"]["peft_method"] for stage in lineage] == ["none", "lora"]
    assert lineage[0]["base_model"] == "builtin:tiny"
    assert lineage[0]["metrics"] == first.metrics
    assert lineage[1]["metrics"] == second.metrics
    assert lineage[1]["summary"] == second.summary
    # No weights: a few kB of history and summaries.
    assert (second.model_dir / "lineage.json").stat().st_size < 50_000


def test_evaluation_writes_the_report_the_model_card_and_the_plots_as_images(two_stages):
    out = two_stages.output_dir

    for name in ("report.md", "report.html", "model_card.md"):
        assert (out / name).read_text().strip(), name
    for name in ("loss_curves.png", "metrics_comparison.png"):
        assert (out / name).read_bytes().startswith(PNG_SIGNATURE), name
        with Image.open(out / name) as image:
            image.verify()
            assert image.format == "PNG" and min(image.size) > 100, name
    markdown = (out / "report.md").read_text()
    assert "](loss_curves.png)" in markdown and "](metrics_comparison.png)" in markdown
    # The HTML stands alone: both images inside it, nothing linked beside it.
    page = (out / "report.html").read_text()
    assert len(re.findall(r'<img src="data:image/png;base64,', page)) == 2
    assert not re.search(r'<img src="(?!data:)', page)


def test_the_loss_plot_draws_one_line_per_training_stage_in_order(two_stages, tmp_path):
    lineage = read_lineage(two_stages.second.model_dir)

    drawn, notes = report.plot_lineage(lineage, tmp_path / "loss_curves.png")

    assert list(drawn) == ["1. sft", "2. sft"] and notes == []
    first, second = drawn["1. sft"]["train_loss"], drawn["2. sft"]["train_loss"]
    assert len(first) == 3 and len(second) == 2  # a line a logged step (logging_steps=1)
    assert drawn["1. sft"]["eval_loss"]  # the first stage had validation data
    assert min(x for x, _ in second) > max(x for x, _ in first)  # the second follows the first


def test_the_report_lists_every_metric_of_evaluation_json_with_its_base_value(two_stages):
    markdown = (two_stages.output_dir / "report.md").read_text()
    metrics_section = markdown.split("## Metrics")[1].split("## ")[0]
    rows = {cells[0].replace("\\_", "_"): cells
            for line in metrics_section.splitlines() if line.startswith("| ")
            for cells in [[cell.strip() for cell in line.strip("|").split(" | ")]]}

    metrics = two_stages.evaluation["metrics"]
    for name in metrics:
        assert name.removeprefix("base_") in rows, name
    eval_loss = rows["eval_loss"]
    assert eval_loss[1].startswith(f"{metrics['eval_loss']['value']:.4g}")
    assert eval_loss[2].startswith(f"{metrics['base_eval_loss']['value']:.4g}")
    delta = metrics["eval_loss"]["value"] - metrics["base_eval_loss"]["value"]
    assert eval_loss[3] == f"{delta:.4g}"
    assert "Chat template:" in markdown and "eos_rate" in markdown
    assert markdown.count("### Sample ") == len(two_stages.evaluation["samples"])


def test_the_model_card_says_what_the_model_is_for_how_it_was_made_and_how_it_was_measured(
    two_stages,
):
    card = (two_stages.output_dir / "model_card.md").read_text()
    evaluation = two_stages.evaluation

    assert DESCRIPTION in card
    assert "### Stage 1: sft" in card and "### Stage 2: sft" in card
    assert card.index("### Stage 1: sft") < card.index("### Stage 2: sft")
    assert "full fine-tuning" in card and "`lora`" in card
    assert "Started from: `builtin:tiny`" in card and "the model of stage 1 (sft)" in card
    assert "16 training examples" in card and "3 optimizer steps" in card
    assert f"{evaluation['num_samples']} held-out prompts" in card
    for section in ("## Evaluation", "## Intended use and limitations", "## How to load it"):
        assert section in card
    rate = evaluation["checks"]["eos_rate"]
    assert ("may not stop" in card) == (rate < 1)


def test_a_stage_without_a_metric_history_still_gets_a_report_with_a_note(two_stages, tmp_path):
    lineage = read_lineage(two_stages.second.model_dir)
    lineage[0]["metrics"] = []  # as a model saved before histories travelled with it

    written = report.write_report(tmp_path, two_stages.evaluation, lineage, model="model",
                                  data="data", adapter=True)

    assert "loss_curves.png" in written
    drawn, _ = report.plot_lineage(lineage, tmp_path / "again.png")
    assert list(drawn) == ["2. sft"]
    assert "Stage 1 (sft) recorded no metric history" in (tmp_path / "report.md").read_text()
    assert "Metric history: not recorded" in (tmp_path / "model_card.md").read_text()


def test_a_model_with_no_training_record_gets_a_report_without_loss_curves(two_stages, tmp_path):
    written = report.write_report(tmp_path, two_stages.evaluation, [], model="model",
                                  data="data")

    assert written == ["report.md", "report.html", "model_card.md"]
    assert not (tmp_path / "loss_curves.png").exists()
    assert "no loss curves" in (tmp_path / "report.md").read_text()
    assert "how it was made is not known" in (tmp_path / "model_card.md").read_text()


def test_the_report_and_the_card_say_what_each_stage_bought_on_held_out_data(two_stages):
    effects = two_stages.evaluation["stage_effects"]
    first = two_stages.first.summary
    before, after = (math.exp(first["eval_loss_before"]),
                     math.exp(first["training"]["eval_loss"]))
    report_md = (two_stages.output_dir / "report.md").read_text()
    card = (two_stages.output_dir / "model_card.md").read_text()

    assert [effect["stage"] for effect in effects] == ["sft", "sft"]
    assert effects[0]["compared_with"] == "builtin:tiny"
    assert effects[0]["figures"] == [{"name": "perplexity", "before": before, "after": after}]
    assert after < before
    assert effects[1]["figures"] == []  # the second stage had no held-out data to measure on
    row = (f"| sft | builtin:tiny | 4 held-out examples | perplexity | {before:.4g} | "
           f"{after:.4g} | {100 * (after - before) / before:+.1f}% |")
    assert "## What each stage bought" in report_md and row in report_md
    assert "| sft | the model of sft |  | not measured by the stage |  |  |  |" in report_md
    assert "### What each stage bought" in card and row in card

"""The evaluation report and the model card, which steps.evaluate writes beside evaluation.json.

    report.md               the model and its data, the metric table (tuned | base | delta), the
                            checks, the loss curves, the metric bars and the first sample answers
    loss_curves.png         train_loss and eval_loss of every training stage in the model's
                            lineage (steps.common.training.save_training_record), one after another
    metrics_comparison.png  base and tuned bars per metric (steps.evaluate draws it)
    report.html             report.md rendered to HTML (markdown-it-py) as one self-contained
                            file, its images embedded as base64: a report opened from a link (S3,
                            the model package) is a single object, where links to images beside it
                            would not resolve; report.md links them relatively, for a folder view
    model_card.md           what the model is for, how it was made (each stage of its lineage),
                            its evaluation, what each stage bought, intended use and limitations,
                            and how to load it
    students.png            a distilled student's perplexity and ROUGE-L beside its teacher's,
                            its initial student's and a hard-label student's (when the
                            distillation stage compared them)

Both report.md and the card hold the table of what each stage bought (evaluation.json's
stage_effects, `stage_effects`) and, for a distilled student, its comparison with the teacher,
the initial student and a hard-label student.

Every sentence is a fixed caveat or is made from evaluation.json and the lineage. Values from the
data are escaped for Markdown (and so for HTML); sample answers go into fenced code blocks.
"""

from __future__ import annotations

import base64
import html
import math
import re
from pathlib import Path
from typing import Any

from markdown_it import MarkdownIt

from steps.common.metrics import plot_loss_curves

REPORT_MD = "report.md"
REPORT_HTML = "report.html"
MODEL_CARD = "model_card.md"
LOSS_CURVES = "loss_curves.png"
METRICS_COMPARISON = "metrics_comparison.png"

# What each metric of steps.evaluate measures, and which way is better: the card's explanations.
MEANINGS = {
    "eval_loss": "mean token loss on the held-out responses; lower is better",
    "perplexity": "exp(eval_loss); lower is better",
    "bits_per_byte": "the loss per byte of response text, comparable across tokenizers; lower is "
                     "better",
    "rouge_l": "ROUGE-L F1 of the greedy answers against the reference responses; higher is better",
    "exact_match": "fraction of answers equal to the reference (case and spaces normalised); "
                   "higher is better",
    "eos_rate": "fraction of answers that ended with a stop token within the generation limit; "
                "below 1, the model may not stop",
    "rouge_l_delta": "per answer, tuned minus base ROUGE-L; above 0, the tuned answers are closer "
                     "to the references",
    "perplexity_ratio": "base perplexity / tuned perplexity of the same text; above 1, the tuned "
                        "model fits the held-out data better",
    "kl_to_base": "KL(tuned || base) summed over each tuned answer: how far tuning moved the "
                  "model (>= 0)",
    "preference_accuracy": "fraction of held-out pairs where the chosen response is likelier than "
                           "the rejected one; higher is better",
    "logprob_margin": "mean log p(chosen | prompt) - log p(rejected | prompt); higher is better",
    "logprob_margin_delta": "per pair, tuned margin minus base margin; above 0, tuning raised the "
                            "chosen responses",
    "reward_mean": "mean reward-model score of the answers; higher is better",
    "reward_margin": "per prompt, tuned reward minus base reward; above 0, the judge prefers the "
                     "tuned answers",
    "win_rate": "fraction of prompts where the judge scores the tuned answer above the base "
                "answer, ties counting half; above 0.5, the tuned model wins",
    "reward_model_accuracy": "the reward model's own pairwise accuracy on the held-out pairs: how "
                             "far the judge can be trusted",
}
# Per stage in the card: the hyperparameters worth a reader's attention, where the stage has them.
KEY_HYPERPARAMETERS = (
    "epochs", "max_steps", "learning_rate", "lr_scheduler_type", "per_device_batch_size",
    "gradient_accumulation_steps", "max_seq_length", "packing", "lora_r", "lora_alpha",
    "num_virtual_tokens", "beta", "loss_type", "kl_coef", "ppo_epochs", "temperature", "alpha",
    "top_k", "on_policy", "center_rewards_coefficient", "extend_vocabulary", "seed",
)
# The data counts a stage's training summary may hold, and what they count.
DATA_COUNTS = {
    "train_examples": "training examples",
    "validation_examples": "validation examples",
    "train_pairs": "training pairs",
    "validation_pairs": "validation pairs",
    "train_documents": "training documents",
    "train_blocks": "training blocks",
    "validation_blocks": "validation blocks",
    "prompts": "prompts",
}
SAMPLE_CHARACTERS = 1000  # a sample's text beyond this is cut in the report


def write_report(
    folder: Path,
    evaluation: dict[str, Any],
    lineage: list[dict[str, Any]],
    *,
    model: str,
    data: str,
    description: str | None = None,
    adapter: bool = False,
) -> list[str]:
    """Write report.md, report.html, model_card.md and loss_curves.png (where the lineage has any
    loss) into `folder`, beside evaluation.json and metrics_comparison.png; return their names.

    `lineage`: the model's training stages, oldest first (steps.common.training.read_lineage);
    `model`, `data`: what was evaluated, as the evaluation step was given them; `description`:
    what the model is for (default: a description in the newest training summary that has one);
    `adapter`: whether the model is a PEFT adapter (how to load it).
    """
    plotted, notes = plot_lineage(lineage, folder / LOSS_CURVES)
    comparison = (folder / METRICS_COMPARISON).exists()
    students = plot_students(evaluation.get("metrics") or {}, folder / STUDENTS_PLOT)
    report = _report(evaluation, lineage, model, data, plotted, notes, comparison, students)
    (folder / REPORT_MD).write_text(report, encoding="utf-8")
    (folder / REPORT_HTML).write_text(
        markdown_to_html(report, folder, "Evaluation report"), encoding="utf-8"
    )
    description = description or next(
        (stage["summary"]["description"] for stage in reversed(lineage)
         if stage.get("summary", {}).get("description")), None
    )
    (folder / MODEL_CARD).write_text(
        _model_card(evaluation, lineage, model, data, description, adapter), encoding="utf-8"
    )
    return ([REPORT_MD, REPORT_HTML, MODEL_CARD] + ([LOSS_CURVES] if plotted else [])
            + ([STUDENTS_PLOT] if students else []))


def plot_lineage(
    lineage: list[dict[str, Any]], path: Path
) -> tuple[dict[str, dict[str, list[tuple[float, float]]]], list[str]]:
    """loss_curves.png: train_loss and eval_loss of each stage of `lineage`, one after another.

    Returns the points drawn per stage (labelled "1. sft", "2. dpo", ...) and a note for each stage
    left out (no history, or no loss in it: PPO logs rewards). With nothing to draw, no file.
    """
    drawn, notes = [], []
    for index, stage in enumerate(lineage, start=1):
        name, history = _text(str(stage.get("stage", "unknown"))), stage.get("metrics") or []
        if not history:
            notes.append(f"Stage {index} ({name}) recorded no metric history: it has no curve.")
        elif not any("train_loss" in m or "eval_loss" in m for m in history):
            logged = sorted({key for m in history for key in m} - {"step", "epoch"})
            notes.append(f"Stage {index} ({name}) logged no train_loss or eval_loss (it logged "
                         f"{_text(', '.join(logged[:8]))}): it has no curve.")
        else:
            drawn.append((f"{index}. {stage.get('stage', 'unknown')}", history))
    if not lineage:
        notes.append("The model folder holds no training record (lineage.json or "
                     "training_summary.json): there are no loss curves.")
    if not drawn:
        return {}, notes
    return plot_loss_curves(drawn, path), notes


def markdown_to_html(markdown: str, folder: Path, title: str) -> str:
    """`markdown` as one HTML page; its images (files in `folder`) embedded as base64 data URIs.

    Raw HTML in the Markdown is not passed through, so text from the data cannot inject any.
    """
    renderer = MarkdownIt("commonmark", {"html": False}).enable("table")
    tokens = renderer.parse(markdown)
    for token in tokens:
        for child in token.children or []:
            source = child.attrGet("src") if child.type == "image" else None
            if source and (folder / source).is_file():
                encoded = base64.b64encode((folder / source).read_bytes()).decode("ascii")
                child.attrSet("src", f"data:image/png;base64,{encoded}")
    body = renderer.renderer.render(tokens, renderer.options, {})
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<title>{html.escape(title)}</title>\n<style>\n"
        "body { font-family: sans-serif; max-width: 60em; margin: 2em auto; padding: 0 1em; }\n"
        "table { border-collapse: collapse; } th, td { border: 1px solid #ccc; "
        "padding: 0.2em 0.6em; }\n"
        "pre { background: #f6f6f6; padding: 0.5em; white-space: pre-wrap; }\n"
        "img { max-width: 100%; }\n</style>\n</head>\n<body>\n"
        f"{body}</body>\n</html>\n"
    )


# --- What each stage bought -----------------------------------------------------------------------

# Figures whose change reads best relative to where they started (a perplexity 12% lower, a model
# half the size); the others (margins, accuracies, ROUGE-L) as a difference.
RELATIVE_FIGURES = ("perplexity", "size_mb", "tokens_per_second")


def stage_effects(
    metrics: dict[str, dict[str, float]],
    lineage: list[dict[str, Any]],
    quantization: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Per stage that made the model, what it changed on held-out data, against what it started
    from: {"stage", "compared_with", "measured_on", "figures": [{"name", "before", "after"}]}.

    Each stage's own held-out measurement from its training record (CPT and SFT: perplexity before
    and after; DPO: the preference margin and accuracy against the SFT model it started from;
    PPO: the reward model's mean reward; a reward model: its pairwise accuracy against chance); a
    distilled student: this evaluation, student against teacher (`metrics`); a quantized variant:
    size, speed and perplexity against the unquantized model (steps.quantize's quantization.json).
    """
    effects = []
    for index, stage in enumerate(lineage):
        name = str(stage.get("stage", "unknown"))
        summary = stage.get("summary") or {}
        training = summary.get("training") or {}
        after_loss = training.get("eval_loss")
        row: dict[str, Any] = {"stage": name, "compared_with": (
            f"the model of {lineage[index - 1].get('stage')}" if index else
            f"{stage.get('base_model')}"), "measured_on": "", "figures": []}
        if name in ("cpt", "sft") and summary.get("eval_loss_before") is not None and after_loss:
            counted = summary.get("validation_blocks") or summary.get("validation_examples")
            row["measured_on"] = (f"{counted} held-out "
                                  f"{'corpus blocks' if name == 'cpt' else 'examples'}")
            row["figures"].append(_figure("perplexity", _exp(summary["eval_loss_before"]),
                                          _exp(after_loss)))
        elif name == "pretrain" and after_loss:
            row.update(compared_with="random weights", measured_on=(
                f"{summary.get('validation_blocks')} held-out corpus blocks"))
            row["figures"].append(_figure("perplexity", _exp(summary.get("loss_at_random")),
                                          _exp(after_loss)))
        elif name == "dpo" and summary.get("held_out"):
            held_out = summary["held_out"]
            row["measured_on"] = f"{held_out.get('pairs')} {held_out.get('on')} preference pairs"
            for figure in ("logprob_margin", "preference_accuracy"):
                row["figures"].append(_figure(figure, held_out["before"].get(figure),
                                              held_out["after"].get(figure)))
        elif name == "ppo" and summary.get("validation_reward_after") is not None:
            row["measured_on"] = "held-out prompts, scored by the reward model"
            row["figures"].append(_figure("reward_mean", summary.get("validation_reward_before"),
                                          summary["validation_reward_after"]))
        elif name == "reward_model" and summary.get("pairwise_accuracy") is not None:
            row.update(compared_with="chance", measured_on=(
                f"{summary.get('validation_pairs')} {summary.get('pairwise_accuracy_on')} pairs"))
            row["figures"].append(_figure("pairwise_accuracy", 0.5, summary["pairwise_accuracy"]))
        elif name == "distill" and index == len(lineage) - 1 and "base_perplexity" in metrics:
            row.update(compared_with="the teacher", measured_on="this evaluation's held-out data")
            for figure in ("perplexity", "rouge_l", "exact_match"):
                if figure in metrics and f"base_{figure}" in metrics:
                    row["figures"].append(_figure(figure, metrics[f"base_{figure}"]["value"],
                                                  metrics[figure]["value"]))
        effects.append(row)
    for scheme, variant in ((quantization or {}).get("variants") or {}).items():
        reference = quantization["variants"].get("reference")
        if scheme == "reference" or not reference:
            continue
        row = {"stage": f"quantize ({scheme})", "compared_with": "the unquantized model",
               "measured_on": (f"{quantization.get('num_loss_examples')} held-out examples; "
                               f"speed on {quantization.get('device')}"), "figures": [
                   _figure("size_mb", reference["size_bytes"] / 2**20,
                           variant["size_bytes"] / 2**20),
                   _figure("tokens_per_second", reference.get("tokens_per_second"),
                           variant.get("tokens_per_second"))]}
        if reference.get("perplexity") is not None:
            row["figures"].append(_figure("perplexity", reference["perplexity"],
                                          variant.get("perplexity")))
        effects.append(row)
    return effects


def _figure(name: str, before: float | None, after: float | None) -> dict[str, Any]:
    return {"name": name, "before": before, "after": after}


def _exp(loss: float | None) -> float | None:
    return math.exp(min(loss, 700.0)) if loss is not None else None


def _effect_rows(effects: list[dict[str, Any]]) -> list[list[str]]:
    rows = []
    for effect in effects:
        figures = effect.get("figures") or [None]
        for number, figure in enumerate(figures):
            first = number == 0
            cells = [_text(effect["stage"]) if first else "",
                     _text(str(effect.get("compared_with") or "")) if first else "",
                     _text(str(effect.get("measured_on") or "")) if first else ""]
            if figure is None:
                rows.append(cells + ["not measured by the stage", "", "", ""])
                continue
            before, after = figure.get("before"), figure.get("after")
            rows.append(cells + [_text(figure["name"]), _optional(before), _optional(after),
                                 _change(figure["name"], before, after)])
    return rows


def _change(name: str, before: float | None, after: float | None) -> str:
    if before is None or after is None:
        return ""
    if name in RELATIVE_FIGURES:
        return f"{100 * (after - before) / before:+.1f}%" if before else ""
    return f"{after - before:+.4g}"


def _optional(value: float | None) -> str:
    return "" if value is None else _number(float(value))


def _effects_section(evaluation: dict[str, Any]) -> list[str]:
    effects = evaluation.get("stage_effects") or []
    if not effects:
        return []
    return [
        "## What each stage bought", "",
        ("Each stage against the model it started from, on held-out data: measured by the stage "
         "itself as it trained (the distilled student: by this evaluation, against its teacher; a "
         "quantized variant: by the quantization stage). Perplexity, size and speed change "
         "relatively, the other figures by their difference."), "",
        *_table(["stage", "compared with", "measured on", "figure", "before", "after", "change"],
                _effect_rows(effects)), "",
    ]


# --- Distillation: the student against its teacher, its start and a hard-label student -----------

STUDENTS_PLOT = "students.png"
STUDENT_COLUMNS = (("teacher", "base_"), ("distilled student", ""),
                   ("hard-label student", "hard_label_student_"),
                   ("initial student", "initial_student_"))
STUDENT_FIGURES = ("perplexity", "rouge_l", "exact_match", "kl_to_teacher")


def _students_section(metrics: dict[str, dict[str, float]], plotted: bool) -> list[str]:
    """The student against its teacher, the same student before training and trained on the labels
    alone: whether distillation earned its place. Empty unless the stage compared them."""
    if "hard_label_student_perplexity" not in metrics and \
            "initial_student_perplexity" not in metrics:
        return []
    rows = []
    for figure in STUDENT_FIGURES:
        cells = [_value(metrics.get(f"{prefix}{figure}")) for _, prefix in STUDENT_COLUMNS]
        if figure == "kl_to_teacher":
            cells[0] = "0"
        rows.append([_text(figure), *cells])
    verdict = _against_hard_label(metrics)
    answered = metrics.get("teacher_answered_examples", {}).get("value", 0)
    if answered:
        labelled = metrics.get("labelled_examples", {}).get("value", 0)
        verdict += [
            (f"Where the difference comes from: the distilled student also trained on the "
             f"teacher's answers to {answered:.0f} prompts that have no reference answer, beside "
             f"the {labelled:.0f} labelled examples, which are all the hard-label student could "
             "train on."), ""]
    return [
        "## Distillation: the student against its teacher and its baselines", "",
        ("The teacher and the distilled student as this evaluation measured them; the hard-label "
         "student (the same initial student trained on the ground truth alone, with the same "
         "steps, batches and seed) and the initial student (before any training) as the "
         "distillation stage measured them, with this evaluation's functions on the same held-out "
         "data."), "",
        *_table(["figure", *(name for name, _ in STUDENT_COLUMNS)], rows), "",
        *verdict,
        *([f"![The students against the teacher]({STUDENTS_PLOT})", ""] if plotted else []),
    ]


def _against_hard_label(metrics: dict[str, dict[str, float]]) -> list[str]:
    """One sentence: on which held-out figures distilling beat training on the labels alone."""
    if "perplexity_ratio_vs_hard_label" not in metrics:
        return []
    outcomes = {"perplexity": metrics["perplexity_ratio_vs_hard_label"]["value"] - 1}
    if "rouge_l_delta_vs_hard_label" in metrics:
        outcomes["ROUGE-L"] = metrics["rouge_l_delta_vs_hard_label"]["value"]
    if "kl_to_teacher" in metrics and "hard_label_student_kl_to_teacher" in metrics:
        outcomes["KL to the teacher"] = (metrics["hard_label_student_kl_to_teacher"]["value"]
                                         - metrics["kl_to_teacher"]["value"])
    won = [name for name, margin in outcomes.items() if margin > 0]
    lost = [name for name, margin in outcomes.items() if margin < 0]
    tied = [name for name, margin in outcomes.items() if margin == 0]
    parts = [f"won on {' and '.join(won)}" if won else "won on nothing"]
    parts += [f"lost on {' and '.join(lost)}"] if lost else []
    parts += [f"tied on {' and '.join(tied)}"] if tied else []
    return [
        (f"Against the same initial student trained on the labels alone for the same steps, "
        f"distillation {'; '.join(parts)} ({_code('perplexity_ratio_vs_hard_label')} "
        f"{_number(metrics['perplexity_ratio_vs_hard_label']['value'])}: hard-label perplexity / "
        "distilled perplexity)."), ""]


def plot_students(metrics: dict[str, dict[str, float]], path: Path) -> bool:
    """students.png: perplexity (log scale) and ROUGE-L of the teacher and the three students."""
    if "hard_label_student_perplexity" not in metrics and \
            "initial_student_perplexity" not in metrics:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for axis, name, log in ((axes[0], "perplexity", True), (axes[1], "rouge_l", False)):
        shown = [(label, metrics[f"{prefix}{name}"]["value"]) for label, prefix in STUDENT_COLUMNS
                 if f"{prefix}{name}" in metrics]
        labels, values = zip(*shown) if shown else ((), ())
        axis.bar([label.replace(" ", "\n") for label in labels], values,
                 color=["#9e9e9e", "#1f77b4", "#ff7f0e", "#d62728"][:len(values)])
        if log:
            axis.set_yscale("log")
        axis.set_title(f"{name}{' (log scale)' if log else ''}")
        for x, value in enumerate(values):
            axis.annotate(f"{value:.3g}", (x, value), ha="center", va="bottom", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return True


# --- report.md ------------------------------------------------------------------------------------


def _report(
    evaluation: dict[str, Any],
    lineage: list[dict[str, Any]],
    model: str,
    data: str,
    plotted: dict[str, Any],
    notes: list[str],
    comparison: bool,
    students: bool,
) -> str:
    lines = ["# Evaluation report", "", *_header(evaluation, lineage, model, data), ""]
    lines += _effects_section(evaluation)
    lines += _students_section(evaluation.get("metrics") or {}, students)
    lines += ["## Metrics", ""]
    if evaluation.get("metrics"):
        lines += [
            ("Tuned: the evaluated model; base: the same metric of the base model (the `base_` "
             "metrics of evaluation.json); delta: tuned - base. Values are means, ± the standard "
             "deviation over examples, pairs or answers."),
            "",
            *_table(["metric", "tuned", "base", "delta"], _metric_rows(evaluation["metrics"])),
            "",
        ]
    else:
        lines += ["evaluation.json holds no metrics.", ""]
    if comparison:
        lines += [f"![Metrics, base and tuned]({METRICS_COMPARISON})", ""]
    lines += ["## Checks", "", *_checks(evaluation.get("checks") or {}), ""]
    lines += ["## Training loss", ""]
    if plotted:
        lines += [f"![Loss curves of the training stages]({LOSS_CURVES})", ""]
    lines += [f"- {note}" for note in notes] + ([""] if notes else [])
    lines += ["## Sample answers", ""]
    samples = evaluation.get("samples") or []
    if not samples:
        lines += ["No held-out prompts to answer (plain text data).", ""]
    limit = (evaluation.get("checks") or {}).get("max_new_tokens")
    if samples:
        lines += [f"The first {len(samples)} held-out prompts, answered greedily"
                  + (f" (at most {limit} new tokens)." if limit else "."), ""]
    for index, sample in enumerate(samples, start=1):
        lines += [f"### Sample {index}", ""]
        for key, title in (("prompt", "Prompt"), ("reference", "Reference"), ("tuned", "Tuned"),
                           ("base", "Base")):
            if key in sample:
                lines += [f"**{title}**", "", *_fenced(_sample_text(sample[key])), ""]
    return "\n".join(lines).rstrip() + "\n"


def _header(
    evaluation: dict[str, Any], lineage: list[dict[str, Any]], model: str, data: str
) -> list[str]:
    base = evaluation.get("base_model")
    counts = [f"{evaluation.get('num_samples', 0)} answers",
              f"{evaluation.get('num_loss_examples', 0)} examples for the loss"]
    if "num_preference_pairs" in evaluation:
        counts.append(f"{evaluation['num_preference_pairs']} preference pairs")
    rows = [
        ["Model", _code(model)],
        ["Made by", _stages_line(lineage) if lineage else "no training record in the model folder"],
        ["Base model", "none: evaluated alone" if base in (None, "none") else _code(str(base))],
        ["Data", _code(data)],
        ["Held-out samples", ", ".join(counts)],
    ]
    if evaluation.get("reward_model"):
        rows.append(["Reward model (judge)", _code(str(evaluation["reward_model"]))])
    return _table(["", ""], rows)


def _metric_rows(metrics: dict[str, dict[str, float]], meanings: bool = False) -> list[list[str]]:
    """One row per metric, its base_ counterpart in the base column: every metric appears."""
    names = list(dict.fromkeys(name.removeprefix("base_") for name in metrics))
    rows = []
    for name in names:
        tuned, base = metrics.get(name), metrics.get(f"base_{name}")
        delta = (_number(tuned["value"] - base["value"]) if tuned and base else "")
        rows.append([_text(name), _value(tuned), _value(base), delta]
                    + ([_meaning(name)] if meanings else []))
    return rows


STUDENT_MEANINGS = {
    "initial_student_": "the student before any training: ",
    "hard_label_student_": "the same initial student trained on the ground truth alone for the "
                           "same steps: ",
}
MEANINGS.update({
    "kl_to_teacher": "KL(teacher || student) over the teacher's top-k tokens at each held-out "
                     "response position, temperature 1; lower is closer",
    "perplexity_ratio_vs_hard_label": "hard-label student perplexity / distilled student "
                                      "perplexity; above 1, distillation taught more than the "
                                      "labels alone",
    "rouge_l_delta_vs_hard_label": "distilled minus hard-label student ROUGE-L; above 0, "
                                   "distillation answers closer to the references",
    "labelled_examples": "labelled training examples: the hard-label student's whole training "
                         "data, and part of the distilled student's",
    "teacher_answered_examples": "prompts without reference answers that the teacher answered and "
                                 "the distilled student also trained on",
    "perplexity_ratio_vs_initial": "initial student perplexity / distilled student perplexity: "
                                   "what training bought",
})


def _meaning(name: str) -> str:
    for prefix, who in STUDENT_MEANINGS.items():
        if name.startswith(prefix) and name.removeprefix(prefix) in MEANINGS:
            return who + MEANINGS[name.removeprefix(prefix)]
    return MEANINGS.get(name, "")


def _checks(checks: dict[str, Any]) -> list[str]:
    if not checks:
        return ["evaluation.json holds no checks."]
    template = ("renders a user turn and the generation prompt" if checks.get("chat_template")
                else "is missing, or does not render a user turn with the generation prompt")
    lines = [f"- Chat template: {template}."]
    answers, rate = checks.get("answers", 0), checks.get("eos_rate")
    if answers and rate is not None:
        stops = ", ".join(_code(token) for token in checks.get("stop_tokens") or []) or "none"
        lines.append(
            f"- Stopping (eos_rate {_number(rate)}): {round(rate * answers)} of {answers} answers "
            f"ended with a stop token ({stops}) within {checks.get('max_new_tokens')} new tokens."
        )
    else:
        lines.append("- Stopping: no answers to check (no held-out prompts).")
    return lines


# --- model_card.md --------------------------------------------------------------------------------


def _model_card(
    evaluation: dict[str, Any],
    lineage: list[dict[str, Any]],
    model: str,
    data: str,
    description: str | None,
    adapter: bool,
) -> str:
    kind = "a PEFT adapter" if adapter else "a full model"
    lines = ["# Model card", "", f"Model: {_code(model)}, {kind}."]
    if lineage:
        lines[-1] += f" Made by {len(lineage)} training stage(s): {_stages_line(lineage)}."
    lines += ["", "## What the model is for", ""]
    lines += [_text(description) if description else
              "No description was given (the evaluation step's --description, or a description "
              "in the training summary)."]
    lines += ["", "## How it was made", ""]
    if not lineage:
        lines += [("The model folder holds no training record (lineage.json or "
                   "training_summary.json): how it was made is not known."), ""]
    for index, stage in enumerate(lineage, start=1):
        lines += [f"### Stage {index}: {_text(str(stage.get('stage', 'unknown')))}", "",
                  *_stage_lines(lineage, index), ""]

    metrics = evaluation.get("metrics") or {}
    base = evaluation.get("base_model")
    compared = ("alone (no base model)" if base in (None, "none")
                else f"against the base model {_code(str(base))}")
    lines += ["## Evaluation", "",
              f"Evaluated {compared} on {_code(data)}: {evaluation.get('num_samples', 0)} "
              f"held-out prompts answered greedily, {evaluation.get('num_loss_examples', 0)} "
              "held-out examples for the loss"
              + (f", {evaluation['num_preference_pairs']} preference pairs"
                 if "num_preference_pairs" in evaluation else "") + ".", ""]
    if metrics:
        lines += _table(["metric", "tuned", "base", "delta", "meaning"],
                        _metric_rows(metrics, meanings=True)) + [""]
    lines += [line.replace("## ", "### ", 1) if line.startswith("## ") else line
              for line in _effects_section(evaluation)
              + _students_section(metrics, plotted=False)]

    lines += ["## Intended use and limitations", "",
              *[f"- {line}" for line in _limitations(evaluation, lineage, data)], ""]
    lines += ["## How to load it", "", *_loading(adapter, base), ""]
    return "\n".join(lines).rstrip() + "\n"


def _stage_lines(lineage: list[dict[str, Any]], index: int) -> list[str]:
    stage = lineage[index - 1]
    summary = stage.get("summary") or {}
    hyperparameters = summary.get("hyperparameters") or {}
    training = summary.get("training") or {}
    method = summary.get("peft_method", "none")
    lines = [f"- Method: {'full fine-tuning (every weight)' if method == 'none' else _code(method)}"
             + (" (merged into the full model)" if summary.get("merged") else "")]
    started = (f"the model of stage {index - 1} ({_text(str(lineage[index - 2].get('stage')))})"
               if index > 1 else _code(str(stage.get("base_model"))))
    lines.append(f"- Started from: {started}")
    counts = [f"{summary[key]} {what}" for key, what in DATA_COUNTS.items()
              if summary.get(key) is not None]
    if summary.get("data_format"):
        counts.append(f"format {_code(summary['data_format'])}")
    lines.append(f"- Data: {', '.join(counts) if counts else 'not recorded'}")
    shown = [f"{name} {_code(_plain(hyperparameters[name]))}" for name in KEY_HYPERPARAMETERS
             if name in hyperparameters and _relevant(name, hyperparameters, method)]
    if shown:
        lines.append(f"- Key hyperparameters: {', '.join(shown)}")
    if training:
        figures = [f"{training.get('global_step')} optimizer steps"]
        for key, what in (("first_train_loss", "first train_loss"),
                          ("final_train_loss", "final train_loss"), ("eval_loss", "eval_loss")):
            if training.get(key) is not None:
                figures.append(f"{what} {_number(training[key])}")
        if training.get("runtime_s") is not None:
            figures.append(f"{training['runtime_s']} s")
        if summary.get("precision"):
            figures.append(f"precision {_code(summary['precision'])}")
        lines.append(f"- Training: {', '.join(figures)}")
    if not stage.get("metrics"):
        lines.append("- Metric history: not recorded")
    return lines


def _relevant(name: str, hyperparameters: dict[str, Any], method: str) -> bool:
    """Whether a hyperparameter had an effect: epochs only without max_steps, LoRA's only for LoRA,
    prompt tuning's only for the prompt-learning methods."""
    if name == "epochs":
        return hyperparameters.get("max_steps", -1) in (-1, None)
    if name == "max_steps":
        return hyperparameters.get("max_steps", -1) not in (-1, None)
    if name.startswith("lora_"):
        return "lora" in method
    if name == "num_virtual_tokens":
        return method in ("prompt_tuning", "p_tuning", "prefix_tuning")
    return True


def _limitations(
    evaluation: dict[str, Any], lineage: list[dict[str, Any]], data: str
) -> list[str]:
    metrics, checks = evaluation.get("metrics") or {}, evaluation.get("checks") or {}
    value = {name: metric["value"] for name, metric in metrics.items()}
    lines = []
    if lineage:
        lines.append("It was trained only on the data of the stages above, and measured only as "
                     "this card shows: it is not known to suit any other task or domain.")
    lines.append(
        f"It was evaluated on {evaluation.get('num_samples', 0)} held-out prompts and "
        f"{evaluation.get('num_loss_examples', 0)} held-out examples from {_code(data)}; the "
        "standard deviations above show how much the figures vary over them."
    )
    lines.append("ROUGE-L and exact match compare each answer with one reference answer: they "
                 "measure overlap, not correctness, helpfulness or safety. No safety, bias or "
                 "toxicity evaluation was run.")
    rate, answers = checks.get("eos_rate"), checks.get("answers", 0)
    if rate is not None and answers and rate < 1:
        lines.append(
            f"eos_rate is {_number(rate)}: {answers - round(rate * answers)} of {answers} answers "
            f"did not end with a stop token within {checks.get('max_new_tokens')} new tokens, so "
            "the model may not stop on its own: cap the new tokens when serving it."
        )
    elif rate is not None and answers:
        lines.append(f"All {answers} answers ended with a stop token within "
                     f"{checks.get('max_new_tokens')} new tokens (eos_rate 1).")
    if checks and not checks.get("chat_template"):
        lines.append("Its tokenizer's chat template is missing or does not render a user turn "
                     "with the generation prompt: chat-formatted prompts will not work as "
                     "expected.")
    for name, lower_is_better in (("eval_loss", True), ("rouge_l", False),
                                  ("preference_accuracy", False), ("reward_mean", False)):
        if name in value and f"base_{name}" in value:
            tuned, base = value[name], value[f"base_{name}"]
            if (tuned > base) if lower_is_better else (tuned < base):
                lines.append(f"On the held-out data its {name} ({_number(tuned)}) is worse than "
                             f"the base model's ({_number(base)}).")
    if "win_rate" in value and value["win_rate"] < 0.5:
        lines.append(f"The reward model prefers the base model's answers (win_rate "
                     f"{_number(value['win_rate'])}).")
    root = lineage[0].get("base_model") if lineage else evaluation.get("base_model")
    if root not in (None, "none"):
        lines.append(f"It inherits the limitations, biases and licence of the model it was "
                     f"made from, {_code(str(root))}.")
    return lines


def _loading(adapter: bool, base: str | None) -> list[str]:
    """How to load the model folder (model.tar.gz unpacked into ./model)."""
    if not adapter:
        return [
            "A full model in the Hugging Face layout. Unpack model.tar.gz into `model/`, then:",
            "",
            *_fenced("from transformers import AutoModelForCausalLM, AutoTokenizer\n"
                     "model = AutoModelForCausalLM.from_pretrained(\"model\")\n"
                     "tokenizer = AutoTokenizer.from_pretrained(\"model\")", "python"),
        ]
    known_base = base not in (None, "none")
    return [
        "A PEFT adapter" + (f", loaded over {_code(str(base))} in this evaluation" if known_base
                            else "") + ". Unpack model.tar.gz into `model/`, then, with this "
        "project (which also resolves its `builtin:` model names):",
        "",
        *_fenced("from steps.common.models import load_model, load_tokenizer\n"
                 "model = load_model(\"model\""
                 + (f", base_model={_python(str(base))})" if known_base else ")") + "\n"
                 "tokenizer = load_tokenizer(\"model\")", "python"),
        "",
        "or with PEFT, where the base named in adapter_config.json is a Hugging Face model:",
        "",
        *_fenced("from peft import AutoPeftModelForCausalLM\n"
                 "from transformers import AutoTokenizer\n"
                 "model = AutoPeftModelForCausalLM.from_pretrained(\"model\")\n"
                 "tokenizer = AutoTokenizer.from_pretrained(\"model\")", "python"),
    ]


# --- Markdown pieces ------------------------------------------------------------------------------


def _stages_line(lineage: list[dict[str, Any]]) -> str:
    names = " → ".join(_text(str(stage.get("stage", "unknown"))) for stage in lineage)
    root = lineage[0].get("base_model")
    return names + (f", from {_code(str(root))}" if root not in (None, "none") else "")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"

    return [line(header), "|" + "|".join("---" for _ in header) + "|", *map(line, rows)]


def _value(metric: dict[str, float] | None) -> str:
    if not metric:
        return ""
    spread = metric.get("standard_deviation") or 0.0
    return _number(metric["value"]) + (f" ± {spread:.2g}" if spread else "")


def _number(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _plain(value: Any) -> str:
    return _number(value) if isinstance(value, float) else str(value)


def _python(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


# What marks up inline text in CommonMark (a table escapes its own pipes).
_MARKDOWN_PUNCTUATION = re.compile(r"([\\`*_\[\]<>#~&])")


def _text(text: str) -> str:
    """Data as inline Markdown text: one line, every character that could mark up escaped (and
    a leading list or heading marker)."""
    text = _MARKDOWN_PUNCTUATION.sub(r"\\\1", " ".join(str(text).split()))
    return re.sub(r"^(\d*)([-=.)])", r"\1\\\2", text)


def _code(text: str) -> str:
    """Data as an inline code span (shown as it is), fenced by more backticks than it holds."""
    text = " ".join(str(text).split())
    fence = "`" * (max((len(run) for run in re.findall(r"`+", text)), default=0) + 1)
    padding = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{padding}{text}{padding}{fence}"


def _fenced(text: str, info: str = "text") -> list[str]:
    """A fenced code block holding `text` as it is (a fence longer than any backtick run in it)."""
    fence = "`" * max(3, max((len(run) for run in re.findall(r"`+", text)), default=0) + 1)
    return [f"{fence}{info}", text, fence]


def _sample_text(value: Any) -> str:
    """A sample's prompt or answer as text: a conversation as `role: content` lines; cut at
    SAMPLE_CHARACTERS."""
    if isinstance(value, list):
        value = "\n".join(f"{m.get('role', '?')}: {m.get('content', '')}"
                          if isinstance(m, dict) else str(m) for m in value)
    text = str(value)
    if len(text) > SAMPLE_CHARACTERS:
        text = text[:SAMPLE_CHARACTERS] + f" [... {len(text) - SAMPLE_CHARACTERS} more characters]"
    return text or "(empty)"

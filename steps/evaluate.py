"""Evaluation (processing stage): the tuned model against its base model on held-out data.

    python -m steps.evaluate --model-dir MODEL --data-dir DATA --output-dir OUT
        [--base-model SPEC] [--reward-model-dir RM] [--max-new-tokens 64] [--max-samples 32]
        [--batch-size 8] [--quantization-dir QUANTIZED]

--model-dir holds a training stage's output (a folder, or the model.tar.gz SageMaker packed it
into); --data-dir holds validation.jsonl (or is a data file or folder itself). It writes
evaluation.json in the SageMaker model-quality shape,
``{"metrics": {"<name>": {"value": v, "standard_deviation": s}}, "checks": {...}, ...}``,
metrics_comparison.png, and from them and the lineage the model records (steps.common.report)
report.md, report.html, model_card.md and loss_curves.png ([--description TEXT [MORE ...]]: what the
model is for, for the card, in as many pieces as it was passed in, joined as they are). Metrics of the tuned model; the base model's carry a ``base_`` prefix (none
with --base-model none); standard deviations are over examples, pairs or answers.

On every dataset with responses (prompt-only data is refused: there is nothing to score):
  eval_loss, perplexity     mean token loss on the responses (what SFT trains on), and exp of it
  bits_per_byte             the same loss per byte of response text: comparable across tokenizers
  rouge_l, exact_match      greedy answers (at most --max-samples, --max-new-tokens each) against
                            the reference responses
  eos_rate                  the fraction of those answers that ended with a stop token (EOS or the
                            chat template's end-of-turn token) within --max-new-tokens: a model
                            that never stops has not learnt its format
  rouge_l_delta             per answer, tuned minus base ROUGE-L (with a base)
  perplexity_ratio          base perplexity / tuned perplexity of the same text (with a base)
  kl_to_base                mean over the tuned model's greedy answers of the exact KL(tuned ||
                            base) between the two models' next-token distributions, summed over
                            each answer's tokens: how far tuning moved the model where it now
                            goes (>= 0); not measured when the two tokenizers differ

On preference records ({prompt?, chosen, rejected}) the chosen response is the reference: the loss
is measured on prompt + chosen and the answers are compared with chosen. Also, on every held-out
pair, with the summed log-probability of a response given its prompt (steps.common.preference):
  preference_accuracy       fraction of pairs where log p(chosen|prompt) > log p(rejected|prompt)
  logprob_margin            mean of log p(chosen|prompt) - log p(rejected|prompt)
  logprob_margin_delta      per pair, tuned margin minus base margin (with a base): what DPO raises

With --reward-model-dir (a folder, or one with model.tar.gz, that steps.reward_model wrote), the
reward model judges the answers:
  reward_mean               mean reward of the tuned model's answers (base_reward_mean: the base's)
  reward_margin             per prompt, tuned reward minus base reward (with a base)
  win_rate                  fraction of prompts where the tuned answer scores above the base
                            answer, ties counting half (with a base)
  reward_model_accuracy     the reward model's own pairwise accuracy on the held-out pairs
                            (preference data): whether the judge itself can be trusted

For a distilled student whose stage compared it with its baselines (steps.distill,
compare_students), the figures that stage measured with this module's functions on the same
held-out data (`student_comparison`):
  initial_student_*, hard_label_student_*   eval_loss, perplexity, rouge_l, exact_match and
                            kl_to_teacher of the student before training, and of the same initial
                            student trained on the ground truth alone for the same steps
  kl_to_teacher             the evaluated student's KL to the teacher's top-k outputs
  perplexity_ratio_vs_hard_label, rouge_l_delta_vs_hard_label, perplexity_ratio_vs_initial
                            the distilled student against each (above 1 / 0: distilling won)

"checks" in evaluation.json reports whether the tokenizer's chat template renders a user turn with
a generation prompt, and the tuned model's eos_rate; the stage does not fail on them (a
registration gate can use eos_rate). "stage_effects" says what each training stage of the model's
lineage bought on held-out data (steps.common.report.stage_effects), with --quantization-dir the
quantized variant's size, speed and perplexity against this model too.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from steps.common import contract, tracking
from steps.common.contract import StageError
from steps.common.datasets import load_records, needs_responses, sft_example
from steps.common.models import (
    load_model,
    load_tokenizer,
    local_model_folder,
    resolve_model_source,
    stop_token_ids,
)
from steps.common.preference import (
    PreferencePair,
    load_reward_model,
    logprob_margins,
    preference_pairs,
    reward_accuracy,
    reward_scores,
    win_rate,
)
from steps.common.report import stage_effects, write_report
from steps.common.scoring import (
    answer_kl,
    exact_match,
    example_losses,
    generate_answers,
    mean_loss,
    perplexity,
    prompt_and_completion,
    response_text,
    rouge_l,
)
from steps.common.training import read_lineage
from steps.evaluate_config import EvaluateConfig

# The metrics metrics_comparison.png shows: a pair of bars (base, tuned) where there is a base_
# metric, else one bar (the comparisons: kl_to_base, win_rate).
METRIC_NAMES = (
    "eval_loss",
    "perplexity",
    "bits_per_byte",
    "rouge_l",
    "exact_match",
    "eos_rate",
    "preference_accuracy",
    "logprob_margin",
    "reward_mean",
    "kl_to_base",
    "win_rate",
)


def main(config: EvaluateConfig) -> None:
    # The same rule as a training job's model channel: a model folder, or one model.tar.gz in it.
    source = resolve_model_source(Path(config.model_dir), config.model_dir)
    folder = local_model_folder(source)
    summary_path = folder / "training_summary.json" if folder else None
    summary = json.loads(summary_path.read_text()) if summary_path and summary_path.exists() else {}
    base_spec = config.base_model or summary.get("base_model")
    if config.base_dir:
        base_spec = resolve_model_source(Path(config.base_dir), config.base_dir)

    data_path = Path(config.data_dir)
    if (data_path / "validation.jsonl").exists():  # a data preparation output folder
        data_path = data_path / "validation.jsonl"
    fmt, records = load_records(data_path)
    needs_responses(fmt, f"{records[0].location}: the data")
    print(f"evaluating on {len(records)} {fmt.name} records from {data_path}", flush=True)

    # The judge is checked before any policy loads: a wrong folder fails in one line.
    reward_source = _reward_model_source(config.reward_model_dir)
    reward_model = load_reward_model(reward_source) if reward_source else None

    tokenizer = load_tokenizer(source)
    reward_tokenizer = _reward_tokenizer(reward_source, tokenizer) if reward_source else None
    tuned = load_model(source, base_model=None if base_spec == "none" else base_spec).eval()
    is_adapter = hasattr(tuned, "disable_adapter")
    if not is_adapter and not base_spec:
        raise StageError(
            f"{config.model_dir} holds a full model and names no base model; pass --base-model "
            "(or --base-model none to evaluate it alone)"
        )
    compare = base_spec != "none"
    # An adapter's base is the same weights with the adapter switched off, unless training grew
    # the vocabulary (continued pre-training): switching the adapter off would leave the base
    # with the trained rows of tokens it never had, so it is loaded separately then.
    base_tokenizer = load_tokenizer(base_spec) if compare else tokenizer
    base_inside = is_adapter and len(tokenizer) <= len(base_tokenizer)
    base = None
    if compare and not base_inside:
        base = load_model(base_spec).eval()
        if base_tokenizer.get_vocab() != tokenizer.get_vocab():
            # Continued pre-training may extend the vocabulary: each model reads the text with its
            # own tokenizer, and the ratio below compares likelihoods of the same text.
            print("base and tuned tokenizers differ: each model is scored with its own", flush=True)
        else:
            base_tokenizer = tokenizer
    print(f"tuned: {source}{' (adapter)' if is_adapter else ''}; base: {base_spec}", flush=True)

    examples, pairs, held_out = held_out_examples(records, fmt, bool(tokenizer.chat_template),
                                                  config.max_samples)
    settings = {"max_new_tokens": config.max_new_tokens, "batch_size": config.batch_size,
                "max_seq_length": config.max_seq_length}
    results = {"tuned": score_model("tuned", tuned, tokenizer, examples, pairs, held_out,
                                    **settings)}
    if compare and base_inside:
        # The base model is the same weights with the adapter switched off: no second load.
        with tuned.disable_adapter():
            results["base"] = score_model("base", tuned, tokenizer, examples, pairs, held_out,
                                          **settings)
    elif compare:
        results["base"] = score_model("base", base, base_tokenizer, examples, pairs, held_out,
                                      **settings)

    prompts = [prompt for prompt, _ in pairs]
    judged: dict[str, Any] = {}
    if compare and pairs:
        generated = results["tuned"]["token_ids"]
        if base_inside:  # reference None: the adapter switched off
            judged["kl"] = answer_kl(tuned, generated, tokenizer.pad_token_id, config.batch_size)
        elif base_tokenizer is tokenizer:
            judged["kl"] = answer_kl(tuned, generated, tokenizer.pad_token_id, config.batch_size,
                                     reference=base)
        else:
            print("kl_to_base: not measured: the base and tuned tokenizers differ, so their "
                  "log-probabilities of an answer are not over the same tokens", flush=True)
    if reward_model is not None:
        _judge(reward_model, reward_tokenizer, results, judged, prompts, held_out,
               config.batch_size)

    metrics = model_metrics(results, judged)
    metrics.update(student_comparison(summary.get("distillation", {}).get("comparison")))
    for name, metric in metrics.items():
        print(f"{name}: {metric['value']:.6g}", flush=True)
    checks = _checks(tuned, tokenizer, results["tuned"], config.max_new_tokens)

    evaluation = {
        "metrics": metrics,
        "checks": checks,
        "num_samples": len(pairs),
        "num_loss_examples": len(examples),
        **({"num_preference_pairs": len(held_out)} if held_out else {}),
        "base_model": base_spec,
        **({"reward_model": reward_source} if reward_source else {}),
        "stage_effects": stage_effects(metrics, read_lineage(folder),
                                       _quantization_report(config.quantization_dir)),
        "samples": [
            {
                "prompt": prompt,
                "reference": response_text(completion),
                "tuned": results["tuned"]["generations"][i],
                **({"base": results["base"]["generations"][i]} if "base" in results else {}),
            }
            for i, (prompt, completion) in enumerate(pairs[:5])
        ],
    }
    with contract.atomic_output(Path(config.output_dir)) as staging:
        (staging / "evaluation.json").write_text(
            json.dumps(evaluation, indent=2) + "\n", encoding="utf-8"
        )
        _plot_comparison(metrics, staging / "metrics_comparison.png")
        # The execution's MLflow run, which the registered package's metadata names.
        tracking.write_run_link(staging / tracking.RUN_LINK_FILE)
        written = write_report(staging, evaluation, read_lineage(folder), model=config.model_dir,
                               data=str(data_path),
                               description="".join(config.description or []) or None,
                               adapter=is_adapter)
    print(f"wrote evaluation.json, metrics_comparison.png, {', '.join(written)} to "
          f"{config.output_dir}", flush=True)


def model_metrics(
    results: dict[str, dict[str, list]], judged: dict[str, Any]
) -> dict[str, dict[str, float]]:
    """evaluation.json's metrics (see the module docstring). Standard deviations are over examples
    (per-example loss and perplexity, per-sample scores, per-pair margins); the loss itself is the
    mean over all response tokens.

    Without generation prompts (plain text) there is no ROUGE-L, exact match or EOS rate; without
    preference pairs no preference metrics; without a reward model no rewards; without a base
    model no base_ metrics and no comparisons.
    """
    metrics = {}
    for prefix, name in (("", "tuned"), ("base_", "base")):
        if name not in results:
            continue
        losses = results[name]["losses"]
        total, loss = sum(loss for loss, _, _ in losses), mean_loss(losses)
        per_example = [loss_sum / count for loss_sum, count, _ in losses]
        metrics[f"{prefix}eval_loss"] = _metric(loss, per_example)
        metrics[f"{prefix}perplexity"] = _metric(perplexity(loss),
                                                 [perplexity(x) for x in per_example])
        # Bits per byte do not depend on the tokenizer: comparable across vocabularies.
        metrics[f"{prefix}bits_per_byte"] = _metric(
            total / math.log(2) / max(sum(size for _, _, size in losses), 1),
            [loss_sum / math.log(2) / max(size, 1) for loss_sum, _, size in losses],
        )
        if results[name]["generations"]:
            for score in ("rouge_l", "exact_match", "eos_rate"):
                metrics[f"{prefix}{score}"] = _metric(
                    _mean(results[name][score]), results[name][score]
                )
        if "margins" in results[name]:
            margins = results[name]["margins"]
            preferred = [float(margin > 0) for margin in margins]
            metrics[f"{prefix}preference_accuracy"] = _metric(_mean(preferred), preferred)
            metrics[f"{prefix}logprob_margin"] = _metric(_mean(margins), margins)
        if "rewards" in results[name]:
            rewards = results[name]["rewards"]
            metrics[f"{prefix}reward_mean"] = _metric(_mean(rewards), rewards)
    if "base" in results:
        if results["tuned"]["generations"]:
            deltas = [
                t - b for t, b in zip(results["tuned"]["rouge_l"], results["base"]["rouge_l"])
            ]
            metrics["rouge_l_delta"] = _metric(_mean(deltas), deltas)
        # base perplexity / tuned perplexity, from the two models' total log-likelihoods of the
        # same text over the tuned model's token count: exactly the ratio of perplexities when the
        # tokenizers are the same, and still a like-for-like comparison when they differ.
        tuned_losses, base_losses = results["tuned"]["losses"], results["base"]["losses"]
        tokens = max(sum(count for _, count, _ in tuned_losses), 1)
        gap = sum(x for x, _, _ in base_losses) - sum(x for x, _, _ in tuned_losses)
        metrics["perplexity_ratio"] = {  # a ratio of two aggregates: no per-sample spread
            "value": perplexity(gap / tokens),
            "standard_deviation": 0.0,
        }
        if "margins" in results["tuned"]:
            deltas = [
                t - b for t, b in zip(results["tuned"]["margins"], results["base"]["margins"])
            ]
            metrics["logprob_margin_delta"] = _metric(_mean(deltas), deltas)
        if "kl" in judged:
            metrics["kl_to_base"] = _metric(_mean(judged["kl"]), judged["kl"])
        if "rewards" in results["tuned"]:
            margins = [
                t - b for t, b in zip(results["tuned"]["rewards"], results["base"]["rewards"])
            ]
            metrics["reward_margin"] = _metric(_mean(margins), margins)
            # win_rate's own rule per prompt (a tie counts half), for the spread.
            outcomes = [1.0 if m > 0 else 0.5 if m == 0 else 0.0 for m in margins]
            metrics["win_rate"] = _metric(judged["win_rate"], outcomes)
    if "reward_model_accuracy" in judged:
        accuracy = judged["reward_model_accuracy"]
        # The spread of per-pair right (1) or wrong (0) verdicts.
        metrics["reward_model_accuracy"] = {
            "value": float(accuracy),
            "standard_deviation": math.sqrt(accuracy * (1 - accuracy)),
        }
    return metrics


# The figures of the students a distillation stage compared (steps.distill, compare_students), as
# evaluation.json names them: <student>_student_<figure>.
COMPARED_STUDENTS = ("initial", "hard_label")
COMPARED_FIGURES = ("eval_loss", "perplexity", "rouge_l", "exact_match", "kl_to_teacher")


def student_comparison(comparison: dict[str, Any] | None) -> dict[str, dict[str, float]]:
    """evaluation.json's metrics of the students a distillation stage measured beside the one it
    saved: initial_student_* (before training), hard_label_student_* (the same start and steps
    on the ground truth alone), the saved student's kl_to_teacher, and how the distilled student
    compares with each, from the same measurement (steps.distill measures all three with this
    module's functions):

      perplexity_ratio_vs_hard_label   hard-label perplexity / distilled perplexity (> 1: the
                                       teacher's outputs taught more than the labels alone)
      rouge_l_delta_vs_hard_label      distilled minus hard-label ROUGE-L
      perplexity_ratio_vs_initial      initial perplexity / distilled perplexity
      labelled_examples, teacher_answered_examples
                                       what the students trained on: both the labelled
                                       examples, the distilled student also the teacher's answers
                                       to prompts without reference answers
    """
    if not comparison:
        return {}
    measured = comparison["students"]
    metrics = {}
    for student in COMPARED_STUDENTS:
        for figure in COMPARED_FIGURES:
            if figure in measured.get(student, {}):
                metrics[f"{student}_student_{figure}"] = measured[student][figure]
    distilled = measured["distilled"]
    if "kl_to_teacher" in distilled:
        metrics["kl_to_teacher"] = distilled["kl_to_teacher"]

    def aggregate(value: float) -> dict[str, float]:  # a ratio or difference of two means
        return {"value": float(value), "standard_deviation": 0.0}

    if "hard_label" in measured:
        hard_label = measured["hard_label"]
        metrics["perplexity_ratio_vs_hard_label"] = aggregate(
            hard_label["perplexity"]["value"] / distilled["perplexity"]["value"])
        if "rouge_l" in distilled:
            metrics["rouge_l_delta_vs_hard_label"] = aggregate(
                distilled["rouge_l"]["value"] - hard_label["rouge_l"]["value"])
    for count in ("labelled_examples", "teacher_answered_examples"):
        if count in comparison:
            metrics[count] = aggregate(comparison[count])
    if "initial" in measured:
        metrics["perplexity_ratio_vs_initial"] = aggregate(
            measured["initial"]["perplexity"]["value"] / distilled["perplexity"]["value"])
    return metrics


def _quantization_report(quantization_dir: str | None) -> dict[str, Any] | None:
    if not quantization_dir:
        return None
    path = Path(quantization_dir)
    path = path / "quantization.json" if path.is_dir() else path
    if not path.is_file():
        raise StageError(f"--quantization-dir {quantization_dir} holds no quantization.json; give "
                         "the output folder of steps.quantize")
    return json.loads(path.read_text())


def held_out_examples(
    records: list, fmt: Any, chat_template: bool, max_samples: int
) -> tuple[list[dict[str, Any]], list[tuple[Any, Any]], list[PreferencePair]]:
    """What SFT trains on, for the loss; the prompt/response pairs among them (at most
    `max_samples`), for generation; the preference pairs of preference data, whose chosen response
    is the reference for both."""
    held_out = preference_pairs(records, fmt, chat_template) if fmt.name == "preference" else []
    if held_out:
        examples = [{"prompt": pair.prompt, "completion": pair.chosen} for pair in held_out]
    else:
        examples = [sft_example(record.data, fmt, chat_template) for record in records]
        examples = [example for example in examples if example is not None]
    pairs = [prompt_and_completion(example) for example in examples]
    # (An implicit prompt that TRL's split leaves empty has nothing to answer.)
    pairs = [pair for pair in pairs if pair is not None and pair[0]][:max_samples]
    return examples, pairs, held_out


def score_model(
    name: str,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: list[dict[str, Any]],
    pairs: list[tuple[Any, Any]],
    held_out: list[PreferencePair],
    *,
    max_new_tokens: int,
    batch_size: int,
    max_seq_length: int,
) -> dict[str, list]:
    """One model's per-example figures on the held-out data (`held_out_examples`): losses, greedy
    answers and their scores, margins of preference pairs; `model_metrics` sums them up."""
    print(f"{name}: loss on {len(examples)} examples", flush=True)
    losses = example_losses(model, tokenizer, examples, batch_size, max_seq_length)
    print(f"{name}: generating {len(pairs)} answers", flush=True)
    generations, stopped, token_ids = generate_answers(
        model, tokenizer, [prompt for prompt, _ in pairs], max_new_tokens, batch_size
    )
    references = [response_text(completion) for _, completion in pairs]
    result = {
        "losses": losses,
        "generations": generations,
        "rouge_l": rouge_l(references, generations),
        "exact_match": exact_match(references, generations),
        "eos_rate": [float(flag) for flag in stopped],
        "token_ids": token_ids,
    }
    if held_out:
        print(f"{name}: log-probability margins of {len(held_out)} preference pairs", flush=True)
        result["margins"] = logprob_margins(model, tokenizer, held_out, batch_size)
    return result


# --- The reward model as a judge ------------------------------------------------------------------


def _reward_model_source(reward_model_dir: str | None) -> str | None:
    """--reward-model-dir resolved as --model-dir is: a model folder, or one with model.tar.gz."""
    if not reward_model_dir:
        return None
    if not Path(reward_model_dir).exists():
        raise StageError(
            f"--reward-model-dir {reward_model_dir} does not exist; give the folder (or "
            "model.tar.gz) that python -m steps.reward_model wrote"
        )
    return resolve_model_source(Path(reward_model_dir), reward_model_dir)


def _reward_tokenizer(
    reward_source: str, tokenizer: PreTrainedTokenizerBase
) -> PreTrainedTokenizerBase:
    """The tuned model's tokenizer where the reward model reads the same vocabulary (the answers
    are then scored as they were written), else the reward model's own (steps.reward_model saves
    one with it)."""
    own = load_tokenizer(reward_source)
    if own.get_vocab() == tokenizer.get_vocab():
        return tokenizer
    print("the reward model's vocabulary differs from the tuned model's: it reads the answers "
          "with its own tokenizer", flush=True)
    return own


def _judge(
    reward_model: PreTrainedModel,
    reward_tokenizer: PreTrainedTokenizerBase,
    results: dict[str, dict[str, list]],
    judged: dict[str, Any],
    prompts: list[Any],
    held_out: list[PreferencePair],
    batch_size: int,
) -> None:
    """Rewards of each model's answers into `results`; the win rate of tuned over base and the
    reward model's own accuracy on the held-out pairs into `judged`."""
    if prompts:
        for name, result in results.items():
            print(f"{name}: rewards of {len(prompts)} answers", flush=True)
            result["rewards"] = reward_scores(
                reward_model, reward_tokenizer, prompts, result["generations"], batch_size
            )
        if "base" in results:
            judged["win_rate"] = win_rate(
                reward_model, reward_tokenizer, prompts, results["tuned"]["generations"],
                results["base"]["generations"], batch_size,
            )
    else:
        print("no prompts to answer: the reward model judges no answers", flush=True)
    if held_out:
        judged["reward_model_accuracy"], _ = reward_accuracy(
            reward_model, reward_tokenizer, held_out, batch_size
        )


# --- Checks: the chat template and stopping -------------------------------------------------------


def chat_template_renders(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the tokenizer has a chat template that renders a user turn, and adds a generation
    prompt (the assistant's header) when asked: what every chat prompt of the model relies on."""
    if not tokenizer.chat_template:
        return False
    turn = [{"role": "user", "content": "Hello there"}]
    try:
        prompted = tokenizer.apply_chat_template(turn, tokenize=False, add_generation_prompt=True)
        plain = tokenizer.apply_chat_template(turn, tokenize=False)
    except Exception:  # noqa: BLE001 (a template is a program of its own: any failure is a no)
        return False
    return "Hello there" in prompted and len(prompted) > len(plain)


def _checks(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    result: dict[str, list],
    max_new_tokens: int,
) -> dict[str, Any]:
    """evaluation.json's "checks": the tuned model's chat template and whether its answers stop."""
    stops = stop_token_ids(model, tokenizer)
    answers = len(result["eos_rate"])
    eos_rate = _mean(result["eos_rate"]) if answers else None
    checks = {
        "chat_template": chat_template_renders(tokenizer),
        "eos_rate": eos_rate,
        "answers": answers,
        "max_new_tokens": max_new_tokens,
        "stop_tokens": tokenizer.convert_ids_to_tokens(stops),
    }
    template = "renders" if checks["chat_template"] else "is missing or does not render"
    stopping = (
        f"{round(eos_rate * answers)} of {answers} answers ended with a stop token "
        f"({', '.join(checks['stop_tokens'])}) within {max_new_tokens} new tokens"
        if answers else "no answers to check"
    )
    print(f"checks: the chat template {template} a user turn and the generation prompt; "
          f"{stopping}", flush=True)
    return checks


# --- Helpers of this stage ------------------------------------------------------------------------


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def _metric(value: float, samples: list[float]) -> dict[str, float]:
    """A metric in the model-quality shape."""
    return {
        "value": float(value),
        "standard_deviation": float(statistics.pstdev(samples)) if len(samples) > 1 else 0.0,
    }


def _plot_comparison(metrics: dict[str, dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [name for name in METRIC_NAMES if name in metrics]
    columns = min(len(names), 6)
    rows = math.ceil(len(names) / columns)
    height = 3.5 * rows
    # Fixed margins (0.4 inch above and below, for titles and labels): each panel writes its
    # values on its bars and has no y axis to lay out. The y ticks and tight_layout (which draws
    # the figure once more to measure them) were half of the 0.45 CPU s every evaluation paid.
    figure, axes = plt.subplots(
        rows, columns, figsize=(3 * columns, height), squeeze=False,
        gridspec_kw={"left": 0.1 / columns, "right": 1 - 0.1 / columns, "top": 1 - 0.4 / height,
                     "bottom": 0.4 / height, "wspace": 0.15, "hspace": 0.3},
    )
    for axis in axes.flat[len(names):]:
        axis.axis("off")
    for axis, name in zip(axes.flat, names):
        single = "tuned" if name not in ("kl_to_base", "win_rate") else "tuned vs base"
        labels = ["base", "tuned"] if f"base_{name}" in metrics else [single]
        values = [metrics[f"base_{name}"]["value"]] if len(labels) == 2 else []
        values.append(metrics[name]["value"])
        # A value that is not a number (a perplexity that overflowed) has no bar: its text says it.
        heights = [value if math.isfinite(value) else 0.0 for value in values]
        axis.bar(range(len(labels)), heights, color=["#9e9e9e", "#1f77b4"][-len(labels):])
        axis.set_xticks(range(len(labels)), labels)
        axis.set_yticks([])
        axis.axhline(0, color="black", linewidth=0.8)
        axis.margins(y=0.12)  # room beyond the longest bar for its value
        if not any(heights):
            axis.set_ylim(-1, 1)  # bars of 0, their values on the line
        axis.set_title(name)
        for x, (value, height) in enumerate(zip(values, heights)):  # beyond the end of its bar
            axis.annotate(f"{value:.3g}", (x, height), ha="center", fontsize=8,
                          va="bottom" if height >= 0 else "top")
    figure.savefig(path, dpi=100)
    plt.close(figure)


if __name__ == "__main__":
    contract.run(main, EvaluateConfig, job="processing")

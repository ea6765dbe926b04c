"""Distillation on SmolLM2-135M-Instruct: which student the recipes start from, and what
distilling it bought over training it on the labels alone.

    python -m benchmarks.distillation [--teacher MODEL] [--student SPEC ...] [--steps N]
        [--learning-rate LR] [--alpha A] [--temperature T] [--top-k K] [--batch B] [--seed S]
        [--prompts N] [--quick] [--work DIR]
    python -m benchmarks.distillation --setting alpha=1 --setting alpha=0,temperature=1 ...
        [--seed S] [--cache-top-k K] --work DIR

The demo SFT data are prepared as the distill recipe prepares them (steps.data_prep: 10% held
out, seed 42); the teacher's top-16 outputs are computed once (steps.teacher_logits), with
--prompts N, also its answers to N demo prompts without reference answers
(steps.common.demo_data.demo_task_prompts, none of them a labelled prompt; the recipes give their
teacher none); then the distillation stage (steps.distill) runs once per student spec with
compare_students on, as the recipes run it: each run trains the distilled student (on the labelled
data, and the teacher's answers if any) and a hard-label student (the same initial student, alpha
1, the same steps, batch size and learning rate, on every labelled example: it has no teacher to
answer the other prompts) and measures both and the initial student with steps.evaluate's
functions on the held-out split. The teacher is measured the same way.

--teacher: the model the students learn from and are cut from. Default `sft`: the distill
recipe's teacher, SmolLM2-135M-Instruct after the recipe's SFT stage (LoRA at its learning rate
1e-3, --teacher-steps steps, run here).
Or a model spec or folder: builtin:smollm2-135m-instruct itself, or a pipeline's teacher such as
full-lifecycle's DPO output (.../DPO/opt_ml/model).

Per student: seconds per optimizer step (the stage's own runtime / steps, distilled and
hard-label), held-out perplexity and perplexity_ratio (teacher / student), ROUGE-L as a fraction
of the teacher's, and the hard-label and initial students' figures. The targets of the recipes'
default student: perplexity_ratio >= 0.7 and ROUGE-L >= 0.7x the teacher's, distilled beating
hard-label.

--setting (repeatable): a sweep of the distillation loss instead. The first student (default
teacher:layers=15) is distilled once per setting (comma-separated DistillStageConfig fields:
alpha, temperature, top_k, learning_rate, max_steps; the others as above) at --seed, without
compare_students, and measured held out as compare_students measures; `alpha=1` is the hard-label
student. Each run is appended to DIR/settings.jsonl (a setting already there at that seed is not
run again: the same command resumes an interrupted sweep), and the section "Distillation: which loss
beats the hard labels" is rendered from every run in that file (one invocation per seed, in
turn or at once): per setting and seed, perplexity and ROUGE-L against the hard-label student of
the same seed. The teacher's outputs are cached at --cache-top-k (default: the largest top_k
asked for), so that one cache serves every top_k. --teacher-label NAME: a sweep on a --teacher
folder gets its own section, "... (NAME teacher)" in distillation-settings-NAME.json, beside the
`sft` teacher's (e.g. full-lifecycle-dpo for full-lifecycle's DPO output). --held-out N: each
student of the sweep measured on N demo-task records whose prompts are not in the demo dataset
instead of the validation split's 24 answers (DIR/settings-held-out-N.jsonl, its own section): a
ROUGE-L difference of one answer in 24 is within the seed-to-seed noise.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

from benchmarks import common

NAME, TITLE, ORDER = "distillation", "Distillation: the default student and its baselines", 60
STUDENTS = ("teacher:layers=15", "teacher:layers=10", ("config:layers=2+hidden=128+"
            "intermediate=512+heads=4+kv_heads=2"))
SAMPLES, NEW_TOKENS, TOP_K, SEQUENCE = 24, 32, 16, 256
SWEEP_NAME, SWEEP_TITLE = "distillation-settings", "Distillation: which loss beats the hard labels"
# The draw of --held-out's records: not --prompts' (seed 1), so that no answered prompt is measured.
HELD_OUT_SEED = 2
SWEPT = {"alpha": float, "temperature": float, "top_k": int, "learning_rate": float,
         "max_steps": int}
TEACHER_LEARNING_RATE = 1e-3  # the distill recipe's SFT stage's


def prepare(root: Path, teacher: str, teacher_steps: int, prompts: int,
            top_k: int = TOP_K) -> tuple[Path, Path, str]:
    """The demo data split as DataPrep splits it, the teacher (the distill recipe's SFT stage run
    here, for `sft`), its cached top-k outputs and its answers to `prompts` demo prompts."""
    from steps import data_prep, sft, teacher_logits
    from steps.common import demo_data
    from steps.common.models import SMOLLM2

    raw = demo_data.write_demo_dataset(root / "raw" / "sft-demo.jsonl")
    data = root / "data"
    data_prep.main(data_prep.DataPrepConfig(input_dir=str(raw.parent), output_dir=str(data),
                                            tokenizer=SMOLLM2 if teacher == "sft" else teacher,
                                            validation_fraction=0.1, seed=42))
    if teacher == "sft":  # the distill recipe's SFT stage, as it sets it
        common.progress("training the teacher: the distill recipe's SFT stage")
        summary = common.run_stage(
            sft.main, sft.SFTStageConfig(base_model=SMOLLM2, peft_method="lora",
                                         learning_rate=TEACHER_LEARNING_RATE,
                                         max_seq_length=SEQUENCE, per_device_batch_size=8,
                                         max_steps=teacher_steps, checkpoint_steps=0,
                                         seed=42),
            {"train": data / "train.jsonl", "validation": data / "validation.jsonl"},
            keep=root / "sft-teacher")
        teacher = str(root / "sft-teacher")
        common.progress(f"teacher: eval_loss {summary['training']['eval_loss']:.4f}")
    unlabelled = (demo_data.write_demo_task_prompts(root / "prompts" / "prompts.jsonl", prompts)
                  if prompts else None)
    cache = root / "teacher"
    teacher_logits.main(teacher_logits.TeacherLogitsConfig(
        model_dir=teacher, data_dir=str(data), output_dir=str(cache), top_k=top_k,
        max_seq_length=SEQUENCE, prompts_dir=str(unlabelled) if unlabelled else None,
        # Answers in batches of 32 cost about 0.6x the CPU of the default 8's.
        max_new_tokens=NEW_TOKENS, batch_size=32 if prompts else 8))
    return data, cache, teacher


def held_out_figures(model_dir: str, data: Path, samples: int = SAMPLES,
                     ) -> dict[str, dict[str, float]]:
    """A model's held-out figures (the teacher's, a student's) on data/validation.jsonl, measured
    as the stage measures its students: `samples` answers."""
    from steps.common.datasets import load_records
    from steps.common.models import load_model, load_tokenizer
    from steps.evaluate import held_out_examples, model_metrics, score_model

    fmt, records = load_records(data / "validation.jsonl")
    tokenizer = load_tokenizer(model_dir)
    model = load_model(model_dir).eval()
    examples, pairs, held_out = held_out_examples(records, fmt, bool(tokenizer.chat_template),
                                                  samples)
    result = score_model(model_dir, model, tokenizer, examples, pairs, held_out,
                         max_new_tokens=NEW_TOKENS, batch_size=8, max_seq_length=SEQUENCE)
    return model_metrics({"tuned": result}, {})


def fresh_held_out(root: Path, answers: int) -> Path:
    """A held-out folder of `answers` demo-task records none of whose prompts is in the demo
    dataset (steps.common.demo_data.demo_task_records, another draw than --prompts'), whose
    validation.jsonl measures a model on more answers than the recipe's split holds."""
    from steps.common import demo_data

    folder = root / f"held-out-{answers}"
    if not (folder / "validation.jsonl").exists():
        demo_data.write_demo_task_records(folder / "validation.jsonl", answers, HELD_OUT_SEED)
    return folder


def teacher_figures(teacher: str, data: Path, work: Path | None, samples: int = SAMPLES,
                    ) -> dict[str, dict[str, float]]:
    """The teacher's held-out figures on `data`; kept in the --work folder (which holds one
    teacher), in `data` for a fresh held-out set."""
    kept = (work / "teacher-figures.json" if samples == SAMPLES else
            data / "teacher-figures.json") if work else None
    if kept and kept.exists():
        return json.loads(kept.read_text())
    common.progress("measuring the teacher")
    figures = held_out_figures(teacher, data, samples)
    if kept:
        kept.write_text(json.dumps(figures, indent=2, default=float) + "\n")
    return figures


def distil(student: str, teacher: str, data: Path, cache: Path, settings: dict[str, Any],
           compare: bool = True, keep: Path | None = None) -> dict[str, Any]:
    """One distillation stage run (with compare_students unless told not): its training summary;
    `keep`: where to copy the student."""
    from steps import distill

    config = distill.DistillStageConfig(
        student_model=student, compare_students=compare, comparison_samples=SAMPLES,
        comparison_new_tokens=NEW_TOKENS, max_seq_length=SEQUENCE,
        checkpoint_steps=0, logging_steps=10, **settings)
    channels = {"train": data / "train.jsonl", "validation": data / "validation.jsonl",
                "teacher": cache}
    if student.startswith("teacher:"):
        channels["teacher_model"] = Path(teacher) if Path(teacher).exists() else None
        if channels["teacher_model"] is None:  # a builtin spec: no channel, the setting
            del channels["teacher_model"]
            config.teacher_model = teacher
    return common.run_stage(distill.main, config, channels, keep=keep)


def summarise(teacher: dict[str, Any], runs: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for student, summary in runs.items():
        comparison = summary["distillation"]["comparison"]
        figures = comparison["students"]
        steps = summary["training"]["global_step"]

        def value(who: str, name: str, figures: dict = figures) -> float:
            return figures[who][name]["value"]

        rows.append({
            "student": student,
            "parameters": summary["training"]["total_parameters"],
            "steps": steps,
            "s_per_step": summary["training"]["runtime_s"] / steps,
            "hard_label_s_per_step": comparison["hard_label_runtime_s"] / steps,
            "learning_rate": summary["hyperparameters"]["learning_rate"],
            "teacher_perplexity": teacher["perplexity"]["value"],
            "teacher_rouge_l": teacher["rouge_l"]["value"],
            **{f"{who}_{name}": value(who, name) for who in ("distilled", "hard_label", "initial")
               for name in ("perplexity", "rouge_l", "kl_to_teacher")},
            "perplexity_ratio": teacher["perplexity"]["value"] / value("distilled", "perplexity"),
            "rouge_l_fraction": value("distilled", "rouge_l") / max(teacher["rouge_l"]["value"],
                                                                     1e-9),
            "perplexity_ratio_vs_hard_label": (value("hard_label", "perplexity")
                                               / value("distilled", "perplexity")),
            "rouge_l_delta_vs_hard_label": (value("distilled", "rouge_l")
                                            - value("hard_label", "rouge_l")),
            "labelled_examples": comparison["labelled_examples"],
            "teacher_answered_examples": comparison["teacher_answered_examples"],
        })
    return rows


def render(rows: list[dict[str, Any]], settings: dict[str, Any], teacher: str) -> str:
    header = ["student", "parameters", "steps", "s/step (distil, hard-label)", "perplexity",
              "perplexity_ratio", "ROUGE-L (x teacher)", "hard-label perplexity, ROUGE-L",
              "initial perplexity", "distilled beats hard-label (perplexity ratio, ROUGE-L +)"]
    table = [[f"`{r['student']}`", f"{r['parameters'] / 1e6:.1f}M", r["steps"],
              f"{r['s_per_step']:.2f}, {r['hard_label_s_per_step']:.2f}",
              f"{r['distilled_perplexity']:.3g} (teacher {r['teacher_perplexity']:.3g})",
              f"{r['perplexity_ratio']:.3f}",
              f"{r['distilled_rouge_l']:.3f} ({r['rouge_l_fraction']:.2f}x)",
              f"{r['hard_label_perplexity']:.3g}, {r['hard_label_rouge_l']:.3f}",
              f"{r['initial_perplexity']:.3g}",
              _verdict(r)] for r in rows]
    shown = ", ".join(f"{k}={v}" for k, v in settings.items())
    return "\n".join([
        (f"Teacher `{teacher}`; the demo SFT data as the distill recipe prepares it; cached "
        f"teacher outputs; {shown}; held-out figures on the validation split "
        f"({SAMPLES} greedy answers of at most {NEW_TOKENS} tokens). Seconds per step are the "
        "stage's own training time over its steps, on a machine others may share: compare them "
        "with each other, not across sessions."), "",
        common.table(header, table), "",
        ("perplexity_ratio = teacher perplexity / student perplexity; a hard-label student is the "
        "same initial student trained on the labels alone for the same steps, batch size and "
        "learning rate."),
        "", _trained_on(rows[0]),
    ])


def _verdict(row: dict[str, Any]) -> str:
    ratio, delta = row["perplexity_ratio_vs_hard_label"], row["rouge_l_delta_vs_hard_label"]
    both = "yes" if ratio > 1 and delta >= 0 else "perplexity only" if ratio > 1 else \
        "ROUGE-L only" if delta > 0 else "no"
    return f"{both} ({ratio:.3f}, {delta:+.3f})"


def _trained_on(row: dict[str, Any]) -> str:
    """Where a win comes from: what each student trained on."""
    labelled, answered = row["labelled_examples"], row["teacher_answered_examples"]
    if not answered:
        return (f"Both students trained on the same {labelled} labelled examples: the distilled "
                "one also on the teacher's top-k outputs at their answers.")
    return (f"What each trained on: the hard-label student on all {labelled} labelled examples "
            f"(every one that exists); the distilled student on those and the teacher's answers to "
            f"{answered} prompts that have no reference answer, with the teacher's top-k outputs "
            "at every answer. A win comes from the teacher answering what was unlabelled as well "
            "as from its soft labels.")


# --- The sweep of the loss (--setting) ----------------------------------------------------------


def parse_setting(text: str) -> dict[str, Any]:
    """`alpha=0,temperature=1,top_k=64` as DistillStageConfig fields."""
    setting = {}
    for pair in text.split(","):
        key, _, value = pair.partition("=")
        if key not in SWEPT or not value:
            raise argparse.ArgumentTypeError(
                f"--setting {text}: give key=value pairs of {', '.join(SWEPT)}")
        setting[key] = SWEPT[key](value)
    return setting


def setting_name(setting: dict[str, Any]) -> str:
    return ", ".join(f"{key}={value:g}" for key, value in setting.items())


def sweep(student: str, teacher: str, data: Path, cache: Path, settings: dict[str, Any],
          swept: list[dict[str, Any]], log: Path, measured: tuple[Path, int]) -> None:
    """Each of `swept` over `settings`, distilled and measured held out (`measured`: the folder
    of the held-out data and how many answers); a row of `log` each.
    A setting already in `log` at this seed is not run again: the same command resumes a sweep."""
    done = {(row["setting"], row["seed"]) for row in map(json.loads, log.read_text().splitlines())
            } if log.exists() else set()
    for setting in swept:
        run = {**settings, **setting}
        if (setting_name(setting), run["seed"]) in done:
            common.progress(f"{setting_name(setting)}, seed {run['seed']}: in {log}")
            continue
        common.progress(f"distilling {student}: {setting_name(setting)}, seed {run['seed']}")
        with tempfile.TemporaryDirectory(prefix="bench-distillation-student-") as tmp:
            summary = distil(student, teacher, data, cache, run, compare=False,
                             keep=Path(tmp) / "student")
            figures = held_out_figures(str(Path(tmp) / "student"), *measured)
        row = {"setting": setting_name(setting), "seed": run["seed"], "student": student,
               **{key: run[key] for key in ("alpha", "temperature", "top_k", "max_steps",
                                            "per_device_batch_size")},
               "learning_rate": summary["hyperparameters"]["learning_rate"],
               "perplexity": figures["perplexity"]["value"],
               "rouge_l": figures["rouge_l"]["value"],
               "exact_match": figures["exact_match"]["value"],
               "kl_to_teacher": summary["distillation"]["eval_kl_to_teacher"],
               "s_per_step": summary["training"]["runtime_s"] / summary["training"]["global_step"]}
        common.progress(f"  perplexity {row['perplexity']:.3f}, ROUGE-L {row['rouge_l']:.3f}")
        with log.open("a") as file:
            file.write(json.dumps(row) + "\n")


def render_sweep(rows: list[dict[str, Any]], teacher: dict[str, Any], cache_top_k: int,
                 label: str = "sft", held_out: int = 0) -> str:
    """Per setting and seed, held-out figures against the hard-label student (alpha=1) of the
    same seed, learning rate and steps; the settings' means; whether it beat it at every seed."""
    hard = {(r["seed"], r["learning_rate"], r["max_steps"]): r for r in rows if r["alpha"] == 1}
    seeds = sorted({r["seed"] for r in rows})
    settings = list(dict.fromkeys(r["setting"] for r in rows))
    header = ["setting", *(f"seed {seed}: perplexity, ROUGE-L" for seed in seeds),
              "mean perplexity, ROUGE-L",
              *(f"seed {seed} vs hard-label: perplexity ratio, ROUGE-L delta" for seed in seeds),
              "beats hard-label at every seed measured"]
    table, deltas = [], []  # deltas: each setting's ROUGE-L deltas, where it has several seeds
    for setting in settings:
        runs = {r["seed"]: r for r in rows if r["setting"] == setting}
        baseline = all(r["alpha"] == 1 for r in runs.values())
        against = {seed: (hard[key]["perplexity"] / r["perplexity"],
                          r["rouge_l"] - hard[key]["rouge_l"])
                   for seed, r in runs.items()
                   if (key := (seed, r["learning_rate"], r["max_steps"])) in hard}
        cells = [f"{runs[s]['perplexity']:.3f}, {runs[s]['rouge_l']:.3f}" if s in runs else "-"
                 for s in seeds]
        versus = ["(the baseline)" if baseline else
                  f"{against[s][0]:.3f}, {against[s][1]:+.3f}" if s in against else "-"
                  for s in seeds]
        # A win: a lower perplexity at every seed it was measured at, ROUGE-L not worse at any.
        wins = (not baseline and bool(against)
                and all(ratio > 1 and delta >= 0 for ratio, delta in against.values()))
        mean_ppl = sum(r["perplexity"] for r in runs.values()) / len(runs)
        mean_rouge = sum(r["rouge_l"] for r in runs.values()) / len(runs)
        table.append([f"`{setting}`", *cells, f"{mean_ppl:.3f}, {mean_rouge:.3f}", *versus,
                      "-" if baseline else "yes" if wins else "no"])
        if not baseline and len(against) > 1:
            deltas.append([delta for _, delta in against.values()])
    first = rows[0]
    samples = held_out or SAMPLES
    where = (f"{held_out} demo-task records whose prompts are not in the demo dataset, --held-out"
             if held_out else "the validation split")
    # The rate of the runs whose setting names none: the stage's for a cut student when they ran.
    unset = sorted({r["learning_rate"] for r in rows if "learning_rate=" not in r["setting"]})
    rate = (f", the stage's learning rate for a cut student ({', '.join(f'{r:g}' for r in unset)})"
            if unset else "")
    return "\n".join([
        (f"Student `{first['student']}` distilled from the `{label}` teacher (held out: perplexity "
         f"{teacher['perplexity']['value']:.3f}, ROUGE-L {teacher['rouge_l']['value']:.3f}) on "
         f"the demo SFT data, {first['max_steps']} steps of batch {first['per_device_batch_size']}"
         f" unless the setting says, the teacher's outputs cached at top-{cache_top_k}. Each "
         "setting is the loss alpha * CE + (1 - alpha) * T^2 * KL(teacher_T || student_T) on the "
         "answer tokens (alpha=1: the hard-label student, the baseline (c)); fields it does not "
         f"set: top_k=16{rate}. Held-out figures on {where} ({samples} "
         f"greedy answers of at most {NEW_TOKENS} tokens); a perplexity ratio above 1: a lower "
         "perplexity than the hard-label student of the same seed, learning rate and steps. One "
         "invocation per seed (this command with each --seed)."), "",
        common.table(header, table), "",
        _noise(list(hard.values()), deltas, samples),
    ])


def _noise(hard: list[dict[str, Any]], deltas: list[list[float]], samples: int) -> str:
    """How far the figures move with the seed alone, so that a difference is not read into
    noise: the hard-label student's spread over seeds, one answer's weight in ROUGE-L, and the
    spread of a setting's ROUGE-L delta from seed to seed (pooled over the settings)."""
    if len(hard) < 2:
        return ""
    rouge = [r["rouge_l"] for r in hard]
    perplexity = [r["perplexity"] for r in hard]
    text = (f"Noise: the hard-label student alone, over {len(hard)} seeds, has perplexity "
            f"{min(perplexity):.3f} to {max(perplexity):.3f} and ROUGE-L {min(rouge):.3f} to "
            f"{max(rouge):.3f} (standard deviation {statistics.stdev(rouge):.3f}); one of the {samples} answers "
            f"weighs up to {1 / samples:.3f} of ROUGE-L.")
    freedom = sum(len(d) - 1 for d in deltas)
    if freedom:
        pooled = (sum((x - sum(d) / len(d)) ** 2 for d in deltas for x in d) / freedom) ** 0.5
        text += (f" A setting's ROUGE-L delta against the hard-label student moves from seed to "
                 f"seed with a standard deviation of {pooled:.3f} (pooled over "
                 f"{len(deltas)} settings), so its mean over {len(hard)} seeds has a standard "
                 f"error of about {pooled / len(hard) ** 0.5:.3f}: a mean difference in ROUGE-L "
                 f"below about twice that ({2 * pooled / len(hard) ** 0.5:.3f}) is within the "
                 "noise of these answers.")
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", default="sft")
    parser.add_argument("--teacher-steps", type=int, default=40,
                        help="SFT steps of the `sft` teacher (the distill recipe's)")
    parser.add_argument("--student", action="append", help="student spec (repeatable)")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--learning-rate", type=float, default=0.0, help="0: the stage's default")
    parser.add_argument("--alpha", type=float, default=0.8)
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--top-k", type=int, default=TOP_K,
                        help="teacher tokens per position the student learns from")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seed", type=int, default=42,
                        help="the students' seed (batch order); another one shows run-to-run noise")
    parser.add_argument("--quick", action="store_true",
                        help="one student, 10 steps (a teacher of 5 SFT steps)")
    parser.add_argument("--prompts", type=int, default=0,
                        help="demo prompts without reference answers the teacher answers and the "
                        "distilled student also trains on (0: none, as in the recipes)")
    parser.add_argument("--work", type=Path, help="keep the data and teacher outputs here")
    parser.add_argument("--setting", type=parse_setting, action="append",
                        help="sweep the loss: alpha=A,temperature=T,top_k=K,learning_rate=LR,"
                        "max_steps=N (repeatable; needs --work)")
    parser.add_argument("--teacher-label", help="the sweep's name for a --teacher folder: its "
                        "own section, distillation-settings-LABEL (default: the sft teacher's)")
    parser.add_argument("--held-out", type=int, default=0,
                        help="with --setting: measure each student on N demo-task records whose "
                        "prompts are not in the demo dataset instead of the recipe's validation "
                        "split (24 answers): its own log and section")
    parser.add_argument("--cache-top-k", type=int, default=0,
                        help="top-k the teacher's outputs are cached at (0: the largest used)")
    args = parser.parse_args()
    if args.held_out and not args.setting:
        parser.error("--held-out measures a sweep's students: give --setting")
    if args.setting and not args.work:
        parser.error("--setting appends to DIR/settings.jsonl: give --work DIR")
    if args.setting and args.teacher != "sft" and not args.teacher_label:
        parser.error(f"--teacher {args.teacher} with --setting: give --teacher-label NAME, the "
                     "sweep's own section (else it replaces the sft teacher's)")
    students = args.student or (STUDENTS[:1] if args.quick else STUDENTS)
    settings = {"max_steps": 10 if args.quick else args.steps, "learning_rate": args.learning_rate,
                "alpha": args.alpha, "temperature": args.temperature, "top_k": args.top_k,
                "per_device_batch_size": args.batch, "seed": args.seed}
    cache_top_k = args.cache_top_k or max(
        [args.top_k, *(s.get("top_k", args.top_k) for s in args.setting or [])])
    with tempfile.TemporaryDirectory(prefix="bench-distillation-") as tmp:
        root = args.work or Path(tmp)
        if (root / "teacher" / "manifest.json").exists():
            data, cache = root / "data", root / "teacher"
            teacher_model = (str(root / "sft-teacher") if args.teacher == "sft"
                             else args.teacher)
            cached = json.loads((cache / "manifest.json").read_text())["splits"].get(
                "teacher_answered", {}).get("prompts", 0)
            if cached != args.prompts:
                parser.error(f"--work {root} holds the teacher's answers to {cached} prompts, not "
                             f"--prompts {args.prompts}; give another --work folder")
        else:
            common.progress(f"preparing the data and the outputs of {args.teacher}")
            data, cache, teacher_model = prepare(root, args.teacher,
                                                 5 if args.quick else args.teacher_steps,
                                                 args.prompts, cache_top_k)
        cache_top_k = json.loads((cache / "manifest.json").read_text())["top_k"]
        if args.setting:
            measured = ((fresh_held_out(root, args.held_out), args.held_out) if args.held_out
                        else (data, SAMPLES))
            teacher = teacher_figures(teacher_model, *measured[:1], root, measured[1])
            log = root / (f"settings-held-out-{args.held_out}.jsonl" if args.held_out
                          else "settings.jsonl")
            sweep(students[0], teacher_model, data, cache, settings, args.setting, log, measured)
            rows = [json.loads(line) for line in log.read_text().splitlines()]
            label = args.teacher_label or "sft"
            name, title = ((SWEEP_NAME, SWEEP_TITLE) if label == "sft" else
                           (f"{SWEEP_NAME}-{label}", f"{SWEEP_TITLE} ({label} teacher)"))
            if args.held_out:
                name, title = (f"{name}-held-out-{args.held_out}",
                               f"{title}, on {args.held_out} fresh held-out answers")
            common.save_result(name, title,
                               render_sweep(rows, teacher, cache_top_k, label, args.held_out),
                               {"teacher": args.teacher, "teacher_label": label,
                                "cache_top_k": cache_top_k, "held_out": args.held_out,
                                "rows": rows}, ORDER)
            return
        teacher = teacher_figures(teacher_model, data, root if args.work else None)
        runs = {}
        for student in students:
            common.progress(f"distilling {student}")
            runs[student] = distil(student, teacher_model, data, cache, settings)
    rows = summarise(teacher, runs)
    common.save_result(NAME, TITLE, render(rows, settings, args.teacher),
                       {"teacher": args.teacher, "settings": settings, "rows": rows,
                        "summaries": {s: r["distillation"] for s, r in runs.items()}}, ORDER)


if __name__ == "__main__":
    main()

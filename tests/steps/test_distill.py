"""The distillation stage, run as SageMaker runs it: a small student learns from a teacher's cached
top-k outputs (or from the teacher itself), and beats a hard-label student at matching it."""

import contextlib
import io
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from steps import distill, teacher_logits
from steps.common import contract, distillation, models
from steps.common.contract import StageError

from .conftest import TrainingJob, counting_records, write_jsonl
from .stage_runs import StageRun

# The same student and schedule for every run: only the teacher signal differs.
STUDENT = {"student_model": "config:layers=1", "max_steps": "40", "precision": "fp32",
           "checkpoint_steps": "0", "logging_steps": "10", "seed": "0"}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("data")
    write_jsonl(folder / "train.jsonl", counting_records(32))
    write_jsonl(folder / "validation.jsonl", counting_records(8))
    return folder


@pytest.fixture(scope="module")
def cache(sft_run, data_dir, tmp_path_factory) -> Path:
    """The SFT-tuned adapter's top-16 outputs: the teacher of every run below."""
    output = tmp_path_factory.mktemp("teacher") / "out"
    teacher_logits.main(teacher_logits.TeacherLogitsConfig(
        model_dir=str(sft_run.model_dir), data_dir=str(data_dir), output_dir=str(output)))
    return output


def run_distill(root: Path, data_dir: Path, teacher: Path | None = None,
                **hyperparameters: str) -> StageRun:
    """One distillation training job under `root`: channels train, validation (and teacher)."""
    stdout = io.StringIO()
    with pytest.MonkeyPatch.context() as monkeypatch, contextlib.redirect_stdout(stdout):
        job = TrainingJob(root, monkeypatch)
        monkeypatch.setenv("SM_CHANNEL_TRAIN", str(data_dir / "train.jsonl"))
        monkeypatch.setenv("SM_CHANNEL_VALIDATION", str(data_dir / "validation.jsonl"))
        if teacher is not None:
            monkeypatch.setenv("SM_CHANNEL_TEACHER", str(teacher))
        job.hyperparameters(**hyperparameters)
        try:
            contract.run(distill.main, distill.DistillStageConfig, job="training")
        except SystemExit as exited:
            raise AssertionError(
                f"the stage exited with {exited.code}:\n{stdout.getvalue()[-3000:]}") from None
    return StageRun(job.model_dir, job.output_data_dir, job.checkpoint_dir, stdout.getvalue())


def _no_teacher(*args, **kwargs):
    raise AssertionError("the teacher ran")


@pytest.fixture(scope="module")
def distilled(cache, data_dir, tmp_path_factory) -> StageRun:
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(distillation, "teacher_top_k", _no_teacher)
        monkeypatch.setattr(distill, "load_model", _no_teacher)
        return run_distill(tmp_path_factory.mktemp("distilled") / "opt-ml", data_dir, cache,
                           alpha="0.2", temperature="2.0", **STUDENT)


@pytest.fixture(scope="module")
def hard_label(cache, data_dir, tmp_path_factory) -> StageRun:
    """The same student, seed and steps on the ground truth alone (alpha 1): the baseline. A second
    run on the same cache, which must not run the teacher."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(distillation, "teacher_top_k", _no_teacher)
        monkeypatch.setattr(distill, "load_model", _no_teacher)
        return run_distill(tmp_path_factory.mktemp("hard-label") / "opt-ml", data_dir, cache,
                           alpha="1.0", **STUDENT)


def _full_kl_to_teacher(student_dir: Path, teacher_dir: Path, data_dir: Path) -> float:
    """Mean KL(teacher || student) over the whole vocabulary at the validation loss positions."""
    tokenizer = models.load_tokenizer(str(teacher_dir))
    records = [distillation.Record(r, "v") for r in counting_records(8)]
    fmt = distillation.DatasetFormat("prompt_completion", conversational=False)
    examples = distillation.tokenize_examples(records, fmt, tokenizer, 512)
    ids, mask, labels = distillation.pad_batch(examples, tokenizer.pad_token_id)
    trained = labels[:, 1:] != -100
    with torch.no_grad():
        teacher = models.load_model(str(teacher_dir)).eval()(input_ids=ids, attention_mask=mask)
        student = models.load_model(str(student_dir)).eval()(input_ids=ids, attention_mask=mask)
    teacher_logprobs = F.log_softmax(teacher.logits[:, :-1][trained], dim=-1)
    student_logprobs = F.log_softmax(student.logits[:, :-1][trained], dim=-1)
    return F.kl_div(student_logprobs, teacher_logprobs, log_target=True,
                    reduction="batchmean").item()


def test_a_distilled_student_is_closer_to_its_teacher_than_a_hard_label_student(
    distilled, hard_label, sft_run, data_dir
):
    soft = distilled.summary["distillation"]["eval_kl_to_teacher"]
    hard = hard_label.summary["distillation"]["eval_kl_to_teacher"]

    assert soft < 0.8 * hard
    # Over the whole vocabulary too, not only the teacher's top 16.
    assert (_full_kl_to_teacher(distilled.model_dir, sft_run.model_dir, data_dir)
            < _full_kl_to_teacher(hard_label.model_dir, sft_run.model_dir, data_dir))
    assert distilled.summary["training"]["global_step"] == 40


def test_students_trained_from_cached_outputs_make_no_teacher_forward_pass(distilled, hard_label):
    # The fixtures also replaced the teacher's forward and model loading with failures.
    for run in (distilled, hard_label):
        record = run.summary["distillation"]
        assert record["teacher_outputs"] == "cached" and record["teacher_forward_passes"] == 0
        assert "teacher forward passes in this job: 0" in run.stdout


def test_the_student_is_saved_as_a_full_model_that_reloads_and_generates(distilled, sft_run):
    files = {p.name for p in distilled.model_dir.iterdir()}
    summary = distilled.summary
    model = models.load_model(str(distilled.model_dir))
    tokenizer = models.load_tokenizer(str(distilled.model_dir))
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Count to 3."}],
                                           add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
    output = model.generate(**prompt, max_new_tokens=6, do_sample=False,
                            pad_token_id=tokenizer.pad_token_id)

    assert {"config.json", "model.safetensors", "tokenizer.json", "training_summary.json"} <= files
    assert model.config.num_hidden_layers == 1 and model.config.hidden_size == 64
    assert output.shape[1] > prompt["input_ids"].shape[1]
    record = summary["distillation"]
    assert record["teacher"] == str(sft_run.model_dir)
    assert (record["temperature"], record["alpha"], record["top_k"]) == (2.0, 0.2, 16)
    # Evaluation compares a student that started from noise with its teacher.
    assert summary["stage"] == "distill" and summary["base_model"] == str(sft_run.model_dir)
    assert summary["training"]["eval_loss"] is not None
    assert (distilled.output_data_dir / "loss_curve.png").exists()


def test_a_teacher_run_in_the_job_gives_the_same_student_as_its_cached_outputs(
    distilled, sft_run, data_dir, tmp_path
):
    on_the_fly = run_distill(tmp_path / "opt-ml", data_dir, teacher_model=str(sft_run.model_dir),
                             alpha="0.2", temperature="2.0", **STUDENT)
    record = on_the_fly.summary["distillation"]

    assert record["teacher_outputs"] == "on_the_fly"
    assert record["teacher_forward_passes"] == 4 + 1  # 32 train + 8 validation, batches of 8
    assert record["eval_kl_to_teacher"] == pytest.approx(
        distilled.summary["distillation"]["eval_kl_to_teacher"], rel=1e-4)


def test_on_policy_distillation_scores_the_students_own_samples(sft_run, data_dir, tmp_path):
    sampled: list[list[int]] = []
    original = distillation.teacher_top_k

    def recording(teacher, examples, *args, **kwargs):
        sampled.extend(e.labels for e in examples)
        return original(teacher, examples, *args, **kwargs)

    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(distillation, "teacher_top_k", recording)
        run = run_distill(tmp_path / "opt-ml", data_dir, teacher_model=str(sft_run.model_dir),
                          on_policy="true", max_new_tokens="8",
                          **{**STUDENT, "max_steps": "3", "logging_steps": "1"})
    record = run.summary["distillation"]
    # The validation examples once (for the KL), then one batch of 4 samples per step.
    step_samples = sampled[8:]
    ground_truth = {tuple(label for label in e.labels if label != -100)
                    for e in distillation.tokenize_examples(
                        [distillation.Record(r, "t") for r in counting_records(32)],
                        distillation.DatasetFormat("prompt_completion", False),
                        models.load_tokenizer(str(sft_run.model_dir)), 512)}

    assert record["teacher_outputs"] == "on_policy" and record["teacher_forward_passes"] == 1 + 3
    assert len(step_samples) == 3 * 4
    assert all(1 <= sum(label != -100 for label in labels) <= 8 for labels in step_samples)
    assert any(tuple(label for label in labels if label != -100) not in ground_truth
               for labels in step_samples)
    assert all(math.isfinite(loss) for loss in run.losses)


def test_a_student_with_another_tokenizer_is_refused_in_one_line(cache, data_dir, tmp_path,
                                                                 capsys):
    student = tmp_path / "student"
    models.load_model(models.TINY).save_pretrained(student)
    tokenizer = models.load_tokenizer(models.TINY)
    tokenizer.add_tokens(["<|tool|>"])
    tokenizer.save_pretrained(student)

    with pytest.MonkeyPatch.context() as monkeypatch:
        job = TrainingJob(tmp_path / "opt-ml", monkeypatch)
        monkeypatch.setenv("SM_CHANNEL_TRAIN", str(data_dir / "train.jsonl"))
        monkeypatch.setenv("SM_CHANNEL_TEACHER", str(cache))
        job.hyperparameters(student_model=str(student), peft_method="lora")
        with pytest.raises(SystemExit) as exited:
            contract.run(distill.main, distill.DistillStageConfig, job="training")

    message = capsys.readouterr().err.strip().splitlines()[-1]
    student_vocab = distillation.vocab_fingerprint(tokenizer)[:12]
    teacher_vocab = json.loads((cache / "manifest.json").read_text())["tokenizer"]["vocab_sha256"]
    assert exited.value.code == 2
    assert message.startswith(
        f"ERROR: the student's tokenizer ({student}: vocab sha256 {student_vocab}, 261 tokens) is "
        f"not the teacher's ({cache}/manifest.json: vocab sha256 {teacher_vocab[:12]});")
    assert job.failure_file.read_text() == message
    assert not job.model_dir.exists()


def test_cached_outputs_of_other_data_are_refused(cache, tmp_path):
    other = tmp_path / "data"
    write_jsonl(other / "train.jsonl", counting_records(31))

    with pytest.MonkeyPatch.context() as monkeypatch:
        job = TrainingJob(tmp_path / "opt-ml", monkeypatch)
        monkeypatch.setenv("SM_CHANNEL_TRAIN", str(other / "train.jsonl"))
        monkeypatch.setenv("SM_CHANNEL_TEACHER", str(cache))
        with pytest.raises(contract.StageError, match=r"the cached teacher outputs in .* were "
                           r"computed for other 'train' data or tokenization \(31 examples here, "
                           r"32 there; tokens sha256"):
            distill.main(distill.DistillStageConfig(student_model="config:layers=1"))
    assert not job.model_dir.exists()


# --- The loss ---------------------------------------------------------------------------------

def test_with_k_the_whole_vocabulary_the_loss_is_the_exact_softened_kl():
    torch.manual_seed(0)
    student, teacher = torch.randn(5, 32), torch.randn(5, 32)
    teacher_logprobs, ids = F.log_softmax(teacher, -1).sort(dim=-1, descending=True)
    temperature = 2.0

    ours = distillation.top_k_kl(student, ids, teacher_logprobs, temperature)
    exact = F.kl_div(F.log_softmax(student / temperature, -1),
                     F.log_softmax(teacher / temperature, -1), log_target=True,
                     reduction="none").sum(-1)

    torch.testing.assert_close(ours, exact)
    assert distillation.top_k_kl(teacher, ids, teacher_logprobs, temperature).abs().max() < 1e-5


def test_gradient_accumulation_gives_the_gradients_of_the_whole_batch(cache):
    examples = distillation.read_cache(cache, "train", top_k=16)[:4]
    tokenizer = models.load_tokenizer(str(cache / "tokenizer"))
    config = json.loads((cache / "teacher_config.json").read_text())
    model = distill.build_student("config:layers=1", config, 0, tokenizer)
    collate = distill.Collator(tokenizer.pad_token_id, 16, on_policy=False)
    trainer = distill.TopKDistillationTrainer(
        model=model, args=distill.trainer_arguments(
            distill.DistillStageConfig(student_model="config:layers=1", checkpoint_steps=0),
            "fp32", remove_unused_columns=False),
        temperature=2.0, alpha=0.3)

    def gradients(batches: list[list]) -> torch.Tensor:
        model.zero_grad()
        total = sum(int((collate(b)["labels"][:, 1:] != -100).sum()) for b in batches)
        for batch in batches:
            trainer.compute_loss(model, collate(batch), num_items_in_batch=total).backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    whole, halves = gradients([examples]), gradients([examples[:2], examples[2:]])

    assert ((whole - halves).norm() / whole.norm()).item() < 1e-5


def test_a_config_student_takes_several_sizes_joined_by_plus_and_refuses_commas(cache):
    # '+' joins the sizes: the spec is recorded in the model package's metadata, where SageMaker
    # allows no comma.
    tokenizer = models.load_tokenizer(str(cache / "tokenizer"))
    config = json.loads((cache / "teacher_config.json").read_text())
    model = distill.build_student("config:layers=1+hidden=32+intermediate=64", config, 0,
                                  tokenizer)
    assert (model.config.num_hidden_layers, model.config.hidden_size,
            model.config.intermediate_size) == (1, 32, 64)
    with pytest.raises(StageError, match=r"joined by '\+'"):
        distill.build_student("config:layers=1,hidden=32", config, 0, tokenizer)

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

from steps import distill, distill_config, evaluate, teacher_logits
from steps.common import contract, distillation, models, students
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
                teacher_model: Path | None = None, **hyperparameters: str) -> StageRun:
    """One distillation training job under `root`: channels train, validation (and teacher, the
    cached outputs; teacher_model, the teacher's weights)."""
    stdout = io.StringIO()
    with pytest.MonkeyPatch.context() as monkeypatch, contextlib.redirect_stdout(stdout):
        job = TrainingJob(root, monkeypatch)
        monkeypatch.setenv("SM_CHANNEL_TRAIN", str(data_dir / "train.jsonl"))
        monkeypatch.setenv("SM_CHANNEL_VALIDATION", str(data_dir / "validation.jsonl"))
        if teacher is not None:
            monkeypatch.setenv("SM_CHANNEL_TEACHER", str(teacher))
        if teacher_model is not None:
            monkeypatch.setenv("SM_CHANNEL_TEACHER_MODEL", str(teacher_model))
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


def test_a_new_student_asked_for_beside_a_model_channel_is_refused(cache, sft_run, data_dir,
                                                                   tmp_path):
    # Its learning rate (a new student's, 3e-3) would have trained the channel's pretrained model.
    config = distill.DistillStageConfig(student_model="config:layers=1")
    assert config.learning_rate == distill_config.RANDOM_INIT_LEARNING_RATE
    with pytest.MonkeyPatch.context() as monkeypatch:
        job = TrainingJob(tmp_path / "opt-ml", monkeypatch)
        monkeypatch.setenv("SM_CHANNEL_TRAIN", str(data_dir / "train.jsonl"))
        monkeypatch.setenv("SM_CHANNEL_TEACHER", str(cache))
        monkeypatch.setenv("SM_CHANNEL_MODEL", str(sft_run.model_dir))
        with pytest.raises(contract.StageError, match=r"student_model config:layers=1 asks for a "
                           r"new student, but the job's 'model' channel holds one"):
            distill.main(config)
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
    model = students.config_student("config:layers=1", config, 0)
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


def test_the_output_head_runs_only_where_the_batch_trains_and_the_loss_is_unchanged(cache):
    examples = distillation.read_cache(cache, "train", top_k=16)[:4]
    config = json.loads((cache / "teacher_config.json").read_text())
    model = students.config_student("config:layers=1", config, 0)
    batch = distill.Collator(0, 16, on_policy=False)(examples)
    trainer = distill.TopKDistillationTrainer(
        model=model, args=distill.trainer_arguments(
            distill.DistillStageConfig(student_model="config:layers=1", checkpoint_steps=0),
            "fp32", remove_unused_columns=False),
        temperature=2.0, alpha=0.3)
    head_positions = []
    model.lm_head.register_forward_hook(
        lambda module, inputs, output: head_positions.append(inputs[0].shape[1]))

    loss = trainer.compute_loss(model, batch, num_items_in_batch=None)
    # By hand, from every position's logits.
    mask = batch["labels"][:, 1:] != -100
    logits = model(input_ids=batch["input_ids"],
                   attention_mask=batch["attention_mask"]).logits[:, :-1][mask]
    ce = F.cross_entropy(logits, batch["labels"][:, 1:][mask], reduction="sum")
    kl = distillation.top_k_kl(logits, batch["top_k_ids"], batch["top_k_logprobs"], 2.0).sum()

    torch.testing.assert_close(loss, (0.3 * ce + 0.7 * 4.0 * kl) / mask.sum())
    assert head_positions[0] == int(mask.any(0).sum()) < batch["input_ids"].shape[1]


def test_a_config_student_takes_several_sizes_joined_by_plus_and_refuses_commas(cache):
    # '+' joins the sizes: the spec is recorded in the model package's metadata, where SageMaker
    # allows no comma. The spec is checked when the stage's settings are read, before any work.
    config = json.loads((cache / "teacher_config.json").read_text())
    model = students.config_student("config:layers=1+hidden=32+intermediate=64", config, 0)
    assert (model.config.num_hidden_layers, model.config.hidden_size,
            model.config.intermediate_size) == (1, 32, 64)
    with pytest.raises(StageError, match=r"joined by '\+'"):
        distill.DistillStageConfig(student_model="config:layers=1,hidden=32")


# --- Students cut from their teacher ----------------------------------------------------------

def _merged_teacher(sft_run) -> torch.nn.Module:
    return models.load_model(str(sft_run.model_dir)).merge_and_unload().eval()


def _loss(model: torch.nn.Module, cache: Path) -> float:
    """Mean token loss of `model` on the cached validation examples' responses."""
    examples = distillation.read_cache(cache, "validation", top_k=1)
    ids, mask, labels = distillation.pad_batch(examples, 0)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, labels=labels).loss.item()


def test_a_student_that_keeps_every_layer_and_channel_of_its_teacher_is_the_teacher(sft_run):
    teacher = _merged_teacher(sft_run)
    ids = torch.tensor([[5, 17, 42, 99, 7, 3]])

    student, record = students.pruned_student(
        teacher, students.parse("teacher:keep_layers=0/1+intermediate=128"), [])

    assert record["kept_layers"] == [0, 1]
    assert record["student_parameters"] == record["teacher_parameters"]
    torch.testing.assert_close(student(input_ids=ids).logits, teacher(input_ids=ids).logits)


def test_depth_pruning_keeps_evenly_spaced_layers_with_their_weights_renumbered(sft_run):
    teacher = _merged_teacher(sft_run)

    student, record = students.pruned_student(teacher, students.parse("teacher:layers=1"), [])

    assert students.evenly_spaced(15, 30) == [0, 2, 4, 6, 8, 10, 12, 14, 17, 19, 21, 23, 25, 27,
                                              29]
    assert students.evenly_spaced(2, 30) == [0, 29]
    # A fraction of the teacher's layers: one spec for a teacher of any depth.
    assert students.parse("teacher:layers=0.5").layer_indices(30) == students.evenly_spaced(15, 30)
    assert students.parse("teacher:layers=0.5").layer_indices(2) == [1]
    assert record["kept_layers"] == [1] and student.config.num_hidden_layers == 1
    kept = teacher.model.layers[1].state_dict()
    for name, tensor in student.model.layers[0].state_dict().items():
        torch.testing.assert_close(tensor, kept[name])
    assert record["student_parameters"] < record["teacher_parameters"]


def test_width_pruning_keeps_the_mlp_channels_most_active_on_the_calibration_data(
    sft_run, cache
):
    teacher = _merged_teacher(sft_run)
    examples = distillation.read_cache(cache, "train", top_k=1)
    ids, mask, _ = distillation.pad_batch(examples, 0)
    calibration = [{"input_ids": ids, "attention_mask": mask}]

    student, record = students.pruned_student(
        teacher, students.parse("teacher:layers=2+intermediate=32"), calibration)
    # The same width, keeping the least active channels instead: what the ranking is worth.
    least = {index: scores.topk(32, largest=False).indices.sort().values
             for index, scores in _activation_rms(teacher, calibration).items()}
    weakest = students._rebuilt(teacher, [0, 1],
                                students._width_state(teacher.state_dict(), least), 32)

    mlp = student.model.layers[0].mlp
    assert (mlp.gate_proj.weight.shape, mlp.down_proj.weight.shape) == ((32, 64), (64, 32))
    assert record["intermediate"]["student"] == 32
    assert _loss(student, cache) < _loss(weakest, cache)


def _activation_rms(model, calibration) -> dict[int, torch.Tensor]:
    """Per layer, the RMS of each MLP channel's activation over the calibration tokens."""
    found: dict[int, torch.Tensor] = {}
    mask = calibration[0]["attention_mask"].bool()
    handles = [layer.mlp.down_proj.register_forward_pre_hook(
        lambda module, inputs, index=index: found.__setitem__(
            index, inputs[0][mask].pow(2).mean(0).sqrt()))
        for index, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        model(**calibration[0])
    for handle in handles:
        handle.remove()
    return found


@pytest.mark.parametrize("spec, message", [
    ("teacher:layers=0", "teacher:layers=0: layers=0 is not a positive integer"),
    ("teacher:layers=1.5", "layers=1.5 is neither a number of layers nor a fraction"),
    ("teacher:layers=2+keep_layers=0/1", "either layers=N (evenly spaced) or keep_layers="),
    ("teacher:keep_layers=1/0", "keep_layers must list each layer once, in increasing order"),
    ("teacher:keep_layers=0,1", "sizes are joined by '+'"),
    ("teacher:hidden=32+layers=1", "'hidden' is not one of layers, keep_layers, intermediate"),
    ("teacher:layers", "'layers' is not KEY=VALUE"),
    ("config:layers=two", "layers=two is not a positive integer"),
])
def test_a_wrong_student_spec_fails_when_the_settings_are_read_in_one_line(spec, message):
    with pytest.raises(StageError) as error:
        distill.DistillStageConfig(student_model=spec)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_a_student_cut_from_its_teacher_trains_fully_at_its_own_rate():
    config = distill.DistillStageConfig(student_model="teacher:layers=2")

    assert config.learning_rate == distill_config.PRUNED_LEARNING_RATE
    with pytest.raises(StageError, match="use peft_method=none"):
        distill.DistillStageConfig(student_model="teacher:layers=2", peft_method="lora")


def test_a_student_cut_from_its_teacher_needs_the_teachers_weights(cache, data_dir, tmp_path):
    with pytest.MonkeyPatch.context() as monkeypatch:
        job = TrainingJob(tmp_path / "opt-ml", monkeypatch)
        monkeypatch.setenv("SM_CHANNEL_TRAIN", str(data_dir / "train.jsonl"))
        monkeypatch.setenv("SM_CHANNEL_TEACHER", str(cache))
        with pytest.raises(StageError, match=r"student_model teacher:layers=1 is cut from the "
                           r"teacher's weights, .*give it a 'teacher_model' channel"):
            distill.main(distill.DistillStageConfig(student_model="teacher:layers=1"))
    assert not job.model_dir.exists()


# --- Distillation against its baselines -------------------------------------------------------

# A student cut from the teacher, measured against its start and a hard-label student.
PRUNED = {**STUDENT, "student_model": "teacher:layers=1", "alpha": "0.2", "learning_rate": "3e-3",
          "comparison_samples": "4", "comparison_new_tokens": "8"}


@pytest.fixture(scope="module")
def compared(cache, sft_run, data_dir, tmp_path_factory) -> StageRun:
    return run_distill(tmp_path_factory.mktemp("compared") / "opt-ml", data_dir, cache,
                       teacher_model=sft_run.model_dir, compare_students="true", **PRUNED)


def test_a_pruned_student_continues_its_teachers_lineage_with_its_tokenizer(compared, sft_run):
    lineage = json.loads((compared.model_dir / "lineage.json").read_text())
    tokenizer = models.load_tokenizer(str(compared.model_dir))
    teacher_tokenizer = models.load_tokenizer(str(sft_run.model_dir))
    record = compared.summary["distillation"]["student"]

    assert [stage["stage"] for stage in lineage] == ["sft", "distill"]
    assert tokenizer.get_vocab() == teacher_tokenizer.get_vocab()
    assert tokenizer.chat_template == teacher_tokenizer.chat_template
    assert record["kept_layers"] == [1] and record["teacher_layers"] == 2
    assert compared.summary["base_model"] == str(sft_run.model_dir)


def test_the_stage_compares_the_distilled_student_with_its_start_and_a_hard_label_student(
    compared, cache, sft_run, data_dir, tmp_path
):
    comparison = compared.summary["distillation"]["comparison"]
    figures = comparison["students"]
    # The baseline the stage trained is the stage itself run with alpha 1: the same start, steps,
    # batches and loss, so the same student bit for bit (in one process: another torch thread
    # count rounds differently, and a hundred steps later that is another run).
    hard_label = run_distill(tmp_path / "opt-ml", data_dir, cache, teacher_model=sft_run.model_dir,
                             **{**PRUNED, "alpha": "1.0"})

    assert set(figures) == {"initial", "hard_label", "distilled"}
    assert comparison["samples"] == 4 and comparison["steps"] == 40
    assert (figures["hard_label"]["kl_to_teacher"]["value"]
            == hard_label.summary["distillation"]["eval_kl_to_teacher"])
    assert figures["distilled"]["kl_to_teacher"]["value"] == pytest.approx(
        compared.summary["distillation"]["eval_kl_to_teacher"], rel=1e-6)
    assert (figures["distilled"]["kl_to_teacher"]["value"]
            < figures["hard_label"]["kl_to_teacher"]["value"]
            < figures["initial"]["kl_to_teacher"]["value"])
    assert figures["distilled"]["perplexity"]["value"] < figures["initial"]["perplexity"]["value"]
    # The baseline's losses do not pass for the distilled student's in SageMaker's metrics.
    assert "hard_label_train_loss=" in compared.stdout
    assert len(compared.losses) == len(hard_label.losses)


def test_evaluation_reports_the_student_against_its_teacher_start_and_hard_label_student(
    compared, sft_run, data_dir, tmp_path
):
    output = tmp_path / "evaluation"
    evaluate.main(evaluate.EvaluateConfig(
        model_dir=str(compared.model_dir), data_dir=str(data_dir), output_dir=str(output),
        base_dir=str(sft_run.model_dir), max_samples=4, max_new_tokens=8))
    metrics = json.loads((output / "evaluation.json").read_text())["metrics"]
    measured = compared.summary["distillation"]["comparison"]["students"]
    report = (output / "report.md").read_text()
    card = (output / "model_card.md").read_text()

    for student in ("initial", "hard_label"):
        for figure in ("perplexity", "rouge_l", "kl_to_teacher"):
            assert metrics[f"{student}_student_{figure}"] == measured[student][figure]
    # The stage measured its students as evaluation measures the model: the same figure here.
    assert metrics["perplexity"]["value"] == pytest.approx(
        measured["distilled"]["perplexity"]["value"], rel=1e-4)
    assert metrics["perplexity_ratio_vs_hard_label"]["value"] == pytest.approx(
        measured["hard_label"]["perplexity"]["value"]
        / measured["distilled"]["perplexity"]["value"])
    for text in (report, card):
        assert "Distillation: the student against its teacher and its baselines" in text
        assert "| figure | teacher | distilled student | hard-label student | initial student |" \
            in text
        # Which figures distilling won against the labels alone, as the metrics say.
        verdict = next(line for line in text.splitlines() if line.startswith("Against the same"))
        won = verdict.split(" won on ", 1)[1].split(";")[0].split(" (")[0]
        assert ("perplexity" in won) == (metrics["perplexity_ratio_vs_hard_label"]["value"] > 1)
        assert "KL to the teacher" in won
    assert (output / "students.png").exists()


# --- Prompts without reference answers, answered by the teacher ------------------------------


@pytest.fixture(scope="module")
def answered_cache(sft_run, data_dir, tmp_path_factory) -> Path:
    """The teacher's top-16 outputs, and its answers to three prompts the labelled data lacks."""
    root = tmp_path_factory.mktemp("answered")
    write_jsonl(root / "prompts.jsonl", [{"prompt": f"Count to {k}."} for k in (6, 7, 8)])
    teacher_logits.main(teacher_logits.TeacherLogitsConfig(
        model_dir=str(sft_run.model_dir), data_dir=str(data_dir), output_dir=str(root / "out"),
        prompts_dir=str(root / "prompts.jsonl"), max_new_tokens=16))
    return root / "out"


def test_the_student_also_trains_on_the_teachers_answers_and_the_hard_label_student_does_not(
    answered_cache, sft_run, data_dir, tmp_path
):
    answered = json.loads((answered_cache / "manifest.json").read_text())["splits"][
        distillation.TEACHER_ANSWERED]["examples"]
    run = run_distill(tmp_path / "opt-ml", data_dir, answered_cache,
                      teacher_model=sft_run.model_dir, compare_students="true",
                      **{**PRUNED, "max_steps": "6"})
    comparison = run.summary["distillation"]["comparison"]
    output = tmp_path / "evaluation"
    evaluate.main(evaluate.EvaluateConfig(
        model_dir=str(run.model_dir), data_dir=str(data_dir), output_dir=str(output),
        base_dir=str(sft_run.model_dir), max_samples=4, max_new_tokens=8))
    report = (output / "report.md").read_text()

    assert answered >= 1
    assert run.summary["teacher_answered_examples"] == comparison["teacher_answered_examples"] \
        == answered
    assert run.summary["train_examples"] == comparison["labelled_examples"] == 32
    assert "on the ground truth of the 32 labelled examples alone" in run.stdout
    # The same steps for both students, whatever their data.
    assert comparison["steps"] == run.summary["training"]["global_step"] == 6
    assert (f"also trained on the teacher's answers to {answered} prompts that have no reference "
            "answer, beside the 32 labelled examples") in report


def test_teacher_answers_false_trains_on_the_labelled_data_alone(answered_cache, data_dir,
                                                                 tmp_path):
    run = run_distill(tmp_path / "opt-ml", data_dir, answered_cache, teacher_answers="false",
                      **{**STUDENT, "max_steps": "2"})

    assert run.summary["teacher_answered_examples"] == 0
    assert "teacher_answers=false: the teacher's answers to" in run.stdout

"""Model specs: the built-in tiny model, folders and archives, and what is refused."""

import io
import os
import tarfile
from pathlib import Path

import pytest
import torch

from steps.common import models
from steps.common.contract import StageError


def test_builtin_tiny_loads_the_same_weights_every_time_without_touching_the_global_rng():
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)

    first, second = models.load_model(models.TINY), models.load_model(models.TINY)

    assert torch.equal(torch.rand(3), expected_next)
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), name
    assert first.dtype == torch.float32 and first.name_or_path == models.TINY


def test_builtin_tiny_tokenizer_is_byte_level_with_a_chatml_template():
    tokenizer = models.load_tokenizer(models.TINY)
    text = "héllo wörld"

    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    assert len(tokenizer(text)["input_ids"]) == len(text.encode())
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|pad|>"
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]
    assert tokenizer.apply_chat_template(chat, tokenize=False) == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nYo<|im_end|>\n"
    )
    assert tokenizer.apply_chat_template(
        chat[:1], tokenize=False, add_generation_prompt=True
    ).endswith("<|im_start|>assistant\n")
    # The {% generation %} markers cover the assistant's answer and its end-of-turn token.
    marked = tokenizer.apply_chat_template(
        chat, return_dict=True, return_assistant_tokens_mask=True
    )
    answer = [t for t, m in zip(marked["input_ids"], marked["assistant_masks"]) if m]
    assert tokenizer.decode(answer) == "Yo<|im_end|>"


def test_a_saved_model_loads_from_its_folder_and_from_a_model_tar_gz(tmp_path):
    model, tokenizer = models.load_model(models.TINY), models.load_tokenizer(models.TINY)
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    (tmp_path / "channel").mkdir()
    with tarfile.open(tmp_path / "channel" / "model.tar.gz", "w:gz") as archive:
        for path in sorted((tmp_path / "model").iterdir()):
            archive.add(path, arcname=path.name)

    source = models.resolve_model_source(tmp_path / "channel", "builtin:ignored")
    from_archive = models.load_model(source)
    from_folder = models.load_model(str(tmp_path / "model"))

    assert source.endswith("model.tar.gz")
    assert models.load_tokenizer(source).chat_template == tokenizer.chat_template
    for a, b, c in zip(
        model.state_dict().values(),
        from_archive.state_dict().values(),
        from_folder.state_dict().values(),
    ):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_an_absent_or_empty_model_channel_falls_back_to_the_base_model_spec(tmp_path):
    assert models.resolve_model_source(None, models.TINY) == models.TINY
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "notes.txt").write_text("no model here")
    with pytest.raises(StageError, match="neither a Hugging Face model"):
        models.resolve_model_source(tmp_path / "model", models.TINY)


def test_a_folder_with_only_pickled_weights_is_refused(tmp_path):
    folder = tmp_path / "legacy"
    folder.mkdir()
    models.load_model(models.TINY).config.save_pretrained(folder)
    (folder / "pytorch_model.bin").write_bytes(b"pickle")

    with pytest.raises(
        StageError, match=r"no safetensors weights \(found pytorch_model.bin\).*convert"
    ):
        models.load_model(str(folder))


def test_a_missing_local_path_is_an_error_not_a_hub_lookup():
    with pytest.raises(StageError, match="does not exist"):
        models.load_model("./no/such/model")


def archive_with(tmp_path: Path, member: tarfile.TarInfo, payload: bytes = b"x") -> Path:
    path = tmp_path / "evil.tar.gz"
    with tarfile.open(path, "w:gz") as archive:
        safe = tarfile.TarInfo("config.json")
        safe.size = 2
        archive.addfile(safe, io.BytesIO(b"{}"))
        member.size = len(payload) if member.isfile() else 0
        archive.addfile(member, io.BytesIO(payload) if member.isfile() else None)
    return path


def symlink(name: str, target: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = tarfile.SYMTYPE, target
    return info


def hardlink(name: str, target: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = tarfile.LNKTYPE, target
    return info


def device(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.CHRTYPE
    return info


@pytest.mark.parametrize(
    ("member", "expected"),
    [
        (tarfile.TarInfo("../evil"), "'..'"),
        (tarfile.TarInfo("weights/../../evil"), "'..'"),
        (tarfile.TarInfo("/etc/evil"), "absolute path"),
        (symlink("link", "/etc/passwd"), "symlink"),
        (symlink("sub/link", "../../outside"), "symlink"),
        (hardlink("hard", "/etc/passwd"), "hard link"),
        (device("tty"), "special file"),
    ],
    ids=[
        "dotdot",
        "nested-dotdot",
        "absolute",
        "symlink-absolute",
        "symlink-relative",
        "hardlink",
        "device",
    ],
)
def test_safe_extract_refuses_members_that_escape_and_writes_nothing(tmp_path, member, expected):
    archive = archive_with(tmp_path, member)
    dest = tmp_path / "dest"

    with pytest.raises(StageError, match=expected):
        models.safe_extract(archive, dest)

    assert not dest.exists()
    assert not (tmp_path / "evil").exists()


def test_safe_extract_keeps_links_that_stay_inside(tmp_path):
    archive = archive_with(tmp_path, symlink("alias.json", "config.json"))
    models.safe_extract(archive, tmp_path / "dest")
    assert os.readlink(tmp_path / "dest" / "alias.json") == "config.json"


def test_fp16_on_a_cpu_is_refused_and_auto_picks_a_precision_this_machine_runs():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(StageError, match="precision 'fp16' needs a CUDA GPU"):
        models.resolve_precision("fp16")
    assert models.resolve_precision("auto") in ("fp32", "bf16")
    assert models.resolve_precision("fp32") == "fp32"


@pytest.mark.e2e  # the real default model: converted once per machine (about a minute), then loaded
def test_smollm2_converts_once_and_answers_sensibly():
    tokenizer, model = models.load_tokenizer(models.SMOLLM2), models.load_model(models.SMOLLM2)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    output = model.generate(**prompt, max_new_tokens=20, do_sample=False)
    assert "Paris" in tokenizer.decode(output[0][prompt["input_ids"].shape[1] :])


def test_gpus_that_torch_cannot_use_are_refused_rather_than_trained_on_the_cpu(tmp_path):
    # An image whose CUDA build needs a newer driver than the host's sees the devices but no
    # CUDA: the stage must fail, not train for hours on the CPU of a billed GPU instance.
    if torch.cuda.is_available():
        pytest.skip("CUDA works on this machine")
    assert models.unusable_gpus(tmp_path) is None  # no GPU at all: the CPU is what there is
    (tmp_path / "nvidia0").touch()
    problem = models.unusable_gpus(tmp_path)
    assert problem and "cannot use them" in problem and "containers/README.md" in problem

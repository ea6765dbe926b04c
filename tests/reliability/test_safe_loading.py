"""Safe loading: weights from safetensors only, no model code run, unless a stage opts in by name
(`allow_unsafe_weights`, `trust_remote_code`); archives and S3 prefixes staged without escaping
their folder.

The opt-ins are contract.LoadPolicy, which every stage takes as a hyperparameter or argument.
The crafted-archive tests of safe_extract for '..' names, absolute names, symbolic links (absolute
and relative), absolute hard links and device files are in tests/steps/test_models.py; the cases
here are the ones it leaves out.
"""

from __future__ import annotations

import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from steps.common import contract, models
from steps.common.contract import LoadPolicy, StageError
from tests.reliability.tiny import tiny_model_folder

# The last line of any pickle refusal names the opt-in, so the user knows what to set.
REFUSED_PICKLE = r"pickle-based weights are refused.*allow_unsafe_weights=true"
REFUSED_CODE = r"field 'auto_map' asks to run the model's own code.*trust_remote_code=true"


@pytest.fixture(autouse=True)
def default_policy():
    """Each test starts, and leaves, with the stage defaults: no opt-in."""
    contract.set_load_policy(LoadPolicy())
    yield
    contract.set_load_policy(LoadPolicy())


def opt_in(**settings: bool) -> None:
    """What a stage started with `--allow-unsafe-weights true` (or the hyperparameter) gets."""
    argv = [arg for name, value in settings.items()
            for arg in (f"--{name.replace('_', '-')}", str(value).lower())]
    contract.parse_config(LoadPolicyProbe, {}, argv)


@dataclass
class LoadPolicyProbe:
    """A stage config with no fields of its own."""


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    first, second = a.state_dict(), b.state_dict()
    return first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


# --- The opt-ins are named parameters of every stage -------------------------------------------------


def test_every_stage_takes_the_opt_ins_by_name_as_hyperparameters_or_arguments_and_defaults_off():
    from steps.data_prep import DataPrepConfig

    contract.parse_config(DataPrepConfig, {}, ["--input-dir", "d", "--output-dir", "o"])
    assert contract.load_policy() == LoadPolicy(allow_unsafe_weights=False, trust_remote_code=False)

    # As SageMaker writes hyperparameters (strings), and as processing arguments (dashes).
    contract.parse_config(DataPrepConfig, {"allow_unsafe_weights": "true"},
                          ["--input-dir", "d", "--output-dir", "o"])
    assert contract.load_policy() == LoadPolicy(allow_unsafe_weights=True)
    contract.parse_config(DataPrepConfig, {}, ["--input-dir", "d", "--output-dir", "o",
                                               "--trust-remote-code", "true"])
    assert contract.load_policy() == LoadPolicy(trust_remote_code=True)
    with pytest.raises(StageError, match="unknown hyperparameter 'allow_pickle'"):
        contract.parse_config(DataPrepConfig, {"allow_pickle": "true"}, [])


# --- Pickle-based weights ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pickled_folder(tmp_path_factory) -> Path:
    """builtin:tiny with its weights only as pytorch_model.bin (torch.save of the state dict)."""
    return tiny_model_folder(tmp_path_factory.mktemp("pickled") / "model", weights="pickle")


def test_a_model_with_only_pickle_weights_is_refused_naming_the_opt_in(pickled_folder):
    with pytest.raises(StageError, match=r"\(found pytorch_model\.bin\); " + REFUSED_PICKLE):
        models.load_model(str(pickled_folder))


def test_the_refusal_comes_before_the_file_is_unpickled(tmp_path, monkeypatch):
    folder = tiny_model_folder(tmp_path / "model", weights=None)
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04not even a pickle")
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load was called"))
    with pytest.raises(StageError, match=REFUSED_PICKLE):
        models.load_model(str(folder))


def test_with_allow_unsafe_weights_a_pickle_weights_model_loads(pickled_folder, capsys):
    opt_in(allow_unsafe_weights=True)
    loaded = models.load_model(str(pickled_folder))
    assert same_weights(loaded, models.load_model(models.TINY))
    assert "warning: loading pickle-based weights pytorch_model.bin" in capsys.readouterr().out


def test_a_model_with_safetensors_never_reads_its_pickle_file_even_with_the_opt_in(tmp_path):
    folder = tiny_model_folder(tmp_path / "model", weights="safetensors")
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04not even a pickle")
    for allowed in (False, True):
        opt_in(allow_unsafe_weights=allowed)
        assert same_weights(models.load_model(str(folder)), models.load_model(models.TINY))


@pytest.fixture(scope="module")
def pickled_adapter(tmp_path_factory) -> Path:
    """A LoRA adapter over builtin:tiny saved as adapter_model.bin, with the tiny tokenizer."""
    from peft import LoraConfig, get_peft_model

    folder = tmp_path_factory.mktemp("adapter") / "adapter"
    torch.manual_seed(0)
    model = get_peft_model(models.load_model(models.TINY),
                           LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    model.save_pretrained(folder, safe_serialization=False)
    models.load_tokenizer(models.TINY).save_pretrained(folder)
    assert (folder / "adapter_model.bin").exists()
    assert not (folder / "adapter_model.safetensors").exists()
    return folder


def test_an_adapter_with_only_pickle_weights_is_refused_and_loads_with_the_opt_in(pickled_adapter):
    with pytest.raises(StageError, match=r"adapter folder .* \(found adapter_model\.bin\); "
                                         + REFUSED_PICKLE):
        models.load_model(str(pickled_adapter))

    opt_in(allow_unsafe_weights=True)
    adapter = models.load_model(str(pickled_adapter))
    lora = {k: v for k, v in adapter.state_dict().items() if "lora_" in k}
    assert lora and any(v.abs().sum() > 0 for v in lora.values())  # its own, non-zero weights


def test_an_endpoint_refuses_a_pickle_adapter_alone_or_as_a_tenant(pickled_adapter, tmp_path):
    from serving import model, tenants
    from serving.settings import Settings

    with pytest.raises(StageError, match=REFUSED_PICKLE):
        model.load(Settings(model_dir=pickled_adapter))
    with pytest.raises(StageError, match=REFUSED_PICKLE):
        tenants.assemble({"tenantA": pickled_adapter}, tmp_path / "tenants")
    assert not (tmp_path / "tenants").exists()


def test_hub_models_are_asked_for_safetensors_and_no_code_unless_opted_in(monkeypatch):
    from transformers import AutoModelForCausalLM

    asked = []
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained",
                        lambda spec, **kwargs: asked.append(kwargs) or "model")
    models.load_model("someone/some-model")
    opt_in(allow_unsafe_weights=True, trust_remote_code=True)
    models.load_model("someone/some-model")

    assert [(k["use_safetensors"], k["trust_remote_code"]) for k in asked] == [
        (True, False),  # safetensors only: from_pretrained fails rather than unpickle
        (None, True),  # safetensors when the repository has them, else its .bin
    ]


# --- Remote code -------------------------------------------------------------------------------------


def test_a_tokenizer_config_with_auto_map_is_refused_without_the_opt_in(tmp_path):
    folder = tiny_model_folder(tmp_path / "model")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["auto_map"] = {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(StageError, match=r"tokenizer_config\.json: " + REFUSED_CODE):
        models.load_tokenizer(str(folder))


# The model's own code in a folder: a Llama whose every next token is "!", and that leaves a
# mark when its module is imported.
EXCLAIMING_CODE = """\
from pathlib import Path

from transformers import LlamaForCausalLM

Path({mark!r}).write_text("imported")


class ExclaimingLlamaForCausalLM(LlamaForCausalLM):
    def forward(self, *args, **kwargs):
        output = super().forward(*args, **kwargs)
        output.logits[..., {token}] += 1e4
        return output
"""


@pytest.fixture
def own_code_folder(tmp_path, monkeypatch) -> tuple[Path, Path]:
    """builtin:tiny (safetensors) whose config.json maps AutoModelForCausalLM to a module file in
    the folder; and the file its code writes when it runs."""
    from transformers import dynamic_module_utils

    # transformers copies the folder's module into its modules cache to import it: the test's
    # own, not the machine's (~/.cache/huggingface/modules).
    monkeypatch.setattr(dynamic_module_utils, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    monkeypatch.syspath_prepend(str(tmp_path / "modules"))
    mark = tmp_path / "the-folder's-code-ran"
    folder = tiny_model_folder(tmp_path / "model", config_extra={
        "auto_map": {"AutoModelForCausalLM": "modeling_exclaiming.ExclaimingLlamaForCausalLM"}})
    token = models.load_tokenizer(models.TINY).convert_tokens_to_ids("!")
    (folder / "modeling_exclaiming.py").write_text(EXCLAIMING_CODE.format(mark=str(mark),
                                                                          token=token))
    return folder, mark


def test_a_folder_with_its_own_code_is_refused_without_the_opt_in_and_none_of_it_runs(
        own_code_folder):
    # Without the check, transformers would quietly load its own Llama class for this config
    # (a known model_type) and ignore what the folder asked for; for an unknown model_type it
    # fails with a many-line error.
    folder, mark = own_code_folder
    with pytest.raises(StageError, match=r"config\.json: " + REFUSED_CODE):
        models.load_model(str(folder))
    assert not mark.exists()


def test_with_trust_remote_code_the_folder_is_loaded_with_its_code_which_runs(own_code_folder):
    folder, mark = own_code_folder
    opt_in(trust_remote_code=True)
    model = models.load_model(str(folder))
    tokenizer = models.load_tokenizer(str(folder))

    assert mark.read_text() == "imported"
    assert type(model).__name__ == "ExclaimingLlamaForCausalLM"
    prompt = tokenizer("Hello", return_tensors="pt")
    generated = model.generate(**prompt, max_new_tokens=4, do_sample=False)
    assert tokenizer.decode(generated[0, prompt["input_ids"].shape[1]:]) == "!!!!"


# --- Archives and S3 prefixes: what tests/steps/test_models.py leaves out -------------------------------


def crafted_archive(tmp_path: Path, *members: tuple[tarfile.TarInfo, bytes]) -> Path:
    path = tmp_path / "model.tar.gz"
    with tarfile.open(path, "w:gz") as archive:
        for info, payload in members:
            info.size = len(payload) if info.isfile() else 0
            archive.addfile(info, io.BytesIO(payload) if info.isfile() else None)
    return path


def member(name: str, kind: bytes = tarfile.REGTYPE, target: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


@pytest.mark.parametrize(("members", "expected"), [
    # A hard link named by a relative path that climbs out.
    ([member("hard", tarfile.LNKTYPE, "../outside.txt")], "hard link"),
    # A symlink to the parent, then a file written through it.
    ([member("up", tarfile.SYMTYPE, ".."), member("up/evil.txt")], "symlink"),
    # A symlink that stays inside by name but climbs out through a nested '..'.
    ([member("weights/link", tarfile.SYMTYPE, "../../outside.txt")], "symlink"),
], ids=["hardlink-relative", "symlink-then-write-through-it", "nested-symlink-climbing-out"])
def test_crafted_archives_that_escape_by_links_are_refused_before_anything_is_written(
        tmp_path, members, expected):
    (tmp_path / "outside.txt").write_text("untouched")
    archive = crafted_archive(tmp_path, (member("config.json"), b"{}"),
                              *((m, b"x") for m in members))
    dest = tmp_path / "extract" / "model"

    with pytest.raises(StageError, match=expected):
        models.safe_extract(archive, dest)

    assert not dest.exists()
    assert (tmp_path / "outside.txt").read_text() == "untouched"
    assert not (tmp_path / "extract" / "evil.txt").exists()


def test_a_model_archive_with_a_link_out_is_refused_when_loaded_as_a_model(tmp_path):
    archive = crafted_archive(tmp_path, (member("config.json"), b"{}"),
                              (member("model.safetensors", tarfile.SYMTYPE, "/etc/passwd"), b""))
    with pytest.raises(StageError, match="refusing symlink 'model.safetensors' -> '/etc/passwd'"):
        models.load_model(str(archive))


def test_s3_keys_that_climb_out_of_the_staging_folder_are_refused(tmp_path):
    import boto3
    from moto import mock_aws

    from pipelines.local.jobs import download_prefix

    with mock_aws():
        s3 = boto3.client("s3", region_name="us-east-1")
        s3.create_bucket(Bucket="data")
        s3.put_object(Bucket="data", Key="train/ok.jsonl", Body=b"{}")
        s3.put_object(Bucket="data", Key="train/../../evil.txt", Body=b"x")
        with pytest.raises(ValueError, match="would be staged outside"):
            download_prefix(s3, "s3://data/train", tmp_path / "job" / "input" / "data")

    # Without the check the key lands in tmp_path/job/, beside the job's input folder.
    assert not any(p.name == "evil.txt" for p in tmp_path.rglob("*"))


def test_a_reward_model_follows_the_same_loading_policy(tmp_path):
    # The judge of PPO and of evaluation is loaded by its own code path (a sequence classifier):
    # pickle weights, remote code and a truncated file get the same one-line refusals.
    from transformers import AutoModelForSequenceClassification

    from steps.common.preference import load_reward_model

    config = models.load_model(models.TINY).config
    config.num_labels, config.id2label, config.label2id = 1, {0: "reward"}, {"reward": 0}
    scorer = AutoModelForSequenceClassification.from_config(config)
    pickled = tmp_path / "pickled"  # what torch.save and older save_pretrained write
    scorer.config.architectures = [type(scorer).__name__]
    scorer.config.save_pretrained(pickled)
    torch.save(scorer.state_dict(), pickled / "pytorch_model.bin")
    with pytest.raises(StageError, match="pickle-based weights are refused.*allow_unsafe_weights"):
        load_reward_model(str(pickled))
    opt_in(allow_unsafe_weights=True)
    assert load_reward_model(str(pickled)).config.num_labels == 1
    opt_in(allow_unsafe_weights=False)

    coded = tmp_path / "coded"
    scorer.save_pretrained(coded)
    config = json.loads((coded / "config.json").read_text())
    (coded / "config.json").write_text(json.dumps({**config, "auto_map": {
        "AutoModelForSequenceClassification": "modeling_evil.Evil"}}))
    with pytest.raises(StageError, match="auto_map.*trust_remote_code"):
        load_reward_model(str(coded))

    truncated = tmp_path / "truncated"
    scorer.save_pretrained(truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(StageError, match="truncated or corrupt"):
        load_reward_model(str(truncated))

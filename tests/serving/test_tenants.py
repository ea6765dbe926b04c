"""Several tenants' prompt-tuning adapters over one loaded base, the tenant chosen per request."""

from __future__ import annotations

import json
import tarfile

import pytest
from peft import LoraConfig, get_peft_model

from serving import tenants
from steps.common import models
from steps.common.contract import StageError
from steps.common.scoring import example_losses
from tests.conftest import TENANT_ANSWERS
from tests.serving.endpoints import chat, post, running


@pytest.fixture(scope="module")
def folder(tenant_adapters, tmp_path_factory):
    return tenants.assemble(tenant_adapters, tmp_path_factory.mktemp("tenants") / "model")


@pytest.fixture(scope="module")
def endpoint(folder):
    with running(folder) as served:
        yield served


def answer(endpoint, tenant: str, question: str = "Question 3?", how: str = "header") -> str:
    body = {"inputs": f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n",
            "parameters": {"max_new_tokens": 8}}
    headers = {}
    if how == "header":
        headers["X-Amzn-SageMaker-Custom-Attributes"] = f"tenant={tenant}"
    else:
        body["parameters"]["adapter_id"] = tenant
    status, text = post(endpoint.url, body, headers)
    assert status == 200, text
    return json.loads(text)[0]["generated_text"]


def test_the_folder_holds_one_base_and_each_tenants_adapter(folder):
    assert (folder / "base" / "model.safetensors").exists()
    for tenant in TENANT_ANSWERS:
        adapter = folder / "tenants" / tenant
        assert (adapter / "adapter_model.safetensors").exists()
        assert not (adapter / "base").exists()  # the base is kept once


def test_each_tenant_gets_its_own_answers_from_one_loaded_base(endpoint):
    served = endpoint.server.generator.served
    bases = [m for m in served.model.modules() if type(m).__name__ == "LlamaForCausalLM"]
    assert len(bases) == 1 and sorted(served.tenants) == sorted(TENANT_ANSWERS)

    for question in ("Question 3?", "Question 99?"):  # one seen in training, one not
        a, b = answer(endpoint, "tenantA", question), answer(endpoint, "tenantB", question)
        assert a.startswith("aa") and b.startswith("z"), (a, b)
    # The body names a tenant as TGI names adapters, with the same answer as the header.
    assert answer(endpoint, "tenantB", how="body") == answer(endpoint, "tenantB")
    # Back to A: no state leaks from one request to the next.
    assert answer(endpoint, "tenantA") == answer(endpoint, "tenantA", "Question 3?")


def test_the_messages_format_names_the_tenant_as_its_model(endpoint):
    reply = chat(endpoint.url, "Question 4?", max_tokens=8, model="tenantB")
    assert reply["model"] == "tenantB"
    assert reply["choices"][0]["message"]["content"].startswith("z")


def test_each_tenants_adapter_makes_its_own_answers_likelier_than_the_other_tenants(endpoint):
    served = endpoint.server.generator.served

    def loss(tenant: str, answer_text: str) -> float:
        served.model.set_adapter(served.tenants[tenant])
        example = {"prompt": [{"role": "user", "content": "Question 42?"}],
                   "completion": [{"role": "assistant", "content": answer_text}]}
        total, count, _ = example_losses(served.model, served.tokenizer, [example], 1, 128)[0]
        return total / count

    for own, other in (("tenantA", "tenantB"), ("tenantB", "tenantA")):
        # Nats per token: the tenant's own answer is far likelier under its own adapter.
        assert loss(own, TENANT_ANSWERS[own]) < loss(other, TENANT_ANSWERS[own]) - 1.0


def test_a_request_naming_no_tenant_or_an_unknown_one_is_refused_naming_the_tenants(endpoint):
    status, body = post(endpoint.url, {"inputs": "Hi"})
    assert status == 422 and json.loads(body)["error"] == (
        "this endpoint serves tenants tenantA, tenantB: name one with CustomAttributes "
        "tenant=NAME or the field \"parameters.adapter_id\"")
    status, body = post(endpoint.url, {"inputs": "Hi"},
                        {"X-Amzn-SageMaker-Custom-Attributes": "tenant=tenantC"})
    assert status == 422 and json.loads(body)["error"] == (
        "unknown tenant 'tenantC'; this endpoint serves tenantA, tenantB")


def test_the_command_writes_the_folder_and_its_archive(tenant_adapters, tmp_path, capsys):
    code = tenants.main([str(tmp_path / "model"), "--archive", str(tmp_path / "model.tar.gz"),
                         *(f"--adapter={t}={f}" for t, f in tenant_adapters.items())])

    assert code == 0 and "tenants tenantA, tenantB over one base" in capsys.readouterr().out
    with tarfile.open(tmp_path / "model.tar.gz") as archive:
        names = set(archive.getnames())
    assert {"base/config.json", "tenants/tenantA/adapter_config.json",
            "tenants/tenantB/adapter_model.safetensors"} <= names


def test_adapters_of_different_peft_types_are_not_assembled(tenant_adapters, tmp_path):
    lora = get_peft_model(models.load_model(models.TINY), LoraConfig(r=2, task_type="CAUSAL_LM"))
    lora.save_pretrained(tmp_path / "lora", save_embedding_layers=False)

    with pytest.raises(StageError, match=r"different PEFT types \(tenantA: PROMPT_TUNING, "
                       r"tenantL: LORA\); PEFT serves one type per base model"):
        tenants.assemble({"tenantA": tenant_adapters["tenantA"], "tenantL": tmp_path / "lora"},
                         tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_adapters_over_different_bases_are_not_assembled(tenant_adapters, tmp_path):
    import shutil

    other = tmp_path / "other"
    shutil.copytree(tenant_adapters["tenantB"], other)
    config = json.loads((other / "base" / "config.json").read_text())
    (other / "base" / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-3}))

    with pytest.raises(StageError, match="tenants 'tenantA' and 'tenantB' were trained over "
                                         "different base models"):
        tenants.assemble({"tenantA": tenant_adapters["tenantA"], "tenantB": other},
                         tmp_path / "out")

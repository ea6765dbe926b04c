"""Per-tenant prompts: two prompt-tuning adapters over one loaded base, switched per request."""

from __future__ import annotations

from pathlib import Path

import pytest
from peft import LoraConfig, get_peft_model

from steps import generate
from steps.common import models
from steps.common.contract import StageError
from steps.evaluate import example_losses
from steps.generate import TenantGenerator

from .stage_runs import run_sft

# The same questions, answered in each tenant's own, easily told apart, way.
ANSWERS = {"tenantA": "aaaa", "tenantB": "zzzz"}


def _records(answer: str) -> list[dict]:
    return [{"prompt": f"Question {k}?", "completion": answer} for k in range(16)]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A soft prompt of 16 tokens per tenant over the same frozen builtin:tiny (about 3 s each)."""
    return {
        tenant: run_sft(
            tmp_path_factory.mktemp(tenant) / "opt-ml", _records(answer),
            base_model="builtin:tiny", peft_method="prompt_tuning", num_virtual_tokens=16,
            learning_rate=0.5, max_steps=60, logging_steps=20,
        ).model_dir
        for tenant, answer in ANSWERS.items()
    }


@pytest.fixture(scope="module")
def generator(adapters) -> TenantGenerator:
    return TenantGenerator(None, adapters)  # the base is the one both adapters record


def test_each_tenant_gets_its_own_behaviour_from_one_loaded_base(generator):
    bases = [m for m in generator.model.modules() if type(m).__name__ == "LlamaForCausalLM"]

    assert len(bases) == 1 and sorted(generator.model.peft_config) == sorted(ANSWERS)
    for prompt in ("Question 3?", "Question 99?"):  # a question seen in training, and one not
        a = generator.generate("tenantA", prompt, max_new_tokens=8)
        b = generator.generate("tenantB", prompt, max_new_tokens=8)
        assert a.startswith("aa") and b.startswith("z"), (a, b)
    # Switching back gives tenant A's answer again: no state leaks from one request to the next.
    assert generator.generate("tenantA", "Question 3?", max_new_tokens=8) == a


def test_each_tenants_adapter_makes_its_own_answers_likelier_than_the_other_tenants(generator):
    def loss(tenant: str, answer: str) -> float:
        generator.model.set_adapter(tenant)
        example = {"prompt": [{"role": "user", "content": "Question 42?"}],
                   "completion": [{"role": "assistant", "content": answer}]}
        total, count, _ = example_losses(generator.model, generator.tokenizer, [example], 1, 128)[0]
        return total / count

    for own, other in (("tenantA", "tenantB"), ("tenantB", "tenantA")):
        # Nats per token: the tenant's own answer is far likelier under its own adapter.
        assert loss(own, ANSWERS[own]) < loss(other, ANSWERS[own]) - 1.0


def test_the_command_answers_as_the_named_tenant(adapters, capsys):
    generate.main(["--base-model", "builtin:tiny",
                   "--adapter", f"tenantA={adapters['tenantA']}",
                   "--adapter", f"tenantB={adapters['tenantB']}",
                   "--tenant", "tenantB", "--prompt", "Question 3?", "--max-new-tokens", "4"])

    assert capsys.readouterr().out.strip().startswith("z")


def test_an_unknown_tenant_is_one_error_line_naming_the_known_ones(adapters, capsys):
    with pytest.raises(SystemExit) as exited:
        generate.main(["--adapter", f"tenantA={adapters['tenantA']}", "--tenant", "tenantC",
                       "--prompt", "Hi"])

    assert exited.value.code == 2
    assert capsys.readouterr().err.strip() == "ERROR: unknown tenant 'tenantC'; known: tenantA"


def test_adapters_of_different_peft_types_are_refused(adapters, tmp_path):
    lora = get_peft_model(models.load_model(models.TINY), LoraConfig(r=2, task_type="CAUSAL_LM"))
    lora.save_pretrained(tmp_path / "lora", save_embedding_layers=False)

    with pytest.raises(StageError, match=r"different PEFT types \(tenantA: PROMPT_TUNING, "
                       r"tenantL: LORA\); PEFT serves one type per base model"):
        TenantGenerator(None, {"tenantA": adapters["tenantA"], "tenantL": tmp_path / "lora"})

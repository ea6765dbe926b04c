"""Serve several tenants' adapters from one loaded base model, switching adapter per request.

Prompt tuning gives each tenant a few thousand parameters over a frozen base, so one process can
hold one copy of the base and every tenant's soft prompt: PEFT keeps the adapters side by side in
one PeftModel (``load_adapter(..., adapter_name=...)``) and ``set_adapter`` picks the one a
request runs with. The same works for LoRA adapters; the adapters of one server must be of one PEFT
type and share their base.

    python -m steps.generate --base-model builtin:tiny \\
        --adapter tenantA=models/a --adapter tenantB=models/b --tenant tenantA --prompt "Hi"

From Python::

    generator = TenantGenerator("builtin:tiny", {"tenantA": "models/a", "tenantB": "models/b"})
    generator.generate("tenantA", "Hi", max_new_tokens=32)
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
from pathlib import Path

import torch

from steps.common import models
from steps.common.contract import StageError


class TenantGenerator:
    """One base model in memory, one PEFT adapter per tenant, greedy generation per request."""

    def __init__(self, base_model: str | None, adapters: dict[str, str | Path]) -> None:
        if not adapters:
            raise StageError("no adapters given; pass at least one --adapter TENANT=FOLDER")
        folders = {tenant: Path(folder) for tenant, folder in adapters.items()}
        configs = {tenant: _adapter_config(tenant, folder) for tenant, folder in folders.items()}
        kinds = {config["peft_type"] for config in configs.values()}
        if len(kinds) > 1:
            listing = ", ".join(f"{t}: {c['peft_type']}" for t, c in configs.items())
            raise StageError(
                f"the adapters are of different PEFT types ({listing}); PEFT serves one type per "
                "base model, so run one generator per type"
            )
        bases = {config.get("base_model_name_or_path") for config in configs.values()}
        if base_model is None:
            if len(bases) != 1 or None in bases:
                raise StageError(
                    f"the adapters record different or no base models ({sorted(map(str, bases))}); "
                    "pass --base-model"
                )
            base_model = bases.pop()

        from peft import PeftModel

        first, *others = folders
        # The tokenizer saved with the adapters (with the chat template they were trained with).
        self.tokenizer = models.load_tokenizer(str(folders[first]))
        base = models.load_model(base_model)
        self.model = PeftModel.from_pretrained(
            base, folders[first], adapter_name=first, is_trainable=False
        )
        for tenant in others:
            self.model.load_adapter(folders[tenant], adapter_name=tenant, is_trainable=False)
        self.model.eval()
        self.base_model = base_model
        self.tenants = list(folders)
        # set_adapter changes the shared model: one request at a time runs with it.
        self._lock = threading.Lock()

    def generate(self, tenant: str, prompt: str | list[dict[str, str]],
                 max_new_tokens: int = 64) -> str:
        """`tenant`'s greedy answer to `prompt` (a user message, or a list of chat messages)."""
        if tenant not in self.tenants:
            raise StageError(f"unknown tenant '{tenant}'; known: {', '.join(self.tenants)}")
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        if self.tokenizer.chat_template:
            text = self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
        else:
            text = "\n".join(message["content"] for message in messages)
        inputs = self.tokenizer(text, add_special_tokens=False, return_tensors="pt")
        inputs = inputs.to(next(self.model.parameters()).device)
        with self._lock, torch.no_grad():
            self.model.set_adapter(tenant)
            output = self.model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=models.stop_token_ids(self.model, self.tokenizer),
                pad_token_id=self.tokenizer.pad_token_id,
            )
        new_tokens = output[0, inputs["input_ids"].shape[1]:]
        return self.tokenizer.decode(new_tokens, skip_special_tokens=True).strip()


def _adapter_config(tenant: str, folder: Path) -> dict:
    path = folder / "adapter_config.json"
    if not path.exists():
        raise StageError(
            f"adapter of tenant '{tenant}': {folder} has no adapter_config.json; give the folder "
            "an SFT stage with a peft_method wrote"
        )
    models.check_adapter(folder)  # safetensors weights, no remote code: PEFT would unpickle a .bin
    return json.loads(path.read_text())


def _parse_adapter(value: str) -> tuple[str, str]:
    tenant, sep, folder = value.partition("=")
    if not sep or not tenant or not folder:
        raise argparse.ArgumentTypeError(f"'{value}' is not TENANT=FOLDER")
    return tenant, folder


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m steps.generate",
        description="Answer a prompt with one tenant's adapter over a shared base model.",
    )
    parser.add_argument("--base-model", default=None,
                        help="base model spec; default: the one the adapters record")
    parser.add_argument("--adapter", action="append", type=_parse_adapter, required=True,
                        metavar="TENANT=FOLDER", help="a tenant's adapter folder; repeat per tenant")
    parser.add_argument("--tenant", required=True, help="whose adapter answers")
    parser.add_argument("--prompt", required=True, help="the user message")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args(argv)
    adapters = dict(args.adapter)
    if len(adapters) != len(args.adapter):
        parser.error("a tenant is named by more than one --adapter")
    try:
        generator = TenantGenerator(args.base_model, adapters)
        print(generator.generate(args.tenant, args.prompt, args.max_new_tokens), flush=True)
    except StageError as err:
        print(f"ERROR: {err}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    main()

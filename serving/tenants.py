"""A multi-tenant model folder: several tenants' adapters over one base, served by one endpoint.

Prompt tuning (and P- and prefix tuning, and LoRA) gives each tenant a few thousand to a few
million parameters over a frozen base, so one endpoint can hold one copy of the base and every
tenant's adapter, and answer each request with the adapter of the tenant it names (serving.model,
serving.requests). This writes that folder from adapter folders the SFT stage saved:

    OUTPUT/base/              the base model, once (the adapters' bundled copy, or --base)
    OUTPUT/tenants/<NAME>/    each tenant's adapter and tokenizer

    python -m serving.tenants OUTPUT --adapter acme=ADAPTER_DIR --adapter globex=ADAPTER_DIR \\
        [--base BASE_DIR] [--archive model.tar.gz]

The adapters must be of one PEFT type (PEFT serves one type per base), trained over the same base
(same weights, byte for byte) and saved with the same tokenizer. ``--archive`` also packs the
folder as the model.tar.gz a model package's ModelDataUrl names.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import sys
from pathlib import Path

from serving.model import TENANTS
from steps.common import contract, models
from steps.common.archives import pack_folder
from steps.common.contract import StageError

TENANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                   "special_tokens_map.json")


def assemble(adapters: dict[str, Path], output: Path, base: Path | None = None) -> Path:
    """Write the multi-tenant folder of `adapters` (tenant -> adapter folder) to `output`, all or
    nothing; the base is `base`, or else the one the adapters carry."""
    if not adapters:
        raise StageError("no adapters given; pass at least one --adapter TENANT=FOLDER")
    adapters = {tenant: Path(folder) for tenant, folder in adapters.items()}
    for tenant, folder in adapters.items():
        if not TENANT_NAME.fullmatch(tenant):
            raise StageError(f"tenant name {tenant!r} must be 1-64 letters, digits, '_', '.' or "
                             "'-', starting with a letter or digit (it travels in a header)")
        if not (folder / "adapter_config.json").exists():
            raise StageError(f"adapter of tenant {tenant!r}: {folder} has no adapter_config.json; "
                             "give the folder an SFT stage with a peft_method wrote")
        models.check_adapter(folder)  # safetensors weights, no remote code
    kinds = {t: json.loads((f / "adapter_config.json").read_text()).get("peft_type")
             for t, f in adapters.items()}
    if len(set(kinds.values())) > 1:
        listing = ", ".join(f"{tenant}: {kind}" for tenant, kind in kinds.items())
        raise StageError(f"the adapters are of different PEFT types ({listing}); PEFT serves one "
                         "type per base model, so assemble one folder per type")
    base = Path(base) if base is not None else _shared_base(adapters)
    if not (base / "config.json").exists():
        raise StageError(f"base model folder {base} has no config.json")
    _same_files(adapters, TOKENIZER_FILES, "tokenizer")

    with contract.atomic_output(Path(output)) as staging:
        shutil.copytree(base, staging / models.BUNDLED_BASE,
                        ignore=shutil.ignore_patterns("checkpoint-*", "*.tar.gz"))
        for tenant, folder in adapters.items():
            target = staging / TENANTS / tenant
            shutil.copytree(folder, target, ignore=shutil.ignore_patterns(
                models.BUNDLED_BASE, "checkpoint-*", "*.tar.gz"))
            config_path = target / "adapter_config.json"
            config = json.loads(config_path.read_text())
            # Relative to the tenant's folder; the endpoint loads base/ for every tenant.
            config["base_model_name_or_path"] = f"../../{models.BUNDLED_BASE}"
            config_path.write_text(json.dumps(config, indent=2) + "\n")
    return Path(output)


def _shared_base(adapters: dict[str, Path]) -> Path:
    """The base every adapter carries: the same files in each, or a StageError naming two that
    differ."""
    bases = {}
    for tenant, folder in adapters.items():
        recorded = models.adapter_base(folder)
        if not recorded or not Path(recorded).is_dir():
            raise StageError(f"adapter of tenant {tenant!r} does not carry its base (it names "
                             f"{recorded!r}); pass the base model folder with --base")
        bases[tenant] = Path(recorded)
    digests = {tenant: _digest(path, ("config.json", "*.safetensors"))
               for tenant, path in bases.items()}
    first = next(iter(digests))
    for tenant, digest in digests.items():
        if digest != digests[first]:
            raise StageError(f"tenants {first!r} and {tenant!r} were trained over different base "
                             "models; one endpoint serves adapters of one base")
    return bases[first]


def _same_files(adapters: dict[str, Path], patterns: tuple[str, ...], what: str) -> None:
    digests = {tenant: _digest(folder, patterns) for tenant, folder in adapters.items()}
    first = next(iter(digests))
    for tenant, digest in digests.items():
        if digest != digests[first]:
            raise StageError(f"tenants {first!r} and {tenant!r} were saved with different "
                             f"{what}s; one endpoint tokenizes every request alike")


def _digest(folder: Path, patterns: tuple[str, ...]) -> str:
    digest = hashlib.sha256()
    files = sorted({path for pattern in patterns for path in folder.glob(pattern)})
    for path in files:
        digest.update(path.name.encode())
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _adapter_argument(value: str) -> tuple[str, str]:
    tenant, sep, folder = value.partition("=")
    if not sep or not tenant or not folder:
        raise argparse.ArgumentTypeError(f"{value!r} is not TENANT=FOLDER")
    return tenant, folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m serving.tenants",
        description="Write one model folder holding several tenants' adapters over one base.")
    parser.add_argument("output", help="the folder to write (replaced if it exists)")
    parser.add_argument("--adapter", action="append", type=_adapter_argument, required=True,
                        metavar="TENANT=FOLDER", help="a tenant's adapter folder; repeat per tenant")
    parser.add_argument("--base", default=None,
                        help="the base model folder; default: the one the adapters carry")
    parser.add_argument("--archive", default=None, metavar="PATH",
                        help="also pack the folder as PATH (a model.tar.gz to register)")
    args = parser.parse_args(argv)
    adapters = dict(args.adapter)
    if len(adapters) != len(args.adapter):
        parser.error("a tenant is named by more than one --adapter")
    try:
        folder = assemble(adapters, Path(args.output), Path(args.base) if args.base else None)
    except StageError as err:
        print("ERROR: " + " ".join(str(err).split()), file=sys.stderr)
        return 2
    print(f"wrote {folder}: tenants {', '.join(adapters)} over one base")
    if args.archive:
        pack_folder(folder, Path(args.archive))
        print(f"packed {args.archive}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

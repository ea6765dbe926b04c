"""builtin:tiny written out as a model folder, with safetensors, pickle-based or no weights."""

from __future__ import annotations

import json
from pathlib import Path

from steps.common import models


def tiny_model_folder(folder: Path, weights: str | None = "safetensors",
                      config_extra: dict | None = None) -> Path:
    """config.json, generation_config.json and tokenizer files of builtin:tiny in `folder`, with
    weights as `model.safetensors` ("safetensors"; "truncated": cut in half), as a pickled state
    dict `pytorch_model.bin` ("pickle", what torch.save and older save_pretrained write) or none
    (None)."""
    import torch

    folder = Path(folder)
    model = models.load_model(models.TINY)
    if weights in ("safetensors", "truncated"):
        model.save_pretrained(folder)
        if weights == "truncated":  # an upload or copy cut short
            path = folder / "model.safetensors"
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        folder.mkdir(parents=True, exist_ok=True)
        model.config.save_pretrained(folder)
        model.generation_config.save_pretrained(folder)
        if weights == "pickle":
            torch.save(model.state_dict(), folder / "pytorch_model.bin")
    models.load_tokenizer(models.TINY).save_pretrained(folder)
    if config_extra:
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, **config_extra}, indent=1))
    return folder

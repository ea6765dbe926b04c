"""Packing a folder as SageMaker packs a training job's model (no heavy imports: the local engine
uses it too)."""

from __future__ import annotations

import tarfile
from pathlib import Path


def pack_folder(folder: Path, archive: Path) -> None:
    """`folder`'s files at the root of a .tar.gz, the layout a model.tar.gz has."""
    folder = Path(folder)
    # Level 1, not tarfile's 9: weights barely compress, and for SmolLM2's 540 MB of float32
    # safetensors level 9 took 210 s against 25 s at level 1, for an archive 5% smaller.
    with tarfile.open(archive, "w:gz", compresslevel=1) as tar:
        for path in sorted(folder.rglob("*")):
            tar.add(path, arcname=path.relative_to(folder).as_posix(), recursive=False)

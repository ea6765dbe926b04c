"""Packing a folder as SageMaker packs a training job's model (no heavy imports: the local engine
uses it too)."""

from __future__ import annotations

import tarfile
from pathlib import Path


def pack_folder(folder: Path, archive: Path) -> None:
    """`folder`'s files at the root of a .tar.gz, the layout a model.tar.gz has."""
    folder = Path(folder)
    with tarfile.open(archive, "w:gz") as tar:
        for path in sorted(folder.rglob("*")):
            tar.add(path, arcname=path.relative_to(folder).as_posix(), recursive=False)

"""The project's container images and the stage entry points each holds.

A pipeline definition names images; SageMaker starts the image's entry point (or the
``ContainerEntrypoint`` the step gives). The local engine has no Docker, so it looks the
image up here and runs the same entry point as a subprocess of the project's Python.
Images are tagged by a digest of the code they contain, so an unchanged tree gives the
same image URIs, the same definition bytes, and step caching stays valid.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from steps.stages import STAGES

REPOSITORY_PREFIX = "llm-lifecycle"

# repository name -> the stage modules baked into that image (run as `python -m MODULE`): each
# stage's job kind names its image (steps/stages.py).
IMAGES: dict[str, tuple[str, ...]] = {
    **{f"{REPOSITORY_PREFIX}-{image}": tuple(stage.module for stage in STAGES.values()
                                             if stage.image == image)
       for image in dict.fromkeys(stage.image for stage in STAGES.values())},
    # Not a job image: SageMaker hosting starts it as `serve` (`python -m serving serve`), for the
    # model package that names it; `llm-pipeline deploy` runs the same locally.
    f"{REPOSITORY_PREFIX}-serving": ("serving",),
}

# What goes into an image and therefore into its tag: each Dockerfile copies exactly these
# (and its .dockerignore lets nothing else in), so the same tag always means the same code.
ROOT = Path(__file__).resolve().parent.parent
CONTENTS = ("steps", "serving", "containers", "setup.cfg", "pyproject.toml")


def code_digest() -> str:
    """A short sha256 over the image contents (stage and serving code, container files,
    dependencies)."""
    digest = hashlib.sha256()
    for entry in CONTENTS:
        path = ROOT / entry
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            if "__pycache__" in file.parts or not file.exists():
                continue
            digest.update(str(file.relative_to(ROOT)).encode())
            digest.update(file.read_bytes())
    return digest.hexdigest()[:16]


def dockerfile(repository: str) -> Path:
    """The Dockerfile of an image: `containers/<name>/Dockerfile` for `llm-lifecycle-<name>`."""
    if repository not in IMAGES:
        raise KeyError(f"unknown image repository {repository!r}; known: {sorted(IMAGES)}")
    return ROOT / "containers" / repository.removeprefix(f"{REPOSITORY_PREFIX}-") / "Dockerfile"


def image_uri(repository: str, account: str, region: str, tag: str) -> str:
    if repository not in IMAGES:
        raise KeyError(f"unknown image repository {repository!r}; known: {sorted(IMAGES)}")
    return f"{account}.dkr.ecr.{region}.amazonaws.com/{repository}:{tag}"


def repository_of(uri: str) -> str:
    """`123.dkr.ecr.us-east-1.amazonaws.com/llm-lifecycle-training:abc` -> `llm-lifecycle-training`."""
    name = uri.rsplit("/", 1)[-1]
    return name.split("@", 1)[0].split(":", 1)[0]


def entry_module(uri: str, container_entrypoint: list[str] | None) -> str:
    """The stage module a job of this image runs; ValueError when the image cannot run it."""
    repository = repository_of(uri)
    if repository not in IMAGES:
        raise ValueError(
            f"image {uri} is not one of the project's images ({', '.join(sorted(IMAGES))}); "
            "add it to containers/images.py or use a project image"
        )
    modules = IMAGES[repository]
    if not container_entrypoint:
        if len(modules) != 1:
            raise ValueError(f"image {repository} holds several stages; the step must name one "
                             "with ContainerEntrypoint ['python', '-m', MODULE]")
        return modules[0]
    if len(container_entrypoint) != 3 or container_entrypoint[:2] != ["python", "-m"]:
        raise ValueError(f"ContainerEntrypoint {container_entrypoint} is not ['python', '-m', MODULE]")
    module = container_entrypoint[2]
    if module not in modules:
        raise ValueError(f"image {repository} does not contain stage {module!r} "
                         f"(it holds {', '.join(modules)})")
    return module

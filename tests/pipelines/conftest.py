import fcntl
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import boto3
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


def clean_env(home: Path, **extra: str) -> dict[str, str]:
    """An environment with no AWS settings of the developer's, and a private engine home."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update({"LLM_PIPELINE_HOME": str(home), "HF_HUB_OFFLINE": "1",
                "TOKENIZERS_PARALLELISM": "false", **extra})
    return env


def derived_recipe(folder: Path, recipe: str, name: str | None = None,
                   **stages: dict[str, object]) -> Path:
    """The shipped `recipe` with some stages' settings changed (`sft={"max_steps": 4}`), written
    into `folder` as <name>.yaml: the same DAG, parameters, wiring and gate, on fewer steps and
    samples, as a user trying a recipe quickly would write it. Named as the recipe by default, so
    that its pipeline is the recipe's (llm-<name>); a setting the stage lacks is refused when the
    recipe loads."""
    written = yaml.safe_load((ROOT / "pipelines/recipes" / f"{recipe}.yaml").read_text())
    written["name"] = name = name or recipe
    for stage, settings in stages.items():
        written["stages"][stage].update(settings)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(written, sort_keys=False))
    return path


def write_quick_recipe(folder: Path, name: str) -> Path:
    """The sft recipe with a few training steps and evaluation samples: the same DAG, faster."""
    return derived_recipe(folder, "sft", name, sft={"max_steps": 4},
                          evaluate={"max_samples": 4, "max_new_tokens": 8})


def cli(env: dict[str, str], *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, check=False, timeout=timeout)


@pytest.fixture(scope="module")
def local_home(tmp_path_factory):
    """A private engine home whose moto server is stopped when the module's tests end."""
    home = tmp_path_factory.mktemp("llm-pipeline-home")
    yield home
    cli(clean_env(home), "server", "stop")


@pytest.fixture(scope="module")
def clients(local_home):
    """boto3 SageMaker and S3 clients of the module's local server (started if needed)."""
    url = cli(clean_env(local_home), "server", "start").stdout.strip()
    kwargs = {"endpoint_url": url, "region_name": "us-east-1", "aws_access_key_id": "local",
              "aws_secret_access_key": "local"}
    return boto3.client("sagemaker", **kwargs), boto3.client("s3", **kwargs)


# The targets every recipe's definition is built for: the local engine's defaults, and an AWS
# account's (any account, role and bucket: building makes no AWS call).
TARGETS = {
    "local": {},
    "aws": {"role_arn": "arn:aws:iam::111122223333:role/x", "bucket": "b", "region": "eu-west-1"},
}


@pytest.fixture(scope="session")
def recipe_definitions(tmp_path_factory) -> dict[tuple[str, str], Path]:
    """(recipe, target) -> the definition JSON file, for every shipped recipe and target, built
    once per test session in one offline process (a build imports the SageMaker SDK: seconds
    each) and shared by the session's pytest-xdist workers: the first to need it builds it, under
    a lock, in the folder all workers' temporary folders are in."""
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent
    out = shared / "recipe-definitions"
    with open(shared / "recipe-definitions.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not (out / "built").is_file():
            shutil.rmtree(out, ignore_errors=True)  # a worker that failed half way
            out.mkdir()
            build_recipe_definitions(out, tmp_path_factory.mktemp("home"))
            (out / "built").touch()
    return {tuple(path.name.removesuffix(".json").split(".")): path for path in out.glob("*.json")}


def build_recipe_definitions(out: Path, home: Path) -> None:
    script = ("import json, sys; from pathlib import Path; from pipelines import recipe, definition\n"
              "targets = json.loads(sys.argv[2])\n"
              "for name in recipe.available():\n"
              "    for target, settings in targets.items():\n"
              "        text = definition.definition_json(recipe.load(name), **settings)\n"
              "        Path(sys.argv[1], f'{name}.{target}.json').write_text(text)\n")
    env = clean_env(home, AWS_ENDPOINT_URL="http://127.0.0.1:9", AWS_DEFAULT_REGION="us-east-1")
    result = subprocess.run([sys.executable, "-c", script, str(out), json.dumps(TARGETS)],
                            env=env, cwd=ROOT, capture_output=True, text=True, check=False,
                            timeout=900)
    assert result.returncode == 0, result.stderr

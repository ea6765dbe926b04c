"""Secrets in the environment of a run never reach what the run writes.

A whole local execution (data preparation, SFT, evaluation, registration; builtin:tiny, two
training steps) runs with realistic-looking fake credentials and tokens in the environment of the
command and of the local server that executes it. The AWS ones are the credentials the command
sends (the local server accepts any); the server itself drops the caller's AWS credentials and
gives its engine and jobs its own (pipelines/local/server.py), and the others stay out of jobs,
whose environment is SageMaker's, not the shell's (tests/pipelines/test_jobs.py). Then
everything the run left
is scanned for them: every file under the engine's home (execution records, the definition, job
logs, hyperparameters.json, the local server's log, model and output archives, unpacked, the local
MLflow store's database and artifacts), every
object in the bucket (unpacked), the registry's metadata as `registry list --json` shows it, and
the command's own output. The definition scanned is the one the engine ran (definition.json), the
bytes `definition` prints and `upsert` sends.
"""

from __future__ import annotations

import base64
import io
import json
import os
import sys
import tarfile
import urllib.parse

import boto3
import pytest

from pipelines.local import jobs
from tests.pipelines.conftest import clean_env, cli

# Fake, in the shapes of the real ones (AWS's documented example key, a session token, a Hugging
# Face token, a Weights & Biases key), so that any redaction that keys on shape is exercised too.
SECRETS = {
    "AWS_ACCESS_KEY_ID": "AKIAIOSFODNN7EXAMPLE",
    "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYzEXAMPLEKEY",
    "AWS_SESSION_TOKEN": "IQoJb3JpZ2luX2VjEXAMPLEtokenMIIBhjCCASygAwIBAgIUY29tZS1mYWtlLXNlc3Npb24",
    "HF_TOKEN": "hf_FakeTokenForLeakTestsAbCdEfGhIjKlMnOpQrStU",
    "HUGGING_FACE_HUB_TOKEN": "hf_FakeHubTokenForLeakTestsZyXwVuTsRqPoNmLkJi",
    "WANDB_API_KEY": "0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c",
}

RECIPE = """\
name: secrets-check
model_package_group: secrets-check
parameters:
  BaseModel: builtin:tiny
stages:
  data_prep:
    tokenizer: $BaseModel
  sft:
    base_model: $BaseModel
    max_steps: 2
    per_device_batch_size: 2
    logging_steps: 1
    checkpoint_steps: 0
  evaluate:
    base_model: $BaseModel
    max_samples: 2
    max_new_tokens: 4
gate:
  metric: perplexity_ratio
"""


def forms(value: str) -> set[bytes]:
    """The ways a value can be written: as is, URL-quoted, JSON-escaped, base64."""
    return {value.encode(), urllib.parse.quote(value, safe="").encode(),
            json.dumps(value)[1:-1].encode(), base64.b64encode(value.encode())}


NEEDLES = {name: forms(value) for name, value in SECRETS.items()}


def leaks(where: str, payload: bytes) -> list[str]:
    """'<where>: <variable>' for each secret in `payload`, looking inside tar archives too."""
    found = [f"{where}: {name}" for name, needles in NEEDLES.items()
             if any(needle in payload for needle in needles)]
    if payload[:2] == b"\x1f\x8b" or where.endswith((".tar", ".tar.gz")):
        try:
            with tarfile.open(fileobj=io.BytesIO(payload)) as archive:
                for member in archive.getmembers():
                    handle = archive.extractfile(member) if member.isfile() else None
                    if handle is not None:
                        found += leaks(f"{where}!{member.name}", handle.read())
        except tarfile.TarError:
            pass
    return found


def test_a_job_that_prints_its_credentials_has_them_masked_in_its_log_and_display(tmp_path):
    env = {"PATH": os.environ["PATH"], **SECRETS, "TOKENIZERS_PARALLELISM": "false",
           "AWS_ENDPOINT_URL": "http://127.0.0.1:5000", "SHORT_TOKEN": "local"}
    shown: list[str] = []
    code, stopped = jobs._run(
        [sys.executable, "-c",
         "import os\nfor name in sorted(os.environ): print(f'{name}={os.environ[name]}')"],
        env, tmp_path, tmp_path / "log.txt", shown.append)

    log = (tmp_path / "log.txt").read_text()
    assert code == 0 and not stopped and "HF_TOKEN=****" in log and "AWS_SECRET_ACCESS_KEY=****" in log
    assert leaks("log.txt", log.encode()) == [] and leaks("display", "\n".join(shown).encode()) == []
    # Only credentials, and not short values that are ordinary words.
    assert "TOKENIZERS_PARALLELISM=false" in log and "SHORT_TOKEN=local" in log
    assert "AWS_ENDPOINT_URL=http://127.0.0.1:5000" in log


@pytest.fixture(scope="module")
def run_with_secrets(tmp_path_factory):
    """One execution with the secrets in its environment; (home, inputs, env, its output)."""
    home = tmp_path_factory.mktemp("secrets-home")
    folder = tmp_path_factory.mktemp("secrets-inputs")
    (folder / "recipe.yaml").write_text(RECIPE)
    (folder / "train.jsonl").write_text("".join(
        json.dumps({"prompt": f"What is {a} + {b}?", "completion": f"{a + b}"}) + "\n"
        for a in range(3) for b in range(2)))
    # The server runs the jobs: it is started from the same environment as the command.
    url = cli(clean_env(home, **SECRETS), "server", "start").stdout.strip()
    env = clean_env(home, AWS_ENDPOINT_URL=url, AWS_DEFAULT_REGION="us-east-1", **SECRETS)
    result = cli(env, "run", "--recipe", str(folder / "recipe.yaml"),
                 "-p", f"InputData={folder / 'train.jsonl'}", "-p", "EvalThreshold=0")
    yield home, folder, env, result
    cli(clean_env(home), "server", "stop")


@pytest.mark.e2e
def test_the_run_succeeded_and_registered_a_package(run_with_secrets):
    *_, result = run_with_secrets
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Registered model package" in result.stdout


@pytest.mark.e2e
def test_no_secret_reaches_files_s3_objects_the_registry_or_the_definition(run_with_secrets):
    home, _, env, result = run_with_secrets
    assert result.returncode == 0, result.stderr[-3000:]
    found = leaks("run stdout", result.stdout.encode()) + leaks("run stderr",
                                                                result.stderr.encode())

    files = sorted(p for p in home.rglob("*") if p.is_file())
    names = {p.name for p in files}
    # What is scanned holds what a leak would be written to, the local MLflow store included
    # (the runs' params, tags and metrics, and their artifacts beside it).
    assert {"execution.json", "definition.json", "log.txt", "hyperparameters.json",
            "model.tar.gz", "server.log", "mlflow.db", "training_summary.json"} <= names, names
    for path in files:
        found += leaks(str(path.relative_to(home)), path.read_bytes())

    s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                      aws_access_key_id="local", aws_secret_access_key="local")
    objects = 0
    for bucket in s3.list_buckets()["Buckets"]:
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket["Name"]):
            for item in page.get("Contents", []):
                body = s3.get_object(Bucket=bucket["Name"], Key=item["Key"])["Body"].read()
                found += leaks(f"s3://{bucket['Name']}/{item['Key']}", body)
                objects += 1
    assert objects > 5

    listed = cli(env, "registry", "list", "--group", "secrets-check", "--json")
    assert listed.returncode == 0, listed.stderr
    packages = json.loads(listed.stdout)
    assert len(packages) == 1 and packages[0]["metadata"]["param_BaseModel"] == "builtin:tiny"
    found += leaks("registry list --json", listed.stdout.encode())

    assert found == [], "\n".join(found)

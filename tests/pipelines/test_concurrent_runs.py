"""Two executions of one pipeline at once: two `llm-pipeline run` processes on one engine home.

What CI does when two commits land close together, or a person starts a run while another is in
flight: both share the engine home (its server record, definitions, step cache and execution
records), the one local server (pipelines, S3 and the Model Registry) and the pipeline's bucket.
"""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pytest

from pipelines.definition import DEFAULT_BUCKET
from pipelines.local.cache import output_uris
from tests.pipelines.conftest import ROOT, clean_env, cli
from tests.pipelines.test_cache import write_sums

pytestmark = pytest.mark.e2e

PIPELINE, GROUP = "llm-concurrent", "concurrent-test"
# The smallest sft pipeline: two training steps, no generation at evaluation.
RECIPE = """\
name: concurrent
model_package_group: concurrent-test
parameters:
  BaseModel: builtin:tiny
  LearningRate: 0.005
stages:
  data_prep:
    tokenizer: $BaseModel
  sft:
    base_model: $BaseModel
    learning_rate: $LearningRate
    max_steps: 2
    per_device_batch_size: 4
    logging_steps: 1
    checkpoint_steps: 0
  evaluate:
    base_model: $BaseModel
    max_samples: 0
gate:
  metric: perplexity_ratio
"""


def test_commands_started_at_once_share_one_local_server(tmp_path):
    """Each command that finds no server starts one; started at once, without the home's lock,
    several would, and all but the last recorded would be lost (their S3 objects and packages
    with them) and left running."""
    home = tmp_path / "home"
    env = clean_env(home)
    starts = [subprocess.Popen([sys.executable, "-m", "pipelines.cli", "server", "start"], env=env,
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for _ in range(3)]
    urls = [start.communicate(timeout=120)[0].strip() for start in starts]
    try:
        assert len(set(urls)) == 1, urls
        assert cli(env, "server", "status").stdout.strip() == urls[0]
        log = (home / "server.log").read_text()
        assert log.count("serving the local SageMaker on http://") == 1, log
    finally:
        cli(env, "server", "stop")
        _stop_servers_on({port for url in urls if (port := url.rsplit(":", 1)[-1]).isdigit()})


def _stop_servers_on(ports: set[str]) -> None:
    """Stop the local servers this test started on `ports` that `server stop` did not know of."""
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if b"pipelines.local.server" in argv and any(port.encode() in argv for port in ports):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(cmdline.parent.name), signal.SIGTERM)


def test_two_executions_at_once_keep_to_their_own_prefixes_and_register_a_package_each(
        tmp_path, local_home):
    """Both executions succeed; everything each wrote to S3 is under its own execution's prefix;
    the group then holds two packages, each naming its own execution.

    The two differ in LearningRate, so that both train: with identical settings, whether the
    second one's SFT is a cache hit of the first's (and its registration then finds the first's
    package already holding that artifact and data, and registers nothing: the engine's
    de-duplication, "the same artifact and data is not registered twice") depends on which
    finishes first. DataPrep, the same in both, may still be a cache hit for one of them when
    the other's finished before it looked; the test holds either way. The engine's server is not
    started beforehand: both commands find none and must still end up on one.
    """
    recipe = tmp_path / "concurrent.yaml"
    recipe.write_text(RECIPE)
    data = write_sums(tmp_path)
    env = clean_env(local_home)
    rates = ("0.005", "0.004")
    started = time.monotonic()
    processes = [
        subprocess.Popen([sys.executable, "-m", "pipelines.cli", "run", "--recipe", str(recipe),
                          "-p", f"InputData={data}", "-p", f"LearningRate={rate}",
                          "-p", "EvalThreshold=0"],
                         env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
        for rate in rates]
    results = [process.communicate(timeout=600) for process in processes]
    print(f"both executions took {time.monotonic() - started:.0f}s")
    for process, (stdout, stderr) in zip(processes, results, strict=True):
        assert process.returncode == 0, stdout[-3000:] + stderr[-3000:]

    ids = [stdout.split("\nExecution ", 1)[1].split(":", 1)[0] for stdout, _ in results]
    assert len(set(ids)) == 2
    records = {i: json.loads((local_home / "executions" / PIPELINE / i / "execution.json")
                             .read_text()) for i in ids}
    for execution_id, record in records.items():
        assert record["status"] == "Succeeded", record["failure_reason"]
        assert record["steps"]["Register"]["status"] == "Succeeded"

    # One server: the one the home records, which both executions' packages are in.
    url = cli(env, "server", "status").stdout.strip()
    kwargs = {"endpoint_url": url, "region_name": "us-east-1", "aws_access_key_id": "local",
              "aws_secret_access_key": "local"}
    sagemaker, s3 = boto3.client("sagemaker", **kwargs), boto3.client("s3", **kwargs)

    # Every key an execution wrote is under its own prefix; nothing else but the uploaded input
    # (content-addressed: the same bytes under the same key, whoever uploads them) and the demo
    # datasets the pipeline's defaults name (upsert puts them there).
    prefixes = {i: f"{PIPELINE}/{i}/" for i in ids}
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=DEFAULT_BUCKET)
            for o in page.get("Contents", [])]
    owners = {key: [i for i, prefix in prefixes.items() if key.startswith(prefix)] for key in keys}
    strays = [key for key, found in owners.items()
              if not found and not key.startswith(("inputs/", "datasets/demo/"))]
    assert not strays, strays
    for execution_id, record in records.items():
        for name, step in record["steps"].items():
            # A step that ran wrote under its own execution; a reused one (a cache hit on the
            # other execution's DataPrep) points at what the other one wrote.
            writer = step["reused_from"] or execution_id
            assert writer in ids, (execution_id, name, writer)
            for uri in output_uris(step["properties"]):
                assert uri.startswith(f"s3://{DEFAULT_BUCKET}/{prefixes[writer]}{name}/"), \
                    (execution_id, name, uri)
        assert record["steps"]["SFT"]["reused_from"] == ""  # both trained
        assert any(key.startswith(prefixes[execution_id] + "SFT/") for key in keys)

    # Two packages, one per execution, each naming its execution and model.
    summaries = sagemaker.list_model_packages(ModelPackageGroupName=GROUP)
    packages = [sagemaker.describe_model_package(ModelPackageName=p["ModelPackageArn"])
                for p in summaries["ModelPackageSummaryList"]]
    assert len(packages) == 2
    by_execution = {p["CustomerMetadataProperties"]["pipeline_execution"]: p for p in packages}
    assert set(by_execution) == set(ids)
    for execution_id, package in by_execution.items():
        record = records[execution_id]
        assert record["steps"]["Register"]["outcome"] == package["ModelPackageArn"]
        model = package["InferenceSpecification"]["Containers"][0]["ModelDataUrl"]
        assert model == record["steps"]["SFT"]["properties"]["ModelArtifacts"]["S3ModelArtifacts"]
        assert model.startswith(f"s3://{DEFAULT_BUCKET}/{prefixes[execution_id]}SFT/")
        assert package["CustomerMetadataProperties"]["param_LearningRate"] == \
            str(record["parameters"]["LearningRate"])
    assert {p["CustomerMetadataProperties"]["param_LearningRate"] for p in packages} == \
        {str(float(rate)) for rate in rates}

    # The engine's own files: one step-cache entry per step each execution ran.
    for execution_id, record in records.items():
        for name in ("DataPrep", "SFT", "Evaluate"):
            entry = local_home / "cache" / PIPELINE / name / f"{execution_id}.json"
            assert entry.is_file() == (record["steps"][name]["reused_from"] == ""), (name, entry)

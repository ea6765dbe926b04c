"""End to end: the sft recipe through the local engine on a tiny model, against moto."""

import json
import re
from pathlib import Path

import pytest

from tests.pipelines.conftest import clean_env, cli

pytestmark = pytest.mark.e2e

RECORDS = [{"prompt": f"What is {a} + {b}?", "completion": f"{a} + {b} = {a + b}."}
           for a in range(6) for b in range(6)]


@pytest.fixture(scope="module")
def env(local_home):
    return clean_env(local_home)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "sums.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return path


def run(env, data, group, *extra):
    return cli(env, "run", "--recipe", "sft", "-p", "BaseModel=builtin:tiny",
               "-p", f"InputData={data}", "-p", f"ModelPackageGroup={group}",
               "-p", "LearningRate=0.005", *extra)


def latest_execution(home, pipeline="llm-sft"):
    folders = sorted((home / "executions" / pipeline).iterdir(), key=lambda p: p.stat().st_mtime)
    return json.loads((folders[-1] / "execution.json").read_text())


def read_json(s3, uri):
    bucket, _, key = uri[5:].partition("/")
    return json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read())


@pytest.fixture(scope="module")
def registered(env, data, clients, local_home):
    """A passing run of the module's own group, and what the registry listed right after it.

    Every test that needs a registered package takes it from here, so none depends on another
    having run first (or not having changed the package since)."""
    result = run(env, data, "e2e-pass", "-p", "EvalThreshold=1.0")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    listed = cli(env, "registry", "list", "--group", "e2e-pass", "--json")
    return result, latest_execution(local_home), json.loads(listed.stdout)


def test_passing_run_registers_the_package_with_metrics_and_metadata(registered, env, clients):
    sagemaker, s3 = clients
    result, execution, packages = registered
    assert "Registered model package" in result.stdout

    assert execution["status"] == "Succeeded"
    statuses = {name: step["status"] for name, step in execution["steps"].items()}
    assert statuses == {"DataPrep": "Succeeded", "SFT": "Succeeded", "Evaluate": "Succeeded",
                        "CompareWithApproved": "Succeeded", "EvaluationGate": "Succeeded",
                        "Register": "Succeeded", "EvaluationGateFailed": "NotExecuted"}
    assert "no Approved package in group e2e-pass yet" in result.stdout
    # The report, where the registry points and where it lies on this machine.
    report = re.search(r"Evaluation report: (s3://\S+/report\.html)\n  on disk: (\S+)\n",
                       result.stdout)
    assert report, result.stdout[-2000:]
    assert Path(report[2]).read_bytes() == clients[1].get_object(
        Bucket=report[1][5:].split("/", 1)[0], Key=report[1][5:].split("/", 1)[1])["Body"].read()

    assert len(packages) == 1
    package = packages[0]
    assert package["status"] == "PendingManualApproval"
    meta = package["metadata"]
    assert meta["recipe"] == "sft" and meta["param_BaseModel"] == "builtin:tiny"
    assert meta["pipeline_execution"] == execution["execution_id"]

    data_uri = execution["steps"]["DataPrep"]["properties"]["ProcessingOutputConfig"]["Outputs"][0]
    manifest = read_json(s3, data_uri["S3Output"]["S3Uri"] + "/manifest.json")
    assert meta["data_manifest_sha256"] == manifest["dataset_sha256"]

    described = sagemaker.describe_model_package(ModelPackageName=package["arn"])
    evaluation = read_json(s3, described["ModelMetrics"]["ModelQuality"]["Statistics"]["S3Uri"])
    assert package["metrics"]["perplexity_ratio"] == evaluation["metrics"]["perplexity_ratio"]["value"]
    assert evaluation["metrics"]["perplexity_ratio"]["value"] >= 1.0
    assert float(meta["eval_perplexity_ratio"]) == pytest.approx(
        evaluation["metrics"]["perplexity_ratio"]["value"])
    # the registered artifact is the training job's model.tar.gz, holding a PEFT adapter
    model_uri = described["InferenceSpecification"]["Containers"][0]["ModelDataUrl"]
    assert model_uri == execution["steps"]["SFT"]["properties"]["ModelArtifacts"]["S3ModelArtifacts"]
    assert s3.head_object(Bucket=model_uri[5:].split("/")[0], Key=model_uri[5:].split("/", 1)[1])
    # training metrics were read from the log with the definition's metric regexes
    metrics = {m["MetricName"] for m in execution["steps"]["SFT"]["properties"]["FinalMetricDataList"]}
    assert {"train_loss", "tokens_per_second"} <= metrics


def test_too_high_threshold_takes_the_fail_branch_and_registers_nothing(env, data, clients, local_home):
    sagemaker, _ = clients
    result = run(env, data, "e2e-fail", "-p", "EvalThreshold=1000000")
    assert result.returncode == 1
    assert "Evaluation gate failed: perplexity_ratio =" in result.stderr
    assert "EvalThreshold = 1000000" in result.stderr
    execution = latest_execution(local_home)
    assert execution["steps"]["EvaluationGateFailed"]["status"] == "Failed"
    assert execution["steps"]["Register"]["status"] == "NotExecuted"
    groups = sagemaker.list_model_package_groups()["ModelPackageGroupSummaryList"]
    assert "e2e-fail" not in {g["ModelPackageGroupName"] for g in groups}


def test_a_candidate_that_does_not_beat_the_approved_package_is_not_registered(
        registered, env, data, clients, local_home):
    # The registered package is approved, then the same model is a candidate again, asked to beat
    # it by a margin (the training steps are cache hits; the registry comparison is never cached).
    sagemaker, _ = clients
    _, _, approved = registered
    assert len(approved) == 1
    assert cli(env, "registry", "approve", approved[0]["arn"], "--reason", "e2e").returncode == 0

    result = run(env, data, "e2e-pass", "-p", "EvalThreshold=1.0", "-p", "ApprovedMargin=0.5")
    assert result.returncode == 1
    execution = latest_execution(local_home)
    assert execution["steps"]["Register"]["status"] == "NotExecuted"
    assert f"of the Approved {approved[0]['arn']}: +0 above it, less than the required 0.5" \
        in result.stderr
    packages = sagemaker.list_model_packages(ModelPackageGroupName="e2e-pass")
    assert len(packages["ModelPackageSummaryList"]) == 1


def test_bad_data_fails_data_prep_naming_the_record_and_stops_dependants(env, tmp_path, local_home):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c", "completion": 5}\n')
    result = run(env, bad, "e2e-bad")
    assert result.returncode == 1
    assert "step DataPrep failed" in result.stderr
    assert "bad.jsonl:2" in result.stderr and "completion" in result.stderr
    execution = latest_execution(local_home)
    assert [execution["steps"][s]["status"] for s in ("DataPrep", "SFT", "Evaluate")] == [
        "Failed", "NotExecuted", "NotExecuted"]
    # The reason is the one the job left in /opt/ml/output/message, its ExitMessage on SageMaker.
    data_prep = execution["steps"]["DataPrep"]
    message = data_prep["properties"]["ExitMessage"]
    assert message.startswith("ERROR: ") and "bad.jsonl:2" in message
    assert data_prep["failure_reason"] == f"exit code 2: {message.removeprefix('ERROR: ')}"
    assert result.stderr.strip().splitlines()[-1].endswith(message.removeprefix("ERROR: "))

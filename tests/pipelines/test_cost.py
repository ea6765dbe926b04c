"""The cost ledger: prices from one dated table, per-step cost, totals, cost per training token."""

import json
from datetime import UTC, datetime, timedelta

import boto3
import pytest
from botocore.stub import Stubber

from pipelines import cost, definition, recipe
from tests.pipelines.conftest import clean_env, cli

PRICES = cost.PriceTable("2025-06-01", "us-east-1", "test",
                         {"ml.m5.xlarge": 0.23, "ml.g5.2xlarge": 1.515})


def job_step(name, kind, instance, count, seconds, status="Succeeded", **extra):
    resources = {"InstanceType": instance, "InstanceCount": count}
    properties = ({"ProcessingResources": {"ClusterConfig": resources}} if kind == "Processing"
                  else {"ResourceConfig": resources})
    properties.update(extra.pop("properties", {}))
    return {"name": name, "type": kind, "status": status, "billable_seconds": seconds,
            "properties": properties, **extra}


def execution(*steps):
    return {"execution_id": "abc123", "steps": {s["name"]: s for s in steps}}


def tokens(n):
    return {"FinalMetricDataList": [{"MetricName": "train_loss", "Value": 1.2},
                                    {"MetricName": "total_tokens", "Value": float(n)}]}


def test_the_price_table_is_dated_and_prices_every_instance_type_a_recipe_uses():
    prices = cost.load_prices()
    assert datetime.strptime(prices.date, "%Y-%m-%d") and prices.region == "us-east-1"
    assert prices.source.startswith("https://aws.amazon.com/")
    for name in recipe.available():
        parameters = {**definition.COMMON_PARAMETER_DEFAULTS, **recipe.load(name).parameters}
        for key, value in parameters.items():
            if key.endswith("InstanceType"):
                assert value in prices.usd_per_hour, f"recipe {name}: {key}={value} has no price"
    for common in ("ml.m5.xlarge", "ml.g5.12xlarge", "ml.p4d.24xlarge", "ml.p5.48xlarge"):
        assert prices.usd_per_hour[common] > 0


def test_each_step_costs_its_hourly_price_times_instances_times_billable_time():
    ledger = cost.local_ledger(execution(
        job_step("DataPrep", "Processing", "ml.m5.xlarge", 1, 1800),
        job_step("SFT", "Training", "ml.g5.2xlarge", 2, 3600, properties=tokens(2_000_000)),
        {"name": "Gate", "type": "Condition", "status": "Succeeded", "properties": {}},
    ), PRICES)
    usd = {s["step"]: s["usd"] for s in ledger["steps"]}
    assert usd == {"DataPrep": pytest.approx(0.115), "SFT": pytest.approx(3.03)}
    assert ledger["total_usd"] == pytest.approx(3.145)
    assert ledger["training_tokens"] == 2_000_000
    assert ledger["usd_per_million_training_tokens"] == pytest.approx(3.145 / 2)
    assert ledger["prices"]["date"] == "2025-06-01"
    text = cost.format_ledger(ledger)
    assert "3.1450" in text and "per million training tokens (2,000,000 trained)" in text


def test_an_instance_type_without_a_price_is_unknown_not_free():
    ledger = cost.local_ledger(execution(
        job_step("DataPrep", "Processing", "ml.m5.xlarge", 1, 3600),
        job_step("SFT", "Training", "ml.trn1.32xlarge", 1, 3600, properties=tokens(1000)),
    ), PRICES)
    sft = next(s for s in ledger["steps"] if s["step"] == "SFT")
    assert sft["usd"] is None and "no price for ml.trn1.32xlarge" in sft["note"]
    assert ledger["total_usd"] is None and ledger["usd_per_million_training_tokens"] is None
    assert ledger["priced_usd"] == pytest.approx(0.23) and ledger["unpriced_steps"] == ["SFT"]
    text = cost.format_ledger(ledger)
    assert "unknown (at least 0.2300; no price for SFT)" in text


def test_reused_steps_cost_nothing_now_but_count_in_what_the_model_cost_to_make():
    cached = job_step("DataPrep", "Processing", "ml.m5.xlarge", 1, 0, reused_from="old111",
                      cache="hit (execution old111)", source_billable_seconds=3600)
    trained = job_step("SFT", "Training", "ml.g5.2xlarge", 1, 3600, properties=tokens(1000))
    ledger = cost.local_ledger(execution(cached, trained), PRICES)
    assert ledger["steps"][0]["usd"] == 0 and ledger["steps"][0]["note"] == \
        "cache hit: ran in execution old111"
    assert ledger["total_usd"] == pytest.approx(1.515)
    assert cost.production_cost([cached, trained], PRICES) == pytest.approx(0.23 + 1.515)


def test_a_sagemaker_execution_is_costed_from_its_jobs_billable_time():
    sagemaker = boto3.client("sagemaker", region_name="us-east-1", aws_access_key_id="x",
                             aws_secret_access_key="x")
    arn = "arn:aws:sagemaker:us-east-1:123456789012:pipeline/llm-sft/execution/exec1"
    job_arn = "arn:aws:sagemaker:us-east-1:123456789012:{}/{}"
    start = datetime(2026, 1, 1, tzinfo=UTC)
    with Stubber(sagemaker) as stub:
        stub.add_response("list_pipeline_execution_steps", {"PipelineExecutionSteps": [
            {"StepName": "DataPrep", "StepStatus": "Succeeded", "Metadata": {
                "ProcessingJob": {"Arn": job_arn.format("processing-job", "prep-job")}}},
            {"StepName": "SFT", "StepStatus": "Succeeded", "Metadata": {
                "TrainingJob": {"Arn": job_arn.format("training-job", "sft-job")}}},
            {"StepName": "Evaluate", "StepStatus": "Succeeded", "Metadata": {
                "ProcessingJob": {"Arn": job_arn.format("processing-job", "eval-job")}},
             "CacheHitResult": {"SourcePipelineExecutionArn": arn.replace("exec1", "exec0")}},
        ]}, {"PipelineExecutionArn": arn, "SortOrder": "Ascending"})
        stub.add_response("describe_processing_job", processing("prep-job", start, 1800),
                          {"ProcessingJobName": "prep-job"})
        stub.add_response("describe_training_job", {
            "TrainingJobName": "sft-job", "TrainingJobArn": job_arn.format("training-job", "sft-job"),
            "TrainingJobStatus": "Completed", "SecondaryStatus": "Completed",
            "AlgorithmSpecification": {"TrainingInputMode": "File"},
            "ModelArtifacts": {"S3ModelArtifacts": "s3://b/m.tar.gz"},
            "ResourceConfig": {"InstanceType": "ml.g5.2xlarge", "InstanceCount": 2,
                               "VolumeSizeInGB": 100},
            "StoppingCondition": {}, "CreationTime": start, "BillableTimeInSeconds": 1800,
            "FinalMetricDataList": [{"MetricName": "total_tokens", "Value": 500000.0}]},
            {"TrainingJobName": "sft-job"})
        stub.add_response("describe_processing_job", processing("eval-job", start, 600),
                          {"ProcessingJobName": "eval-job"})
        ledger = cost.aws_ledger(sagemaker, arn, PRICES)
    steps = {s["step"]: s for s in ledger["steps"]}
    assert list(steps) == ["DataPrep", "SFT", "Evaluate"]
    assert steps["DataPrep"]["billable_seconds"] == 1800 and steps["DataPrep"]["usd"] == \
        pytest.approx(0.115)
    assert steps["SFT"]["usd"] == pytest.approx(1.515)  # 2 instances × 30 min
    assert steps["Evaluate"]["usd"] == 0 and "cache hit: ran in execution exec0" in \
        steps["Evaluate"]["note"]
    assert ledger["total_usd"] == pytest.approx(1.63)
    assert ledger["usd_per_million_training_tokens"] == pytest.approx(1.63 * 2)


def test_a_spot_training_job_shows_what_spot_saved_and_costs_its_billable_seconds():
    sagemaker = boto3.client("sagemaker", region_name="us-east-1", aws_access_key_id="x",
                             aws_secret_access_key="x")
    arn = "arn:aws:sagemaker:us-east-1:123456789012:pipeline/llm-cpt/execution/exec1"
    job_arn = "arn:aws:sagemaker:us-east-1:123456789012:training-job/cpt-job"
    with Stubber(sagemaker) as stub:
        stub.add_response("list_pipeline_execution_steps", {"PipelineExecutionSteps": [
            {"StepName": "CPT", "StepStatus": "Succeeded",
             "Metadata": {"TrainingJob": {"Arn": job_arn}}}]},
            {"PipelineExecutionArn": arn, "SortOrder": "Ascending"})
        stub.add_response("describe_training_job", {
            "TrainingJobName": "cpt-job", "TrainingJobArn": job_arn,
            "TrainingJobStatus": "Completed", "SecondaryStatus": "Completed",
            "AlgorithmSpecification": {"TrainingInputMode": "File"},
            "ModelArtifacts": {"S3ModelArtifacts": "s3://b/m.tar.gz"},
            "ResourceConfig": {"InstanceType": "ml.g5.2xlarge", "InstanceCount": 1,
                               "VolumeSizeInGB": 100},
            "StoppingCondition": {"MaxRuntimeInSeconds": 7200, "MaxWaitTimeInSeconds": 14400},
            "EnableManagedSpotTraining": True, "CreationTime": datetime(2026, 1, 1, tzinfo=UTC),
            # SageMaker's own example: 100 s billed of 500 trained is an 80% saving.
            "TrainingTimeInSeconds": 500, "BillableTimeInSeconds": 100},
            {"TrainingJobName": "cpt-job"})
        ledger = cost.aws_ledger(sagemaker, arn, PRICES)
    (step,) = ledger["steps"]
    assert step["billable_seconds"] == 100 and step["usd"] == pytest.approx(1.515 * 100 / 3600)
    assert step["note"] == "managed spot: billed 100 of 500 s trained (80% saved)"
    assert "80% saved" in cost.format_ledger(ledger)


def test_a_local_spot_job_says_that_a_local_run_saves_nothing():
    ledger = cost.local_ledger(execution(job_step(
        "SFT", "Training", "ml.g5.2xlarge", 1, 3600,
        properties={"EnableManagedSpotTraining": True})), PRICES)
    (step,) = ledger["steps"]
    assert step["usd"] == pytest.approx(1.515)  # every second, as on demand
    assert "a local run bills every second" in step["note"]


def processing(name, start, seconds):
    return {"ProcessingJobName": name, "ProcessingJobStatus": "Completed",
            "ProcessingJobArn": f"arn:aws:sagemaker:us-east-1:123456789012:processing-job/{name}",
            "AppSpecification": {"ImageUri": "img"}, "CreationTime": start,
            "ProcessingResources": {"ClusterConfig": {
                "InstanceType": "ml.m5.xlarge", "InstanceCount": 1, "VolumeSizeInGB": 30}},
            "ProcessingStartTime": start, "ProcessingEndTime": start + timedelta(seconds=seconds)}


def test_the_cost_command_prints_the_ledger_of_a_past_local_execution(tmp_path):
    folder = tmp_path / "executions" / "llm-sft" / "abc123"
    folder.mkdir(parents=True)
    (folder / "execution.json").write_text(json.dumps(execution(
        job_step("DataPrep", "Processing", "ml.m5.xlarge", 1, 3600),
        job_step("SFT", "Training", "ml.g5.2xlarge", 1, 7200, properties=tokens(1_000_000)))))
    env = clean_env(tmp_path)

    shown = cli(env, "cost", "abc123")
    assert shown.returncode == 0, shown.stderr
    assert "DataPrep" in shown.stdout and "ml.g5.2xlarge" in shown.stdout
    hourly = cost.load_prices().usd_per_hour
    total = hourly["ml.m5.xlarge"] + 2 * hourly["ml.g5.2xlarge"]
    assert f"{total:.4f}" in shown.stdout
    as_json = json.loads(cli(env, "cost", "abc123", "--json").stdout)
    assert as_json["total_usd"] == pytest.approx(total)
    assert as_json["usd_per_million_training_tokens"] == pytest.approx(total)

    missing = cli(env, "cost", "nope")
    assert missing.returncode == 2 and missing.stderr.startswith("ERROR: no local execution nope")

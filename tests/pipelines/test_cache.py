"""Step caching in the local engine, with SageMaker's semantics, and idempotent registration."""

import json
from datetime import timedelta

import pytest

from pipelines.local import cache
from pipelines.local.expressions import Scope
from tests.pipelines.conftest import clean_env, cli, write_quick_recipe

# -- the cache on its own ------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("P30D", timedelta(days=30)),
    ("PT12H", timedelta(hours=12)),
    ("P1DT6H30M", timedelta(days=1, hours=6, minutes=30)),
    ("P2W", timedelta(days=14)),
    ("P1Y", timedelta(days=365)),
    ("30d", timedelta(days=30)),  # the short forms SageMaker's guide shows
    ("T16m", timedelta(minutes=16)),
])
def test_expire_after_is_an_iso_8601_duration(text, expected):
    assert cache.parse_duration(text) == expected


@pytest.mark.parametrize("text", ["30 days", "P", "PT", "P1DT", ""])
def test_a_bad_expire_after_is_refused_with_examples(text):
    with pytest.raises(ValueError, match="not an ISO 8601 duration"):
        cache.parse_duration(text)


EXECUTION_SCOPED = {"Std:Join": {"On": "/", "Values": [
    "s3://bucket/p", {"Get": "Execution.PipelineExecutionId"}, "SFT"]}}


def training_step(learning_rate: float, instance_type: str,
                  checkpoints: object = "s3://bucket/p/checkpoints/SFT") -> dict:
    return {"AlgorithmSpecification": {"TrainingImage": "img:1", "TrainingInputMode": "File"},
            "HyperParameters": {"learning_rate": {"Get": "Parameters.LearningRate"}},
            "InputDataConfig": [{"ChannelName": "train", "DataSource": {"S3DataSource": {
                "S3Uri": {"Get": "Steps.DataPrep.Outputs['data'].S3Uri"}}}}],
            "ResourceConfig": {"InstanceType": instance_type, "InstanceCount": 1},
            "OutputDataConfig": {"S3OutputPath": EXECUTION_SCOPED},
            "CheckpointConfig": {"S3Uri": checkpoints}}


def scope(execution_id: str, learning_rate: float, data_uri: str) -> Scope:
    return Scope(parameters={"LearningRate": learning_rate},
                 execution={"PipelineExecutionId": execution_id},
                 step_properties={"DataPrep": {"Outputs": [{"OutputName": "data",
                                                            "S3Uri": data_uri}]}})


def test_the_key_ignores_outputs_and_instances_but_not_inputs_or_hyperparameters():
    arguments = training_step(0.1, "ml.g5.xlarge")
    first = cache.key("Training", arguments, scope("exec1", 0.1, "s3://bucket/p/exec0/data"))
    # another execution, on another instance type, writing elsewhere: the same key
    again = cache.key("Training", training_step(0.1, "ml.p4d.24xlarge"),
                      scope("exec2", 0.1, "s3://bucket/p/exec0/data"))
    assert again == first
    changed = cache.key("Training", arguments, scope("exec3", 0.2, "s3://bucket/p/exec9/data"))
    assert cache.differences(first, changed) == [
        "HyperParameters.learning_rate", "InputDataConfig[train].DataSource.S3DataSource.S3Uri"]


def test_an_execution_id_in_a_key_attribute_misses_every_time_as_it_does_on_sagemaker():
    # SageMaker compares the arguments as sent: a checkpoint location holding the execution id
    # (what the pipeline had before) never matches an earlier execution's, so the local cache
    # must not hit either, or a local hit would promise an AWS hit that never comes.
    arguments = training_step(0.1, "ml.g5.xlarge", checkpoints=EXECUTION_SCOPED)
    first = cache.key("Training", arguments, scope("exec1", 0.1, "s3://bucket/p/exec0/data"))
    again = cache.key("Training", arguments, scope("exec2", 0.1, "s3://bucket/p/exec0/data"))
    assert cache.differences(first, again) == ["CheckpointConfig.S3Uri"]


def _with_upstream_outputs(value, uri: str):
    """`value` with every reference to another step's properties replaced by `uri`: the outputs
    of an upstream step that was a cache hit, the same for two executions."""
    if isinstance(value, list):
        return [_with_upstream_outputs(v, uri) for v in value]
    if not isinstance(value, dict):
        return value
    if "Std:JsonGet" in value or str(value.get("Get", "")).startswith("Steps."):
        return uri
    return {k: _with_upstream_outputs(v, uri) for k, v in value.items()}


def test_two_executions_of_every_recipe_send_identical_cache_keys_and_checkpoint_configs(
        recipe_definitions):
    # Every job step, resolved as two executions with the same parameters send it: nothing
    # execution-scoped is left in what SageMaker compares, CheckpointConfig included, so the
    # second execution's steps can be cache hits on AWS.
    for (name, target), path in recipe_definitions.items():
        document = json.loads(path.read_text())
        parameters = {p["Name"]: p["DefaultValue"] for p in document["Parameters"]}
        steps = [s for s in document["Steps"] if s["Type"] in cache.KEY_ATTRIBUTES]
        keys, checkpoints = [], []
        for execution_id in ("exec1", "exec2"):
            execution = Scope(parameters=parameters, execution={
                "PipelineExecutionId": execution_id, "PipelineExecutionArn": f"arn:{execution_id}"})
            arguments = [_with_upstream_outputs(s["Arguments"], "s3://bucket/p/exec0/out")
                         for s in steps]
            keys.append([cache.key(s["Type"], a, execution) for s, a in zip(steps, arguments,
                                                                           strict=True)])
            checkpoints.append([k["CheckpointConfig"] for k in keys[-1] if "CheckpointConfig" in k])
        assert keys[0] == keys[1], (name, target)
        assert checkpoints[0] and checkpoints[0] == checkpoints[1]


def entry(execution_id, ended, status="Succeeded", learning_rate=0.1):
    return cache.Entry(execution_id, ended, status, {"HyperParameters": {"lr": learning_rate}},
                       {"ModelArtifacts": {"S3ModelArtifacts": f"s3://b/{execution_id}/m.tar.gz"}},
                       60.0)


def test_a_lookup_hits_the_latest_good_run_or_says_why_it_missed(tmp_path):
    store = cache.StepCache(tmp_path, "pipeline")
    key = {"HyperParameters": {"lr": 0.1}}
    now, day = 1_000_000_000.0, 86400
    exists = lambda properties: None
    month = timedelta(days=30)

    assert store.lookup("SFT", key, month, exists, now).reason == "no earlier run"
    store.record("SFT", entry("old", now - 40 * day))
    assert store.lookup("SFT", key, month, exists, now).reason.startswith(
        "expired: execution old ran on")
    assert store.lookup("SFT", key, None, exists, now).hit.execution_id == "old"  # never expires
    store.record("SFT", entry("failed", now - day, status="Failed"))
    store.record("SFT", entry("other", now - 2 * day, learning_rate=0.2))
    assert store.lookup("SFT", {"HyperParameters": {"lr": 0.3}}, month, exists, now).reason == (
        "arguments changed: HyperParameters.lr (since execution failed)")
    assert store.lookup("SFT", key, month, exists, now).reason == (
        "expired: execution old ran on 2001-07-31 01:46 UTC, longer ago than ExpireAfter")
    store.record("SFT", entry("good", now - 3 * day))
    hit = store.lookup("SFT", key, month, exists, now).hit
    assert hit.execution_id == "good" and hit.properties["ModelArtifacts"]["S3ModelArtifacts"] == \
        "s3://b/good/m.tar.gz"
    gone = store.lookup("SFT", key, month, lambda p: cache.output_uris(p)[0], now)
    assert gone.hit is None and gone.reason == (
        "outputs of execution good are gone (s3://b/good/m.tar.gz)")

    only_failed = cache.StepCache(tmp_path, "another")
    only_failed.record("SFT", entry("bad", now - day, status="Failed"))
    assert only_failed.lookup("SFT", key, month, exists, now).reason == (
        "earlier run failed (execution bad)")


# -- end to end: three runs of a recipe -------------------------------------------------------

pipeline = "llm-cache-test"
RECORDS = [{"prompt": f"What is {a} + {b}?", "completion": f"{a} + {b} = {a + b}."}
           for a in range(6) for b in range(6)]


@pytest.fixture(scope="module")
def env(local_home):
    return clean_env(local_home)


def write_sums(folder):
    path = folder / "sums.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return path


@pytest.fixture(scope="module")
def quick_recipe(tmp_path_factory):
    return write_quick_recipe(tmp_path_factory.mktemp("recipe"), "cache-test")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_sums(tmp_path_factory.mktemp("data"))


def run(env, recipe, data, *extra):
    # A fixed image tag: the default is a digest of the stage code, which would (rightly) miss
    # the cache if the code changed between two runs of this module.
    result = cli(env, "run", "--recipe", str(recipe), "--image-tag", "cache-test",
                 "-p", "BaseModel=builtin:tiny", "-p", f"InputData={data}",
                 "-p", "ModelPackageGroup=cache-test", "-p", "LearningRate=0.005", *extra)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def execution(home, stdout):
    execution_id = stdout.split("\nExecution ", 1)[1].split(":", 1)[0]
    path = home / "executions" / pipeline / execution_id / "execution.json"
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def runs(env, quick_recipe, data, local_home):
    """A first run; the same run again; the same with another learning rate (SFT only)."""
    outputs = [run(env, quick_recipe, data),
               run(env, quick_recipe, data),
               run(env, quick_recipe, data, "-p", "LearningRate=0.001")]
    return [(execution(local_home, r.stdout), r.stdout) for r in outputs]


def package_of(sagemaker, arn):
    return sagemaker.describe_model_package(ModelPackageName=arn)


@pytest.mark.e2e
def test_a_first_run_misses_the_cache_because_nothing_ran_before(runs):
    first, stdout = runs[0]
    assert {n: first["steps"][n]["cache"] for n in ("DataPrep", "SFT", "Evaluate")} == {
        "DataPrep": "miss: no earlier run", "SFT": "miss: no earlier run",
        "Evaluate": "miss: no earlier run"}
    assert "DataPrep | cache miss: no earlier run" in stdout


@pytest.mark.e2e
def test_an_unchanged_second_run_reuses_every_step_and_takes_seconds(runs, clients):
    (first, _), (second, stdout) = runs[:2]
    for name in ("DataPrep", "SFT", "Evaluate"):
        step = second["steps"][name]
        assert step["cache"] == f"hit (execution {first['execution_id']})"
        assert step["properties"] == first["steps"][name]["properties"]  # the earlier outputs
    assert f"cache hit: reusing the outputs of execution {first['execution_id']}" in stdout
    assert second["ended"] - second["started"] < 10
    # RegisterModel is never cached, yet the same model is not registered twice
    sagemaker, _ = clients
    assert second["steps"]["Register"]["outcome"] == first["steps"]["Register"]["outcome"]
    assert "not registering it again" in stdout
    packages = sagemaker.list_model_packages(ModelPackageGroupName="cache-test")
    assert len(packages["ModelPackageSummaryList"]) == 2  # the first run's and the third's


@pytest.mark.e2e
def test_a_new_learning_rate_reruns_sft_and_its_dependants_only(runs):
    (first, _), _, (third, _) = runs
    assert third["steps"]["DataPrep"]["cache"] == f"hit (execution {first['execution_id']})"
    assert third["steps"]["SFT"]["cache"] == (
        f"miss: arguments changed: HyperParameters.learning_rate "
        f"(since execution {first['execution_id']})")
    assert third["steps"]["Evaluate"]["cache"].startswith(
        "miss: arguments changed: ProcessingInputs[model].S3Input.S3Uri")
    # SFT trained on the first run's data, and a new model was registered
    data_uri = first["steps"]["DataPrep"]["properties"]["ProcessingOutputConfig"]["Outputs"][0]
    channels = third["steps"]["SFT"]["properties"]["InputDataConfig"]
    assert channels[0]["DataSource"]["S3DataSource"]["S3Uri"].startswith(
        data_uri["S3Output"]["S3Uri"])
    assert third["steps"]["Register"]["outcome"] != first["steps"]["Register"]["outcome"]


@pytest.mark.e2e
def test_the_ledger_is_printed_recorded_and_the_package_carries_what_the_model_cost(runs, clients):
    sagemaker, _ = clients
    (first, stdout), (second, _), (third, _) = runs
    ledger = first["cost"]
    assert "Estimated cost (on-demand us-east-1 prices of" in stdout
    assert ledger["total_usd"] > 0
    assert ledger["training_tokens"] > 0 and "per million training tokens" in stdout
    # The printed ledger is the one SageMaker's answers give (the jobs' descriptions, whole
    # billable seconds): it agrees with the engine's record to within that rounding.
    printed = float(next(line for line in stdout.splitlines()
                         if line.strip().startswith("total ")).split()[-1])
    assert printed == pytest.approx(ledger["total_usd"], abs=0.001)
    # Nothing cached ran again, so nothing of it is billed; only the registry comparison, which is
    # never cached, ran (seconds on a processing instance).
    billed = {s["step"] for s in second["cost"]["steps"] if s["usd"] > 0}
    assert billed == {"CompareWithApproved"}

    def metadata(record):
        arn = record["steps"]["Register"]["outcome"]
        return float(package_of(sagemaker, arn)["CustomerMetadataProperties"]["estimated_cost_usd"])

    assert metadata(first) == pytest.approx(ledger["total_usd"], abs=2e-4)
    # the third model's data came from the first run: its cost counts, once
    data_prep = next(s["usd"] for s in ledger["steps"] if s["step"] == "DataPrep")
    assert metadata(third) == pytest.approx(third["cost"]["total_usd"] + data_prep, abs=2e-4)

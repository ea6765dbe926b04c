"""Selective re-runs: continue a failed execution, re-run from a step, locally and on SageMaker."""

import json

import boto3
import pytest
import yaml
from botocore.stub import Stubber

from pipelines import UserError, pipeline
from pipelines import cli as cli_module
from pipelines.local import server
from pipelines.local.engine import Selection, load_execution, run_execution
from tests.pipelines.conftest import clean_env, cli, write_quick_recipe
from tests.pipelines.test_cache import write_sums

PIPELINE = "llm-rerun-test"
DOWNSTREAM_OF_SFT = ["SFT", "Evaluate", "CompareWithApproved", "EvaluationGate", "Register",
                     "EvaluationGateFailed"]


@pytest.fixture(scope="module")
def env(local_home):
    return clean_env(local_home)


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    """The quick sft recipe, whose LoRA targets are a parameter: naming the output head fails
    the SFT job (TRL trains no adapter there), a value no check before the run refuses."""
    path = write_quick_recipe(tmp_path_factory.mktemp("recipe"), "rerun-test")
    written = yaml.safe_load(path.read_text())
    written["parameters"]["LoraTargets"] = "all-linear"
    written["stages"]["sft"]["lora_target_modules"] = "$LoraTargets"
    path.write_text(yaml.safe_dump(written, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_sums(tmp_path_factory.mktemp("data"))


def run(env, recipe, data, *extra):
    return cli(env, "run", "--recipe", str(recipe), "-p", "BaseModel=builtin:tiny",
               "-p", f"InputData={data}", "-p", "ModelPackageGroup=rerun-test", *extra)


def execution_id(stdout):
    return stdout.split("\nExecution ", 1)[1].split(":", 1)[0]


def record_path(home, execution):
    return home / "executions" / PIPELINE / execution / "execution.json"


def record(home, execution):
    return json.loads(record_path(home, execution).read_text())


@pytest.fixture(scope="module")
def failed(env, recipe, data, local_home):
    """An execution whose SFT step fails (LoRA on the output head) after DataPrep succeeded."""
    result = run(env, recipe, data, "-p", "LoraRank=4", "-p", "LoraTargets=lm_head")
    assert result.returncode == 1 and "step SFT failed" in result.stderr, result.stderr[-2000:]
    return execution_id(result.stdout)


@pytest.fixture(scope="module")
def continued(env, recipe, data, local_home, failed):
    """The failed execution continued with the targets fixed; its record before and after."""
    before = record_path(local_home, failed).read_bytes()
    result = run(env, recipe, data, "-p", "LoraRank=4", "--reuse", failed)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert record_path(local_home, failed).read_bytes() == before
    return execution_id(result.stdout)


@pytest.mark.e2e
def test_a_failed_execution_continues_from_its_failed_step_on_the_same_data(
        local_home, failed, continued):
    source, rerun = record(local_home, failed), record(local_home, continued)
    assert rerun["status"] == "Succeeded" and rerun["source_execution"] == failed
    assert rerun["selected_steps"] == DOWNSTREAM_OF_SFT
    prep = rerun["steps"]["DataPrep"]
    assert prep["reused_from"] == failed and prep["billable_seconds"] == 0
    assert prep["properties"] == source["steps"]["DataPrep"]["properties"]
    # the file SFT trained on is the very file the failed execution's DataPrep wrote
    folder = local_home / "executions" / PIPELINE
    staged = folder / continued / "SFT/opt_ml/input/data/train/train.jsonl"
    written = folder / failed / "DataPrep/opt_ml/processing/output/train.jsonl"
    assert staged.read_bytes() == written.read_bytes()
    channel = rerun["steps"]["SFT"]["properties"]["InputDataConfig"][0]
    data_uri = source["steps"]["DataPrep"]["properties"]["ProcessingOutputConfig"]["Outputs"][0]
    assert channel["DataSource"]["S3DataSource"]["S3Uri"] == \
        data_uri["S3Output"]["S3Uri"] + "/train.jsonl"
    assert next(s for s in rerun["cost"]["steps"] if s["step"] == "DataPrep")["note"] == \
        f"reused: ran in execution {failed}"


@pytest.mark.e2e
def test_a_rerun_from_a_step_runs_it_fresh_on_the_earlier_model(env, recipe, data, local_home,
                                                                 continued):
    before = record_path(local_home, continued).read_bytes()
    result = run(env, recipe, data, "-p", "LoraRank=4", "--from-step", "Evaluate",
                 "--reuse", continued)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert record_path(local_home, continued).read_bytes() == before
    source, rerun = record(local_home, continued), record(local_home, execution_id(result.stdout))

    assert [rerun["steps"][s]["reused_from"] for s in ("DataPrep", "SFT")] == [continued] * 2
    evaluate = rerun["steps"]["Evaluate"]
    assert evaluate["cache"] == "miss: selected for re-run"  # a cache hit was there to take
    assert evaluate["reused_from"] == "" and evaluate["billable_seconds"] > 0
    model_input = evaluate["properties"]["ProcessingInputs"][0]["S3Input"]["S3Uri"]
    assert model_input == source["steps"]["SFT"]["properties"]["ModelArtifacts"]["S3ModelArtifacts"]
    output = evaluate["properties"]["ProcessingOutputConfig"]["Outputs"][0]["S3Output"]["S3Uri"]
    assert f"/{rerun['execution_id']}/Evaluate/" in output
    # same model, same data: the registry already holds it
    assert rerun["steps"]["Register"]["outcome"] == source["steps"]["Register"]["outcome"]


@pytest.mark.e2e
def test_a_step_cannot_rerun_on_outputs_its_source_never_made(local_home, failed, tmp_path):
    source = load_execution(local_home / "executions", PIPELINE, failed)
    definition = json.loads((local_home / "executions" / PIPELINE / failed / "definition.json")
                            .read_text())
    with pytest.raises(UserError, match=f"step Evaluate needs the outputs of SFT, which did not "
                                        f"succeed in execution {failed}; re-run from SFT instead"):
        run_execution(definition, {}, tmp_path, "us-east-1", "123456789012", PIPELINE,
                      selection=Selection(source, ["Evaluate"]))
    with pytest.raises(UserError, match="no execution nope of pipeline llm-rerun-test"):
        load_execution(local_home / "executions", PIPELINE, "nope")


def test_from_step_without_an_execution_to_reuse_is_a_usage_error(tmp_path):
    result = cli(clean_env(tmp_path), "run", "--from-step", "SFT")
    assert result.returncode == 2 and "--from-step needs --reuse EXECUTION" in result.stderr


# -- on SageMaker: StartPipelineExecution with SelectiveExecutionConfig -------------------------

@pytest.fixture
def in_process_local_aws(local_home, clients, monkeypatch):
    """This process's boto3 pointed at the module's server; returns the start requests sent."""
    monkeypatch.setenv("LLM_PIPELINE_HOME", str(local_home))
    url = server.running_url()
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", *server.ENDPOINT_VARIABLES):
        monkeypatch.delenv(name, raising=False)
    for name, value in server.local_environment(url).items():
        monkeypatch.setenv(name, value)
    session = boto3.session.Session()
    monkeypatch.setattr(boto3, "DEFAULT_SESSION", session)
    sent = []
    session.events.register("provide-client-params.sagemaker.StartPipelineExecution",
                            lambda params, **_: sent.append(dict(params)))
    return sent


@pytest.mark.e2e
def test_start_from_a_step_sends_sagemakers_selective_execution_config(
        in_process_local_aws, clients, local_home, recipe, failed):
    sagemaker, _ = clients  # the pipeline exists: `run` upserted it
    status = cli_module.main(["start", "--recipe", str(recipe), "--from-step", "SFT",
                              "--reuse", failed])
    assert status == 0
    config = {
        "SourcePipelineExecutionArn":
            f"arn:aws:sagemaker:us-east-1:123456789012:pipeline/{PIPELINE}/execution/{failed}",
        "SelectedSteps": [{"StepName": step} for step in DOWNSTREAM_OF_SFT]}
    assert in_process_local_aws[-1]["SelectiveExecutionConfig"] == config
    latest = sagemaker.list_pipeline_executions(PipelineName=PIPELINE)[
        "PipelineExecutionSummaries"][0]["PipelineExecutionArn"]
    assert sagemaker.describe_pipeline_execution(PipelineExecutionArn=latest)[
        "SelectiveExecutionConfig"] == config
    sagemaker.stop_pipeline_execution(PipelineExecutionArn=latest)  # what it runs is not the point


@pytest.mark.e2e
def test_continuing_a_sagemaker_execution_selects_the_steps_that_did_not_succeed(local_home, failed):
    document = json.loads((local_home / "executions" / PIPELINE / failed / "definition.json")
                          .read_text())
    arn = f"arn:aws:sagemaker:eu-west-1:111122223333:pipeline/{PIPELINE}/execution/x1"
    sagemaker = boto3.client("sagemaker", region_name="eu-west-1", aws_access_key_id="x",
                             aws_secret_access_key="x")
    with Stubber(sagemaker) as stub:
        stub.add_response("describe_pipeline_execution", {"PipelineExecutionStatus": "Failed"},
                          {"PipelineExecutionArn": arn})
        stub.add_response("list_pipeline_execution_steps", {"PipelineExecutionSteps": [
            {"StepName": "SFT", "StepStatus": "Failed"},
            {"StepName": "DataPrep", "StepStatus": "Succeeded"}]}, {"PipelineExecutionArn": arn})
        config = pipeline.selective_execution_config(sagemaker, document, arn, from_step=None)
    assert config == {"SourcePipelineExecutionArn": arn,
                      "SelectedSteps": [{"StepName": step} for step in DOWNSTREAM_OF_SFT]}


@pytest.mark.e2e
def test_a_succeeded_execution_has_nothing_to_continue(env, recipe, data, continued):
    result = run(env, recipe, data, "--reuse", continued)
    assert result.returncode == 2
    assert f"execution/{continued} is Succeeded, there is nothing to continue; pass --from-step " \
        "STEP" in result.stderr

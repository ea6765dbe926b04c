"""Engine pieces without running jobs: ordering, parameters, validation, the image table."""

import json
import time

import pytest

from containers import images
from pipelines import UserError
from pipelines.graph import flatten as _flatten
from pipelines.graph import resolve_parameters, topological_order
from pipelines.local import processes, server
from pipelines.local.engine import validate_request
from tests.pipelines.conftest import child_never_reaped

DEFINITION = {"Parameters": [
    {"Name": "Epochs", "Type": "Integer", "DefaultValue": 1},
    {"Name": "LearningRate", "Type": "Float", "DefaultValue": 0.1},
    {"Name": "Model", "Type": "String", "DefaultValue": "builtin:tiny"},
    {"Name": "Flag", "Type": "Boolean", "DefaultValue": False},
]}


def test_parameters_take_defaults_and_typed_overrides():
    values = resolve_parameters(DEFINITION, {"Epochs": "3", "LearningRate": "1e-4", "Flag": "true"})
    assert values == {"Epochs": 3, "LearningRate": 1e-4, "Model": "builtin:tiny", "Flag": True}


@pytest.mark.parametrize("override, message", [
    ({"Epochs": "two"}, "Epochs='two' is not a valid Integer"),
    ({"Nope": "1"}, "unknown pipeline parameter(s) Nope"),
    ({"Flag": "yes"}, "Flag='yes' is not a valid Boolean"),
])
def test_bad_parameter_overrides_are_one_line_errors(override, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        resolve_parameters(DEFINITION, override)


def step(name, depends=(), **arguments):
    return {"Name": name, "Type": "Processing", "Arguments": arguments, "DependsOn": list(depends)}


def test_order_follows_depends_on_and_data_references_and_condition_branches():
    steps = [
        step("C", X={"Get": "Steps.B.Prop"}),
        step("B", depends=["A"]),
        step("A"),
        {"Name": "Gate", "Type": "Condition", "Arguments": {
            "Conditions": [], "IfSteps": [step("Yes")], "ElseSteps": [step("No")]}},
    ]
    flat = _flatten(steps)
    order = topological_order(flat)
    assert order.index("A") < order.index("B") < order.index("C")
    assert order.index("Gate") < order.index("Yes") and order.index("Gate") < order.index("No")
    assert flat["Yes"].gate == ("Gate", True) and flat["No"].gate == ("Gate", False)


def test_cycles_and_unknown_dependencies_are_reported():
    with pytest.raises(UserError, match="cycle"):
        topological_order(_flatten([step("A", depends=["B"]), step("B", depends=["A"])]))
    with pytest.raises(UserError, match="unknown step"):
        topological_order(_flatten([step("A", depends=["Ghost"])]))


def test_requests_are_validated_against_the_sagemaker_api_model():
    request = {"ProcessingJobName": "job", "RoleArn": "arn:aws:iam::123456789012:role/r",
               "AppSpecification": {"ImageUri": "img"},
               "ProcessingResources": {"ClusterConfig": {
                   "InstanceCount": "one", "InstanceType": "ml.m5.xlarge", "VolumeSizeInGB": 30}}}
    with pytest.raises(UserError, match="InstanceCount"):
        validate_request("Processing", request, "DataPrep")
    request["ProcessingResources"]["ClusterConfig"]["InstanceCount"] = 1
    validate_request("Processing", request, "DataPrep")


def test_image_table_maps_images_to_stage_entry_points():
    uri = images.image_uri("llm-lifecycle-processing", "123456789012", "us-east-1", "abc")
    assert images.repository_of(uri) == "llm-lifecycle-processing"
    assert images.entry_module(uri, ["python", "-m", "steps.evaluate"]) == "steps.evaluate"
    training = images.image_uri("llm-lifecycle-training", "123456789012", "us-east-1", "abc")
    assert images.entry_module(training, ["python", "-m", "steps.sft"]) == "steps.sft"
    with pytest.raises(ValueError, match="holds several stages; the step must name one"):
        images.entry_module(training, None)
    with pytest.raises(ValueError, match="does not contain stage"):
        images.entry_module(uri, ["python", "-m", "steps.sft"])
    with pytest.raises(ValueError, match="not one of the project's images"):
        images.entry_module("public.ecr.aws/other:1", None)


def test_every_stage_module_in_the_image_table_exists():
    import importlib.util

    for modules in images.IMAGES.values():
        for module in modules:
            assert importlib.util.find_spec(module) is not None, module


def test_server_stop_returns_once_the_server_has_ended_even_if_no_one_reaps_it(tmp_path,
                                                                               monkeypatch):
    """Where the first process of a container reaps no orphans, an ended server stays a zombie,
    which still answers signal 0: `server stop` must not wait out its whole timeout for it."""
    monkeypatch.setenv("LLM_PIPELINE_HOME", str(tmp_path))
    with child_never_reaped("sleep", "60") as pid:
        (tmp_path / "server.json").write_text(json.dumps({"pid": pid}))
        started = time.monotonic()
        assert server.stop() is True
        assert time.monotonic() - started < 5
        assert processes.stat(pid).state == "Z"
        assert not (tmp_path / "server.json").exists()

"""The definition language as the local engine evaluates it."""

import pytest

from pipelines.graph import references
from pipelines.local.expressions import (
    ExpressionError,
    Scope,
    evaluate_condition,
    parse_path,
    resolve,
)


def scope(**properties):
    files = {("Evaluate", "Evaluation"): {"metrics": {"rouge_l": {"value": 0.42}}, "items": [1, 2]}}
    return Scope(
        parameters={"Epochs": 2, "EvalThreshold": 0.5, "BaseModel": "builtin:tiny"},
        execution={"PipelineExecutionId": "abc123", "PipelineName": "llm-sft"},
        step_properties=properties,
        read_property_file=lambda step, name: files[(step, name)],
    )


def test_property_paths_parse_dots_quoted_keys_and_indexes():
    assert parse_path("ProcessingOutputConfig.Outputs['data'].S3Output.S3Uri") == [
        "ProcessingOutputConfig", "Outputs", "data", "S3Output", "S3Uri"]
    assert parse_path("FinalMetricDataList[0].Value") == ["FinalMetricDataList", 0, "Value"]
    with pytest.raises(ExpressionError):
        parse_path("Outputs[data")


def test_get_reads_parameters_execution_variables_and_step_properties_by_name():
    properties = {"DataPrep": {"ProcessingOutputConfig": {"Outputs": [
        {"OutputName": "other", "S3Output": {"S3Uri": "s3://b/other"}},
        {"OutputName": "data", "S3Output": {"S3Uri": "s3://b/data"}}]}}}
    s = scope(**properties)
    assert resolve({"Get": "Parameters.Epochs"}, s) == 2
    assert resolve({"Get": "Execution.PipelineExecutionId"}, s) == "abc123"
    uri = {"Get": "Steps.DataPrep.ProcessingOutputConfig.Outputs['data'].S3Output.S3Uri"}
    assert resolve(uri, s) == "s3://b/data"


def test_join_stringifies_nested_expressions():
    value = {"Std:Join": {"On": "/", "Values": ["s3:/", "bucket", {"Get": "Execution.PipelineName"},
                                                 {"Get": "Parameters.Epochs"}]}}
    assert resolve(value, scope()) == "s3://bucket/llm-sft/2"


def test_json_get_reads_property_files():
    value = {"Std:JsonGet": {"PropertyFile": {"Get": "Steps.Evaluate.PropertyFiles.Evaluation"},
                             "Path": "metrics.rouge_l.value"}}
    assert resolve(value, scope()) == 0.42
    value["Std:JsonGet"]["Path"] = "items[1]"
    assert resolve(value, scope()) == 2


def test_resolve_walks_whole_argument_trees_and_leaves_literals_alone():
    arguments = {"A": [{"Get": "Parameters.BaseModel"}, "x", 3], "B": {"C": {"Get": "Parameters.Epochs"}}}
    assert resolve(arguments, scope()) == {"A": ["builtin:tiny", "x", 3], "B": {"C": 2}}


@pytest.mark.parametrize("ref", ["Parameters.Nope", "Execution.Nope", "Steps.Missing.X", "Other.X"])
def test_unknown_references_are_errors(ref):
    with pytest.raises(ExpressionError):
        resolve({"Get": ref}, scope())


def gte(left, right):
    return {"Type": "GreaterThanOrEqualTo", "LeftValue": left, "RightValue": right}


def test_conditions_compare_json_values_with_parameters():
    metric = {"Std:JsonGet": {"PropertyFile": {"Get": "Steps.Evaluate.PropertyFiles.Evaluation"},
                              "Path": "metrics.rouge_l.value"}}
    assert evaluate_condition(gte(metric, 0.42), scope())
    assert not evaluate_condition(gte(metric, {"Get": "Parameters.EvalThreshold"}), scope())
    assert evaluate_condition({"Type": "Not", "Condition": gte(metric, 0.5)}, scope())
    assert evaluate_condition({"Type": "Or", "Conditions": [gte(metric, 1), gte(metric, 0)]}, scope())
    assert evaluate_condition({"Type": "In", "QueryValue": {"Get": "Parameters.Epochs"},
                               "Values": [1, 2]}, scope())
    assert evaluate_condition({"Type": "Equals", "LeftValue": "2", "RightValue": 2.0}, scope())
    assert not evaluate_condition({"Type": "LessThan", "LeftValue": 3, "RightValue": 2}, scope())


def test_comparing_incomparable_values_is_an_error():
    with pytest.raises(ExpressionError):
        evaluate_condition(gte("abc", 1), scope())


def test_references_finds_step_dependencies_in_nested_arguments():
    arguments = {"X": [{"Std:Join": {"On": "", "Values": [{"Get": "Steps.A.Prop"}]}}],
                 "Y": {"Std:JsonGet": {"PropertyFile": {"Get": "Steps.B.PropertyFiles.F"}, "Path": "x"}},
                 "Z": {"Get": "Parameters.P"}}
    assert references(arguments) == {"A", "B"}

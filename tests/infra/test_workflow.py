""".github/workflows/pipeline.yml: a valid workflow whose commands the project's parsers accept."""

import json
import re
import shlex
from importlib.resources import files
from pathlib import Path

import jsonschema
import pytest
import yaml

from containers import build
from pipelines import cli

WORKFLOW = Path(__file__).resolve().parents[2] / ".github" / "workflows" / "pipeline.yml"
# Where a shell command ends.
_END = {"|", "||", "&&", ";", ">", ">>", "<", ")", "&"}


@pytest.fixture(scope="module")
def workflow() -> dict:
    return yaml.safe_load(WORKFLOW.read_text())


def scripts(job: dict) -> list[str]:
    # Backslash-newline continues a shell line.
    return [step["run"].replace("\\\n", " ") for step in job["steps"] if "run" in step]


def invocations(script: str, program: str) -> list[list[str]]:
    """The argument lists `program` is called with, shell variables replaced by a value."""
    found = []
    for line in script.splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        words = list(lexer)
        for i, word in enumerate(words):
            called = word.endswith(f"/{program}") or word == program or (
                program == "pipelines.cli" and word == "pipelines.cli" and words[i - 1] == "-m")
            if called:
                args = []
                for arg in words[i + 1:]:
                    if arg in _END:
                        break
                    args.append(re.sub(r"\$\{?\w+\}?", "value", arg))
                found.append(args)
    return found


def as_written(workflow: dict) -> dict:
    """The workflow with its `on` key back (YAML 1.1 reads the bare word `on` as true)."""
    return {("on" if key is True else key): value for key, value in workflow.items()}


def github_schema() -> dict:
    # check-jsonschema vendors the schema SchemaStore publishes for workflow files.
    return json.loads((files("check_jsonschema") / "builtin_schemas" / "vendor" /
                       "github-workflows.json").read_text())


def test_workflow_matches_githubs_schema(workflow):
    jsonschema.validate(as_written(workflow), github_schema())


def test_schema_check_catches_a_misspelled_key(workflow):
    broken = as_written(workflow)
    broken["jobs"]["test"]["runs_on"] = broken["jobs"]["test"].pop("runs-on")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, github_schema())


def test_triggers_are_pull_requests_and_pushes_to_main(workflow):
    triggers = as_written(workflow)["on"]
    assert set(triggers) == {"pull_request", "push"}
    assert triggers["push"]["branches"] == ["main"]
    assert workflow["permissions"] == {"contents": "read"}  # nothing more unless a job says so


def test_pull_requests_install_test_and_print_the_definition_diff(workflow):
    jobs = workflow["jobs"]
    assert scripts(jobs["test"]) == ["make install", "make test"]
    diff_job = jobs["definition-diff"]
    assert diff_job["if"] == "github.event_name == 'pull_request'"
    script = "\n".join(scripts(diff_job))
    assert [args[0] for args in invocations(script, "llm-pipeline")] == ["recipes", "definition"]
    assert [args[0] for args in invocations(script, "pipelines.cli")] == ["definition"]
    diff = re.search(r"^\s*diff -u .*\|\| true$", script, re.MULTILINE)
    assert diff, "a changed definition must not fail the job"


def test_pushes_to_main_deploy_through_oidc_and_wait_for_the_execution(workflow):
    deploy = workflow["jobs"]["deploy"]
    assert deploy["if"] == "github.event_name == 'push' && github.ref == 'refs/heads/main'"
    assert deploy["needs"] == "test"
    assert deploy["permissions"]["id-token"] == "write"
    credentials = next(s for s in deploy["steps"]
                       if s.get("uses", "").startswith("aws-actions/configure-aws-credentials@"))
    assert credentials["with"]["role-to-assume"].startswith("${{ vars.")
    script = "\n".join(scripts(deploy))
    commands = {args[0]: cli.build_parser().parse_args(args)
                for args in invocations(script, "llm-pipeline") if args[0] != "recipes"}
    assert set(commands) == {"upsert", "start"}
    for command in commands.values():
        assert command.target == "aws" and command.role_arn and command.bucket and command.region
    assert commands["start"].wait, "without --wait the job cannot fail with the execution"
    [images_args] = invocations(script, "python")
    assert images_args[:2] == ["-m", "containers.build"]
    assert build.build_parser().parse_args(images_args[2:]).push


def test_every_command_the_workflow_runs_is_accepted_by_the_projects_parsers(workflow):
    calls = [args for job in workflow["jobs"].values() for script in scripts(job)
             for program in ("llm-pipeline", "pipelines.cli")
             for args in invocations(script, program)]
    assert len(calls) >= 5
    parser = cli.build_parser()
    for args in calls:
        try:
            parser.parse_args(args)
        except SystemExit:
            pytest.fail(f"llm-pipeline rejects the workflow's `llm-pipeline {shlex.join(args)}`")


def test_a_misspelled_flag_would_be_caught():
    [args] = invocations('.venv/bin/llm-pipeline start --target aws --wiat > log', "llm-pipeline")
    assert args == ["start", "--target", "aws", "--wiat"]
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(args)

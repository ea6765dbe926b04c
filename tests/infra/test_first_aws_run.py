"""README's "Before your first AWS run": the quotas the defaults need, commands the project
accepts, and a cost table that is the arithmetic of prices.yaml and the recipes' jobs."""

import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from pipelines import cli, definition, recipe
from pipelines.cost import PRICES_FILE

README = Path(__file__).resolve().parents[2] / "README.md"
ASSUMED_MINUTES_PER_JOB = 5  # the figure the section states, and must state


@pytest.fixture(scope="module")
def section() -> str:
    text = README.read_text()
    start = text.find("## Before your first AWS run")
    assert start >= 0, "README.md has no 'Before your first AWS run' section"
    return text[start:text.index("\n## ", start + 1)]


def jobs(chosen: recipe.Recipe) -> tuple[int, int]:
    """(processing jobs, training jobs) of a run: a DataPrep per dataset parameter, the
    processing stages, Evaluate and CompareWithApproved; one job per training stage."""
    processing = (len(chosen.data_parameters) + 2
                  + sum(stage in recipe.PROCESSING_STAGES for stage in chosen.stages))
    return processing, len(chosen.training_stages)


def test_job_counting_matches_the_steps_of_a_built_definition(recipe_definitions):
    # full-lifecycle has every kind of step: three datasets, two processing stages, four trainings.
    chosen = recipe.load("full-lifecycle")
    document = json.loads(recipe_definitions["full-lifecycle", "local"].read_text())
    kinds = [step["Type"] for step in document["Steps"]]
    assert jobs(chosen) == (kinds.count("Processing"), kinds.count("Training"))


def test_cost_table_is_prices_yaml_times_each_recipes_jobs_at_the_stated_minutes(section):
    prices = yaml.safe_load(PRICES_FILE.read_text())["usd_per_hour"]
    processing_type = definition.COMMON_PARAMETER_DEFAULTS["ProcessingInstanceType"]
    training_type = definition.COMMON_PARAMETER_DEFAULTS["TrainingInstanceType"]
    assert f"**{ASSUMED_MINUTES_PER_JOB} minutes per job**" in section
    for instance in (processing_type, training_type):
        assert f"`{instance}` ${prices[instance]:g}/hour" in section, instance
    rows = {name: (int(p), int(t), usd) for name, p, t, usd in re.findall(
        r"^\| `([\w-]+)` \| (\d+) \| (\d+) \| \$(\d+\.\d\d) \|$", section, re.MULTILINE)}
    assert set(rows) == set(recipe.available()), "one row per recipe"
    hours = ASSUMED_MINUTES_PER_JOB / 60
    total = 0.0
    for name in recipe.available():
        processing, training = jobs(recipe.load(name))
        usd = hours * (processing * prices[processing_type] + training * prices[training_type])
        total += usd
        assert rows[name] == (processing, training, f"{usd:.2f}"), name
    assert f"all eight recipes once: ${total:.2f}" in " ".join(section.split())


def test_names_the_service_quotas_of_the_default_instance_types(section):
    flat = " ".join(section.split())
    training_type = definition.COMMON_PARAMETER_DEFAULTS["TrainingInstanceType"]
    processing_type = definition.COMMON_PARAMETER_DEFAULTS["ProcessingInstanceType"]
    for quota in (f"{training_type} for training job usage",
                  f"{training_type} for spot training job usage",
                  f"{processing_type} for processing job usage"):
        assert f"`{quota}`" in flat, quota
    assert "request-service-quota-increase" in flat and "ResourceLimitExceeded" in flat


def test_goes_from_zero_to_an_execution_with_commands_the_project_accepts(section):
    script = re.search(r"```bash\n(.*?)```", section, re.DOTALL).group(1).replace("\\\n", " ")
    order = ["make install", "service-quotas list-service-quotas", "cloudformation deploy",
             "make images ARGS='--push", "llm-pipeline upsert", "llm-pipeline start"]
    positions = [script.index(step) for step in order]
    assert positions == sorted(positions), "the commands are out of order"
    parser = cli.build_parser()
    called = []
    for line in script.splitlines():
        words = shlex.split(line, comments=True)
        for i, word in enumerate(words):
            if word.endswith("llm-pipeline"):
                args = list(words[i + 1:])
                parser.parse_args(args)  # exits (fails the test) on a flag the CLI lacks
                called.append(args)
    upsert, start = (next(a for a in called if a[0] == c) for c in ("upsert", "start"))
    for args in (upsert, start):
        parsed = parser.parse_args(args)
        assert parsed.target == "aws" and parsed.role_arn and parsed.bucket and parsed.region
    assert parser.parse_args(start).wait

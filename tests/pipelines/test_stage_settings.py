"""The table recipe.load checks stage settings against is each stage's config, field for field."""

import dataclasses
import runpy
from unittest import mock

import pytest

from pipelines import stage_settings
from pipelines.definition import PROCESSING_STEPS, TRAINING_STEPS
from pipelines.recipe import ENDS, PROCESSING_STAGES, TRAINING_STAGES
from steps.common import contract

MODULES = {"data_prep": "steps.data_prep", "evaluate": "steps.evaluate",
           **{stage: module for stage, (_, module) in {**TRAINING_STEPS, **PROCESSING_STEPS}.items()}}


def config_class(module: str) -> type:
    """The dataclass `python -m <module>` parses its settings into: what it hands contract.run."""
    handed = []
    with mock.patch.object(contract, "run", lambda main, config, job: handed.append(config)):
        runpy.run_module(module, run_name="__main__")
    assert len(handed) == 1, f"{module} called contract.run {len(handed)} times"
    return handed[0]


def test_the_table_has_every_recipe_stage():
    assert set(stage_settings.CONFIG_FIELDS) == set(ENDS + TRAINING_STAGES + PROCESSING_STAGES)
    assert set(MODULES) == set(stage_settings.CONFIG_FIELDS)


# runpy warns that the module is already imported: it runs a second copy, only to see its call.
@pytest.mark.filterwarnings("ignore:.*found in sys.modules:RuntimeWarning")
@pytest.mark.parametrize("stage", sorted(MODULES))
def test_a_stages_settings_are_its_config_dataclass_fields(stage):
    fields = {field.name for field in dataclasses.fields(config_class(MODULES[stage]))}
    assert stage_settings.CONFIG_FIELDS[stage] == fields, (
        f"pipelines/stage_settings.py is out of date for {stage}: add "
        f"{sorted(fields - stage_settings.CONFIG_FIELDS[stage])}, remove "
        f"{sorted(stage_settings.CONFIG_FIELDS[stage] - fields)}")
    # `inputs` is the recipe's; a stage setting of that name could never be set.
    assert not stage_settings.RECIPE_KEYS & fields


def test_every_stage_takes_the_load_policy_opt_ins():
    assert stage_settings.LOAD_POLICY_FIELDS == {
        field.name for field in dataclasses.fields(contract.LoadPolicy)}

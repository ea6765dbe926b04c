"""The stage table (steps/stages.py): each stage's job parses its settings into the config the
table names, and the table and every config import without torch, so the command line checks a
recipe and its parameter values before anything runs, in a fraction of a second."""

import runpy
import subprocess
import sys
from unittest import mock

import pytest

from pipelines.recipe import RECIPE_KEYS
from steps.common import contract
from steps.stages import STAGES
from tests.pipelines.conftest import ROOT


def config_class(module: str) -> type:
    """The dataclass `python -m <module>` parses its settings into: what it hands contract.run."""
    handed = []
    with mock.patch.object(contract, "run", lambda main, config, job: handed.append(config)):
        runpy.run_module(module, run_name="__main__")
    assert len(handed) == 1, f"{module} called contract.run {len(handed)} times"
    return handed[0]


# runpy warns that the module is already imported: it runs a second copy, only to see its call.
@pytest.mark.filterwarnings("ignore:.*found in sys.modules:RuntimeWarning")
@pytest.mark.parametrize("stage", sorted(STAGES))
def test_a_stages_job_parses_its_settings_into_the_config_the_table_names(stage):
    assert config_class(STAGES[stage].module) is STAGES[stage].config
    # `inputs` is the recipe's; a stage setting of that name could never be set.
    assert not RECIPE_KEYS & STAGES[stage].settings()


def test_every_stage_takes_the_load_policy_opt_ins():
    for stage in STAGES.values():
        assert {"allow_unsafe_weights", "trust_remote_code"} <= stage.settings()


def test_the_table_and_every_stage_config_import_without_torch():
    script = ("import sys, steps.stages\n"
              "heavy = sorted({'torch', 'transformers', 'trl', 'peft'} & set(sys.modules))\n"
              "assert not heavy, heavy\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                            text=True, check=False, timeout=120)
    assert result.returncode == 0, result.stderr


def test_steps_holds_the_stages_their_configs_and_the_table_and_common_holds_the_rest():
    # A newcomer finds a stage at steps/<stage>.py and everything stages share in steps/common/.
    config_modules = {stage.config.__module__ for stage in STAGES.values()}
    stage_modules = {stage.module for stage in STAGES.values()}
    modules = {f"steps.{path.stem}" for path in (ROOT / "steps").glob("*.py")} - {"steps.__init__"}
    assert modules - stage_modules - config_modules == {"steps.stages"}

"""Fixtures of every test, and those more than one test folder uses: the model packages the
serving and deploy tests serve, each trained or quantized once per session on builtin:tiny
(seconds each)."""

import contextlib
import io
import os
from pathlib import Path

import pytest

# Before transformers is imported: nothing in the tests may reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TENANT_ANSWERS = {"tenantA": "aaaa", "tenantB": "zzzz"}


def pytest_collection_modifyitems(config, items):
    """Test files holding end-to-end runs first, then the others, each group by number of tests,
    most first; a file's tests stay together and in order.

    `make test` hands whole files to its workers in this order (pytest-xdist's loadfile, with
    --no-loadscope-reorder), and a worker takes another file as soon as fewer than three of its
    tests are left. An end-to-end file has few tests that take minutes each: ordered by number
    of tests alone (xdist's default), they came last, and a worker could be left with two or
    three of them to run while the other, out of files, waited. First, the seconds-long files
    fill in behind them."""
    counts: dict[Path, int] = {}
    end_to_end: set[Path] = set()
    for item in items:
        counts[item.path] = counts.get(item.path, 0) + 1
        if item.get_closest_marker("e2e"):
            end_to_end.add(item.path)
    items.sort(key=lambda item: (item.path not in end_to_end, -counts[item.path], str(item.path)))


@pytest.fixture(scope="session", autouse=True)
def sagemaker_output_dir(tmp_path_factory):
    """A stage a test runs (in-process or as a program) writes SageMaker's /opt/ml/output files,
    such as a failed job's reason, into a folder of the test session: never into the /opt/ml of
    the machine running the tests. The local engine points its jobs at their own folders; tests
    that look at these files point SM_OUTPUT_DIR at their own folder too."""
    folder = tmp_path_factory.mktemp("opt-ml-output")
    previous = os.environ.get("SM_OUTPUT_DIR")
    os.environ["SM_OUTPUT_DIR"] = str(folder)
    yield folder
    if previous is None:
        os.environ.pop("SM_OUTPUT_DIR", None)
    else:
        os.environ["SM_OUTPUT_DIR"] = previous


@pytest.fixture(scope="session")
def lora_adapter(tmp_path_factory) -> Path:
    """An SFT job's model folder: a LoRA adapter (with its base in base/) that answers every
    question 'ok ok ok'."""
    from tests.serving.endpoints import train_lora

    return train_lora(tmp_path_factory.mktemp("lora") / "opt-ml")


@pytest.fixture(scope="session")
def tenant_adapters(tmp_path_factory) -> dict[str, Path]:
    """A prompt-tuning adapter per tenant over the same builtin:tiny, each answering its own way."""
    from tests.serving.endpoints import train_prompt_tuning

    return {tenant: train_prompt_tuning(tmp_path_factory.mktemp(tenant) / "opt-ml", answer)
            for tenant, answer in TENANT_ANSWERS.items()}


@pytest.fixture(scope="session")
def quantized_models(tmp_path_factory) -> Path:
    """steps.quantize's output for builtin:tiny: int8/ and nf4/ model folders and their archives."""
    from steps import quantize

    output = tmp_path_factory.mktemp("quantized") / "output"
    with contextlib.redirect_stdout(io.StringIO()):
        quantize.main(quantize.QuantizeConfig(model_dir="builtin:tiny", output_dir=str(output),
                                              scheme="both", speed_runs=1, speed_tokens=4,
                                              archive=True))
    return output

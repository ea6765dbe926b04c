"""Fixtures of every test, and those more than one test folder uses: the model packages the
serving and deploy tests serve, each trained or quantized once per session on builtin:tiny
(seconds each), and every recipe's definition, built once per session."""

import contextlib
import fcntl
import gc
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

# Before transformers is imported: nothing in the tests may reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TENANT_ANSWERS = {"tenantA": "aaaa", "tenantB": "zzzz"}


# Where the seconds each test took last time are kept (pytest's cache, .pytest_cache/).
TEST_SECONDS = "llm-pipeline/test-seconds"


@pytest.hookimpl(trylast=True)  # after `-m` and `-k` have deselected: the tests that will run
def pytest_collection_modifyitems(config, items):
    """Test files holding end-to-end runs first, then the others; in each group the longest
    first, by the seconds their tests took in earlier runs (pytest's cache; a test not timed yet
    counts as the median timed one), else by number of tests, most first. A file's tests stay
    together and in order.

    `make test` hands whole files to its workers in this order (pytest-xdist's loadfile, with
    --no-loadscope-reorder), and a worker takes another file as soon as fewer than three of its
    tests are left. An end-to-end file has few tests that take minutes each: ordered by number
    of tests alone (xdist's default), they came last, and a worker could be left with two or
    three of them to run while the other, out of files, waited. First, the seconds-long files
    fill in behind them. The same holds among the others: a file of a few tests that each train
    or start servers (seconds each) came after files of a hundred millisecond tests, and could be
    the one a worker ran alone at the end."""
    seconds = _test_seconds(config)
    typical = statistics.median(seconds.values()) if seconds else 0.0
    counts: dict[Path, int] = {}
    weights: dict[Path, float] = {}
    end_to_end: set[Path] = set()
    for item in items:
        counts[item.path] = counts.get(item.path, 0) + 1
        weights[item.path] = weights.get(item.path, 0.0) + seconds.get(item.nodeid, typical)
        if item.get_closest_marker("e2e"):
            end_to_end.add(item.path)
    items.sort(key=lambda item: (item.path not in end_to_end, -weights[item.path],
                                 -counts[item.path], str(item.path)))


def _test_seconds(config) -> dict[str, float]:
    """Each test's seconds (setup, call and teardown) in the runs before this one. Under xdist
    the controller reads them once and hands them to every worker (pytest_configure_node): the
    workers must order the tests alike, even were the cache written while they collect."""
    workerinput = getattr(config, "workerinput", None)
    if workerinput is not None:
        return workerinput.get("test_seconds", {})
    cache = getattr(config, "cache", None)  # None with -p no:cacheprovider
    return cache.get(TEST_SECONDS, {}) if cache is not None else {}


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node):
    node.workerinput["test_seconds"] = _test_seconds(node.config)


_timed: dict[str, float] = {}  # this run's seconds of each test, where the reports reach


def pytest_runtest_logreport(report):
    _timed[report.nodeid] = _timed.get(report.nodeid, 0.0) + report.duration


def pytest_sessionfinish(session):
    """The tests timed in this run replace their earlier seconds; the others keep theirs."""
    cache = getattr(session.config, "cache", None)
    if _timed and cache is not None and not hasattr(session.config, "workerinput"):
        cache.set(TEST_SECONDS, {**cache.get(TEST_SECONDS, {}), **_timed})


def pytest_collection_finish(session):
    """Every test module is imported, and with them torch, transformers, TRL and PEFT: about half
    a million objects that live as long as the process. Frozen out of the garbage collector's
    sight, a full collection skips them: the Trainer runs one at the start of every training
    (accelerate's free_memory), which took about 1 s on them, longer than a tiny training."""
    gc.freeze()


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


@pytest.fixture(scope="session", autouse=True)
def shared_job_runner(tmp_path_factory):
    """The local servers a test starts (each on a home of its own) fork their jobs from one warm
    job runner, which imports the ML stack once (seconds of CPU each time), instead of one
    runner per server; each job is still a fresh process of its own home
    (tests/pipelines/test_job_runner.py, whose tests give their homes runners of their own).
    The session's pytest-xdist workers share it, in the folder their temporary folders are in;
    the last worker to end stops it (each holds a shared lock on a file there while it runs)."""
    from pipelines.local import runner

    shared = session_folder(tmp_path_factory)
    folder = shared / "job-runner"
    os.environ[runner.SHARED_VARIABLE] = str(folder)
    with open(shared / "job-runner-users.lock", "w") as users:
        fcntl.flock(users, fcntl.LOCK_SH)
        yield folder
        fcntl.flock(users, fcntl.LOCK_UN)
        try:
            fcntl.flock(users, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pass  # another worker is still running tests: it stops the runner when it ends
        else:
            runner.stop()
    del os.environ[runner.SHARED_VARIABLE]


@pytest.fixture(scope="session")
def lora_adapter(tmp_path_factory) -> Path:
    """An SFT job's model folder: a LoRA adapter (with its base in base/) that answers every
    question 'ok ok ok'."""
    from tests.serving.endpoints import train_lora

    return built_once(tmp_path_factory, "lora-adapter",
                      lambda folder: train_lora(folder / "opt-ml")) / "opt-ml" / "model"


@pytest.fixture(scope="session")
def tenant_adapters(tmp_path_factory) -> dict[str, Path]:
    """A prompt-tuning adapter per tenant over the same builtin:tiny, each answering its own way."""
    from tests.serving.endpoints import train_prompt_tuning

    def build(answer: str) -> Callable[[Path], object]:
        return lambda folder: train_prompt_tuning(folder / "opt-ml", answer)

    return {tenant: built_once(tmp_path_factory, f"tenant-{tenant}", build(answer))
            / "opt-ml" / "model" for tenant, answer in TENANT_ANSWERS.items()}


@pytest.fixture(scope="session")
def quantized_models(tmp_path_factory) -> Path:
    """steps.quantize's output for builtin:tiny: int8/ and nf4/ model folders and their archives."""
    from steps import quantize

    def build(folder: Path) -> None:
        with contextlib.redirect_stdout(io.StringIO()):
            quantize.main(quantize.QuantizeConfig(
                model_dir="builtin:tiny", output_dir=str(folder / "output"), scheme="both",
                speed_runs=1, speed_tokens=4, archive=True))

    return built_once(tmp_path_factory, "quantized", build) / "output"


# The targets every recipe's definition is built for: the local engine's defaults, and an AWS
# account's (any account, role and bucket: building makes no AWS call).
TARGETS = {
    "local": {},
    "aws": {"role_arn": "arn:aws:iam::111122223333:role/x", "bucket": "b", "region": "eu-west-1"},
}


@pytest.fixture(scope="session")
def recipe_definitions(tmp_path_factory) -> dict[tuple[str, str], Path]:
    """(recipe, target) -> the definition JSON file, for every shipped recipe and target, built
    once per test session in one offline process (a build imports the SageMaker SDK: seconds
    each) and shared by the session's pytest-xdist workers."""
    out = built_once(tmp_path_factory, "recipe-definitions", lambda folder:
                     build_recipe_definitions(folder, tmp_path_factory.mktemp("home")))
    return {tuple(path.name.removesuffix(".json").split(".")): path for path in out.glob("*.json")}


def session_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder all of the session's pytest-xdist workers' temporary folders are in (without
    xdist, the session's own): where the workers share what they build or run once."""
    shared = tmp_path_factory.getbasetemp()
    return shared.parent if os.environ.get("PYTEST_XDIST_WORKER") else shared


def built_once(tmp_path_factory: pytest.TempPathFactory, name: str,
               build: Callable[[Path], object]) -> Path:
    """The folder `name`, filled by `build(folder)` once per test session and shared by the
    session's pytest-xdist workers: the first worker to need it builds it, under a lock, in the
    folder all workers' temporary folders are in; the others wait and read it. What it holds is
    read-only to the tests: a test that changes it works on its own copy."""
    shared = session_folder(tmp_path_factory)
    out, done = shared / name, shared / f"{name}.built"
    with open(shared / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not done.is_file():
            shutil.rmtree(out, ignore_errors=True)  # a worker that failed half way
            out.mkdir()
            build(out)
            done.touch()
    return out


def build_recipe_definitions(out: Path, home: Path) -> None:
    script = ("import json, sys; from pathlib import Path; from pipelines import recipe, definition\n"
              "targets = json.loads(sys.argv[2])\n"
              "for name in recipe.available():\n"
              "    for target, settings in targets.items():\n"
              "        text = definition.definition_json(recipe.load(name), **settings)\n"
              "        Path(sys.argv[1], f'{name}.{target}.json').write_text(text)\n")
    from tests.pipelines.conftest import ROOT, clean_env

    env = clean_env(home, AWS_ENDPOINT_URL="http://127.0.0.1:9", AWS_DEFAULT_REGION="us-east-1")
    result = subprocess.run([sys.executable, "-c", script, str(out), json.dumps(TARGETS)],
                            env=env, cwd=ROOT, capture_output=True, text=True, check=False,
                            timeout=900)
    assert result.returncode == 0, result.stderr

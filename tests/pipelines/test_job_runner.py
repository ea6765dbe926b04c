"""The warm job runner: jobs forked from a process that has imported the ML stack, each still a
fresh process with its own environment, folder, output and exit status (pipelines/local/runner.py).

The jobs here run small stand-in stages (written into the job's folder, which `python -m` puts on
sys.path as it does for a stage) through the engine's own `jobs._run`, started as the local
server starts them (`runner.WarmStart` as the `JobControl.start`).
"""

import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from containers import images
from pipelines.local import jobs, processes, runner
from tests.pipelines.conftest import ROOT, clean_env, cli, write_quick_recipe

# Prints the state a job's process starts with as one `STATE {...}` line; with --dirty it then
# changes all of it, as a careless stage might, to show that the next job does not see it.
PRISTINE = f"""
import json, os, sys
state = {{"preloaded": "torch" in sys.modules,
         "project_modules": sorted(m for m in sys.modules if m.split(".")[0] in ("steps", "pipelines")),
         "threads_at_start": len(os.listdir("/proc/self/task"))}}
import importlib
for name in {runner.WARM_IMPORTS!r}:
    importlib.import_module(name)
import logging, random, signal, warnings
import numpy, torch, transformers
from steps.common import contract

def open_fds():
    found = []
    for name in os.listdir("/proc/self/fd"):
        try:
            os.fstat(int(name))
            found.append(int(name))
        except OSError:
            pass
    return sorted(found)

with open("/proc/self/status") as status:
    umask = next(line.split()[1] for line in status if line.startswith("Umask:"))
state.update(
    pid=os.getpid(), group=os.getpgid(0), session=os.getsid(0), cwd=os.getcwd(), argv=sys.argv,
    path0=sys.path[0], env=dict(os.environ), fds=open_fds(), umask=umask,
    handlers={{s.name: repr(signal.getsignal(s)) for s in (signal.SIGTERM, signal.SIGINT,
              signal.SIGCHLD, signal.SIGPIPE, signal.SIGUSR1, signal.SIGHUP)}},
    blocked=sorted(s.name for s in signal.pthread_sigmask(signal.SIG_BLOCK, [])),
    torch_threads=torch.get_num_threads(), torch_interop_threads=torch.get_num_interop_threads(),
    torch_seed=torch.initial_seed(), torch_draw=torch.rand(1).item(), python_draw=random.random(),
    numpy_draw=float(numpy.random.rand()), load_policy=vars(contract.load_policy()),
    root_logging=[logging.getLogger().level, len(logging.getLogger().handlers)],
    transformers_verbosity=transformers.logging.get_verbosity(),
    warning_filters=[repr(f) for f in warnings.filters], hash_seed=os.environ.get("PYTHONHASHSEED"))
print("STATE " + json.dumps(state), flush=True)
if "--dirty" in sys.argv:
    torch.manual_seed(1); random.seed(1); numpy.random.seed(1)
    torch.set_num_threads(1)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # once its pool exists, a process cannot resize it
        pass
    os.environ["LEFT_BY_THE_FIRST_JOB"] = "1"
    kept_open = open(__file__)
    contract.set_load_policy(contract.LoadPolicy(allow_unsafe_weights=True, trust_remote_code=True))
    logging.basicConfig(level=logging.DEBUG)
    transformers.logging.set_verbosity_debug()
    warnings.simplefilter("error")
    signal.signal(signal.SIGUSR1, lambda *_: None)
    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGHUP])
    os.umask(0o077)
"""

# Says whether it started in a process that had imported torch already: a forked one.
WHERE = """
import sys
import tempfile
print(f"preloaded: {'torch' in sys.modules}", flush=True)
"""

# Prints its pid and a child's (in its process group), then waits to be ended.
SLEEPER = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
print(f"pids {__import__('os').getpid()} {child.pid}", flush=True)
time.sleep(600)
"""

# The ways a stage ends badly: a status of its own, an uncaught exception, a StageError.
FAILING = """
import sys
import tempfile
from steps.common import contract

how = sys.argv.pop(1)
if how == "status":
    print("leaving with 3", flush=True)
    sys.exit(3)
if how == "exception":
    raise ValueError("the stage has a bug")

def main(config):
    raise contract.StageError("train.jsonl:4: 'completion' is missing; add it")

if __name__ == "__main__":
    import dataclasses
    contract.run(main, dataclasses.make_dataclass("Config", []), "processing")
"""


def write_stage(folder: Path, name: str, source: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.py").write_text(source)
    return folder


def job_environment(folder: Path, **env: str) -> dict[str, str]:
    return {**jobs.warm_environment(), "SM_OUTPUT_DIR": str(folder / "output"), **env}


def run_job(folder: Path, module: str, *arguments: str, warm: runner.WarmStart | None,
            **env: str) -> tuple[int, list[str]]:
    """Run `python -m module` in `folder` as the engine runs a job; its status and lines."""
    lines: list[str] = []
    control = jobs.JobControl(start=warm or jobs.start_process)
    code, _ = jobs._run([sys.executable, "-m", module, *arguments], job_environment(folder, **env),
                        folder, folder / "log.txt", lines.append, control)
    return code, lines


def state(lines: list[str]) -> dict:
    return json.loads(next(line for line in lines if line.startswith("STATE "))[len("STATE "):])


def alive(pid: int) -> bool:
    return processes.running(pid)


def wait_until(condition, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)  # a look at /proc
    return condition()


def started_runner(home: Path) -> runner.WarmStart:
    """The local server's way of starting jobs with a runner of `home` (LLM_PIPELINE_HOME must
    name it), once that runner takes jobs."""
    started = runner.WarmStart()
    ready, why = started._current()  # as the first job starts it
    assert ready is not None, why
    ready._connect().close()  # waits while it imports
    return started


@pytest.fixture(scope="module")
def runner_home(tmp_path_factory):
    """A home with a runner of its own (the test session's is shared by its servers' homes)."""
    home = tmp_path_factory.mktemp("home")
    previous = {name: os.environ.get(name)
                for name in ("LLM_PIPELINE_HOME", runner.SHARED_VARIABLE)}
    os.environ["LLM_PIPELINE_HOME"] = str(home)
    os.environ.pop(runner.SHARED_VARIABLE, None)
    yield home
    runner.stop()
    for name, value in previous.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(autouse=True)
def own_runner(monkeypatch):
    """Each test's homes have runners of their own, as a home has by default: the tests here
    kill, replace and stop runners."""
    monkeypatch.delenv(runner.SHARED_VARIABLE, raising=False)


@pytest.fixture
def light_runners(monkeypatch):
    """The runners this test starts preload torch alone, not all of WARM_IMPORTS: what it checks
    is how runners start, are found, fail and stop, which the preloaded modules do not change,
    and each full preload costs seconds of CPU (the module's `warm` runner preloads them all).
    Jobs still start in a process that has imported torch, as the tests' stages check."""
    monkeypatch.setattr(runner, "WARM_IMPORTS", ("torch",))


@pytest.fixture(scope="module")
def warm(runner_home, shared_job_runner):
    """The session's shared runner (tests/conftest.py), which the session's servers fork their
    jobs from, as a local server starts jobs with it: the tests that take this one neither kill
    nor stop it, and a runner of its own would import the whole of WARM_IMPORTS once more (about
    9 CPU s). Its environment is the servers' (one OpenMP thread, clean_env), or this module
    would replace their runner with one of its own."""
    saved = {name: os.environ.get(name) for name in (runner.SHARED_VARIABLE, "OMP_NUM_THREADS")}
    os.environ.update({runner.SHARED_VARIABLE: str(shared_job_runner),
                       "OMP_NUM_THREADS": clean_env(runner_home)["OMP_NUM_THREADS"]})
    yield started_runner(runner_home)
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def test_two_jobs_in_a_row_each_start_from_the_state_of_a_fresh_process(warm, tmp_path):
    folder = write_stage(tmp_path / "job", "pristine", PRISTINE)
    code, fresh = run_job(folder, "pristine", warm=None)
    assert code == 0, fresh
    code, first = run_job(folder, "pristine", "--dirty", warm=warm)
    assert code == 0, first
    code, second = run_job(folder, "pristine", warm=warm)
    assert code == 0, second
    fresh, first, second = state(fresh), state(first), state(second)

    assert not fresh["preloaded"] and first["preloaded"] and second["preloaded"]
    # Everything but the random draws and the process's own ids is what a fresh process has,
    # whatever the job before it did: environment, folder, argv, descriptors, signals, threads,
    # the project's module state (no steps.* module preloaded), logging, warnings, umask.
    different = {"preloaded", "pid", "group", "session", "torch_seed", "torch_draw",
                 "python_draw", "numpy_draw"}
    assert {k: v for k, v in second.items() if k not in different} == \
        {k: v for k, v in fresh.items() if k not in different}
    assert second["argv"] == [str(folder / "pristine.py")] and second["fds"] == [0, 1, 2]
    assert second["threads_at_start"] == 1 and second["project_modules"] == []
    assert second["load_policy"] == {"allow_unsafe_weights": False, "trust_remote_code": False}
    # Each job is its own process, in its own group, with its own random state.
    assert len({fresh["pid"], first["pid"], second["pid"], warm.runner.pid}) == 4
    assert second["group"] == second["session"] == second["pid"]
    for draw in ("torch_seed", "torch_draw", "python_draw", "numpy_draw"):
        assert len({fresh[draw], first[draw], second[draw]}) == 3, draw


# A tracked job: whether it found its tracking store already open and with no connection of the
# runner's (no descriptor beyond stdin, stdout, stderr), then one run logged to it.
TRACKED = """
import os
from mlflow import MlflowClient
from mlflow.tracking._tracking_service.registry import TrackingStoreRegistry

print("store open at start:", TrackingStoreRegistry._get_store_with_resolved_uri.cache_info().currsize > 0)
names = os.listdir("/proc/self/fd")  # with the descriptor listdir used, closed since
print("fds at start:", sorted(fd for fd in map(int, names) if fd > 2 and os.path.exists(f"/proc/self/fd/{fd}")))
client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
run = client.create_run("0")
client.log_metric(run.info.run_id, "loss", 1.5)
client.set_terminated(run.info.run_id)
"""


def test_tracked_jobs_find_their_sqlite_store_open_and_each_logs_through_its_own_connection(
        warm, tmp_path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    MlflowClient(uri).search_experiments()  # the local server creates the store before a step
    folder = write_stage(tmp_path / "job", "tracked", TRACKED)
    outputs = [run_job(folder, "tracked", warm=warm, MLFLOW_TRACKING_URI=uri) for _ in range(2)]

    assert [code for code, _ in outputs] == [0, 0], outputs
    assert [lines[:2] for _, lines in outputs] == [["store open at start: True",
                                                   "fds at start: []"]] * 2
    runs = MlflowClient(uri).search_runs(["0"])
    assert len(runs) == 2 and all(r.data.metrics["loss"] == 1.5 for r in runs)


@pytest.mark.parametrize("how, status, last_line", [
    ("status", 3, "leaving with 3"),
    ("exception", 1, "ValueError: the stage has a bug"),
    ("stage-error", 2, "ERROR: train.jsonl:4: 'completion' is missing; add it"),
])
def test_a_job_that_fails_reports_its_exit_status_and_output(warm, tmp_path, how, status,
                                                            last_line):
    folder = write_stage(tmp_path / "job", "failing", FAILING)
    code, lines = run_job(folder, "failing", how, warm=warm)
    assert (code, lines[-1]) == (status, last_line)
    assert (folder / "log.txt").read_text().splitlines()[-1] == last_line
    if how == "stage-error":  # where SageMaker reads a failed processing job's message
        assert (folder / "output" / "message").read_text() == last_line


def test_a_job_stopped_by_its_engine_ends_with_its_process_group_and_the_runner_goes_on(
        warm, tmp_path):
    folder = write_stage(tmp_path / "job", "sleeper", SLEEPER)
    control = jobs.JobControl(start=warm, stop_grace_seconds=5.0)
    lines: list[str] = []

    def stop_once_started(line: str) -> None:  # StopPipelineExecution, as the job prints
        lines.append(line)
        control.stop_requested.set()

    code, stopped = jobs._run([sys.executable, "-m", "sleeper"], job_environment(folder), folder,
                              folder / "log.txt", stop_once_started, control)

    assert (code, stopped) == (-signal.SIGTERM, jobs.STOPPED_ON_REQUEST)
    _, pid, child = lines[0].split()
    assert wait_until(lambda: not alive(int(pid)) and not alive(int(child)))
    assert alive(warm.runner.pid)
    code, lines = run_job(write_stage(tmp_path / "next", "where", WHERE), "where", warm=warm)
    assert (code, lines) == (0, ["preloaded: True"])


def test_a_job_dies_when_its_engine_dies(warm, runner_home, shared_job_runner, tmp_path):
    folder = write_stage(tmp_path / "job", "sleeper", SLEEPER)
    engine_code = """
import sys, time
from pathlib import Path
from pipelines.local import jobs, processes, runner
job = runner.ensure_running(jobs.warm_environment()).start_job(
    "sleeper", [], jobs.warm_environment(), Path(sys.argv[1]))
print(next(job.stdout), flush=True)
time.sleep(600)
"""
    engine = subprocess.Popen(
        [sys.executable, "-c", engine_code, str(folder)],
        cwd=ROOT, env={**os.environ, "LLM_PIPELINE_HOME": str(runner_home),
                       runner.SHARED_VARIABLE: str(shared_job_runner)},  # `warm`'s runner
        stdout=subprocess.PIPE, text=True)
    try:
        _, pid, child = engine.stdout.readline().split()
        engine.kill()
        engine.wait()
        assert wait_until(lambda: not alive(int(pid)) and not alive(int(child)))
    finally:
        engine.kill()
    assert alive(warm.runner.pid)


@pytest.mark.parametrize("env, reason", [
    ({"HF_HOME": "/elsewhere"}, "its environment sets HF_HOME otherwise than the warm job runner"),
])
def test_a_job_that_forking_would_not_serve_runs_as_a_fresh_process_and_says_why(
        warm, tmp_path, env, reason):
    folder = write_stage(tmp_path / "job", "where", WHERE)
    code, lines = run_job(folder, "where", warm=warm, **env)
    assert code == 0 and lines[0].startswith(f"runs as a fresh process: {reason}")
    assert lines[1:] == ["preloaded: False"]


def test_when_the_runner_dies_its_job_fails_saying_so_the_next_runs_fresh_and_a_new_runner_starts(
        tmp_path, monkeypatch, light_runners):
    home = tmp_path / "home"
    monkeypatch.setenv("LLM_PIPELINE_HOME", str(home))
    warm = started_runner(home)
    crashing = warm.runner
    try:
        folder = write_stage(tmp_path / "job", "sleeper", SLEEPER)
        job = crashing.start_job("sleeper", [], job_environment(folder), folder)
        _, pid, _ = next(job.stdout).split()

        os.kill(crashing.pid, signal.SIGKILL)

        lost = (f"ERROR: the warm job runner stopped while the job ran, and the job with it; "
                f"see {home / 'job-runner.log'}\n")
        assert list(job.stdout) == [lost]
        assert job.wait() == -signal.SIGTERM and job.runner_lost
        assert wait_until(lambda: not alive(int(pid)))
        code, lines = run_job(write_stage(tmp_path / "next", "where", WHERE), "where", warm=warm)
        why = (f"the warm job runner (pid {crashing.pid}) is not running; "
               f"see {home / 'job-runner.log'}")
        assert (code, lines) == (0, [f"runs as a fresh process: {why}", "preloaded: False"])

        # Started again for the jobs after, on the socket path the killed one left behind.
        code, lines = run_job(tmp_path / "next", "where", warm=warm)
        assert (code, lines) == (0, ["preloaded: True"])
        assert warm.runner is not None and warm.runner.pid != crashing.pid
    finally:
        runner.stop()


def test_a_runner_of_other_code_is_replaced_and_leaves(tmp_path, monkeypatch, light_runners):
    monkeypatch.setenv("LLM_PIPELINE_HOME", str(tmp_path / "home"))
    old = runner.ensure_running(jobs.warm_environment())
    try:
        # The stage code changed since the runner started (its digest, as an edit would).
        monkeypatch.setattr(images, "code_digest", lambda: "0123456789abcdef")
        new = runner.ensure_running(jobs.warm_environment())
        assert new.pid != old.pid and new.socket_path != old.socket_path
        assert wait_until(lambda: not alive(old.pid))
        assert runner.ensure_running(jobs.warm_environment()).pid == new.pid
    finally:
        runner.stop()


def test_a_runner_preloading_other_modules_is_not_the_one_to_fork_from(monkeypatch):
    key = runner._key(jobs.warm_environment())
    monkeypatch.setattr(runner, "WARM_IMPORTS", ("torch",))
    assert runner._key(jobs.warm_environment()) != key


def test_a_home_too_deep_for_a_socket_address_gets_its_runner_in_a_private_folder(
        tmp_path, monkeypatch, light_runners):
    home = tmp_path / ("a-folder-name-long-enough-for-no-unix-socket-path-to-fit" * 2)
    monkeypatch.setenv("LLM_PIPELINE_HOME", str(home))
    short = Path(tempfile.mkdtemp(prefix="t-"))  # a test's tmp_path is itself too deep
    monkeypatch.setattr(tempfile, "tempdir", str(short))
    warm = runner.WarmStart()
    try:
        code, lines = run_job(write_stage(tmp_path / "job", "where", WHERE), "where", warm=warm)

        assert (code, lines) == (0, ["preloaded: True"])
        folder = short / f"llm-pipeline-{os.getuid()}"
        assert warm.runner.socket_path.parent == folder
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    finally:
        runner.stop()
        shutil.rmtree(short, ignore_errors=True)


def test_a_shared_socket_folder_that_others_can_enter_is_not_used(tmp_path, monkeypatch):
    monkeypatch.setenv("LLM_PIPELINE_HOME", str(tmp_path / ("deep-folder" * 12)))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    (tmp_path / f"llm-pipeline-{os.getuid()}").mkdir(mode=0o777)
    os.chmod(tmp_path / f"llm-pipeline-{os.getuid()}", 0o777)

    with pytest.raises(runner.Unavailable, match="is not a private folder of this user's"):
        runner.ensure_running(jobs.warm_environment())


# Prints its output folder (SM_OUTPUT_DIR, which the job's request gives) and whether it started
# in a process that had imported torch already.
OWN_OUTPUT = """
import os, sys
print(f"{os.environ['SM_OUTPUT_DIR']} preloaded: {'torch' in sys.modules}", flush=True)
"""


def test_homes_that_name_one_runner_folder_fork_their_jobs_from_one_runner_their_servers_leave(
        tmp_path, monkeypatch, light_runners):
    from pipelines.local import server

    monkeypatch.setenv(runner.SHARED_VARIABLE, str(tmp_path / "runner"))
    runners = []
    try:
        for home in (tmp_path / "a", tmp_path / "b"):
            monkeypatch.setenv("LLM_PIPELINE_HOME", str(home))
            warm = runner.WarmStart()
            folder = write_stage(home / "job", "own_output", OWN_OUTPUT)
            code, lines = run_job(folder, "own_output", warm=warm)
            assert (code, lines) == (0, [f"{folder / 'output'} preloaded: True"])
            runners.append(warm.runner.pid)

            server.stop()  # `llm-pipeline server stop` of this home leaves the shared runner

            assert alive(warm.runner.pid)
            assert not (home / "job-runner.json").exists()
        assert runners[0] == runners[1]
        assert (tmp_path / "runner" / "job-runner.json").is_file()
        assert stat.S_IMODE((tmp_path / "runner").stat().st_mode) == 0o700
    finally:
        runner.stop()
    assert wait_until(lambda: not alive(runners[0]))


def test_a_runner_folder_that_others_can_enter_is_not_used(tmp_path, monkeypatch):
    monkeypatch.setenv("LLM_PIPELINE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv(runner.SHARED_VARIABLE, str(tmp_path / "runner"))
    (tmp_path / "runner").mkdir()
    os.chmod(tmp_path / "runner", 0o755)

    with pytest.raises(runner.Unavailable, match=re.escape(
            f"{tmp_path / 'runner'} is not a private folder of this user's; remove it, or "
            f"unset {runner.SHARED_VARIABLE}")):
        runner.ensure_running(jobs.warm_environment())


# A server, as a local endpoint's is: says its pid, then serves until SIGTERM.
SERVER = """
import os, signal, sys, time
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
print(f"serving {os.getpid()}", flush=True)
time.sleep(600)
"""


def test_a_detached_job_writes_its_log_and_outlives_its_engine_and_the_runner(
        tmp_path, monkeypatch, light_runners):
    # As `llm-pipeline deploy` starts a local endpoint's server (pipelines/deploy.py).
    home = tmp_path / "home"
    monkeypatch.setenv("LLM_PIPELINE_HOME", str(home))
    folder = write_stage(tmp_path / "job", "server", SERVER)
    warm = started_runner(home)
    with open(folder / "log.txt", "ab") as log:
        job = warm([sys.executable, "-m", "server"], job_environment(folder), folder, log=log)
    try:
        assert isinstance(job, runner.Job)
        assert wait_until(lambda: (folder / "log.txt").read_text() == f"serving {job.pid}\n")
        assert os.getsid(job.pid) == job.pid
        job.connection.close()  # the command that started it has ended
        assert runner.stop()  # the runner leaves without waiting for it
        assert wait_until(lambda: not alive(warm.runner.pid))
        assert alive(job.pid)
    finally:
        os.kill(job.pid, signal.SIGTERM)
    assert wait_until(lambda: not alive(job.pid))


# Starts the server stage of the folder it is given detached, as `llm-pipeline deploy` starts a
# local endpoint's server, with the job runner it is given and the variables, then leaves.
DEPLOYS = """
import json, sys
from pathlib import Path
from pipelines.local import jobs, runner
folder, job_runner, variables = Path(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
with open(folder / "log.txt", "ab") as log:
    server = runner.WarmStart(job_runner)([sys.executable, "-m", "server"],
                                          {**jobs.warm_environment(), **variables}, folder, log=log)
print(server.pid, flush=True)
"""


@pytest.mark.parametrize("job_runner, variables, why", [
    ("subprocess", {}, "the local server runs its jobs as fresh processes (--job-runner subprocess)"),
    ("warm", {"HF_HOME": "/elsewhere"},
     "its environment sets HF_HOME otherwise than the warm job runner imported its libraries under"),
])
def test_a_detached_job_that_is_not_forked_is_a_fresh_process_that_says_why_and_outlives_its_starter(
        warm, shared_job_runner, tmp_path, job_runner, variables, why):
    # The runner it would fork from is `warm`'s, which it must find, not replace.
    env = {**os.environ, runner.SHARED_VARIABLE: str(shared_job_runner)}
    folder = write_stage(tmp_path / "job", "server", SERVER)

    started = subprocess.run([sys.executable, "-c", DEPLOYS, str(folder), job_runner,
                              json.dumps(variables)], check=False, cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=300)

    assert started.returncode == 0, started.stderr
    pid = int(started.stdout)
    try:
        assert wait_until(lambda: (folder / "log.txt").read_text() ==
                          f"runs as a fresh process: {why}\nserving {pid}\n")
        assert os.getsid(pid) == pid
        # Still serving a second after its starter ended (a job started fresh gets SIGTERM then).
        assert not wait_until(lambda: not alive(pid), timeout=1.0)
    finally:
        os.kill(pid, signal.SIGTERM)
    assert wait_until(lambda: not alive(pid))
    record = json.loads((shared_job_runner / "job-runner.json").read_text())
    assert record["pid"] == warm.runner.pid


def test_a_runner_that_cannot_start_leaves_jobs_to_fresh_processes_that_say_why_in_one_line(
        tmp_path, monkeypatch):
    long_name = "a-folder-name-long-enough-for-no-unix-socket-path-to-fit" * 2
    monkeypatch.setenv("LLM_PIPELINE_HOME", str(tmp_path / long_name))
    (tmp_path / long_name).mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / long_name))

    warm = runner.WarmStart()

    code, lines = run_job(write_stage(tmp_path / "job", "where", WHERE), "where", warm=warm)

    assert warm.runner is None
    assert warm.unavailable.startswith("its socket path ") and "\n" not in warm.unavailable
    assert warm.unavailable.endswith("set TMPDIR or LLM_PIPELINE_HOME to a shorter folder")
    assert (code, lines) == (0, [f"runs as a fresh process: {warm.unavailable}",
                                 "preloaded: False"])


def test_a_server_started_for_fresh_processes_has_no_runner_and_keeps_its_choice(tmp_path):
    env = clean_env(tmp_path / "home")
    try:
        assert cli(env, "server", "start", "--job-runner", "subprocess").returncode == 0
        assert not (tmp_path / "home" / "job-runner.json").exists()

        result = cli(env, "server", "start", "--job-runner", "warm")

        assert result.returncode == 2
        assert result.stderr.strip() == (
            f"ERROR: the local server (home {tmp_path / 'home'}) runs its jobs with the "
            "subprocess job runner, not warm; stop it first (llm-pipeline server stop)")
    finally:
        cli(env, "server", "stop")


def test_an_unknown_job_runner_is_refused_before_anything_runs(tmp_path):
    result = cli(clean_env(tmp_path / "home", LLM_PIPELINE_JOB_RUNNER="threads"), "run")
    assert result.returncode == 2
    assert result.stderr.strip() == ("ERROR: LLM_PIPELINE_JOB_RUNNER='threads' is not a job "
                                     "runner; use one of warm, subprocess")
    assert not (tmp_path / "home").exists()


@pytest.mark.e2e
def test_a_tiny_sft_run_through_the_warm_runner_computes_what_fresh_processes_compute(tmp_path):
    data = tmp_path / "sums.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"What is {a} + {b}?",
                                        "completion": f"{a} + {b} = {a + b}."}) + "\n"
                            for a in range(6) for b in range(6)))
    # The sft recipe on 4 training steps and 4 evaluation answers: every stage's job runs on each
    # path, and any difference in what a job computes shows in the evaluation's metrics.
    recipe = write_quick_recipe(tmp_path, "sft")
    metrics, runner_pids = {}, {}
    for job_runner in ("subprocess", "warm"):
        home = tmp_path / job_runner
        env = clean_env(home)
        try:
            result = cli(env, "run", "--recipe", str(recipe), "--job-runner", job_runner,
                         "-p", "BaseModel=builtin:tiny", "-p", f"InputData={data}",
                         "-p", "ModelPackageGroup=warm-runner", "-p", "LearningRate=0.005")
            record = home / "job-runner.json"
            runner_pids[job_runner] = json.loads(record.read_text())["pid"] if record.exists() \
                else None
        finally:
            cli(env, "server", "stop")
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        server_log = (home / "server.log").read_text()
        assert ("jobs fork from the warm job runner" in server_log) == (job_runner == "warm")
        assert "runs as a fresh process" not in result.stdout
        folder = next((home / "executions" / "llm-sft").iterdir())
        metrics[job_runner] = json.loads(
            (folder / "Evaluate" / "opt_ml" / "processing" / "evaluation" /
             "evaluation.json").read_text())["metrics"]
    # The warm server started its runner with its first job, and `server stop` ended it.
    assert runner_pids["subprocess"] is None and runner_pids["warm"] is not None
    assert wait_until(lambda: not alive(runner_pids["warm"]))
    runner_log = (tmp_path / "warm" / "job-runner.log").read_text()
    for stage in ("data_prep", "sft", "evaluate", "compare_approved"):
        assert f"job steps.{stage} in " in runner_log
    assert metrics["warm"] == metrics["subprocess"]

"""The container contract: hyperparameters as SageMaker writes them, errors as it reports them."""

import gc
import importlib.util
import json
import os
import sys
from dataclasses import dataclass, field

import pytest

from steps.common import contract
from steps.common.contract import StageError


@dataclass
class ToyConfig:
    name: str = "default"
    rate: float = 0.1
    steps: int = 3
    verbose: bool = False
    note: str | None = field(default=None)

    def __post_init__(self) -> None:
        if self.rate <= 0:
            raise StageError(f"rate must be > 0, got {self.rate}")


def test_hyperparameters_arrive_as_strings_some_json_encoded(training_job):
    training_job.hyperparameters(
        name='"abc"',
        rate="1e-4",
        steps="7",
        verbose="true",
        sagemaker_region='"us-east-1"',
        _tuning_objective_metric="x",
    )

    config = contract.parse_config(ToyConfig, contract.read_hyperparameters(), [])

    assert config == ToyConfig(name="abc", rate=1e-4, steps=7, verbose=True)


def test_the_command_line_overrides_hyperparameters_json(training_job):
    training_job.hyperparameters(rate="0.5", steps="7")
    config = contract.parse_config(ToyConfig, contract.read_hyperparameters(), ["--rate", "0.25"])
    assert (config.rate, config.steps) == (0.25, 7)


def test_an_unknown_hyperparameter_is_named_with_the_valid_ones():
    with pytest.raises(StageError) as caught:
        contract.parse_config(ToyConfig, {"rat": "0.5"}, [])
    message = str(caught.value)
    assert "unknown hyperparameter 'rat'" in message and "did you mean 'rate'" in message
    assert "valid: name, rate, steps, verbose, note" in message


def test_a_value_of_the_wrong_type_or_range_names_the_parameter():
    with pytest.raises(StageError, match="--steps.*invalid int value: 'many'"):
        contract.parse_config(ToyConfig, {"steps": "many"}, [])
    with pytest.raises(StageError, match="rate must be > 0, got -1.0"):
        contract.parse_config(ToyConfig, {}, ["--rate", "-1"])


def test_processing_arguments_accept_dashes_and_reject_unknown_flags():
    assert contract.parse_config(ToyConfig, {}, ["--steps", "2"]).steps == 2
    with pytest.raises(StageError, match="unknown argument '--colour'"):
        contract.parse_config(ToyConfig, {}, ["--colour", "red"])


def test_a_required_channel_that_is_missing_says_which_variable_to_set(training_job):
    with pytest.raises(StageError, match="input channel 'train' is missing.*SM_CHANNEL_TRAIN"):
        contract.channel_dir("train")
    assert contract.optional_channel_dir("validation") is None


def failing_main(config: ToyConfig) -> None:
    raise StageError(f"data/train.jsonl:3: field 'text': empty string (run {config.name})")


def test_a_stage_error_exits_2_with_one_error_line_and_the_training_failure_reason(
    training_job, capsys
):
    with pytest.raises(SystemExit) as exited:
        contract.run(failing_main, ToyConfig, job="training")

    assert exited.value.code == 2
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert last_line == "ERROR: data/train.jsonl:3: field 'text': empty string (run default)"
    assert training_job.failure_file.read_text() == last_line


def test_a_stage_runs_with_what_was_imported_before_it_out_of_the_collectors_sight(training_job):
    # The Trainer's full collection at each training's start would otherwise walk the whole
    # imported ML stack again (steps/common/contract.py).
    frozen = []
    gc.unfreeze()  # the test session froze its own imports (tests/conftest.py)
    try:
        contract.run(lambda config: frozen.append(gc.get_freeze_count()), ToyConfig,
                     job="training")
    finally:
        gc.freeze()
    assert frozen and frozen[0] > 100_000  # pytest, torch and the stage's libraries


def test_a_bug_exits_1_with_its_traceback(training_job, capsys):
    def broken(config: ToyConfig) -> None:
        raise KeyError("oops")

    with pytest.raises(SystemExit) as exited:
        contract.run(broken, ToyConfig, job="training")

    assert exited.value.code == 1
    assert "Traceback" in capsys.readouterr().err
    assert "KeyError" in training_job.failure_file.read_text()


def test_a_processing_stage_leaves_its_error_line_where_sagemaker_reads_the_exit_message(
    training_job, capsys
):
    # SageMaker returns the first 1 KB of a processing job's /opt/ml/output/message as its
    # ExitMessage; /opt/ml/output/failure is a training job's.
    with pytest.raises(SystemExit) as exited:
        contract.run(failing_main, ToyConfig, job="processing")

    assert exited.value.code == 2
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert training_job.message_file.read_text() == last_line
    assert not training_job.failure_file.exists()


def test_a_long_reason_is_cut_to_sagemakers_1_kb_at_a_character_boundary(training_job):
    def verbose(config: ToyConfig) -> None:
        raise StageError("é" * 600)  # 1200 bytes of UTF-8

    with pytest.raises(SystemExit):
        contract.run(verbose, ToyConfig, job="processing")

    written = training_job.message_file.read_bytes()
    assert len(written) <= 1024
    assert written.decode("utf-8") == "ERROR: " + "é" * ((1024 - len("ERROR: ")) // 2)


def test_the_jobs_region_is_aws_region_which_sagemaker_sets_and_boto3_ignores(monkeypatch):
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    assert contract.aws_region() == "eu-west-1"
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-2")  # AWS_REGION, the job's, comes first
    assert contract.aws_region() == "eu-west-1"
    monkeypatch.delenv("AWS_REGION")
    assert contract.aws_region() == "us-east-2"  # a stage run by hand

    monkeypatch.delenv("AWS_DEFAULT_REGION")
    with pytest.raises(StageError, match="neither AWS_REGION .* nor AWS_DEFAULT_REGION is set"):
        contract.aws_region()


def test_atomic_output_moves_files_in_only_on_success(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError), contract.atomic_output(out) as staging:
        (staging / "half.json").write_text("{")
        raise RuntimeError("killed halfway")
    assert not out.exists() and list(tmp_path.iterdir()) == []

    with contract.atomic_output(out) as staging:
        (staging / "whole.json").write_text(json.dumps({"ok": True}))
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert json.loads((out / "whole.json").read_text()) == {"ok": True}


def test_a_job_on_several_instances_relaunches_the_stage_under_torchrun(tmp_path, monkeypatch):
    # What SageMaker gives the second of two instances; each runs one process per GPU.
    (tmp_path / "resourceconfig.json").write_text(
        json.dumps({"current_host": "algo-2", "hosts": ["algo-1", "algo-2"]}))
    monkeypatch.setenv("SM_INPUT_CONFIG_DIR", str(tmp_path))
    monkeypatch.setenv("SM_PROCESSES_PER_HOST", "4")
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setattr("sys.argv", ["sft.py", "--max_steps", "3"])
    # As started by `python -m steps.sft`.
    monkeypatch.setattr(sys.modules["__main__"], "__spec__", importlib.util.find_spec("steps.sft"))

    command = contract.distributed_launch_command()

    assert command[1:3] == ["-m", "torch.distributed.run"]
    assert {"--nnodes=2", "--node_rank=1", "--nproc_per_node=4",
            "--master_addr=algo-1"} <= set(command)
    assert command[-4:] == ["-m", "steps.sft", "--max_steps", "3"]
    # Several processes on one host (the local engine's stand-in for instances): torchrun
    # --standalone picks a free port, so two such jobs at once do not collide.
    (tmp_path / "resourceconfig.json").write_text(
        json.dumps({"current_host": "algo-1", "hosts": ["algo-1"]}))
    single = contract.distributed_launch_command()
    assert "--standalone" in single and "--nproc_per_node=4" in single  # the stage's own arguments pass through
    # Under torchrun already, or on one instance with one process: the stage just runs.
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert contract.distributed_launch_command() is None
    monkeypatch.delenv("LOCAL_RANK")
    monkeypatch.setenv("SM_PROCESSES_PER_HOST", "1")
    (tmp_path / "resourceconfig.json").write_text(
        json.dumps({"current_host": "algo-1", "hosts": ["algo-1"]}))
    assert contract.distributed_launch_command() is None


WAITING_STAGE = '''
import os, sys, time
from dataclasses import dataclass
import torch.distributed as dist
from steps.common import contract

@dataclass
class Config:
    out: str = ""

def main(config):
    dist.init_process_group("gloo")
    done = os.path.join(config.out, "rank1_done")
    if dist.get_rank() == 0:  # the saving process takes a while: it saves only once rank 1 is
        while not os.path.exists(done):  # done and has had time to leave, were it not held
            time.sleep(0.01)
        time.sleep(0.3)
        open(os.path.join(config.out, "saved"), "w").close()
    else:  # the others return at once, as the stages' non-zero ranks do
        open(done, "w").close()

def leaving(code, entry_point, _exit=contract._exit):
    out = sys.argv[-1]
    if os.environ["RANK"] != "0":  # what rank 1 found when its entry point was leaving
        with open(os.path.join(out, "rank1_left_after_save"), "w") as f:
            f.write(str(os.path.exists(os.path.join(out, "saved"))))
    _exit(code, entry_point)

if __name__ == "__main__":
    contract._exit = leaving
    contract.run(main, Config, job="processing")
'''


def test_under_torchrun_every_process_waits_for_the_saving_one_then_closes_the_group(
        tmp_path, monkeypatch):
    # A process that leaves while its peers hold the gloo group open can abort at exit, failing a
    # job whose model was trained; the entry point waits for all and closes the group.
    # The two processes start as torchrun starts its workers: its variables, and the rendezvous
    # store it hosts (here in this process), each running the module as `python -m` does. They
    # are forked from this process, which has imported torch and transformers: torchrun's own
    # interpreter and two fresh ones spent about 4.5 CPU s importing them (a stage under torchrun
    # itself: tests/steps/test_distributed.py).
    from datetime import timedelta

    import torch.distributed as dist

    from .stage_runs import run_as_programs

    (tmp_path / "waiting_stage.py").write_text(WAITING_STAGE)
    monkeypatch.syspath_prepend(str(tmp_path))
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                          timeout=timedelta(seconds=60))
    torchrun = {"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(store.port), "TORCHELASTIC_USE_AGENT_STORE": "True"}
    ranks = run_as_programs(
        "waiting_stage", [tmp_path / f"rank{rank}" for rank in range(2)], "--out", str(tmp_path),
        envs=[{**os.environ, **torchrun, "RANK": str(rank), "LOCAL_RANK": str(rank)}
              for rank in range(2)])

    assert [rank.status for rank in ranks] == [0, 0], [rank.stderr[-2000:] for rank in ranks]
    assert (tmp_path / "rank1_left_after_save").read_text() == "True"


EXITING_STAGE = '''
import atexit, sys
from dataclasses import dataclass
from steps.common import contract

@dataclass
class Config:
    fail: bool = False

def main(config):
    print("stage output", flush=False)  # unflushed: the fast exit must flush it
    atexit.register(lambda: print("interpreter teardown ran"))
    if config.fail:
        raise contract.StageError("bad input")

if __name__ == "__main__":
    contract.run(main, Config, job="processing")
'''


@pytest.mark.parametrize("fail, status", [(False, 0), (True, 2)])
def test_as_a_program_a_stage_leaves_at_once_with_its_output_flushed(tmp_path, fail, status):
    # The interpreter's teardown of torch and transformers cost 3-4.5 s per job; the entry point
    # skips it once the stage's output is flushed, keeping the exit status.
    import os
    import subprocess

    (tmp_path / "exiting_stage.py").write_text(EXITING_STAGE)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.getcwd()])}
    result = subprocess.run([sys.executable, "-m", "exiting_stage", "--fail", str(fail).lower()],
                            env=env, capture_output=True, text=True, timeout=120, check=False)

    assert result.returncode == status, result.stderr
    assert "stage output" in result.stdout
    assert "interpreter teardown ran" not in result.stdout
    assert ("ERROR: bad input" in result.stderr) == fail

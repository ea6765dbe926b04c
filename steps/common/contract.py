"""The SageMaker container contract, as seen from inside a stage.

Training jobs get their hyperparameters from ``hyperparameters.json`` and their
paths from ``SM_*`` environment variables; processing jobs get every path as a
command-line argument. Both fill one config dataclass per stage, parsed by
``transformers.HfArgumentParser``, so the same knobs and defaults serve
SageMaker, the command line and tests.

This is the only module that knows where SageMaker mounts things (``/opt/ml``);
the local engine points the ``SM_*`` variables at per-job folders. It is also where a stage
learns its AWS region (``aws_region``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import gc
import json
import logging
import os
import shutil
import sys
import tempfile
import traceback
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal, TypeVar

from transformers import HfArgumentParser

from steps.common import tracking

# Defined beside the stage configs, which import no transformers; stages raise contract.StageError.
from steps.common.knobs import LoadPolicy, StageError

# Fallbacks for when the SM_* variables are unset: SageMaker's layout inside a training container.
SAGEMAKER_ROOT = Path("/opt/ml")
DEFAULT_INPUT_CONFIG_DIR = SAGEMAKER_ROOT / "input" / "config"
DEFAULT_CHANNELS_DIR = SAGEMAKER_ROOT / "input" / "data"
DEFAULT_MODEL_DIR = SAGEMAKER_ROOT / "model"
DEFAULT_OUTPUT_DIR = SAGEMAKER_ROOT / "output"
# CheckpointConfig.LocalPath's default; SageMaker syncs it with CheckpointConfig.S3Uri.
DEFAULT_CHECKPOINT_DIR = SAGEMAKER_ROOT / "checkpoints"

Job = Literal["training", "processing"]
ConfigT = TypeVar("ConfigT")


def input_config_dir() -> Path:
    return Path(os.environ.get("SM_INPUT_CONFIG_DIR", DEFAULT_INPUT_CONFIG_DIR))


def model_dir() -> Path:
    """Where a training job writes the model that SageMaker packs as model.tar.gz."""
    return Path(os.environ.get("SM_MODEL_DIR", DEFAULT_MODEL_DIR))


def output_dir() -> Path:
    """SageMaker's /opt/ml/output, where a job leaves the reason it failed (both job kinds)."""
    return Path(os.environ.get("SM_OUTPUT_DIR", DEFAULT_OUTPUT_DIR))


def output_data_dir() -> Path:
    """Where a training job writes extra outputs (metrics, plots); packed as output.tar.gz."""
    return Path(os.environ.get("SM_OUTPUT_DATA_DIR", output_dir() / "data"))


def checkpoint_dir() -> Path:
    """Where a training job writes resumable checkpoints.

    SageMaker sets no variable for it: the pipeline's CheckpointConfig uses the default LocalPath,
    which SageMaker uploads to CheckpointConfig.S3Uri as files appear and restores into a restarted
    job. SM_CHECKPOINT_DIR lets the local engine (and tests) point it elsewhere.
    """
    return Path(os.environ.get("SM_CHECKPOINT_DIR", DEFAULT_CHECKPOINT_DIR))


def failure_file(job: Job) -> Path:
    """Where SageMaker reads why a job failed.

    Training: /opt/ml/output/failure, the job's FailureReason
    (https://docs.aws.amazon.com/sagemaker/latest/dg/your-algorithms-training-algo-output.html).
    Processing: /opt/ml/output/message, the job's ExitMessage (its first 1 KB), there "to
    communicate information about why the processing container failed"
    (https://docs.aws.amazon.com/sagemaker/latest/dg/build-your-own-processing-container.html,
    "Save and Access Metadata Information About Your Processing Job").
    """
    return output_dir() / ("failure" if job == "training" else "message")


def aws_region() -> str:
    """The AWS region of the job, for every AWS client a stage creates.

    SageMaker gives a job's container AWS_REGION, which boto3 does not read (it reads
    AWS_DEFAULT_REGION or a config file): a client created without a region fails in a job on AWS
    with NoRegionError. AWS_DEFAULT_REGION is taken when AWS_REGION is unset (a stage run by hand).
    """
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if not region:
        raise StageError("no AWS region: neither AWS_REGION (which SageMaker sets in a job) nor "
                         "AWS_DEFAULT_REGION is set; set one of them to the region of the job")
    return region


def optional_channel_dir(name: str) -> Path | None:
    """The folder of input channel `name`, or None when the channel is absent or empty."""
    path = Path(os.environ.get(f"SM_CHANNEL_{name.upper()}", DEFAULT_CHANNELS_DIR / name))
    if not path.exists() or (path.is_dir() and not any(path.iterdir())):
        return None
    return path


def channel_dir(name: str) -> Path:
    """The folder of required input channel `name`."""
    path = optional_channel_dir(name)
    if path is None:
        raise StageError(
            f"input channel '{name}' is missing or empty: give the training job a '{name}' channel "
            f"(locally, set SM_CHANNEL_{name.upper()} to a folder with the data)"
        )
    return path


def read_hyperparameters(path: Path | None = None) -> dict[str, str]:
    """hyperparameters.json as command-line values; {} when the file is absent (local runs)."""
    path = path or input_config_dir() / "hyperparameters.json"
    if not path.exists():
        return {}
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise StageError(
            f"{path}: not valid JSON ({err}); write the hyperparameters as a JSON object"
        ) from None
    if not isinstance(raw, dict):
        raise StageError(
            f"{path}: expected a JSON object of hyperparameters, got {type(raw).__name__}"
        )
    return {key: _hyperparameter_value(value) for key, value in raw.items()}


def _hyperparameter_value(value: Any) -> str:
    # SageMaker stores every hyperparameter as a string, and the SDK JSON-encodes some of them first
    # ('"abc"' for abc). Unwrap only JSON strings: '1e-4' must stay '1e-4', not become 0.0001.
    if isinstance(value, str):
        try:
            decoded = json.loads(value)
        except json.JSONDecodeError:
            return value
        return decoded if isinstance(decoded, str) else value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    return json.dumps(value)


# The policy of this process's stage, set by parse_config; read by steps.common.models.
_load_policy = LoadPolicy()


def load_policy() -> LoadPolicy:
    """The model-loading opt-ins the stage was started with (both off unless given)."""
    return _load_policy


def set_load_policy(policy: LoadPolicy) -> None:
    global _load_policy
    _load_policy = policy


def parse_config(
    config_class: type[ConfigT], hyperparameters: dict[str, str], argv: list[str]
) -> ConfigT:
    """Build `config_class` from hyperparameters (SageMaker), then argv (the command line wins).

    Every stage also takes the `LoadPolicy` opt-ins; they become this process's `load_policy()`.
    """
    valid = [field.name for field in dataclasses.fields(config_class)]
    valid += [field.name for field in dataclasses.fields(LoadPolicy) if field.name not in valid]
    listing = ", ".join(valid)
    hp_argv: list[str] = []
    for key, value in hyperparameters.items():
        if key.startswith(("sagemaker_", "_")):  # set by the SageMaker SDK for its own use
            continue
        if key not in valid:
            raise StageError(
                f"unknown hyperparameter '{key}'{_did_you_mean(key, valid)}; valid: {listing}"
            )
        hp_argv += [f"--{key}", value]

    # exit_on_error=False: a bad value ('--lora_r abc') raises, and is reported like any StageError.
    parser = HfArgumentParser((config_class, LoadPolicy), exit_on_error=False)
    try:
        config, policy, remaining = parser.parse_args_into_dataclasses(
            args=hp_argv + argv, return_remaining_strings=True, look_for_args_file=False
        )
    except argparse.ArgumentError as err:
        raise StageError(f"{err}; see --help for valid values") from None
    if remaining:
        first = remaining[0].lstrip("-").replace("-", "_")
        raise StageError(
            f"unknown argument '{remaining[0]}'{_did_you_mean(first, valid)}; valid: {listing}"
        )
    set_load_policy(policy)
    return config


def _did_you_mean(name: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(name, valid, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def run(main: Callable[[ConfigT], None], config_class: type[ConfigT], job: Job) -> None:
    """A stage's entry point: parse the config, run `main`, report failures as SageMaker expects.

    A StageError exits with status 2 after printing ``ERROR: <message>`` as the last line on stderr
    and writing it where SageMaker reads a failed job's reason (`failure_file`); any other
    exception is a bug: its traceback is printed, its last line written there, and the status is 1.
    """
    _quiet_logs()
    # The stage's imports (torch, transformers, PEFT, TRL: about half a million objects) live as
    # long as the job: out of the collector's sight, the full collection the Trainer runs as each
    # training starts (accelerate's free_memory) skips them, about 0.25 CPU s a job. A job forked
    # by the warm runner has them frozen already.
    gc.freeze()
    code = 0
    try:
        hyperparameters = read_hyperparameters() if job == "training" else {}
        config = parse_config(config_class, hyperparameters, sys.argv[1:])
        launch = distributed_launch_command() if job == "training" else None
        if launch:
            print(f"launching {' '.join(launch[2:])}", flush=True)
            sys.stdout.flush()
            os.execv(launch[0], launch)  # torchrun starts this stage once per process
        tracking.start(config)
        main(config)
        _end_tracking(job, config)
        _finish_distributed()
    except StageError as err:
        # One line, so that it is the last line a log viewer shows.
        message = "ERROR: " + " ".join(str(err).split())
        sys.stdout.flush()
        tracking.end(False, [])
        _write_failure(job, message)
        print(message, file=sys.stderr, flush=True)
        code = 2
    except Exception as err:  # noqa: BLE001 (a bug, not a user error: keep the traceback)
        traceback.print_exc()
        tracking.end(False, [])
        _write_failure(job, f"{type(err).__name__}: {err}")
        code = 1
    _exit(code, entry_point=main.__module__ == "__main__")


def _end_tracking(job: Job, config: Any) -> None:
    """End the step's MLflow run with what the stage left for people to see: a training job's
    extra outputs (metrics, loss curve) and its model's record (training_summary.json,
    lineage.json; not the weights); a processing job's output folder (evaluation.json, reports,
    plots)."""
    if job == "training":
        from steps.common.training import TRAINING_RECORD_FILES

        tracking.end(True, [output_data_dir()], model_dir(), TRAINING_RECORD_FILES)
    else:
        folder = getattr(config, "output_dir", None)
        tracking.end(True, [Path(folder)] if folder else [])


def _exit(code: int, entry_point: bool) -> None:
    """End the stage with `code`.

    As the program's entry point (``python -m steps.X``), the process leaves at once once its
    output is flushed: everything the stage writes is closed by then, and the interpreter's
    teardown of torch and transformers took 3-4.5 s per job, paid on every step of every
    pipeline. Called in-process (tests), it returns, or raises SystemExit for a failure.
    """
    if not entry_point:
        if code:
            sys.exit(code)
        return
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)


def _finish_distributed() -> None:
    """Under torchrun: wait for every process (rank 0 saves while the others are done), then
    close the process group.

    A process that leaves while its peers still hold the group open can abort in gloo's
    destructor (SIGABRT at exit), which fails the whole job after the model was trained.
    """
    if "torch.distributed" not in sys.modules:
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def distributed_launch_command() -> list[str] | None:
    """The torchrun command that runs this stage on every process of the job, or None for one.

    What SageMaker's own torchrun driver does, kept here because the project's images run the stage
    module directly: the hosts come from resourceconfig.json (one per instance), the processes per
    host are the GPUs (SM_PROCESSES_PER_HOST overrides it: the local engine plays several instances
    with CPU processes). Under torchrun already (LOCAL_RANK set): None.
    """
    if "LOCAL_RANK" in os.environ:
        return None
    config_path = input_config_dir() / "resourceconfig.json"
    hosts, current = ["algo-1"], "algo-1"
    if config_path.exists():
        resources = json.loads(config_path.read_text(encoding="utf-8"))
        hosts, current = resources.get("hosts", hosts), resources.get("current_host", current)
    per_host = os.environ.get("SM_PROCESSES_PER_HOST")
    if per_host is None:
        import torch

        per_host = torch.cuda.device_count() or 1
    per_host = int(per_host)
    if len(hosts) * per_host <= 1:
        return None
    main_module = sys.modules["__main__"].__spec__
    if main_module is None:
        raise StageError("a distributed job must start the stage as `python -m steps.<stage>`")
    if len(hosts) == 1:  # processes of one machine: torchrun picks a free local port itself
        where = ["--standalone"]
    else:
        where = [f"--nnodes={len(hosts)}", f"--node_rank={hosts.index(current)}",
                 f"--master_addr={hosts[0]}", "--master_port=29500"]
    return [sys.executable, "-m", "torch.distributed.run", *where,
            f"--nproc_per_node={per_host}", "-m", main_module.name, *sys.argv[1:]]


def _write_failure(job: Job, message: str) -> None:
    # SageMaker keeps the first 1 KB, and fails a processing job whose message is not UTF-8: cut
    # at a character boundary.
    text = message.encode("utf-8")[:1024].decode("utf-8", errors="ignore")
    path = failure_file(job)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    except OSError as err:
        print(f"warning: could not write {path}: {err}", file=sys.stderr)


def _quiet_logs() -> None:
    # Container logs end up in CloudWatch, where progress bars become thousands of lines (stages
    # print their own progress), and deprecation notices about pinned libraries' internals are
    # nothing a user of the stage can act on.
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_warning()
    warnings.filterwarnings("ignore", category=FutureWarning)
    # PEFT saves a checkpoint's adapter with save_embedding_layers="auto" (transformers' Trainer
    # passes no choice) and, to tell whether the vocabulary grew, looks the base up on the Hub,
    # which a job cannot reach (nor a builtin: spec name): it warns and assumes the vocabulary did
    # not grow. That assumption is this project's rule: new tokens' rows are trainable tokens saved
    # in the adapter (steps.cpt), and peft_methods.save_model says so explicitly.
    warnings.filterwarnings("ignore", message="Could not find a config file in .* - will assume "
                            "that the vocabulary was not modified", category=UserWarning)


@contextlib.contextmanager
def atomic_output(output_dir: Path) -> Iterator[Path]:
    """Yield a staging folder whose contents move into `output_dir` only if the block succeeds.

    The staging folder is a hidden sibling of `output_dir`: on the same file system, so the moves
    are renames, and outside the folder SageMaker uploads, so a failed or killed stage leaves
    `output_dir` as it was.
    """
    output_dir = Path(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.partial-", dir=output_dir.parent))
    try:
        yield staging
        output_dir.mkdir(exist_ok=True)
        for entry in sorted(staging.iterdir()):
            target = output_dir / entry.name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            # shutil.move renames, or copies when output_dir is a separate mount
            shutil.move(str(entry), str(target))
    finally:
        shutil.rmtree(staging, ignore_errors=True)

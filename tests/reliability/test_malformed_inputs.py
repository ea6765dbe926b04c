"""A corpus of malformed inputs, each through the real entry point a user runs.

Every case must end with: a non-zero exit; a last stderr line `ERROR: ...` that names the file and
line (data) and the field, or the parameter or key; and no output: the output folder does not
exist afterwards, nor a staging folder beside it (and for the CLI, no execution and no bucket).

Stage cases run as `python -m steps.<stage> ARGS` does, each a job of the session's warm job
runner with its stdout and stderr in files (tests/reliability/entry_points.py): a fresh
interpreter per case would spend about 5-15 s importing torch and transformers each time. CLI
cases run `python -m pipelines.cli` as a subprocess against a private local home. All stop before any training starts.
"""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pipelines.local import jobs, runner
from tests.pipelines.conftest import clean_env, cli
from tests.reliability.tiny import tiny_model_folder

ROOT = Path(__file__).resolve().parents[2]

GOOD = [{"prompt": f"What is {k} + 1?", "completion": f"{k + 1}"} for k in range(4)]


def jsonl(*records: object) -> bytes:
    return b"".join(
        (r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in records
    )


@dataclass
class Case:
    """One malformed input: the files it needs (relative path -> bytes), how the stage is run, and
    the pattern the ERROR line must match (after `ERROR: `)."""

    module: str
    files: dict[str, bytes]
    argv: list[str]  # {tmp} is the case's folder
    expected: str  # a regex searched in the error line
    env: dict[str, str] = field(default_factory=dict)
    hyperparameters: dict[str, str] | None = None  # a training job's hyperparameters.json
    output: str = "out"  # the folder that must not exist afterwards
    # A training job's 'model' channel: builtin:tiny's config and tokenizer, `model_weights`
    # ("safetensors", "truncated", "pickle" or None), config.json fields `model_config`, and
    # extra files.
    model_channel: bool = False
    model_weights: str | None = None
    model_config: dict | None = None
    xfail: str | None = None


def data_prep(files: dict[str, bytes], expected: str, *extra: str, **kwargs) -> Case:
    return Case("steps.data_prep", files,
                ["--input-dir", "{tmp}/data", "--output-dir", "{tmp}/out", *extra], expected,
                **kwargs)


def constitution(text: str, expected: str) -> Case:
    prompts = jsonl(*({"prompt": f"Question {k}?"} for k in range(4)))
    return Case("steps.constitutional", {"prompts.jsonl": prompts, "bad.yaml": text.encode()},
                ["--model-dir", "builtin:tiny", "--data-dir", "{tmp}/prompts.jsonl",
                 "--output-dir", "{tmp}/out", "--constitution", "{tmp}/bad.yaml"], expected)


MODEL_CHANNEL = "opt_ml/input/data/model"


def training_job(hyperparameters: dict[str, str], expected: str, model_channel: bool = False,
                 **model) -> Case:
    """The SFT stage as a SageMaker training job: channels and paths from SM_* variables."""
    files = {"opt_ml/input/data/train/train.jsonl": jsonl(*GOOD), **model.pop("files", {})}
    env = {
        "SM_INPUT_CONFIG_DIR": "{tmp}/opt_ml/input/config",
        "SM_MODEL_DIR": "{tmp}/opt_ml/model",
        "SM_OUTPUT_DIR": "{tmp}/opt_ml/output",
        "SM_OUTPUT_DATA_DIR": "{tmp}/opt_ml/output/data",
        "SM_CHECKPOINT_DIR": "{tmp}/opt_ml/checkpoints",
        "SM_CHANNEL_TRAIN": "{tmp}/opt_ml/input/data/train",
    }
    if model_channel:
        env["SM_CHANNEL_MODEL"] = "{tmp}/" + MODEL_CHANNEL
    return Case("steps.sft", files, [], expected, env=env,
                hyperparameters={"base_model": "builtin:tiny", "max_steps": "2", **hyperparameters},
                output="opt_ml/model", model_channel=model_channel, **model)


PRINCIPLE = "- name: kind\n  critique: Is it unkind?\n  revision: Make it kind.\n"

CASES = {
    # --- datasets, through data preparation ------------------------------------------------------
    "truncated-json": data_prep(
        {"data/train.jsonl": jsonl(GOOD[0], b'{"prompt": "What is 2 + 1?", "comp')},
        r"data/train\.jsonl:2: not valid JSON"),
    "wrong-type": data_prep(
        {"data/train.jsonl": jsonl(GOOD[0], {"prompt": "What is 2 + 1?", "completion": 3})},
        r"data/train\.jsonl:2: field 'completion': expected a string, got a number"),
    "missing-field": data_prep(
        {"data/train.jsonl": jsonl(GOOD[0], GOOD[1], {"prompt": "What is 2 + 1?"})},
        r"data/train\.jsonl:3: field 'completion': missing"),
    "empty-file": data_prep({"data/train.jsonl": b""}, r"data/train\.jsonl: file is empty"),
    "non-utf8": data_prep(
        {"data/train.jsonl": jsonl(GOOD[0], b'{"prompt": "caf\xe9?", "completion": "yes"}')},
        r"data/train\.jsonl:2: not valid UTF-8 \(byte 0xe9\)"),
    "identical-chosen-rejected": data_prep(
        {"data/pairs.jsonl": jsonl({"prompt": "Hi?", "chosen": "Hello.", "rejected": "Go."},
                                   {"prompt": "Yo?", "chosen": "Hey.", "rejected": "Hey."})},
        r"data/pairs\.jsonl:2: fields 'chosen' and 'rejected' are identical"),
    "bad-role": data_prep(
        {"data/chat.jsonl": jsonl({"messages": [{"role": "user", "content": "Hi"},
                                                {"role": "robot", "content": "Beep"}]})},
        r"data/chat\.jsonl:1: field 'messages\[1\]\.role': unknown role 'robot'"),
    "over-long-record": data_prep(
        {"data/train.jsonl": jsonl(*GOOD, {"prompt": "Tell a story.", "completion": "la " * 4000})},
        r"data/train\.jsonl:5: record is \d+ tokens long .*over max_record_tokens 256; raise "
        r"--max-record-tokens .*or shorten or split the record", "--max-record-tokens", "256"),
    "zero-validation-fraction": data_prep(
        {"data/train.jsonl": jsonl(*GOOD)}, r"validation_fraction must be in \(0, 1\), got 0",
        "--validation-fraction", "0"),
    # --- constitution files ----------------------------------------------------------------------
    "constitution-not-a-list": constitution(
        "name: kind\ncritique: Is it unkind?\n",
        r"bad\.yaml: expected a YAML list of principles, got a mapping"),
    "constitution-principle-without-critique": constitution(
        PRINCIPLE + "- name: brief\n  revision: Make it brief.\n",
        r"bad\.yaml:4: principle 2 \('brief'\): field 'critique': missing"),
    # --- a training stage's parameters and model folders -----------------------------------------
    # -1 is max_steps' "use epochs"; any other value below 1 is an error.
    "negative-max-steps": training_job(
        {"max_steps": "-5"}, r"max_steps must be -1 \(use epochs\) or > 0, got -5"),
    "zero-epochs": training_job({"epochs": "0", "max_steps": "-1"}, r"epochs must be > 0, got 0"),
    "model-folder-without-weights": training_job(
        {}, r"model folder \S+/input/data/model has no safetensors weights \(found none\)",
        model_channel=True, model_weights=None),
    "model-folder-with-truncated-weights": training_job(
        {}, r"could not load model folder \S+/input/data/model: .*truncated or corrupt",
        model_channel=True, model_weights="truncated"),
    "model-folder-with-pickle-weights": training_job(
        {}, r"model folder \S+/input/data/model has no safetensors weights \(found "
            r"pytorch_model\.bin\); pickle-based weights are refused.*allow_unsafe_weights=true",
        model_channel=True, model_weights="pickle"),
    "model-config-with-remote-code": training_job(
        {}, r"input/data/model/config\.json: field 'auto_map' asks to run the model's own code "
            r"\(modeling_evil\.EvilForCausalLM\); refused.*trust_remote_code=true",
        model_channel=True, model_weights="safetensors",
        model_config={"auto_map": {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}},
        files={MODEL_CHANNEL + "/modeling_evil.py": b"raise SystemExit(42)\n"}),
}


def materialise(case: Case, folder: Path) -> dict:
    folder.mkdir(parents=True)
    if case.model_channel:
        tiny_model_folder(folder / MODEL_CHANNEL, case.model_weights, case.model_config)
    for relative, payload in case.files.items():
        path = folder / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(payload)
    if case.hyperparameters is not None:
        config = folder / "opt_ml/input/config"
        config.mkdir(parents=True, exist_ok=True)
        (config / "hyperparameters.json").write_text(json.dumps(case.hyperparameters))

    def fill(value: str) -> str:
        return value.replace("{tmp}", str(folder))

    return {"module": case.module, "argv": [fill(a) for a in case.argv],
            "env": {k: fill(v) for k, v in case.env.items()}, "cwd": str(folder),
            "stdout": str(folder / "stdout.txt"), "stderr": str(folder / "stderr.txt")}


@pytest.fixture(scope="module")
def stage_runs(tmp_path_factory) -> dict[str, tuple[int, Path]]:
    """Every stage case, run once: name -> (exit status, the case's folder). Each is a job of the
    session's warm job runner (tests/conftest.py), as the local server forks a stage's job: its
    own process, with the job's environment, that imported the ML stack before it was forked."""
    root = tmp_path_factory.mktemp("malformed")
    specs = {name: materialise(case, root / name) for name, case in CASES.items()}
    runs = {}
    with pytest.MonkeyPatch.context() as patch:
        # The runner's import environment, as the `forked` fixture keeps it (one OpenMP thread).
        patch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
        start = runner.WarmStart()
        base = {**jobs.warm_environment(), "LLM_PIPELINE_CACHE": str(root / "cache"),
                "SM_OUTPUT_DIR": os.environ["SM_OUTPUT_DIR"]}
        for name, spec in specs.items():
            env = {**base, **spec.pop("env")}
            job = start([sys.executable, "-m", "tests.reliability.entry_points",
                         json.dumps(spec)], env, ROOT)
            assert isinstance(job, runner.Job), next(job.stdout)  # the line saying why not
            log = "".join(job.stdout)  # the runner's own words, if any: the case's are in files
            runs[name] = (job.wait(timeout=300), root / name)
            assert not log, log
    return runs


def error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines, "nothing on stderr"
    return lines[-1]


def assert_one_clear_error(status: int, stderr: str, expected: str) -> None:
    assert status != 0, f"exited 0; stderr: {stderr[-2000:]}"
    last = error_line(stderr)
    assert last.startswith("ERROR: "), f"last stderr line is not an ERROR line: {stderr[-2000:]}"
    assert "Traceback" not in stderr, stderr[-3000:]
    assert re.search(expected, last), f"{expected!r} not in {last!r}"


@pytest.mark.parametrize(
    "name",
    [pytest.param(name, marks=pytest.mark.xfail(strict=True, reason=case.xfail))
     if case.xfail else name for name, case in CASES.items()],
)
def test_a_malformed_input_gives_one_error_line_a_failed_exit_and_no_output(stage_runs, name):
    status, folder = stage_runs[name]
    stderr = (folder / "stderr.txt").read_text(errors="replace")

    assert_one_clear_error(status, stderr, CASES[name].expected)
    assert status == 2  # a user's error (contract.run), not a bug (1)
    output = folder / CASES[name].output
    assert not output.exists(), sorted(p.name for p in output.iterdir())
    assert not list(output.parent.glob(f".{output.name}.partial-*")), "a staging folder is left"


# --- The command line: recipes and pipeline parameters ----------------------------------------------

RECIPE = """\
name: malformed
model_package_group: malformed
parameters:
  BaseModel: builtin:tiny
stages:
  data_prep:
    tokenizer: $BaseModel
  sft:
    base_model: $BaseModel
    {sft_setting}
  evaluate:
    base_model: $BaseModel
gate:
  metric: perplexity_ratio
{extra}"""

CLI_CASES = {
    "unknown-recipe-key": (
        ["definition"], {"sft_setting": "max_steps: 2", "extra": "schedule: nightly\n"},
        r"recipe\.yaml: unknown recipe key\(s\) schedule; valid keys: ", None),
    "unknown-stage-setting": (
        ["definition"], {"sft_setting": "max_stepz: 2", "extra": ""},
        (r"recipe\.yaml: stages\.sft\.max_stepz: not a setting of stage sft \(did you mean "
         r"'max_steps'\?\)"),
        None),
    "input-data-s3-without-bucket": (
        ["run", "-p", "InputData=s3://"], {"sft_setting": "max_steps: 2", "extra": ""},
        r"InputData 's3://' is not an S3 URI of the form s3://BUCKET/PREFIX", None),
    "input-data-in-a-missing-bucket": (
        ["run", "-p", "InputData=s3://no-such-bucket/train.jsonl"],
        {"sft_setting": "max_steps: 2", "extra": ""},
        r"InputData 's3://no-such-bucket/train\.jsonl': bucket 'no-such-bucket' does not exist",
        None),
}


@pytest.fixture(scope="module")
def cli_home(tmp_path_factory):
    home = tmp_path_factory.mktemp("malformed-home")
    yield home
    cli(clean_env(home), "server", "stop")


@pytest.mark.parametrize(
    "name",
    [pytest.param(name, marks=pytest.mark.xfail(strict=True, reason=xfail))
     if xfail else name for name, (_, _, _, xfail) in CLI_CASES.items()],
)
def test_a_malformed_recipe_or_parameter_gives_one_error_line_and_runs_nothing(
        cli_home, tmp_path, name):
    command, recipe, expected, _ = CLI_CASES[name]
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE.format(**recipe))

    result = cli(clean_env(cli_home), *command, "--recipe", str(path), timeout=300)

    assert_one_clear_error(result.returncode, result.stderr, expected)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    # Nothing ran: no execution record, and no bucket was made or written.
    assert not (cli_home / "executions").exists()
    if command[0] == "run":
        import boto3

        url = cli(clean_env(cli_home), "server", "status").stdout.strip()
        s3 = boto3.client("s3", endpoint_url=url, region_name="us-east-1",
                          aws_access_key_id="local", aws_secret_access_key="local")
        assert s3.list_buckets()["Buckets"] == []

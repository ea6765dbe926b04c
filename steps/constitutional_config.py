"""The settings of steps.constitutional.

Importable without torch (steps.common.knobs): the command line reads these settings, defaults
and ranges to check a recipe and a pipeline's parameter values before anything runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from steps.common.knobs import StageError

CRITICS = ("local", "sagemaker", "bedrock")


@dataclass
class ConstitutionalConfig:
    model_dir: str = field(
        metadata={"help": "The policy: a model or adapter folder, a model.tar.gz or a folder "
                  "holding one, or builtin:tiny / builtin:smollm2-135m-instruct."}
    )
    data_dir: str = field(
        metadata={"help": "Prompts: a data file or folder of prompt, messages, prompt/completion "
                  "or preference records."}
    )
    output_dir: str = field(
        metadata={"help": "Where sft/, preferences/, manifest.json and constitution.yaml go."}
    )
    constitution: str | None = field(
        default=None,
        metadata={"help": "YAML list of principles (name, critique, revision[, preference]); "
                  "default: the shipped steps/constitution.yaml."},
    )
    critic: str = field(
        default="local",
        metadata={"help": "Who critiques, revises and judges: local, sagemaker or bedrock."},
    )
    critic_model: str | None = field(
        default=None,
        metadata={"help": "Model spec of a local critic; default (or none): the policy itself."},
    )
    endpoint_name: str | None = field(
        default=None, metadata={"help": "SageMaker endpoint of --critic sagemaker (TGI or LMI)."}
    )
    bedrock_model_id: str | None = field(
        default=None, metadata={"help": "Bedrock model id of --critic bedrock."}
    )
    region: str | None = field(
        default=None, metadata={"help": "AWS region of the endpoint or Bedrock model; default: "
                                "the job's (AWS_REGION, which SageMaker sets, else "
                                "AWS_DEFAULT_REGION)."}
    )
    max_new_tokens: int = field(
        default=128, metadata={"help": "Length limit of every answer, critique, revision, verdict."}
    )
    temperature: float = field(
        default=0.7, metadata={"help": "Sampling temperature of answers, critiques and revisions "
                               "(0: greedy); the judge is always greedy."}
    )
    samples: int | None = field(
        default=None, metadata={"help": "Use at most this many prompts (a seeded sample)."}
    )
    seed: int = field(
        default=42, metadata={"help": "Seed of the prompt sample, principles, order and sampling."}
    )
    validation_fraction: float = field(
        default=0.1, metadata={"help": "Share of prompts held out, in (0, 1)."}
    )
    batch_size: int = field(default=8, metadata={"help": "Prompts per local generation batch."})

    def __post_init__(self) -> None:
        # A pipeline passes an unset text parameter as 'none' (or an empty string).
        for name in ("constitution", "critic_model", "endpoint_name", "bedrock_model_id", "region"):
            value = getattr(self, name)
            setattr(self, name, None if not value or value.lower() == "none" else value)
        if self.critic not in CRITICS:
            raise StageError(f"critic must be one of {', '.join(CRITICS)}, got '{self.critic}'")
        if self.critic == "sagemaker" and not self.endpoint_name:
            raise StageError("critic 'sagemaker' needs --endpoint-name (the endpoint to invoke)")
        if self.critic == "bedrock" and not self.bedrock_model_id:
            raise StageError("critic 'bedrock' needs --bedrock-model-id (for example "
                             "anthropic.claude-3-haiku-20240307-v1:0)")
        for name in ("max_new_tokens", "batch_size"):
            if getattr(self, name) <= 0:
                raise StageError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.temperature < 0:
            raise StageError(f"temperature must be >= 0, got {self.temperature}")
        if self.samples is not None and self.samples < 2:
            raise StageError(
                f"samples must be at least 2 (a train and a validation prompt), got {self.samples}"
            )
        if not 0 < self.validation_fraction < 1:
            raise StageError(
                f"validation_fraction must be in (0, 1), got {self.validation_fraction}"
            )

"""The serving container's settings, read from its environment as SageMaker containers are
configured: the model package's container ``Environment``, or CreateModel's.

| variable                        | default      | meaning                                        |
|---------------------------------|--------------|------------------------------------------------|
| ``SAGEMAKER_BIND_TO_PORT``      | 8080         | the port SageMaker sends /ping and /invocations to |
| ``SAGEMAKER_BASE_DIR``          | /opt/ml      | the model is read from its ``model/`` folder   |
| ``SAGEMAKER_MAX_PAYLOAD_IN_MB`` | 6            | largest request body (InvokeEndpoint's limit)  |
| ``SERVING_HOST``                | 0.0.0.0      | the address to listen on (127.0.0.1 locally)   |
| ``SERVING_MAX_INPUT_TOKENS``    | 2048         | longest prompt, in tokens (also capped by the model's context) |
| ``SERVING_MAX_NEW_TOKENS``      | 512          | most tokens a request may ask to generate      |
| ``SERVING_DEFAULT_MAX_NEW_TOKENS`` | 128       | tokens generated when a request names none     |
| ``SERVING_MAX_STOP_SEQUENCES``  | 4            | most stop sequences per request                |
| ``SERVING_MAX_TEMPERATURE``     | 2.0          | highest sampling temperature                   |
| ``SERVING_MERGE_LORA``          | true         | merge a single LoRA adapter into its base at load (faster); false serves it through PEFT |
| ``SERVING_DTYPE``               | auto         | weights' dtype: auto (fp32 on a CPU, bf16 or fp16 on a GPU), fp32, bf16, fp16 |
| ``SERVING_TRUST_REMOTE_CODE``   | false        | run code the model ships (``auto_map``): only for code you trust |
| ``SERVING_ALLOW_UNSAFE_WEIGHTS`` | false       | load pickle-based weights when there are no safetensors |

The port, folder and payload variables are those of SageMaker's inference toolkit; the
``SERVING_`` ones are this container's. SageMaker ends an invocation that has not answered within
60 s: keep ``SERVING_MAX_NEW_TOKENS`` within what the instance type generates in that time.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from steps.common.knobs import StageError

DTYPES = ("auto", "fp32", "bf16", "fp16")


@dataclass(frozen=True)
class Settings:
    model_dir: Path
    host: str = "0.0.0.0"
    port: int = 8080
    max_payload_bytes: int = 6 * 2**20
    max_input_tokens: int = 2048
    max_new_tokens: int = 512
    default_max_new_tokens: int = 128
    max_stop_sequences: int = 4
    max_temperature: float = 2.0
    merge_lora: bool = True
    dtype: str = "auto"
    trust_remote_code: bool = False
    allow_unsafe_weights: bool = False

    @classmethod
    def from_environment(cls, env: Mapping[str, str] = os.environ) -> Settings:
        """The settings `env` names; StageError naming the variable when a value is invalid."""
        base = Path(env.get("SAGEMAKER_BASE_DIR", "/opt/ml"))
        settings = cls(
            model_dir=base / "model",
            host=env.get("SERVING_HOST", cls.host),
            port=_integer(env, "SAGEMAKER_BIND_TO_PORT", cls.port, 1, 65535),
            max_payload_bytes=_integer(env, "SAGEMAKER_MAX_PAYLOAD_IN_MB", 6, 1, 1024) * 2**20,
            max_input_tokens=_integer(env, "SERVING_MAX_INPUT_TOKENS", cls.max_input_tokens, 1),
            max_new_tokens=_integer(env, "SERVING_MAX_NEW_TOKENS", cls.max_new_tokens, 1),
            default_max_new_tokens=_integer(env, "SERVING_DEFAULT_MAX_NEW_TOKENS",
                                            cls.default_max_new_tokens, 1),
            max_stop_sequences=_integer(env, "SERVING_MAX_STOP_SEQUENCES",
                                        cls.max_stop_sequences, 0),
            max_temperature=_number(env, "SERVING_MAX_TEMPERATURE", cls.max_temperature),
            merge_lora=_boolean(env, "SERVING_MERGE_LORA", cls.merge_lora),
            dtype=env.get("SERVING_DTYPE", cls.dtype),
            trust_remote_code=_boolean(env, "SERVING_TRUST_REMOTE_CODE", False),
            allow_unsafe_weights=_boolean(env, "SERVING_ALLOW_UNSAFE_WEIGHTS", False),
        )
        if settings.dtype not in DTYPES:
            raise StageError(f"SERVING_DTYPE={settings.dtype!r} is not one of {', '.join(DTYPES)}")
        if settings.default_max_new_tokens > settings.max_new_tokens:
            raise StageError(
                f"SERVING_DEFAULT_MAX_NEW_TOKENS={settings.default_max_new_tokens} is above "
                f"SERVING_MAX_NEW_TOKENS={settings.max_new_tokens}; lower it or raise the limit")
        return settings


def _integer(env: Mapping[str, str], name: str, default: int, low: int,
             high: int | None = None) -> int:
    text = env.get(name)
    if text is None or not text.strip():
        return default
    try:
        value = int(text)
    except ValueError:
        raise StageError(f"{name}={text!r} is not an integer") from None
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise StageError(f"{name}={value} must be {bound}")
    return value


def _number(env: Mapping[str, str], name: str, default: float) -> float:
    text = env.get(name)
    if text is None or not text.strip():
        return default
    try:
        value = float(text)
    except ValueError:
        raise StageError(f"{name}={text!r} is not a number") from None
    if not value > 0:
        raise StageError(f"{name}={value} must be > 0")
    return value


def _boolean(env: Mapping[str, str], name: str, default: bool) -> bool:
    text = env.get(name, "").strip().lower()
    if not text:
        return default
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    raise StageError(f"{name}={text!r} is not true or false")

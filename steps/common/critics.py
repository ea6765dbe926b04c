"""The models a stage asks for text: a local causal LM, a SageMaker endpoint, or Amazon Bedrock.

Constitutional AI asks a model to critique a response, to revise it, and to judge which of two
responses is better; all three are one call here, ``complete(prompts, temperature)``, answered by
whichever backend the stage is configured with:

  ``LocalModel``         a model spec loaded in the job (steps.common.models), prompted through its
                         chat template; also what generates the policy's own responses;
  ``SageMakerEndpoint``  a real-time endpoint serving Hugging Face TGI or the LMI container:
                         ``invoke_endpoint`` with ``{"inputs": ..., "parameters": {...}}`` and a
                         ``[{"generated_text": ...}]`` response;
  ``BedrockModel``       a Bedrock model through the ``converse`` API (one user message).

The remote backends send one request per prompt and retry throttling and transient service faults
with exponential backoff; every AWS failure they cannot get past (no credentials, an unreachable
endpoint, access denied, an unknown endpoint or model, retries exhausted) is one StageError line
naming the backend, the endpoint or model id and the region, and what to do. The region is the
stage's ``--region``, else the job's (``AWS_REGION``, which SageMaker sets, or
``AWS_DEFAULT_REGION``). boto3 honours ``AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME`` /
``AWS_ENDPOINT_URL_BEDROCK_RUNTIME`` as usual.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from time import sleep
from typing import TYPE_CHECKING, Any, Protocol

import torch

from steps.common import contract, models
from steps.common.contract import StageError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

# A prompt for a local model: text, or a conversation (a list of {"role", "content"} messages).
Prompt = str | list[dict[str, Any]]


class Critic(Protocol):
    """A model that answers prompts: critic, reviser and judge of Constitutional AI."""

    description: str  # for logs, errors and the manifest: "SageMaker endpoint 'x' in eu-west-1"

    def complete(self, prompts: Sequence[str], temperature: float) -> list[str]:
        """One answer per prompt (each prompt is a user message); temperature 0 is greedy."""
        ...


# --- A local model --------------------------------------------------------------------------------


class LocalModel:
    """A causal LM (or PEFT adapter) in this process, answering in batches.

    String prompts become one user turn of the chat template when the tokenizer has one (the rule
    SFT trains by), so an instruct model is asked in the format it knows; conversations always go
    through the template. A prompt longer than the model's context minus `max_new_tokens` keeps its
    end, where the request is, and the count of such cuts is kept in `truncated`.
    """

    def __init__(self, spec: str, max_new_tokens: int, batch_size: int = 8) -> None:
        self.spec = spec
        self.description = f"local model {spec}"
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.tokenizer: PreTrainedTokenizerBase = models.load_tokenizer(spec)
        self.model: PreTrainedModel = models.load_model(spec).eval()
        if torch.cuda.is_available():
            self.model.to("cuda")
        self.truncated = 0

    def complete(self, prompts: Sequence[Prompt], temperature: float) -> list[str]:
        texts = [self._render(prompt) for prompt in prompts]
        config = getattr(self.model, "config", None)
        context = getattr(config, "max_position_embeddings", None)
        limit = context - self.max_new_tokens if context else None
        if limit is not None and limit < 16:
            raise StageError(
                f"max_new_tokens={self.max_new_tokens} leaves no room for a prompt in "
                f"{self.spec}'s {context}-token context; lower max_new_tokens"
            )
        device = next(self.model.parameters()).device
        sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {
            "do_sample": False
        }
        answers: list[str] = []
        tokenizer = self.tokenizer
        # Left padding: every prompt of a batch ends where generation continues.
        padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
        try:
            for start in range(0, len(texts), self.batch_size):
                # verbose=False: the over-long warning is about prompts cut just below.
                ids = tokenizer(texts[start : start + self.batch_size], add_special_tokens=False,
                                verbose=False)["input_ids"]
                if limit is not None:
                    # Keep the end, where the critique, revision or judging request is.
                    self.truncated += sum(len(row) > limit for row in ids)
                    ids = [row[-limit:] for row in ids]
                batch = tokenizer.pad({"input_ids": ids}, return_tensors="pt").to(device)
                with torch.no_grad():
                    output = self.model.generate(
                        **batch,
                        max_new_tokens=self.max_new_tokens,
                        eos_token_id=models.stop_token_ids(self.model, tokenizer),
                        pad_token_id=tokenizer.pad_token_id,
                        **sampling,
                    )
                new_tokens = output[:, batch["input_ids"].shape[1] :]
                answers += [
                    text.strip()
                    for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
                ]
        finally:
            tokenizer.padding_side = padding_side
        return answers

    def _render(self, prompt: Prompt) -> str:
        # The chat template holds any special tokens itself: they are not added again.
        template = bool(self.tokenizer.chat_template)
        if isinstance(prompt, list) and not template:
            raise StageError(
                f"{self.spec} has no chat template, so it cannot answer conversations; use a chat "
                "model or give prompts as strings"
            )
        if not template:
            return prompt
        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )


# --- AWS backends ---------------------------------------------------------------------------------

# Error codes worth another try: throttling, a model still loading, transient service faults.
RETRYABLE_CODES = frozenset({
    "ThrottlingException", "Throttling", "TooManyRequestsException", "ModelNotReadyException",
    "ServiceUnavailable", "ServiceUnavailableException", "InternalFailure",
    "InternalServerException", "InternalDependencyException", "ModelTimeoutException",
})
CREDENTIAL_CODES = frozenset({
    "UnrecognizedClientException", "InvalidSignatureException", "ExpiredTokenException",
    "ExpiredToken", "InvalidClientTokenId",
})


def aws_client(service: str, region: str | None) -> Any:
    """A boto3 client of `service` in `region` (default: the job's, contract.aws_region); its own
    retries are off, since the backends retry (visibly)."""
    import boto3
    from botocore.config import Config

    if not region:
        try:
            region = contract.aws_region()
        except StageError:
            raise StageError(f"no AWS region for {service}: pass --region, or set AWS_REGION or "
                             "AWS_DEFAULT_REGION") from None
    # total_max_attempts: botocore's max_attempts counts retries, so max_attempts 1 still retried
    # each call once, unseen, after a back-off of up to a second.
    config = Config(
        retries={"mode": "standard", "total_max_attempts": 1}, connect_timeout=10,
        read_timeout=300)
    # A session of its own: boto3's default one keeps the first credentials it found.
    return boto3.session.Session().client(service, region_name=region, config=config)


class _AWSCritic:
    """What the SageMaker and Bedrock backends share: one request per prompt, retries, errors."""

    service = ""  # boto3 service name
    permission = ""  # the IAM action a caller needs, for the access-denied message
    target_option = ""  # the option that names the endpoint or model

    # botocore sends each call once (aws_client): these are the only retries, and they say so.
    max_attempts = 6  # throttling, a 5xx, a timed-out read or a reset connection
    connect_attempts = 2  # a service that cannot be reached at all
    base_delay_s = 1.0
    max_delay_s = 30.0

    def __init__(self, target: str, region: str | None, max_new_tokens: int,
                 client: Any = None) -> None:
        self.target = target
        self.max_new_tokens = max_new_tokens
        self.client = client or aws_client(self.service, region)
        self.region = self.client.meta.region_name
        self.retries = 0  # calls repeated after throttling or a transient fault, for the manifest

    def complete(self, prompts: Sequence[str], temperature: float) -> list[str]:
        answers = []
        for number, prompt in enumerate(prompts, start=1):
            answers.append(self._with_retries(prompt, temperature))
            if number % 10 == 0 or number == len(prompts):
                print(f"  {self.description}: {number}/{len(prompts)}", flush=True)
        return answers

    def _call(self, prompt: str, temperature: float) -> str:
        raise NotImplementedError

    def _with_retries(self, prompt: str, temperature: float) -> str:
        from botocore.exceptions import (
            ClientError,
            ConnectTimeoutError,
            CredentialRetrievalError,
            EndpointConnectionError,
            HTTPClientError,
            NoCredentialsError,
            PartialCredentialsError,
        )

        where = f"critic {self.description}"
        for attempt in range(1, self.max_attempts + 1):
            try:
                return self._call(prompt, temperature)
            except (NoCredentialsError, PartialCredentialsError, CredentialRetrievalError) as err:
                raise StageError(
                    f"{where}: no usable AWS credentials ({err}); give the job a role or set "
                    "AWS_PROFILE / AWS_ACCESS_KEY_ID, or use --critic local"
                ) from None
            except (EndpointConnectionError, ConnectTimeoutError) as err:
                # Tried twice (a blip), not six times: a wrong region or route fails every time.
                if attempt >= self.connect_attempts:
                    raise StageError(
                        f"{where}: cannot reach the service ({err}); check --region and the "
                        f"network route to {self.service} (a VPC endpoint in a private subnet)"
                    ) from None
                failure = f"cannot reach the service ({err})"
            except HTTPClientError as err:  # a read timeout, a kept-alive connection reset
                failure = f"the connection failed ({err})"
            except ClientError as err:
                code = err.response.get("Error", {}).get("Code", "")
                message = " ".join(str(err.response.get("Error", {}).get("Message", "")).split())
                failure = f"{code}: {message[:300]}"
                status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
                if code not in RETRYABLE_CODES and status < 500:  # a 5xx is the service's fault
                    raise StageError(f"{where}: {self._advice(code, failure)}") from None
            if attempt < self.max_attempts:
                delay = min(self.max_delay_s, self.base_delay_s * 2 ** (attempt - 1))
                delay *= random.uniform(0.5, 1.0)  # jitter: parallel jobs do not retry in step
                print(f"  {where}: {failure}; retrying in {delay:.1f} s "
                      f"(attempt {attempt + 1} of {self.max_attempts})", flush=True)
                self.retries += 1
                sleep(delay)
        raise StageError(
            f"{where}: still failing after {self.max_attempts} attempts ({failure}); lower the "
            "request rate (fewer --samples), raise the quota, or try again later"
        )

    def _advice(self, code: str, failure: str) -> str:
        if code in ("AccessDeniedException", "AccessDenied"):
            return (f"access denied ({failure}); allow {self.permission} on it for the job's role"
                    + ("" if self.service != "bedrock-runtime"
                       else " and enable access to the model in the Bedrock console"))
        if code in CREDENTIAL_CODES:
            return f"AWS rejected the credentials ({failure}); refresh or replace them"
        if code in ("ValidationError", "ValidationException", "ResourceNotFoundException"):
            return (f"request refused ({failure}); check {self.target_option} and --region "
                    "(the endpoint or model must exist in that region)")
        if code in ("ModelError", "ModelErrorException"):
            return f"the model failed ({failure}); see the model's logs in CloudWatch"
        return f"request failed ({failure})"


class SageMakerEndpoint(_AWSCritic):
    """A SageMaker real-time endpoint serving a text-generation container (TGI or LMI).

    The prompt goes as plain text in ``inputs``: the container does not apply a chat template.
    """

    service = "sagemaker-runtime"
    permission = "sagemaker:InvokeEndpoint"
    target_option = "--endpoint-name"

    @property
    def description(self) -> str:
        return f"SageMaker endpoint '{self.target}' in {self.region}"

    def request_body(self, prompt: str, temperature: float) -> dict[str, Any]:
        # TGI refuses temperature 0 ("must be strictly positive"): greedy is do_sample false.
        parameters: dict[str, Any] = {
            "max_new_tokens": self.max_new_tokens,
            "do_sample": temperature > 0,
            "return_full_text": False,
        }
        if temperature > 0:
            parameters["temperature"] = temperature
        return {"inputs": prompt, "parameters": parameters}

    def _call(self, prompt: str, temperature: float) -> str:
        response = self.client.invoke_endpoint(
            EndpointName=self.target,
            ContentType="application/json",
            Accept="application/json",
            Body=json.dumps(self.request_body(prompt, temperature)),
        )
        raw = response["Body"].read()
        try:
            payload = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError):
            payload = None
        # TGI answers [{"generated_text": ...}]; LMI and some handlers a bare object.
        if isinstance(payload, list) and payload:
            payload = payload[0]
        if not isinstance(payload, dict) or not isinstance(payload.get("generated_text"), str):
            shown = raw[:200].decode("utf-8", "replace")
            raise StageError(
                f"critic {self.description}: unexpected response {shown!r}; the endpoint must "
                'serve text generation answering [{"generated_text": ...}] (TGI or LMI)'
            )
        # A container that ignores return_full_text echoes the prompt first.
        return payload["generated_text"].removeprefix(prompt).strip()


class BedrockModel(_AWSCritic):
    """A model on Amazon Bedrock, through the model-agnostic ``converse`` API."""

    service = "bedrock-runtime"
    permission = "bedrock:InvokeModel"
    target_option = "--bedrock-model-id"

    @property
    def description(self) -> str:
        return f"Bedrock model '{self.target}' in {self.region}"

    def _call(self, prompt: str, temperature: float) -> str:
        response = self.client.converse(
            modelId=self.target,
            messages=[{"role": "user", "content": [{"text": prompt}]}],
            inferenceConfig={"maxTokens": self.max_new_tokens, "temperature": temperature},
        )
        blocks = response.get("output", {}).get("message", {}).get("content", [])
        return "".join(block.get("text", "") for block in blocks).strip()

"""An /invocations request, checked: the two body formats of SageMaker's LLM containers, the
headers SageMaker forwards, and the limits of serving.settings.

The formats, as TGI and LMI take them on SageMaker:

  - generation: ``{"inputs": "text", "parameters": {"max_new_tokens", "temperature", "top_p",
    "top_k", "do_sample", "stop", "seed", "repetition_penalty", "return_full_text", "details",
    "adapter_id"}, "stream": false}``; the text is the prompt as given (no chat template).
    Sampling happens with ``do_sample`` or when temperature, top_p or top_k is given (TGI's rule);
    otherwise decoding is greedy.
  - messages (OpenAI's chat completions): ``{"messages": [{"role", "content"}], "max_tokens",
    "temperature", "top_p", "stop", "seed", "stream", "model", "n": 1}``; the model's chat
    template is applied. Temperature 0 or none is greedy decoding.

The tenant (the adapter answering, on a multi-tenant endpoint) is named by SageMaker's
CustomAttributes header (``X-Amzn-SageMaker-Custom-Attributes: tenant=NAME``; other ``key=value``
pairs, separated by ``;`` or ``,``, are left alone), or in the body as TGI names adapters:
``parameters.adapter_id``, or ``model`` in the messages format.

Every refusal is a RequestError whose message is one line saying which field was wrong and the
limit or the accepted values.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from typing import Any, Literal

from serving.settings import Settings

CUSTOM_ATTRIBUTES_HEADER = "X-Amzn-SageMaker-Custom-Attributes"
CUSTOM_ATTRIBUTES_MAX = 1024  # InvokeEndpoint's limit on CustomAttributes
ROLES = ("system", "user", "assistant")
JSON = "application/json"
EVENT_STREAM = "text/event-stream"

GENERATE_FIELDS = ("inputs", "parameters", "stream")
PARAMETERS = ("max_new_tokens", "temperature", "top_p", "top_k", "do_sample", "stop", "seed",
              "repetition_penalty", "return_full_text", "details", "adapter_id")
CHAT_FIELDS = ("messages", "max_tokens", "temperature", "top_p", "stop", "seed", "stream",
               "model", "n")


class RequestError(Exception):
    """A request the endpoint refuses: an HTTP status (4xx) and a one-line reason."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(" ".join(message.split()))
        self.status = status


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int
    do_sample: bool = False
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    repetition_penalty: float | None = None


@dataclass(frozen=True)
class GenerationRequest:
    api: Literal["generate", "chat"]
    sampling: Sampling
    inputs: str | None = None
    messages: tuple[dict[str, str], ...] = ()
    stream: bool = False
    tenant: str | None = None  # named explicitly: header, parameters.adapter_id
    model: str | None = None  # the messages format's `model`: a tenant only if it names one
    return_full_text: bool = False
    details: bool = False


def parse(body: bytes, content_type: str | None, accept: str | None,
          custom_attributes: str | None, settings: Settings) -> GenerationRequest:
    """The request in `body` and its headers; RequestError when it cannot be served."""
    _check_content_type(content_type)
    try:
        document = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError:
        raise RequestError(400, "request body is not UTF-8 text; send JSON") from None
    except json.JSONDecodeError as err:
        raise RequestError(400, f"request body is not valid JSON ({err.msg} at line {err.lineno} "
                                f"column {err.colno}); send a JSON object") from None
    if not isinstance(document, dict):
        raise RequestError(422, f"request body is a JSON {_kind(document)}; send an object with "
                                "\"inputs\" (text generation) or \"messages\" (chat)")
    if "inputs" in document and "messages" in document:
        raise RequestError(422, "request has both \"inputs\" and \"messages\"; send one")
    header_tenant = _tenant_attribute(custom_attributes)
    if "messages" in document:
        request = _chat(document, settings)
    elif "inputs" in document:
        request = _generate(document, settings)
    else:
        raise RequestError(422, "request has neither \"inputs\" (text generation) nor "
                                "\"messages\" (chat); send one of them")
    _check_accept(accept, request.stream)
    if header_tenant is not None:
        if request.tenant is not None and request.tenant != header_tenant:
            raise RequestError(422, f"CustomAttributes names tenant {header_tenant!r} and the "
                                    f"body names {request.tenant!r}; name one")
        request = replace(request, tenant=header_tenant)
    return request


# --- The two formats ------------------------------------------------------------------------------


def _generate(document: dict, settings: Settings) -> GenerationRequest:
    _check_fields(document, GENERATE_FIELDS, "", "the text generation format")
    inputs = document["inputs"]
    if not isinstance(inputs, str) or not inputs:
        raise RequestError(422, f"field \"inputs\" must be a non-empty string, got "
                                f"{_shown(inputs)}")
    parameters = document.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise RequestError(422, f"field \"parameters\" must be an object, got {_shown(parameters)}")
    _check_fields(parameters, PARAMETERS, "parameters.", "parameters")
    get = _Reader(parameters, "parameters.")
    temperature = get.number("temperature", low=0.0, high=settings.max_temperature,
                             low_open=True, limit="SERVING_MAX_TEMPERATURE")
    top_p = get.number("top_p", low=0.0, high=1.0, low_open=True)
    top_k = get.integer("top_k", low=1)
    do_sample = get.boolean("do_sample")
    stop = get.stop(settings)
    tenant = get.string("adapter_id")
    sampling = Sampling(
        max_new_tokens=get.max_new_tokens("max_new_tokens", settings),
        # TGI's rule: a sampling parameter means sampling, even without do_sample.
        do_sample=bool(do_sample) or any(v is not None for v in (temperature, top_p, top_k)),
        temperature=temperature, top_p=top_p, top_k=top_k, stop=stop,
        seed=get.integer("seed", low=0), repetition_penalty=get.number(
            "repetition_penalty", low=0.0, high=None, low_open=True),
    )
    return GenerationRequest(
        api="generate", sampling=sampling, inputs=inputs,
        stream=_Reader(document, "").boolean("stream") or False, tenant=tenant,
        return_full_text=get.boolean("return_full_text") or False,
        details=get.boolean("details") or False,
    )


def _chat(document: dict, settings: Settings) -> GenerationRequest:
    _check_fields(document, CHAT_FIELDS, "", "the messages format")
    messages = document["messages"]
    if not isinstance(messages, list) or not messages:
        raise RequestError(422, f"field \"messages\" must be a non-empty list of "
                                f"{{\"role\", \"content\"}} objects, got {_shown(messages)}")
    checked = tuple(_message(message, index) for index, message in enumerate(messages))
    get = _Reader(document, "")
    n = get.integer("n", low=1)
    if n not in (None, 1):
        raise RequestError(422, f"field \"n\" is {n}; this endpoint returns one choice (n = 1)")
    temperature = get.number("temperature", low=0.0, high=settings.max_temperature,
                             limit="SERVING_MAX_TEMPERATURE")
    top_p = get.number("top_p", low=0.0, high=1.0, low_open=True)
    sampling = Sampling(
        max_new_tokens=get.max_new_tokens("max_tokens", settings),
        do_sample=bool(temperature),  # none or 0: greedy, as OpenAI's temperature 0
        temperature=temperature or None, top_p=top_p if temperature else None,
        stop=get.stop(settings), seed=get.integer("seed", low=0),
    )
    return GenerationRequest(api="chat", sampling=sampling, messages=checked,
                             stream=get.boolean("stream") or False, model=get.string("model"))


def _message(message: Any, index: int) -> dict[str, str]:
    where = f"messages[{index}]"
    if not isinstance(message, dict):
        raise RequestError(422, f"field \"{where}\" must be an object with \"role\" and "
                                f"\"content\", got {_shown(message)}")
    _check_fields(message, ("role", "content"), f"{where}.", "a message")
    role, content = message.get("role"), message.get("content")
    if role not in ROLES:
        raise RequestError(422, f"field \"{where}.role\" is {_shown(role)}; it must be one of "
                                f"{', '.join(ROLES)}")
    if isinstance(content, list):  # OpenAI's content parts: text ones only
        parts = []
        for k, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") == "text"
                    and isinstance(part.get("text"), str)):
                raise RequestError(422, f"field \"{where}.content[{k}]\" must be a text part "
                                        "{\"type\": \"text\", \"text\": \"...\"}; this endpoint "
                                        "serves a text model")
            parts.append(part["text"])
        content = "".join(parts)
    if not isinstance(content, str):
        raise RequestError(422, f"field \"{where}.content\" must be a string, got "
                                f"{_shown(content)}")
    return {"role": role, "content": content}


# --- Fields ---------------------------------------------------------------------------------------


class _Reader:
    """Typed, range-checked reads of an object's optional fields, named by their path."""

    def __init__(self, values: dict, prefix: str) -> None:
        self.values, self.prefix = values, prefix

    def _get(self, name: str) -> Any:
        return self.values.get(name)  # null reads as absent, as TGI and OpenAI take it

    def _bad(self, name: str, value: Any, wanted: str) -> RequestError:
        return RequestError(422, f"field \"{self.prefix}{name}\" must be {wanted}, got "
                                 f"{_shown(value)}")

    def boolean(self, name: str) -> bool | None:
        value = self._get(name)
        if value is not None and not isinstance(value, bool):
            raise self._bad(name, value, "true or false")
        return value

    def string(self, name: str) -> str | None:
        value = self._get(name)
        if value is not None and (not isinstance(value, str) or not value):
            raise self._bad(name, value, "a non-empty string")
        return value

    def integer(self, name: str, low: int, high: int | None = None,
                limit: str = "") -> int | None:
        value = self._get(name)
        if value is None:
            return None
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._bad(name, value, "an integer")
        if value < low or (high is not None and value > high):
            raise RequestError(422, f"field \"{self.prefix}{name}\" is {value}; "
                                    + _range_text(low, high, False, limit))
        return value

    def number(self, name: str, low: float, high: float | None, low_open: bool = False,
               limit: str = "") -> float | None:
        value = self._get(name)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(
                value):
            raise self._bad(name, value, "a number")
        if value < low or (low_open and value == low) or (high is not None and value > high):
            raise RequestError(422, f"field \"{self.prefix}{name}\" is {value:g}; "
                                    + _range_text(low, high, low_open, limit))
        return float(value)

    def max_new_tokens(self, name: str, settings: Settings) -> int:
        value = self.integer(name, low=1, high=settings.max_new_tokens,
                             limit="SERVING_MAX_NEW_TOKENS")
        return settings.default_max_new_tokens if value is None else value

    def stop(self, settings: Settings) -> tuple[str, ...]:
        value = self._get("stop")
        if value is None:
            return ()
        sequences = [value] if isinstance(value, str) else value
        if not isinstance(sequences, list) or not all(isinstance(s, str) and s for s in sequences):
            raise self._bad("stop", value, "a non-empty string or a list of them")
        if len(sequences) > settings.max_stop_sequences:
            raise RequestError(422, f"field \"{self.prefix}stop\" has {len(sequences)} sequences; "
                                    f"the limit is {settings.max_stop_sequences} "
                                    "(SERVING_MAX_STOP_SEQUENCES)")
        return tuple(sequences)


def _range_text(low: float, high: float | None, low_open: bool, limit: str) -> str:
    lower = f"> {low:g}" if low_open else f">= {low:g}"
    text = f"it must be {lower}" + (f" and <= {high:g}" if high is not None else "")
    return text + (f" ({limit})" if limit else "")


def _check_fields(values: dict, known: tuple[str, ...], prefix: str, what: str) -> None:
    for name in values:
        if name not in known:
            raise RequestError(422, f"unknown field \"{prefix}{name}\"; {what} takes "
                                    f"{', '.join(known)}")


def _shown(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _kind(value: Any) -> str:
    return {list: "list", str: "string", int: "number", float: "number", bool: "boolean",
            type(None): "null"}.get(type(value), type(value).__name__)


# --- Headers --------------------------------------------------------------------------------------


def _media_type(header: str) -> str:
    return header.split(";", 1)[0].strip().lower()


def _check_content_type(content_type: str | None) -> None:
    if content_type is None or _media_type(content_type) != JSON:
        shown = f"Content-Type {content_type!r}" if content_type else "no Content-Type"
        raise RequestError(415, f"{shown}: send the request as {JSON}")


def _check_accept(accept: str | None, stream: bool) -> None:
    answers = EVENT_STREAM if stream else JSON
    if not accept:
        return
    for media_range in accept.split(","):
        wanted = _media_type(media_range)
        if wanted in ("*/*", answers, answers.split("/")[0] + "/*"):
            return
    raise RequestError(406, f"Accept {accept!r}: this request is answered as {answers}"
                            + ("" if stream else f" ({EVENT_STREAM} with \"stream\": true)"))


def _tenant_attribute(custom_attributes: str | None) -> str | None:
    """The `tenant=NAME` pair of a CustomAttributes header; other pairs are someone else's."""
    if not custom_attributes:
        return None
    if len(custom_attributes) > CUSTOM_ATTRIBUTES_MAX:
        raise RequestError(400, f"{CUSTOM_ATTRIBUTES_HEADER} is {len(custom_attributes)} "
                                f"characters; the limit is {CUSTOM_ATTRIBUTES_MAX}")
    for pair in custom_attributes.replace(",", ";").split(";"):
        key, sep, value = pair.partition("=")
        if sep and key.strip() == "tenant":
            if not value.strip():
                raise RequestError(422, f"{CUSTOM_ATTRIBUTES_HEADER} has an empty tenant; write "
                                        "tenant=NAME")
            return value.strip()
    return None

"""Answering one checked request with the served model: the prompt's tokens and their limits,
the tenant's adapter, decoding, stop sequences, and streaming.

Requests run one at a time: a tenant's adapter is a setting of the one shared model, and on a CPU
a second generation at once would only split the same cores. transformers' ``generate`` does the
decoding; what is written here is what it lacks for serving: the limits a request is refused by,
trimming at a stop sequence, and a stream that never shows part of a stop sequence.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from serving.model import ServedModel
from serving.requests import GenerationRequest, RequestError
from serving.settings import Settings
from steps.common import models


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: str  # "eos_token", "stop_sequence" or "length", as TGI reports it
    prompt_tokens: int
    completion_tokens: int
    seed: int | None = None


class Generator:
    def __init__(self, served: ServedModel, settings: Settings) -> None:
        self.served, self.settings = served, settings
        self.stop_ids = models.stop_token_ids(served.model, served.tokenizer)
        self._lock = threading.Lock()

    # --- Checks before any work ---

    def prompt_ids(self, request: GenerationRequest) -> torch.Tensor:
        """The prompt's token ids (1 x n); RequestError when it is over a limit."""
        tokenizer = self.served.tokenizer
        if request.api == "chat":
            if not tokenizer.chat_template:
                raise RequestError(422, "this model has no chat template, so the messages format "
                                        "cannot be rendered; send {\"inputs\": \"...\"} instead")
            text = tokenizer.apply_chat_template(list(request.messages), tokenize=False,
                                                 add_generation_prompt=True)
            ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        else:
            ids = tokenizer(request.inputs, return_tensors="pt")["input_ids"]
        count, wanted = ids.shape[1], request.sampling.max_new_tokens
        if count > self.settings.max_input_tokens:
            raise RequestError(422, f"the prompt is {count} tokens; the limit is "
                                    f"{self.settings.max_input_tokens} (SERVING_MAX_INPUT_TOKENS)")
        context = self.served.context_length
        if context is not None and count + wanted > context:
            raise RequestError(422, f"the prompt's {count} tokens and {wanted} new tokens exceed "
                                    f"the model's context of {context} tokens; ask for at most "
                                    f"{max(context - count, 0)} new tokens or shorten the prompt")
        return ids

    def adapter(self, request: GenerationRequest) -> str | None:
        """The PEFT adapter that answers `request` (None: the one model answers everyone)."""
        tenants = self.served.tenants
        if not tenants:
            if request.tenant is not None:
                raise RequestError(422, f"tenant {request.tenant!r} was named, but this endpoint "
                                        "serves one model, not tenants; name none")
            return None
        named = request.tenant or (request.model if request.model in tenants else None)
        if named is None:
            field = "parameters.adapter_id" if request.api == "generate" else "model"
            raise RequestError(422, f"this endpoint serves tenants {', '.join(tenants)}: name one "
                                    f"with CustomAttributes tenant=NAME or the field \"{field}\"")
        if named not in tenants:
            raise RequestError(422, f"unknown tenant {named!r}; this endpoint serves "
                                    f"{', '.join(tenants)}")
        return tenants[named]

    # --- Generation ---

    def complete(self, request: GenerationRequest) -> Completion:
        """The whole answer to `request`."""
        ids, adapter = self.prompt_ids(request), self.adapter(request)
        with self._lock:
            seed = self._prepare(request, adapter)
            with torch.inference_mode():
                output = self.served.model.generate(
                    input_ids=ids.to(self.served.device),
                    attention_mask=torch.ones_like(ids).to(self.served.device),
                    **self._generate_arguments(request))
        new = output[0, ids.shape[1]:].tolist()
        return self._completion(request, new, ids.shape[1], seed)

    def stream(self, request: GenerationRequest,
               cancelled: threading.Event) -> Iterator[str | Completion]:
        """The answer as text pieces while it is generated, then its Completion. Setting
        `cancelled` (the client went away) stops the generation at the next token."""
        from transformers import StoppingCriteria, StoppingCriteriaList

        class Cancelled(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs) -> bool:
                return cancelled.is_set()

        ids, adapter = self.prompt_ids(request), self.adapter(request)
        streamer = TokenStreamer(self.served.tokenizer)
        produced: dict = {}

        def run() -> None:
            try:
                with torch.inference_mode():
                    produced["output"] = self.served.model.generate(
                        input_ids=ids.to(self.served.device),
                        attention_mask=torch.ones_like(ids).to(self.served.device),
                        streamer=streamer, stopping_criteria=StoppingCriteriaList([Cancelled()]),
                        **self._generate_arguments(request))
            except BaseException as err:  # noqa: BLE001 (re-raised in the caller's thread)
                produced["error"] = err
                streamer.end()

        with self._lock:
            seed = self._prepare(request, adapter)
            worker = threading.Thread(target=run, daemon=True)
            worker.start()
            try:
                yield from _held_back(streamer, request.sampling.stop)
            finally:
                cancelled.set()  # a consumer that stopped early (client gone) ends the generation
                worker.join()
        if "error" in produced:
            raise produced["error"]
        new = produced["output"][0, ids.shape[1]:].tolist()
        yield self._completion(request, new, ids.shape[1], seed)

    def _prepare(self, request: GenerationRequest, adapter: str | None) -> int | None:
        """Switch to the request's adapter and seed sampling; the seed used (None: greedy)."""
        if adapter is not None:
            self.served.model.set_adapter(adapter)
        if not request.sampling.do_sample:
            return None
        seed = request.sampling.seed
        if seed is None:
            seed = random.SystemRandom().randrange(2**32)
        torch.manual_seed(seed)
        return seed

    def _generate_arguments(self, request: GenerationRequest) -> dict:
        from transformers import GenerationConfig

        sampling = request.sampling
        # A fresh config, so the model's own sampling defaults never apply unasked.
        config = GenerationConfig(
            max_new_tokens=sampling.max_new_tokens, do_sample=sampling.do_sample,
            eos_token_id=self.stop_ids, pad_token_id=self.served.tokenizer.pad_token_id,
            repetition_penalty=sampling.repetition_penalty or 1.0,
            **({"temperature": sampling.temperature or 1.0, "top_p": sampling.top_p or 1.0,
                "top_k": sampling.top_k or 0} if sampling.do_sample else {}),
            **({"stop_strings": list(sampling.stop)} if sampling.stop else {}),
        )
        arguments: dict = {"generation_config": config}
        if sampling.stop:
            arguments["tokenizer"] = self.served.tokenizer  # generate matches stop strings with it
        return arguments

    def _completion(self, request: GenerationRequest, new: list[int], prompt_tokens: int,
                    seed: int | None) -> Completion:
        text = self.served.tokenizer.decode(new, skip_special_tokens=True)
        cut = _first_stop(text, request.sampling.stop)
        if cut is not None:
            text, reason = text[:cut], "stop_sequence"
        elif new and new[-1] in self.stop_ids:
            reason = "eos_token"
        else:
            reason = "length"
        return Completion(text, reason, prompt_tokens, len(new), seed)


class TokenStreamer:
    """Text pieces as generate produces tokens, one per token that completes some text.

    transformers' TextIteratorStreamer holds text back until a word ends, which delays the first
    piece by a few tokens; this decodes the way TGI does instead: the new tokens against the few
    before them (so that a token's leading space or a multi-byte character comes out right),
    keeping back only a piece that ends in an incomplete character.
    """

    def __init__(self, tokenizer) -> None:
        import queue

        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = self.read = 0  # decode ids[prefix:] and show what ids[prefix:read] lacks
        self.queue: queue.Queue[str | None] = queue.Queue()
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate's first call carries the prompt
            self.prompt_seen = True
            return
        self.ids.extend(value.reshape(-1).tolist())
        decode = self.tokenizer.decode
        before = decode(self.ids[self.prefix:self.read], skip_special_tokens=True)
        text = decode(self.ids[self.prefix:], skip_special_tokens=True)
        if len(text) > len(before) and not text.endswith("\ufffd"):
            self.queue.put(text[len(before):])
            self.prefix, self.read = self.read, len(self.ids)

    def end(self) -> None:
        decode = self.tokenizer.decode
        before = decode(self.ids[self.prefix:self.read], skip_special_tokens=True)
        text = decode(self.ids[self.prefix:], skip_special_tokens=True)
        if len(text) > len(before):  # what an incomplete character held back, as it is
            self.queue.put(text[len(before):])
        self.queue.put(None)

    def __iter__(self) -> Iterator[str]:
        while (piece := self.queue.get()) is not None:
            yield piece


def _first_stop(text: str, stops: tuple[str, ...]) -> int | None:
    """Where the earliest stop sequence in `text` starts (the answer ends before it, as OpenAI's
    does), or None."""
    found = [index for index in (text.find(stop) for stop in stops) if index >= 0]
    return min(found) if found else None


def _held_back(pieces: Iterator[str], stops: tuple[str, ...]) -> Iterator[str]:
    """`pieces` as they come, minus any stop sequence and what follows it: the last
    (longest stop - 1) characters wait until they cannot be the start of one."""
    keep = max((len(stop) for stop in stops), default=1) - 1
    text, sent = "", 0
    for piece in pieces:
        text += piece
        cut = _first_stop(text, stops)
        if cut is not None:
            if cut > sent:
                yield text[sent:cut]
            sent = len(text)
            for _ in pieces:  # let the generation finish; nothing more is shown
                pass
            return
        ready = len(text) - keep
        if ready > sent:
            yield text[sent:ready]
            sent = ready
    if len(text) > sent:
        yield text[sent:]

"""The serving container's HTTP contract, on a LoRA package trained on tiny data: /ping, both
request formats, streaming, stop sequences, refusals, and a model that cannot load."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from steps.common import models
from tests.serving.endpoints import LORA_ANSWER, chat, get, post, running

ROOT_ENV = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}


@pytest.fixture(scope="module")
def endpoint(lora_adapter):
    with running(lora_adapter) as served:
        yield served


def test_ping_answers_200_once_the_model_is_loaded(endpoint):
    assert get(endpoint.url, "/ping") == (200, b"")
    assert endpoint.server.generator.served.kind == "LoRA adapter, merged into its base"


def test_the_text_generation_format_answers_a_list_with_the_generated_text(endpoint):
    status, body = post(endpoint.url, {"inputs": "Hello", "parameters": {"max_new_tokens": 5,
                                                                         "details": True}})

    answer = json.loads(body)
    assert status == 200 and isinstance(answer, list) and len(answer) == 1
    assert isinstance(answer[0]["generated_text"], str)
    assert answer[0]["details"]["generated_tokens"] <= 5
    assert answer[0]["details"]["finish_reason"] in ("eos_token", "length")


def test_the_messages_format_answers_a_chat_completion_with_usage(endpoint):
    answer = chat(endpoint.url, "Question 3?", max_tokens=12)

    assert answer["object"] == "chat.completion"
    choice = answer["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": LORA_ANSWER}
    assert choice["finish_reason"] == "stop"  # it ended at its end-of-turn token, not the limit
    usage = answer["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert 0 < usage["completion_tokens"] <= 12 and usage["prompt_tokens"] > len("Question 3?")


def test_the_tuned_model_answers_differently_from_its_base(endpoint, lora_adapter):
    # The base the package carries, served alone: the same prompt, another answer.
    with running(lora_adapter / models.BUNDLED_BASE) as base:
        untuned = chat(base.url, "Question 3?", max_tokens=8)["choices"][0]["message"]["content"]
    tuned = chat(endpoint.url, "Question 3?", max_tokens=8)["choices"][0]["message"]["content"]

    assert tuned == LORA_ANSWER and untuned != tuned


def test_an_unmerged_lora_adapter_answers_as_the_merged_one(endpoint, lora_adapter):
    with running(lora_adapter, merge_lora=False) as peft:
        assert peft.server.generator.served.kind == "LORA adapter over its base (PEFT)"
        unmerged = chat(peft.url, "Question 7?", max_tokens=8)

    merged = chat(endpoint.url, "Question 7?", max_tokens=8)
    assert unmerged["choices"][0]["message"] == merged["choices"][0]["message"]


def test_a_streamed_answer_is_the_whole_answer_in_pieces(endpoint):
    status, body = post(endpoint.url, {"messages": [{"role": "user", "content": "Question 5?"}],
                                       "max_tokens": 12, "stream": True})

    events = [line[len("data: "):] for line in body.decode().splitlines()
              if line.startswith("data: ")]
    assert status == 200 and events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    whole = chat(endpoint.url, "Question 5?", max_tokens=12)
    assert text == whole["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["usage"] == whole["usage"]


def test_an_answer_ends_before_its_stop_sequence_streamed_or_not(endpoint):
    status, body = post(endpoint.url, {"inputs": "<|im_start|>user\nQuestion 1?<|im_end|>\n"
                                                 "<|im_start|>assistant\n",
                                       "parameters": {"stop": [" ok"], "details": True}})
    answer = json.loads(body)[0]
    assert status == 200 and answer["generated_text"] == "ok"
    assert answer["details"]["finish_reason"] == "stop_sequence"

    status, body = post(endpoint.url, {"messages": [{"role": "user", "content": "Question 1?"}],
                                       "stop": " ok", "stream": True})
    pieces = [json.loads(line[6:])["choices"][0]["delta"].get("content", "")
              for line in body.decode().splitlines()
              if line.startswith("data: {")]
    assert "".join(pieces) == "ok"


def test_sampling_with_a_seed_repeats_its_answer(endpoint):
    request = {"inputs": "Question 2?", "parameters": {"max_new_tokens": 6, "temperature": 1.5,
                                                       "seed": 7, "details": True}}
    first, again = (json.loads(post(endpoint.url, request)[1])[0] for _ in range(2))
    assert first == again and first["details"]["seed"] == 7


@pytest.mark.parametrize("body, headers, status, says", [
    (b'{"inputs": "Hi",', {}, 400, "request body is not valid JSON"),
    ({"inputs": "Hi", "parameters": {"max_new_tokens": 100000}}, {}, 422,
     ('field "parameters.max_new_tokens" is 100000; it must be >= 1 and <= 512 '
      "(SERVING_MAX_NEW_TOKENS)")),
    ({"inputs": "Hi", "parameters": {"temperature": 9}}, {}, 422,
     'field "parameters.temperature" is 9; it must be > 0 and <= 2 (SERVING_MAX_TEMPERATURE)'),
    ({"inputs": "Hi", "parameters": {"top_p": 0}}, {}, 422,
     'field "parameters.top_p" is 0; it must be > 0 and <= 1'),
    ({"inputs": "Hi", "parameters": {"stop": ["a", "b", "c", "d", "e"]}}, {}, 422,
     'field "parameters.stop" has 5 sequences; the limit is 4 (SERVING_MAX_STOP_SEQUENCES)'),
    ({"inputs": "Hi", "parameters": {"max_tokens": 5}}, {}, 422,
     'unknown field "parameters.max_tokens"; parameters takes max_new_tokens, temperature'),
    ({"prompt": "Hi"}, {}, 422, 'request has neither "inputs" (text generation) nor "messages"'),
    ({"inputs": "Hi", "stream": "yes"}, {}, 422, 'field "stream" must be true or false, got "yes"'),
    ({"messages": [{"role": "robot", "content": "Hi"}]}, {}, 422,
     'field "messages[0].role" is "robot"; it must be one of system, user, assistant'),
    ({"inputs": "x" * 600}, {}, 422,
     "the prompt's 600 tokens and 128 new tokens exceed the model's context of 512 tokens"),
    ({"inputs": "Hi"}, {"Content-Type": "text/csv"}, 415,
     "Content-Type 'text/csv': send the request as application/json"),
    ({"inputs": "Hi"}, {"Accept": "text/csv"}, 406,
     "Accept 'text/csv': this request is answered as application/json"),
    ({"inputs": "Hi"}, {"X-Amzn-SageMaker-Custom-Attributes": "tenant=acme"}, 422,
     "tenant 'acme' was named, but this endpoint serves one model, not tenants"),
])
def test_a_bad_request_gets_a_4xx_whose_body_says_on_one_line_what_and_the_limit(
        endpoint, body, headers, status, says):
    got, answer = post(endpoint.url, body, headers)

    assert got == status
    assert answer.count(b"\n") == 0 and b"Traceback" not in answer
    message = json.loads(answer)["error"]
    assert says in message, message


def test_a_prompt_over_the_input_limit_names_the_limit(lora_adapter):
    with running(lora_adapter, max_input_tokens=16) as small:
        status, body = post(small.url, {"inputs": "x" * 40})
    assert status == 422
    assert json.loads(body)["error"] == ("the prompt is 40 tokens; the limit is 16 "
                                         "(SERVING_MAX_INPUT_TOKENS)")


def test_a_body_over_the_payload_limit_is_refused_unread(lora_adapter):
    with running(lora_adapter, max_payload_bytes=1000) as small:
        status, body = post(small.url, {"inputs": "x" * 2000})
        assert get(small.url, "/ping")[0] == 200  # the server goes on
    assert status == 413
    assert json.loads(body)["error"] == ("request body is 2014 bytes; the limit is 1000 "
                                         "(SAGEMAKER_MAX_PAYLOAD_IN_MB)")


def test_a_model_that_cannot_load_fails_ping_with_the_reason_logged_on_one_line(
        lora_adapter, tmp_path, capsys):
    # An adapter as packages were registered before adapters carried their base: it names
    # builtin:tiny, which no endpoint on AWS could resolve, so none here does either.
    old = tmp_path / "model"
    shutil.copytree(lora_adapter, old, ignore=shutil.ignore_patterns(models.BUNDLED_BASE))
    config = json.loads((old / "adapter_config.json").read_text())
    (old / "adapter_config.json").write_text(json.dumps({**config,
                                                         "base_model_name_or_path": "builtin:tiny"}))

    with running(old) as broken:
        ping = get(broken.url, "/ping")
        invocation = post(broken.url, {"inputs": "Hi"})

    assert ping[0] == 500 and invocation[0] == 500
    reason = json.loads(ping[1])["error"]
    assert "names its base as 'builtin:tiny', which no serving container resolves" in reason
    logged = [line for line in capsys.readouterr().err.splitlines() if "ERROR:" in line]
    assert len(logged) == 1 and logged[0].endswith(f"ERROR: {reason}")


def test_the_entry_point_runs_only_as_serve_and_refuses_bad_settings_in_one_line(tmp_path):
    usage = subprocess.run([sys.executable, "-m", "serving"], capture_output=True, text=True,
                           check=False, timeout=120)
    assert usage.returncode == 2 and "python -m serving serve" in usage.stderr

    bad = subprocess.run([sys.executable, "-m", "serving", "serve"], capture_output=True,
                         text=True, check=False, timeout=120,
                         env={**ROOT_ENV, "SAGEMAKER_BASE_DIR": str(tmp_path),
                              "SAGEMAKER_BIND_TO_PORT": "eighty"})
    assert bad.returncode == 2
    assert bad.stderr.strip() == "ERROR: SAGEMAKER_BIND_TO_PORT='eighty' is not an integer"


def test_a_stream_sends_a_piece_per_token_and_never_half_a_character():
    import torch

    from serving.generation import TokenStreamer

    tokenizer = models.load_tokenizer(models.TINY)  # byte-level: "é" is two tokens
    ids = tokenizer("ab é!", add_special_tokens=False)["input_ids"]
    streamer = TokenStreamer(tokenizer)
    streamer.put(torch.tensor([[1, 2, 3]]))  # the prompt, as generate passes it first
    pieces = []
    for token in ids:
        streamer.put(torch.tensor([token]))
        while not streamer.queue.empty():
            pieces.append(streamer.queue.get())
    streamer.end()

    assert pieces == ["a", "b", " ", "é", "!"]
    assert list(streamer) == []  # nothing held back


@pytest.mark.parametrize("peft_method, kind", [
    ("none", "full model"),  # as a distilled student is: a full model folder
    ("p_tuning", "P_TUNING adapter over its base (PEFT)"),
    ("prefix_tuning", "PREFIX_TUNING adapter over its base (PEFT)"),
])
def test_every_kind_of_sft_output_serves_both_request_formats(tmp_path, peft_method, kind):
    from tests.serving.endpoints import answer_records
    from tests.steps.stage_runs import run_sft

    folder = run_sft(tmp_path / "opt-ml", answer_records("ok"), base_model="builtin:tiny",
                     peft_method=peft_method, num_virtual_tokens=4, max_steps=2,
                     logging_steps=1).model_dir

    with running(folder) as served:
        status, text = post(served.url, {"inputs": "Question 3?",
                                          "parameters": {"max_new_tokens": 4}})
        answered = chat(served.url, "Question 3?", max_tokens=4)
    assert served.server.generator.served.kind == kind
    assert status == 200 and isinstance(json.loads(text)[0]["generated_text"], str)
    assert answered["usage"]["completion_tokens"] >= 1

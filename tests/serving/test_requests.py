"""Reading an /invocations request: what each format means, and whose adapter answers."""

from __future__ import annotations

import json

import pytest

from serving.requests import RequestError, parse
from serving.settings import Settings

SETTINGS = Settings(model_dir=None)  # the defaults


def read(body: dict, custom_attributes: str | None = None, accept: str | None = None,
         content_type: str = "application/json"):
    return parse(json.dumps(body).encode(), content_type, accept, custom_attributes, SETTINGS)


def test_text_generation_is_greedy_unless_sampling_is_asked_for_as_tgi_reads_it():
    assert not read({"inputs": "Hi"}).sampling.do_sample
    assert read({"inputs": "Hi", "parameters": {"do_sample": True}}).sampling.do_sample
    # A sampling parameter alone means sampling (TGI), rather than being silently ignored.
    assert read({"inputs": "Hi", "parameters": {"temperature": 0.7}}).sampling.do_sample
    assert read({"inputs": "Hi", "parameters": {"top_k": 20}}).sampling.do_sample


def test_chat_temperature_zero_or_none_is_greedy_as_openais_temperature_zero():
    for fields in ({}, {"temperature": 0}):
        sampling = read({"messages": [{"role": "user", "content": "Hi"}], **fields}).sampling
        assert not sampling.do_sample and sampling.temperature is None
    sampling = read({"messages": [{"role": "user", "content": "Hi"}], "temperature": 0.5,
                     "max_tokens": 9, "stop": "END"}).sampling
    assert sampling.do_sample and sampling.temperature == 0.5
    assert sampling.max_new_tokens == 9 and sampling.stop == ("END",)


def test_the_default_length_is_the_configured_one():
    assert read({"inputs": "Hi"}).sampling.max_new_tokens == SETTINGS.default_max_new_tokens


def test_openai_text_parts_are_read_as_their_text():
    request = read({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "Hello, "}, {"type": "text", "text": "world"}]}]})
    assert request.messages == ({"role": "user", "content": "Hello, world"},)


def test_the_tenant_comes_from_custom_attributes_among_other_pairs_or_from_the_body():
    assert read({"inputs": "Hi"}, "trace=42; tenant=acme").tenant == "acme"
    assert read({"inputs": "Hi"}, "trace=42").tenant is None
    assert read({"inputs": "Hi", "parameters": {"adapter_id": "acme"}}).tenant == "acme"
    # The messages format's `model` names a tenant only when the endpoint has one of that name.
    assert read({"messages": [{"role": "user", "content": "Hi"}], "model": "acme"}).model == "acme"


def test_a_header_and_a_body_naming_different_tenants_are_refused():
    with pytest.raises(RequestError, match="CustomAttributes names tenant 'acme' and the body "
                                           "names 'globex'; name one") as refused:
        read({"inputs": "Hi", "parameters": {"adapter_id": "globex"}}, "tenant=acme")
    assert refused.value.status == 422


def test_content_type_parameters_and_accept_lists_are_understood():
    body = {"inputs": "Hi", "stream": True}
    assert read(body, content_type="application/json; charset=utf-8").stream
    assert read(body, accept="application/json, text/event-stream;q=0.9").stream
    with pytest.raises(RequestError, match="answered as text/event-stream") as refused:
        read(body, accept="application/json")
    assert refused.value.status == 406


@pytest.mark.parametrize("body, says", [
    ([1, 2], "request body is a JSON list; send an object"),
    ({"inputs": "Hi", "messages": []}, 'request has both "inputs" and "messages"; send one'),
    ({"inputs": ""}, 'field "inputs" must be a non-empty string, got ""'),
    ({"inputs": "Hi", "parameters": {"max_new_tokens": True}},
     'field "parameters.max_new_tokens" must be an integer, got true'),
    ({"messages": [{"role": "user", "content": "Hi"}], "n": 2},
     'field "n" is 2; this endpoint returns one choice (n = 1)'),
    ({"messages": [{"role": "user", "content": "Hi", "name": "x"}]},
     'unknown field "messages[0].name"; a message takes role, content'),
])
def test_malformed_requests_are_refused_in_one_line_naming_the_field(body, says):
    with pytest.raises(RequestError) as refused:
        read(body)
    assert str(refused.value) == says or str(refused.value).startswith(says)
    assert refused.value.status == 422

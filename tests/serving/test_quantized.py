"""Packages of steps.quantize serve, and where bitsandbytes cannot run the serving says what is
needed."""

from __future__ import annotations

import json
import sys

import pytest

from serving.model import quantization_problem
from tests.serving.endpoints import chat, running


@pytest.mark.parametrize("scheme", ["int8", "nf4"])
def test_a_quantized_package_serves_with_bitsandbytes_layers(quantized_models, scheme):
    with running(quantized_models / scheme) as endpoint:
        served = endpoint.server.generator.served
        reply = chat(endpoint.url, "Hello", max_tokens=4)

    assert served.kind == f"{scheme} model (bitsandbytes)"
    assert any("bitsandbytes" in type(m).__module__ for m in served.model.modules())
    assert reply["usage"]["completion_tokens"] == 4


def test_an_unquantized_model_needs_nothing_and_bitsandbytes_runs_here(quantized_models):
    assert quantization_problem({}, "cpu") is None
    for scheme in ("int8", "nf4"):
        config = json.loads((quantized_models / scheme / "config.json").read_text())
        assert quantization_problem(config, "cpu") is None


def test_without_bitsandbytes_the_problem_names_the_package(quantized_models, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as on a machine without it
    config = json.loads((quantized_models / "nf4" / "config.json").read_text())

    assert quantization_problem(config, "cpu").startswith(
        "a 4-bit bitsandbytes model needs the bitsandbytes package")


def test_another_quantization_method_is_named():
    config = {"quantization_config": {"quant_method": "gptq", "bits": 4}}
    assert quantization_problem(config, "cpu") == (
        "the model is quantized with gptq; this image serves bitsandbytes int8 and nf4 models "
        "(steps.quantize)")

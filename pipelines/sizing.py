"""Which SageMaker instance types serve a model, sized from the model: what the Register step
lists as the package's inference instance types, the first of which `llm-pipeline deploy` takes
by default.

A model up to about a billion parameters is served on CPU instances (SmolLM2-135M answers tens of
tokens a second on four vCPUs, and a GPU would idle); past that, on one GPU with the memory for
its weights in bf16 (or as quantized), its cache and the runtime. The size comes from the builtin
models' known sizes or from the size a model's name states ("Llama-3.1-8B", "Qwen2.5-0.5B",
"smollm2-135m"); a model whose name states none is taken as a 7B one, the common size of the
models people adapt, so that its package lists GPU instances rather than ones that cannot hold
it. The memory of each type is the one prices.yaml's hardware table gives the memory plan.
"""

from __future__ import annotations

import re

from pipelines import memory_plan

# The builtin models of steps.common.models and their parameter counts (a test keeps them in step).
BUILTIN_PARAMETERS = {"builtin:tiny": 111_000, "builtin:smollm2-135m-instruct": 135_000_000}
UNKNOWN_PARAMETERS = 7_000_000_000
CPU_LIMIT = 1_000_000_000  # parameters served on CPU instances
BYTES_PER_PARAMETER = {"cpu": 4.0, "gpu": 2.0, "int8": 1.0, "nf4": 0.5}  # fp32 / bf16 / quantized
RUNTIME_GIB = 2.0  # Python, torch and the server, besides the weights
OVERHEAD = 1.3  # key/value cache and activations of a few requests, on top of the weights

# The types offered, cheapest first: CPU instances (sized by their memory) and instances of one
# GPU (sized by its memory), both as prices.yaml's hardware table gives them.
CPU_TYPES = ("ml.m5.xlarge", "ml.c5.2xlarge", "ml.m5.2xlarge", "ml.m5.4xlarge", "ml.m5.12xlarge")
GPU_TYPES = ("ml.g5.xlarge", "ml.g5.2xlarge", "ml.g6.xlarge", "ml.g6e.xlarge", "ml.g6e.2xlarge",
             "ml.p5.4xlarge")
OFFERED = 3  # types listed per package: the smallest that fit, cheapest first

_SIZE = re.compile(r"(?<![a-z0-9.])(\d+(?:\.\d+)?)([mb])(?![a-z0-9])")


def parameter_count(model: str) -> int:
    """The parameters of model spec `model`: a builtin's known size, the size its name states,
    or UNKNOWN_PARAMETERS."""
    if model in BUILTIN_PARAMETERS:
        return BUILTIN_PARAMETERS[model]
    sizes = [float(number) * (1e9 if unit == "b" else 1e6)
             for number, unit in _SIZE.findall(model.lower().replace("_", "-"))]
    return int(max(sizes)) if sizes else UNKNOWN_PARAMETERS


def inference_instance_types(model: str, quantization: str | None = None) -> list[str]:
    """The instance types a package of `model` (quantized as `quantization`: int8, nf4 or none)
    lists, cheapest first: CPU ones up to CPU_LIMIT parameters, then one GPU with room for it."""
    parameters = parameter_count(model)
    on_cpu = parameters <= CPU_LIMIT
    scheme = quantization if quantization in ("int8", "nf4") else ("cpu" if on_cpu else "gpu")
    needed_gib = parameters * BYTES_PER_PARAMETER[scheme] * OVERHEAD / 2**30 + RUNTIME_GIB
    candidates = CPU_TYPES if on_cpu else GPU_TYPES
    hardware = memory_plan.instance_types()
    fitting = [name for name in candidates if needed_gib <= (
        hardware[name].accelerator_memory_gib if hardware[name].is_gpu
        else hardware[name].memory_gib)]
    # A model past one GPU's memory gets the largest: this image does not shard a model across
    # GPUs, so its endpoint would fail to load it (the log says so); quantize it, or serve it
    # with a sharding container.
    return fitting[:OFFERED] or [candidates[-1]]

"""The inference instance types a package lists, sized from its model."""

from pipelines import memory_plan, sizing
from steps.common import models


def test_a_small_model_is_served_on_cpu_instances_and_a_7b_one_on_a_gpu():
    assert sizing.inference_instance_types(models.SMOLLM2) == [
        "ml.m5.xlarge", "ml.c5.2xlarge", "ml.m5.2xlarge"]
    assert sizing.inference_instance_types("meta-llama/Llama-3.1-8B-Instruct") == [
        "ml.g5.xlarge", "ml.g5.2xlarge", "ml.g6.xlarge"]


def test_the_size_comes_from_the_name_and_unknown_sizes_are_taken_as_7b():
    assert sizing.parameter_count("Qwen/Qwen2.5-0.5B-Instruct") == 500_000_000
    assert sizing.parameter_count("s3://bucket/models/llama-2-13b/") == 13_000_000_000
    assert sizing.parameter_count("s3://bucket/models/my-model/") == sizing.UNKNOWN_PARAMETERS
    assert sizing.parameter_count("mistralai/Mistral-7B-v0.1") == 7_000_000_000


def test_a_larger_model_needs_a_gpu_with_more_memory_unless_quantized():
    assert sizing.inference_instance_types("llama-2-13b")[0] == "ml.g6e.xlarge"  # 48 GB
    assert sizing.inference_instance_types("llama-2-13b", "nf4")[0] == "ml.g5.xlarge"  # 24 GB
    assert sizing.inference_instance_types("llama-3-70b") == ["ml.p5.4xlarge"]  # the largest


def test_the_builtin_sizes_are_the_builtin_models():
    assert set(sizing.BUILTIN_PARAMETERS) == {models.TINY, models.SMOLLM2}
    tiny = sum(p.numel() for p in models.load_model(models.TINY).parameters())
    assert abs(tiny - sizing.BUILTIN_PARAMETERS[models.TINY]) < 0.05 * tiny


def test_every_type_offered_is_sized_from_the_hardware_table_the_memory_plan_reads():
    hardware = memory_plan.instance_types()
    for name in sizing.CPU_TYPES:
        assert not hardware[name].is_gpu, name
    for name in sizing.GPU_TYPES:
        assert hardware[name].is_gpu and hardware[name].accelerators == 1, name

"""The cost ledger of an execution: per step, instance, billable time and an estimated cost.

Prices are on-demand USD per instance-hour from one table, `prices.yaml`, which names its
date and region: the figures are an estimate, not a bill. An instance type the table lacks
is priced as unknown, never as zero, and so is every total it is part of.

Billable time is, on SageMaker, a training job's `BillableTimeInSeconds` and a processing
job's end minus start; locally it is the wall time of the step's jobs on this machine (every
attempt), which says what the same run would cost if the instance were as fast as this one.
With managed spot training SageMaker bills fewer seconds than the job trained: the saving is
1 - BillableTimeInSeconds / TrainingTimeInSeconds (DescribeTrainingJob's BillableTimeInSeconds,
https://docs.aws.amazon.com/sagemaker/latest/APIReference/API_DescribeTrainingJob.html). The AWS
ledger shows that saving per step; the local one says that a local run saves nothing.
A step that reused earlier outputs (a cache hit, or a step not selected in a re-run) ran no
job and costs nothing in this execution.

Cost per million training tokens divides the execution's total by the tokens its training
jobs trained on, read from the `total_tokens` metric of their FinalMetricDataList.
"""

from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from pipelines import UserError

PRICES_FILE = Path(__file__).with_name("prices.yaml")
TOKENS_METRIC = "total_tokens"
JOB_TYPES = ("Processing", "Training")


@dataclass(frozen=True)
class PriceTable:
    date: str
    region: str
    source: str
    usd_per_hour: dict[str, float]


def read_prices_file(path: Path = PRICES_FILE) -> Any:
    """The YAML of the price table, parsed once per version of the file in this process (callers
    read it, never change it): every `run` reads it before it starts, for its prices and for the
    memory plan's hardware, which looks instance types up many times a plan."""
    status = path.stat()
    return _parsed_prices(str(path), status.st_mtime_ns, status.st_size)


@functools.lru_cache(maxsize=4)
def _parsed_prices(path: str, mtime_ns: int, size: int) -> Any:
    # libyaml where PyYAML has it: its pure-Python parser took ten times as long (20 ms a read).
    return yaml.load(Path(path).read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def load_prices(path: Path = PRICES_FILE) -> PriceTable:
    try:
        data = read_prices_file(path)
        return PriceTable(str(data["date"]), str(data["region"]), str(data["source"]),
                          {str(k): float(v) for k, v in data["usd_per_hour"].items()})
    except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise UserError(f"price table {path} is unreadable ({exc}); it needs date, region, "
                        "source and usd_per_hour: {ml.TYPE: PRICE}") from None


@dataclass
class StepCost:
    step: str
    instance_type: str
    instance_count: int
    billable_seconds: float
    usd: float | None  # None: the price table has no price for instance_type
    training_tokens: int = 0
    note: str = ""  # why a step cost nothing: "cache hit ...", "reused from execution ..."


def job_resources(step_type: str, properties: dict) -> tuple[str, int]:
    """Instance type and count of a Processing or Training job, from its request/description."""
    if step_type == "Processing":
        cluster = properties.get("ProcessingResources", {}).get("ClusterConfig", {})
    else:
        cluster = properties.get("ResourceConfig", {})
    return str(cluster.get("InstanceType", "")), int(cluster.get("InstanceCount", 1) or 1)


def training_tokens(properties: dict) -> int:
    for metric in properties.get("FinalMetricDataList", []):
        if metric.get("MetricName") == TOKENS_METRIC:
            return int(metric["Value"])
    return 0


def price(instance_type: str, count: int, seconds: float, prices: PriceTable) -> float | None:
    if seconds <= 0:
        return 0.0
    hourly = prices.usd_per_hour.get(instance_type)
    return None if hourly is None else hourly * count * seconds / 3600


def ledger(costs: list[StepCost], prices: PriceTable, timing: str) -> dict[str, Any]:
    """The ledger as execution.json records it and `format_ledger` prints it."""
    known = sum(c.usd for c in costs if c.usd is not None)
    unpriced = [c.step for c in costs if c.usd is None]
    tokens = sum(c.training_tokens for c in costs)
    total = None if unpriced else known
    return {
        "prices": {"date": prices.date, "region": prices.region, "source": prices.source,
                   "note": "on-demand estimate, see pipelines/prices.yaml"},
        "timing": timing,
        "steps": [asdict(c) for c in costs],
        "total_usd": total,
        "priced_usd": known,
        "unpriced_steps": unpriced,
        "training_tokens": tokens,
        "usd_per_million_training_tokens": total / tokens * 1e6 if total is not None and tokens
        else None,
    }


def local_ledger(record: dict, prices: PriceTable | None = None) -> dict[str, Any]:
    """Ledger of a local execution record (execution.json, or the engine's record as a dict)."""
    prices = prices or load_prices()
    costs = []
    for state in record["steps"].values():
        if state["type"] not in JOB_TYPES or state["status"] not in ("Succeeded", "Failed",
                                                                      "Stopped"):
            continue
        instance, count = job_resources(state["type"], state.get("properties", {}))
        reused = state.get("reused_from", "")
        seconds = 0.0 if reused else float(state.get("billable_seconds") or 0.0)
        note = ""
        if reused:
            note = ("cache hit: " if state.get("cache", "").startswith("hit") else "reused: ") + \
                f"ran in execution {reused}"
        elif prices.usd_per_hour.get(instance) is None:
            note = f"no price for {instance or 'this instance'} in prices.yaml"
        elif state.get("properties", {}).get("EnableManagedSpotTraining"):
            note = ("managed spot: a local run bills every second; SageMaker would bill only "
                    "the spot-billable ones")
        costs.append(StepCost(state["name"], instance, count, round(seconds, 1),
                              price(instance, count, seconds, prices),
                              0 if reused else training_tokens(state.get("properties", {})), note))
    return ledger(costs, prices, "wall time of the local run")


def production_cost(states: list[dict], prices: PriceTable | None = None) -> float | None:
    """What the job steps among `states` cost to produce their outputs, reused ones included at
    the cost of the run that made them (for the model package's metadata); None when a price
    is unknown."""
    prices = prices or load_prices()
    total = 0.0
    for state in states:
        if state["type"] not in JOB_TYPES or state["status"] != "Succeeded":
            continue
        instance, count = job_resources(state["type"], state.get("properties", {}))
        seconds = float(state.get("billable_seconds") or 0) + float(
            state.get("source_billable_seconds") or 0)
        usd = price(instance, count, seconds, prices)
        if usd is None:
            return None
        total += usd
    return total


def step_job(step: dict) -> tuple[str, str] | None:
    """("Training" or "Processing", job name) of a ListPipelineExecutionSteps entry; None for a
    step that ran no job (condition, registration, fail)."""
    metadata = step.get("Metadata", {})
    for kind in JOB_TYPES:
        if f"{kind}Job" in metadata:
            return kind, metadata[f"{kind}Job"]["Arn"].rsplit("/", 1)[-1]
    return None


def describe_job(sagemaker, kind: str, name: str) -> dict:
    if kind == "Training":
        return sagemaker.describe_training_job(TrainingJobName=name)
    return sagemaker.describe_processing_job(ProcessingJobName=name)


def aws_step_cost(step: dict, kind: str, job: dict, prices: PriceTable) -> StepCost:
    """What one step of a SageMaker execution cost, from its entry and its job's description.

    A cache hit or a step reused by a selective execution shows the original job, which
    this execution did not pay for.
    """
    instance, count = job_resources(kind, job)
    if kind == "Training":
        seconds = job.get("BillableTimeInSeconds")
        if seconds is None:
            seconds = _between(job.get("TrainingStartTime"), job.get("TrainingEndTime"))
        tokens = training_tokens(job)
    else:
        seconds = _between(job.get("ProcessingStartTime"), job.get("ProcessingEndTime"))
        tokens = 0
    note = ""
    source = (step.get("CacheHitResult", {}).get("SourcePipelineExecutionArn")
              or step.get("SelectiveExecutionResult", {}).get("SourcePipelineExecutionArn"))
    if source:
        reused = "cache hit" if "CacheHitResult" in step else "reused"
        note, seconds, tokens = f"{reused}: ran in execution {source.rsplit('/', 1)[-1]}", 0, 0
    elif prices.usd_per_hour.get(instance) is None:
        note = f"no price for {instance} in prices.yaml"
    elif kind == "Training":
        note = spot_saving(job)
    return StepCost(step["StepName"], instance, count, float(seconds),
                    price(instance, count, float(seconds), prices), tokens, note)


def aws_ledger(sagemaker, execution_arn: str, prices: PriceTable | None = None) -> dict[str, Any]:
    """Ledger of a SageMaker execution, from its steps and their jobs' descriptions.

    A retried step lists only its last job, so earlier attempts are not counted.
    """
    prices = prices or load_prices()
    costs = []
    paginator = sagemaker.get_paginator("list_pipeline_execution_steps")
    pages = paginator.paginate(PipelineExecutionArn=execution_arn, SortOrder="Ascending")
    for step in [s for page in pages for s in page["PipelineExecutionSteps"]]:
        job = step_job(step)
        if job:
            costs.append(aws_step_cost(step, job[0], describe_job(sagemaker, *job), prices))
    return ledger(costs, prices, "SageMaker billable time")


def spot_saving(job: dict) -> str:
    """What managed spot training saved a training job, from its DescribeTrainingJob: the
    seconds billed against the seconds trained."""
    billable, trained = job.get("BillableTimeInSeconds"), job.get("TrainingTimeInSeconds")
    if not job.get("EnableManagedSpotTraining") or not billable or not trained:
        return ""
    return (f"managed spot: billed {billable:.0f} of {trained:.0f} s trained "
            f"({1 - billable / trained:.0%} saved)")


def _between(start: datetime | None, end: datetime | None) -> float:
    return (end - start).total_seconds() if start and end else 0.0


def format_ledger(entry: dict[str, Any]) -> str:
    prices = entry["prices"]
    title = (f"Estimated cost (on-demand {prices['region']} prices of {prices['date']}, "
             f"{entry['timing']}):")
    lines = [title, f"  {'step':<22} {'instance':<16} {'count':>5} {'billable':>10} {'USD':>10}"]
    for step in entry["steps"]:
        usd = "unknown" if step["usd"] is None else f"{step['usd']:.4f}"
        note = f"  {step['note']}" if step["note"] else ""
        lines.append(f"  {step['step']:<22} {step['instance_type'] or '-':<16} "
                     f"{step['instance_count']:>5} {step['billable_seconds']:>9.1f}s {usd:>10}{note}")
    if entry["total_usd"] is None:
        total = (f"unknown (at least {entry['priced_usd']:.4f}; no price for "
                 f"{', '.join(entry['unpriced_steps'])})")
    else:
        total = f"{entry['total_usd']:.4f}"
    lines.append(f"  {'total':<57}{total:>10}")
    if entry["training_tokens"]:
        per_million = entry["usd_per_million_training_tokens"]
        shown = "unknown" if per_million is None else f"{per_million:.4f}"
        label = f"per million training tokens ({entry['training_tokens']:,} trained)"
        lines.append(f"  {label:<57}{shown:>10}")
    return "\n".join(lines)


def show_ledger(args) -> int:
    """`llm-pipeline cost EXECUTION`: the ledger of a local execution (read from the local
    server's records, without starting it) or, with --target aws, of a SageMaker one."""
    # Imported here: the local engine imports this module for the ledger, not the commands.
    from pipelines import definition, recipe
    from pipelines.pipeline import executions_dir
    from pipelines.targets import connect

    if args.target == "aws":
        target = connect(args)
        arn = target.execution_arn(args.execution,
                                   definition.pipeline_name(recipe.load(args.recipe)))
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            entry = aws_ledger(target.client("sagemaker"), arn)
        except (BotoCoreError, ClientError) as exc:
            raise UserError(f"cost ledger of {arn}: {exc}") from None
    else:
        execution_id = args.execution.rstrip("/").rsplit("/", 1)[-1]
        found = sorted(executions_dir().glob(f"*/{execution_id}/execution.json"))
        if not found:
            raise UserError(f"no local execution {execution_id} under {executions_dir()}; "
                            "`run` prints the id of each execution it makes")
        entry = local_ledger(json.loads(found[0].read_text()))
    print(json.dumps(entry, indent=1) if args.json else format_ledger(entry))
    return 0

"""Step caching for the local engine, with SageMaker's semantics.

A Processing or Training step whose definition carries
`"CacheConfig": {"Enabled": true, "ExpireAfter": "P30D"}` reuses the latest successful run
of the same step of the same pipeline when its cache key is unchanged and that run ended
less than ExpireAfter ago (no ExpireAfter: it never expires). The step then takes that
run's properties, so later steps read the earlier outputs, as a cache hit on SageMaker
points at the original job's outputs.

The key holds the attributes SageMaker compares ("Default cache key attributes by pipeline step
type", https://docs.aws.amazon.com/sagemaker/latest/dg/pipelines-default-keys.html) as the step
sends them, every parameter, step property and execution variable resolved:
Processing: AppSpecification, Environment, ProcessingInputs; Training: AlgorithmSpecification,
CheckpointConfig, DebugHookConfig, DebugRuleConfigurations, Environment, HyperParameters,
InputDataConfig. Output locations and instance types are not in it, so output paths that
contain the execution id do not defeat the cache; an execution id inside a key attribute does,
here as on SageMaker, so that a local hit predicts a hit on AWS.

Every run of a Processing or Training step is written down, one JSON file per run, under
`$LLM_PIPELINE_HOME/cache/PIPELINE/STEP/`; deleting that folder empties the cache.

One local addition to SageMaker's rules: a hit needs the earlier run's outputs to still be
in S3. The local S3 (moto's, inside the local server) keeps objects only while the server runs; after a
restart the outputs are gone and the step runs again, naming the missing object.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from pipelines.local.expressions import Scope, resolve

KEY_ATTRIBUTES = {
    "Processing": ("AppSpecification", "Environment", "ProcessingInputs"),
    "Training": ("AlgorithmSpecification", "CheckpointConfig", "DebugHookConfig",
                 "DebugRuleConfigurations", "Environment", "HyperParameters", "InputDataConfig"),
}

# ISO 8601 durations as CacheConfig.ExpireAfter takes them: P30D, PT12H, P1Y2M3W4DT5H6M7S.
# SageMaker's guide also shows them without the P and in lower case ("30d", "T16m").
_DURATION = re.compile(r"P?(?:(\d+)Y)?(?:(\d+)M)?(?:(\d+)W)?(?:(\d+)D)?"
                       r"(?:T(?:(\d+)H)?(?:(\d+)M)?(?:(\d+(?:\.\d+)?)S)?)?", re.IGNORECASE)


def parse_duration(text: str) -> timedelta:
    """`P30D` -> 30 days. A month counts 30 days and a year 365, as nothing calendar-aware
    is needed to expire a cache entry. ValueError when `text` is not such a duration."""
    match = _DURATION.fullmatch(text.strip())
    if not text.strip() or not match or not any(match.groups()) or text.strip().upper().endswith("T"):
        raise ValueError(f"{text!r} is not an ISO 8601 duration (e.g. P30D, PT12H, P1DT6H)")
    years, months, weeks, days, hours, minutes, seconds = (float(g or 0) for g in match.groups())
    return timedelta(days=365 * years + 30 * months + 7 * weeks + days, hours=hours,
                     minutes=minutes, seconds=seconds)


def settings(spec: dict) -> tuple[bool, timedelta | None]:
    """(caching enabled, expiry) from a step's CacheConfig."""
    config = spec.get("CacheConfig") or {}
    if not config.get("Enabled"):
        return False, None
    expire = config.get("ExpireAfter")
    if not expire:
        return True, None
    try:
        return True, parse_duration(str(expire))
    except ValueError as exc:
        raise ValueError(f"step {spec['Name']}: CacheConfig.ExpireAfter {exc}") from None


def key(step_type: str, arguments: dict, scope: Scope) -> dict:
    """The step's cache key: its key attributes as the step sends them (resolved)."""
    return {name: resolve(arguments[name], scope)
            for name in KEY_ATTRIBUTES[step_type] if name in arguments}


def differences(old: Any, new: Any, path: str = "") -> list[str]:
    """Paths where two keys differ: `HyperParameters.learning_rate`, `InputDataConfig[train]...`."""
    if isinstance(old, dict) and isinstance(new, dict):
        found: list[str] = []
        for name in sorted(set(old) | set(new), key=str):
            found += differences(old.get(name), new.get(name), f"{path}.{name}" if path else name)
        return found
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        found = []
        for index, (a, b) in enumerate(zip(old, new, strict=True)):
            found += differences(a, b, f"{path}[{_element_name(b, index)}]")
        return found
    return [] if old == new else [path or "(everything)"]


def _element_name(item: Any, index: int) -> str:
    # SageMaker names list members by their ...Name field (ChannelName, InputName): use it.
    if isinstance(item, dict):
        for field_name, value in item.items():
            if field_name.endswith("Name") and isinstance(value, str):
                return value
    return str(index)


@dataclass
class Entry:
    """One earlier run of a step."""

    execution_id: str
    ended: float
    status: str  # Succeeded or Failed
    key: dict
    properties: dict
    billable_seconds: float

    @property
    def when(self) -> str:
        return datetime.fromtimestamp(self.ended, UTC).strftime("%Y-%m-%d %H:%M UTC")


@dataclass
class Lookup:
    hit: Entry | None
    reason: str  # why it missed; empty on a hit


class StepCache:
    """The runs of one pipeline's steps, kept under `root/PIPELINE/STEP/EXECUTION.json`."""

    def __init__(self, root: Path, pipeline_name: str) -> None:
        self.folder = root / pipeline_name

    def record(self, step: str, entry: Entry) -> None:
        path = self.folder / step / f"{entry.execution_id}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(entry), indent=1, default=str))

    def entries(self, step: str) -> list[Entry]:
        """Earlier runs of `step`, latest first."""
        found = []
        for path in (self.folder / step).glob("*.json"):
            try:
                found.append(Entry(**json.loads(path.read_text())))
            except (ValueError, TypeError):
                continue  # a file cut short by a crash is no run to reuse
        return sorted(found, key=lambda e: e.ended, reverse=True)

    def lookup(self, step: str, step_key: dict, expire_after: timedelta | None,
               missing_output: Callable[[dict], str | None], now: float | None = None) -> Lookup:
        """The latest successful, unexpired run with this key whose outputs still exist.

        `missing_output(properties)` names an output of that run that no longer exists.
        """
        now = time.time() if now is None else now
        earlier = self.entries(step)
        if not earlier:
            return Lookup(None, "no earlier run")
        same = [e for e in earlier if e.key == step_key]
        if not same:
            changed = differences(earlier[0].key, step_key)
            shown = ", ".join(changed[:3]) + (f" and {len(changed) - 3} more" if len(changed) > 3 else "")
            return Lookup(None, f"arguments changed: {shown} (since execution {earlier[0].execution_id})")
        succeeded = [e for e in same if e.status == "Succeeded"]
        if not succeeded:
            return Lookup(None, f"earlier run failed (execution {same[0].execution_id})")
        fresh = [e for e in succeeded
                 if expire_after is None or now - e.ended < expire_after.total_seconds()]
        if not fresh:
            latest = succeeded[0]
            return Lookup(None, f"expired: execution {latest.execution_id} ran on {latest.when}, "
                                f"longer ago than ExpireAfter")
        gone = ""
        for entry in fresh:
            gone = missing_output(entry.properties) or ""
            if not gone:
                return Lookup(entry, "")
        return Lookup(None, f"outputs of execution {fresh[0].execution_id} are gone ({gone})")


def output_uris(properties: dict) -> list[str]:
    """The S3 locations a job wrote, as its Describe*Job response names them."""
    outputs = properties.get("ProcessingOutputConfig", {}).get("Outputs", [])
    uris = [o["S3Output"]["S3Uri"] for o in outputs if "S3Output" in o]
    model = properties.get("ModelArtifacts", {}).get("S3ModelArtifacts")
    return uris + ([model] if model else [])
